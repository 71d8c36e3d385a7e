"""Naive span knockout → MLP logits, straight from ``methods.md`` §2.2 Y4.

One unpadded prompt, batch size 1, one plain HF forward per span. The knockout is our own attention
kernel (not ``recallscope.core.attention``): it recomputes eager attention from the queries, keys
and values HF hands it and, in every layer and head, edits the last query row only —
``post_softmax_zero`` zeroes the weights of the span after the softmax (no renormalization),
``pre_softmax`` puts the minimum float on the span's scores before it. Models with inline attention
code (no attention interface) get the edit on their own softmax output, caught with a torch
function mode while each attention module runs; there ``pre_softmax`` divides the kept weights by
their sum. Every layer's MLP output at the last
position is decoded over the full vocabulary with ``W_U (γ ⊙ centre(m)) / ρ``, ``ρ`` the final
norm's scale on that run's own final residual.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import eager_mask

import recallscope as rs
from recallscope.models.sites import Site

KERNEL = "oracle_span_knockout"
_EDIT: dict = {"src": [], "mode": "post_softmax_zero", "layers": None}


def _attend(query, key, value, mask, scaling: float, softcap=None, layer: int = 0, sinks=None):
    """Eager attention ``[1, H, T, d_head]`` with the last row edited; returns ``(out, probs)``."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)  # query head h reads key/value head h // groups
    value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        mask = mask[..., : key.shape[-2]]
        scores = (
            scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            if mask.dtype == torch.bool
            else scores + mask
        )
    src = _EDIT["src"] if _EDIT["layers"] is None or layer in _EDIT["layers"] else []
    if src and _EDIT["mode"] == "pre_softmax":
        scores = scores.clone()
        for j in src:
            scores[:, :, -1, j] = torch.finfo(scores.dtype).min
    if sinks is None:
        probs = torch.softmax(scores, dim=-1)
    else:  # a learned sink logit per head joins every row's softmax, then is dropped (gpt-oss)
        sink = sinks.reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores, sink], -1), dim=-1)[..., :-1]
    if src and _EDIT["mode"] == "post_softmax_zero":
        probs = probs.clone()
        for j in src:
            probs[:, :, -1, j] = 0.0
    probs = probs.to(value.dtype)
    return torch.matmul(probs, value), probs


def _kernel(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, s_aux=None, **kwargs
):
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    out, probs = _attend(query, key, value, attention_mask, scaling, softcap, module.layer_idx, s_aux)
    return out.transpose(1, 2).contiguous(), probs


class _EditInlineSoftmax(TorchFunctionMode):
    """Edits the last query row of every ``[B, H, Q, K]`` softmax output of one layer's attention."""

    def __init__(self, layer: int) -> None:
        super().__init__()
        self.layer = layer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        softmax = func in (torch.softmax, torch.nn.functional.softmax, torch.Tensor.softmax)
        src = _EDIT["src"] if _EDIT["layers"] is None or self.layer in _EDIT["layers"] else []
        if softmax and out.dim() == 4 and src:
            out = out.clone()
            for j in src:
                out[:, :, -1, j] = 0.0
            if _EDIT["mode"] == "pre_softmax":
                out[:, :, -1] = out[:, :, -1] / out[:, :, -1].sum(-1, keepdim=True)
        return out


@contextlib.contextmanager
def _inline_edits(model):
    handles, modes = [], []

    def enter(layer):
        def pre(module, args):
            modes.append(_EditInlineSoftmax(layer))
            modes[-1].__enter__()

        return pre

    def leave(module, args, output):
        modes.pop().__exit__(None, None, None)

    for layer in range(model.n_layers):
        attn = model.module(model.spec.attn, layer)
        handles += [attn.register_forward_pre_hook(enter(layer)), attn.register_forward_hook(leave)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


AttentionInterface.register(KERNEL, _kernel)
AttentionMaskInterface.register(KERNEL, eager_mask)


@contextlib.contextmanager
def knockout(model, src: list[int], mode: str, layers=None):
    """Inside: the last position may not read positions ``src`` in any head of ``layers`` (None: all)."""
    _EDIT.update(src=list(src), mode=mode, layers=layers)
    config = model.hf_model.config
    old = config._attn_implementation
    inline = not model.spec.attention_interface
    try:
        if inline:
            with _inline_edits(model):
                yield
        else:
            config._attn_implementation = KERNEL
            yield
    finally:
        config._attn_implementation = old
        _EDIT.update(src=[], mode="post_softmax_zero", layers=None)


def _decode(model, m: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
    """``W_U (γ ⊙ centre(m)) / ρ(final)`` over the whole vocabulary (no bias)."""
    params = model.norm_params(model.spec.final_norm)
    if params.kind == "layer":
        rho = torch.sqrt(((final - final.mean()) ** 2).mean() + params.eps)
        m = m - m.mean()
    else:
        rho = torch.sqrt((final**2).mean() + params.eps)
    gain = torch.ones_like(m) if params.weight is None else params.weight.double()
    gain = 1 + gain if params.offset_one else gain
    return model.W_U.double() @ (gain * m / rho)


def naive_run(
    model, ids: torch.Tensor, src: list[int], mode: str, layers=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[L, d_vocab]`` decoded MLP outputs at the last position and the final probabilities ``[V]``
    of the prompt ``ids [T]`` with ``N → src`` knocked out in ``layers`` (``src = []``: the clean run)."""
    L = model.n_layers
    sites = [Site(layer, "mlp_out") for layer in range(L)] + [Site(L - 1, "resid_post")]
    with knockout(model, src, mode, layers):
        cache = rs.run_with_cache(model, ids[None], sites, logits="last")
    final = cache[sites[-1]][0, -1].double()
    decoded = torch.stack([_decode(model, cache[s][0, -1].double(), final) for s in sites[:-1]])
    return decoded, cache.logits[0].double().softmax(-1)


def naive_attn_out(model, ids: torch.Tensor, src: list[int], mode: str) -> torch.Tensor:
    """``[L, d]`` attention outputs at the last position with ``N → src`` knocked out."""
    sites = [Site(layer, "attn_out") for layer in range(model.n_layers)]
    with knockout(model, src, mode):
        cache = rs.run_with_cache(model, ids[None], sites)
    return torch.stack([cache[s][0, -1].double() for s in sites])
