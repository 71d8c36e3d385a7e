"""Restoration grids of causal tracing (ROME; ``methods.md`` §5.7): clean states written back into a
recorded corrupted run, many cells per resumed forward.

A :class:`RestorationCell` restores, at one position, either the output of a block (``hidden``) or
the MLP / attention updates of a window of blocks (``mlp`` / ``attn``). :func:`plan_resumed_forwards`
groups cells by the block and position a forward resumes from (trading the fixed cost of a forward
against the rows it recomputes); :func:`run_restoration_cells` runs one group as one batched
:func:`~recallscope.core.resume.resume` of the recorded noisy run, one block of ``samples`` rows per
cell; :func:`target_score` reads P(target) or the summed log-probability of an answer::

    groups = plan_resumed_forwards(cells, config, n_layers, n_tokens)
    for (start_layer, start_pos), group in groups.items():
        scores = run_restoration_cells(model, state, clean, config, group, start_layer, start_pos, target, 1)
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from recallscope.core.dtypes import upcast
from recallscope.core.patching import patch_cells
from recallscope.core.resume import resume
from recallscope.models.sites import Site

__all__ = [
    "RESTORED_SITES",
    "RestorationCell",
    "plan_resumed_forwards",
    "run_restoration_cells",
    "target_score",
]

RESTORED_SITES = {"hidden": "resid_post", "mlp": "mlp_out", "attn": "attn_out"}
"""The site whose clean value each kind of restoration writes back."""


def target_score(logits: torch.Tensor, target: Sequence[int], metric: str) -> torch.Tensor:
    """``[R]`` scores from ``logits [R, n, V]``: P(target) (``prob``) or Σ log P of the answer."""
    logits = upcast(logits)
    picked = logits[:, torch.arange(len(target)), torch.tensor(target)] - logits.logsumexp(-1)  # [R, n]
    return (picked[:, 0].exp() if metric == "prob" else picked.sum(-1)).double()


@dataclass(frozen=True)
class RestorationCell:
    """One restoration: ``kind`` at ``position``, traced layer ``layer``."""

    kind: str
    position: int
    layer: int
    start: int  # first block that runs
    restore: tuple[int, ...]  # layers whose update is restored (mlp/attn)


def plan_resumed_forwards(
    cells: list[RestorationCell], config, n_layers: int, n_tokens: int
) -> dict[tuple[int, int], list[RestorationCell]]:
    """Group cells into resumed forwards ``(start layer, start position) → cells``.

    Starting each cell exactly at its own layer and position does the fewest operations but makes
    many small forwards, and every forward reads all weights of its layers. We pick the grouping
    (layers rounded down to multiples of ``w``, positions in ``n`` ranges) that minimizes
    ``Σ_groups layers × (forward_cost + rows × tokens)``; ``forward_cost`` is the fixed cost of a
    forward in token-rows (weights streaming through the caches).
    """
    if not config.reuse:
        return {(0, 0): cells}
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
                (n_layers - s) * (config.forward_cost + len(g) * config.samples * (n_tokens - t))
                for (s, t), g in groups.items()
            )
            if cost < best_cost:
                best, best_cost = groups, cost
    return best


def run_restoration_cells(
    model, state, clean, config, cells, start_layer, start_pos, target, n_keep
) -> list[float]:
    """Mean score over the noise samples of each cell, all cells in one resumed forward."""
    n_samples = config.samples
    rows = torch.arange(n_samples).repeat(len(cells))  # recorded noisy row each batch row continues
    hidden = state.stream[rows, start_layer, start_pos:].clone()
    with contextlib.ExitStack() as stack:
        restores: dict[tuple[str, int], list[tuple[int, int]]] = {}
        for c, cell in enumerate(cells):
            block_rows = range(c * n_samples, (c + 1) * n_samples)
            if cell.kind == "hidden" and cell.layer >= start_layer:  # only without reuse
                restores.setdefault(("resid_post", cell.layer), []).extend(
                    (r, cell.position) for r in block_rows
                )
            elif cell.kind == "hidden":  # resume at layer + 1 from the clean state at `position`
                hidden[list(block_rows), cell.position - start_pos] = clean[Site(cell.layer, "resid_post")][
                    0, cell.position
                ]
            for layer in cell.restore:
                restores.setdefault((RESTORED_SITES[cell.kind], layer), []).extend(
                    (r, cell.position) for r in block_rows
                )
        for (name, layer), pairs in restores.items():
            batch_rows = torch.tensor([r for r, _ in pairs])
            positions = torch.tensor([p for _, p in pairs])
            values = clean[Site(layer, name)][0, positions]
            stack.enter_context(
                patch_cells(model, Site(layer, name), batch_rows, positions - start_pos, values)
            )
        logits = resume(
            model,
            state,
            rows,
            start_layer=start_layer,
            start_pos=start_pos,
            hidden=hidden,
            logits_to_keep=n_keep,
        )
    return target_score(logits, target, config.metric).reshape(len(cells), n_samples).mean(-1).tolist()
