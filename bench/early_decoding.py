"""Early decoding (Yan & Jia Y1): recallscope's batched method against the paper-style per-example loop.

Both run in this process on the same one-to-many step prompts (the model's own three-city lists,
``generate_lists``). The naive loop is the paper's: for every step prompt, batch size 1, one forward
of the unpadded prompt with hooks on the attention and MLP modules, and each of the ``2·L`` update
vectors decoded over the whole vocabulary with the frozen final-norm scale in the model's dtype,
the tracked tokens picked afterwards (``tests/oracles/early_decoding``). recallscope runs one
forward per chunk of ``CHUNK_SIZE`` prompts (as the runner does) and decodes only the tracked
tokens through per-row covectors. Printed: facts (step prompts) per second of both, the ratio, the
largest logit difference, peak memory, and the mean logit of each role by layer band.

Run::

    python bench/early_decoding.py --subjects 40 --prompts 24
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import transformers

import recallscope as rs
from recallscope.data import generate_lists
from recallscope.methods import early_decoding as ed

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from oracles.early_decoding import naive_early_decoding, tracked_ids, unpadded  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def step_batch(model, n_subjects: int, n_prompts: int):
    """A left-padded batch of ``n_prompts`` step prompts, a third per answer step, and the step count."""
    facts = rs.load_facts("country_cities", templates="all")[:n_subjects]
    steps = generate_lists(model, facts, k=3).to_facts()
    per_step = [[i for i, f in enumerate(steps) if f.fact_id.endswith(f"/step{s}")] for s in (1, 2, 3)]
    chosen = [i for rows in per_step for i in rows[: n_prompts // 3]]
    return steps.to_batch(model, chosen), len(steps), len(facts)


def in_chunks(run, model, batch, config, size: int) -> np.ndarray:
    """The method's ``logit`` array over ``batch``, ``size`` prompts per call (as the runner chunks)."""
    parts = [
        run(model, batch.select(range(i, min(i + size, len(batch)))), config)
        for i in range(0, len(batch), size)
    ]
    return np.concatenate([p.logit for p in parts]), parts


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def header(args, model, batch, n_steps, n_subjects) -> str:
    return (
        f"recallscope {rs.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"python {platform.python_version()}, {torch.get_num_threads()} threads, model {args.model} "
        f"({model.n_layers} layers, {model.n_heads} heads, vocabulary {model.d_vocab}), "
        f"{n_steps} step prompts from {n_subjects} subjects, {len(batch)} analysed"
    )


def print_speed(n_fast, fast_s, fast_mb, n_naive, naive_s, diff, naive_label: str) -> None:
    rates = n_fast / fast_s, n_naive / naive_s
    print("\n| implementation | facts/s | speed-up | peak RSS growth (MB) |\n|---|---:|---:|---:|")
    print(f"| {naive_label} | {rates[1]:.2f} | 1.0× | — |")
    print(f"| recallscope | {rates[0]:.2f} | {rates[0] / rates[1]:.1f}× | {fast_mb:.0f} |")
    print(f"\nmax |logit difference|: {diff:.2e}; peak RSS {peak_rss_mb():.0f} MB\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--subjects", type=int, default=40, help="country facts to generate lists for")
    parser.add_argument("--prompts", type=int, default=24, help="step prompts analysed")
    parser.add_argument("--naive-prompts", type=int, default=None, help="prompts for the naive loop")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    model = rs.load_model(args.model, device="cpu")
    batch, n_steps, n_subjects = step_batch(model, args.subjects, args.prompts)
    config = ed.Config.preset("yan_jia")
    print(header(args, model, batch, n_steps, n_subjects))
    before = peak_rss_mb()
    ed.run(model, batch.select([0]), config)  # warm-up
    fast_s, (logit, parts) = timed(lambda: in_chunks(ed.run, model, batch, config, ed.CHUNK_SIZE))
    fast_mb = peak_rss_mb() - before
    n_naive = min(args.naive_prompts or len(batch), len(batch))
    naive = lambda b: naive_early_decoding(
        model, unpadded(batch, b), tracked_ids(batch, b), dtype=model.dtype
    )  # noqa: E731
    naive_s, expected = timed(lambda: np.stack([naive(b) for b in range(n_naive)]))
    diff = float(np.abs(logit[:n_naive] - expected).max())
    print(f"{ed.cost(model, batch, config)}")
    print_speed(
        len(batch), fast_s, fast_mb, n_naive, naive_s, diff, "naive loop (forward per prompt, full-vocab)"
    )
    frame = pd.concat([p.to_frame() for p in parts], ignore_index=True)
    bands = np.array_split(np.arange(model.n_layers), 5)
    print(
        f"| step | site | role | {' | '.join(f'L{b[0]}–{b[-1]}' for b in bands)} |\n|---|---|---|"
        + "---:|" * 5
    )
    for (step, site, role), group in frame.groupby(["step", "site", "role"]):
        mean = group.groupby("layer")["logit"].mean()
        print(
            f"| {step} | {site} | {role} | "
            + " | ".join(f"{mean.reindex(b).mean():+.2f}" for b in bands)
            + " |"
        )


if __name__ == "__main__":
    main()
