"""Mixture-of-experts feed-forward blocks as one flat axis of neurons.

A mixture-of-experts (MoE) block adds, for each token, ``Σ_{e ∈ top-k} w_e · (h_e W_down[e] + b_e)``
(``w_e`` the router weight, ``h_e = act(x W_gate[e]) ⊙ (x W_up[e])`` the expert's neuron values),
plus, in some models, a shared expert ``σ(x g) · h_s W_down_s`` that every token uses. recallscope
reads that as one MLP whose neurons are, expert after expert, each expert's neurons and (when its
down projection has a bias) one *bias unit*, then the shared expert's neurons and bias unit:

    neuron index  =  e · (d_expert + has_bias) + k                      (routed expert e, neuron k)
                  =  n_experts · (d_expert + has_bias) + k              (shared expert, neuron k)
    coefficient   =  w_e · h_e[k]      (0 for an expert the router did not pick)
                  =  w_e               (bias unit of expert e, value vector b_e)
                  =  σ(x g) · h_s[k]   (shared expert; 1 instead of σ(x g) when it has no gate)

so ``Σ_k c_k W_out[k]`` is the block's output exactly, the router weight is part of every
coefficient, and every decomposition, attribution and ablation over "neurons" covers experts
without special cases. Banks are transformers' ``ExpertsInterface`` modules (3-D expert weights,
with ``has_gate``, ``has_bias``, ``is_transposed`` and the gating function ``_apply_gate`` that
every experts implementation of transformers calls).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from recallscope.errors import UnsupportedModelError

__all__ = ["Bank", "bank_of", "expert_values", "expert_coefficients"]

Read = Callable[[nn.Module, str], "torch.Tensor | None"]


@dataclass(frozen=True)
class Bank:
    """Layout of one experts bank."""

    n_experts: int
    d_expert: int
    has_bias: bool
    transposed: bool
    """Weights stored ``[E, in, out]`` (used as ``x @ W``) instead of ``[E, out, in]``."""
    gated: bool

    @property
    def width(self) -> int:
        """Neurons per expert, the bias unit included."""
        return self.d_expert + int(self.has_bias)

    @property
    def n_neurons(self) -> int:
        return self.n_experts * self.width


def bank_of(bank: nn.Module) -> Bank:
    """The layout of an ``ExpertsInterface`` bank (refuses layouts whose neurons are not a flat sum)."""
    if getattr(bank, "has_post_expert_norm", False):
        raise UnsupportedModelError(
            f"{type(bank).__name__} normalizes each expert's output: its neurons do not add up linearly"
        )
    down = bank.down_proj  # [E, d, d_e] or, transposed, [E, d_e, d]
    transposed = bool(getattr(bank, "is_transposed", False))
    d_expert = down.shape[1] if transposed else down.shape[2]
    return Bank(
        n_experts=down.shape[0],
        d_expert=d_expert,
        has_bias=bool(getattr(bank, "has_bias", False)),
        transposed=transposed,
        gated=bool(getattr(bank, "has_gate", True)),
    )


def expert_values(bank: nn.Module, read: Read) -> torch.Tensor:
    """Value vectors ``[n_experts · width, d_model]`` of every routed neuron (and bias unit)."""
    layout = bank_of(bank)
    down = read(bank, "down_proj")
    values = down if layout.transposed else down.transpose(1, 2)  # [E, d_e, d]
    if layout.has_bias:
        values = torch.cat([values, read(bank, "down_proj_bias")[:, None, :]], dim=1)
    return values.flatten(0, 1)


def expert_coefficients(
    bank: nn.Module, read: Read, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Coefficients ``[S, n_experts · width]`` of the routed neurons for tokens ``x [S, d]`` sent to
    experts ``index [S, k]`` with router weights ``weights [S, k]`` (as the bank received them).
    """
    layout = bank_of(bank)
    name = "gate_up_proj" if layout.gated else "up_proj"
    weight, bias = read(bank, name), read(bank, f"{name}_bias") if layout.has_bias else None
    coeffs = x.new_zeros(x.shape[0], layout.n_experts, layout.width)
    for expert in torch.unique(index).tolist():
        if not 0 <= expert < layout.n_experts:  # padding index of some routers
            continue
        rows, slot = torch.where(index == expert)
        w = weight[expert]
        pre = x[rows] @ w if layout.transposed else x[rows] @ w.T
        pre = pre if bias is None else pre + bias[expert]
        hidden = bank._apply_gate(pre) if layout.gated else bank.act_fn(pre)
        scale = weights[rows, slot].to(hidden.dtype)
        coeffs[rows, expert, : layout.d_expert] = hidden * scale[:, None]
        if layout.has_bias:
            coeffs[rows, expert, layout.d_expert] = scale
    return coeffs.flatten(1)
