"""Causal tracing: recallscope's batched, prefix-reusing implementation against ROME's loop.

Both run in this process on the same facts. The naive loop is the paper's: for every
(kind, position, layer) cell, one forward of ``1 + S`` rows (row 0 clean, rows 1..S noised), the
clean state copied from row 0 into the noised rows, full logits (``tests/oracles/causal_tracing``).
It costs the same for every cell of a fact, so by default it is timed on ``--naive-cells`` cells
drawn at random per fact and its time for the fact's whole grid is extrapolated from their mean
(``--full-naive`` runs every cell). The scores of the timed cells must equal the fast ones.

Run::

    python bench/causal_tracing.py --facts 10 --samples 10 --naive-cells 30
"""

from __future__ import annotations

import argparse
import platform
import random
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

import recallscope as rs
from recallscope.methods import causal_tracing as ct

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from oracles.causal_tracing import SITE, naive_cell, window_layers  # noqa: E402


def known_facts(model: rs.Model, n: int, seed: int) -> rs.FactSet:
    """``n`` facts the model knows, spread over the built-in relations."""
    known = rs.load_facts("mixed", templates="first").known_by(model)
    return known.sample(n, seed=seed)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_fast(model, batch, config) -> tuple[ct.CausalTracingResult, float, float]:
    before = peak_rss_mb()
    start = time.perf_counter()
    result = ct.run(model, batch, config)
    return result, time.perf_counter() - start, peak_rss_mb() - before


def run_naive(model, batch, result, config, n_cells: int | None, rng: random.Random) -> dict:
    """Time ROME's loop on sampled (or all) cells of every fact; compare their scores."""
    seconds, cells_total, diffs, timed = 0.0, 0, [], 0
    for row, trace in enumerate(result.traces):
        ids = batch.input_ids[row, int(batch.pad_lengths[row]) :]
        grid = [
            (k, t, layer) for k in config.kinds for t in range(len(ids)) for layer in range(model.n_layers)
        ]
        chosen = grid if n_cells is None else rng.sample(grid, min(n_cells, len(grid)))
        start = time.perf_counter()
        for kind, t, layer in chosen:
            layers = window_layers(kind, layer, config.window, model.n_layers)
            score, _ = naive_cell(
                model,
                ids,
                trace.span,
                trace.target_ids[0],
                samples=config.samples,
                noise=trace.noise,
                seed=config.seed,
                restore=layers,
                site=SITE[kind],
                position=t,
            )
            diffs.append(abs(score - trace.scores[kind][t, layer]))
        per_cell = (time.perf_counter() - start) / len(chosen)
        seconds += per_cell * len(grid)
        cells_total += len(grid)
        timed += len(chosen)
    return {"seconds": seconds, "cells": cells_total, "timed_cells": timed, "max_diff": max(diffs)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--facts", type=int, default=10)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--kinds", default="hidden,mlp,attn")
    parser.add_argument("--naive-cells", type=int, default=30, help="cells timed per fact (extrapolated)")
    parser.add_argument("--full-naive", action="store_true", help="time the naive loop on every cell")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    model = rs.load_model(args.model, device="cpu")
    facts = known_facts(model, args.facts, args.seed)
    batch = facts.to_batch(model)
    config = ct.Config.preset(
        "rome", samples=args.samples, kinds=tuple(args.kinds.split(",")), noise=ct.noise_level(model, batch)
    )
    print(
        f"recallscope {rs.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"python {platform.python_version()}, {torch.get_num_threads()} threads, model {args.model}, "
        f"{model.attn_implementation} attention, {len(facts)} known facts, kinds {config.kinds}, "
        f"S={config.samples}, window {config.window}, noise {config.noise:.4f}"
    )
    result, fast_s, fast_mb = run_fast(model, batch, config)
    naive = run_naive(
        model, batch, result, config, None if args.full_naive else args.naive_cells, random.Random(args.seed)
    )
    lengths = [len(t.tokens) for t in result.traces]
    print(
        f"\nprompt lengths {min(lengths)}-{max(lengths)} tokens (median {statistics.median(lengths)}), "
        f"{naive['cells']} cells, naive loop timed on {naive['timed_cells']} cells\n"
    )
    print("| implementation | time (s) | s / fact | speed-up | peak RSS growth (MB) |")
    print("|---|---:|---:|---:|---:|")
    print(
        f"| ROME loop (1 forward of {config.samples + 1} rows per cell) | {naive['seconds']:.1f} | "
        f"{naive['seconds'] / len(facts):.1f} | 1.0× | — |"
    )
    print(
        f"| recallscope | {fast_s:.1f} | {fast_s / len(facts):.1f} | {naive['seconds'] / fast_s:.1f}× "
        f"| {fast_mb:.0f} |"
    )
    print(f"\nmax |score difference| over the {naive['timed_cells']} compared cells: {naive['max_diff']:.2e}")


if __name__ == "__main__":
    main()
