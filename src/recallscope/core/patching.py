"""Writing activations: patch (set or add) a site's value at chosen rows, positions and heads.

Two indexing styles cover every method of the four papers:

- :func:`patch` (outer indexing): ``act[rows][:, positions][..., heads] = value``, e.g. restore the
  clean subject states of layer 8 in all rows, or ablate a head at the last position;
- :func:`patch_cells` (paired indexing): row ``rows[i]`` gets ``values[i]`` at ``positions[i]``,
  e.g. a causal-tracing grid where every batch row restores a different (layer, position) cell.

Both are context managers built on :func:`recallscope.core.hooks.site_hook`; values may come from
another run's :class:`~recallscope.core.cache.Cache`. :func:`add_noise` adds noise to token
embeddings (ROME-style corruption). A patched tensor is always a copy: caches taken in the same
forward are never modified behind the caller's back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Literal

import torch

from recallscope.core.hooks import site_hook
from recallscope.errors import ShapeError, SiteError
from recallscope.models.model import Model
from recallscope.models.sites import Site, parse_site

__all__ = ["patch", "patch_cells", "add_noise", "ablate_neurons", "window"]

Mode = Literal["set", "add"]
_HEAD_SITES = {"z": 2, "q": 2, "k": 2, "v": 2, "pattern": 1}


def _axes(site: Site) -> tuple[int, int | None]:
    """(position axis, head axis) of a site's canonical tensor."""
    return (2 if site.name == "pattern" else 1), _HEAD_SITES.get(site.name)


def _as_index(values: Sequence[int] | torch.Tensor | None, size: int, device) -> torch.Tensor:
    if values is None:
        return torch.arange(size, device=device)
    index = torch.as_tensor(values, dtype=torch.long, device=device)
    if ((index < -size) | (index >= size)).any():
        raise SiteError(f"index {index.tolist()} out of range for an axis of size {size}")
    return index % size


def _write(region: torch.Tensor, value: torch.Tensor, mode: Mode) -> torch.Tensor:
    value = value.to(region.device, region.dtype)
    try:
        return region + value if mode == "add" else value.expand_as(region)
    except RuntimeError:
        raise ShapeError(
            f"patch value of shape {tuple(value.shape)} does not fit the patched region of shape "
            f"{tuple(region.shape)}"
        ) from None


def patch(
    model: Model,
    site: Site | str,
    value: torch.Tensor,
    *,
    rows: Sequence[int] | torch.Tensor | None = None,
    positions: Sequence[int] | torch.Tensor | None = None,
    heads: Sequence[int] | torch.Tensor | None = None,
    mode: Mode = "set",
) -> contextlib.AbstractContextManager:
    """Set (or add to) ``site`` at ``rows × positions (× heads)`` inside the context.

    ``value`` must broadcast to the selected region, whose shape is the site's canonical shape with
    each indexed axis cut down: ``[len(rows), len(positions), d_model]`` for residual sites,
    ``[len(rows), len(positions), len(heads), d_head]`` for ``z``.
    """
    site = parse_site(site) if isinstance(site, str) else site
    pos_axis, head_axis = _axes(site)
    if heads is not None and head_axis is None:
        raise SiteError(f"site {site} has no head axis; heads= applies to z, q, k, v and pattern")

    def edit(act: torch.Tensor) -> torch.Tensor:
        given = {0: rows, pos_axis: positions}
        if heads is not None:
            given[head_axis] = heads
        n_axes = max(given) + 1  # index every leading axis up to the last one given
        index = tuple(
            _as_index(given.get(axis), act.shape[axis], act.device).view(
                [-1 if other == axis else 1 for other in range(n_axes)]
            )
            for axis in range(n_axes)
        )
        new = act.clone()
        new[index] = _write(act[index], value, mode)
        return new

    return site_hook(model, site, edit)


def patch_cells(
    model: Model,
    site: Site | str,
    rows: torch.Tensor,
    positions: torch.Tensor,
    values: torch.Tensor,
    *,
    mode: Mode = "set",
) -> contextlib.AbstractContextManager:
    """Paired writes: row ``rows[i]`` gets ``values[i]`` at ``positions[i]``.

    Args:
        rows: ``[n]`` batch rows (a row may appear more than once).
        positions: ``[n]`` or ``[n, P]`` positions of each cell.
        values: ``[n, …]`` or ``[n, P, …]`` (the site's trailing shape), broadcastable.
    """
    site = parse_site(site) if isinstance(site, str) else site
    if site.name == "pattern":
        raise SiteError("patch_cells does not apply to pattern; use patch(..., heads=...)")
    rows = torch.as_tensor(rows, dtype=torch.long)
    positions = torch.as_tensor(positions, dtype=torch.long)
    if rows.dim() != 1 or positions.shape[0] != rows.shape[0]:
        raise ShapeError(
            f"rows must be [n] and positions [n] or [n, P]; got rows {tuple(rows.shape)}, "
            f"positions {tuple(positions.shape)}"
        )

    def edit(act: torch.Tensor) -> torch.Tensor:
        r = rows.to(act.device)
        p = positions.to(act.device) % act.shape[1]
        if p.dim() == 2:
            r = r[:, None]
        new = act.clone()
        new[r, p] = _write(act[r, p], values, mode)
        return new

    return site_hook(model, site, edit)


def add_noise(
    model: Model, noise: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor
) -> contextlib.AbstractContextManager:
    """Add ``noise`` (``[n, P, d_model]``) to the token embeddings of ``rows[i]`` at ``positions[i]``."""
    return patch_cells(model, Site(None, "embed"), rows, positions, noise, mode="add")


def ablate_neurons(
    model: Model,
    layer: int,
    neurons: Sequence[int] | torch.Tensor,
    *,
    rows: Sequence[int] | torch.Tensor | None = None,
    positions: Sequence[int] | torch.Tensor | None = None,
    value: float | torch.Tensor = 0.0,
) -> contextlib.AbstractContextManager:
    """Set MLP neuron coefficients (``mlp_post``) of ``layer`` to ``value`` (zero by default)."""
    site = Site(layer, "mlp_post")
    neurons = torch.as_tensor(neurons, dtype=torch.long)

    def edit(act: torch.Tensor) -> torch.Tensor:
        r = _as_index(rows, act.shape[0], act.device)[:, None, None]
        p = _as_index(positions, act.shape[1], act.device)[None, :, None]
        n = neurons.to(act.device)[None, None, :]
        new = act.clone()
        new[r, p, n] = torch.as_tensor(value, dtype=act.dtype, device=act.device)
        return new

    return site_hook(model, site, edit)


def window(layer: int, size: int, n_layers: int) -> range:
    """The window of ``size`` layers centred on ``layer`` used by ROME and Geva et al.'s code:
    ``[ℓ - size//2, ℓ - (-size//2))``, clipped to ``[0, n_layers)``.
    """
    return range(max(0, layer - size // 2), min(n_layers, layer - (-size // 2)))
