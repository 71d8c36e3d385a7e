"""Hook overhead of recallscope against a plain Hugging Face forward.

Every condition is timed round-robin in one process: each repeat runs all conditions once, in a
rotated order, so slow drifts of a noisy machine hit every condition alike. We report per
condition the median wall time and its quartiles, the ratio of the medians to the plain HF
forward, and two memory figures:

- ``peak RSS growth``: how far the process's peak resident memory rose above the resident memory
  before the condition's first (warm-up) run (``VmHWM`` reset through ``/proc/self/clear_refs``
  on Linux). Memory freed earlier and kept by the allocator is reused without growth, so this
  is a lower bound of the extra memory a condition needs;
- ``kept``: bytes of the tensors the call returns (logits plus cached activations).

Other processes on a small machine distort timings. A timing is kept only when no task waited
for a CPU during more than 2% of it (``/proc/pressure/cpu``, 0% when the benchmark runs alone);
rounds go on until each condition has ``--repeats`` such quiet timings, or ``--budget-s`` is spent
(then the table says how many were quiet, and falls back to all timings if fewer than 3).

Run::

    python bench/hooks.py --batch-sizes 1 64 --repeats 12
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import platform
import resource
import statistics
import time
from collections.abc import Callable

import torch
import transformers

import recallscope as rs

PROMPT = "The famous Eiffel Tower is located in the beautiful city of"
ALL_SITES = ("resid_pre", "resid_post", "attn_out", "mlp_out", "z", "mlp_post")
QUIET = 0.02  # a timing is quiet when other tasks waited for a CPU less than 2% of it
KNOCKOUT = dict(layers=range(10, 19), src=[2, 3, 4], dst=[-1])


def conditions(model: rs.Model, batch: rs.PromptBatch) -> dict[str, Callable[[], object]]:
    """Named conditions → zero-argument callables that run one forward."""
    layers = range(model.n_layers)
    last_resid = [rs.Site(layer, "resid_post") for layer in layers]
    every_site = [rs.Site(layer, name) for layer in layers for name in ALL_SITES]
    value = rs.run_with_cache(model, batch, ["15.resid_post"], positions=[-1])["15.resid_post"]
    one_ko = [rs.Knockout(**KNOCKOUT)]
    row_kos = [rs.Knockout(**KNOCKOUT, rows=[i]) for i in range(len(batch))]
    inputs = batch.model_inputs("cpu")
    return {
        "plain HF forward": lambda: model.hf_model(**inputs, use_cache=False, logits_to_keep=1).logits,
        "rs.forward": lambda: rs.forward(model, batch),
        f"cache {len(last_resid)} resid_post, last pos": lambda: rs.run_with_cache(
            model, batch, last_resid, positions=[-1], logits="last"
        ),
        f"cache {len(every_site)} sites, all pos": lambda: rs.run_with_cache(
            model, batch, every_site, logits="last"
        ),
        "patch 15.resid_post[-1]": lambda: forward_in(
            model, batch, rs.patch(model, "15.resid_post", value, positions=[-1])
        ),
        "knockout L10-18, shared mask": lambda: forward_in(model, batch, rs.block_attention(model, one_ko)),
        f"knockout L10-18, per-row masks ({len(row_kos)})": lambda: forward_in(
            model, batch, rs.block_attention(model, row_kos)
        ),
    }


def forward_in(
    model: rs.Model, batch: rs.PromptBatch, context: contextlib.AbstractContextManager
) -> torch.Tensor:
    """``rs.forward`` inside ``context`` (entering and leaving it is part of the timed call)."""
    with context:
        return rs.forward(model, batch)


def kept_bytes(result: object) -> int:
    """Bytes of the tensors in ``result`` (a tensor, or a Cache with logits)."""
    if isinstance(result, torch.Tensor):
        return result.numel() * result.element_size()
    tensors = [*result.values(), result.logits]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith(field + ":")).split()[1])


def peak_rss_growth(call: Callable[[], object]) -> tuple[object, float]:
    """Run ``call``; return its result and how far the peak RSS rose above the RSS before, in MB.

    Uses ``/proc/self/clear_refs`` to reset the peak (Linux); elsewhere falls back to the growth
    of ``ru_maxrss``, the high-water mark of the whole process (0 unless a new record is set).
    """
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # resets VmHWM (peak RSS) to the current RSS
        before = _status_kb("VmRSS")
        return call(), (_status_kb("VmHWM") - before) / 1024
    except OSError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result = call()
        return result, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


def cpu_pressure() -> float:
    """Seconds during which some task waited for a CPU (``/proc/pressure/cpu``), or NaN."""
    try:
        with open("/proc/pressure/cpu") as pressure:
            return int(pressure.readline().split("total=")[1]) / 1e6
    except (OSError, IndexError):
        return float("nan")


def timed(call: Callable[[], object]) -> tuple[float, float]:
    """Wall time of ``call`` in ms, and the share of it during which some task waited for a CPU."""
    waited, start = cpu_pressure(), time.perf_counter()
    call()
    seconds = time.perf_counter() - start
    return 1000 * seconds, (cpu_pressure() - waited) / seconds


def measure(calls: dict[str, Callable[[], object]], repeats: int, budget_s: float) -> dict[str, dict]:
    """Warm up (and take memory figures from) each call once, then time them round-robin.

    A timing counts as quiet when no task waited for a CPU for more than ``QUIET`` of it. Rounds
    go on until every condition has ``repeats`` quiet timings or ``budget_s`` has passed.
    """
    stats = {}
    for name, call in calls.items():
        result, growth_mb = peak_rss_growth(call)
        stats[name] = {
            "growth_mb": growth_mb,
            "kept_mb": kept_bytes(result) / 2**20,
            "ms": [],
            "quiet": [],
            "rounds": [],
        }
    names, start = list(calls), time.perf_counter()
    for done in itertools.count():
        if min(len(row["quiet"]) for row in stats.values()) >= repeats:
            break
        if done >= repeats and time.perf_counter() - start > budget_s:
            break
        shift = done % len(names)  # rotate the order so that no condition always runs first
        for name in names[shift:] + names[:shift]:
            ms, stalled = timed(calls[name])
            quiet = not stalled > QUIET  # NaN (no /proc/pressure/cpu) counts as quiet
            stats[name]["ms"].append(ms)
            stats[name]["rounds"].append(ms if quiet else None)
            if quiet:
                stats[name]["quiet"].append(ms)
    return stats


def paired_ratio(rounds: list, base_rounds: list) -> float:
    """Median over rounds of (condition / plain) within the same round, quiet rounds only."""
    ratios = [a / b for a, b in zip(rounds, base_rounds, strict=True) if a is not None and b is not None]
    return statistics.median(ratios) if ratios else float("nan")


def report(stats: dict[str, dict], title: str) -> None:
    """Print a Markdown table: medians of the quiet timings (all timings where fewer than 3).

    Three ratios to the plain forward: of the medians, the median of per-round ratios (robust to
    slow drifts), and of the minima (each condition's fastest run, least touched by noise).
    """
    samples = {name: row["quiet"] if len(row["quiet"]) >= 3 else row["ms"] for name, row in stats.items()}
    base_name = next(iter(samples))
    base, base_min = statistics.median(samples[base_name]), min(samples[base_name])
    print(f"\n{title}\n")
    print(
        "| condition | median ms | IQR ms | vs plain (medians) | paired | vs plain (minima) | quiet runs "
        "| peak RSS growth MB | kept MB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, row in stats.items():
        q1, median, q3 = statistics.quantiles(samples[name], n=4, method="inclusive")
        paired = paired_ratio(row["rounds"], stats[base_name]["rounds"])
        print(
            f"| {name} | {median:.1f} | {q1:.0f}–{q3:.0f} | {median / base:.3f}× | {paired:.3f}× "
            f"| {min(samples[name]) / base_min:.3f}× | {len(row['quiet'])}/{len(row['ms'])} "
            f"| {row['growth_mb']:.1f} | {row['kept_mb']:.2f} |"
        )


def bench_batch(model: rs.Model, size: int, repeats: int, budget_s: float) -> None:
    """Benchmark every condition at one batch size and print its table."""
    batch = rs.tokenize(model, [PROMPT] * size)
    rs.forward(model, batch)  # page in every weight before the memory figures are taken
    stats = measure(conditions(model, batch), repeats, budget_s)
    report(stats, f"### batch {size} × {batch.seq_len} tokens")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--budget-s", type=float, default=600, help="per batch size, when the CPU is busy")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    model = rs.load_model(args.model, device="cpu")
    print(
        f"recallscope {rs.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"python {platform.python_version()}, {torch.get_num_threads()} threads, "
        f"attention {model.attn_implementation}, model {args.model}, "
        f"max RSS after loading {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB"
    )
    with torch.no_grad():
        for size in args.batch_sizes:
            bench_batch(model, size, args.repeats, args.budget_s)


if __name__ == "__main__":
    main()
