"""Causal tracing (Meng et al. 2022, ROME; Yan & Jia 2025, ``methods.md`` Y2, §5.7) with the
corruptions and metrics of Zhang & Nanda (2024); ``docs/methods/causal_tracing.md`` has the details.

Corrupt a span (the subject; in one-to-many step prompts also each previous answer), then for every
position ``t`` and layer ``ℓ`` patch one state between the clean and the corrupted run: ``hidden``
(block ``ℓ``'s output) or the ``mlp`` / ``attn`` updates in ROME's window ``[ℓ - w//2, ℓ - (-w//2))``.
``denoising`` writes clean states into the corrupted run (ROME), ``noising`` corrupted states into the
clean run. Corruptions (:mod:`recallscope.core.corruption`): ``gaussian`` (ROME: ``S`` copies with
``ν·ε`` on the span embeddings, ``ν = 3 ×`` the std of the embeddings of every subject of the loaded
dataset, each tokenized alone), ``subject_swap`` (another subject of the relation with as many
tokens and another answer) and ``resample`` (span tokens drawn from the dataset's subject vocabulary).

Every metric comes from the same forwards, averaged over the copies: ``prob``, ``logprob``,
``logit_diff`` (against the swapped-in answer), ``kl`` (from the clean distribution) and
``answer_logprob``; ``metric`` picks the headline ``score``, with ``low`` (corrupted), ``high``
(clean), ``normalized = (score − low) / (high − low)`` and ``indirect_effect`` (``score − low``
denoising, ``high − score`` noising).

Fast by construction (:mod:`recallscope.core.tracing`): one clean run per fact, the corrupted run
recorded once, all cells batch rows of resumed forwards that reuse the recorded run's prefix; positions
before the span are not run (their states are the same in both runs). The naive loop of the paper is
in ``tests/oracles`` and gives the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Annotated, Literal

import numpy as np
import pandas as pd
import torch

from recallscope.core import corruption as corrupt
from recallscope.core.corruption import SAMPLES
from recallscope.core.corruption import prompt_noise_level as noise_level
from recallscope.core.patching import window
from recallscope.core.restoration import grid_cost, restoration_cells
from recallscope.core.steps import answer_span_names, answer_steps
from recallscope.core.tokens import PromptBatch, as_batch
from recallscope.core.tracing import TracedPrompt, trace_prompt
from recallscope.core.vocab import decode_tokens
from recallscope.data.facts import FactSet
from recallscope.data.variants import swap_inputs
from recallscope.errors import RecallscopeError
from recallscope.methods.base import Cost, MethodConfig, MethodResult, result_provenance
from recallscope.methods.general.summaries import BUCKETS, METRIC_COLUMNS, average_by_bucket, position_class
from recallscope.methods.general.summaries import average_by_bucket as summary
from recallscope.methods.hints import DISTINCT, NON_EMPTY, AtLeast, Between, NonNegative, Positive
from recallscope.models.model import Model

__all__ = [
    "NAME",
    "DESCRIPTION",
    "Config",
    "CausalTracingResult",
    "FactTrace",
    "run",
    "noise_level",
    "window",
    "prepare",
    "cost",
    "BUCKETS",
    "METRICS",
    "summary",
    "trace_spans",
]

NAME = "causal_tracing"
DESCRIPTION = (
    "Patch hidden/MLP/attention states between a clean and a corrupted run (ROME; Gaussian noise, "
    "subject swap, resampling): where is the fact recalled?"
)

CHUNK_SIZE = 1
"""Facts per runner chunk: each fact is traced on its own, so a chunk per fact checkpoints each one."""

Kind = Literal["hidden", "mlp", "attn"]
Corruption = Literal["gaussian", "subject_swap", "resample"]
Direction = Literal["denoising", "noising"]
SWAP_RULE = (
    "the subject of the fact's subject_swap partner (same relation, another answer, as many tokens, "
    "every other token unchanged) from the loaded dataset; subject span only"
)
METRICS = METRIC_COLUMNS
"""Metric columns of every row besides the headline ``score``."""


@dataclass(frozen=True, kw_only=True)
class Config(MethodConfig):
    """Causal-tracing settings; defaults follow ROME (preset ``rome``)."""

    kinds: Annotated[tuple[Kind, ...], NON_EMPTY] = ("hidden", "mlp", "attn")
    """What to patch: block outputs, MLP updates (windowed), attention updates (windowed)."""
    window: Positive = 10
    """Layers patched around ``ℓ`` for mlp/attn: ``[ℓ - w//2, ℓ - (-w//2))``, clipped."""
    corruptions: Annotated[tuple[Corruption, ...], NON_EMPTY, DISTINCT] = ("gaussian",)
    """How the span is corrupted, each traced separately: Gaussian noise on its embeddings (ROME),
    the subject of another fact of the relation (``subject_swap``), random tokens (``resample``)."""
    directions: Annotated[tuple[Direction, ...], NON_EMPTY, DISTINCT] = ("denoising",)
    """``denoising``: clean states into the corrupted run (ROME); ``noising``: corrupted states into
    the clean run."""
    samples: Positive | None = None
    """Corrupted copies ``S`` per fact (Gaussian noise and resampling; a subject swap has one). None:
    ROME's 10 on a GPU (or another accelerator), 3 on a CPU, where ten would make causal tracing most
    of a first run's time (the first 3 noise draws of ROME's 10; presets ``rome`` and ``yan_jia``: 10)."""
    noise: Annotated[float, AtLeast(0)] | None = None
    """Noise scale ``ν`` for every span; None: calibrated (``noise_factor ×`` the std of the
    embeddings of the dataset's subjects / answers)."""
    noise_factor: Annotated[float, AtLeast(0)] = 3.0
    noise_levels: tuple[tuple[str, Annotated[float, AtLeast(0)]], ...] = ()
    """Set by :func:`prepare`: calibrated ``(span group, ν)`` pairs; groups ``subject``, ``answers``."""
    noise_calibrated_on: str | None = None
    """Set by :func:`prepare`: what the noise levels and vocabularies come from."""
    resample_vocab: tuple[tuple[str, tuple[NonNegative, ...]], ...] = ()
    """Set by :func:`prepare` for ``resample``: ``(span group, token ids)`` drawn from."""
    seed: Annotated[int, Between(0, 2**32 - 1)] = 1
    """Seed of ``numpy.random.RandomState`` drawing the noise and the resampled tokens (ROME: 1)."""
    spans: tuple[str, ...] = ("subject", "answers")
    """Spans to corrupt, each traced separately: names of PromptBatch spans (``"subject"``,
    ``"answer_1"``, …) or ``"answers"``: every previous-answer span a fact has (one-to-many step
    prompts; plain facts have none). A fact is skipped only when it has none of them."""
    target: Literal["top1", "gold"] = "top1"
    metric: Literal["prob", "logprob", "logit_diff", "kl", "answer_logprob"] = "prob"
    """The headline ``score``: P(target) (ROME), log P, logit difference to the swapped-in answer,
    KL from the clean distribution, or Σ log P of the gold answer's tokens."""
    max_batch_rows: Positive = 256
    """Rows per forward pass (memory bound)."""
    reuse: bool = True
    """Resume the corrupted run at the restored layer and position (False: rerun everything)."""
    forward_cost: NonNegative = 120
    """Fixed cost of one forward pass in token-rows, for grouping restorations (CPU ≈ 100–200)."""

    PRESETS = {
        "rome": dict(
            kinds=("hidden", "mlp", "attn"),
            window=10,
            corruptions=("gaussian",),
            directions=("denoising",),
            samples=10,
            noise_factor=3.0,
            seed=1,
            target="top1",
            metric="prob",
        ),
        "yan_jia": dict(
            kinds=("mlp", "attn"),
            window=10,
            corruptions=("gaussian",),
            directions=("denoising",),
            samples=10,
            noise_factor=3.0,
            seed=1,
            spans=("subject", "answers"),
            target="gold",
            metric="prob",
        ),
        "zhang_nanda": dict(
            kinds=("mlp", "attn"),
            window=5,
            corruptions=("subject_swap",),
            directions=("denoising",),
            spans=("subject",),
            target="gold",
            metric="logit_diff",
        ),
        "corruptions": dict(
            kinds=("mlp", "attn"),
            corruptions=("gaussian", "subject_swap"),
            directions=("denoising", "noising"),
            spans=("subject",),
            target="gold",
        ),
    }

    def __post_init__(self) -> None:
        if self.metric == "answer_logprob" and self.target != "gold":
            raise RecallscopeError("metric='answer_logprob' scores the gold answer: set target='gold'")
        if self.metric == "logit_diff" and set(self.corruptions) != {"subject_swap"}:
            raise RecallscopeError(
                "metric='logit_diff' compares the answer with the swapped-in subject's answer: set "
                "corruptions=('subject_swap',) (the logit_diff column is stored with any corruption)"
            )


@dataclass
class FactTrace:
    """The trace of one fact with one span corrupted one way. ``scores[kind]`` is
    ``[n_positions, n_layers]`` of the headline metric, ``metrics[kind][name]`` every metric.
    """

    fact_id: str
    tokens: list[str]
    span: tuple[int, int]
    target_ids: list[int]
    target: str
    low: float
    high: float
    scores: dict[str, np.ndarray]
    span_name: str = "subject"
    """Which span was corrupted."""
    step: int = 1
    """Answer step of the fact (1 for plain facts)."""
    noise: float | None = None
    corruption: str = "gaussian"
    direction: str = "denoising"
    partner: str | None = None
    """The fact whose subject was swapped in (``subject_swap``)."""
    metrics: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    corrupted: dict[str, float] = field(default_factory=dict)
    """Every metric of the corrupted run (averaged over the copies)."""
    clean: dict[str, float] = field(default_factory=dict)
    """Every metric of the clean run."""

    def buckets(self) -> list[str]:
        """ROME's position classes (first/middle/last subject, …), named after the corrupted span."""
        b, e = self.span
        n = len(self.tokens)
        return [position_class(t, b, e, n).replace("subject", self.span_name) for t in range(n)]

    @property
    def key(self) -> str:
        """Array key ``<fact_id>[/<span>][/<corruption>/<direction>]``; subject, Gaussian denoising unsaid."""
        key = self.fact_id if self.span_name == "subject" else f"{self.fact_id}/{self.span_name}"
        default = (self.corruption, self.direction) == ("gaussian", "denoising")
        return key if default else f"{key}/{self.corruption}/{self.direction}"

    def effect(self, scores: np.ndarray) -> np.ndarray:
        """Indirect effect of patched ``scores``: toward clean when denoising, away from it when noising."""
        return scores - self.low if self.direction == "denoising" else self.high - scores


@dataclass(frozen=True)
class CausalTracingResult(MethodResult):
    """Per-fact traces plus everything needed to interpret them."""

    traces: list[FactTrace]
    noise: dict[str, float]
    """ν per corrupted span name."""

    def to_frame(self) -> pd.DataFrame:
        """One row per fact × corrupted span × corruption × direction × kind × position × layer."""
        frames = [_trace_frame(tr, kind) for tr in self.traces for kind in tr.scores]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def tables(self) -> dict[str, pd.DataFrame]:
        """``runs``: one row per trace (fact, span, corruption, direction, partner) with every metric
        of the clean (``clean_<metric>``) and the corrupted run (``corrupted_<metric>``).
        """
        rows = [
            {"fact_id": tr.fact_id, "span": tr.span_name, "corruption": tr.corruption,
             "direction": tr.direction, "partner": tr.partner,
             **{f"clean_{k}": v for k, v in tr.clean.items()},
             **{f"corrupted_{k}": v for k, v in tr.corrupted.items()}}
            for tr in self.traces
        ]  # fmt: skip
        return {"runs": pd.DataFrame(rows)} if rows else {}

    def arrays(self) -> dict[str, np.ndarray]:
        """Per-fact ``[positions × layers]`` score maps, keyed ``"<trace key>/<kind>"``
        (:attr:`FactTrace.key`).
        """
        return {f"{tr.key}/{kind}": s for tr in self.traces for kind, s in tr.scores.items()}

    def summary(self) -> pd.DataFrame:
        """Mean indirect effect per kind × position class × layer (ROME's average plot)."""
        return average_by_bucket(self.to_frame())


def _trace_frame(tr: FactTrace, kind: str) -> pd.DataFrame:
    scores = tr.scores[kind]
    n_pos, n_layers = scores.shape
    span = tr.high - tr.low
    columns = {
        "fact_id": tr.fact_id,
        "step": tr.step,
        "span": tr.span_name,
        "corruption": tr.corruption,
        "direction": tr.direction,
        "kind": kind,
        "position": np.repeat(np.arange(n_pos), n_layers),
        "layer": np.tile(np.arange(n_layers), n_pos),
        "token": np.repeat(tr.tokens, n_layers),
        "bucket": np.repeat(tr.buckets(), n_layers),
        "score": scores.reshape(-1),
        "indirect_effect": tr.effect(scores).reshape(-1),
        "normalized": (scores.reshape(-1) - tr.low) / span if span else np.nan,
        "low": tr.low,
        "high": tr.high,
        "target": tr.target,
        "partner": tr.partner,
    }
    columns.update({name: tr.metrics[kind][name].reshape(-1) for name in METRICS})
    return pd.DataFrame(columns)


def trace_spans(batch: PromptBatch, config: Config) -> list[str]:
    """The span names ``config.spans`` stands for in ``batch`` ("answers" expanded)."""
    names = []
    for name in config.spans:
        names += answer_span_names(batch) if name == "answers" else [name]
    return list(dict.fromkeys(names))


def _group(span: str) -> str:
    return "answers" if span.startswith("answer_") else span


def prepare(
    model: Model, facts: PromptBatch | FactSet, config: Config, dataset: FactSet | None = None
) -> Config:
    """Fix the noise levels and resampling vocabularies on the whole loaded ``dataset`` (default:
    ``facts``) before chunking: every subject (answer) of it, each tokenized alone, as ROME does, so
    they do not change with the sample. Token ids alone (a :class:`PromptBatch`) use the spans as
    they stand in the prompts.
    """
    batch = as_batch(model, facts)
    groups = list(dict.fromkeys(_group(s) for s in trace_spans(batch, config) if s in batch.spans))
    pool = facts if dataset is None else dataset
    return replace(_with_samples(model, config), **corrupt.calibration_fields(model, pool, groups, config))


def _with_samples(model: Model, config: Config) -> Config:
    """``config`` with ``samples`` fixed (None: :func:`~recallscope.core.corruption.default_samples`)."""
    return config if config.samples is not None else replace(config, samples=corrupt.default_samples(model))


def cost(model: Model, batch: PromptBatch | FactSet, config: Config | None = None) -> Cost:
    """Forward passes, token-block work and peak activation memory of :func:`run`, without running."""
    config = _with_samples(model, config or Config())
    batch = as_batch(model, batch)
    n_layers = model.n_layers
    total = Cost(0, 0.0, 0)
    for row, span in _row_spans(batch, config):
        start = int(batch.spans[span][row, 0]) - int(batch.pad_lengths[row])
        n_tokens = batch.seq_len - int(batch.pad_lengths[row])
        cells = restoration_cells(config.kinds, config.window, n_layers, range(start, n_tokens))
        total = total + Cost(1, float(n_tokens * n_layers), 0)  # the clean run
        for corruption in _corruptions(config, span):
            samples = 1 if corruption == "subject_swap" else config.samples
            for direction in config.directions:
                total = total + Cost(*grid_cost(model, config, cells, samples, n_tokens, direction))
    return total


def _corruptions(config: Config, span: str) -> list[str]:
    """The corruptions traced for ``span``: a subject swap replaces the subject only."""
    return [c for c in config.corruptions if c != "subject_swap" or span == "subject"]


def run(model: Model, batch: PromptBatch | FactSet, config: Config | None = None) -> CausalTracingResult:
    """Trace every fact of ``batch`` (each fact on its own; see the module docstring).

    ``subject_swap`` reads each fact's ``subject_swap`` partner: pass a :class:`FactSet` whose facts
    have one (:func:`~recallscope.data.variants.add_swap_partners`; ``recallscope run`` adds them).
    """
    config = config or Config()
    facts = batch if isinstance(batch, FactSet) else None
    batch = as_batch(model, batch)
    names = trace_spans(batch, config)
    if not any(name in batch.spans for name in names):
        raise RecallscopeError(
            f"the batch has none of the spans {list(config.spans)} (spans: {', '.join(batch.spans)})"
        )
    if config.target == "gold" and _gold(batch, 0) is None:
        raise RecallscopeError("target='gold' needs a batch with targets (tokenize(..., targets=...))")
    if not config.noise_calibrated_on:  # run directly: calibrated on the facts given
        config = prepare(model, facts if facts is not None else batch, config)
    config = _with_samples(model, config)
    noises = {name: _noise_for(config, name) for name in names if name in batch.spans}
    steps = answer_steps(batch)
    pairs = _row_spans(batch, config)
    traces, skipped = [], []
    for row in range(len(batch)):
        fact_id = batch.fact_ids[row] if batch.fact_ids else str(row)
        swaps = "subject_swap" in config.corruptions
        partner = swap_inputs(model, facts[row]) if swaps and facts is not None else None
        if swaps and partner is None:
            skipped.append((fact_id, f"no subject_swap partner: {SWAP_RULE}"))
            continue
        spans = [name for r, name in pairs if r == row]
        if not spans:
            skipped.append((fact_id, f"no {' or '.join(config.spans)} span"))
        for name in spans:
            start, end = (int(v) for v in batch.spans[name][row])
            pad = int(batch.pad_lengths[row])
            ids = batch.input_ids[row, pad:]
            fact = TracedPrompt(
                fact_id, ids, (start - pad, end - pad), _gold(batch, row), int(steps[row]), name
            )
            traces += _trace(model, fact, noises[name], partner, config)
    provenance = result_provenance(model, config, **_conventions(model, config, noises))
    fact_ids = list(dict.fromkeys(tr.fact_id for tr in traces))
    return CausalTracingResult(
        traces, noises, config=config, fact_ids=fact_ids, provenance=provenance, skipped=skipped
    )


def _conventions(model: Model, config: Config, noises: dict[str, float | None]) -> dict:
    conventions = dict(
        kinds=config.kinds,
        window=config.window,
        window_rule="[l - w//2, l - (-w//2))",
        corruptions=list(config.corruptions),
        directions=list(config.directions),
        samples=config.samples,
        samples_rule=f"samples=None: {SAMPLES['cpu']} on a CPU, {SAMPLES['accelerator']} (ROME) on a GPU",
        noise=noises,
        noise_rule=_noise_rule(config),
        noise_rng=f"numpy RandomState({config.seed})",
        spans=list(config.spans),
        target=config.target,
        metric=config.metric,
        metrics="prob, logprob: P / log P of the target at the last position; logit_diff: target minus "
        "the swapped-in subject's answer (subject swap); kl: KL(clean || patched) at the last position; "
        "each averaged over the corrupted copies; normalized = (score - low) / (high - low)",
        layers="block index l (hidden: output of block l)",
        bos=model.bos,
    )
    if "subject_swap" in config.corruptions:
        conventions["subject_swap"] = SWAP_RULE
    if "resample" in config.corruptions:
        conventions["resample"] = f"uniform over the tokens of {config.noise_calibrated_on} (RandomState)"
    if model.spec.ple_update:
        conventions["per_layer_inputs"] = (
            "the noise is added to the token embeddings only: each block's per-layer input (ple_out) "
            "still gets the span tokens' own per-layer embeddings, and the noised embedding only "
            "through the model's projection of it"
        )
    return conventions


def _row_spans(batch: PromptBatch, config: Config) -> list[tuple[int, str]]:
    """``(row, span)`` pairs to trace, row by row: the configured spans each row has."""
    names = [n for n in trace_spans(batch, config) if n in batch.spans]
    return [(row, n) for row in range(len(batch)) for n in names if int(batch.spans[n][row, 0]) >= 0]


def _noise_for(config: Config, span: str) -> float | None:
    if "gaussian" not in config.corruptions:
        return None
    return config.noise if config.noise is not None else dict(config.noise_levels)[_group(span)]


def _noise_rule(config: Config) -> str:
    if "gaussian" not in config.corruptions or config.noise is not None:
        return "given" if "gaussian" in config.corruptions else "no Gaussian noise"
    return f"{config.noise_factor} x std of the embedding entries of {config.noise_calibrated_on} (ROME)"


def _gold(batch: PromptBatch, row: int) -> list[int] | None:
    if batch.answer_ids:
        return list(batch.answer_ids[row])
    return None if batch.target_ids is None else [int(batch.target_ids[row])]


def _trace(model, fact: TracedPrompt, noise, partner, config: Config) -> list[FactTrace]:
    """The traces of one fact and span: one per corruption × direction."""
    names = _corruptions(config, fact.span_name)
    corruptions = {c: _corrupted(model, fact, c, noise, partner, config) for c in names}
    traced = trace_prompt(model, fact, corruptions, config)
    return [
        FactTrace(
            fact_id=fact.fact_id,
            tokens=decode_tokens(model, fact.ids),
            span=fact.span,
            target_ids=list(traced.target),
            target="".join(decode_tokens(model, torch.tensor(traced.target))),
            low=grid.corrupted[config.metric],
            high=grid.clean[config.metric],
            scores={kind: grid.grids[kind][config.metric] for kind in config.kinds},
            span_name=fact.span_name,
            step=fact.step,
            noise=noise if grid.corruption == "gaussian" else None,
            corruption=grid.corruption,
            direction=grid.direction,
            partner=corruptions[grid.corruption].partner,
            metrics=grid.grids,
            corrupted=grid.corrupted,
            clean=grid.clean,
        )
        for grid in traced.grids
    ]


def _corrupted(
    model, fact: TracedPrompt, corruption: str, noise, partner, config: Config
) -> corrupt.Corrupted:
    full = fact.full(config.metric == "answer_logprob")
    if corruption == "gaussian":
        return corrupt.gaussian(
            full, fact.span, noise=noise, samples=config.samples, seed=config.seed, model=model
        )
    if corruption == "resample":
        vocab = dict(config.resample_vocab)[_group(fact.span_name)]
        return corrupt.resample(full, fact.span, vocab=vocab, samples=config.samples, seed=config.seed)
    partner_id, ids, counter = partner
    partner_full = torch.cat([ids.to(full.device), full[len(fact.ids) :]])
    return corrupt.swapped(full, fact.span, partner_full, counter=counter, partner=partner_id)
