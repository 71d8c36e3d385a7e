"""Removing a sublayer's update at every position, per batch row (Geva et al. 2023, ``methods.md`` G3).

:func:`knock_out` removes the MLP or attention update of one block in the chosen batch rows:

- ``mlp`` / ``zero``: the MLP update added to the residual (``mlp_out``) is 0; ``mlp`` /
  ``as_coded``: the neuron activations (``mlp_post``) are 0, as the reference code's zeroed
  pre-activations give (``act(0) = 0``), so the update is the MLP output bias;
- ``attn`` / ``zero``: the attention update (``attn_out``) is 0; ``attn`` / ``as_coded``: the
  attention probabilities are uniform over each query's causal, non-padding prefix (the reference
  code's all-``finfo.min`` mask), so the update is the mean of the value vectors through ``W_O``
  (plus ``b_O``). Sliding windows are ignored in this mode.

:func:`knockout_window` gives the blocks knocked out from a start layer::

    with knock_out(model, layer, "attn", "as_coded", rows=rows, attention_mask=batch.attention_mask):
        cache = run_with_cache(model, batch, [Site(target, "resid_post")])
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

from recallscope.core.attention import edit_pattern
from recallscope.core.hooks import site_hook
from recallscope.errors import RecallscopeError
from recallscope.models.model import Model
from recallscope.models.sites import Site

__all__ = ["SUBLAYERS", "MODES", "SublayerMode", "knock_out", "knockout_window"]

SUBLAYERS = ("mlp", "attn")
SublayerMode = Literal["zero", "as_coded"]
MODES = ("zero", "as_coded")


def knockout_window(start: int, size: int, target_layer: int) -> range:
    """Blocks knocked out from ``start``: ``[start, min(start + size, target_layer + 1))``."""
    return range(start, min(start + size, target_layer + 1))


_SITES = {("mlp", "zero"): "mlp_out", ("mlp", "as_coded"): "mlp_post", ("attn", "zero"): "attn_out"}


def knock_out(
    model: Model,
    layer: int,
    sublayer: str,
    mode: str,
    *,
    rows: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> contextlib.AbstractContextManager:
    """Remove ``sublayer``'s update in block ``layer`` at every position (module docstring modes).

    Args:
        model: the model.
        layer: 0-based block.
        sublayer: ``"mlp"`` or ``"attn"``.
        mode: ``"zero"`` or ``"as_coded"``.
        rows: ``[B]`` bool, the batch rows knocked out (None = all).
        attention_mask: ``[B, T]`` padding mask of the batch (``as_coded`` attention: pads get no
            weight); None = no padding.
    """
    if (sublayer, mode) == ("attn", "as_coded"):
        return edit_pattern(model, layer, _uniform_attention(rows, attention_mask))
    if (sublayer, mode) not in _SITES:
        raise RecallscopeError(f"unknown sublayer/mode {sublayer!r}/{mode!r}; use {SUBLAYERS} and {MODES}")
    return site_hook(model, Site(layer, _SITES[sublayer, mode]), _zero_rows(rows))


def _zero_rows(rows: torch.Tensor | None):
    def zero(act: torch.Tensor) -> torch.Tensor:  # [B, T, …]
        if rows is None:
            return torch.zeros_like(act)
        return act.masked_fill(rows.to(act.device).view(-1, *[1] * (act.dim() - 1)), 0.0)

    return zero


def _uniform_attention(rows: torch.Tensor | None, attention_mask: torch.Tensor | None):
    def uniform(probs: torch.Tensor) -> torch.Tensor:  # [B, H, Q, K]
        n_query, n_key = probs.shape[-2:]
        allowed = torch.ones(n_query, n_key, dtype=torch.bool, device=probs.device).tril(n_key - n_query)
        allowed = allowed[None, None]  # [1, 1, Q, K]
        if attention_mask is not None:
            allowed = allowed & attention_mask.to(probs.device).bool()[:, None, None, -n_key:]
        count = allowed.sum(-1, keepdim=True)  # [B|1, 1, Q, 1]
        use = count > 0  # padding queries that see nothing keep their probabilities
        if rows is not None:
            use = use & rows.to(probs.device).view(-1, 1, 1, 1)
        return torch.where(use, allowed.to(probs.dtype) / count.clamp(min=1), probs)

    return uniform
