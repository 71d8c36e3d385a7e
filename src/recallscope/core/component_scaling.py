"""Scaling one component's output per batch row, on runs resumed from a recording (Lv et al. 2024,
``methods.md`` L7: a label-free down-weighting of one component).

A cell ``(component, scale)`` multiplies a :class:`~recallscope.core.component_attribution.Component`'s
output by ``scale`` in a real forward (a head: its ``z`` slice, so a post-norm sees the change; the
MLP: ``mlp_out``; a neuron: its ``mlp_post`` coefficient), at every position of the forward:

- :func:`check_scales`: a valid grid of scales;
- :func:`scale_components`: the hooks, one cell (or None) per batch row;
- :class:`RecordedChunk` / :func:`slim_run_state`: prompts of one token length recorded once
  (:func:`~recallscope.core.resume.record_run`), keeping only what resuming the last blocks reads;
- :func:`resumed_logits`: last-position logits of chosen rows resumed with their cells (exact);
- :func:`prediction_scores`: probability, log-probability, top-1 correctness and confidence of a target;
- :func:`fit_scale_grid`: the mean train log-probability of every candidate × scale, and the best cell
  when it beats the unscaled model; :func:`scaled_scores`: every row's scores with one cell applied::

    with scale_components(model, [(Component("head", 11, 3), 0.5)] * len(batch)):
        logits = forward(model, batch)
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from recallscope.core.component_attribution import Component
from recallscope.core.dtypes import upcast
from recallscope.core.hooks import site_hook
from recallscope.core.resume import RunState, resume
from recallscope.errors import RecallscopeError
from recallscope.models.model import Model
from recallscope.models.sites import Site

__all__ = [
    "is_finite_number",
    "check_scales",
    "RecordedChunk",
    "slim_run_state",
    "prediction_scores",
    "scale_components",
    "resumed_logits",
    "fit_scale_grid",
    "scaled_scores",
]


def is_finite_number(value) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_scales(scales) -> tuple[float, ...]:
    """``scales`` as distinct floats ≥ 0 without 1 (the unscaled model, always the baseline)."""
    if isinstance(scales, str | float | int) or not scales:
        raise RecallscopeError(
            f"scales must be a non-empty tuple of numbers, got {scales!r}; e.g. (0.0, 0.5)"
        )
    if not all(is_finite_number(s) and s >= 0 for s in scales):
        raise RecallscopeError(f"scales must be finite numbers ≥ 0, got {scales!r}")
    out = tuple(float(s) for s in scales)
    if 1.0 in out:
        raise RecallscopeError(
            f"scales must not contain 1 (the clean model, always the baseline), got {scales!r}"
        )
    if len(set(out)) != len(out):
        raise RecallscopeError(f"scales repeat a value: {scales!r}")
    return out


@dataclass
class RecordedChunk:
    """Facts of one token length, recorded once (rows index the dataset batch)."""

    rows: np.ndarray
    state: RunState
    hidden: torch.Tensor
    """``[R, T - start_pos, d]`` input of the first candidate layer at the resumed positions."""
    targets: torch.Tensor


def slim_run_state(state: RunState, start_layer: int, start_pos: int) -> RunState:
    """What :func:`resume` reads of ``state``: the key/value prefix of the resumed layers (zeros that
    take no memory stand in for the skipped layers, which never read their cache).
    """

    def prefix(x: torch.Tensor, layer: int) -> torch.Tensor:
        if layer >= start_layer:
            return x[:, :, :start_pos].clone()
        return x.new_zeros(()).expand(x.shape[0], x.shape[1], start_pos, x.shape[3])

    keys = [prefix(k, i) for i, k in enumerate(state.keys)]
    values = [prefix(v, i) for i, v in enumerate(state.values)]
    stream = state.stream.new_zeros(()).expand(state.stream.shape[0], 1, state.seq_len, 1)  # seq_len only
    return dataclasses.replace(state, stream=stream, keys=keys, values=values, logits=state.logits[:, :0])


def prediction_scores(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, np.ndarray]:
    """``prob``, ``log_prob`` of the target, ``correct`` (top-1 is the target), ``confidence``."""
    logp = upcast(logits).log_softmax(-1)
    picked = logp.gather(-1, targets.to(logp.device).long()[:, None])[:, 0]
    top, argmax = logp.max(-1)
    return {
        "prob": picked.exp().cpu().double().numpy(),
        "log_prob": picked.cpu().double().numpy(),
        "correct": (argmax.cpu() == targets.cpu()).double().numpy(),
        "confidence": top.exp().cpu().double().numpy(),
    }


@contextlib.contextmanager
def scale_components(model: Model, cells: Sequence[tuple[Component, float] | None]) -> Iterator[None]:
    """Multiply each row's component by its scale (rows without a cell unchanged), at every position
    of the forward (the resumed positions, or the whole text).
    """
    n = len(cells)
    mults: dict[tuple[str, int], torch.Tensor] = {}
    widths = {"z": model.n_heads, "mlp_out": 1, "mlp_post": model.d_mlp}
    sites = {"head": "z", "mlp": "mlp_out", "neuron": "mlp_post"}
    for row, cell in enumerate(cells):
        if cell is None:
            continue
        component, scale = cell
        site = sites[component.kind]
        key = (site, component.layer)
        if key not in mults:
            mults[key] = torch.ones(n, widths[site], dtype=torch.float64)
        mults[key][row, max(component.index, 0)] = scale

    def hook(site: str, mult: torch.Tensor):
        def scale(act: torch.Tensor) -> torch.Tensor:
            m = mult.to(device=act.device, dtype=act.dtype)
            view = m[:, None, :, None] if site == "z" else m[:, None, :]  # z: [R, P, H, d_h]
            return act * view

        return scale

    with contextlib.ExitStack() as stack:
        for (site, layer), mult in mults.items():
            stack.enter_context(site_hook(model, Site(layer, site), hook(site, mult)))
        yield


def resumed_logits(
    model: Model, chunk: RecordedChunk, rows: np.ndarray, cells: Sequence, start_layer: int
) -> torch.Tensor:
    """Last-position logits ``[R', V]`` of ``chunk`` rows resumed at ``start_layer`` with ``cells``."""
    index = torch.as_tensor(rows, dtype=torch.long)
    start_pos = chunk.state.seq_len - chunk.hidden.shape[1]
    with scale_components(model, cells):
        out = resume(
            model,
            chunk.state,
            index,
            start_layer=start_layer,
            start_pos=start_pos,
            hidden=chunk.hidden[index],
        )
    return upcast(out[:, -1])


def fit_scale_grid(model, chunks, train, before, candidates, start_layer, config):
    """The train grid (one row per candidate × scale) and the chosen ``(component, scale)`` or None."""
    cells = [(component, scale) for component, _ in candidates for scale in config.scales]
    # cell 0 = no intervention, resumed like the others (equal to the recorded run up to rounding)
    grid = [None, *cells] if cells else []
    totals = np.zeros(len(grid))
    limit = config.batch_size * len(config.scales)
    for chunk in chunks:
        local = np.flatnonzero(train[chunk.rows])
        pairs = [(c, r) for c in range(len(grid)) for r in local]  # cell-major rows
        for start in range(0, len(pairs), limit):
            piece = pairs[start : start + limit]
            rows = np.array([r for _, r in piece])
            logits = resumed_logits(model, chunk, rows, [grid[c] for c, _ in piece], start_layer)
            log_prob = prediction_scores(logits, chunk.targets[torch.as_tensor(rows)])["log_prob"]
            np.add.at(totals, [c for c, _ in piece], log_prob)
    n_train = int(train.sum())
    baseline = totals[0] / n_train if cells else float(before["log_prob"][train].mean())
    means = totals[1:] / n_train
    best = int(np.argmax(means)) if cells else -1
    chosen = cells[best] if cells and means[best] > baseline else None
    fit = pd.DataFrame(
        {
            "component": [c.label for c, _ in cells],
            "kind": [c.kind for c, _ in cells],
            "layer": np.array([c.layer for c, _ in cells], dtype=np.int64),
            "index": np.array([c.index for c, _ in cells], dtype=np.int64),
            "train_mean_logit": [dict((c, m) for c, m in candidates)[c] for c, _ in cells],
            "scale": np.array([s for _, s in cells], dtype=np.float64),
            "train_log_prob": means,
            "train_gain": means - baseline,
            "n_train": n_train,
            "chosen": [chosen is not None and i == best for i in range(len(cells))],
        }
    )
    return fit, chosen


def scaled_scores(model, chunks, choice, start_layer, config) -> dict[str, np.ndarray]:
    """Scores of every fact with the mitigation applied (resumed at the candidate layers)."""
    parts, rows_all = [], []
    for chunk in chunks:
        for start in range(0, len(chunk.rows), config.batch_size):
            rows = np.arange(start, min(start + config.batch_size, len(chunk.rows)))
            logits = resumed_logits(model, chunk, rows, [choice] * len(rows), start_layer)
            parts.append(prediction_scores(logits, chunk.targets[torch.as_tensor(rows)]))
            rows_all.append(chunk.rows[rows])
    order = np.argsort(np.concatenate(rows_all), kind="stable")
    return {k: np.concatenate([p[k] for p in parts])[order] for k in parts[0]}
