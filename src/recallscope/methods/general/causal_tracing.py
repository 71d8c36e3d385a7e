"""Causal tracing (Meng et al. 2022, ROME; as used by Yan & Jia 2025, ``methods.md`` Y2, §5.7).

Corrupt a span of the prompt (the subject; in one-to-many step prompts also each previous answer,
Yan & Jia's ``noise_prev_ans``) by adding Gaussian noise ``ν·ε`` to its token embeddings, in ``S``
noisy copies; then, for every position ``t`` and layer ``ℓ``, restore the clean
value of one state and measure how much of the answer's probability comes back:

- ``hidden``: the output of block ``ℓ`` (``resid_post``) at ``t``;
- ``mlp`` / ``attn``: the MLP / attention updates at ``t`` in a window of layers around ``ℓ``,
  ``[max(0, ℓ - w//2), min(L, ℓ - (-w//2)))`` (ROME's window, default ``w = 10``).

Score: the probability of the target at the last position, averaged over the ``S`` noise samples
(or, with ``metric="answer_logprob"``, the summed log-probability of every token of the gold
answer). ``low`` is the corrupted score (nothing restored), ``high`` the clean one; the indirect
effect of a cell is ``score - low``.

Our choices, recorded in every result: ``ν = noise_factor × std`` of the corrupted spans'
embedding entries (``noise_level``; ROME's "s3"), one level for subjects and one for answers (as Yan &
Jia), calibrated over the whole dataset by :func:`prepare` (over the batch when run directly) unless
given; each span of a fact is traced separately (``span`` column); the noise
comes from ``numpy.random.RandomState(seed)`` with shape ``[S, span, d_model]`` and is the same for
every restoration (ROME's generator and seed); the target is the model's own clean top-1 token
(``"top1"``, ROME) or the first token of the gold answer (``"gold"``).

Fast by construction: the clean run is computed once per fact and its states are the restored
values; all restorations are batch rows; a restoration at ``(t, ℓ)`` resumes the recorded corrupted
run at block ``ℓ`` (window start for mlp/attn) and, reusing its keys/values, at a position ``≤ t``
(:mod:`recallscope.core.resume`); positions before the corrupted span are not run at all, because
restoring them restores states that are clean already (their score is ``low`` exactly). The naive
loop of the paper (one forward per cell) is in ``tests/oracles`` and gives the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Annotated, Literal

import numpy as np
import pandas as pd
import torch

from recallscope.core.cache import run_with_cache
from recallscope.core.patching import add_noise, window
from recallscope.core.restoration import (
    RESTORED_SITES,
    RestorationCell,
    plan_resumed_forwards,
    run_restoration_cells,
    target_score,
)
from recallscope.core.resume import RunState, record_run
from recallscope.core.steps import answer_span_names, answer_steps, span_masks
from recallscope.core.tokens import PromptBatch, as_batch
from recallscope.core.vocab import decode_tokens
from recallscope.data.facts import FactSet
from recallscope.errors import RecallscopeError
from recallscope.methods.base import Cost, MethodConfig, MethodResult, result_provenance
from recallscope.methods.general.summaries import BUCKETS, average_by_bucket, bucket_names
from recallscope.methods.general.summaries import average_by_bucket as summary
from recallscope.methods.hints import NON_EMPTY, Positive
from recallscope.models.model import Model
from recallscope.models.sites import Site

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
    "summary",
    "bucket_names",
    "trace_spans",
]

NAME = "causal_tracing"
DESCRIPTION = (
    "Restore clean hidden/MLP/attention states into a noised run (ROME): where is the fact recalled?"
)

CHUNK_SIZE = 1
"""Facts per runner chunk: each fact is traced on its own, so a chunk per fact checkpoints each one."""

Kind = Literal["hidden", "mlp", "attn"]


@dataclass(frozen=True, kw_only=True)
class Config(MethodConfig):
    """Causal-tracing settings; defaults follow ROME (preset ``rome``)."""

    kinds: Annotated[tuple[Kind, ...], NON_EMPTY] = ("hidden", "mlp", "attn")
    """What to restore: block outputs, MLP updates (windowed), attention updates (windowed)."""
    window: Positive = 10
    """Layers restored around ``ℓ`` for mlp/attn: ``[ℓ - w//2, ℓ - (-w//2))``, clipped."""
    samples: Positive = 10
    """Noise samples ``S`` (noisy copies) per fact."""
    noise: float | None = None
    """Noise scale ``ν`` for every span; None: calibrated (``noise_factor × std`` of the span
    embeddings), separately for subjects and for answers."""
    noise_factor: float = 3.0
    noise_levels: tuple[tuple[str, float], ...] = ()
    """Set by :func:`prepare`: calibrated ``(span group, ν)`` pairs; groups ``subject``, ``answers``."""
    noise_calibrated_on: str | None = None
    """Set by :func:`prepare`: which facts the noise levels were calibrated on (recorded in results)."""
    seed: int = 1
    """Seed of ``numpy.random.RandomState`` drawing the noise (ROME: 1)."""
    spans: tuple[str, ...] = ("subject", "answers")
    """Spans to corrupt, each traced separately: names of PromptBatch spans (``"subject"``,
    ``"answer_1"``, …) or ``"answers"``: every previous-answer span a fact has (one-to-many step
    prompts; plain facts have none). A fact is skipped only when it has none of them."""
    target: Literal["top1", "gold"] = "top1"
    metric: Literal["prob", "answer_logprob"] = "prob"
    """``prob``: P(target); ``answer_logprob``: Σ log P of the gold answer's tokens."""
    max_batch_rows: Positive = 256
    """Rows per forward pass (memory bound)."""
    reuse: bool = True
    """Resume the corrupted run at the restored layer and position (False: rerun everything)."""
    forward_cost: int = 120
    """Fixed cost of one forward pass in token-rows, for grouping restorations (CPU ≈ 100–200)."""

    PRESETS = {
        "rome": dict(
            kinds=("hidden", "mlp", "attn"),
            window=10,
            samples=10,
            noise_factor=3.0,
            seed=1,
            target="top1",
            metric="prob",
        ),
        "yan_jia": dict(
            kinds=("mlp", "attn"),
            window=10,
            samples=10,
            noise_factor=3.0,
            seed=1,
            spans=("subject", "answers"),
            target="gold",
            metric="prob",
        ),
    }

    def __post_init__(self) -> None:
        if self.metric == "answer_logprob" and self.target != "gold":
            raise RecallscopeError("metric='answer_logprob' scores the gold answer: set target='gold'")


@dataclass
class FactTrace:
    """The trace of one fact with one span corrupted. ``scores[kind]`` is ``[n_positions, n_layers]``."""

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

    def buckets(self) -> list[str]:
        """ROME's position classes (first/middle/last subject, first subsequent, further, last),
        named after the corrupted span.
        """
        b, e = self.span
        n = len(self.tokens)
        return [_bucket(t, b, e, n).replace("subject", self.span_name) for t in range(n)]

    @property
    def key(self) -> str:
        """``"<fact_id>"`` for the subject, ``"<fact_id>/<span>"`` for another span (array keys)."""
        return self.fact_id if self.span_name == "subject" else f"{self.fact_id}/{self.span_name}"


def _bucket(t: int, b: int, e: int, n: int) -> str:
    if t == n - 1:
        return "last token"
    if t < b:
        return "before subject"
    if t == e - 1:
        return "last subject"
    if t == b:
        return "first subject"
    if t < e:
        return "middle subject"
    return "first subsequent" if t == e else "further tokens"


@dataclass(frozen=True)
class CausalTracingResult(MethodResult):
    """Per-fact traces plus everything needed to interpret them."""

    traces: list[FactTrace]
    noise: dict[str, float]
    """ν per corrupted span name."""

    def to_frame(self) -> pd.DataFrame:
        """One row per fact × corrupted span × kind × position × layer."""
        frames = []
        for tr in self.traces:
            n_pos, n_layers = next(iter(tr.scores.values())).shape
            buckets = tr.buckets()
            for kind, scores in tr.scores.items():
                frames.append(
                    pd.DataFrame(
                        {
                            "fact_id": tr.fact_id,
                            "step": tr.step,
                            "span": tr.span_name,
                            "kind": kind,
                            "position": np.repeat(np.arange(n_pos), n_layers),
                            "layer": np.tile(np.arange(n_layers), n_pos),
                            "token": np.repeat(tr.tokens, n_layers),
                            "bucket": np.repeat(buckets, n_layers),
                            "score": scores.reshape(-1),
                            "indirect_effect": scores.reshape(-1) - tr.low,
                            "low": tr.low,
                            "high": tr.high,
                            "target": tr.target,
                        }
                    )
                )
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def tables(self) -> dict[str, pd.DataFrame]:
        """No extra tables: ``to_frame()`` holds everything."""
        return {}

    def arrays(self) -> dict[str, np.ndarray]:
        """Per-fact ``[positions × layers]`` score maps, keyed ``"<fact_id>/<kind>"`` (subject) or
        ``"<fact_id>/<span>/<kind>"`` (another corrupted span).
        """
        return {f"{tr.key}/{kind}": s for tr in self.traces for kind, s in tr.scores.items()}

    def summary(self) -> pd.DataFrame:
        """Mean indirect effect per kind × position class × layer (ROME's average plot)."""
        return average_by_bucket(self.to_frame())


def noise_level(model: Model, batch: PromptBatch, span: str = "subject", factor: float = 3.0) -> float:
    """``factor ×`` the standard deviation of the token-embedding entries of ``span`` over ``batch``
    (``"answers"``: of every previous-answer span).
    """
    site = Site(None, "embed")
    embeds = run_with_cache(model, batch, [site])[site]  # [B, T, d]
    masks = span_masks(batch, [span]).values()
    mask = torch.stack(list(masks)).any(0).to(embeds.device) if masks else None
    if mask is None or not mask.any():
        raise RecallscopeError(f"no {span!r} span in the batch: cannot calibrate the noise")
    return factor * float(embeds[mask].double().std())


def trace_spans(batch: PromptBatch, config: Config) -> list[str]:
    """The span names ``config.spans`` stands for in ``batch`` ("answers" expanded)."""
    names = []
    for name in config.spans:
        names += answer_span_names(batch) if name == "answers" else [name]
    return list(dict.fromkeys(names))


def _group(span: str) -> str:
    return "answers" if span.startswith("answer_") else span


def prepare(model: Model, facts: PromptBatch | FactSet, config: Config) -> Config:
    """Fix the noise levels over the whole dataset (the runner calls this once, before chunking)."""
    if config.noise is not None:
        return config
    batch = as_batch(model, facts)
    groups = dict.fromkeys(_group(s) for s in trace_spans(batch, config) if s in batch.spans)
    levels = tuple((g, noise_level(model, batch, g, config.noise_factor)) for g in groups)
    return replace(config, noise_levels=levels, noise_calibrated_on=f"the dataset's {len(batch)} facts")


def _noise_for(model, batch: PromptBatch, config: Config, span: str) -> float:
    if config.noise is not None:
        return config.noise
    levels = dict(config.noise_levels)
    if _group(span) in levels:
        return levels[_group(span)]
    return noise_level(model, batch, _group(span), config.noise_factor)


def cost(model: Model, batch: PromptBatch | FactSet, config: Config | None = None) -> Cost:
    """Forward passes, token-block work and peak activation memory of :func:`run`, without running."""
    config = config or Config()
    batch = as_batch(model, batch)
    n_layers = model.n_layers
    total = Cost(0, 0.0, 0)
    per_chunk = max(1, config.max_batch_rows // config.samples)
    for row, span in _row_spans(batch, config):
        start = int(batch.spans[span][row, 0]) - int(batch.pad_lengths[row])
        n_tokens = batch.seq_len - int(batch.pad_lengths[row])
        groups = plan_resumed_forwards(
            _cells(config, n_layers, range(start, n_tokens)), config, n_layers, n_tokens
        )
        forwards = 2 + sum(-(-len(g) // per_chunk) for g in groups.values())
        work = (1 + config.samples) * n_tokens * n_layers + sum(
            (n_layers - s) * len(g) * config.samples * (n_tokens - t) for (s, t), g in groups.items()
        )
        rows = min(config.max_batch_rows, per_chunk * config.samples)
        kv = 2 * model.n_kv_heads * model.d_head
        floats = (
            config.samples * n_tokens * ((n_layers + 1) * model.d_model + n_layers * kv)  # recorded run
            + len(config.kinds) * n_layers * n_tokens * model.d_model  # clean states
            + rows * n_tokens * (4 * model.d_model + 2 * model.d_mlp)  # one resumed block
            + rows * model.d_vocab  # logits
        )
        total = total + Cost(forwards, float(work), floats * model.dtype.itemsize)
    return total


def run(model: Model, batch: PromptBatch | FactSet, config: Config | None = None) -> CausalTracingResult:
    """Trace every fact of ``batch`` (each fact on its own; see the module docstring)."""
    config = config or Config()
    batch = as_batch(model, batch)
    names = trace_spans(batch, config)
    if not any(name in batch.spans for name in names):
        raise RecallscopeError(
            f"the batch has none of the spans {list(config.spans)} (spans: {', '.join(batch.spans)})"
        )
    if config.target == "gold" and _gold(batch, 0) is None:
        raise RecallscopeError("target='gold' needs a batch with targets (tokenize(..., targets=...))")
    noises = {name: _noise_for(model, batch, config, name) for name in names if name in batch.spans}
    steps = answer_steps(batch)
    traces, skipped = [], []
    pairs = _row_spans(batch, config)
    for row in range(len(batch)):
        fact_id = batch.fact_ids[row] if batch.fact_ids else str(row)
        if not any(r == row for r, _ in pairs):
            skipped.append((fact_id, f"no {' or '.join(config.spans)} span"))
    for row, name in pairs:
        fact_id = batch.fact_ids[row] if batch.fact_ids else str(row)
        start, end = (int(v) for v in batch.spans[name][row])
        pad = int(batch.pad_lengths[row])
        ids = batch.input_ids[row, pad:]
        trace = _trace(model, ids, (start - pad, end - pad), _gold(batch, row), noises[name], config, fact_id)
        traces.append(replace(trace, span_name=name, step=int(steps[row]), noise=noises[name]))
    conventions = dict(
        kinds=config.kinds,
        window=config.window,
        window_rule="[l - w//2, l - (-w//2))",
        samples=config.samples,
        noise=noises,
        noise_rule=_noise_rule(config),
        noise_rng=f"numpy RandomState({config.seed})",
        spans=list(config.spans),
        target=config.target,
        metric=config.metric,
        layers="block index l (hidden: output of block l)",
        bos=model.bos,
    )
    if model.spec.ple_update:
        conventions["per_layer_inputs"] = (
            "the noise is added to the token embeddings only: each block's per-layer input (ple_out) "
            "still gets the span tokens' own per-layer embeddings, and the noised embedding only "
            "through the model's projection of it"
        )
    provenance = result_provenance(model, config, **conventions)
    fact_ids = list(dict.fromkeys(tr.fact_id for tr in traces))
    return CausalTracingResult(
        traces, noises, config=config, fact_ids=fact_ids, provenance=provenance, skipped=skipped
    )


def _row_spans(batch: PromptBatch, config: Config) -> list[tuple[int, str]]:
    """``(row, span)`` pairs to trace, row by row: the configured spans each row has."""
    names = [n for n in trace_spans(batch, config) if n in batch.spans]
    return [(row, n) for row in range(len(batch)) for n in names if int(batch.spans[n][row, 0]) >= 0]


def _noise_rule(config: Config) -> str:
    rule = f"{config.noise_factor} x std of the span's embeddings (subjects and answers separately)"
    if config.noise is not None:
        return "given"
    return (
        f"{rule} of {config.noise_calibrated_on}" if config.noise_calibrated_on else f"{rule} of this batch"
    )


def _gold(batch: PromptBatch, row: int) -> list[int] | None:
    if batch.answer_ids:
        return list(batch.answer_ids[row])
    return None if batch.target_ids is None else [int(batch.target_ids[row])]


def _trace(model, ids, span, gold, noise, config, fact_id) -> FactTrace:
    """The full trace of one fact (prompt ``ids [T]``, corrupted ``span`` in prompt positions)."""
    n_prompt = len(ids)
    answer = gold if config.metric == "answer_logprob" else None
    full = torch.cat([ids, torch.tensor(answer[:-1], dtype=ids.dtype)]) if answer else ids
    n_keep = len(answer) if answer else 1
    clean = run_with_cache(
        model,
        full[None],
        [Site(layer, RESTORED_SITES[k]) for k in config.kinds for layer in range(model.n_layers)],
        logits="all",
    )
    clean_logits = clean.logits[:, -n_keep:]
    target = answer or [int(clean_logits[0, -1].argmax()) if config.target == "top1" else gold[0]]
    vectors = np.random.RandomState(config.seed).randn(config.samples, span[1] - span[0], model.d_model)
    noise_t = torch.from_numpy(noise * vectors).to(model.device, model.dtype)
    rows = torch.arange(config.samples)
    positions = torch.arange(span[0], span[1]).expand(config.samples, -1)
    with add_noise(model, noise_t, rows, positions):
        state = record_run(model, full.expand(config.samples, -1), logits_to_keep=n_keep)
    low = target_score(state.logits, target, config.metric).mean()
    scores = _grid(model, state, clean, config, span, n_prompt, target, n_keep, float(low))
    return FactTrace(
        fact_id=fact_id,
        tokens=decode_tokens(model, ids),
        span=span,
        target_ids=list(target),
        target="".join(decode_tokens(model, torch.tensor(target))),
        low=float(low),
        high=float(target_score(clean_logits, target, config.metric)[0]),
        scores=scores,
    )


def _cells(config: Config, n_layers: int, positions: range) -> list[RestorationCell]:
    cells = []
    for kind in config.kinds:
        for t in positions:
            for layer in range(n_layers):
                if kind == "hidden":
                    cells.append(RestorationCell(kind, t, layer, layer + 1, ()))
                else:
                    layers = tuple(window(layer, config.window, n_layers))
                    cells.append(RestorationCell(kind, t, layer, layers[0], layers))
    return cells


def _grid(
    model, state: RunState, clean, config, span, n_prompt, target, n_keep, low
) -> dict[str, np.ndarray]:
    """Score every cell; positions before the span keep ``low`` (restoring clean states there is a no-op)."""
    scores = {kind: np.full((n_prompt, model.n_layers), low) for kind in config.kinds}
    cells = _cells(config, model.n_layers, range(span[0], n_prompt))
    per_chunk = max(1, config.max_batch_rows // config.samples)
    for (start_layer, start_pos), group in plan_resumed_forwards(
        cells, config, model.n_layers, n_prompt
    ).items():
        for i in range(0, len(group), per_chunk):
            chunk = group[i : i + per_chunk]
            values = run_restoration_cells(
                model, state, clean, config, chunk, start_layer, start_pos, target, n_keep
            )
            for cell, value in zip(chunk, values, strict=True):
                scores[cell.kind][cell.position, cell.layer] = value
    return scores
