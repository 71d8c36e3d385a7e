"""What single modules are and do, for architecture discovery (``models.discover``).

Predicates on modules (a linear map, an experts bank, a norm, and the widths a linear map reads and
writes), the activation functions an MLP may apply without a module of its own, the numeric
comparison of traced values to the rounding of the model's dtype (:class:`_Compare`), and the
identification of a norm module's kind, gain offset and epsilon from its behaviour (``norm_kind``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from recallscope.models.experts import is_dense_dispatch, is_stacked
from recallscope.models.offload import OffloadedWeights

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": torch.nn.functional.silu,
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "relu": torch.nn.functional.relu,
    "relu2": lambda x: torch.nn.functional.relu(x).square(),
}
"""Activation functions an MLP may apply without a module of its own (LFM2's ``F.silu``)."""

_TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


# -- module predicates -------------------------------------------------------------------------


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def is_experts(module: nn.Module) -> bool:
    """A mixture-of-experts bank wired to transformers' ``ExpertsInterface`` (3-D expert weights), one
    with 3-D fused gate-up and down weights that every token goes to (Llama 4), or one with 2-D gate,
    up and down weights stacked expert after expert (DBRX).
    """
    weight = getattr(module, "down_proj", None)
    if hasattr(module, "has_gate"):
        return isinstance(weight, torch.Tensor) and weight.dim() == 3
    # Llama 4's bank: every token to every expert; DBRX's: 2-D weights (models.experts)
    return is_dense_dispatch(module) or is_stacked(module)


def _is_norm(module: nn.Module) -> bool:
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return True
    params = list(module.parameters(recurse=False))
    own_only = all(not list(child.parameters()) for child in module.children())
    return "norm" in type(module).__name__.lower() and own_only and all(p.dim() == 1 for p in params)


def _out_features(module: nn.Module) -> int:
    return module.weight.shape[1] if isinstance(module, Conv1D) else module.weight.shape[0]


def _in_features(module: nn.Module) -> int:
    return module.weight.shape[0] if isinstance(module, Conv1D) else module.weight.shape[1]


# -- numeric helpers -----------------------------------------------------------------------------


class _Compare:
    def __init__(self, dtype: torch.dtype) -> None:
        self.tol = _TOLERANCE.get(dtype, 3e-2)

    def close(self, a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
        if a is None or b is None:
            return False
        try:
            a, b = torch.broadcast_tensors(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]))
        except RuntimeError:
            return False
        return bool((a - b).abs().max() <= self.tol * max(1.0, float(b.abs().max())))

    def scale(self, target: torch.Tensor | None, parts: list[torch.Tensor | None]) -> float | None:
        """``c`` with ``target == c · Σ parts`` (to rounding), or None."""
        if target is None or any(p is None for p in parts):
            return None
        try:
            total = sum(p.reshape(target.shape) for p in parts)
        except RuntimeError:
            return None
        denominator = float((total * total).sum())
        if denominator == 0.0:
            return None
        c = float((target * total).sum()) / denominator
        c = 1.0 if abs(c - 1.0) <= self.tol / 10 else c  # a plain sum stays a plain sum
        return c if self.close(c * total, target) else None

    def fit(self, target, u, *vs) -> tuple[float, ...] | None:
        """``(α, β, …)`` with ``target == α u + Σ β_i v_i`` (to rounding; least squares; ``α`` near 1
        is 1), or None.
        """
        terms = (u, *vs)
        if target is None or any(t is None or t.numel() != target.numel() for t in terms):
            return None
        terms = [t.reshape(target.shape) for t in terms]  # OPT's MLP side is flat [B·T, d]
        columns = torch.stack([t.reshape(-1) for t in terms], 1)
        found = [float(c) for c in torch.linalg.lstsq(columns, target.reshape(-1, 1)).solution[:, 0]]
        found[0] = 1.0 if abs(found[0] - 1.0) <= self.tol / 10 else found[0]
        total = sum(c * t for c, t in zip(found, terms, strict=True))
        return tuple(found) if self.close(total, target) else None


# -- norms ---------------------------------------------------------------------------------------


_EPS_CANDIDATES = (1e-5, 1e-6, 1e-8, 1e-12, 1e-3, 1e-4, 1e-7, 0.0)


def norm_kind(
    module: nn.Module, d_model: int, weights: OffloadedWeights, dtype: torch.dtype
) -> tuple[str, bool, float] | None:
    """``(kind, offset_one, eps)`` of a norm module from its behaviour on random inputs: a LayerNorm
    or an RMSNorm, multiplying by ``w`` or ``1 + w``, with the ``eps`` it really adds (read from the
    module, or found on small inputs where it matters when the module does not say); None if it is
    neither kind of norm over ``d_model``.
    """
    weight, bias = weights.read(module, "weight"), weights.read(module, "bias")
    device = weight.device if weight is not None else "cpu"
    gain = None if weight is None else weight.double()
    shift = None if bias is None else bias.double()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, d_model, generator=generator, dtype=torch.float64) * 2 + 0.5
    compare = _Compare(torch.float32 if dtype == torch.float64 else dtype)  # HF norms may run in fp32
    declared = norm_eps(module)

    def formula(x, kind, offset, eps):
        centred = x - x.mean(-1, keepdim=True) if kind == "layer" else x
        y = centred / (centred.pow(2).mean(-1, keepdim=True) + eps).sqrt()
        y = y if gain is None else y * (1 + gain if offset else gain)
        return y if shift is None else y + shift

    out = _call(module, x, device, dtype)
    if out is None:
        return None
    found = [
        (kind, offset)
        for kind in ("rms", "layer")
        for offset in ((False, True) if gain is not None else (False,))
        if compare.close(out, formula(x, kind, offset, declared if declared is not None else 1e-6))
    ]
    if not found:
        return None
    kind, offset = found[0]
    small = x * 1e-3  # where eps matters
    out = _call(module, small, device, dtype)
    candidates = ([declared] if declared is not None else []) + list(_EPS_CANDIDATES)
    errors = [(float((out - formula(small, kind, offset, eps)).abs().max()), eps) for eps in candidates]
    return kind, offset, min(errors)[1] if declared is None else declared


def _call(module: nn.Module, x: torch.Tensor, device, dtype: torch.dtype) -> torch.Tensor | None:
    with torch.no_grad():
        try:
            return module(x.to(device, dtype)).double().cpu()
        except Exception:  # noqa: BLE001 - not a norm over this width
            return None


def norm_eps(module: nn.Module) -> float | None:
    """The epsilon a norm module declares (``eps``, ``variance_epsilon`` …), or None."""
    for name in ("eps", "variance_epsilon", "epsilon", "layer_norm_eps"):
        value = getattr(module, name, None)
        if isinstance(value, float | int) and not isinstance(value, bool):
            return float(value)
    return None
