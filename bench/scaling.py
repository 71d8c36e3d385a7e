"""Cost at real scale: every method per fact, in forwards of that fact, on real model configurations.

The models are random-weight models built from real configurations (no download): the width,
heads, MLP size and vocabulary of the real model are kept and only the layer count is cut so the
model fits this machine. The tokenizer is the embedded model's (49,152 tokens); a larger
vocabulary keeps its full unembedding (every method reads all ``V`` logits), only its extra rows
are never typed.

For each configuration and each method the benchmark runs the method as ``recallscope run`` does
(the runner, its chunking, a requirement computed once and handed over), on ``--facts`` facts of
the built-in dataset without the known-filter (a random model knows nothing), and prints:

- **s/fact**: the method's seconds per fact (from the run's manifest; a required method is timed
  on its own row);
- **÷ forward**: that time over the time of one forward pass of the same fact (batch 1, logits at
  the last position, as ``rs.forward``), the mean over the facts, measured in the same process;
- **peak MB**: the peak of memory the method holds allocated, above what was allocated before it
  (glibc's ``mallinfo2``: heap in use plus mmapped blocks, where torch's and numpy's buffers live),
  sampled every 2 ms; this is what ``plan`` predicts. **RSS MB**: the peak resident memory above the
  level before the method (freed memory handed back first with ``malloc_trim``), which adds what
  the allocator keeps cached and so depends on what ran before in the process;
- **plan s / plan MB**: what ``recallscope plan`` predicted for the same job, and the ratio of
  measured to predicted time.

``--sweep`` then fits, per method, how its time grows with the vocabulary, the layer count, the MLP
width and the prompt length (a least-squares slope of log time against log size over 3-4 sizes of
one dimension, the others fixed at a small base configuration). Run::

    python bench/scaling.py                  # the three configurations, then the sweep (< 30 min on 2 cores)
    python bench/scaling.py --configs gemma3-270m --methods logit_lens logprob_attribution --no-sweep
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import shutil
import tempfile
import threading
import time
from pathlib import Path

import torch
import transformers

import recallscope as rs
from recallscope.core.cache import forward
from recallscope.methods import REGISTRY
from recallscope.models.gguf import cached_gguf_dir, embedded_gguf_path
from recallscope.runner.job import Job
from recallscope.runner.plan import plan_job
from recallscope.runner.run import run_job

CONFIGS = {
    # name: (model_type, the real configuration's sizes, layers kept)
    "gemma3-270m": (
        "gemma3_text",
        dict(
            vocab_size=262_144,
            hidden_size=640,
            intermediate_size=2048,
            num_hidden_layers=18,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=256,
            sliding_window=512,
            query_pre_attn_scalar=256,
        ),
        18,
    ),
    "llama-3.2-1b": (
        "llama",
        dict(
            vocab_size=128_256,
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            tie_word_embeddings=True,
        ),
        2,
    ),
    "qwen2.5-0.5b": (
        "qwen2",
        dict(
            vocab_size=151_936,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        ),
        4,
    ),
}

SWEEP_BASE = dict(CONFIGS["gemma3-270m"][1], vocab_size=65_536, num_hidden_layers=2)
"""The sweep's base: the 262k configuration's width, heads and MLP, a 64k vocabulary, 2 layers."""
SWEEPS = {
    "vocabulary": ("vocab_size", (65_536, 131_072, 262_144)),
    "layers": ("num_hidden_layers", (1, 2, 4)),
    "d_mlp": ("intermediate_size", (1024, 2048, 4096)),
    "prompt tokens": ("prompt_tokens", (0, 12, 36)),
}
"""Per dimension: the config key and its sizes (``prompt_tokens``: filler words before each prompt)."""
FILLER = "Here is one more plain fact that people often ask about. "
"""Twelve words put before a prompt per 12 ``prompt_tokens`` of the sweep (subject spans shift with it)."""


def tokenizer():
    folder, _ = cached_gguf_dir(embedded_gguf_path("smollm2-135m"))
    return transformers.AutoTokenizer.from_pretrained(folder)


def build(model_type: str, sizes: dict, layers: int, tok, seed: int = 0) -> rs.Model:
    """A random-weight float32 model of ``model_type`` with ``sizes``, cut to ``layers`` blocks."""
    config = transformers.AutoConfig.for_model(model_type, **dict(sizes, num_hidden_layers=layers))
    config.bos_token_id, config.eos_token_id, config.pad_token_id = tok.bos_token_id, tok.eos_token_id, None
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return rs.load_model(hf, tokenizer=tok, device="cpu", validate=False)


LIBC = ctypes.CDLL("libc.so.6")


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                     "fordblks", "keepcost")
    ]  # fmt: skip


LIBC.mallinfo2.restype = _MallInfo2


def allocated() -> int:
    """Bytes the process holds allocated through malloc (in use in the heaps, plus mmapped blocks)."""
    info = LIBC.mallinfo2()
    return info.uordblks + info.hblkhd


class PeakMemory:
    """Peak resident memory and peak allocated memory above their levels at entry, sampled every 2 ms
    in a thread."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self) -> PeakMemory:
        gc.collect()
        LIBC.malloc_trim(0)  # hand freed memory back, so that what the method touches shows as growth
        self.base, self.base_allocated = self.rss(), allocated()
        self.peak, self.peak_allocated = self.base, self.base_allocated
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _read(self) -> None:
        self.peak = max(self.peak, self.rss())
        self.peak_allocated = max(self.peak_allocated, allocated())

    def _sample(self) -> None:
        while self.running:
            self._read()
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()
        self._read()

    @property
    def grown_mb(self) -> float:
        """Resident memory grown, MB."""
        return (self.peak - self.base) / 2**20

    @property
    def allocated_mb(self) -> float:
        """Allocated memory grown, MB."""
        return (self.peak_allocated - self.base_allocated) / 2**20


def forward_seconds(model: rs.Model, facts: rs.FactSet, repeat: int = 3) -> float:
    """Mean over the facts of the best of ``repeat`` timed forwards of the fact alone."""
    per_fact = []
    for i in range(len(facts)):
        batch = facts.to_batch(model, [i])
        forward(model, batch)  # warm-up
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            forward(model, batch)
            times.append(time.perf_counter() - start)
        per_fact.append(min(times))
    return sum(per_fact) / len(per_fact)


def padded_facts(n_facts: int, filler_words: int, root: Path) -> tuple[str, rs.FactSet]:
    """A dataset file of ``n_facts`` built-in facts with ``filler_words`` words of filler before each
    prompt (subject spans shifted), and its facts."""
    pool = rs.load_facts("mixed").sample(4 * n_facts, seed=0)
    facts = [f for f in pool if f.subject in f.prompt][:n_facts]  # spans found again after the filler
    words = FILLER.split()
    prefix = " ".join(words[i % len(words)] for i in range(filler_words)) + (" " if filler_words else "")
    rows = [
        {"subject": f.subject, "prompt": prefix + f.prompt, "target": f.answers[0], "relation": f.relation}
        for f in facts
    ]
    path = root / f"facts-{filler_words}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path), rs.load_facts(str(path))


def warm_up(model: rs.Model, facts: rs.FactSet) -> float:
    """Seconds of the one-time work per model that the tables leave out: the vocabulary range of
    every value vector (``L·(d_mlp + H·d_head)`` readouts, which the attribution's bounds use; kept
    on disk for models with a weights hash, so a user pays it once per model)."""
    la = REGISTRY["logprob_attribution"]
    start = time.perf_counter()
    la.run(model, facts.with_facts([facts[0]], {}), la.Config())
    return time.perf_counter() - start


def measure(model: rs.Model, method: str, n_facts: int, root: Path, **job_kwargs) -> dict:
    """Plan, then run one method as ``recallscope run`` would; its figures per fact.

    A method that requires another (``requires``) finds it already computed in the folder, as in a
    default run where the required method ran first: its time and memory are its own.
    """
    out = root / method
    shutil.rmtree(out, ignore_errors=True)
    common = dict(out=out, limit=n_facts, known_only=False, seed=0, **job_kwargs)
    module = REGISTRY[method]
    needs = module.requires(module.Config()) if hasattr(module, "requires") else {}
    if needs:
        before = Job(methods=tuple(needs), configs={m: dict(v) for m, v in needs.items()}, **common)
        run_job(before, model=model, progress=False, report=False)
    job = Job(methods=(method,), **common)
    gc.collect()
    predicted = plan_job(job, model=model, log=lambda _: None)
    with PeakMemory() as peak:
        store = run_job(job, model=model, progress=False, report=False, overwrite=bool(needs))
    entry = store.read_manifest()["methods"][method]
    if entry["n_facts"] != n_facts:
        print(f"  ({method} analysed {entry['n_facts']} of {n_facts} facts: {entry['skipped'][:1]})")
    mine = next(m for m in predicted.methods if m.method == method)
    shutil.rmtree(out, ignore_errors=True)
    return {
        "seconds": entry["seconds"] / n_facts,
        "peak_mb": peak.allocated_mb,
        "rss_mb": peak.grown_mb,
        "plan_seconds": mine.seconds / n_facts,
        "plan_mb": mine.cost.peak_bytes / 2**20,
    }


def table(model: rs.Model, methods: list[str], n_facts: int, root: Path, title: str) -> dict[str, dict]:
    """Measure every method on ``model`` and print the table; the figures by method."""
    _, facts = padded_facts(n_facts, 0, root)
    fwd = forward_seconds(model, facts)
    once = warm_up(model, facts)
    print(
        f"\n### {title}; one forward {1e3 * fwd:.0f} ms; value-vector ranges (once per model) {once:.0f} s\n"
    )
    print(
        "| method | s/fact | ÷ forward | peak MB | RSS MB | plan s/fact | measured ÷ plan | plan MB "
        "| MB ÷ plan |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    out = {}
    for method in methods:
        r = measure(model, method, n_facts, root)
        r["forwards"] = r["seconds"] / fwd
        print(
            f"| {method} | {r['seconds']:.2f} | {r['forwards']:.1f} | {r['peak_mb']:.0f} | "
            f"{r['rss_mb']:.0f} | "
            f"{r['plan_seconds']:.2f} | {r['seconds'] / max(r['plan_seconds'], 1e-9):.2f} | "
            f"{r['plan_mb']:.0f} | {r['peak_mb'] / max(r['plan_mb'], 1e-9):.2f} |",
            flush=True,
        )
        out[method] = r
    return out


def sweep(tok, methods: list[str], n_facts: int, root: Path) -> None:
    """Seconds per fact of every method at 3-4 sizes of each dimension; the fitted exponents."""
    exponents: dict[str, dict[str, float]] = {m: {} for m in methods}
    for dim, (key, sizes) in SWEEPS.items():
        times: dict[str, list[float]] = {m: [] for m in methods}
        xs = []
        for size in sizes:
            config = dict(SWEEP_BASE) if key == "prompt_tokens" else dict(SWEEP_BASE, **{key: size})
            model = build("gemma3_text", config, config["num_hidden_layers"], tok)
            path, facts = padded_facts(n_facts, size if key == "prompt_tokens" else 0, root)
            warm_up(model, facts)
            batch = facts.to_batch(model)
            xs.append(
                float((batch.seq_len - batch.pad_lengths).float().mean()) if key == "prompt_tokens" else size
            )
            for method in methods:
                r = measure(model, method, n_facts, root, dataset=path)
                times[method].append(max(r["seconds"], 1e-4))
            del model
        print(f"\n#### {dim}: sizes {', '.join(f'{x:g}' for x in xs)} (s/fact)\n", flush=True)
        for method in methods:
            slope = _slope(xs, times[method])
            exponents[method][dim] = slope
            print(f"- {method}: {' '.join(f'{t:.3f}' for t in times[method])} → exponent {slope:.2f}")
    dims = list(SWEEPS)
    print("\n### Exponents (s/fact ∝ size^e; base: 64k vocabulary, 2 layers, d_mlp 2048, d 640)\n")
    print("| method | " + " | ".join(dims) + " |")
    print("|---|" + "---:|" * len(dims))
    for method in methods:
        print(f"| {method} | " + " | ".join(f"{exponents[method][d]:.2f}" for d in dims) + " |")


def _slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ``log y`` against ``log x``."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum((a - mx) ** 2 for a in lx)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS))
    parser.add_argument("--methods", nargs="*", default=list(REGISTRY))
    parser.add_argument("--facts", type=int, default=4)
    parser.add_argument("--sweep-facts", type=int, default=4)
    parser.add_argument("--layers", type=int, default=None, help="override every configuration's layer count")
    parser.add_argument("--no-sweep", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(
        f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, recallscope {rs.__version__}"
    )
    started = time.perf_counter()
    tok = tokenizer()
    root = Path(tempfile.mkdtemp(prefix="rs-scaling-"))
    for name in args.configs:
        model_type, sizes, layers = CONFIGS[name]
        layers = args.layers or layers
        model = build(model_type, sizes, layers, tok)
        title = (
            f"{name}: {model_type}, V {model.d_vocab}, d {model.d_model}, d_mlp {model.d_mlp}, "
            f"{model.n_heads} heads, {layers} of {sizes['num_hidden_layers']} layers, {args.facts} facts"
        )
        table(model, args.methods, args.facts, root, title)
        del model
    if not args.no_sweep:
        sweep(tok, args.methods, args.sweep_facts, root)
    shutil.rmtree(root, ignore_errors=True)
    print(f"\nbenchmark wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
