"""The dtype computations run in: the activations' own, at least float32 (half-precision models
are read and reduced in float32; float64 models stay float64).
"""

from __future__ import annotations

import torch

__all__ = ["compute_dtype", "upcast"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """``dtype``, or float32 when it is narrower (bfloat16, float16)."""
    return torch.promote_types(dtype, torch.float32)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` in :func:`compute_dtype` of its dtype (itself when it already is)."""
    return x.to(compute_dtype(x.dtype))
