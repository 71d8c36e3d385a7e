"""Naive causal tracing, straight from ROME / methods.md Y2: one forward per (kind, position, layer).

Batch of 1 + S copies, row 0 clean, rows 1..S with the same Gaussian noise on the corrupted span;
restore the clean state (row 0 of the same forward) into rows 1..S at one position, for the layer
(hidden) or every layer of the window (mlp/attn); score = mean over rows 1..S of P(target) at the
last position. Deliberately slow and simple: it is the reference the fast version must match.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

import recallscope as rs
from recallscope import Site

SITE = {"hidden": "resid_post", "mlp": "mlp_out", "attn": "attn_out"}


def _restore_from_row0(position):
    def edit(act):
        act = act.clone()
        act[1:, position] = act[0, position]
        return act

    return edit


def naive_cell(model, ids, span, target, *, samples, noise, seed=1, restore=(), site=None, position=None):
    """One forward of ROME's loop: (mean score of the noised rows, clean score).

    ``target`` is one token id (score = probability at the last position) or a list of answer
    tokens (score = summed log-probability of the answer, teacher-forced).
    """
    answer = list(target) if isinstance(target, (list, tuple)) and len(target) > 1 else None
    token = None if answer else (target[0] if isinstance(target, (list, tuple)) else target)
    full = torch.cat([ids, torch.tensor(answer[:-1])]) if answer else ids
    batch = full[None].expand(samples + 1, -1)
    vectors = np.random.RandomState(seed).randn(samples, span[1] - span[0], model.d_model)
    noise_t = torch.from_numpy(noise * vectors).to(model.dtype)
    rows = torch.arange(1, samples + 1)
    positions = torch.arange(span[0], span[1]).expand(samples, -1)
    with contextlib.ExitStack() as stack:
        stack.enter_context(rs.add_noise(model, noise_t, rows, positions))
        for layer in restore:
            stack.enter_context(rs.site_hook(model, Site(layer, site), _restore_from_row0(position)))
        logits = rs.forward(model, batch, logits="all").double()
    if answer:
        logprobs = logits[:, -len(answer) :].log_softmax(-1)
        scores = logprobs[:, torch.arange(len(answer)), torch.tensor(answer)].sum(-1)
    else:
        scores = logits[:, -1].softmax(-1)[:, token]
    return float(scores[1:].mean()), float(scores[0])


def window_layers(kind, layer, window, n_layers):
    if kind == "hidden":
        return [layer]
    return list(range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2))))


def naive_trace(model, ids, span, target, *, kinds, samples, noise, window, seed=1):
    """ids [T]; span (b, e); target -> {kind: scores [T, L]}, low, high."""
    common = dict(samples=samples, noise=noise, seed=seed)
    low, high = naive_cell(model, ids, span, target, **common)
    scores = {}
    for kind in kinds:
        grid = np.zeros((len(ids), model.n_layers))
        for t in range(len(ids)):
            for layer in range(model.n_layers):
                layers = window_layers(kind, layer, window, model.n_layers)
                grid[t, layer] = naive_cell(
                    model, ids, span, target, restore=layers, site=SITE[kind], position=t, **common
                )[0]
        scores[kind] = grid
    return scores, low, high
