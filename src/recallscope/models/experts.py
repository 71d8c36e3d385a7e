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

Llama 4's bank is not wired to the ``ExpertsInterface``: its block sends every token to every expert,
the input already multiplied by the router weight (zero for the experts the router did not pick),
as one ``[n_experts · S, d]`` batch, expert after expert, and sums the bank's ``[n_experts · S, d]``
output over the experts. Its neurons are read the same way (``dispatch == "all"``), with the
coefficient ``h_e(w_e · x)[k]``: the router weight is inside the expert, and the coefficient is 0
for an expert the router did not pick (``act(0) · 0``).

DBRX's bank is not wired to the ``ExpertsInterface`` either: it is called like one, with
``(tokens, expert index, router weights)``, but keeps its experts as three 2-D parameters (gate, up
and down, in that order) of shape ``[n_experts · d_expert, d]``, expert after expert along the rows,
in one submodule with the activation (``stacked``): expert ``e``'s neurons are
``act(x G_e^T) ⊙ (x U_e^T)`` and its output is that times ``D_e`` (``G_e``, ``U_e``, ``D_e`` its
``[d_expert, d]`` rows). Its neurons and coefficients are read as for a routed bank; discovery checks
that the bank's output is what this layout computes.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from recallscope.errors import UnsupportedModelError

__all__ = [
    "Bank",
    "bank_of",
    "bank_inputs",
    "is_dense_dispatch",
    "is_stacked",
    "expert_values",
    "expert_coefficients",
]

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
    dispatch: Literal["routed", "all"] = "routed"
    """``routed``: an ``ExpertsInterface`` bank called with ``(tokens, expert index, router weights)``;
    ``all``: every token goes to every expert, pre-multiplied by its router weight, as one
    ``[n_experts · S, d]`` batch whose ``[n_experts · S, d]`` output the block sums over experts (Llama 4)."""
    stacked: tuple[str, ...] = ()
    """Paths (relative to the bank) of 2-D gate, up and down weights ``[n_experts · d_expert, d]``,
    expert after expert along the rows (DBRX); empty for a bank of 3-D weights."""

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
    if is_stacked(bank):
        return _stacked_bank(bank)
    down = bank.down_proj  # [E, d, d_e] or, transposed, [E, d_e, d]
    if not hasattr(bank, "has_gate"):  # not an ExpertsInterface bank: every token to every expert
        return _dense_dispatch_bank(bank, down)
    transposed = bool(getattr(bank, "is_transposed", False))
    d_expert = down.shape[1] if transposed else down.shape[2]
    return Bank(
        n_experts=down.shape[0],
        d_expert=d_expert,
        has_bias=bool(getattr(bank, "has_bias", False)),
        transposed=transposed,
        gated=bool(getattr(bank, "has_gate", True)),
    )


def is_dense_dispatch(bank: nn.Module) -> bool:
    """A bank outside the ``ExpertsInterface`` with 3-D fused gate-up and down weights (Llama 4)."""
    down, gate_up = getattr(bank, "down_proj", None), getattr(bank, "gate_up_proj", None)
    return (
        not hasattr(bank, "has_gate")
        and isinstance(down, torch.Tensor)
        and isinstance(gate_up, torch.Tensor)
        and down.dim() == 3
        and gate_up.dim() == 3
        and callable(getattr(bank, "act_fn", None))
    )


def _stacked_weights(bank: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``(path, weight)`` of a bank's parameters if they are three 2-D ``[N, d]`` tensors of one shape
    in one module, with ``N`` a multiple of the bank's ``num_experts``; else ``[]``.
    """
    found = list(bank.named_parameters())
    experts = getattr(bank, "num_experts", None)
    if len(found) != 3 or not isinstance(experts, int) or experts < 1:
        return []
    shape = tuple(found[0][1].shape)
    owners = {path.rpartition(".")[0] for path, _ in found}
    if len(owners) != 1 or any(tuple(w.shape) != shape for _, w in found) or len(shape) != 2:
        return []
    return found if shape[0] % experts == 0 else []


def _owner(bank: nn.Module, path: str) -> tuple[nn.Module, str]:
    """``(module, name)`` of the parameter at ``path`` relative to ``bank``."""
    owner, _, name = path.rpartition(".")
    return (bank.get_submodule(owner) if owner else bank), name


def _activation(bank: nn.Module) -> Callable | None:
    """The activation of a stacked bank: its weights' module's ``act_fn`` or ``activation_fn``."""
    paths = [path for path, _ in _stacked_weights(bank)]
    if not paths:
        return None
    for module in (_owner(bank, paths[0])[0], bank):
        for name in ("act_fn", "activation_fn"):
            if callable(getattr(module, name, None)):
                return getattr(module, name)
    return None


def is_stacked(bank: nn.Module) -> bool:
    """A bank outside the ``ExpertsInterface`` whose gate, up and down weights are 2-D, expert after
    expert along the rows, with an activation (DBRX's ``w1``, ``v1``, ``w2``).
    """
    return not hasattr(bank, "has_gate") and _activation(bank) is not None


def _stacked_bank(bank: nn.Module) -> Bank:
    """Layout of a stacked bank: gate, up, down ``[n_experts · d_expert, d]`` in registration order."""
    (gate, weight), (up, _), (down, _) = _stacked_weights(bank)
    return Bank(
        n_experts=bank.num_experts,
        d_expert=weight.shape[0] // bank.num_experts,
        has_bias=False,
        transposed=False,
        gated=True,
        stacked=(gate, up, down),
    )


def _dense_dispatch_bank(bank: nn.Module, down: torch.Tensor) -> Bank:
    """Layout of a bank outside the ``ExpertsInterface``: fused ``[gate | up]`` weights ``[E, d, 2 d_e]``
    with down weights ``[E, d_e, d]`` (transposed, used as ``x @ W``), or ``[E, 2 d_e, d]`` with
    ``[E, d, d_e]``. Discovery checks that the bank's output is what this layout computes.
    """
    if not is_dense_dispatch(bank):
        raise UnsupportedModelError(
            f"{type(bank).__name__} is neither an ExpertsInterface bank nor one with 3-D fused gate-up "
            "and down weights and an activation"
        )
    gate_up = bank.gate_up_proj
    transposed = gate_up.shape[2] == 2 * down.shape[1]  # [E, d, 2 d_e] and [E, d_e, d]
    if not transposed and gate_up.shape[1] != 2 * down.shape[2]:
        raise UnsupportedModelError(
            f"{type(bank).__name__}: gate-up weights {tuple(gate_up.shape)} and down weights "
            f"{tuple(down.shape)} do not fit one layout"
        )
    return Bank(
        n_experts=down.shape[0],
        d_expert=down.shape[1] if transposed else down.shape[2],
        has_bias=False,
        transposed=transposed,
        gated=True,
        dispatch="all",
    )


def _apply_gate(bank: nn.Module, pre: torch.Tensor) -> torch.Tensor:
    """The bank's own gating (``act(gate) ⊙ up`` of the fused ``[gate | up]`` without one)."""
    if hasattr(bank, "_apply_gate"):
        return bank._apply_gate(pre)
    gate, up = pre.chunk(2, dim=-1)
    return bank.act_fn(gate) * up


def _read_stacked(bank: nn.Module, read: Read, layout: Bank) -> list[torch.Tensor]:
    """A stacked bank's gate, up and down weights as ``[n_experts, d_expert, d]``."""
    return [read(*_owner(bank, path)).unflatten(0, (layout.n_experts, -1)) for path in layout.stacked]


def bank_inputs(
    bank: nn.Module, args: tuple, kwargs: dict
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(tokens [..., d], expert index [S, k], router weights [S, k])`` of one call of the bank; for a
    bank every token goes to (``dispatch == "all"``), ``(its input [n_experts · S, d], None, None)``.
    """
    if bank_of(bank).dispatch == "all":
        return (args[0] if args else next(iter(kwargs.values()))), None, None
    if len(args) >= 3:
        return args[0], args[1], args[2]
    names = list(inspect.signature(bank.forward).parameters)
    values = list(args) + [kwargs[name] for name in names[len(args) : 3]]
    return values[0], values[1], values[2]


def expert_values(bank: nn.Module, read: Read) -> torch.Tensor:
    """Value vectors ``[n_experts · width, d_model]`` of every routed neuron (and bias unit)."""
    layout = bank_of(bank)
    if layout.stacked:
        return _read_stacked(bank, read, layout)[2].flatten(0, 1)  # rows: expert after expert
    down = read(bank, "down_proj")
    values = down if layout.transposed else down.transpose(1, 2)  # [E, d_e, d]
    if layout.has_bias:
        values = torch.cat([values, read(bank, "down_proj_bias")[:, None, :]], dim=1)
    return values.flatten(0, 1)


def expert_coefficients(
    bank: nn.Module,
    read: Read,
    x: torch.Tensor,
    index: torch.Tensor | None,
    weights: torch.Tensor | None,
) -> torch.Tensor:
    """Coefficients ``[S, n_experts · width]`` of the routed neurons for ``S`` tokens ``x [..., d]`` sent
    to experts ``index [S, k]`` with router weights ``weights [S, k]`` (as the bank received them); for a
    bank that every token goes to (``dispatch == "all"``), ``x [n_experts · S, d]`` is its input (router
    weights applied) and ``index`` and ``weights`` are not used.
    """
    layout = bank_of(bank)
    hidden = _expert_function(bank, read, layout)
    if layout.dispatch == "all":
        per_expert = x.unflatten(0, (layout.n_experts, -1))  # [E, S, d], expert after expert
        coeffs = x.new_zeros(per_expert.shape[1], layout.n_experts, layout.width)
        for expert in range(layout.n_experts):
            coeffs[:, expert] = hidden(expert, per_expert[expert])
        return coeffs.flatten(1)
    x = x.reshape(-1, x.shape[-1])
    coeffs = x.new_zeros(x.shape[0], layout.n_experts, layout.width)
    for expert in torch.unique(index).tolist():
        if not 0 <= expert < layout.n_experts:  # padding index of some routers
            continue
        rows, slot = torch.where(index == expert)
        values = hidden(expert, x[rows])
        scale = weights[rows, slot].to(values.dtype)
        coeffs[rows, expert, : layout.d_expert] = values * scale[:, None]
        if layout.has_bias:
            coeffs[rows, expert, layout.d_expert] = scale
    return coeffs.flatten(1)


def _expert_function(bank: nn.Module, read: Read, layout: Bank) -> Callable:
    """``hidden(expert, x [n, d]) -> [n, d_expert]``: one expert's neuron values (router weight not
    applied), from the bank's weights as ``layout`` reads them.
    """
    if layout.stacked:
        gate, up, _ = _read_stacked(bank, read, layout)  # [E, d_e, d] each
        act = _activation(bank)
        return lambda expert, x: act(x @ gate[expert].T) * (x @ up[expert].T)
    name = "gate_up_proj" if layout.gated else "up_proj"
    weight, bias = read(bank, name), read(bank, f"{name}_bias") if layout.has_bias else None

    def hidden(expert: int, x: torch.Tensor) -> torch.Tensor:
        w = weight[expert]
        pre = x @ w if layout.transposed else x @ w.T
        pre = pre if bias is None else pre + bias[expert]
        return _apply_gate(bank, pre) if layout.gated else bank.act_fn(pre)

    return hidden
