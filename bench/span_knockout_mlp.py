"""Span knockout → MLP logits (Yan & Jia Y4): recallscope's batched rows against the per-span loop.

Both run in this process on the same one-to-many step prompts (the model's own three-city lists,
``generate_lists``). The naive loop is the paper's: for every step prompt, batch size 1, one forward
of the unpadded prompt for the clean run and one per span (subject, each previous answer, last
token) with the test oracle's own knockout kernel (``tests/oracles/span_knockout_mlp``), every
layer's MLP output decoded over the whole vocabulary with that run's final-norm scale. The fast run
puts every clean run and every (prompt, span) knockout as rows of a few batched forwards and
decodes only the tracked tokens. Printed: prompts/s of both, the ratio, the largest Δ difference,
peak memory, and the mean Δ of the current answer per span by layer band.

Run::

    python bench/span_knockout_mlp.py --subjects 40 --prompts 12
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers

import recallscope as rs
from early_decoding import peak_rss_mb
from recallscope.core.steps import span_masks
from recallscope.data import generate_lists
from recallscope.methods import span_knockout_mlp as sk

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from oracles.span_knockout_mlp import knockout  # noqa: E402


def paper_run(model, ids: torch.Tensor, src: list[int], mode: str, W_U: torch.Tensor) -> torch.Tensor:
    """``[L, d_vocab]`` every layer's MLP output at the last position of ``ids [T]`` (batch size 1,
    ``N → src`` knocked out), decoded over the whole vocabulary in the model's dtype as the paper's
    code does (``apply_layernorm`` with the run's own final variance, then ``lm_head``)."""
    L = model.n_layers
    sites = [rs.Site(layer, "mlp_out") for layer in range(L)] + [rs.Site(L - 1, "resid_post")]
    with knockout(model, src, mode):
        cache = rs.run_with_cache(model, ids[None], sites, logits="last")
    final = cache[sites[-1]][0, -1]
    m = torch.stack([cache[s][0, -1] for s in sites[:-1]])  # [L, d]
    params = model.norm_params(model.spec.final_norm)
    if params.kind == "layer":
        m, final = m - m.mean(-1, keepdim=True), final - final.mean()
    rho = torch.sqrt((final**2).mean() + params.eps)
    gain = params.gain(m.dtype, m.device)
    return (m * (1 if gain is None else gain) / rho) @ W_U.T


def naive(model, batch, result) -> np.ndarray:
    """``[R, L, n]`` Δ of every knockout row of ``result``, one unpadded forward per (prompt, span)."""
    masks = span_masks(batch, result.config.spans)
    W_U = model.W_U  # the lm_head weight, as the model holds it
    out = np.zeros_like(result.logit_knockout)
    for b in range(len(batch)):
        pad = int(batch.pad_lengths[b])
        ids = batch.input_ids[b, pad:]
        tracked = tracked_ids(batch, result, b)
        clean = paper_run(model, ids, [], result.config.mode, W_U)
        for r in np.flatnonzero(result.row_fact == b):
            src = [int(j) - pad for j in masks[result.row_span[r]][b].nonzero()[:, 0]]
            knocked = paper_run(model, ids, src, result.config.mode, W_U)
            out[r] = (clean[:, tracked] - knocked[:, tracked]).numpy()
    return out


def tracked_ids(batch, result, b: int) -> list[int]:
    """Tracked token ids of row ``b``: the subject's first token, then every answer's."""
    ids = [int(batch.input_ids[b, batch.spans["subject"][b, 0]])] if result.config.subject else []
    return ids + [int(batch.tracked[name][b]) for name in result.tracked if name != "subject"]


def _step_indices(steps, step: int) -> list[int]:
    return [i for i, fact in enumerate(steps) if fact.fact_id.endswith(f"/step{step}")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--subjects", type=int, default=40, help="country facts to generate lists for")
    parser.add_argument("--prompts", type=int, default=12, help="step prompts analysed")
    parser.add_argument("--naive-prompts", type=int, default=None, help="prompts for the naive loop")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    model = rs.load_model(args.model, device="cpu")
    facts = rs.load_facts("country_cities", templates="all")[: args.subjects]
    steps = generate_lists(model, facts, k=3).to_facts()
    chosen = [i for s in (1, 2, 3) for i in _step_indices(steps, s)[: args.prompts // 3]]
    batch = steps.to_batch(model, chosen)
    config = sk.Config.preset("yan_jia")
    print(
        f"recallscope {rs.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"python {platform.python_version()}, {torch.get_num_threads()} threads, model {args.model}, "
        f"{len(steps)} step prompts from {len(facts)} subjects, {len(batch)} analysed "
        f"({args.prompts // 3} per answer step), mode {config.mode}"
    )
    before = peak_rss_mb()
    sk.run(model, batch.select([0]), config)  # warm-up
    times = []
    for _ in range(3):  # median of 3: other processes may share the CPU
        start = time.perf_counter()
        result = sk.run(model, batch, config)
        times.append(time.perf_counter() - start)
    fast_s, fast_mb = statistics.median(times), peak_rss_mb() - before
    n_naive = args.naive_prompts or len(batch)
    sub = batch.select(range(n_naive))
    sub_result = sk.run(model, sub, config)
    start = time.perf_counter()
    expected = naive(model, sub, sub_result)
    naive_s = time.perf_counter() - start
    keep = np.isin(result.row_fact, np.arange(n_naive))
    diff = float(np.abs(result.delta[keep] - expected).max())
    rates = len(batch) / fast_s, n_naive / naive_s
    print(
        f"\n{len(result.row_span)} knockout rows + {len(batch)} clean rows, {sk.cost(model, batch, config)}"
    )
    print("\n| implementation | prompts/s | speed-up | peak RSS growth (MB) |\n|---|---:|---:|---:|")
    print(f"| naive loop (a forward per prompt × span, full-vocab decoding) | {rates[1]:.2f} | 1.0× | — |")
    print(f"| recallscope | {rates[0]:.2f} | {rates[0] / rates[1]:.1f}× | {fast_mb:.0f} |")
    print(f"\nmax |Δ difference|: {diff:.2e}; peak RSS {peak_rss_mb():.0f} MB\n")
    frame = result.to_frame()
    frame = frame[frame.role == "current"]
    bands = np.array_split(np.arange(model.n_layers), 5)
    header = " | ".join(f"L{b[0]}–{b[-1]}" for b in bands)
    print(f"| Δ current answer, span | {header} |\n|---|" + "---:|" * len(bands))
    for span in dict.fromkeys(result.row_span):
        mean = frame[frame.span == span].groupby("layer")["delta"].mean()
        cells = " | ".join(f"{mean.reindex(b).mean():+.3f}" for b in bands)
        print(f"| {span} | {cells} |")


if __name__ == "__main__":
    main()
