"""Mixture-of-experts neurons by hand: one token's coefficients and every neuron's value vector.

The neuron axis is expert-major (each expert's neurons, then its bias unit when its down projection
has a bias), then the shared expert's neurons and bias unit; a coefficient is the router weight
times the expert's ``act(gate) ⊙ up`` value (zero for experts the router did not pick), the shared
expert's are ``σ(x·g)`` times its own. Written from the modules' weights, with the router and the
bank's gating function called as the model calls them.
"""

from __future__ import annotations

import torch


def _layout(bank):
    down = bank.down_proj.detach()
    d_expert = down.shape[1] if bank.is_transposed else down.shape[2]
    return down, d_expert, d_expert + int(bank.has_bias)


def coefficients(model, layer: int, normed: torch.Tensor) -> torch.Tensor:
    """``[d_mlp]`` of one token whose normed input is ``normed [d]`` (differentiable in it)."""
    spec = model.spec
    block, bank = model.module(spec.mlp, layer), model.module(spec.experts, layer)
    router = next(m for name, m in block.named_children() if name in ("gate", "router"))
    seen_route = {}  # the router as the block calls it (AFMoE hands it the expert biases)
    handle = router.register_forward_hook(lambda m, args, out: seen_route.__setitem__("out", out))
    try:
        block.forward(normed[None, None])  # forward, not __call__: hooks on the block itself stay out
    finally:
        handle.remove()
    _, weights, index = seen_route["out"]
    down, d_expert, width = _layout(bank)
    parts = [torch.zeros(width, dtype=normed.dtype) for _ in range(down.shape[0])]
    for slot in range(index.shape[-1]):
        e, w = int(index[0, slot]), weights[0, slot].to(normed.dtype)
        W = bank.gate_up_proj[e]
        pre = normed @ W if bank.is_transposed else W @ normed
        if bank.has_bias:
            pre = pre + bank.gate_up_proj_bias[e]
        h = bank._apply_gate(pre[None])[0]
        parts[e] = torch.cat([h * w, *([w[None]] if bank.has_bias else [])])
    if spec.shared_expert_down is not None:
        shared_down = model.module(spec.shared_expert_down, layer)
        shared = model.module(spec.shared_expert_down.rsplit(".", 1)[0], layer)
        seen = {}
        handle = shared_down.register_forward_pre_hook(lambda m, args: seen.__setitem__("h", args[0]))
        try:
            shared(normed[None])
        finally:
            handle.remove()
        gate = torch.ones((), dtype=normed.dtype)
        if spec.shared_expert_gate is not None:
            gate = torch.sigmoid(model.module(spec.shared_expert_gate, layer)(normed[None])[0, 0])
        parts.append(seen["h"][0] * gate)
        if shared_down.bias is not None:
            parts.append(gate[None])
    return torch.cat(parts)


def value_vector(model, layer: int, k: int) -> torch.Tensor:
    """``[d]`` the vector neuron ``k`` writes."""
    spec = model.spec
    bank = model.module(spec.experts, layer)
    down, d_expert, width = _layout(bank)
    routed = down.shape[0] * width
    if k >= routed:  # shared expert
        shared_down = model.module(spec.shared_expert_down, layer)
        j = k - routed
        if j == shared_down.weight.shape[1]:
            return shared_down.bias.detach()
        return shared_down.weight.detach()[:, j]
    e, j = divmod(k, width)
    if j == d_expert:
        return bank.down_proj_bias.detach()[e]
    return down[e, j] if bank.is_transposed else down[e, :, j]
