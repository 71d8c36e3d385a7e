"""Naive attention knockout, straight from ``methods.md`` G1: one unpadded forward per fact × set × layer."""

from __future__ import annotations

import torch

import recallscope as rs


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
    knockouts = [rs.Knockout(layers=list(layers), src=src, dst=[-1])] if src else []
    with rs.block_attention(model, knockouts, mode):
        logits = rs.forward(model, ids[None])
    return float(logits[0].double().softmax(-1)[target])


def naive_window(layer: int, size: int, n_layers: int) -> range:
    """``[max(0, l - size//2), min(L, l + ceil(size/2)))``, written as the paper's code does."""
    return range(max(0, layer - size // 2), min(n_layers, layer - (-size // 2)))
