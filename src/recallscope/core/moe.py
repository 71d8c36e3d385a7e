"""The ``mlp_post`` site of a mixture-of-experts block: neuron coefficients with the router weight.

``mlp_post`` of a dense MLP is the input of its down projection. A mixture-of-experts block has one
down projection per expert and a router in between, so its coefficients (``models.experts``: every
expert's neurons times the router weight, zero for the experts the router did not pick, then the
shared expert's) are computed from what the block's modules receive in the real forward: the
tokens and routing the experts bank is called with, the shared expert's neuron values and its
gate. A hook that returns new coefficients replaces the block's output by ``coefficients @ W_out``,
which is the output itself when they are unchanged (up to rounding)::

    with moe_post_hook(model, layer, fn):     # fn(coeffs [B, T, d_mlp]) -> None | new coeffs
        logits = forward(model, batch)
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator

import torch
from torch import nn

from recallscope.core.dtypes import compute_dtype
from recallscope.core.hooks import module_hook
from recallscope.models.experts import bank_inputs, expert_coefficients
from recallscope.models.model import Model

__all__ = ["moe_post_hook", "moe_coefficients"]


# MoE block -> the functions registered on its coefficients, in registration order
_HOOKS: weakref.WeakKeyDictionary[nn.Module, list] = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def moe_post_hook(model: Model, layer: int, fn: Callable) -> Iterator[None]:
    """Call ``fn`` with the coefficients ``[B, T, d_mlp]`` of block ``layer``'s experts each forward;
    if it returns new ones, the block's output becomes ``new @ W_out``.

    Several hooks on one block see the coefficients one after the other, in the order they were
    registered, each seeing the edits of those before it (as hooks on a dense MLP's input do).
    """
    block = model.module(model.spec.at(layer).mlp, layer)
    entries = _HOOKS.setdefault(block, [])
    entries.append(fn)
    try:
        if len(entries) == 1:
            with _dispatcher(model, layer, entries):
                yield
        else:
            yield
    finally:
        entries.remove(fn)


@contextlib.contextmanager
def _dispatcher(model: Model, layer: int, entries: list) -> Iterator[None]:
    """The hooks that capture what the block's modules receive, compute the coefficients once per
    forward, run every registered function on them and rewrite the output when one edits them.
    """
    spec, home = model.spec.at(layer), model.device
    bank = model.module(spec.experts, layer)
    seen: dict[str, torch.Tensor] = {}
    inner_norm = model.module(spec.mlp_post_norm, layer) if spec.mlp_post_norm_inside else None

    def tokens(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        seen["shape"] = x.shape

    def rewrite(module, args, kwargs, output):
        coeffs = _coefficients(model, spec, layer, bank, seen)  # [S, d_mlp]
        clean = coeffs = coeffs.reshape(*seen["shape"][:-1], -1).to(home)
        for fn in list(entries):
            new = fn(coeffs)
            coeffs = coeffs if new is None else new.to(home)
        if coeffs is clean:
            return None
        out = output[0] if isinstance(output, tuple) else output
        values = model.W_out(layer).to(out.device, compute_dtype(out.dtype))
        delta = (coeffs - clean).to(values.device, values.dtype) @ values  # only the edited neurons
        if inner_norm is None:
            new_out = (out + delta.reshape(out.shape).to(out.dtype)).to(out.dtype)
        else:  # the block normalizes its experts' sum itself (AXK1): edit the sum, then normalize
            new_out = inner_norm(seen["sum"] + delta.reshape(seen["sum"].shape).to(out.dtype))
        return (new_out, *output[1:]) if isinstance(output, tuple) else new_out

    def experts_sum(module, args, kwargs):
        seen["sum"] = args[0] if args else kwargs["hidden_states"]

    block = model.module(spec.mlp, layer)
    with contextlib.ExitStack() as stack:
        stack.enter_context(module_hook(block, tokens, "pre"))
        _capture(model, spec, layer, seen, stack)
        if inner_norm is not None:
            stack.enter_context(module_hook(inner_norm, experts_sum, "pre"))
        # first among the block's output hooks: an mlp_out hook then sees the edited output, as it
        # does when a dense MLP's coefficients are edited at its down projection
        stack.enter_context(module_hook(block, rewrite, "fwd", prepend=True))
        yield


def moe_coefficients(model: Model, layer: int, normed: torch.Tensor) -> torch.Tensor:
    """Coefficients ``[N, d_mlp]`` of block ``layer``'s experts for inputs ``normed [N, d_model]``
    (what the block receives after its norm), computed by running the block: differentiable with
    respect to ``normed`` through the router weights and every expert (for linearized keys).
    """
    spec = model.spec.at(layer)
    seen: dict[str, torch.Tensor] = {}
    with contextlib.ExitStack() as stack:
        _capture(model, spec, layer, seen, stack)
        model.module(spec.mlp, layer)(normed[:, None, :].to(model.dtype))
    return _coefficients(model, spec, layer, model.module(spec.experts, layer), seen)


def _capture(model: Model, spec, layer: int, seen: dict, stack: contextlib.ExitStack) -> None:
    """Hooks that keep, in ``seen``, what the experts bank is called with (``bank``: tokens, expert
    index, router weights) and the shared expert's neuron values (``shared``) and gate (``gate``).
    """

    def routed(module, args, kwargs):
        seen["bank"] = bank_inputs(module, args, kwargs)

    def shared_values(module, args, kwargs):
        seen["shared"] = args[0] if args else kwargs["input"]

    def shared_gate(module, args, kwargs, output):
        seen["gate"] = torch.sigmoid(output)

    stack.enter_context(module_hook(model.module(spec.experts, layer), routed, "pre"))
    if spec.shared_expert_down is not None:
        down = model.module(spec.shared_expert_down, layer)
        stack.enter_context(module_hook(down, shared_values, "pre"))
    if spec.shared_expert_gate is not None:
        gate = model.module(spec.shared_expert_gate, layer)
        stack.enter_context(module_hook(gate, shared_gate, "fwd"))


def _coefficients(model: Model, spec, layer: int, bank, seen: dict) -> torch.Tensor:
    """Coefficients ``[S, d_mlp]`` of the tokens the bank saw: routed experts' neurons, then the
    shared expert's, then zeros up to the model's ``d_mlp`` (a block with fewer neurons).
    """
    x, index, weights = seen["bank"]
    dtype = compute_dtype(x.dtype)
    routed = expert_coefficients(bank, model.tensor, x.to(dtype), index, weights)
    parts = [routed if spec.routed_scale == 1.0 else routed * spec.routed_scale]
    n_tokens = routed.shape[0]
    if spec.shared_expert_down is not None:
        values = seen["shared"].reshape(n_tokens, -1).to(dtype)
        down = model.module(spec.shared_expert_down, layer)
        gate = (
            seen["gate"].reshape(n_tokens, 1).to(dtype) if "gate" in seen else torch.ones_like(values[:, :1])
        )
        parts.append(values * gate)
        if down.bias is not None:
            parts.append(gate)
    size = sum(part.shape[-1] for part in parts)
    parts.append(x.new_zeros(n_tokens, model.d_mlp - size, dtype=dtype))
    return torch.cat(parts, dim=-1)
