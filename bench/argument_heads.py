"""Argument heads (Lv et al. L3 + L4): recallscope's resumed path patching against the literal loop.

Both run in this process on the same known ``lv_capitals`` facts, each with a counterfactual partner
(another nation in the same template). The naive loop is the paper's path patching written out
(``tests/oracles/argument_heads``): per fact and per sender (every head and every MLP), one full
forward of the unpadded clean prompt with every layer's ``q``/``k``/``v`` set to their clean values
and the sender's output at the last position set to its counterfactual value, scored on the full
logits. recallscope records the clean run once per prompt length and resumes it at each layer, last
position only, with one row per fact × sender. Printed: facts per second of both, the ratio, the
largest difference of the patched metric, peak memory, and the heads with the most negative effect.

Run::

    python bench/argument_heads.py --facts 4 --naive-facts 1
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import numpy as np
import torch
import transformers

import recallscope as rs
from early_decoding import peak_rss_mb, timed
from lv_facts import known_lv_facts
from recallscope.data.variants import counterfactual_facts
from recallscope.methods import argument_heads as ah

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from oracles.argument_heads import last_values, naive_path_patching  # noqa: E402
from oracles.early_decoding import unpadded  # noqa: E402


def naive(model, facts, n: int) -> np.ndarray:
    """``[n, L, H]`` patched ``iw`` of the literal loop for the first ``n`` facts."""
    batch, cf = facts.to_batch(model), counterfactual_facts(facts).to_batch(model)
    out = []
    for f in range(n):
        z, mlp = last_values(model, unpadded(cf, f))
        target = int(batch.target_ids[f])
        out.append(naive_path_patching(model, unpadded(batch, f), z, mlp, target, freeze_mlps=False)[2])
    return np.stack(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--facts", type=int, default=4, help="known lv_capitals facts analysed")
    parser.add_argument("--naive-facts", type=int, default=1, help="facts for the naive loop")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = rs.load_model(args.model, device="cpu")
    facts = known_lv_facts(model, args.facts)
    config = ah.Config()
    print(
        f"recallscope {rs.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"python {platform.python_version()}, {torch.get_num_threads()} threads, model {args.model} "
        f"({model.n_layers} layers, {model.n_heads} heads, vocabulary {model.d_vocab}), {len(facts)} facts, "
        f"senders per fact {model.n_layers * (model.n_heads + 1)}"
    )
    print(ah.cost(model, facts, config))
    ah.run(model, facts[:1], ah.Config(path_patching=False))  # warm-up
    before = peak_rss_mb()
    fast_s, result = timed(lambda: ah.run(model, facts, config))
    fast_mb = peak_rss_mb() - before
    n_naive = min(args.naive_facts, len(facts))
    naive_s, expected = timed(lambda: naive(model, facts, n_naive))
    diff = float(np.abs(result.patched[:n_naive] - expected).max())
    rates = len(facts) / fast_s, n_naive / naive_s
    print("\n| implementation | facts/s | speed-up | peak RSS growth (MB) |\n|---|---:|---:|---:|")
    print(f"| naive loop (full forward per fact × sender, frozen q/k/v) | {rates[1]:.3f} | 1.0× | — |")
    speedup = rates[0] / rates[1]
    print(f"| recallscope (resumed per layer) | {rates[0]:.3f} | {speedup:.1f}× | {fast_mb:.0f} |")
    print(f"\nmax |patched iw difference|: {diff:.2e}; peak RSS {peak_rss_mb():.0f} MB\n")
    scores = ah.summary(result.to_frame()).nsmallest(6, "delta")
    columns = ["layer", "head", "attention", "subject_logit", "r", "delta", "delta_pct", "n"]
    print("| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|")
    for row in scores[columns].itertuples(index=False):
        print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row) + " |")


if __name__ == "__main__":
    main()
