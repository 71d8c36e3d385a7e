"""MLP "activation" regression (Lv et al. L5): recallscope's batched method against the naive loop.

Both run in this process on the same known ``lv_capitals`` facts. The naive loop
(``tests/oracles/mlp_regression``) is one unpadded forward per fact with plain hooks, per-head
outputs sliced by hand, one ``numpy.linalg.lstsq`` per fact and layer, the linearized MLP through
the full ``d × d`` Jacobian (reverse mode), and logit-lens ranks over the full vocabulary. recallscope
runs one forward per ``batch_size`` facts keeping only last-position vectors, fits every fact of a
layer in one batched ``lstsq``, applies the Jacobian in forward mode to the head outputs only, and
ranks all layers in one chunked projection. Printed: facts per second of both, the ratio, the
largest differences, peak memory, and the heads the MLPs amplify or erase most. On a float32
model the differences come from the forwards (a padded batch against unpadded prompts, float32
rounding amplified by the fits); on the float64 tiny models the two agree to 1e-9 (the tests).

Run::

    python bench/mlp_regression.py --facts 16 --naive-facts 2
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import transformers

import recallscope as rs
from early_decoding import peak_rss_mb, timed
from lv_facts import known_lv_facts
from recallscope.methods import mlp_regression as mr

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from oracles.early_decoding import unpadded  # noqa: E402
from oracles.mlp_regression import naive_mlp_regression  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--facts", type=int, default=16, help="known lv_capitals facts analysed")
    parser.add_argument("--naive-facts", type=int, default=2, help="facts for the naive loop")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = rs.load_model(args.model, device="cpu")
    facts = known_lv_facts(model, args.facts)
    config = mr.Config.preset("lv")
    print(
        f"recallscope {rs.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"python {platform.python_version()}, {torch.get_num_threads()} threads, model {args.model} "
        f"({model.n_layers} layers, {model.n_heads} heads, d_model {model.d_model}, vocabulary "
        f"{model.d_vocab}), {len(facts)} known lv_capitals facts, config {config.preset_name}"
    )
    before = peak_rss_mb()
    mr.run(model, facts[:1], config)  # warm-up
    fast_s, result = timed(lambda: mr.run(model, facts, config))
    fast_mb = peak_rss_mb() - before
    n_naive = min(args.naive_facts, len(facts))
    batch = facts[:n_naive].to_batch(model)
    prompts = [unpadded(batch, b) for b in range(n_naive)]
    tokens = [
        (int(batch.input_ids[b, batch.spans["subject"][b, 0]]), int(batch.target_ids[b]))
        for b in range(n_naive)
    ]
    naive_s, expected = timed(lambda: naive_mlp_regression(model, prompts, tokens, config))
    print(f"{mr.cost(model, facts.to_batch(model), config)}")
    rates = len(facts) / fast_s, n_naive / naive_s
    print("\n| implementation | facts/s | speed-up | peak RSS growth (MB) |\n|---|---:|---:|---:|")
    naive = "naive loop (forward per fact, lstsq per layer, full Jacobian, full-vocab ranks)"
    print(f"| {naive} | {rates[1]:.2f} | 1.0× | — |")
    print(f"| recallscope | {rates[0]:.2f} | {rates[0] / rates[1]:.1f}× | {fast_mb:.0f} |")
    print("\n| quantity | max abs difference | max |value| |\n|---|---:|---:|")
    for key in ("coef", "linear_coef", "remainder"):
        got, want = getattr(result, key)[:n_naive], expected[key]
        print(f"| {key} | {np.nanmax(np.abs(got - want)):.2e} | {np.nanmax(np.abs(want)):.2e} |")
    for key in ("r2", "subject_rank_after", "target_rank_after"):
        got, want = result.fit[key][:n_naive], expected[key]
        print(f"| {key} | {np.nanmax(np.abs(got - want)):.2e} | {np.nanmax(np.abs(want)):.2e} |")
    summary = mr.summary(result.to_frame(), result.tables()["fit"])
    columns = ["layer", "head", "coef", "coef_ci", "frac_positive", "linear_coef", "r2", "r2_adjusted"]
    for title, rows in (
        ("most amplified heads (mean β)", summary.sort_values("coef", ascending=False).head(5)),
        ("most erased heads (mean β)", summary.sort_values("coef").head(5)),
    ):
        print(f"\n{title}:\n| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|")
        for row in rows[columns].itertuples(index=False):
            print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row) + " |")
    fit = result.tables()["fit"].groupby("layer")[["r2", "target_rank_before", "target_rank_after"]].median()
    print("\nmedian R² and target rank (logit lens) around the last four MLPs:")
    print(pd.DataFrame(fit).tail(4).round(3).to_string())


if __name__ == "__main__":
    main()
