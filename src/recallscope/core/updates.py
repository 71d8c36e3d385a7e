"""How a sublayer's raw output becomes the update it adds to the residual stream.

Most blocks add what the attention's output projection and the MLP's down projection write
(``attn_out = o``). Two things can sit in between, and every decomposition into heads, neurons or
source positions must fold them in to stay exact:

- a sandwich post-norm (Gemma-2/3, OLMo-2): ``attn_out = γ ⊙ o / ρ(o)``, linear in the parts of
  ``o`` at its actual (frozen) scale ``ρ(o)``;
- a constant residual multiplier (Granite): ``attn_out = c · o``.

:func:`apply_update` runs both, through the model's own post-norm module, on a raw output the model
did not compute (a counterfactual). :func:`update_map` gives the map for one sublayer as a static
gain ``γ [d]`` and a per-row factor ``c / ρ(o) [..., 1]``, so a part ``p`` of ``o`` contributes
``factor · γ ⊙ p`` to the update::

    m = update_map(model, "attn", layer, o)     # o: [B, P, d] the raw attention output
    head_parts = m(parts)                          # parts: [B, P, H, d] with Σ_h parts + b_O == o
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from recallscope.models.model import Model

__all__ = ["UpdateMap", "update_map", "update_gain", "apply_update", "Sublayer"]

Sublayer = Literal["attn", "mlp"]


@dataclass(frozen=True)
class UpdateMap:
    """``update = factor · gain ⊙ raw`` with ``gain [d]`` static (or None) and ``factor [..., 1]``."""

    gain: torch.Tensor | None
    factor: torch.Tensor

    def __call__(self, parts: torch.Tensor, *, axes: tuple[int, ...] = ()) -> torch.Tensor:
        """Apply to ``parts`` whose extra component ``axes`` (after the raw output's leading axes)
        are not in ``factor``: e.g. ``[B, P, H, d]`` parts of a ``[B, P, d]`` output with ``axes=(2,)``.
        """
        factor = self.factor
        for axis in sorted(axes):
            factor = factor.unsqueeze(axis)
        out = parts * factor
        return out if self.gain is None else out * self.gain


def _post_norm_path(model: Model, sublayer: Sublayer, layer: int) -> str | None:
    spec = model.spec.at(layer)
    return spec.attn_post_norm if sublayer == "attn" else spec.mlp_post_norm


def update_gain(
    model: Model, sublayer: Sublayer, layer: int, dtype: torch.dtype, device
) -> torch.Tensor | None:
    """The static gain ``γ [d]`` of the sublayer's post-norm (None without one)."""
    path = _post_norm_path(model, sublayer, layer)
    return None if path is None else model.norm_params(path, layer).gain(dtype, device)


def update_map(model: Model, sublayer: Sublayer, layer: int, raw: torch.Tensor) -> UpdateMap | None:
    """The map from the raw output ``raw [..., d]`` of ``sublayer`` in ``layer`` to its update, or None
    when the update is ``raw`` itself. The post-norm's ``ρ`` is taken on ``raw`` (its actual input).
    """
    path = _post_norm_path(model, sublayer, layer)
    scale = model.update_scale(sublayer, layer)
    if path is None and scale == 1.0:
        return None
    if path is None:
        return UpdateMap(None, torch.full_like(raw[..., :1], scale))
    params = model.norm_params(path, layer)
    factor = scale / params.rho(raw)
    return UpdateMap(params.gain(raw.dtype, raw.device), factor)


def apply_update(model: Model, sublayer: Sublayer, layer: int, raw: torch.Tensor) -> torch.Tensor:
    """The update ``[..., d]`` a new raw output ``raw [..., d]`` of ``sublayer`` in ``layer`` would
    add to the residual: the model's own post-norm module (run in the model's dtype) and the
    residual scale.
    """
    path = _post_norm_path(model, sublayer, layer)
    if path is not None:
        raw = model.module(path, layer)(raw.to(model.dtype)).to(raw.dtype)
    scale = model.update_scale(sublayer, layer)
    return raw if scale == 1.0 else raw * scale
