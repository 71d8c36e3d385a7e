"""Naive sublayer knockout, straight from ``methods.md`` G3: one unpadded forward per fact × sublayer × start.

The attributes rate is computed here with plain Python on decoded strings (not with
``clean_top_tokens`` / ``attributes_rate``).
"""

from __future__ import annotations

import contextlib

import torch

import recallscope as rs
from recallscope.core.attention import pattern_hook
from recallscope.core.attributes import STOPWORDS
from recallscope.core.hooks import site_hook


def _zeros(act):
    return torch.zeros_like(act)


def _causal_uniform(probs):
    """Every query attends equally to itself and all earlier positions (no padding here)."""
    n = probs.shape[-1]
    weights = torch.zeros(n, n, dtype=probs.dtype)
    for q in range(n):
        weights[q, : q + 1] = 1.0 / (q + 1)
    return weights.to(probs.device).expand_as(probs)


def knockout_hooks(model, layers, sublayer: str, mode: str) -> contextlib.ExitStack:
    """Hooks removing ``sublayer`` in every block of ``layers``, at all positions."""
    stack = contextlib.ExitStack()
    for layer in layers:
        if sublayer == "attn" and mode == "as_coded":
            stack.enter_context(pattern_hook(model, layer, _causal_uniform))
        else:
            name = {"mlp": {"zero": "mlp_out", "as_coded": "mlp_post"}, "attn": {"zero": "attn_out"}}
            stack.enter_context(site_hook(model, rs.Site(layer, name[sublayer][mode]), _zeros))
    return stack


def naive_state(model, ids: torch.Tensor, position: int, target_layer: int, layers, sublayer, mode):
    """``resid_post[target_layer]`` at ``position`` with ``sublayer`` removed in ``layers``."""
    seen = {}

    def keep(act):
        seen["state"] = act[0, position].clone()

    with knockout_hooks(model, layers, sublayer, mode):
        with site_hook(model, rs.Site(target_layer, "resid_post"), keep):
            rs.forward(model, ids[None])
    return seen["state"]


def naive_logits(model, state: torch.Tensor, how: str) -> torch.Tensor:
    """``E·h``, ``W_U·h`` or the logit lens ``W_U·FinalNorm(h) + b_U``."""
    if how == "raw_embed":
        return model.W_E @ state
    if how == "raw":
        return model.W_U @ state
    normed = model.module(model.spec.final_norm)(state[None, None])[0, 0]
    logits = model.W_U @ normed
    return logits if model.b_U is None else logits + model.b_U


def _is_clean(text: str, min_length: int, lowercase: bool) -> bool:
    word = text.strip()
    return len(word) >= min_length and (word.lower() if lowercase else word) not in STOPWORDS


def naive_top(model, logits: torch.Tensor, top_k: int, keep: int, min_length: int) -> list[str]:
    """The first ``keep`` clean strings among the ``top_k`` best tokens."""
    order = torch.argsort(logits, descending=True)[:top_k].tolist()
    known = len(model.tokenizer)  # ids past the tokenizer (padded embedding rows) decode to ""
    strings = [model.tokenizer.decode([i]) if i < known else "" for i in order]
    return [s for s in strings if _is_clean(s, min_length, True)][:keep]


def naive_references(model, texts, min_length: int, lowercase: bool) -> set[str]:
    refs = set()
    for text in texts:
        for i in model.tokenizer(text, add_special_tokens=False)["input_ids"]:
            refs.add(model.tokenizer.decode([i]))
    return {s for s in refs if _is_clean(s, min_length, lowercase)}


def naive_rate(top: list[str], refs: set[str]) -> float:
    if not refs or not top:
        return float("nan")
    return 100.0 * sum(1 for s in top if s in refs) / len(top)


def naive_state_rate(model, state: torch.Tensor, refs: set[str], config) -> tuple[float, int]:
    """``(AR, clean top tokens kept)`` of one hidden state with ``config``'s readout and filter."""
    logits = naive_logits(model, state, config.readout)
    top = naive_top(model, logits, config.top_k, config.keep, config.min_length)
    return naive_rate(top, refs), len(top)


def naive_window(start: int, size: int, target_layer: int) -> list[int]:
    return [layer for layer in range(start, start + size) if layer <= target_layer]
