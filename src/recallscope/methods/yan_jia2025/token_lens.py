"""Token Lens: the part of each attention update that comes from chosen source spans (Yan & Jia 2025,
Algorithm Y3, ``methods.md`` §2.2).

For every layer ``ℓ`` and a set ``P`` of source positions, the attention update at the last
position ``N`` restricted to ``P`` is::

    u^ℓ(P) = Σ_h W_O^h Σ_{j∈P} α^{ℓ,h}_{N,j} v^{ℓ,kv(h)}_j          kv(h) = h // n_groups (GQA)

decoded with the *frozen* final-norm scale of the same forward pass, for the tracked tokens only
(:meth:`~recallscope.core.subvalues.FrozenHead.token_covectors`)::

    logit_t(u) = W_U[t] · (γ_final ⊙ centre(u)) / ρ(x^L_N)     (no β_final, b_U or final soft-cap)

Tracked tokens (:func:`~recallscope.core.steps.tracked_tokens`): the first token of every answer of a
one-to-many list (previous, current and future ones, §2.6 pitfall 1) and, with ``subject``, the
subject's first token; a plain factual batch tracks its target as ``answer_1``.

The spans form a **partition** of the source positions: a position belongs to the *first listed*
span that contains it, positions in no span (padding included) form the part ``other``, and the
attention output bias ``b_O`` (if the model has one) is the part ``bias``. So, per layer, the
parts sum to the decoded ``attn_out`` exactly. ``answers`` expands to ``answer_1`` …
``answer_{k-1}`` (the previous answers of a ``k``-answer list, plus any ``answer_j`` span of the
batch), so every chunk of a data set has the same parts. Gemma-2's attention post-norm is folded in
at its actual (frozen) scale, so the identity holds there too. The paper decodes each span on its
own and does not report ``other`` or ``bias``.

Fast by construction: one forward per :data:`CHUNK_SIZE` facts captures, per layer, the last query
row of the attention probabilities and the values; masks are contracted first
(``z [B, parts, H, d_h]``), then ``W_O``, then the tracked tokens' covectors. Nothing of size
``[H, T, d_model]`` is built. The naive loop is ``tests/oracles/token_lens.py``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Annotated

import numpy as np
import pandas as pd
import torch

from recallscope.core.attention import output_gate_hook
from recallscope.core.cache import forward, forward_floats
from recallscope.core.decompose import post_norm_note
from recallscope.core.dtypes import upcast
from recallscope.core.hooks import site_hook
from recallscope.core.steps import Tracked, answer_span_names, span_masks, tracked_tokens
from recallscope.core.subvalues import FrozenHead
from recallscope.core.tokens import PromptBatch, as_batch
from recallscope.core.updates import update_map
from recallscope.data.facts import FactSet
from recallscope.errors import RecallscopeError
from recallscope.methods.base import Cost, MethodConfig, MethodResult, result_provenance
from recallscope.methods.hints import DISTINCT, NON_EMPTY
from recallscope.models.model import Model
from recallscope.models.sites import Site
from recallscope.stats import mean_ci

__all__ = ["NAME", "DESCRIPTION", "CHUNK_SIZE", "Config", "TokenLensResult", "run", "cost"]

NAME = "token_lens"
DESCRIPTION = "Decode the attention update from each source span (subject, answers, last token) per layer."
CHUNK_SIZE = 16
"""Facts per forward (and per runner chunk)."""
_RESERVED = ("other", "bias")
PARTITION = "first listed span wins; other (positions in no span, padding included); bias (b_O)"


@dataclass(frozen=True, kw_only=True)
class Config(MethodConfig):
    """Token Lens settings; defaults (and preset ``yan_jia``) are the paper's span types."""

    spans: Annotated[tuple[str, ...], NON_EMPTY, DISTINCT] = ("subject", "answers", "last_token")
    """Source spans, in priority order (a position goes to the first listed span containing it):
    spans of the batch (``subject``, ``relation``, ``answer_2`` …), ``answers`` (every previous
    answer ``answer_1`` …), ``last_token`` or ``bos``."""
    subject: bool = True
    """Also track the subject's first token (besides every answer's first token)."""

    PRESETS = {"yan_jia": dict(spans=("subject", "answers", "last_token"), subject=True)}

    def __post_init__(self) -> None:
        if reserved := [s for s in self.spans if s in _RESERVED]:
            raise RecallscopeError(
                f"spans may not be {_RESERVED} (those parts are always added), got {self.spans!r}: "
                f"drop {reserved}"
            )


@dataclass(frozen=True)
class TokenLensResult(MethodResult):
    """Frozen-scale logits of every part of every layer's attention update (``F`` facts, ``L``
    layers, ``parts`` = the spans, ``other`` and (if the model has ``b_O``) ``bias``; ``n`` tracked
    tokens).
    """

    parts: list[str]
    tracked: list[str]
    """Tracked token names (``subject``, ``answer_1`` …)."""
    steps: np.ndarray
    """``[F]`` answer step of each fact."""
    roles: list[tuple[str, ...]]
    """``[F][n]`` role of each tracked token (subject / previous / current / future)."""
    tokens: list[list[str]]
    """``[F][n]`` tracked token strings."""
    present: np.ndarray
    """``[F, parts]`` whether the fact has the part (a span it lacks has no rows and NaN logits)."""
    logit: np.ndarray
    """``[F, L, parts, n]`` frozen-scale logits; NaN where the fact lacks the span."""

    def to_frame(self) -> pd.DataFrame:
        """One row per fact × layer × part × tracked token (parts a fact lacks have no rows)."""
        f, layer, part, t = (a.reshape(-1) for a in np.indices(self.logit.shape))
        keep = self.present[f, part]
        f, layer, part, t = f[keep], layer[keep], part[keep], t[keep]
        return pd.DataFrame(
            {
                "fact_id": np.array(self.fact_ids, dtype=object)[f],
                "step": self.steps[f].astype(int),
                "layer": layer,
                "span": np.array(self.parts, dtype=object)[part],
                "tracked": np.array(self.tracked, dtype=object)[t],
                "role": np.array([self.roles[i][j] for i, j in zip(f, t, strict=True)], dtype=object),
                "token": np.array([self.tokens[i][j] for i, j in zip(f, t, strict=True)], dtype=object),
                "logit": self.logit[f, layer, part, t],
            }
        )

    def tables(self) -> dict[str, pd.DataFrame]:
        """No extra tables."""
        return {}

    def arrays(self) -> dict[str, np.ndarray]:
        """``"<fact_id>/logit"`` → ``[L, parts, n]`` (parts in ``provenance["conventions"]["parts"]``)."""
        return self.per_fact(logit=self.logit)

    def summary(self) -> pd.DataFrame:
        """Mean logit over facts with a 95% band (``logit_ci``) and ``n``, by step, span, layer,
        tracked token and role.
        """
        return mean_ci(self.to_frame(), ["step", "span", "layer", "tracked", "role"], ["logit"])


def run(model: Model, batch: PromptBatch | FactSet, config: Config | None = None) -> TokenLensResult:
    """Decode, for every fact, layer and part, the attention update at the last position."""
    config = config or Config()
    batch = as_batch(model, batch, method=NAME)
    tracked = tracked_tokens(model, batch, subject=config.subject)
    spans = _expand(batch, config.spans, tracked)
    masks = span_masks(batch, spans)  # {span: [B, T]}
    present, partition = _partition(model, batch, spans, masks)
    logits = [
        _chunk(model, batch.select(rows), partition[rows], tracked.ids[rows])
        for rows in torch.arange(len(batch)).split(CHUNK_SIZE)
    ]
    logit = torch.cat(logits).numpy()  # [B, L, parts, n]
    parts = [*spans, "other"] + (["bias"] if _has_bias(model) else [])
    logit[~np.broadcast_to(present[:, None, :, None], logit.shape)] = np.nan
    return TokenLensResult(
        config=config,
        fact_ids=list(batch.fact_ids or map(str, range(len(batch)))),
        parts=parts,
        tracked=list(tracked.names),
        steps=tracked.steps.numpy(),
        roles=list(tracked.roles),
        tokens=tracked.tokens,
        present=present,
        logit=logit,
        provenance=_provenance(model, config, parts, tracked),
    )


def _expand(batch: PromptBatch, names: tuple[str, ...], tracked: Tracked) -> list[str]:
    """Span names with ``answers`` expanded to ``answer_1`` … ``answer_{k-1}`` (and any ``answer_j``
    span of the batch), each name once, first occurrence kept.
    """
    previous = [f"answer_{j}" for j in range(1, tracked.k)]
    answers = sorted(set(previous) | set(answer_span_names(batch)), key=lambda n: int(n.split("_")[1]))
    out: list[str] = []
    for name in names:
        for item in answers if name == "answers" else [name]:
            if item not in out:
                out.append(item)
    return out


def _partition(model, batch, spans, masks) -> tuple[np.ndarray, torch.Tensor]:
    """``present [B, parts]`` (row has the span) and the position partition ``[B, parts - bias, T]``:
    first listed span wins, the rest (padding included) is ``other``.
    """
    taken = torch.zeros(len(batch), batch.seq_len, dtype=torch.bool)
    columns = []
    for name in spans:
        columns.append(masks[name] & ~taken)
        taken |= masks[name]
    columns.append(~taken)  # other
    raw = torch.stack([masks[name].any(-1) for name in spans], 1)
    extra = 2 if _has_bias(model) else 1  # other, bias: always present
    present = torch.cat([raw, torch.ones(len(batch), extra, dtype=torch.bool)], 1)
    return present.numpy(), torch.stack(columns, 1)


def _has_bias(model: Model) -> bool:
    return model.b_O(0) is not None


# -- one chunk of facts -------------------------------------------------------------------------


@torch.no_grad()
def _chunk(model: Model, batch: PromptBatch, partition: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``[B, L, parts, n]`` logits of one chunk (CPU) from the position partition ``[B, P, T]``."""
    z, final = _capture(model, batch, partition)
    covectors = FrozenHead.from_final(model, final, bias=False).token_covectors(ids)  # [B, n, d]
    out = []
    for layer in range(model.n_layers):
        parts = _layer_parts(model, layer, z[layer])  # [B, parts, d]
        out.append(torch.einsum("bpd,bnd->bpn", parts, covectors.to(parts.dtype)))
    return torch.stack(out, 1).cpu()


def _capture(model: Model, batch: PromptBatch, partition: torch.Tensor) -> tuple[list, torch.Tensor]:
    """Per layer ``z [B, P, H, d_h]`` (mixes over each position set) and the final residual ``[B, d]``.

    The last query row of ``pattern`` and ``v`` are contracted as soon as both of a layer are
    seen, so only ``[B, P, H, d_h]`` per layer is kept.
    """
    pending: dict = {}
    z: list = [None] * model.n_layers
    saved: dict = {}

    def keep(kind: str, layer: int):
        def save(act: torch.Tensor) -> None:
            pending[(kind, layer)] = upcast(act.detach()[:, :, -1] if kind == "pattern" else act.detach())
            if ("pattern", layer) in pending and ("v", layer) in pending:
                pattern, v = pending.pop(("pattern", layer)), pending.pop(("v", layer))
                z[layer] = _mix(model, layer, partition, pattern, v)
            if kind == "gate":  # after the kernel: z = g ⊙ mix at the last position
                z[layer] = z[layer] * pending.pop(("gate", layer))[:, None, -1]

        return save

    final = Site(model.n_layers - 1, "resid_post")
    with contextlib.ExitStack() as stack:
        for layer in range(model.n_layers):
            stack.enter_context(site_hook(model, Site(layer, "pattern"), keep("pattern", layer)))
            stack.enter_context(site_hook(model, Site(layer, "v"), keep("v", layer)))
            stack.enter_context(output_gate_hook(model, layer, keep("gate", layer)))
        stack.enter_context(site_hook(model, final, lambda act: saved.update(final=upcast(act[:, -1]))))
        forward(model, batch)
    if any(item is None for item in z):
        raise RecallscopeError(
            f"token_lens did not see the attention probabilities and values of every layer of "
            f"{model.spec.family}; check the model with `recallscope check-model`"
        )
    return z, saved["final"]


def _mix(model: Model, layer: int, partition, pattern: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``z [B, P, H, d_h]``: ``Σ_{j∈P} α_{N,j} v_j`` from ``pattern [B, H, T]``, ``v [B, T, H_kv, d_h]``
    and the position sets ``partition [B, P, T]`` (query head h reads kv head h // n_groups).
    """
    weights = partition.to(pattern.device, pattern.dtype)[:, :, None] * pattern[:, None]  # [B, P, H, T]
    groups = (model.n_kv_heads_at(layer), model.n_groups_at(layer))
    weights = weights.unflatten(2, groups)  # [B, P, H_kv, g, T]
    return torch.einsum("bpkgt,btke->bpkge", weights, v.to(pattern.dtype)).flatten(2, 3)


def _layer_parts(model: Model, layer: int, z: torch.Tensor) -> torch.Tensor:
    """``[B, parts, d]``: ``W_O`` applied to each ``z [B, P, H, d_h]``, plus ``b_O`` as the last part;
    Gemma-2's post-norm folded in at its scale on the whole update.
    """
    parts = torch.einsum("bphe,hed->bpd", z, model.W_O(layer).to(z.device, z.dtype))
    bias = model.b_O(layer)
    if bias is not None:
        parts = torch.cat([parts, bias.to(z.device, z.dtype).expand(len(z), 1, -1)], 1)
    update = update_map(model, "attn", layer, parts.sum(1))  # post-norm linear at its frozen ρ(Σ parts)
    return parts if update is None else update(parts, axes=(1,))


def _provenance(model: Model, config: Config, parts: list[str], tracked: Tracked) -> dict:
    post = post_norm_note(model)
    return result_provenance(
        model,
        config,
        projection="frozen_scale",
        readout="logit_t(u) = W_U[t] · (γ ⊙ centre(u)) / ρ; ρ = final norm scale of the final residual at "
        "the last position; no final-norm bias, no b_U, no final soft-cap",
        partition=PARTITION,
        parts=parts,
        tracked=list(tracked.names),
        update=f"u^l(P) = Σ_h W_O^h Σ_(j∈P) α_Nj v_j; kv_head = {model.kv_head_rule('h')}{post}",
        absent="a span a fact lacks has no rows in the frame and NaN logits in the arrays",
        layers="0-based blocks; u^l is part of attn_out of block l at the last position",
        bos=model.bos,
    )


def cost(model: Model, batch: PromptBatch | FactSet, config: Config | None = None) -> Cost:
    """One forward per :data:`CHUNK_SIZE` facts (eager attention) plus the contractions.

    Work per fact and layer: ``P·H·T·d_h`` (masks × values), ``P·H·d_h·d`` (``W_O``) and ``P·d·n``
    (covectors), in token·block units of ``4·d² + 2·d·d_mlp`` multiply-adds; ``P`` is estimated as
    the configured spans plus two answers, ``other`` and ``bias``.
    """
    config = config or Config()
    batch = as_batch(model, batch)
    n_facts, T, d, L = len(batch), batch.seq_len, model.d_model, model.n_layers
    H, Dh, H_kv = model.n_heads, model.d_head, model.n_kv_heads
    n_parts = len(config.spans) + 2 + 2 * ("answers" in config.spans)
    n_tracked = 4
    work = n_facts * L * n_parts * (H * T * Dh + H * Dh * d + d * n_tracked)
    token_blocks = n_facts * T * L + work / (4 * d * d + 2 * d * model.d_mlp)
    width = min(n_facts, CHUNK_SIZE)
    kept = width * (L * n_parts * H * Dh + T * H_kv * Dh + n_parts * H * T + n_tracked * d)
    itemsize = max(model.dtype.itemsize, 4)
    peak = (forward_floats(model, width, T) + kept) * itemsize  # eager probabilities [H, T, T]
    return Cost(-(-n_facts // CHUNK_SIZE), float(token_blocks), peak)
