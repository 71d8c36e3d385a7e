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
import inspect
from collections.abc import Callable, Iterator

import torch

from recallscope.core.hooks import module_hook
from recallscope.models.experts import expert_coefficients
from recallscope.models.model import Model

__all__ = ["moe_post_hook"]


def _bank_inputs(bank, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(tokens [S, d], expert index [S, k], router weights [S, k])`` of one call of the bank."""
    if len(args) >= 3:
        return args[0], args[1], args[2]
    names = list(inspect.signature(bank.forward).parameters)
    values = list(args) + [kwargs[name] for name in names[len(args) : 3]]
    return values[0], values[1], values[2]


@contextlib.contextmanager
def moe_post_hook(model: Model, layer: int, fn: Callable) -> Iterator[None]:
    """Call ``fn`` with the coefficients ``[B, T, d_mlp]`` of block ``layer``'s experts each forward;
    if it returns new ones, the block's output becomes ``new @ W_out``.
    """
    spec, home = model.spec.at(layer), model.device
    bank = model.module(spec.experts, layer)
    seen: dict[str, torch.Tensor] = {}
    inside = spec.mlp_post_norm is not None and spec.mlp_post_norm.startswith(f"{spec.mlp}.")
    inner_norm = model.module(spec.mlp_post_norm, layer) if inside else None

    def tokens(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        seen["shape"] = x.shape

    def routed(module, args, kwargs):
        seen["bank"] = _bank_inputs(module, args, kwargs)

    def shared_values(module, args, kwargs):
        seen["shared"] = args[0] if args else kwargs["input"]

    def shared_gate(module, args, kwargs, output):
        seen["gate"] = torch.sigmoid(output)

    def rewrite(module, args, kwargs, output):
        coeffs = _coefficients(model, spec, layer, bank, seen)  # [S, neurons of this block]
        size, shape = coeffs.shape[-1], seen["shape"]
        coeffs = torch.cat([coeffs, coeffs.new_zeros(coeffs.shape[0], model.d_mlp - size)], -1)  # padding
        new = fn(coeffs.reshape(*shape[:-1], -1).to(home))
        if new is None:
            return None
        raw = output[0] if isinstance(output, tuple) else output
        values = model.W_out(layer).to(raw.device, torch.promote_types(raw.dtype, torch.float32))
        out = (new.to(values.device, values.dtype) @ values).to(raw.dtype).reshape(raw.shape)
        if inner_norm is not None:  # the block normalizes its experts' sum itself (AXK1)
            out = inner_norm(out)
        return (out, *output[1:]) if isinstance(output, tuple) else out

    with contextlib.ExitStack() as stack:
        block = model.module(spec.mlp, layer)
        stack.enter_context(module_hook(block, tokens, "pre"))
        stack.enter_context(module_hook(bank, routed, "pre"))
        if spec.shared_expert_down is not None:
            stack.enter_context(
                module_hook(model.module(spec.shared_expert_down, layer), shared_values, "pre")
            )
        if spec.shared_expert_gate is not None:
            stack.enter_context(module_hook(model.module(spec.shared_expert_gate, layer), shared_gate, "fwd"))
        stack.enter_context(module_hook(block, rewrite, "fwd"))
        yield


def _coefficients(model: Model, spec, layer: int, bank, seen: dict) -> torch.Tensor:
    x, index, weights = seen["bank"]
    dtype = torch.promote_types(x.dtype, torch.float32)
    parts = [expert_coefficients(bank, model.tensor, x.to(dtype), index, weights)]
    if spec.shared_expert_down is not None:
        values = seen["shared"].reshape(x.shape[0], -1).to(dtype)
        down = model.module(spec.shared_expert_down, layer)
        gate = (
            seen["gate"].reshape(x.shape[0], 1).to(dtype)
            if "gate" in seen
            else torch.ones_like(values[:, :1])
        )
        parts.append(values * gate)
        if down.bias is not None:
            parts.append(gate)
    return torch.cat(parts, dim=-1)
