"""``recallscope plan``: what a job will cost, before anything heavy runs.

For each method the plan sums the method's own :func:`cost` over the chunks still to do (finished
chunks in the output folder are not counted), then turns work into time with two measured
forwards of the model on this machine: one of a real batch (seconds per token through one block)
and one of a single token (the fixed cost of a forward pass).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from recallscope.core.cache import forward
from recallscope.methods import REGISTRY
from recallscope.methods.base import Cost
from recallscope.runner.job import Job, model_key
from recallscope.runner.run import chunking, chunks, fact_digest, prepare_job
from recallscope.runner.store import Store

__all__ = ["MethodPlan", "Plan", "plan_job"]


@dataclass(frozen=True)
class MethodPlan:
    method: str
    facts: int
    facts_done: int
    cost: Cost
    seconds: float


@dataclass(frozen=True)
class Plan:
    model: str
    n_facts: int
    weights_bytes: int
    methods: list[MethodPlan]
    seconds_per_token_block: float
    seconds_per_forward: float

    @property
    def peak_bytes(self) -> int:
        return self.weights_bytes + max((m.cost.peak_bytes for m in self.methods), default=0)

    def __str__(self) -> str:
        lines = [
            f"model {self.model}: weights {_size(self.weights_bytes)}; {self.n_facts} facts",
            f"measured here: {1e6 * self.seconds_per_token_block:.1f} µs per token·block, "
            f"{1e3 * self.seconds_per_forward:.1f} ms per forward",
            "",
            f"{'method':<16} {'facts to do':>11} {'forwards':>9} {'token·blocks':>13} "
            f"{'peak extra':>11} {'time':>9}",
        ]
        for m in self.methods:
            todo = m.facts - m.facts_done
            lines.append(
                f"{m.method:<16} {todo:>11} {m.cost.forwards:>9} {m.cost.token_blocks:>13.3g} "
                f"{_size(m.cost.peak_bytes):>11} {_duration(m.seconds):>9}"
            )
        total = sum(m.seconds for m in self.methods)
        lines += ["", f"total: about {_duration(total)}; peak memory about {_size(self.peak_bytes)}"]
        return "\n".join(lines)


def plan_job(job: Job, *, model=None, log=print) -> Plan:
    """Estimate forwards, peak memory and time of ``job`` (nothing is written)."""
    store = Store(job.out) if (job.out / "manifest.json").exists() else None
    model, facts, configs, _ = prepare_job(job, model, store, log, write=False)
    per_block, per_forward = _throughput(model, facts)
    mkey = model_key(model)
    plans = []
    for name, config in configs.items():
        module = REGISTRY[name]
        size, key = chunking(module, config, job, facts, f"{config.stable_hash()}-{mkey}")
        current = {f.fact_id: fact_digest(f) for f in facts}
        done = store.done_facts(name, key, current) if store else set()
        cost = Cost(0, 0.0, 0)
        for rows in chunks(len(facts), size):
            todo = [i for i in rows if facts[i].fact_id not in done]
            if todo:
                cost = cost + module.cost(model, facts.to_batch(model, todo), config)
        seconds = cost.token_blocks * per_block + cost.forwards * per_forward
        n_done = sum(f.fact_id in done for f in facts)
        plans.append(MethodPlan(name, len(facts), n_done, cost, seconds))
    weights = sum(p.numel() * p.element_size() for p in model.hf_model.parameters())
    return Plan(model.info.name, len(facts), weights, plans, per_block, per_forward)


@torch.inference_mode()
def _throughput(model, facts) -> tuple[float, float]:
    """``(seconds per token·block, seconds per forward)`` from two measured forwards.

    The work estimate is for large batches (methods batch whole grids), so the throughput is
    measured on 64 copies of a prompt; the fixed cost on a single token.
    """
    ids = facts.to_batch(model, [0]).input_ids
    big, one = ids.expand(64, -1), ids[:, -1:]

    def best(run) -> float:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return min(times)

    fixed = best(lambda: forward(model, one))
    full = best(lambda: forward(model, big))
    return max(full - fixed, 1e-9) / (big.numel() * model.n_layers), fixed


def _size(n_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n_bytes < 1024 or unit == "GB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    return f"{n_bytes:.1f} GB"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
