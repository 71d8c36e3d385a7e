"""Least squares of vectors on vectors: one fit per example, or one pooled over examples.

Lv et al.'s "activation" analysis (``methods.md`` L5) writes an MLP output ``y ∈ R^d`` as a
combination of the head outputs that feed it, ``X ∈ R^{n × d}`` (one row per head), plus a
remainder::

    y_b = Σ_i β_{b,i} X_{b,i} (+ c_b) + f_b

- ``pooled=False`` (per example): a ``β_b`` per example; with ``intercept`` a scalar ``c_b`` added to
  every coordinate (the all-ones regressor). R² is centred over the ``d`` coordinates with an
  intercept and uncentred (``1 − ‖f‖² / ‖y‖²``) without.
- ``pooled=True``: one ``β`` shared by all examples; with ``intercept`` a shared offset vector
  ``c ∈ R^d`` (per-coordinate intercept, i.e. the data centred over examples). R² is over all
  examples, centred over examples with an intercept and uncentred without.

Computed in float64 with ``torch.linalg.lstsq`` (minimum-norm solution when regressors are
collinear, e.g. a head whose output is zero).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from recallscope.core.decoding import last_position
from recallscope.core.decompose import head_outputs
from recallscope.core.mlp import feeding_attention_layer, mlp_input_site
from recallscope.core.tokens import PromptBatch
from recallscope.errors import RecallscopeError, ShapeError
from recallscope.models.model import Model
from recallscope.models.sites import Site

__all__ = [
    "Fit",
    "least_squares",
    "REGRESSORS",
    "SPACES",
    "regressor_heads",
    "needed_sites",
    "last_position_acts",
    "remainders",
    "layer_inputs",
    "regressor_matrix",
    "remainder_fit",
]

REGRESSORS = ("feeding_layer", "earlier_layers")
"""Heads an MLP's output is regressed on: the attention layer that feeds it, or every one up to it."""
SPACES = ("raw", "normalized")
"""Regressors as the heads write them, or as the MLP's norm sees them (its scale frozen)."""


@dataclass(frozen=True)
class Fit:
    """A least-squares fit of ``y [B, d]`` on ``X [B, n, d]``.

    Attributes:
        coef: ``[B, n]`` (the same row repeated when pooled).
        intercept: ``[B]`` per-example scalar, ``[d]`` pooled offset, or None.
        fitted: ``[B, d]`` ``Σ_i β_i X_i (+ c)``.
        remainder: ``[B, d]`` ``y − fitted``.
        r2: ``[B]`` per example, or the pooled R² repeated.
    """

    coef: torch.Tensor
    intercept: torch.Tensor | None
    fitted: torch.Tensor
    remainder: torch.Tensor
    r2: torch.Tensor


def least_squares(y: torch.Tensor, X: torch.Tensor, *, intercept: bool = False, pooled: bool = False) -> Fit:
    """Fit ``y [B, d]`` on the ``n`` regressors ``X [B, n, d]`` (see the module docstring)."""
    if y.dim() != 2 or X.dim() != 3 or X.shape[0] != y.shape[0] or X.shape[2] != y.shape[1]:
        raise ShapeError(
            f"least_squares needs y [B, d] and X [B, n, d]; got {tuple(y.shape)} and {tuple(X.shape)}"
        )
    y, X = y.double(), X.double()
    return _pooled(y, X, intercept) if pooled else _per_example(y, X, intercept)


def _solve(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Minimum-norm least squares ``A [.., m, n] x = b [.., m]`` (CPU ``gelsd``; pseudo-inverse elsewhere)."""
    if A.device.type == "cpu":
        return torch.linalg.lstsq(A, b[..., None], driver="gelsd").solution[..., 0]
    return (torch.linalg.pinv(A) @ b[..., None])[..., 0]


def _per_example(y: torch.Tensor, X: torch.Tensor, intercept: bool) -> Fit:
    A = X.transpose(1, 2)  # [B, d, n]
    if intercept:
        A = torch.cat([A, torch.ones_like(A[..., :1])], dim=2)
    solution = _solve(A, y)  # [B, n(+1)]
    fitted = (A @ solution[..., None])[..., 0]
    remainder = y - fitted
    total = (y - y.mean(1, keepdim=True)) if intercept else y
    r2 = 1 - remainder.pow(2).sum(1) / total.pow(2).sum(1)
    coef, offset = (solution[:, :-1], solution[:, -1]) if intercept else (solution, None)
    return Fit(coef, offset, fitted, remainder, r2)


def _pooled(y: torch.Tensor, X: torch.Tensor, intercept: bool) -> Fit:
    B, n, d = X.shape
    if intercept:
        y_mean, X_mean = y.mean(0), X.mean(0)  # [d], [n, d]
        yc, Xc = y - y_mean, X - X_mean
    else:
        yc, Xc = y, X
    A = Xc.transpose(1, 2).reshape(B * d, n)
    beta = _solve(A, yc.reshape(B * d))  # [n]
    offset = (y_mean - beta @ X_mean) if intercept else None
    fitted = torch.einsum("bnd,n->bd", X, beta) + (0 if offset is None else offset)
    remainder = y - fitted
    r2 = 1 - remainder.pow(2).sum() / yc.pow(2).sum()
    return Fit(beta.expand(B, n).clone(), offset, fitted, remainder, r2.expand(B).clone())


# -- an MLP's output on the heads that feed it (Lv et al. L5, L6) ------------------------------------


def regressor_heads(model: Model, layer: int, regressors: str = "feeding_layer") -> list[tuple[int, int]]:
    """The ``(source_layer, head)`` pairs regressed for MLP ``layer`` (empty for MLP 0 of parallel blocks)."""
    if regressors not in REGRESSORS:
        raise RecallscopeError(f"regressors must be one of {REGRESSORS}, got {regressors!r}")
    feeding = feeding_attention_layer(model, layer)
    if feeding is None:
        return []
    sources = [feeding] if regressors == "feeding_layer" else range(feeding + 1)
    return [(src, h) for src in sources for h in range(model.n_heads)]


def needed_sites(
    model: Model, layers: Sequence[int], *, regressors: str = "feeding_layer", ranks: bool = False
) -> list[Site]:
    """Last-position sites the fits of MLPs ``layers`` read: ``z`` of the regressor layers, the MLP
    input and ``mlp_out`` (and ``resid_post`` with ``ranks``).
    """
    sources = sorted({src for layer in layers for src, _ in regressor_heads(model, layer, regressors)})
    sites = [Site(src, "z") for src in sources]
    for layer in layers:
        sites += [mlp_input_site(model, layer), Site(layer, "mlp_out")]
        sites += [Site(layer, "resid_post")] if ranks else []
        sites += [Site(layer, "ple_out")] if ranks and model.spec.ple_update else []
    return list(dict.fromkeys(sites))


def last_position_acts(model: Model, batch: PromptBatch, sites: Sequence[Site]) -> dict[Site, torch.Tensor]:
    """One forward keeping ``sites`` at the last position: ``{site: [B, ...]}`` in float64."""
    return {site: act.double() for site, act in last_position(model, batch, sites).items()}


def remainders(
    model: Model,
    cache_or_acts: PromptBatch | Mapping[Site, torch.Tensor],
    layer: int,
    *,
    regressors: str = "feeding_layer",
    intercept: bool = False,
    space: str = "raw",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mlp_out [B, d], remainder [B, d]) at the last position of MLP `layer`, per-example fit.

    Args:
        model: the model.
        cache_or_acts: a batch (one forward is run), or last-position activations
            ``{Site: [B, ...]}`` holding :func:`needed_sites` of ``[layer]``.
        layer: the MLP's block index.
        regressors, intercept, space: as in ``mlp_regression.Config``.

    Returns:
        float64 ``y = m^ℓ_N`` and ``f = y − Σ β o (− c)``; with no regressor heads (MLP 0 of a
        parallel model) ``f = y`` (minus its mean with ``intercept``).
    """
    model.check_layer(layer)
    if space not in SPACES:
        raise RecallscopeError(f"space must be one of {SPACES}, got {space!r}")
    acts = cache_or_acts
    if isinstance(acts, PromptBatch):
        acts = last_position_acts(model, acts, needed_sites(model, [layer], regressors=regressors))
    heads = regressor_heads(model, layer, regressors)
    y, raw, _ = layer_inputs(model, acts, layer, heads)
    X = regressor_matrix(model, acts, layer, raw, space)
    return y, remainder_fit(y, X, intercept=intercept, pooled=False)[0]


def layer_inputs(model, acts, layer, heads) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``y [B, d]``, raw head outputs ``[B, n, d]`` and the MLP input ``[B, d]`` (float64)."""
    try:
        y = acts[Site(layer, "mlp_out")].double()
        resid = acts[mlp_input_site(model, layer)].double()
        by_source = {}
        for src in sorted({s for s, _ in heads}):
            z = acts[Site(src, "z")].double()  # [B, H, d_head]
            by_source[src] = head_outputs(model, src, z[:, None]).parts[:, 0]  # [B, H, d]
    except KeyError as err:
        raise RecallscopeError(
            f"the activations lack site {err.args[0]} needed for MLP {layer}: pass the last-position "
            f"activations of needed_sites(model, [{layer}]) or a batch"
        ) from None
    raw = (
        torch.stack([by_source[s][:, h] for s, h in heads], 1) if heads else y.new_zeros(len(y), 0, len(y[0]))
    )
    return y, raw, resid


def regressor_matrix(model, acts, layer, raw: torch.Tensor, space: str) -> torch.Tensor:
    """The regressors ``[B, n, d]``: raw head outputs, or as the MLP's norm sees them (its scale and
    a gated norm's gate frozen at their values).
    """
    if space == "raw":
        return raw
    resid = acts[mlp_input_site(model, layer)].double()
    path = model.spec.at(layer).mlp_norm
    params = model.norm_params(path, layer)
    rho = params.rho(resid)
    gain = params.gain(torch.float64, raw.device)
    normed = params.centre(raw) / rho[:, None]
    normed = normed if gain is None else normed * gain
    gate = model.norm_gate(path, layer, acts[mlp_input_site(model, layer)])  # [B, d] frozen, or None
    return normed if gate is None else normed * gate.double()[:, None]


def remainder_fit(y: torch.Tensor, X: torch.Tensor, *, intercept: bool, pooled: bool):
    """``(remainder [B, d], Fit | None)``; with no regressors only the intercept (if any) is removed."""
    if X.shape[1]:
        fit = least_squares(y, X, intercept=intercept, pooled=pooled)
        return fit.remainder, fit
    if not intercept:
        return y.clone(), None
    return (y - (y.mean(0, keepdim=True) if pooled else y.mean(1, keepdim=True))), None
