"""Log-probability attribution of layers, heads, positions, FFN neurons and attention units
(Yu & Ananiadou, ``methods.md`` §3, Y&A-1 … Y&A-5).

Every component is read through the *frozen-scale head* ("bs-values",
:class:`~recallscope.core.subvalues.FrozenHead`)::

    bs(v) = W_U (γ ⊙ centre(v)) / ρ  (+ W_U β + b_U when ``bias``)        log p(t | v) = log_softmax(bs(v))[t]

with ``ρ`` the final norm's scale on the row's actual final residual ``x^L_N`` (last position ``N``),
so ``bs(x^L_N)`` are the model's logits (before Gemma-2's final soft-cap, which bs never applies).
The importance of a vector ``u`` added to a baseline residual ``x`` is its *log-probability
increase* ``log p(t | x + u) − log p(t | x)`` of the target ``t`` (the model's top-1, or the gold
answer's first token). Baselines (§3.6 pitfall 4), at ``N``:

- attention parts of block ``ℓ`` (the layer, a head, a head's source position, an attention unit)
  are added to the block's input ``x^ℓ`` (``resid_pre``);
- FFN parts (the layer, a neuron) are added to ``r^ℓ = x^ℓ + a^ℓ`` (for parallel blocks simply the
  additive baseline: the MLP does not read ``r^ℓ`` there).

Levels:

- ``layer`` (Y&A-1, always computed): ``attn_score[ℓ] = lp(r^ℓ) − lp(x^ℓ)`` and
  ``ffn_score[ℓ] = lp(r^ℓ + m^ℓ) − lp(r^ℓ)``; they telescope to ``lp(x^L) − lp(x^0)``.
- ``head`` (Y&A-2): ``o^{ℓ,h} = Σ_j α_{N,j} v_j W_O^h`` (no ``b_O``) added to ``x^ℓ``.
- ``position`` (Y&A-3): ``α_{N,j} v_j W_O^h`` for every head and real source position ``j``.
- ``neuron`` (Y&A-4): FFN subvalue ``c_k w_k`` added to ``r^ℓ``.
- ``attn_unit`` (Y&A-5): ``α_{N,j} v_{j,n} W_O^h[n]`` (unit ``(h, n, j)``) added to ``x^ℓ``.

For Gemma-2 (sandwich norms) the post-norm is linearized at its actual scale: its gain is folded
into the value vectors and ``1/ρ_post`` into the coefficients
(:func:`~recallscope.core.subvalues.ffn_subvalues`), so heads, positions and units sum to the
attention output.

Fast by construction: one forward per ``max_batch_rows`` facts caches every site at ``N`` (and the
values at all positions). Layers, heads and positions are few vectors each. Neurons and units are
rank-1 updates of the baseline logits: every one gets two cheap exact bounds
(:func:`~recallscope.core.subvalues.increase_bounds`); with ``exact="top"`` only the subvalues that
can be in the fact's exact top or bottom ``n_top`` (by log-prob increase or by probability
increase, over all layers) are scored exactly, the rest are NaN; ``exact="all"`` scores all of
them. The kernels are in :mod:`recallscope.core.attribution`; the naive loops (one vector at a time,
full softmax) are in ``tests/oracles`` and give the same numbers.

Positions in tables are relative to the start of the real prompt (after left padding); pads are
never listed, and their entries in the ``[.., T]`` arrays are 0.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Annotated, Literal

import numpy as np
import pandas as pd
import torch

from recallscope.core.attribution import (
    WORK_ELEMS,
    capture_last,
    head_level,
    layer_level,
    subvalue_level,
    value_tokens,
)
from recallscope.core.decoding import choose_targets
from recallscope.core.decompose import post_norm_note
from recallscope.core.subvalues import FrozenHead
from recallscope.core.tokens import PromptBatch, as_batch
from recallscope.core.vocab import decode_tokens, frozen_scale_readout
from recallscope.data.facts import FactSet
from recallscope.methods.base import Cost, MethodConfig, MethodResult, head_frame, result_provenance
from recallscope.methods.hints import NON_EMPTY, NonNegative, Positive
from recallscope.models.model import Model
from recallscope.stats import mean_ci

__all__ = ["NAME", "DESCRIPTION", "LEVELS", "Config", "LogprobAttributionResult", "run", "cost"]

NAME = "logprob_attribution"
DESCRIPTION = "Log-prob increase of layers, heads, positions, FFN neurons, attention units (Yu & Ananiadou)."
CHUNK_SIZE = 8
LEVELS = ("layer", "head", "position", "neuron", "attn_unit")
_DIRECTIONS, _SCORES = 4.5, 3.3
"""cost(): directions built (exactly scored and listed value vectors) and subvalues scored exactly per
fact and kind in ``top`` mode, times ``n_top`` (as counted on random-weight 262k-vocabulary models of
4 and 18 layers; how many candidates the bounds leave depends on the model and the fact)."""
SCORE_ROW = 0.3
"""cost(): one rank-1 exact score (a ``d_vocab``-wide update, exp and sum) in vocabulary rows."""


@dataclass(frozen=True, kw_only=True)
class Config(MethodConfig):
    """Log-prob attribution settings; ``yu`` follows the paper's code (no final-norm bias)."""

    target: Literal["top1", "gold"] = "top1"
    """Token scored: the model's clean top-1 (the paper) or the gold answer's first token."""
    bias: bool = True
    """The frozen head adds ``W_U β_final + b_U`` (then bs of the final residual is the model's
    logits); the paper's code drops the final norm's bias (``yu``: False)."""
    levels: Annotated[tuple[Literal[LEVELS], ...], NON_EMPTY] = LEVELS
    """Levels computed besides ``layer`` (always computed): head, position, neuron, attn_unit."""
    exact: Literal["top", "all"] = "top"
    """``top``: exact scores for every neuron / unit that can be among its fact's top or bottom
    ``n_top`` (by log-prob or by probability increase), NaN elsewhere; ``all``: every one exactly."""
    n_top: Positive = 300
    """Neurons and attention units ranked exactly and listed per fact and end (top / bottom)."""
    position_heads: Positive | None = 10
    """The ``position`` level decomposes the fact's top ``position_heads`` heads by absolute increase
    over all layers (the paper looks at one chosen head; None = every head, ``L·H·T`` projections
    per fact). Other heads' position scores are NaN."""
    n_tokens: NonNegative = 10
    """Top and bottom tokens of each listed value vector's direction in the tables."""
    max_batch_rows: Positive = 16
    """Facts per forward (memory bound)."""

    PRESETS = {"yu": dict(bias=False, target="top1", exact="top", n_top=300)}

    def serves(self, need: MethodConfig) -> bool:
        """A result serves ``need`` when it has its levels (and ranks at least its ``n_top`` exactly)
        with the same head, scoring and tables, whatever the batching. On the ``top1`` token it also
        serves a ``gold`` need on the facts whose top-1 is the gold token: who requires ``gold``
        checks each fact's ``target_id`` and has the others computed.
        """
        same = ("bias", "exact", "n_tokens") + (("position_heads",) if "position" in need.levels else ())
        return (
            type(need) is type(self)
            and all(getattr(self, name) == getattr(need, name) for name in same)
            and set(need.levels) <= set(self.levels)
            and self.n_top >= need.n_top
            and need.target in (self.target, "gold")
        )


@dataclass(frozen=True)
class LogprobAttributionResult(MethodResult):
    """Log-probability increases at every level (``F`` facts, ``L`` layers, ``H`` heads, ``Dh`` head
    width, ``T`` padded length; arrays of a level not computed are None).
    """

    target_ids: np.ndarray
    """``[F]`` the scored token."""
    target_tokens: list[str]
    tokens: list[list[str]]
    """Each fact's prompt tokens (no padding)."""
    pad: np.ndarray
    """``[F]`` left-padding length of each fact in the ``T`` axis."""
    final_scale: np.ndarray
    """``[F]`` ``ρ`` of the final norm on the final residual at ``N``."""
    n_groups: np.ndarray
    """``[L]`` query heads per key/value head in each block (``kv_head = head // n_groups[layer]``)."""
    logprob_resid_pre: np.ndarray
    """``[F, L+1]`` ``log p(t | x^ℓ)``, ``ℓ = 0..L`` (``x^L`` = final residual)."""
    logprob_resid_mid: np.ndarray
    """``[F, L]`` ``log p(t | r^ℓ)``, ``r^ℓ = x^ℓ + a^ℓ``."""
    attn_score: np.ndarray
    """``[F, L]`` ``lp(r^ℓ) − lp(x^ℓ)``."""
    ffn_score: np.ndarray
    """``[F, L]`` ``lp(r^ℓ + m^ℓ) − lp(r^ℓ)``."""
    head_score: np.ndarray | None = None
    """``[F, L, H]``"""
    position_score: np.ndarray | None = None
    """``[F, L, H, T]`` (pads 0; NaN for heads not decomposed, see ``Config.position_heads``)."""
    attention: np.ndarray | None = None
    """``[F, L, H, T]`` ``α_{N,j}`` (pads 0)."""
    neuron_coeff: np.ndarray | None = None
    """``[F, L, d_mlp]`` ``c_k`` at ``N`` (Gemma-2: ``1/ρ_post`` folded in)."""
    neuron_logit: np.ndarray | None = None
    """``[F, L, d_mlp]`` direct logit gain ``c_k D_k[t] / ρ``."""
    neuron_upper: np.ndarray | None = None
    neuron_lower: np.ndarray | None = None
    neuron_score: np.ndarray | None = None
    """``[F, L, d_mlp]`` exact log-prob increase, NaN where not computed."""
    neuron_prob: np.ndarray | None = None
    """``[F, L, d_mlp]`` exact probability increase ``p(t | r + s) − p(t | r)``, NaN where not computed
    (in ``top`` mode the top / bottom ``n_top`` by it are exact too)."""
    unit_coeff: np.ndarray | None = None
    """``[F, L, H, Dh, T]`` ``α_{N,j} v_{j,n}`` (Gemma-2: ``1/ρ_post`` folded in; pads 0)."""
    unit_logit: np.ndarray | None = None
    unit_upper: np.ndarray | None = None
    unit_lower: np.ndarray | None = None
    unit_score: np.ndarray | None = None
    unit_prob: np.ndarray | None = None
    neuron_table: pd.DataFrame | None = None
    """The exact top and bottom ``n_top`` neurons per fact (see :meth:`tables`)."""
    unit_table: pd.DataFrame | None = None

    def to_frame(self) -> pd.DataFrame:
        """One row per fact × layer × sublayer (``attn``, ``mlp``), in that order."""
        n_facts, n_layers = self.attn_score.shape
        before = np.stack([self.logprob_resid_pre[:, :n_layers], self.logprob_resid_mid], -1)  # [F, L, 2]
        increase = np.stack([self.attn_score, self.ffn_score], -1)
        after = before + increase
        f, layer, _ = (a.reshape(-1) for a in np.indices(before.shape))
        return pd.DataFrame(
            {
                "fact_id": np.array(self.fact_ids, dtype=object)[f],
                "layer": layer,
                "sublayer": np.tile(np.array(["attn", "mlp"], dtype=object), n_facts * n_layers),
                "logprob_before": before.reshape(-1),
                "logprob_after": after.reshape(-1),
                "logprob_increase": increase.reshape(-1),
                "prob_increase": (np.exp(after) - np.exp(before)).reshape(-1),
            }
        )

    def tables(self) -> dict[str, pd.DataFrame]:
        """``heads``, ``positions``, ``neurons``, ``attn_units`` (those computed).

        ``neurons`` / ``attn_units``: per fact the exact top ``n_top`` (``end="top"``, rank 1 = the
        largest increase) and bottom ``n_top`` (``end="bottom"``, rank 1 = the most negative) with the
        top / bottom tokens of the value vector's direction; ``promoted_tokens`` are the top tokens
        when the coefficient is positive and the bottom ones when it is negative.
        """
        out = {}
        if self.head_score is not None:
            out["heads"] = self._heads()
        if self.position_score is not None:
            out["positions"] = self._positions()
        if self.neuron_table is not None:
            out["neurons"] = self.neuron_table
        if self.unit_table is not None:
            out["attn_units"] = self.unit_table
        return out

    def _heads(self) -> pd.DataFrame:
        return head_frame(self.fact_ids, self.n_groups, logprob_increase=self.head_score)

    def _positions(self) -> pd.DataFrame:
        frames = []
        for i, fact in enumerate(self.fact_ids):
            pad = int(self.pad[i])
            scores = self.position_score[i, ..., pad:]  # [L, H, T_fact]
            layer, head, pos = (a.reshape(-1) for a in np.indices(scores.shape))
            keep = ~np.isnan(scores.reshape(-1))
            layer, head, pos = layer[keep], head[keep], pos[keep]
            frames.append(
                pd.DataFrame(
                    {
                        "fact_id": fact,
                        "layer": layer,
                        "head": head,
                        "src_pos": pos,
                        "token": np.array(self.tokens[i], dtype=object)[pos],
                        "attention": self.attention[i, ..., pad:].reshape(-1)[keep],
                        "logprob_increase": scores.reshape(-1)[keep],
                    }
                )
            )
        return pd.concat(frames, ignore_index=True)

    def handover(self) -> dict[str, np.ndarray]:
        """Per fact what the methods reusing this result read besides :meth:`arrays`: ``target_id
        [1]``, ``neuron_prob``, ``neuron_logit [L, d_mlp]``, ``unit_coeff``, ``unit_prob``,
        ``unit_logit [L, H, Dh, T_fact]`` (the levels computed).
        """
        named = {}
        for i, fact in enumerate(self.fact_ids):
            named[f"{fact}/target_id"] = np.asarray(self.target_ids[i : i + 1], dtype=np.int64)
            for name in ("neuron_prob", "neuron_logit", "unit_coeff", "unit_prob", "unit_logit"):
                values = getattr(self, name)
                if values is not None:
                    named[f"{fact}/{name}"] = (
                        values[i, ..., int(self.pad[i]) :] if name[0] == "u" else values[i]
                    )
        return named

    def summary(self) -> pd.DataFrame:
        """Per layer × sublayer, the target's log-probability before and after and the increases:
        means over facts with 95% normal-approximation bands (``*_ci``) and ``n``.
        """
        return mean_ci(
            self.to_frame(),
            ["layer", "sublayer"],
            ["logprob_before", "logprob_after", "logprob_increase", "prob_increase"],
        )

    def arrays(self) -> dict[str, np.ndarray]:
        """Per fact ``head_score [L,H]``, ``position_score [L,H,T_fact]``, ``neuron_score``,
        ``neuron_coeff [L,d_mlp]``, ``unit_score [L,H,Dh,T_fact]`` (the levels computed).
        """
        named = {}
        for i, fact in enumerate(self.fact_ids):
            pad = int(self.pad[i])
            for name, cut in (
                ("head_score", False),
                ("position_score", True),
                ("neuron_score", False),
                ("neuron_coeff", False),
                ("unit_score", True),
            ):
                values = getattr(self, name)
                if values is not None:
                    named[f"{fact}/{name}"] = values[i, ..., pad:] if cut else values[i]
        return named


def run(model: Model, batch: PromptBatch | FactSet, config: Config | None = None) -> LogprobAttributionResult:
    """Attribute each fact's target log-probability to layers, heads, positions, neurons and units."""
    config = config or Config()
    batch = as_batch(model, batch, method=NAME)
    step = config.max_batch_rows
    chunks = [
        _chunk(model, batch.select(range(i, min(i + step, len(batch)))), config)
        for i in range(0, len(batch), step)
    ]
    arrays = {name: torch.cat([c[name] for c in chunks]).numpy() for name in chunks[0]}
    pads = batch.pad_lengths.tolist()
    result = LogprobAttributionResult(
        config=config,
        fact_ids=list(batch.fact_ids or map(str, range(len(batch)))),
        target_tokens=decode_tokens(model, torch.as_tensor(arrays["target_ids"])),
        tokens=[decode_tokens(model, batch.input_ids[b, pads[b] :]) for b in range(len(batch))],
        pad=np.asarray(pads),
        n_groups=np.array([model.n_groups_at(layer) for layer in range(model.n_layers)]),
        provenance=_provenance(model, config),
        **arrays,
    )
    if result.neuron_score is not None:
        result = replace(result, neuron_table=_subvalue_table(model, result, "neuron"))
    if result.unit_score is not None:
        result = replace(result, unit_table=_subvalue_table(model, result, "attn_unit"))
    return result


# -- one chunk of facts -----------------------------------------------------------------------------


def _chunk(model: Model, batch: PromptBatch, config: Config) -> dict[str, torch.Tensor]:
    """Every array of the result for one chunk of ``B`` facts (CPU tensors, batch first)."""
    logits, cap = capture_last(model, batch, config.levels)
    targets = choose_targets(batch, logits, config.target).to(logits.device)
    head = FrozenHead.from_final(model, cap["final"], bias=config.bias)
    out = {"target_ids": targets, "final_scale": head.scale}
    out.update(layer_level(head, cap, targets))
    real = batch.attention_mask.bool().to(logits.device)  # [B, T]
    if {"head", "position"} & set(config.levels):
        out.update(head_level(model, head, cap, targets, real, config.levels, config.position_heads))
    if "neuron" in config.levels:
        out.update(subvalue_level(model, head, cap, targets, real, "neuron", config.exact, config.n_top))
    if "attn_unit" in config.levels:
        out.update(subvalue_level(model, head, cap, targets, real, "attn_unit", config.exact, config.n_top))
    return {name: value.cpu() for name, value in out.items()}


# -- tables of the top and bottom subvalues -----------------------------------------------------------


def _listed(result: LogprobAttributionResult, kind: str) -> list[tuple[int, str, int, np.ndarray]]:
    """``(fact, end, rank, flat indices)`` of each fact's exact top and bottom ``n_top``."""
    score = result.neuron_score if kind == "neuron" else result.unit_score
    n = result.config.n_top
    out = []
    for f in range(len(result.fact_ids)):
        flat = score[f].reshape(-1)
        if kind == "attn_unit":  # pads are never listed
            real = np.zeros(score.shape[-1], dtype=bool)
            real[int(result.pad[f]) :] = True
            keep = np.broadcast_to(real, score.shape[1:]).reshape(-1)
        else:
            keep = np.ones(flat.shape, dtype=bool)
        index = np.nonzero(keep & ~np.isnan(flat))[0]
        order = index[np.argsort(-flat[index], kind="stable")]
        out.append((f, "top", order[:n]))
        out.append((f, "bottom", order[::-1][:n]))
    return out


def _subvalue_table(model: Model, result: LogprobAttributionResult, kind: str) -> pd.DataFrame:
    """The exact top / bottom ``n_top`` neurons or attention units of every fact, with tokens."""
    prefix = "neuron" if kind == "neuron" else "unit"
    arrays = {name: getattr(result, f"{prefix}_{name}") for name in ("coeff", "score", "prob", "logit")}
    shape = arrays["score"].shape[1:]
    rows = _listed(result, kind)
    fact = np.concatenate([np.full(len(idx), f) for f, _, idx in rows]).astype(int)
    flat = np.concatenate([idx for _, _, idx in rows]).astype(int)
    ends = np.concatenate([np.full(len(idx), end, dtype=object) for _, end, idx in rows])
    ranks = np.concatenate([np.arange(1, len(idx) + 1) for _, _, idx in rows]).astype(int)
    where = np.unravel_index(flat, shape)
    columns = {"fact_id": np.array(result.fact_ids, dtype=object)[fact], "rank": ranks, "end": ends}
    columns["layer"] = where[0]
    if kind == "neuron":
        columns["neuron"] = where[1]
        unit = where[1]
    else:
        head, dim, pos = where[1], where[2], where[3]
        src = pos - result.pad[fact]
        columns.update(head=head, kv_head=head // result.n_groups[where[0]], dim=dim, src_pos=src)
        columns["token"] = [result.tokens[f][s] for f, s in zip(fact, src, strict=True)]
        unit = head * model.d_head + dim
    pick = (fact, *where)
    coeff = arrays["coeff"][pick]
    columns.update(
        coeff=coeff,
        logprob_increase=arrays["score"][pick],
        prob_increase=arrays["prob"][pick],
        logit_increase=arrays["logit"][pick],
    )
    top, bottom = value_tokens(model, kind, where[0], unit, result.config.n_tokens)
    positive = coeff >= 0
    columns.update(
        top_tokens=top,
        bottom_tokens=bottom,
        promoted_tokens=[t if p else b for t, b, p in zip(top, bottom, positive, strict=True)],
        demoted_tokens=[b if p else t for t, b, p in zip(top, bottom, positive, strict=True)],
    )
    return pd.DataFrame(columns)


def _provenance(model: Model, config: Config) -> dict:
    post = post_norm_note(model, "post-norms linearized at their actual scale")
    rho = "ρ = final norm scale of the final residual at the last position"
    return result_provenance(
        model,
        config,
        projection="frozen_scale",
        readout="bs(v) = " + frozen_scale_readout("v", bias=config.bias, scale="ρ", detail=rho),
        bias=config.bias,
        target=config.target,
        score="log p(t | baseline + v) − log p(t | baseline)",
        baselines="attention layer / head / position / unit: x^l (resid_pre); FFN layer / neuron: "
        "r^l = x^l + a^l",
        exact=config.exact,
        n_top=config.n_top,
        candidates="exact scores for every neuron / unit that can be in the fact's top or bottom n_top "
        "by log-prob increase or probability increase (over all layers); NaN elsewhere"
        if config.exact == "top"
        else "all",
        units=f"(head h, dim n, source j) = α_Nj v_jn W_O[h, n]; kv_head = {model.kv_head_rule('h')}{post}",
        positions="src_pos relative to the start of the real prompt; pads never listed (0 in arrays)",
        layers="0-based blocks; resid_pre[l] = x^l is the input of block l, x^L the final residual",
        bos=model.bos,
    )


def cost(model: Model, batch: PromptBatch | FactSet, config: Config | None = None) -> Cost:
    """One forward per ``max_batch_rows`` facts plus the vocabulary readouts.

    Vocabulary rows per fact: ``3·L`` layer readouts, ``L·H`` heads, ``T`` positions of each of
    ``position_heads`` heads; per kind (neurons, units) one direction per exactly scored value
    vector and per listed one (their top tokens), and one rank-1 score (:data:`SCORE_ROW` of a row)
    per exactly scored subvalue. ``all`` scores every subvalue; ``top`` is estimated at
    :data:`_DIRECTIONS` ``· n_top`` directions and :data:`_SCORES` ``· n_top`` scores per fact and
    kind (how many candidates the bounds leave depends on the model and fact). The bounds, ``3·L·(d_mlp
    + H·Dh)·d`` multiply-adds per fact, are counted in token·block units of ``4·d² + 2·d·d_mlp``.
    """
    config = config or Config()
    batch = as_batch(model, batch)
    n_facts, n_tokens, d, V = len(batch), batch.seq_len, model.d_model, model.d_vocab
    L, H, Dh, d_mlp = model.n_layers, model.n_heads, model.d_head, model.d_mlp
    forwards = -(-n_facts // config.max_batch_rows)
    width = min(n_facts, config.max_batch_rows)
    levels = set(config.levels)
    kinds = [(L * d_mlp, 1)] if "neuron" in levels else []  # (value vectors, subvalues per vector)
    kinds += [(L * H * Dh, n_tokens)] if "attn_unit" in levels else []
    decomposed = L * H if config.position_heads is None else min(L * H, config.position_heads)
    rows = n_facts * (3 * L + ("head" in levels or "position" in levels) * L * H)
    rows += n_facts * ("position" in levels) * decomposed * n_tokens
    bounds = 0
    for vectors, per in kinds:
        bounds += n_facts * 3 * vectors * d
        if config.exact == "all":
            directions = forwards * vectors + n_facts * min(vectors, 2 * config.n_top)
            scores = n_facts * vectors * per
        else:
            directions = n_facts * min(vectors, _DIRECTIONS * config.n_top)
            scores = n_facts * min(vectors * per, _SCORES * config.n_top)
        rows += directions + scores * SCORE_ROW
    token_blocks = n_facts * n_tokens * L + bounds / (4 * d * d + 2 * d * d_mlp)
    itemsize = max(model.dtype.itemsize, 4)
    forward_floats = width * n_tokens * (4 * d + 2 * d_mlp + H * n_tokens)
    cached = width * L * (4 * d + d_mlp + H * n_tokens + n_tokens * model.n_kv_heads * Dh)
    results = width * L * (11 * d_mlp + 11 * H * Dh * n_tokens + 2 * H * n_tokens)  # + selection buffers
    buffers = 3 * WORK_ELEMS + width * L * V
    peak = (forward_floats + cached + results + buffers) * itemsize
    return Cost(forwards, float(token_blocks), peak, vocab_rows=float(rows))
