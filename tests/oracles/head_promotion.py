"""Naive per-head decoding (Yan & Jia Y5, ``methods.md`` §2.2): per fact, per layer, per head.

One plain HF forward of the unpadded prompt with a pre-hook on every ``o_proj`` (its input is ``z``,
heads concatenated) and a forward hook on it (its output, the attention output before Gemma-2's
post-norm). Each head's output is ``z_h`` times its block of the raw HF weight, written out by hand:
the input columns ``weight[:, h·d_h:(h+1)·d_h]`` (``Linear``; GPT-2's ``Conv1D`` stores the transpose),
or the released code's ``weight.view(H, d_h, d)[h]``. Decoded over the full vocabulary with the
frozen final-norm scale (:func:`oracles.early_decoding.frozen_decoder`), then the tokens are picked.
"""

from __future__ import annotations

import numpy as np
import torch

from oracles.early_decoding import capture, frozen_decoder


def _z_hooks(model):
    """Register hooks saving ``z`` (``o_proj`` input) and the ``o_proj`` output at the last position."""
    H, Dh, d = model.n_heads, model.d_head, model.d_model

    def hooks(stack, saved):
        for layer in range(model.n_layers):
            o_proj = model.module(model.spec.o_proj, layer)

            def pre(module, args, kwargs, layer=layer):
                x = args[0] if args else next(iter(kwargs.values()))
                saved[("z", layer)] = x.detach().reshape(-1, H * Dh)[-1]

            def post(module, args, out, layer=layer):
                saved[("pre", layer)] = out.detach().reshape(-1, d)[-1]

            stack.enter_context(o_proj.register_forward_pre_hook(pre, with_kwargs=True))
            stack.enter_context(o_proj.register_forward_hook(post))

    return hooks


def _head_output(model, weight: torch.Tensor, z: torch.Tensor, h: int, slicing: str) -> torch.Tensor:
    """``[d]`` output of head ``h`` from ``z [H·d_h]`` and the raw ``o_proj`` weight (same dtype)."""
    Dh = model.d_head
    z_h = z[h * Dh : (h + 1) * Dh]
    linear = weight.T if model.spec.conv1d else weight  # [d_out, H·d_h]
    if slicing == "input_columns":
        return linear[:, h * Dh : (h + 1) * Dh] @ z_h
    viewed = linear.contiguous().view(model.n_heads, Dh, model.d_model)  # the released code
    return (z_h[:, None] * viewed[h]).sum(0)


def _post_norm(model, layer: int, pre: torch.Tensor):
    """Gemma-2's attention post-norm linearized at the true output ``pre [d]``: ``c ↦ γ c / ρ``."""
    if model.spec.attn_post_norm is None:
        return lambda c: c
    params = model.norm_params(model.spec.attn_post_norm, layer)
    rho = torch.sqrt((pre**2).mean() + params.eps)
    gain = params.weight.to(pre.dtype)
    gain = 1 + gain if params.offset_one else gain
    return lambda c: gain * c / rho


def naive_head_logits(
    model, ids: torch.Tensor, token_ids, slicing: str = "input_columns", dtype: torch.dtype = torch.float64
):
    """``([layer, head, n] head logits, [layer, n] logits of the (post-normed) b_O)`` of ``ids [T]``,
    computed in ``dtype``."""
    saved = capture(model, ids, extra=_z_hooks(model))
    saved = {key: value.to(dtype) for key, value in saved.items()}
    decode = frozen_decoder(model, saved["final"], dtype)
    pick = lambda logits: [float(logits[int(t)]) for t in token_ids]  # noqa: E731
    heads = np.zeros((model.n_layers, model.n_heads, len(token_ids)))
    bias = np.zeros((model.n_layers, len(token_ids)))
    for layer in range(model.n_layers):
        o_proj = model.module(model.spec.o_proj, layer)
        post = _post_norm(model, layer, saved[("pre", layer)])
        for h in range(model.n_heads):
            o = _head_output(model, o_proj.weight.detach().to(dtype), saved[("z", layer)], h, slicing)
            heads[layer, h] = pick(decode(post(o)))
        if o_proj.bias is not None:
            bias[layer] = pick(decode(post(o_proj.bias.detach().to(dtype))))
    return heads, bias
