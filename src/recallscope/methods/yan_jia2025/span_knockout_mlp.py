"""Attention knockout of a span → change of the MLP outputs (Yan & Jia 2025, Y4; ``methods.md`` §2.2).

For each source span ``P`` of a prompt (the subject, each previous answer ``answer_j``, the last
token) a *knockout run* stops the last position ``N`` from reading ``P``: in **every layer and
every head at once**, the post-softmax weights ``α^{ℓ,h}_{N,j}`` for ``j ∈ P`` are set to 0 and
the row is **not renormalized** (``mode="post_softmax_zero"``, the paper's code); all other rows
of the attention are unchanged. ``mode="pre_softmax"`` instead sets the scores to −∞ before the
softmax, so the remaining weights renormalize (Geva et al.'s edge blocking). Both go through
:func:`recallscope.core.knockout.block_attention`.

The MLP output ``m^ℓ_N`` of every layer is read in the clean run and in the knockout run, each
decoded with **its own** run's final-norm scale (frozen-scale head from that run's final residual
``x^L_N``, no bias) for the tracked tokens (subject's first token, first token of every answer)::

    logit(m)[t] = W_U[t] · (γ ⊙ centre(m)) / ρ(x^L_N of the same run)
    Δ^ℓ(t) = logit_clean(m^ℓ_N)[t] − logit_KO(m^ℓ_N)[t]

``Δ > 0``: the MLP's promotion of ``t`` depends on attention to ``P``; ``Δ < 0``: its suppression
of ``t`` does. As every layer is knocked out together, ``Δ^ℓ`` mixes the direct effect (attention
at ``ℓ`` feeding the MLP at ``ℓ``) with indirect effects through earlier layers (§2.6 pitfall 2).

Batching: the clean run of every fact and every (fact, span) knockout are rows of as few forwards
as possible (``max_batch_rows`` rows each); a row's knockout is a precompiled mask ``[R, 1, T, T]``
with its span's positions blocked in the last query row only (all False for clean rows, which
therefore run the same attention kernel). A span a row does not have (e.g. ``answer_1`` at step
1) is not run and gives no rows. Only the tracked tokens are decoded (covectors, no ``d_vocab``
product).

Preset ``yan_jia``: post-softmax zeroing without renormalization, all layers, spans subject /
every previous answer / last token, subject tracked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Annotated, Literal

import numpy as np
import pandas as pd
import torch

from recallscope.core.cache import forward_floats, run_with_cache
from recallscope.core.dtypes import upcast
from recallscope.core.knockout import KnockoutMode, block_attention
from recallscope.core.steps import Tracked, span_masks, tracked_tokens
from recallscope.core.subvalues import FrozenHead
from recallscope.core.tokens import PromptBatch, as_batch
from recallscope.data.facts import FactSet
from recallscope.methods.base import Cost, MethodConfig, MethodResult, result_provenance
from recallscope.methods.hints import DISTINCT, NON_EMPTY, NonNegative, Positive
from recallscope.models.model import Model
from recallscope.models.sites import Site
from recallscope.stats import mean_ci

__all__ = ["NAME", "DESCRIPTION", "CHUNK_SIZE", "Config", "SpanKnockoutMlpResult", "run", "cost"]

NAME = "span_knockout_mlp"
DESCRIPTION = (
    "Knock out attention from a span to the last token in all layers; change of MLP logits (Yan & Jia)."
)
CHUNK_SIZE = 8
"""Facts per runner chunk (their clean and knockout rows share forwards)."""


@dataclass(frozen=True, kw_only=True)
class Config(MethodConfig):
    """Span-knockout settings; the defaults (and preset ``yan_jia``) follow the paper's code."""

    spans: Annotated[tuple[str, ...], NON_EMPTY, DISTINCT] = ("subject", "answers", "last_token")
    """Source spans knocked out one at a time: batch spans (``subject``, ``relation``, ``answer_2`` …),
    ``answers`` (each previous answer ``answer_1``, ``answer_2`` … separately), ``last_token``, ``bos``."""
    mode: Literal["post_softmax_zero", "pre_softmax"] = "post_softmax_zero"
    """``post_softmax_zero``: weights zeroed after the softmax, not renormalized (the paper);
    ``pre_softmax``: −∞ before the softmax, renormalized (Geva et al.)."""
    layers: Annotated[tuple[NonNegative, ...], NON_EMPTY, DISTINCT] | None = None
    """Layers whose attention is knocked out (all heads); None = every layer at once (the paper).
    The MLP output of every layer is decoded either way."""
    subject: bool = True
    """Also track the subject's first token (besides the first token of every answer)."""
    max_batch_rows: Positive = 64
    """Rows (clean runs and knockouts) per forward."""

    PRESETS = {
        "yan_jia": dict(
            mode="post_softmax_zero", layers=None, spans=("subject", "answers", "last_token"), subject=True
        )
    }


@dataclass(frozen=True)
class SpanKnockoutMlpResult(MethodResult):
    """Decoded MLP outputs of the clean and knockout runs (``F`` facts, ``R`` knockout rows = the
    (fact, span) pairs run, ``L`` layers, ``n`` tracked tokens).
    """

    steps: np.ndarray
    """``[F]`` answer step of each fact."""
    tracked: tuple[str, ...]
    """Names of the tracked tokens (``subject``, ``answer_1`` …)."""
    roles: tuple[tuple[str, ...], ...]
    """``[F][n]`` role of each tracked token (subject / previous / current / future)."""
    tokens: list[list[str]]
    """``[F][n]`` the tracked tokens as strings."""
    logit_clean: np.ndarray
    """``[F, L, n]`` frozen-scale logits of ``m^ℓ_N`` in the clean run."""
    row_fact: np.ndarray
    """``[R]`` fact index of each knockout row."""
    row_span: list[str]
    """``[R]`` span knocked out in each row."""
    logit_knockout: np.ndarray
    """``[R, L, n]`` frozen-scale logits of ``m^ℓ_N`` in the knockout run (its own final scale)."""
    p_clean: np.ndarray
    """``[F]`` final probability of the current answer's first token, clean (NaN if none)."""
    p_knockout: np.ndarray
    """``[R]`` the same in the knockout run."""

    @property
    def delta(self) -> np.ndarray:
        """``[R, L, n]`` ``logit_clean − logit_knockout``."""
        return self.logit_clean[self.row_fact] - self.logit_knockout

    def to_frame(self) -> pd.DataFrame:
        """One row per (fact, span) knockout × layer × tracked token."""
        n_rows, n_layers, n_tracked = self.logit_knockout.shape
        r, layer, t = (a.reshape(-1) for a in np.indices((n_rows, n_layers, n_tracked)))
        f = self.row_fact[r]
        clean = self.logit_clean[f, layer, t]
        knockout = self.logit_knockout.reshape(-1)
        return pd.DataFrame(
            {
                "fact_id": np.array(self.fact_ids, dtype=object)[f],
                "step": self.steps[f],
                "span": np.array(self.row_span, dtype=object)[r],
                "layer": layer,
                "tracked": np.array(self.tracked, dtype=object)[t],
                "role": np.array(self.roles, dtype=object).reshape(len(self.fact_ids), -1)[f, t],
                "token": np.array(self.tokens, dtype=object).reshape(len(self.fact_ids), -1)[f, t],
                "logit_clean": clean,
                "logit_knockout": knockout,
                "delta": clean - knockout,
            }
        )

    def tables(self) -> dict[str, pd.DataFrame]:
        """``final``: per (fact, span) the current answer's final probability, clean and knocked out."""
        f = self.row_fact
        final = pd.DataFrame(
            {
                "fact_id": np.array(self.fact_ids, dtype=object)[f],
                "step": self.steps[f],
                "span": np.array(self.row_span, dtype=object),
                "p_clean": self.p_clean[f],
                "p_knockout": self.p_knockout,
            }
        )
        return {"final": final}

    def arrays(self) -> dict[str, np.ndarray]:
        """Per fact ``delta [span, layer, tracked]`` (its spans in ``row_span`` order)."""
        delta = self.delta
        return {
            f"{fact}/delta": delta[self.row_fact == i]
            for i, fact in enumerate(self.fact_ids)
            if (self.row_fact == i).any()
        }

    def summary(self) -> pd.DataFrame:
        """Mean over facts with 95% bands (``*_ci``) and ``n``, by step, span, layer, tracked, role."""
        by = ["step", "span", "layer", "tracked", "role"]
        return mean_ci(self.to_frame(), by, ["delta", "logit_clean", "logit_knockout"])


@dataclass(frozen=True)
class _Rows:
    """The forward rows: ``fact [R]`` index, ``span [R]`` (None = clean run), ``blocked [R, T]``."""

    fact: torch.Tensor
    span: list[str | None]
    blocked: torch.Tensor


def run(model: Model, batch: PromptBatch | FactSet, config: Config | None = None) -> SpanKnockoutMlpResult:
    """Knock out each span's attention to the last token and decode every layer's MLP output change."""
    config = config or Config()
    batch = as_batch(model, batch, method=NAME)
    ko_layers = _knockout_layers(model, config)
    tracked = tracked_tokens(model, batch, subject=config.subject)
    rows = _plan_rows(batch, config.spans)
    current = _current_ids(tracked)
    logits, probs = [], []
    for start in range(0, len(rows.span), config.max_batch_rows):
        pick = slice(start, start + config.max_batch_rows)
        fact = rows.fact[pick]
        chunk = _forward_rows(
            model, batch, fact, rows.blocked[pick], tracked.ids[fact], current[fact], ko_layers, config.mode
        )
        logits.append(chunk[0])
        probs.append(chunk[1])
    logit, prob = torch.cat(logits).numpy(), torch.cat(probs).numpy()
    return _result(model, batch, config, tracked, rows, logit, prob, ko_layers)


def _knockout_layers(model: Model, config: Config) -> list[int]:
    if config.layers is None:
        return list(range(model.n_layers))
    return sorted(model.check_layer(layer) for layer in config.layers)


def _plan_rows(batch: PromptBatch, spans: Sequence[str]) -> _Rows:
    """Each fact's clean row followed by one row per span it has (an absent span gives no row)."""
    masks = span_masks(batch, spans)  # {name: [B, T]}
    facts, names, blocked = [], [], []
    empty = torch.zeros(batch.seq_len, dtype=torch.bool)
    for b in range(len(batch)):
        facts.append(b)
        names.append(None)
        blocked.append(empty)
        for name, mask in masks.items():
            if mask[b].any():
                facts.append(b)
                names.append(name)
                blocked.append(mask[b])
    return _Rows(torch.tensor(facts, dtype=torch.long), names, torch.stack(blocked))


def _current_ids(tracked: Tracked) -> torch.Tensor:
    """``[B]`` the current answer's first token of each row (``-1`` if none is tracked)."""
    current = torch.full((len(tracked.roles),), -1, dtype=torch.long)
    for b, roles in enumerate(tracked.roles):
        if "current" in roles:
            current[b] = tracked.ids[b, roles.index("current")]
    return current


def _forward_rows(
    model: Model,
    batch: PromptBatch,
    fact: torch.Tensor,
    blocked: torch.Tensor,
    ids: torch.Tensor,
    current: torch.Tensor,
    ko_layers: Sequence[int],
    mode: KnockoutMode,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward of ``R`` rows; row ``r`` is fact ``fact[r]`` with ``N → blocked[r]`` removed.

    Args:
        fact: ``[R]`` batch rows to run (repeats allowed).
        blocked: ``[R, T]`` source positions the last position may not read (all False = clean).
        ids: ``[R, n]`` tracked token ids.
        current: ``[R]`` token whose final probability is returned (``-1``: none, NaN).
        ko_layers: layers whose attention is edited.
        mode: knockout mode.

    Returns:
        ``[R, L, n]`` frozen-scale logits of every layer's ``m^ℓ_N`` (each row's own final scale) and
        ``[R]`` final probabilities of ``current``, on the CPU.
    """
    rows, blocked = _trimmed(batch.select(fact), blocked)
    edges = _last_row_edges(blocked)
    mlp_sites = [Site(layer, "mlp_out") for layer in range(model.n_layers)]
    final = Site(model.n_layers - 1, "resid_post")
    with block_attention(model, {layer: edges for layer in ko_layers}, mode):
        cache = run_with_cache(model, rows, [*mlp_sites, final], positions=[-1], logits="last")
    head = FrozenHead.from_final(model, cache[final][:, 0], bias=False)
    covectors = head.token_covectors(ids)  # [R, n, d]
    mlp = cache.stack(mlp_sites, dim=1)[:, :, 0].to(covectors.dtype)  # [R, L, d]
    logits = torch.einsum("rld,rnd->rln", mlp, covectors)
    probs = upcast(cache.logits).softmax(-1)
    index = current.clamp(min=0).to(probs.device)[:, None]
    p = probs.gather(1, index)[:, 0].cpu().masked_fill(current < 0, float("nan"))
    return logits.cpu(), p


def _last_row_edges(blocked: torch.Tensor) -> torch.Tensor:
    """Knockout mask ``[R, 1, T, T]`` (True = removed) from source positions ``blocked [R, T]`` of the
    last query position; every other query row keeps all its edges.
    """
    n_rows, n_pos = blocked.shape
    edges = torch.zeros(n_rows, 1, n_pos, n_pos, dtype=torch.bool)
    edges[:, 0, -1] = blocked
    return edges


def _trimmed(rows: PromptBatch, blocked: torch.Tensor) -> tuple[PromptBatch, torch.Tensor]:
    """Drop the left-padding columns every row of ``rows`` has (``blocked [R, T]`` likewise)."""
    cut = int(rows.pad_lengths.min())
    if cut == 0:
        return rows, blocked
    kept = replace(
        rows, input_ids=rows.input_ids[:, cut:], attention_mask=rows.attention_mask[:, cut:], spans={}
    )
    return kept, blocked[:, cut:]


def _result(model, batch, config, tracked, rows, logit, prob, ko_layers) -> SpanKnockoutMlpResult:
    clean = np.array([s is None for s in rows.span])
    fact = rows.fact.numpy()
    fact_ids = list(batch.fact_ids or map(str, range(len(batch))))
    counts = np.bincount(fact[~clean], minlength=len(batch))
    skipped = [
        (fact_ids[b], f"none of the spans {list(config.spans)} in this prompt")
        for b in range(len(batch))
        if not counts[b]
    ]
    everywhere = len(ko_layers) == model.n_layers
    provenance = result_provenance(
        model,
        config,
        knockout_mode=config.mode,
        knockout_scope="all layers and heads at once"
        if everywhere
        else f"layers {ko_layers}, all heads at once",
        knockout_rows="last position only",
        renormalized=config.mode == "pre_softmax",
        projection="frozen_scale",
        final_scale="each run's own final residual (clean run / knockout run), no bias",
        decoded="mlp_out at the last position, every layer",
        tracked=list(tracked.names),
        layers="0-based blocks",
        bos=model.bos,
    )
    return SpanKnockoutMlpResult(
        config=config,
        fact_ids=fact_ids,
        steps=tracked.steps.numpy(),
        tracked=tracked.names,
        roles=tracked.roles,
        tokens=tracked.tokens,
        logit_clean=logit[clean],
        row_fact=fact[~clean],
        row_span=[s for s in rows.span if s is not None],
        logit_knockout=logit[~clean],
        p_clean=prob[clean],
        p_knockout=prob[~clean],
        provenance=provenance,
        skipped=skipped,
    )


def cost(model: Model, batch: PromptBatch | FactSet, config: Config | None = None) -> Cost:
    """Rows = facts × (1 + spans present), ``max_batch_rows`` per forward, each a full forward with
    eager attention probabilities; memory: activations, attention probabilities and masks of one
    forward plus the decoded logits.
    """
    config = config or Config()
    batch = as_batch(model, batch)
    masks = span_masks(batch, config.spans)
    n_rows = len(batch) + sum(int(mask.any(-1).sum()) for mask in masks.values())
    forwards = -(-n_rows // config.max_batch_rows)
    width, n_pos, d = min(n_rows, config.max_batch_rows), batch.seq_len, model.d_model
    n_tracked = max(1, len(batch.tracked)) + int(config.subject)
    itemsize = max(model.dtype.itemsize, 4)
    kept_floats = width * (model.n_layers + 1) * d + n_rows * model.n_layers * n_tracked
    mask_bytes = width * n_pos * n_pos
    token_blocks = float(n_rows * n_pos * model.n_layers)
    peak = (forward_floats(model, width, n_pos) + kept_floats) * itemsize + mask_bytes
    return Cost(forwards, token_blocks, peak, vocab_rows=float(n_rows))
