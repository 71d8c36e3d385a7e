"""Function application (Lv et al. L6): recallscope's batched method against the naive per-prompt loop.

Both run in this process on the same facts: ``lv_capitals`` prompts the model knows, with
counterfactual partners and relation answers from the whole dataset. The naive loop
(``tests/oracles/function_application``) runs, per fact, one forward of the unpadded clean prompt
and one of its counterfactual with plain hooks, computes every head output by hand, fits each MLP
output with ``numpy.linalg.lstsq`` and decodes every component over the full vocabulary in float64.
recallscope runs one forward per chunk of ``CHUNK_SIZE`` facts (clean and counterfactual rows
together), fits in float64 and decodes in the model's dtype (at least float32). Printed: facts per
second of both, the ratio, the largest difference of each numeric column, peak memory, and the
dataset summary by layer for the last layers.

Run::

    python bench/function_application.py --facts 16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import recallscope as rs
from early_decoding import peak_rss_mb, print_speed, timed
from lv_facts import known_lv_facts
from recallscope.data.variants import counterfactual_facts
from recallscope.methods import function_application as fa

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from oracles.early_decoding import unpadded  # noqa: E402
from oracles.function_application import first_token, naive_function_application  # noqa: E402

NUMERIC = ["logit", "margin", "cosine", "cf_logit_new", "cf_logit_old", "shift"]
COUNTS = ["rank", "relation_rank", "follows"]


def naive(model, facts, config: fa.Config) -> dict:
    """``{column: [F, L, C]}`` from the oracle, one fact (two unpadded forwards) at a time."""
    batch, cf_batch = facts.to_batch(model), counterfactual_facts(facts).to_batch(model)
    layers = list(range(model.n_layers))
    out: dict = {}
    for i, fact in enumerate(facts):
        target = int(batch.target_ids[i])
        candidates = [target] + [
            first_token(model, fact.prompt, a) for a in fact.attributes["relation_answers"]
        ]
        one = naive_function_application(
            model,
            unpadded(batch, i),
            unpadded(cf_batch, i),
            target,
            int(cf_batch.target_ids[i]),
            candidates,
            layers,
            config.components,
        )
        for name in NUMERIC + COUNTS:
            out.setdefault(name, []).append(one[name].astype(float))
    return {name: np.stack(values) for name, values in out.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--facts", type=int, default=16, help="known lv_capitals facts analysed")
    parser.add_argument("--naive-facts", type=int, default=4, help="facts for the naive loop")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    model = rs.load_model(args.model, device="cpu")
    facts = known_lv_facts(model, args.facts, scan=4 * args.facts)  # known_by on all 225 is slow on CPU
    config = fa.Config.preset("lv")
    print(
        f"recallscope {rs.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads, model "
        f"{args.model} ({model.n_layers} layers, {model.n_heads} heads, vocabulary {model.d_vocab}), "
        f"{len(facts)} known lv_capitals facts (+ counterfactuals), components {config.components}"
    )
    before = peak_rss_mb()
    fa.run(model, facts[:1], config)  # warm-up
    chunks = range(0, len(facts), fa.CHUNK_SIZE)
    fast_s, parts = timed(lambda: [fa.run(model, facts[i : i + fa.CHUNK_SIZE], config) for i in chunks])
    fast_mb = peak_rss_mb() - before
    fast = {name: np.concatenate([p.values[name] for p in parts]) for name in NUMERIC + COUNTS}
    n_naive = min(args.naive_facts, len(facts))
    naive_s, expected = timed(lambda: naive(model, facts[:n_naive], config))
    print(f"{fa.cost(model, facts[: fa.CHUNK_SIZE], config)} per chunk of {fa.CHUNK_SIZE}")
    diffs = {name: float(np.nanmax(np.abs(fast[name][:n_naive] - expected[name]))) for name in NUMERIC}
    mismatched = {name: int((fast[name][:n_naive] != expected[name]).sum()) for name in COUNTS}
    label = "naive loop (2 forwards per fact, lstsq, full-vocab float64)"
    print_speed(len(facts), fast_s, fast_mb, n_naive, naive_s, max(diffs.values()), label)
    print("max |fast − naive| per column: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    print("cells where ranks / follows differ: " + ", ".join(f"{k} {v}" for k, v in mismatched.items()))
    summary = fa.summary(pd.concat([p.to_frame() for p in parts], ignore_index=True))
    late = summary[summary.layer >= model.n_layers - 8]
    columns = ["layer", "component", "logit", "rank_median", "relation_rank", "relation_top1"]
    columns += ["cosine", "follow_rate", "shift", "shift_ci", "n"]
    print(f"\nsummary, last 8 layers ({len(facts)} facts):")
    print("| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|")
    for row in late[columns].itertuples(index=False):
        print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row) + " |")


if __name__ == "__main__":
    main()
