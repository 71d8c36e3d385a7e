"""Anti-overconfidence in the final layer and a label-free mitigation (Lv et al. 2024, L7; ``methods.md`` §1).

**Direct attribution.** Every component ``c`` of the final layer (or of the last ``layers_from_end``
layers) at the last position ``N`` (the paper's ``end``) is read with the final norm's scale frozen on
the final residual of the same forward::

    logit_c = W_U[t] · (γ ⊙ centre(c)) / ρ_N          iw_c = logit_c − mean_v W_U[v] · (γ ⊙ centre(c)) / ρ_N

for the target token ``t`` (the gold answer's first token, or the clean top-1). ``iw`` is the
component's part of Lv et al.'s metric ``ℓ[t] − mean_v ℓ[v]`` (L2); the vocabulary mean of a
frozen-scale linear readout is the readout of the mean unembedding row, so nothing is decoded over
the whole vocabulary. Components: every head ``o^{ℓ,h} = z^{ℓ,h} W_O^{ℓ,h}`` (Gemma-2's attention
post-norm folded in at its actual scale), the attention output bias ``b_O`` (``attn_bias``, when the
model has one), the MLP output ``m^ℓ`` and the ``top_neurons`` neurons ``c_k w_k`` with the largest
``|mean contribution|`` over all facts. Heads + ``attn_bias`` + MLP of a layer sum to its update
(attention + MLP). No bias and no final soft-cap are applied.

**Mitigation fitted on a training split.** Facts are split by a seeded hash of their ``base_id``
(few-shot variants of one fact share it, so they stay on one side) into train and held-out
(:func:`split_facts`). Candidates are the components whose mean logit contribution over the
*train* facts is negative: every such head, the MLP, and the ``top_neurons`` most negative neurons,
most negative first, at most ``max_candidates``. Each candidate × scale in ``scales`` is applied in a
real forward that multiplies the component's output by the scale (a head: its ``z`` slice, so
Gemma-2's post-norm sees the change; the MLP: ``mlp_out``; a neuron: its ``mlp_post`` coefficient)
at every position (``positions="all"``) or at the last one. Train facts are scored by the mean
log-probability of the target; the best cell is the mitigation when it beats the clean model
(scale 1), otherwise the mitigation is ``none``. It is label-free at inference: one component and
one scale for every input. It is evaluated before and after on the held-out split (and on train,
marked): probability, log-probability, top-1 correctness and confidence per fact; accuracy, mean
probability, ECE and Brier score of the target probability per split; the held-out gains with
paired bootstrap intervals; and the perplexity of generic prose (:func:`recallscope.data.builtin.
generic_text`) before and after, with the mitigation at every position.

**Fast by construction.** Facts are grouped by token length (no padding) and recorded once per
group (:func:`recallscope.core.resume.record_run`), keeping ``z``, ``mlp_post``, ``mlp_out`` of the
candidate layers at ``N`` and the input of the first candidate layer. The candidate × scale grid and
the held-out evaluation resume only the last ``layers_from_end`` blocks, from position 0
(``positions="all"``) or only at ``N`` (``"last"``), one row per fact × cell
(:func:`recallscope.core.resume.resume`, exact). With the final layer alone, ``"all"`` and ``"last"``
give the same prompt predictions (a change at an earlier position of the last block never reaches
``N``), so both resume at ``N`` only; they differ for ``layers_from_end > 1`` and for the
perplexity, where every position is predicted. Only the target's covector is decoded.

The paper's experiment notebook is missing from the code snapshot, so the choice of component,
the scale grid and the fitting metric are reconstructions [inf] (``methods.md`` L7).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import torch

from recallscope.core.cache import forward
from recallscope.core.decoding import work_dtype
from recallscope.core.decompose import head_outputs, neuron_outputs
from recallscope.core.hooks import site_hook
from recallscope.core.resume import RunState, equal_length_rows, record_run, resume
from recallscope.core.subvalues import FrozenHead
from recallscope.core.tokens import PromptBatch, encode_prompt
from recallscope.data.builtin import generic_text
from recallscope.data.facts import FactSet
from recallscope.errors import RecallscopeError
from recallscope.methods.base import (
    Cost,
    MethodConfig,
    MethodResult,
    as_batch,
    choose_targets,
    result_provenance,
    wide,
)
from recallscope.methods.lv2024.summaries import anti_overconfidence_summary as summary
from recallscope.models.model import Model
from recallscope.models.sites import Site
from recallscope.stats import bootstrap_ci, expected_calibration_error, paired_bootstrap_ci

__all__ = [
    "NAME",
    "DESCRIPTION",
    "CHUNK_SIZE",
    "Config",
    "Component",
    "AntiOverconfidenceResult",
    "needs_all_facts",
    "run",
    "cost",
    "split_facts",
    "summary",
]

NAME = "anti_overconfidence"
DESCRIPTION = (
    "Final-layer components that lower the answer, and a label-free down-weighting of one of them "
    "fitted on a train split (Lv et al.)."
)
CHUNK_SIZE = 256
"""Unused by the runner (the method needs every fact at once, :func:`needs_all_facts`)."""


@dataclass(frozen=True, kw_only=True)
class Config(MethodConfig):
    """Attribution, split, fit and evaluation settings of the anti-overconfidence analysis.

    Preset ``lv``: the paper's setting as far as ``methods.md`` L7 reconstructs it (the component
    zeroed or down-weighted at ``end``); the released code has no notebook for it, so there is no
    ``lv_code``.
    """

    target: Literal["gold", "top1"] = "gold"
    """Token attributed and scored: the gold answer's first token or the clean top-1."""
    layers_from_end: int = 1
    """Candidate layers: the last ``k`` blocks (1 = the final layer only)."""
    top_neurons: int = 10
    """Neurons per layer kept in the frame (largest ``|mean logit|`` over all facts), and the number
    of most negative train neurons per layer offered as candidates."""
    train_fraction: float = 0.5
    """Share of the split groups (``base_id``) that go to the training split."""
    seed: int = 0
    """Seed of the split hash and of the bootstrap."""
    split_by: Literal["base_id", "fact_id"] = "base_id"
    """Split unit: ``base_id`` keeps few-shot variants of one fact together; ``fact_id`` splits facts.
    (A :class:`PromptBatch` carries no ``base_id``: its fact ids are used.)"""
    max_candidates: int = 8
    """At most this many candidates (most negative train mean first)."""
    scales: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75)
    """Multipliers tried for each candidate's output (0 removes it; 1 is the clean model)."""
    positions: Literal["all", "last"] = "all"
    """Where the mitigation scales the component: every position or the last (``end``) only."""
    bins: int = 10
    """Equal-width confidence bins of the ECE."""
    bootstrap: int = 2000
    """Paired bootstrap resamples of the held-out gains' 95% intervals."""
    batch_size: int = 16
    """Facts per recorded forward; a resumed grid call holds at most ``batch_size × len(scales)`` rows."""
    perplexity: bool = True
    """Measure the perplexity of the built-in generic text before and after."""
    ppl_window: int = 512
    """Tokens per perplexity window (at most the model's context)."""

    PRESETS = {
        "lv": dict(
            target="gold",
            layers_from_end=1,
            top_neurons=10,
            max_candidates=8,
            scales=(0.0, 0.25, 0.5, 0.75),
            positions="last",
        ),
    }

    def __post_init__(self) -> None:
        least = dict(layers_from_end=1, top_neurons=0, max_candidates=1, bins=1, bootstrap=1, batch_size=1)
        for name, low in {**least, "ppl_window": 2}.items():
            value = getattr(self, name)
            if not _is_int(value) or value < low:
                raise RecallscopeError(f"{name} must be an integer ≥ {low}, got {value!r}")
        if not _is_int(self.seed):
            raise RecallscopeError(f"seed must be an integer, got {self.seed!r}")
        choices = dict(target=("gold", "top1"), positions=("all", "last"), split_by=("base_id", "fact_id"))
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise RecallscopeError(
                    f"{name} must be {' or '.join(map(repr, allowed))}, got {getattr(self, name)!r}"
                )
        if not isinstance(self.perplexity, bool):
            raise RecallscopeError(f"perplexity must be True or False, got {self.perplexity!r}")
        fraction = self.train_fraction
        if not _is_number(fraction) or not 0 < fraction < 1:
            raise RecallscopeError(
                f"train_fraction must be strictly between 0 and 1, got {fraction!r}; e.g. 0.5"
            )
        object.__setattr__(self, "train_fraction", float(fraction))
        object.__setattr__(self, "scales", _check_scales(self.scales))  # one store hash for 0 and 0.0


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_scales(scales) -> tuple[float, ...]:
    if isinstance(scales, str | float | int) or not scales:
        raise RecallscopeError(
            f"scales must be a non-empty tuple of numbers, got {scales!r}; e.g. (0.0, 0.5)"
        )
    if not all(_is_number(s) and s >= 0 for s in scales):
        raise RecallscopeError(f"scales must be finite numbers ≥ 0, got {scales!r}")
    out = tuple(float(s) for s in scales)
    if 1.0 in out:
        raise RecallscopeError(
            f"scales must not contain 1 (the clean model, always the baseline), got {scales!r}"
        )
    if len(set(out)) != len(out):
        raise RecallscopeError(f"scales repeat a value: {scales!r}")
    return out


def needs_all_facts(config: Config | None = None) -> bool:
    """Always true: the mitigation is fitted on a train split and evaluated on the held-out facts."""
    return True


@dataclass(frozen=True)
class Component:
    """A final-layer component: ``kind`` ∈ head, attn_bias, mlp, neuron; ``index`` the head or neuron
    (-1 for attn_bias and mlp).
    """

    kind: str
    layer: int
    index: int = -1

    @property
    def label(self) -> str:
        return f"{self.kind} {self.index}" if self.kind in ("head", "neuron") else self.kind


@dataclass
class AntiOverconfidenceResult(MethodResult):
    """Direct attributions of the final-layer components, the fitted mitigation and its evaluation."""

    config: Config
    fact_ids: list[str]
    split: list[str]
    """``[F]`` ``train`` or ``heldout``."""
    components: list[Component]
    logit: np.ndarray
    """``[F, component]`` contribution to the target's logit."""
    iw: np.ndarray
    """``[F, component]`` contribution to the target's logit minus the vocabulary mean."""
    facts: pd.DataFrame
    fit: pd.DataFrame
    mitigation: pd.DataFrame
    perplexity: pd.DataFrame
    method: str = NAME

    def to_frame(self) -> pd.DataFrame:
        """One row per fact × component.

        Columns ``fact_id``, ``split``, ``component`` (``head 3``, ``attn_bias``, ``mlp``,
        ``neuron 1234``), ``kind``, ``layer``, ``index`` (-1 for attn_bias and mlp), ``logit``, ``iw``.
        """
        F, C = self.logit.shape
        f = np.repeat(np.arange(F), C)
        c = np.tile(np.arange(C), F)
        return pd.DataFrame(
            {
                "fact_id": np.array(self.fact_ids, dtype=object)[f],
                "split": np.array(self.split, dtype=object)[f],
                "component": np.array([x.label for x in self.components], dtype=object)[c],
                "kind": np.array([x.kind for x in self.components], dtype=object)[c],
                "layer": np.array([x.layer for x in self.components], dtype=np.int64)[c],
                "index": np.array([x.index for x in self.components], dtype=np.int64)[c],
                "logit": self.logit.reshape(-1),
                "iw": self.iw.reshape(-1),
            }
        )

    def tables(self) -> dict[str, pd.DataFrame]:
        """``facts`` (per fact), ``fit`` (train grid), ``mitigation`` (one row) and ``perplexity``."""
        return {
            "facts": self.facts,
            "fit": self.fit,
            "mitigation": self.mitigation,
            "perplexity": self.perplexity,
        }

    def arrays(self) -> dict[str, np.ndarray]:
        """``"<fact_id>/logit"`` and ``"<fact_id>/iw"`` → ``[component]`` in frame order."""
        out = {}
        for f, fact in enumerate(self.fact_ids):
            out[f"{fact}/logit"], out[f"{fact}/iw"] = self.logit[f], self.iw[f]
        return out

    def summary(self) -> pd.DataFrame:
        """:func:`summary` of this result."""
        return summary(self.to_frame(), self.tables())


# -- run --------------------------------------------------------------------------------------------


@dataclass
class _Chunk:
    """Facts of one token length, recorded once (rows index the dataset batch)."""

    rows: np.ndarray
    state: RunState
    hidden: torch.Tensor
    """``[R, T - start_pos, d]`` input of the first candidate layer at the resumed positions."""
    targets: torch.Tensor


def run(model: Model, facts: FactSet | PromptBatch, config: Config | None = None) -> AntiOverconfidenceResult:
    """Attribute, fit the mitigation on the train split and evaluate it, over every fact at once."""
    config = config or Config()
    batch = as_batch(model, facts)
    if not len(batch):
        raise RecallscopeError("anti_overconfidence got no facts: pass a FactSet with at least 4 facts")
    fact_ids = list(batch.fact_ids or map(str, range(len(batch))))
    train = split_facts(_split_keys(facts, fact_ids, config.split_by), config.train_fraction, config.seed)
    start_layer = model.n_layers - min(config.layers_from_end, model.n_layers)
    chunks, parts, before = [], [], []
    for rows in map(np.asarray, equal_length_rows(batch, config.batch_size)):
        chunk, attribution, scores = _record(model, batch, rows, start_layer, config)
        chunks.append(chunk)
        parts.append(attribution)
        before.append(scores)
    order = np.argsort(np.concatenate([c.rows for c in chunks]), kind="stable")
    attribution = {k: np.concatenate([p[k] for p in parts])[order] for k in parts[0]}
    before = {k: np.concatenate([s[k] for s in before])[order] for k in before[0]}
    candidates = _candidates(model, attribution, train, start_layer, config)
    components, logit, iw = _component_table(model, attribution, start_layer, candidates, config)
    fit, choice = _fit(model, chunks, train, before, candidates, start_layer, config)
    after = _evaluate(model, chunks, choice, start_layer, config) if choice else dict(before)
    last = [i for i, c in enumerate(components) if c.layer == model.n_layers - 1 and c.kind != "neuron"]
    final_logit = logit[:, last].sum(1)
    perplexity = _perplexity(model, choice, config) if config.perplexity else _empty_perplexity()
    facts_table = _facts_table(fact_ids, train, final_logit, logit[:, last], iw[:, last], before, after)
    return AntiOverconfidenceResult(
        config=config,
        fact_ids=fact_ids,
        split=["train" if t else "heldout" for t in train],
        components=components,
        logit=logit,
        iw=iw,
        facts=facts_table,
        fit=fit,
        mitigation=_mitigation_table(facts_table, fit, choice, candidates, perplexity, config),
        perplexity=perplexity,
        provenance=_provenance(model, config, candidates, choice, len(fact_ids), int(train.sum())),
    )


def cost(model: Model, batch: PromptBatch | FactSet, config: Config | None = None) -> Cost:
    """Recorded forwards of the facts, the resumed grid and evaluation, and two perplexity passes."""
    config = config or Config()
    batch = as_batch(model, batch)
    lengths = batch.attention_mask.sum(-1).tolist()
    n_records = sum(math.ceil(lengths.count(n) / config.batch_size) for n in set(lengths))
    k = min(config.layers_from_end, model.n_layers)
    every = config.positions == "all" and k > 1  # else only N is resumed (see _record)
    resumed = float(sum(lengths)) if every else float(len(lengths))
    n_train = config.train_fraction * len(batch)
    cells = config.max_candidates * len(config.scales)
    grid_calls = math.ceil(n_train * cells / (config.batch_size * len(config.scales)))
    text = 2 * min(len(generic_text()), 4096) if config.perplexity else 0  # ≤ one token per character
    work = float(sum(lengths) * model.n_layers) + (n_train / max(len(batch), 1) * cells + 1) * resumed * k
    work += text * model.n_layers
    rows = config.batch_size * len(config.scales)
    kept = len(batch) * batch.seq_len * (1 + 2 * k * model.n_kv_heads * model.d_head / model.d_model)
    peak = (kept * model.d_model + rows * model.d_vocab + rows * batch.seq_len * 6 * model.d_model) * 4
    forwards = n_records + grid_calls + n_records + (2 if config.perplexity else 0)
    return Cost(forwards, work, int(peak * max(model.dtype.itemsize, 4) / 4))


def split_facts(keys: Sequence[str], train_fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """``[F]`` booleans: True for the train split.

    The distinct ``keys`` (``base_id`` or ``fact_id``) are ordered by ``sha256(f"{seed}:{key}")``; the
    first ``round(train_fraction × n_keys)`` (half up, at least 1, at most ``n_keys − 1``) go to train.
    Facts sharing a key stay on one side; the split of a key depends only on the seed and the key
    set, not on the order of the facts.

    Raises:
        RecallscopeError: fewer than 2 distinct keys, or fewer than 2 facts on a side.
    """
    unique = sorted(set(keys))
    if len(unique) < 2:
        raise RecallscopeError(
            f"anti_overconfidence needs facts to split into train and held-out, got {len(keys)} fact(s) "
            f"with {len(unique)} distinct split key(s); pass at least 4 facts of 4 different base facts"
        )
    ranked = sorted(unique, key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).hexdigest())
    n_train = min(max(int(train_fraction * len(unique) + 0.5), 1), len(unique) - 1)
    train_keys = set(ranked[:n_train])
    train = np.array([k in train_keys for k in keys], dtype=bool)
    n_fit, n_held = int(train.sum()), int((~train).sum())
    if n_fit < 2 or n_held < 2:
        raise RecallscopeError(
            f"anti_overconfidence split {len(keys)} facts into {n_fit} train and {n_held} held-out; each "
            "split needs at least 2 facts: pass more facts, or move train_fraction toward 0.5"
        )
    return train


def _split_keys(facts, fact_ids: list[str], split_by: str) -> list[str]:
    if split_by == "base_id" and isinstance(facts, FactSet):
        return [str(f.attributes.get("base_id", f.fact_id)) for f in facts]
    return fact_ids


# -- recording and attribution -------------------------------------------------------------------


def _record(model: Model, batch: PromptBatch, rows: np.ndarray, start_layer: int, config: Config):
    """Record one chunk; return the chunk, its attributions and its clean scores."""
    length = int(batch.attention_mask[rows[0]].sum())
    ids = batch.input_ids[torch.as_tensor(rows)][:, batch.seq_len - length :]  # unpadded [R, T]
    saved: dict = {}

    def keep(key):
        def save(act):
            saved[key] = act[:, -1].detach().to(work_dtype(model))

        return save

    layers = range(start_layer, model.n_layers)
    with contextlib.ExitStack() as stack:
        for layer in layers:
            for name in ("z", "mlp_out", "mlp_post"):
                stack.enter_context(site_hook(model, Site(layer, name), keep((name, layer))))
        state = record_run(model, ids)
    logits = wide(state.logits[:, -1])  # [R, V]
    targets = choose_targets(batch.select(rows), logits, config.target)
    final = state.stream[:, -1, -1].to(work_dtype(model))  # [R, d]
    attribution = _attribute(model, saved, layers, final, targets)
    # Only the last position's prediction is scored. A component scaled at earlier positions of the
    # final block reaches only those positions' outputs, so with one candidate layer "all" resumes
    # like "last" (exactly the same computation at N); with more layers it must rerun every position.
    start_pos = 0 if config.positions == "all" and start_layer < model.n_layers - 1 else length - 1
    slim = _slim(state, start_layer, start_pos)
    hidden = state.stream[:, start_layer, start_pos:].clone()
    return _Chunk(rows, slim, hidden, targets), attribution, _scores(logits, targets)


def _slim(state: RunState, start_layer: int, start_pos: int) -> RunState:
    """What :func:`resume` reads of ``state``: the key/value prefix of the resumed layers (zeros that
    take no memory stand in for the skipped layers, which never read their cache).
    """

    def prefix(x: torch.Tensor, layer: int) -> torch.Tensor:
        if layer >= start_layer:
            return x[:, :, :start_pos].clone()
        return x.new_zeros(()).expand(x.shape[0], x.shape[1], start_pos, x.shape[3])

    keys = [prefix(k, i) for i, k in enumerate(state.keys)]
    values = [prefix(v, i) for i, v in enumerate(state.values)]
    stream = state.stream.new_zeros(()).expand(state.stream.shape[0], 1, state.seq_len, 1)  # seq_len only
    return dataclasses.replace(state, stream=stream, keys=keys, values=values, logits=state.logits[:, :0])


def _attribute(model: Model, saved: dict, layers: range, final: torch.Tensor, targets: torch.Tensor) -> dict:
    """Per layer: head, attn_bias, MLP and neuron contributions to the target (``logit``) and to
    target − vocabulary mean (``iw``), as numpy ``[R, k, …]``.
    """
    head = FrozenHead.from_final(model, final, bias=False)
    u = head.token_covectors(targets[:, None])[:, 0]  # [R, d]
    mean_row = torch.full((model.d_vocab,), 1.0 / model.d_vocab, dtype=head.dtype, device=u.device)
    w = u - head.covectors(mean_row)[None] / head.scale[:, None]  # iw covectors [R, d]
    R, ar = len(final), torch.arange(len(final))
    out: dict[str, list] = {k: [] for k in ("head", "attn_bias", "mlp", "neuron")}
    for layer in layers:
        heads = head_outputs(model, layer, saved[("z", layer)][:, None])
        parts = heads.parts[:, 0]  # [R, H, d]
        out["head"].append(torch.stack([parts @ u[..., None], parts @ w[..., None]], -1)[:, :, 0])
        rest = torch.zeros_like(u)  # [R, d]: b_O, post-normed for Gemma-2
        if model.b_O(layer) is not None:
            rest = rest + torch.as_tensor(heads.rest, dtype=u.dtype, device=u.device).reshape(-1, u.shape[-1])
        out["attn_bias"].append(torch.stack([(rest * u).sum(-1), (rest * w).sum(-1)], -1))
        mlp = saved[("mlp_out", layer)].to(u.dtype)
        out["mlp"].append(torch.stack([(mlp * u).sum(-1), (mlp * w).sum(-1)], -1))
        coeffs = saved[("mlp_post", layer)][:, None]  # [R, 1, d_mlp]
        projected = neuron_outputs(model, layer, coeffs, onto=torch.cat([u, w])).parts[:, 0]  # [R, d_mlp, 2R]
        out["neuron"].append(torch.stack([projected[ar, :, ar], projected[ar, :, R + ar]], -1))
    # [R, k, (H | d_mlp)?, 2]: last axis = (logit, iw)
    return {k: torch.stack(v, 1).cpu().double().numpy() for k, v in out.items()}


def _component_table(model: Model, attribution: dict, start_layer: int, candidates, config: Config):
    """The frame's components (heads, attn_bias, mlp, top neurons per layer, then candidate neurons not
    among them) and their ``[F, C]`` values.
    """
    components, columns = [], []
    neuron = attribution["neuron"]  # [F, k, d_mlp, 2]
    for i, layer in enumerate(range(start_layer, model.n_layers)):
        for h in range(model.n_heads):
            components.append(Component("head", layer, h))
            columns.append(attribution["head"][:, i, h])
        if model.b_O(layer) is not None:
            components.append(Component("attn_bias", layer))
            columns.append(attribution["attn_bias"][:, i])
        components.append(Component("mlp", layer))
        columns.append(attribution["mlp"][:, i])
        strength = np.abs(neuron[:, i, :, 0].mean(0))
        top = [int(k) for k in np.argsort(-strength, kind="stable")[: config.top_neurons]]
        top += [
            c.index for c, _ in candidates if c.kind == "neuron" and c.layer == layer and c.index not in top
        ]
        for k in top:
            components.append(Component("neuron", layer, k))
            columns.append(neuron[:, i, k])
    values = np.stack(columns, 1)  # [F, C, 2]
    return components, values[..., 0], values[..., 1]


def _candidates(
    model: Model, attribution: dict, train: np.ndarray, start_layer: int, config: Config
) -> list[tuple[Component, float]]:
    """``(component, train mean logit)`` of the negative components, most negative first, capped."""
    pool = []
    for i, layer in enumerate(range(start_layer, model.n_layers)):
        heads = attribution["head"][train, i, :, 0].mean(0)
        pool += [(Component("head", layer, h), float(m)) for h, m in enumerate(heads) if m < 0]
        mlp = float(attribution["mlp"][train, i, 0].mean())
        pool += [(Component("mlp", layer), mlp)] if mlp < 0 else []
        neurons = attribution["neuron"][train, i, :, 0].mean(0)
        for k in np.argsort(neurons, kind="stable")[: config.top_neurons]:
            if neurons[k] < 0:
                pool.append((Component("neuron", layer, int(k)), float(neurons[k])))
    order = sorted(range(len(pool)), key=lambda j: (pool[j][1], j))
    return [pool[j] for j in order[: config.max_candidates]]


def _scores(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, np.ndarray]:
    """``prob``, ``log_prob`` of the target, ``correct`` (top-1 is the target), ``confidence``."""
    logp = wide(logits).log_softmax(-1)
    picked = logp.gather(-1, targets.to(logp.device).long()[:, None])[:, 0]
    top, argmax = logp.max(-1)
    return {
        "prob": picked.exp().cpu().double().numpy(),
        "log_prob": picked.cpu().double().numpy(),
        "correct": (argmax.cpu() == targets.cpu()).double().numpy(),
        "confidence": top.exp().cpu().double().numpy(),
    }


# -- interventions --------------------------------------------------------------------------------


@contextlib.contextmanager
def _scaled(model: Model, cells: Sequence[tuple[Component, float] | None]) -> Iterator[None]:
    """Multiply each row's component by its scale (rows without a cell unchanged), at every position
    of the forward (the resumed positions, or the whole text).
    """
    n = len(cells)
    mults: dict[tuple[str, int], torch.Tensor] = {}
    widths = {"z": model.n_heads, "mlp_out": 1, "mlp_post": model.d_mlp}
    sites = {"head": "z", "mlp": "mlp_out", "neuron": "mlp_post"}
    for row, cell in enumerate(cells):
        if cell is None:
            continue
        component, scale = cell
        site = sites[component.kind]
        key = (site, component.layer)
        if key not in mults:
            mults[key] = torch.ones(n, widths[site], dtype=torch.float64)
        mults[key][row, max(component.index, 0)] = scale

    def hook(site: str, mult: torch.Tensor):
        def scale(act: torch.Tensor) -> torch.Tensor:
            m = mult.to(device=act.device, dtype=act.dtype)
            view = m[:, None, :, None] if site == "z" else m[:, None, :]  # z: [R, P, H, d_h]
            return act * view

        return scale

    with contextlib.ExitStack() as stack:
        for (site, layer), mult in mults.items():
            stack.enter_context(site_hook(model, Site(layer, site), hook(site, mult)))
        yield


def _resumed_logits(
    model: Model, chunk: _Chunk, rows: np.ndarray, cells: Sequence, start_layer: int
) -> torch.Tensor:
    """Last-position logits ``[R', V]`` of ``chunk`` rows resumed at ``start_layer`` with ``cells``."""
    index = torch.as_tensor(rows, dtype=torch.long)
    start_pos = chunk.state.seq_len - chunk.hidden.shape[1]
    with _scaled(model, cells):
        out = resume(
            model,
            chunk.state,
            index,
            start_layer=start_layer,
            start_pos=start_pos,
            hidden=chunk.hidden[index],
        )
    return wide(out[:, -1])


def _fit(model, chunks, train, before, candidates, start_layer, config):
    """The train grid (one row per candidate × scale) and the chosen ``(component, scale)`` or None."""
    cells = [(component, scale) for component, _ in candidates for scale in config.scales]
    # cell 0 = no intervention, resumed like the others (equal to the recorded run up to rounding)
    grid = [None, *cells] if cells else []
    totals = np.zeros(len(grid))
    limit = config.batch_size * len(config.scales)
    for chunk in chunks:
        local = np.flatnonzero(train[chunk.rows])
        pairs = [(c, r) for c in range(len(grid)) for r in local]  # cell-major rows
        for start in range(0, len(pairs), limit):
            piece = pairs[start : start + limit]
            rows = np.array([r for _, r in piece])
            logits = _resumed_logits(model, chunk, rows, [grid[c] for c, _ in piece], start_layer)
            log_prob = _scores(logits, chunk.targets[torch.as_tensor(rows)])["log_prob"]
            np.add.at(totals, [c for c, _ in piece], log_prob)
    n_train = int(train.sum())
    baseline = totals[0] / n_train if cells else float(before["log_prob"][train].mean())
    means = totals[1:] / n_train
    best = int(np.argmax(means)) if cells else -1
    chosen = cells[best] if cells and means[best] > baseline else None
    fit = pd.DataFrame(
        {
            "component": [c.label for c, _ in cells],
            "kind": [c.kind for c, _ in cells],
            "layer": np.array([c.layer for c, _ in cells], dtype=np.int64),
            "index": np.array([c.index for c, _ in cells], dtype=np.int64),
            "train_mean_logit": [dict((c, m) for c, m in candidates)[c] for c, _ in cells],
            "scale": np.array([s for _, s in cells], dtype=np.float64),
            "train_log_prob": means,
            "train_gain": means - baseline,
            "n_train": n_train,
            "chosen": [chosen is not None and i == best for i in range(len(cells))],
        }
    )
    return fit, chosen


def _evaluate(model, chunks, choice, start_layer, config) -> dict[str, np.ndarray]:
    """Scores of every fact with the mitigation applied (resumed at the candidate layers)."""
    parts, rows_all = [], []
    for chunk in chunks:
        for start in range(0, len(chunk.rows), config.batch_size):
            rows = np.arange(start, min(start + config.batch_size, len(chunk.rows)))
            logits = _resumed_logits(model, chunk, rows, [choice] * len(rows), start_layer)
            parts.append(_scores(logits, chunk.targets[torch.as_tensor(rows)]))
            rows_all.append(chunk.rows[rows])
    order = np.argsort(np.concatenate(rows_all), kind="stable")
    return {k: np.concatenate([p[k] for p in parts])[order] for k in parts[0]}


def _perplexity(model: Model, choice, config: Config) -> pd.DataFrame:
    """Per window of the generic text: tokens scored and mean negative log-likelihood before and after
    (the mitigation at every position).
    """
    if model.tokenizer is None:
        return _empty_perplexity()
    ids = torch.tensor(encode_prompt(model, generic_text())[0])
    size = min(config.ppl_window, model.max_context or config.ppl_window)
    rows = []
    for w, start in enumerate(range(0, len(ids), size)):
        window = ids[start : start + size]
        if len(window) < 2:
            continue
        nll = []
        for cells in ([None], [choice]) if choice else ([None],):
            with _scaled(model, cells):
                logp = wide(forward(model, window[None], logits="all")[0, :-1]).log_softmax(-1)
            nll.append(float(-logp.gather(-1, window[1:, None].to(logp.device)).sum()))
        nll = nll * (3 - len(nll))  # no mitigation: after = before
        rows.append(dict(window=w, n_tokens=len(window) - 1, nll_before=nll[0], nll_after=nll[1]))
    return pd.DataFrame(rows, columns=_PPL_COLUMNS)


_PPL_COLUMNS = ["window", "n_tokens", "nll_before", "nll_after"]


def _empty_perplexity() -> pd.DataFrame:
    return pd.DataFrame(
        {c: pd.Series([], dtype=np.int64 if c in ("window", "n_tokens") else float) for c in _PPL_COLUMNS}
    )


# -- tables ---------------------------------------------------------------------------------------


_SCORES = ("prob", "log_prob", "correct", "confidence")


def _facts_table(fact_ids, train, final_logit, last_logit, last_iw, before, after) -> pd.DataFrame:
    table = pd.DataFrame(
        {
            "fact_id": fact_ids,
            "split": np.where(train, "train", "heldout"),
            "final_layer_logit": final_logit,
            "final_layer_iw": last_iw.sum(1),
            "lowers": (final_logit < 0).astype(float),
        }
    )
    for name in _SCORES:
        table[f"{name}_before"] = before[name]
        table[f"{name}_after"] = after[name]
    return table


def _split_metrics(part: pd.DataFrame, when: str, bins: int) -> dict[str, float]:
    conf, correct, prob = part[f"confidence_{when}"], part[f"correct_{when}"], part[f"prob_{when}"]
    return {
        f"accuracy_{when}": float(correct.mean()),
        f"mean_prob_{when}": float(prob.mean()),
        f"mean_log_prob_{when}": float(part[f"log_prob_{when}"].mean()),
        f"ece_{when}": expected_calibration_error(conf, correct, bins),
        f"brier_{when}": float(((1.0 - prob) ** 2).mean()),
    }


def _mitigation_table(facts, fit, choice, candidates, perplexity, config) -> pd.DataFrame:
    held, train = facts[facts.split == "heldout"], facts[facts.split == "train"]
    component, scale = choice if choice else (None, 1.0)
    row = {
        "component": component.label if component else "none",
        "kind": component.kind if component else "none",
        "layer": component.layer if component else -1,
        "index": component.index if component else -1,
        "scale": scale,
        "positions": config.positions,
        "n_candidates": len(candidates),
        "n_train": len(train),
        "n_heldout": len(held),
        "train_log_prob_before": float(train.log_prob_before.mean()),
        "train_log_prob_after": float(train.log_prob_after.mean()),
        "train_gain": float(train.log_prob_after.mean() - train.log_prob_before.mean()),
    }
    for when in ("before", "after"):
        row.update(_split_metrics(held, when, config.bins))
    boot = dict(n_boot=config.bootstrap, seed=config.seed)
    for name, column in (("accuracy", "correct"), ("mean_prob", "prob"), ("log_prob", "log_prob")):
        gain, low, high = paired_bootstrap_ci(held[f"{column}_before"], held[f"{column}_after"], **boot)
        row.update({f"{name}_gain": gain, f"{name}_gain_low": low, f"{name}_gain_high": high})
    for when in ("before", "after"):
        tokens = perplexity.n_tokens.sum()
        row[f"perplexity_{when}"] = (
            float(np.exp(perplexity[f"nll_{when}"].sum() / tokens)) if tokens else np.nan
        )
    low, high = bootstrap_ci(facts.lowers, **boot)
    row.update(lowers_fraction=float(facts.lowers.mean()), lowers_low=low, lowers_high=high)
    return pd.DataFrame([row])


def _provenance(model: Model, config: Config, candidates, choice, n_facts: int, n_train: int) -> dict:
    post = "; Gemma-2 attention post-norm folded in at its actual scale" if model.spec.attn_post_norm else ""
    return result_provenance(
        model,
        config,
        projection="frozen_scale (final residual of the same forward)",
        readout="W_U[t] · (γ ⊙ centre(c)) / ρ_N; no bias, no final soft-cap; target covector only",
        iw="logit − mean over the vocabulary (readout of the mean unembedding row); Lv et al. L2",
        components=f"last {config.layers_from_end} block(s): heads o_h = z_h W_O[h] (input columns){post}; "
        "attn_bias = b_O (when present); mlp = mlp_out; top neurons c_k w_k by |mean logit| over all facts",
        targets="gold answer's first token" if config.target == "gold" else "clean top-1 token",
        split=f"{config.split_by} ranked by sha256('{config.seed}:<key>'); first round(train_fraction × "
        f"n_keys) = train (train_fraction={config.train_fraction}); {n_train} of {n_facts} facts train",
        candidates="train-mean logit < 0: heads, mlp, and the "
        f"{config.top_neurons} most negative neurons per layer; most negative first, at most "
        f"{config.max_candidates}: " + ", ".join(f"{c.layer}.{c.label} ({m:.4g})" for c, m in candidates),
        intervention=f"output × scale for scales {list(config.scales)} (head: z slice; mlp: mlp_out; "
        f"neuron: mlp_post coefficient) at positions={config.positions}; real forward, the candidate "
        "layers resumed from the recorded input (exact)",
        fitting_metric="mean log-probability of the target over the train facts; the best cell must beat "
        "scale 1 (the clean model), else the mitigation is none",
        mitigation="none" if choice is None else f"{choice[0].layer}.{choice[0].label} × {choice[1]}",
        evaluation=f"held-out split; ECE with {config.bins} equal-width bins of top-1 confidence; Brier = "
        f"mean (1 − p_target)²; gains after − before with paired bootstrap 95% intervals "
        f"({config.bootstrap} resamples, seed {config.seed}); lowers_fraction over all facts",
        perplexity=f"built-in generic_text, windows of ≤ {config.ppl_window} tokens (and the model's "
        "context), mitigation at every position"
        if config.perplexity
        else "not measured",
        layers="block index",
        positions="last (prediction position) for attribution",
        bos=model.bos,
    )
