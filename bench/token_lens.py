"""Token Lens: recallscope's batched contraction against the naive per-head, per-span loop.

Both run in this process on the same one-to-many step prompts: the model lists three cities of a
country (``country_cities``, every template), its greedy lists are parsed, and every answer step
becomes a prompt (``generate_lists(...).to_facts()``). The naive loop is the oracle's
(``tests/oracles/token_lens``): per fact the unpadded prompt, one forward with the attention
recomputed from queries and keys, then loops over layers, spans and heads
(``z_h(P) = Σ_{j∈P} α_{N,j} v_j``), ``o_proj`` on the concatenated heads and a full-vocabulary
frozen-scale decoding. The fast run does one forward per chunk of 16 facts and contracts the span
masks first. Printed: facts/s of both, the ratio, the largest difference and peak memory (process RSS,
which only grows, read after each run; and ``cost()``'s estimate). ``--texts`` keeps the generated
lists so a second run skips the generation (minutes on a CPU).

Run::

    RECALLSCOPE_CACHE_DIR=/tmp/rscache python bench/token_lens.py --subjects 40 --texts /tmp/lists.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch
import transformers

import recallscope as rs
from early_decoding import peak_rss_mb, timed
from recallscope.methods import token_lens as tl

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from oracles.token_lens import naive_token_lens  # noqa: E402


def naive(model, batch, result) -> np.ndarray:
    """``[fact, layer, part, tracked]`` from the oracle loop (NaN where the fact lacks a span)."""
    spans = [p for p in result.parts if p not in ("other", "bias")]
    out = np.full((len(batch), *result.logit.shape[1:]), np.nan)
    for row in range(len(batch)):
        pad = int(batch.pad_lengths[row])
        ids = batch.input_ids[row, pad:]
        positions = {}
        for name in spans:
            if name == "last_token":
                positions[name] = [len(ids) - 1]
            elif name in batch.spans and batch.spans[name][row, 0] >= 0:
                positions[name] = [j - pad for j in batch.span_positions(name, row)]
            else:
                positions[name] = []
        tracked = [int(batch.input_ids[row, batch.spans["subject"][row, 0]])]
        tracked += [int(batch.tracked[n][row]) for n in result.tracked[1:]]
        logit = naive_token_lens(model, ids, positions, tracked)["logit"]
        present = result.present[row]
        out[row][:, present] = logit[:, present]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--subjects", type=int, default=40, help="countries whose lists are generated")
    parser.add_argument("--facts", type=int, default=48, help="step prompts run by the fast method")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--naive-facts", type=int, default=6, help="step prompts run by the naive loop")
    parser.add_argument(
        "--texts", help="JSON file of generated lists by fact id (read if it exists, else written)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    model = rs.load_model(args.model, device="cpu", dtype=getattr(torch, args.dtype))
    subjects = rs.load_facts("country_cities", templates="all")[: args.subjects]
    texts = json.loads(Path(args.texts).read_text()) if args.texts and Path(args.texts).exists() else None
    seconds, lists = timed(lambda: rs.data.generate_lists(model, subjects, k=3, texts=texts))
    if args.texts:
        Path(args.texts).write_text(json.dumps({g.fact.fact_id: g.text for g in lists.generations}))
    steps = lists.to_facts()
    facts = steps[: args.facts]
    print(
        f"recallscope {rs.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"python {platform.python_version()}, CPU {torch.get_num_threads()} threads, model {args.model} "
        f"{args.dtype} "
        f"({model.n_layers} layers, {model.n_heads} heads, {model.n_kv_heads} kv heads); "
        f"{len(lists.kept)} of {len(subjects)} lists kept ({seconds:.0f} s to generate), "
        f"{len(steps)} step prompts, {len(facts)} used"
    )
    compare(model, facts, args.naive_facts)


def compare(model, facts, naive_facts: int) -> None:
    """Time the fast method and the naive loop on ``facts``; print the table."""
    batch = facts.to_batch(model)
    tl.run(model, facts[:2])  # warm-up
    rss_before = peak_rss_mb()
    fast_s, result = timed(lambda: tl.run(model, facts))
    rss_fast = peak_rss_mb()
    n_naive = min(naive_facts, len(facts))
    sub = batch.select(range(n_naive))
    naive_s, expected = timed(lambda: naive(model, sub, result))
    rss_naive = peak_rss_mb()
    got = result.logit[:n_naive]
    same_nan = bool((np.isnan(got) == np.isnan(expected)).all())
    diff = float(np.nanmax(np.abs(got - expected)))
    fast_rate, naive_rate = len(facts) / fast_s, n_naive / naive_s
    print(f"parts: {result.parts}; tracked: {result.tracked}")
    print("\n| run | facts | seconds | facts/s | peak RSS after (MB) |")
    print("|---|---:|---:|---:|---:|")
    print(f"| token_lens.run | {len(facts)} | {fast_s:.2f} | {fast_rate:.1f} | {rss_fast:.0f} |")
    print(f"| naive loop | {n_naive} | {naive_s:.2f} | {naive_rate:.2f} | {rss_naive:.0f} |")
    estimate = tl.cost(model, batch).peak_bytes / 2**20
    print(
        f"\nspeed-up {fast_rate / naive_rate:.0f}×; max abs logit difference {diff:.1e} "
        f"(same absent parts: {same_nan}); peak RSS before the runs {rss_before:.0f} MB, "
        f"cost() estimate of the method's activations {estimate:.1f} MB"
    )
    frame = result.to_frame()
    mean = frame[frame.layer >= model.n_layers // 2].groupby(["step", "span", "role"])["logit"].mean()
    print("\nmean logit over the upper half of the layers, by step, span and role:")
    print(mean.unstack("role").round(3).to_string())


if __name__ == "__main__":
    main()
