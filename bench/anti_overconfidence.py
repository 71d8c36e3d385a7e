"""Anti-overconfidence (Lv et al. L7): recallscope's batched method against a paper-style loop.

Both run in this process on the same known ``lv_capitals`` facts. The naive loop is the oracle's
(``tests/oracles/anti_overconfidence``): for every fact, one plain forward of the unpadded prompt with
hooks, and every final-layer head, ``b_O``, the MLP and the reported neurons decoded over the whole
vocabulary with the frozen final-norm scale; then, for every candidate, scale and train fact, a full
forward with a hook that scales the component; then one hooked forward per fact for the evaluation.
It reuses the fast run's candidates (choosing them by loops would decode every neuron over the
vocabulary). recallscope records each group of equal-length prompts once and resumes only the final
block for the candidate × scale grid and the evaluation, reading only the target's covector.
Perplexity is off in both (it is the same two forwards of the generic text in each). Printed: facts
per second of both, the ratio, the largest difference, peak memory, and the fitted mitigation.

Run::

    python bench/anti_overconfidence.py --facts 8 --candidates 4
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

import recallscope as rs
from early_decoding import peak_rss_mb, timed
from lv_facts import known_lv_facts
from recallscope.methods import anti_overconfidence as ao

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from oracles.anti_overconfidence import naive_attribution, scores  # noqa: E402
from oracles.early_decoding import unpadded  # noqa: E402


def naive(model, facts, result, config):
    """The loop, on the fast result's split, candidates and reported neurons."""
    batch = facts.to_batch(model)
    layers = range(model.n_layers - config.layers_from_end, model.n_layers)
    neurons = {
        layer: [c.index for c in result.components if c.kind == "neuron" and c.layer == layer]
        for layer in layers
    }
    prompts = [unpadded(batch, f) for f in range(len(batch))]
    targets = [int(t) for t in batch.target_ids]
    keys = [(c.kind, c.layer, c.index) for c in result.components]
    attributions = [
        naive_attribution(model, p, t, layers, neurons) for p, t in zip(prompts, targets, strict=True)
    ]
    logit = np.array([[a[k][0] for k in keys] for a in attributions])
    train = [f for f, s in enumerate(result.split) if s == "train"]
    cells = list(zip(result.fit.kind, result.fit.layer, result.fit["index"], result.fit.scale, strict=True))
    grid = [
        np.mean(
            [
                scores(model, prompts[f], targets[f], ((k, layer, i), s), config.positions)["log_prob"]
                for f in train
            ]
        )
        for k, layer, i, s in cells
    ]
    row = result.mitigation.iloc[0]
    choice = None if row.component == "none" else ((row.kind, int(row.layer), int(row["index"])), row.scale)
    after = [
        scores(model, p, t, choice, config.positions)["prob"] for p, t in zip(prompts, targets, strict=True)
    ]
    return logit, np.array(grid), np.array(after)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--facts", type=int, default=8, help="known lv_capitals facts analysed")
    parser.add_argument("--candidates", type=int, default=4, help="max_candidates of the fit")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    model = rs.load_model(args.model, device="cpu")
    facts = known_lv_facts(model, args.facts, scan=4 * args.facts)  # the first facts only: quick
    config = ao.Config(perplexity=False, max_candidates=args.candidates)
    print(
        f"recallscope {rs.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"model {args.model} ({model.n_layers} layers, {model.n_heads} heads, d_mlp {model.d_mlp}, "
        f"vocabulary {model.d_vocab}), {len(facts)} known lv_capitals facts"
    )
    ao.run(model, facts[:4], config)  # warm-up
    before = peak_rss_mb()
    fast_s, result = timed(lambda: ao.run(model, facts, config))
    fast_mb = peak_rss_mb() - before
    ppl_s, _ = timed(lambda: ao.run(model, facts, dataclasses.replace(config, perplexity=True)))
    naive_s, (logit, grid, after) = timed(lambda: naive(model, facts, result, config))
    diff = max(
        float(np.abs(result.logit - logit).max()),
        float(np.abs(result.fit.train_log_prob.to_numpy() - grid).max()),
        float(np.abs(result.facts.prob_after.to_numpy() - after).max()),
    )
    print(f"{ao.cost(model, facts.to_batch(model), config)}")
    n = len(facts)
    print("\n| implementation | facts/s | speed-up | peak RSS growth (MB) |\n|---|---:|---:|---:|")
    print(f"| naive loop (forward per fact × cell, full-vocab decoding) | {n / naive_s:.2f} | 1.0× | — |")
    print(f"| recallscope | {n / fast_s:.2f} | {naive_s / fast_s:.1f}× | {fast_mb:.0f} |")
    print(f"\nmax abs difference (logits, train log-probs, probabilities): {diff:.2e}")
    print(f"recallscope with the perplexity of the generic text: {ppl_s:.1f} s ({fast_s:.1f} s without)")
    row = result.mitigation.iloc[0]
    print(
        f"mitigation: layer {row.layer} {row.component} × {row.scale} ({row.n_candidates} candidates, "
        f"{row.n_train} train / {row.n_heldout} held-out facts); train gain in mean log-prob "
        f"{row.train_gain:+.3f}; held-out mean prob {row.mean_prob_before:.3f} → {row.mean_prob_after:.3f} "
        f"(gain {row.mean_prob_gain:+.3f}, 95% CI [{row.mean_prob_gain_low:+.3f}, "
        f"{row.mean_prob_gain_high:+.3f}])"
    )


if __name__ == "__main__":
    main()
