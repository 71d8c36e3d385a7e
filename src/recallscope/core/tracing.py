"""Activation-patching grids of one prompt (causal tracing, ``methods.md`` §5.7): the clean run, each
corrupted run, and every cell patched in each direction, with every metric.

::

    prompt = TracedPrompt("f", ids, span=(1, 3), gold=[target], step=1, span_name="subject")
    traced = trace_prompt(model, prompt, {"gaussian": gaussian(...)}, config)
    traced.grids[0].grids["mlp"]["prob"]  # [T, L]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from recallscope.core.cache import run_with_cache
from recallscope.core.corruption import Corrupted
from recallscope.core.restoration import RESTORED_SITES, Patching, Readout, patch_grids, restoration_cells
from recallscope.core.resume import record_run
from recallscope.models.sites import Site

__all__ = ["TracedPrompt", "PatchedGrid", "Traced", "trace_prompt"]


@dataclass(frozen=True)
class TracedPrompt:
    """One prompt ``ids [T]`` (no padding) with the corrupted ``span`` in its positions."""

    fact_id: str
    ids: torch.Tensor
    span: tuple[int, int]
    gold: list[int] | None
    """The gold answer's token ids, or None."""
    step: int
    span_name: str

    def full(self, whole_answer: bool) -> torch.Tensor:
        """The prompt, then (``whole_answer``) the gold answer but its last token (teacher forcing)."""
        if not whole_answer:
            return self.ids
        return torch.cat([self.ids, torch.tensor(self.gold[:-1], dtype=self.ids.dtype)])


@dataclass(frozen=True)
class PatchedGrid:
    """``grids[kind][metric]`` ``[T, L]`` of one corruption and direction, with the metrics of the
    corrupted run (averaged over its copies) and of the clean run.
    """

    corruption: str
    direction: str
    grids: dict[str, dict[str, np.ndarray]]
    corrupted: dict[str, float]
    clean: dict[str, float]


@dataclass(frozen=True)
class Traced:
    target: list[int]
    """The measured tokens (the answer's tokens with ``answer_logprob``)."""
    grids: list[PatchedGrid]


def trace_prompt(model, prompt: TracedPrompt, corruptions: dict[str, Corrupted], config) -> Traced:
    """Every grid of ``prompt``: per corruption, per direction in ``config.directions``.

    ``config`` supplies ``kinds``, ``window``, ``directions``, ``target`` (``top1`` / ``gold``),
    ``metric`` (``answer_logprob`` teacher-forces the gold answer) and the grouping settings of
    :func:`~recallscope.core.restoration.patch_grids`.
    """
    answer = prompt.gold if config.metric == "answer_logprob" else None
    full = prompt.full(answer is not None)
    n_keep = len(answer) if answer else 1
    sites = [Site(layer, RESTORED_SITES[k]) for k in config.kinds for layer in range(model.n_layers)]
    clean = run_with_cache(model, full[None], sites, logits="all")
    clean_logits = clean.logits[:, -n_keep:]
    target = answer or [int(clean_logits[0, -1].argmax()) if config.target == "top1" else prompt.gold[0]]
    n_prompt = len(prompt.ids)
    cells = restoration_cells(config.kinds, config.window, model.n_layers, range(prompt.span[0], n_prompt))
    grids = []
    for name, bad in corruptions.items():
        readout = Readout(target, clean_logits[0, 0].double().log_softmax(-1), bad.counter, n_keep)
        with bad.applied(model):
            corrupted_run = record_run(model, bad.ids, logits_to_keep=n_keep)
        low = {k: v[0] for k, v in readout.measure(corrupted_run.logits).items()}
        high = {k: v[0] for k, v in readout.measure(clean_logits).items()}
        for direction in config.directions:
            if direction == "denoising":
                patching, base = Patching.denoising(corrupted_run, clean, bad.samples), low
            else:
                with bad.applied(model):
                    source = run_with_cache(model, bad.ids, sites)
                clean_run = record_run(model, full[None], logits_to_keep=n_keep)
                patching, base = Patching.noising(clean_run, source, bad.samples), high
            patched = patch_grids(model, patching, readout, cells, base, config, n_prompt)
            grids.append(PatchedGrid(name, direction, patched, low, high))
    return Traced(list(target), grids)
