"""Naive neuron ablation, straight from ``methods.md`` Y&A-7: one unpadded prompt, plain hooks, loops.

FFN neurons are zeroed by a hook on ``mlp_post``; attention units are removed by recomputing the
attention output at the last position by hand from the live probabilities and values.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

import recallscope as rs
from recallscope.core.attention import pattern_hook


def naive_metrics(logits: torch.Tensor, target: int) -> dict[str, float]:
    """``mrr = 1/(rank+1)`` (rank = tokens with a strictly larger logit), ``prob``, ``logprob``."""
    logits = logits.double()
    rank = sum(1 for value in logits.tolist() if value > float(logits[target]))
    logprob = float(torch.log_softmax(logits, -1)[target])
    return {"mrr": 1.0 / (rank + 1), "prob": float(np.exp(logprob)), "logprob": logprob}


def naive_ablate(model, ids: torch.Tensor, target: int, ffn=(), attn=()) -> dict[str, float]:
    """Metrics of ``target`` with neurons ``(layer, k)`` and units ``(layer, head, dim, src)`` removed at N.

    ``ids [T]`` is one unpadded prompt; ``src`` indexes it.
    """
    with contextlib.ExitStack() as stack:
        for layer in sorted({unit[0] for unit in ffn}):
            neurons = [k for at, k in ffn if at == layer]
            stack.enter_context(rs.site_hook(model, rs.Site(layer, "mlp_post"), _zero(neurons)))
        for layer in sorted({u[0] for u in attn}):
            units = {tuple(u[1:]) for u in attn if u[0] == layer}
            _by_hand(model, layer, units, stack)
        logits = rs.forward(model, ids[None])[0]
    return naive_metrics(logits, target)


def _zero(neurons):
    def edit(act):
        act = act.clone()
        for k in neurons:
            act[0, -1, k] = 0.0
        return act

    return edit


def _by_hand(model, layer: int, units: set, stack: contextlib.ExitStack) -> None:
    """Replace ``attn_out[layer]`` at N by ``Σ_{h,n} (Σ_{j kept} α_{hj} v_{j,kv(h),n}) W_O[h,n] + b_O``."""
    live = {}

    def keep_v(v):
        live["v"] = v[0]  # [T, H_kv, d_head]

    def keep_pattern(pattern):
        live["alpha"] = pattern[0, :, -1]  # [H, T]

    def recompute(out):  # [1, T, d]
        if live.get("busy"):  # the post-norm called below is the hooked module itself
            return None
        v, alpha, W_O = live["v"], live["alpha"], model.W_O(layer)
        b_O = model.b_O(layer)
        pre = torch.zeros(model.d_model, dtype=out.dtype) if b_O is None else b_O.clone()
        for h in range(model.n_heads):
            for n in range(model.d_head):
                z, mix = 0.0, 0.0
                for j in range(v.shape[0]):
                    term = alpha[h, j] * v[j, h // (model.n_heads // v.shape[1]), n]
                    mix = mix + term
                    if (h, n, j) not in units:
                        z = z + term
                if model.spec.attn_output_gate:  # z = g ⊙ mix: the clean gate g = z / mix, frozen
                    z = z * (live["z"][h, n] / mix if mix != 0 else 0.0)
                pre = pre + z * W_O[h, n]
        if model.spec.attn_post_norm is not None:
            live["busy"] = True  # the model's own norm (HF computes it in fp32)
            pre = model.module(model.spec.attn_post_norm, layer)(pre[None, None])[0, 0]
            live["busy"] = False
        out = out.clone()
        out[0, -1] = pre
        return out

    stack.enter_context(rs.site_hook(model, rs.Site(layer, "v"), keep_v))
    stack.enter_context(pattern_hook(model, layer, keep_pattern))
    stack.enter_context(rs.site_hook(model, rs.Site(layer, "z"), lambda z: live.update(z=z[0, -1])))
    stack.enter_context(rs.site_hook(model, rs.Site(layer, "attn_out"), recompute))


def naive_zero_head(model, ids: torch.Tensor, target: int, layer: int, head: int) -> dict[str, float]:
    """Metrics with head ``head``'s ``z`` at the last position set to 0."""

    def edit(z):
        z = z.clone()
        z[0, -1, head] = 0.0
        return z

    with rs.site_hook(model, rs.Site(layer, "z"), edit):
        logits = rs.forward(model, ids[None])[0]
    return naive_metrics(logits, target)


def naive_target_rank(model, vector: torch.Tensor, target: int, sign: int) -> int:
    """Rank of ``target`` in ``sign · W_U (γ ⊙ centre(w))`` (the final norm's linear part)."""
    params = model.norm_params(model.spec.final_norm)
    x = vector.double()
    if params.kind == "layer":
        x = x - x.mean()
    gain = params.gain(torch.float64, x.device)
    x = x if gain is None else x * gain
    scores = (sign * (model.W_U.double() @ x)).tolist()
    return sum(1 for s in scores if s > scores[target])
