"""Attention knockout: recallscope's per-row-mask batches against Geva et al.'s per-window loop.

Both run in this process on the same known facts. The naive loop is the paper's: for every fact,
source set (subject, non-subject, last) and centre layer, one forward of the unpadded prompt with
last → set blocked in the window (``tests/oracles/attention_knockout``). The fast run does every
(fact, set, window) as a row of a few batched forwards. Token maps are off in both (the paper's
main figure). The printed table goes into ``docs/benchmarks.md``; it also prints the mean % change
per source set by layer band (the pattern of the paper).

Run::

    python bench/attention_knockout.py --facts 20
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers

import recallscope as rs
from recallscope.methods import attention_knockout as ak

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from oracles.attention_knockout import naive_prob, naive_window, source_positions  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def naive(model, batch, config) -> np.ndarray:
    """``[fact, source, layer]`` probabilities from one forward per cell."""
    out = np.zeros((len(batch), len(config.sources), model.n_layers))
    for row in range(len(batch)):
        pad = int(batch.pad_lengths[row])
        ids = batch.input_ids[row, pad:]
        subject = tuple(int(v) - pad for v in batch.spans["subject"][row])
        target = int(rs.forward(model, ids[None])[0].argmax())
        for s, source in enumerate(config.sources):
            src = source_positions(len(ids), subject, source)
            for layer in range(model.n_layers):
                layers = naive_window(layer, config.window, model.n_layers)
                out[row, s, layer] = naive_prob(model, ids, target, layers, src, config.mode)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--facts", type=int, default=20)
    parser.add_argument("--window", type=int, default=9)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    model = rs.load_model(args.model, device="cpu")
    facts = rs.load_facts("mixed", templates="first").known_by(model).sample(args.facts, seed=args.seed)
    batch = facts.to_batch(model)
    config = ak.Config(window=args.window, token_map=False)
    print(
        f"recallscope {rs.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"python {platform.python_version()}, {torch.get_num_threads()} threads, model {args.model}, "
        f"{model.attn_implementation} attention, {len(facts)} known facts, window {config.window}, "
        f"mode {config.mode}, {len(config.sources)} source sets x {model.n_layers} layers"
    )
    before = peak_rss_mb()
    start = time.perf_counter()
    result = ak.run(model, batch, config)
    fast_s, fast_mb = time.perf_counter() - start, peak_rss_mb() - before
    start = time.perf_counter()
    expected = naive(model, batch, config)
    naive_s = time.perf_counter() - start
    diff = float(np.abs(result.prob - expected).max())
    print("\n| implementation | time (s) | s / fact | speed-up | peak RSS growth (MB) |")
    print("|---|---:|---:|---:|---:|")
    per_fact = naive_s / len(facts), fast_s / len(facts)
    print(
        f"| per-window loop (a forward per fact×set×layer) | {naive_s:.1f} | {per_fact[0]:.2f} | 1.0× | — |"
    )
    speedup = naive_s / fast_s
    print(f"| recallscope | {fast_s:.1f} | {per_fact[1]:.2f} | {speedup:.1f}× | {fast_mb:.0f} |")
    print(f"\nmax |probability difference|: {diff:.2e}\n")
    frame = result.to_frame()
    bands = np.array_split(np.arange(model.n_layers), 5)
    header = " | ".join(f"L{b[0]}–{b[-1]}" for b in bands)
    print(f"| last ← | {header} | min (layer) |\n|---|" + "---:|" * (len(bands) + 1))
    for source in config.sources:
        mean = frame[frame.source == source].groupby("layer")["change_pct"].mean()
        cells = " | ".join(f"{mean[b].mean():+.1f}%" for b in bands)
        print(f"| {source} | {cells} | {mean.min():+.1f}% (L{int(mean.idxmin())}) |")


if __name__ == "__main__":
    main()
