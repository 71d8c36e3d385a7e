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

from dataclasses import dataclass

import torch

from recallscope.errors import ShapeError

__all__ = ["Fit", "least_squares"]


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
