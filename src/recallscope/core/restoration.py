"""Restoration grids of causal tracing (ROME; ``methods.md`` §5.7): states of a source run written
into a recorded target run, many cells per resumed forward.

A :class:`RestorationCell` writes, at one position, either the output of a block (``hidden``) or
the MLP / attention updates of a window of blocks (``mlp`` / ``attn``). Denoising writes clean states
into the corrupted run (ROME's tracing); noising writes corrupted states into the clean run.
:func:`plan_resumed_forwards` groups cells by the block and position a forward resumes from (trading
the fixed cost of a forward against the rows it recomputes); :func:`run_restoration_cells` runs one
group as one batched :func:`~recallscope.core.resume.resume` of the recorded target run, one block of
rows per cell; :func:`cell_metrics` reads every metric from the same logits::

    groups = plan_resumed_forwards(cells, config, n_layers, n_tokens, samples)
    for (layer, pos), group in groups.items():
        logits = run_restoration_cells(model, state, rows, source, from_rows, group, layer, pos, 1)
        metrics = cell_metrics(logits, target, clean_logprobs, counter)
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from recallscope.core.dtypes import upcast
from recallscope.core.patching import patch_cells, window
from recallscope.core.resume import resume
from recallscope.models.sites import Site

__all__ = [
    "RESTORED_SITES",
    "RestorationCell",
    "plan_resumed_forwards",
    "run_restoration_cells",
    "cell_metrics",
    "restoration_cells",
    "Patching",
    "Readout",
    "patch_grids",
    "grid_cost",
]

RESTORED_SITES = {"hidden": "resid_post", "mlp": "mlp_out", "attn": "attn_out"}
"""The site whose clean value each kind of restoration writes back."""


def cell_metrics(
    logits: torch.Tensor, target: Sequence[int], clean_logprobs: torch.Tensor, counter: int | None
) -> dict[str, torch.Tensor]:
    """Every metric of ``logits [R, n, V]`` (the last ``n`` positions: the prompt's last, then the
    answer's teacher-forced ones), each ``[R]`` float64:

    - ``prob`` / ``logprob``: P / log P of ``target[0]`` at the prompt's last position;
    - ``logit_diff``: logit of ``target[0]`` minus logit of the ``counter`` token (NaN without one);
    - ``kl``: KL(clean ‖ row) at the prompt's last position, ``clean_logprobs [V]`` the clean run's;
    - ``answer_logprob``: Σ log P of every token of ``target`` (teacher-forced).
    """
    logits = upcast(logits)
    logprobs = logits.log_softmax(-1)  # [R, n, V]
    last, first = logprobs[:, 0], target[0]
    picked = logprobs[:, torch.arange(len(target)), torch.tensor(target)]  # [R, n]
    clean = clean_logprobs.to(last.device, last.dtype)
    nan = torch.full_like(last[:, 0], float("nan"))
    metrics = {
        "prob": last[:, first].exp(),
        "logprob": last[:, first],
        "logit_diff": nan if counter is None else logits[:, 0, first] - logits[:, 0, counter],
        "kl": (clean.exp() * (clean - last)).sum(-1),
        "answer_logprob": picked.sum(-1),
    }
    return {name: value.double() for name, value in metrics.items()}


@dataclass(frozen=True)
class RestorationCell:
    """One restoration: ``kind`` at ``position``, traced layer ``layer``."""

    kind: str
    position: int
    layer: int
    start: int  # first block that runs
    restore: tuple[int, ...]  # layers whose update is restored (mlp/attn)


def plan_resumed_forwards(
    cells: list[RestorationCell], config, n_layers: int, n_tokens: int, samples: int | None = None
) -> dict[tuple[int, int], list[RestorationCell]]:
    """Group cells into resumed forwards ``(start layer, start position) → cells``.

    Starting each cell exactly at its own layer and position does the fewest operations but makes
    many small forwards, and every forward reads all weights of its layers. We pick the grouping
    (layers rounded down to multiples of ``w``, positions in ``n`` ranges) that minimizes
    ``Σ_groups layers × (forward_cost + rows × tokens)``; ``forward_cost`` is the fixed cost of a
    forward in token-rows (weights streaming through the caches), ``samples`` the rows per cell
    (default ``config.samples``).
    """
    if not config.reuse:
        return {(0, 0): cells}
    samples = config.samples if samples is None else samples
    first = min(c.position for c in cells)
    best, best_cost = {}, float("inf")
    for width in (1, 2, 3, 4, 6, 8):
        for n_ranges in (1, 2, 3, 4, 6):
            size = -(-(n_tokens - first) // n_ranges)
            groups: dict[tuple[int, int], list[RestorationCell]] = {}
            for cell in cells:
                key = ((cell.start // width) * width, first + ((cell.position - first) // size) * size)
                groups.setdefault(key, []).append(cell)
            cost = sum(
                (n_layers - s) * (config.forward_cost + len(g) * samples * (n_tokens - t))
                for (s, t), g in groups.items()
            )
            if cost < best_cost:
                best, best_cost = groups, cost
    return best


def run_restoration_cells(
    model, state, rows, source, source_rows, cells, start_layer, start_pos, n_keep
) -> torch.Tensor:
    """Logits ``[len(cells) · n, n_keep, V]`` of every cell, all cells in one resumed forward.

    Args:
        state: the recorded target run (:func:`~recallscope.core.resume.record_run`).
        rows: ``[n]`` the target run's row each of a cell's ``n`` batch rows continues.
        source: a :class:`~recallscope.core.cache.Cache` of the run whose states are written.
        source_rows: ``[n]`` the source row each of a cell's batch rows takes its states from.
        cells: the cells; cell ``c`` owns batch rows ``c·n … (c+1)·n − 1``.
    """
    n = len(rows)
    batch_rows = torch.as_tensor(rows).repeat(len(cells))
    from_rows = torch.as_tensor(source_rows).repeat(len(cells))
    hidden = state.stream[batch_rows, start_layer, start_pos:].clone()
    with contextlib.ExitStack() as stack:
        restores: dict[tuple[str, int], list[int]] = {}
        for c, cell in enumerate(cells):
            block = list(range(c * n, (c + 1) * n))
            if cell.kind == "hidden" and cell.layer >= start_layer:  # only without reuse
                restores.setdefault(("resid_post", cell.layer), []).extend(block)
            elif cell.kind == "hidden":  # resume at layer + 1 from the source state at `position`
                state_of = source[Site(cell.layer, "resid_post")]
                hidden[block, cell.position - start_pos] = state_of[from_rows[block], cell.position].to(
                    hidden.dtype
                )
            for layer in cell.restore:
                restores.setdefault((RESTORED_SITES[cell.kind], layer), []).extend(block)
        position_of = torch.tensor([cell.position for cell in cells]).repeat_interleave(n)
        for (name, layer), written in restores.items():
            written = torch.tensor(written)
            positions = position_of[written]
            values = source[Site(layer, name)][from_rows[written], positions]
            stack.enter_context(patch_cells(model, Site(layer, name), written, positions - start_pos, values))
        return resume(
            model,
            state,
            batch_rows,
            start_layer=start_layer,
            start_pos=start_pos,
            hidden=hidden,
            logits_to_keep=n_keep,
        )


def restoration_cells(
    kinds: Sequence[str], window_size: int, n_layers: int, positions
) -> list[RestorationCell]:
    """Every cell of the grid: ``hidden`` one block, ``mlp`` / ``attn`` the window around each layer."""
    cells = []
    for kind in kinds:
        for t in positions:
            for layer in range(n_layers):
                if kind == "hidden":
                    cells.append(RestorationCell(kind, t, layer, layer + 1, ()))
                else:
                    layers = tuple(window(layer, window_size, n_layers))
                    cells.append(RestorationCell(kind, t, layer, layers[0], layers))
    return cells


@dataclass(frozen=True)
class Patching:
    """Where patched states go (``rows`` of the recorded ``state``) and where they come from
    (``source_rows`` of the ``source`` cache); ``n`` batch rows per cell.
    """

    state: object
    rows: torch.Tensor
    source: object
    source_rows: torch.Tensor

    @classmethod
    def denoising(cls, corrupted_run, clean, samples: int) -> Patching:
        """Clean states (one row) into each of the ``samples`` corrupted rows."""
        return cls(corrupted_run, torch.arange(samples), clean, torch.zeros(samples, dtype=torch.long))

    @classmethod
    def noising(cls, clean_run, corrupted, samples: int) -> Patching:
        """Each corrupted row's states into the clean run (one row)."""
        return cls(clean_run, torch.zeros(samples, dtype=torch.long), corrupted, torch.arange(samples))


@dataclass(frozen=True)
class Readout:
    """What is measured on patched logits: the target tokens, the clean log-probabilities ``[V]`` of
    the last prompt position, the counterfactual token (or None), and the kept positions.
    """

    target: list[int]
    reference: torch.Tensor
    counter: int | None
    n_keep: int

    def measure(self, logits: torch.Tensor, per: int | None = None) -> dict[str, list[float]]:
        """Every metric of ``logits [R, n_keep, V]``, averaged over blocks of ``per`` rows (default: all)."""
        values = cell_metrics(logits, self.target, self.reference, self.counter)
        per = per or logits.shape[0]
        return {name: value.reshape(-1, per).mean(-1).tolist() for name, value in values.items()}


def patch_grids(
    model, patching: Patching, readout: Readout, cells, base: dict[str, float], config, n_prompt: int
) -> dict[str, dict[str, np.ndarray]]:
    """``kind → metric → [n_prompt, n_layers]`` of every cell, averaged over its rows; positions no
    cell covers keep ``base`` (before the corrupted span the two runs' states are the same).

    ``config`` supplies ``max_batch_rows``, ``reuse`` and ``forward_cost``.
    """
    n = len(patching.rows)
    kinds = dict.fromkeys(c.kind for c in cells)
    grids = {k: {m: np.full((n_prompt, model.n_layers), v) for m, v in base.items()} for k in kinds}
    per_chunk = max(1, config.max_batch_rows // n)
    groups = plan_resumed_forwards(cells, config, model.n_layers, n_prompt, n)
    for (start_layer, start_pos), group in groups.items():
        for i in range(0, len(group), per_chunk):
            chunk = group[i : i + per_chunk]
            logits = run_restoration_cells(
                model, patching.state, patching.rows, patching.source, patching.source_rows,
                chunk, start_layer, start_pos, readout.n_keep,
            )  # fmt: skip
            values = readout.measure(logits, n)
            del logits  # before the next chunk's forward: one chunk's logits held at a time
            for c, cell in enumerate(chunk):
                for m in base:
                    grids[cell.kind][m][cell.position, cell.layer] = values[m][c]
    return grids


def grid_cost(
    model, config, cells, samples: int, n_tokens: int, direction: str
) -> tuple[int, float, int, float]:
    """``(forwards, token-block work, peak bytes, vocabulary rows)`` of :func:`patch_grids` over
    ``cells`` with ``samples`` rows per cell in ``direction`` (plus the recorded target run and the
    source cache); each row reads the vocabulary once, at the last position.
    """
    n_layers = model.n_layers
    per_chunk = max(1, config.max_batch_rows // samples)
    groups = plan_resumed_forwards(cells, config, n_layers, n_tokens, samples)
    recorded = 1 if direction == "noising" else samples  # rows of the recorded target run
    forwards = 2 + sum(-(-len(g) // per_chunk) for g in groups.values())  # + source cache, target run
    work = (recorded + samples) * n_tokens * n_layers + sum(
        (n_layers - s) * len(g) * samples * (n_tokens - t) for (s, t), g in groups.items()
    )
    largest = max((len(g) for g in groups.values()), default=0)  # cells of one resumed forward, at most
    rows = min(config.max_batch_rows, per_chunk * samples, largest * samples)
    kv = 2 * model.n_kv_heads * model.d_head
    floats = (
        recorded * n_tokens * ((n_layers + 1) * model.d_model + n_layers * kv)  # recorded run
        + samples * len(config.kinds) * n_layers * n_tokens * model.d_model  # source states
        + rows * n_tokens * (4 * model.d_model + 2 * model.d_mlp)  # one resumed block
        + 4 * rows * model.d_vocab  # logits, log-probabilities and the KL's two temporaries
    )
    return forwards, float(work), floats * model.dtype.itemsize, float(len(cells) * samples)
