"""Naive attention knockout, straight from ``methods.md`` G1: one unpadded forward per fact × set × layer.

The oracle computes the masked attention itself. Models that call transformers' attention interface
run this module's own kernel (``q kᵀ`` scaled and soft-capped, the model's causal or sliding-window
mask, the knocked-out edges, learned sinks, ``p v``), in the inputs' dtype; models with inline
attention code (BLOOM, GPT-Neo) keep their code, and the oracle edits the scores their softmax gets
(pre-softmax) or the probabilities it returns (post-softmax). None of recallscope's knockout code
runs.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import sdpa_mask

KERNEL = "oracle_knockout"
_BLOCKED = "_oracle_blocked"  # attribute of an attention module: (mode, source positions) to cut


def source_positions(n_tokens: int, subject: tuple[int, int], source: str) -> list[int]:
    """G1's position sets in an unpadded prompt of ``n_tokens`` tokens."""
    start, end = subject
    if source == "subject":
        return list(range(start, end))
    if source == "last":
        return [n_tokens - 1]
    return [t for t in range(n_tokens - 1) if not start <= t < end]


def naive_prob(model, ids: torch.Tensor, target: int, layers: range, src: list[int], mode: str) -> float:
    """P(target) at the last position with last → ``src`` blocked in ``layers`` (all heads)."""
    with torch.no_grad(), _kernel_of(model), _blocked(model, layers, src, mode):
        logits = model.hf_model(input_ids=ids[None].to(model.device)).logits[0, -1]
    return float(logits.double().softmax(-1)[target])


def naive_window(layer: int, size: int, n_layers: int) -> range:
    """``[max(0, l - size//2), min(L, l + ceil(size/2)))``, written as the paper's code does."""
    return range(max(0, layer - size // 2), min(n_layers, layer - (-size // 2)))


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kwargs):
    """``query [B, H, Q, d]``, ``key``/``value [B, H_kv, K, d]`` → ``([B, Q, H, d], probs [B, H, Q, K])``."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = query @ key.transpose(-1, -2) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    n_query, n_key = scores.shape[-2:]
    if attention_mask is None:
        allowed = torch.ones(n_query, n_key, dtype=torch.bool, device=scores.device).tril(n_key - n_query)
    elif attention_mask.dtype == torch.bool:
        allowed = attention_mask[..., :n_key]
    else:
        allowed = attention_mask[..., :n_key] > torch.finfo(attention_mask.dtype).min / 2
    scores = scores.masked_fill(~allowed, float("-inf"))
    mode, src = getattr(module, _BLOCKED, (None, []))
    if mode == "pre_softmax":
        scores[..., -1, src] = float("-inf")
    sinks = kwargs.get("s_aux")
    if sinks is not None:  # one learned logit per head that takes probability and gives no value
        column = sinks.reshape(1, -1, 1, 1).to(scores.dtype).expand(*scores.shape[:-1], 1)
        probs = torch.cat([scores, column], -1).softmax(-1)[..., :-1]
    else:
        probs = scores.softmax(-1)
    if mode == "post_softmax_zero":
        probs[..., -1, src] = 0.0
    return (probs @ value).transpose(1, 2).contiguous(), probs


AttentionInterface.register(KERNEL, _attention)
AttentionMaskInterface.register(KERNEL, sdpa_mask)  # boolean masks, True = may attend


@contextlib.contextmanager
def _kernel_of(model):
    """Models that call the attention interface run :func:`_attention` inside."""
    config = model.hf_model.config
    old = config._attn_implementation
    if model.spec.attention_interface:
        config._attn_implementation = KERNEL
    try:
        yield
    finally:
        config._attn_implementation = old


class _InlineSoftmax(TorchFunctionMode):
    """Edits the ``[B, H, Q, K]`` softmax of inline attention code (its own dtype kept)."""

    def __init__(self, mode: str, src: list[int]) -> None:
        super().__init__()
        self.mode, self.src = mode, src

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        is_softmax = func in (torch.softmax, torch.nn.functional.softmax, torch.Tensor.softmax)
        if not is_softmax or args[0].dim() != 4:
            return func(*args, **kwargs)
        scores = args[0]
        if self.mode == "pre_softmax":
            scores = scores.clone()
            scores[..., -1, self.src] = float("-inf")
        probs = func(scores, *args[1:], **kwargs)
        if self.mode == "post_softmax_zero":
            probs = probs.clone()
            probs[..., -1, self.src] = 0.0
        return probs


@contextlib.contextmanager
def _blocked(model, layers: range, src: list[int], mode: str):
    """Mark the attention modules of ``layers``; inline ones get a softmax editor while they run."""
    modules = [model.module(model.spec.attn, layer) for layer in layers] if src else []
    handles = []
    for module in modules:
        setattr(module, _BLOCKED, (mode, src))
        if not model.spec.attention_interface:
            handles += _while_running(module, _InlineSoftmax(mode, src))
    try:
        yield
    finally:
        for module in modules:
            delattr(module, _BLOCKED)
        for handle in handles:
            handle.remove()


def _while_running(module, editor: _InlineSoftmax) -> list:
    """Hooks that keep ``editor`` active during each call of ``module``."""

    def enter(*_):
        editor.__enter__()

    def leave(*_):
        editor.__exit__(None, None, None)

    return [module.register_forward_pre_hook(enter), module.register_forward_hook(leave, always_call=True)]
