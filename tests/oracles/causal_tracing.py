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


def _copy_rows(pairs, position):
    """Site edit: row ``dst`` gets row ``src``'s value at ``position`` for every ``(dst, src)``."""

    def edit(act):
        act = act.clone()
        for dst, src in pairs:
            act[dst, position] = act[src, position]
        return act

    return edit


def naive_patch(model, clean_ids, corrupt_ids, *, direction, target, counter=None, noise=None, span=None,
                restore=(), site=None, position=None):  # fmt: skip
    """One forward of the naive loop in either direction; every metric averaged over the patched rows.

    ``corrupt_ids [S, T]`` are the corrupted rows (``noise [S, P, d]`` added on ``span`` while they
    run, when given). Denoising: rows 1..S corrupted, row 0 clean, rows 1..S get row 0's state at
    ``position``. Noising: rows 0..S-1 clean, rows S..2S-1 corrupted, clean row i gets corrupted row
    i's state. Metrics from the last position's logits, in float64, written out here.
    """
    n = corrupt_ids.shape[0]
    clean = clean_ids[None]
    if direction == "denoising":
        batch, bad_rows, measured = torch.cat([clean, corrupt_ids]), torch.arange(1, n + 1), range(1, n + 1)
        pairs = [(r, 0) for r in range(1, n + 1)]
    else:
        batch, bad_rows, measured = (
            torch.cat([clean.expand(n, -1), corrupt_ids]),
            torch.arange(n, 2 * n),
            range(n),
        )
        pairs = [(i, n + i) for i in range(n)]
    with contextlib.ExitStack() as stack:
        if noise is not None:
            positions = torch.arange(span[0], span[1]).expand(n, -1)
            stack.enter_context(rs.add_noise(model, noise.to(model.dtype), bad_rows, positions))
        for layer in restore:
            stack.enter_context(rs.site_hook(model, Site(layer, site), _copy_rows(pairs, position)))
        logits = rs.forward(model, batch, logits="all")[:, -1].double()
    reference = rs.forward(model, clean, logits="all")[0, -1].double()
    return _metrics(logits[list(measured)], reference, target, counter)


def _metrics(logits, reference, target, counter):
    """Mean over rows of P, log P, logit difference and KL(clean || row), from ``logits [R, V]``."""
    logprobs = logits - torch.logsumexp(logits, -1, keepdim=True)
    clean = reference - torch.logsumexp(reference, -1)
    kl = (clean.exp()[None] * (clean[None] - logprobs)).sum(-1)
    out = {
        "prob": float(logprobs[:, target].exp().mean()),
        "logprob": float(logprobs[:, target].mean()),
        "kl": float(kl.mean()),
        "logit_diff": float("nan")
        if counter is None
        else float((logits[:, target] - logits[:, counter]).mean()),
    }
    return out
