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


def naive_trace(model, ids, span, target, *, kinds, samples, noise, window, seed=1):
    """ids [T]; span (b, e); target token id -> {kind: scores [T, L]}, low, high."""
    n_layers = model.n_layers
    batch = ids[None].expand(samples + 1, -1)
    vectors = np.random.RandomState(seed).randn(samples, span[1] - span[0], model.d_model)
    noise_t = torch.from_numpy(noise * vectors).to(model.dtype)
    rows = torch.arange(1, samples + 1)
    positions = torch.arange(span[0], span[1]).expand(samples, -1)

    def run(restore_layers=(), site=None, position=None):
        with contextlib.ExitStack() as stack:
            stack.enter_context(rs.add_noise(model, noise_t, rows, positions))
            for layer in restore_layers:
                stack.enter_context(rs.site_hook(model, Site(layer, site), _restore_from_row0(position)))
            logits = rs.forward(model, batch, logits="all")[:, -1].double()
        probs = logits.softmax(-1)[:, target]
        return float(probs[1:].mean()), float(probs[0])

    low, high = run()
    scores = {}
    for kind in kinds:
        grid = np.zeros((len(ids), n_layers))
        for t in range(len(ids)):
            for layer in range(n_layers):
                if kind == "hidden":
                    layers = [layer]
                else:
                    layers = range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))
                grid[t, layer] = run(layers, SITE[kind], t)[0]
        scores[kind] = grid
    return scores, low, high
