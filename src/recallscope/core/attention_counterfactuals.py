"""Local attention counterfactuals at the last position (Geva et al. 2023, ``methods.md`` G4.5).

:func:`capture` runs a batch once (eager attention) and keeps, at the last position, every block's
attention and MLP updates, the last query's attention row, the value vectors of every key and the
output gate; :func:`blocked_keys` names the key positions each variant of :data:`COUNTERFACTUALS`
blocks; :func:`counterfactual_weights` rewrites the last attention rows (``renormalize``, i.e.
pre-softmax masking, or the reference code's ``resoftmax``); :func:`counterfactual_outputs`
recomputes each layer's attention output at the last position from those weights and the cached
values, through the model's own ``o_proj`` and post-norm, with nothing propagated to other layers::

    cap = capture(model, batch)
    weights = counterfactual_weights(cap.pattern, blocked_keys(batch, COUNTERFACTUALS), real, mode)
    outs = counterfactual_outputs(model, cap, weights)          # [B, n, L, d_model]
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch

from recallscope.core.attention import output_gate_hook
from recallscope.core.cache import forward
from recallscope.core.dtypes import upcast
from recallscope.core.hooks import site_hook
from recallscope.core.tokens import PromptBatch
from recallscope.core.updates import apply_update
from recallscope.models.model import Model
from recallscope.models.sites import Site

__all__ = [
    "COUNTERFACTUALS",
    "CounterfactualMode",
    "RESOFTMAX_BLOCKED",
    "Capture",
    "capture",
    "blocked_keys",
    "counterfactual_weights",
    "counterfactual_outputs",
]

COUNTERFACTUALS = (
    "none",
    "subject",
    "last",
    "subject_last",
    "subject_last+last",
    "non_subject",
    "non_subject_ex_last",
    "all_but_first",
    "all_but_last",
    "all_but_subject_last",
    "all_but_subject_last+last",
    "all",
)
"""Attention counterfactuals, each named by the key positions it blocks."""
CounterfactualMode = Literal["renormalize", "resoftmax"]
RESOFTMAX_BLOCKED = -1e6
"""Value the reference code writes at blocked probabilities before its second softmax."""


@dataclass(frozen=True)
class Capture:
    """What one forward leaves for the analysis (on the model's device, model dtype).

    Attributes:
        logits: ``[B, d_vocab]`` at the last position.
        attn_out, mlp_out: ``[B, L, d_model]`` updates at the last position.
        subject_resid: ``[B, L, d_model]`` ``resid_post`` at the last subject token.
        pattern: ``[B, L, n_heads, T]`` attention row of the last query.
        v: ``[B, L, T, n_kv_heads, d_head]`` value vectors of every key (a block with fewer
            key/value heads than ``model.n_kv_heads`` fills the first of them).
        gate: ``[B, L, n_heads, d_head]`` output gate of the last query (``spec.attn_output_gate``),
            None for attention without one.
    """

    logits: torch.Tensor
    attn_out: torch.Tensor
    mlp_out: torch.Tensor
    subject_resid: torch.Tensor
    pattern: torch.Tensor
    v: torch.Tensor
    gate: torch.Tensor | None = None


def capture(model: Model, batch: PromptBatch) -> Capture:
    """Run ``batch`` once (eager attention) and keep what :class:`Capture` lists."""
    rows = torch.arange(len(batch), device=model.device)
    subject_last = (batch.spans["subject"][:, 1] - 1).to(model.device)
    readers = {
        "attn_out": lambda act: act[:, -1],
        "mlp_out": lambda act: act[:, -1],
        "resid_post": lambda act: act[rows, subject_last],
        "pattern": lambda act: act[:, :, -1],
        "v": lambda act: _padded_kv_heads(act, model.n_kv_heads),
    }
    kept: dict[str, list] = {name: [None] * model.n_layers for name in (*readers, "gate")}
    with contextlib.ExitStack() as stack:
        for layer in range(model.n_layers):
            for name, read in readers.items():
                stack.enter_context(site_hook(model, Site(layer, name), _keeper(kept[name], layer, read)))
            stack.enter_context(
                output_gate_hook(model, layer, _keeper(kept["gate"], layer, lambda g: g[:, -1]))
            )
        logits = forward(model, batch)
    gates = kept.pop("gate")  # None without an output gate
    gate = torch.stack(gates, dim=1) if model.spec.attn_output_gate else None
    stacked = {name: torch.stack(acts, dim=1) for name, acts in kept.items()}
    return Capture(
        logits=logits,
        attn_out=stacked["attn_out"],
        mlp_out=stacked["mlp_out"],
        subject_resid=stacked["resid_post"],
        pattern=stacked["pattern"],
        v=stacked["v"],
        gate=gate,
    )


def _padded_kv_heads(v: torch.Tensor, n_kv: int) -> torch.Tensor:
    """``v [B, T, h, d_head]`` with zero heads appended up to ``n_kv`` (blocks with fewer heads)."""
    return torch.nn.functional.pad(v, (0, 0, 0, n_kv - v.shape[2]))


def _keeper(slots: list, layer: int, read):
    def keep(act: torch.Tensor) -> None:
        slots[layer] = read(act.detach()).clone()  # a copy, so the full activation can be freed

    return keep


def blocked_keys(batch: PromptBatch, names: tuple[str, ...]) -> torch.Tensor:
    """``[B, n_variants, T]`` bool: the key positions each counterfactual blocks (never padding)."""
    real = batch.attention_mask.bool()
    positions = torch.arange(batch.seq_len)
    subject = batch.span_mask("subject") & real
    subject_last = positions == batch.spans["subject"][:, 1:] - 1
    last = (positions == batch.seq_len - 1).expand_as(real)
    first = positions == batch.pad_lengths[:, None]
    sets = {
        "none": torch.zeros_like(real),
        "subject": subject,
        "last": last,
        "subject_last": subject_last,
        "subject_last+last": subject_last | last,
        "non_subject": real & ~subject,
        "non_subject_ex_last": real & ~subject & ~last,
        "all_but_first": real & ~first,
        "all_but_last": real & ~last,
        "all_but_subject_last": real & ~subject_last,
        "all_but_subject_last+last": real & ~(subject_last | last),
        "all": real,
    }
    return torch.stack([sets[name] for name in names], dim=1)


def counterfactual_weights(
    pattern: torch.Tensor, blocked: torch.Tensor, real: torch.Tensor, mode: CounterfactualMode
) -> torch.Tensor:
    """Modified last attention rows.

    Args:
        pattern: ``[B, L, H, T]`` attention probabilities of the last query.
        blocked: ``[B, n, T]`` keys blocked by each variant.
        real: ``[B, T]`` non-pad keys.
        mode: ``renormalize`` or ``resoftmax`` (module docstring).

    Returns:
        ``[B, L, n, H, T]`` weights (at least float32).
    """
    probs = upcast(pattern)[:, :, None]  # [B, L, 1, H, T]
    keep = ~blocked[:, None, :, None, :].to(probs.device)  # [B, 1, n, 1, T]
    real = real[:, None, None, None, :].to(probs.device)
    touched = (~keep & real).any(-1, keepdim=True)  # [B, 1, n, 1, 1]: the variant blocks something
    if mode == "renormalize":
        kept = probs * keep
        total = kept.sum(-1, keepdim=True)
        weights = kept / torch.where(touched & (total > 0), total, torch.ones_like(total))
    else:
        scores = probs.masked_fill(~keep, RESOFTMAX_BLOCKED).masked_fill(~real, -torch.inf)
        weights = torch.where(touched, scores.softmax(-1), probs)
    return weights * (keep & real).any(-1, keepdim=True)  # every key blocked: zero weights


@torch.no_grad()
def counterfactual_outputs(model: Model, cap: Capture, weights: torch.Tensor) -> torch.Tensor:
    """Attention outputs at the last position recomputed from ``weights [B, L, n, H, T]``.

    Returns ``[B, n, L, d_model]``: ``o_proj`` of the mixed values (times the clean run's output
    gate, if the attention has one; bias included), then the family's post-attention norm
    (Gemma-2), through the model's own modules.
    """
    dtype = torch.promote_types(weights.dtype, cap.v.dtype)  # BLOOM's float32 pattern, float64 values
    v, weights = cap.v.to(dtype), weights.to(dtype)  # [B, L, T, H_kv, d_head]
    outs = []
    for layer in range(model.n_layers):
        values = model.per_query_head(v[:, layer], layer)  # [B, T, H, d_head]: head h reads kv h // g
        z = torch.einsum("bnht,bthe->bnhe", weights[:, layer], values)  # [B, n, H, d_head]
        z = z if cap.gate is None else z * cap.gate[:, layer, None].to(dtype)  # the clean run's gate
        o_proj = model.module(model.spec.o_proj, layer)
        z = z[..., : model.d_head_at(layer)]  # (narrower heads than d_head are padded with zeros)
        out = o_proj(z.flatten(-2).to(o_proj.weight.dtype))  # [B, n, d_model]
        extra = model.attn_bias(layer)  # a bias the block adds outside o_proj (GPT-NeoX-Japanese)
        out = out if extra is None else out + extra.to(out.device, out.dtype)
        outs.append(apply_update(model, "attn", layer, out))  # post-norm, residual scale
    return torch.stack(outs, dim=2)
