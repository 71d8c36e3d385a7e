"""``recallscope plan``: what a job will cost, before anything heavy runs.

For each method the plan sums the method's own :func:`cost` over the chunks still to do (finished
chunks in the output folder are not counted), then turns work into time with two measured
forwards of the model on this machine: one of a probe batch (seconds per token through one block;
``PROBE_ROWS`` copies of the first prompt's first ``PROBE_TOKENS`` tokens, so the plan stays quick
whatever the prompts' length) and one of a single token (the fixed cost of a forward pass), and
two readouts over the whole vocabulary, of one vector and of ``PROBE_VOCAB_ROWS`` vectors: seconds
per vocabulary row, and per readout pass (each pass streams the ``[V, d]`` unembedding from memory
whatever its rows, which dominates small readouts on CPUs; a method's rows are taken to be read in
passes of :func:`~recallscope.core.vocab.readout_chunk` rows, at least one per work item). With a
large vocabulary, reading vectors out dominates the methods that decode every layer.

The measurement runs on the model as the job places it, so a device map's cost (offloaded blocks
loaded at every forward, one device busy at a time) is in the figures; the plan also says how
many bytes of weights sit on each device. With ``--executor ray`` the work items of a method are
spread over the workers: the time is that of the busiest worker (items dealt in turn, as the
executor keeps every worker busy) plus loading the model once per worker, and the memory is per
worker. The throughput of the workers is assumed to be this machine's.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from recallscope.core.cache import forward
from recallscope.core.vocab import project_to_vocab, readout_chunk
from recallscope.methods import REGISTRY
from recallscope.methods.base import Cost
from recallscope.runner.job import Job, model_key
from recallscope.runner.requirements import plan_requirements
from recallscope.runner.run import prepare_job, work_items
from recallscope.runner.store import Store

__all__ = ["MethodPlan", "Plan", "plan_job"]


@dataclass(frozen=True)
class MethodPlan:
    method: str
    facts: int
    facts_done: int
    cost: Cost
    seconds: float
    items: int = 0
    """Work items (chunks) still to do; the unit an executor hands to a worker."""


@dataclass(frozen=True)
class Plan:
    model: str
    n_facts: int
    weights_bytes: int
    methods: list[MethodPlan]
    seconds_per_token_block: float
    seconds_per_forward: float
    seconds_per_vocab_row: float = 0.0
    seconds_per_vocab_pass: float = 0.0
    weights_by_device: dict[str, int] | None = None
    """Bytes of weights per device under a device map (``{"cuda:0": …, "cpu": …, "disk": …}``)."""
    executor: str = "local"
    workers: int = 1
    workers_assumed: bool = False
    """``workers`` is the default without GPUs, not the job's ``--workers``."""
    load_seconds: float = 0.0
    """Time to load the model once (each Ray worker loads its own copy)."""

    @property
    def peak_bytes(self) -> int:
        """Peak memory of one process (one worker under Ray): weights not on disk + the largest method."""
        on_disk = (self.weights_by_device or {}).get("disk", 0)
        return self.weights_bytes - on_disk + max((m.cost.peak_bytes for m in self.methods), default=0)

    @property
    def seconds(self) -> float:
        """Wall time of the methods, plus loading the model on the workers under Ray."""
        total = sum(m.seconds for m in self.methods)
        return total + (self.load_seconds if self.executor == "ray" else 0.0)

    def __str__(self) -> str:
        lines = [
            f"model {self.model}: weights {_size(self.weights_bytes)}; {self.n_facts} facts",
            f"measured here: {1e6 * self.seconds_per_token_block:.1f} µs per token·block, "
            f"{1e3 * self.seconds_per_forward:.1f} ms per forward, "
            f"{1e6 * self.seconds_per_vocab_row:.0f} µs per vocabulary row "
            f"(+{1e3 * self.seconds_per_vocab_pass:.1f} ms per readout pass)",
        ]
        if self.weights_by_device:
            placed = ", ".join(f"{_size(n)} on {device}" for device, n in self.weights_by_device.items())
            lines.append(f"device map: {placed} (offloaded blocks are loaded at every forward)")
        if self.executor == "ray":
            assumed = " (assumed: a cluster without GPUs; set --workers)" if self.workers_assumed else ""
            lines.append(
                f"executor ray: {self.workers} workers{assumed}, each loading the model "
                f"(about {_duration(self.load_seconds)}) and holding its own copy"
            )
        width = max([16, *(len(m.method) for m in self.methods)])
        lines += [
            "",
            f"{'method':<{width}} {'facts to do':>11} {'forwards':>9} {'token·blocks':>13} "
            f"{'vocab rows':>11} {'peak extra':>11} {'time':>9}",
        ]
        for m in self.methods:
            todo = m.facts - m.facts_done
            lines.append(
                f"{m.method:<{width}} {todo:>11} {m.cost.forwards:>9} {m.cost.token_blocks:>13.3g} "
                f"{m.cost.vocab_rows:>11.3g} {_size(m.cost.peak_bytes):>11} {_duration(m.seconds):>9}"
            )
        where = " per worker" if self.executor == "ray" else ""
        lines += [
            "",
            f"total: about {_duration(self.seconds)}; peak memory about {_size(self.peak_bytes)}{where}",
        ]
        return "\n".join(lines)


def plan_job(job: Job, *, model=None, log=print) -> Plan:
    """Estimate forwards, peak memory and time of ``job`` (nothing is written)."""
    store = Store(job.out, read_only=True) if (job.out / "manifest.json").exists() else None
    model, facts, configs, timings = prepare_job(job, model, store, log, write=False)
    per_block, per_forward, per_row, per_pass = _throughput(model, facts)
    chunk = readout_chunk(model)
    workers = (job.workers or DEFAULT_WORKERS) if job.executor == "ray" else 1
    mkey = model_key(model)
    requirements = plan_requirements(configs)
    alone = {(s.method, s.config.stable_hash()): s for r in requirements.values() for s in r.values()}
    todo = [(s.method, s.config, {}, " (required)") for s in alone.values() if not s.in_run]
    todo += [(n, c, {m: None for m in requirements.get(n, {})}, "") for n, c in configs.items()]
    plans = []
    for name, config, given, label in todo:
        module = REGISTRY[name]
        items, *_ = work_items(module, facts, config, f"{config.stable_hash()}-{mkey}", job, store)
        batches = [facts.to_batch(model, list(item.indices)) for item in items]
        costs = [
            module.cost(model, batch, config, **({"given": given} if given else {})) for batch in batches
        ]
        times = [
            c.token_blocks * per_block
            + c.forwards * per_forward
            + c.vocab_rows * per_row
            + math.ceil(c.vocab_rows / chunk) * per_pass
            for c in costs
        ]
        cost = sum(costs, Cost(0, 0.0, 0))
        n_done = len(facts) - sum(len(item.indices) for item in items)
        plans.append(MethodPlan(name + label, len(facts), n_done, cost, _busiest(times, workers), len(items)))
    return Plan(
        model.info.name,
        len(facts),
        sum(_weights_by_device(model).values()),
        plans,
        per_block,
        per_forward,
        per_row,
        per_pass,
        weights_by_device=_weights_by_device(model) if model.device_map else None,
        executor=job.executor,
        workers=workers,
        workers_assumed=job.executor == "ray" and job.workers is None,
        load_seconds=timings.get("load_model_s", 0.0),
    )


PROBE_TOKENS = 64
PROBE_ROWS = 8
"""The throughput probe: its cost is bounded by ``PROBE_ROWS × PROBE_TOKENS`` tokens (:func:`_throughput`)."""
PROBE_VOCAB_ROWS = 64
"""Vectors read out over the vocabulary, in one pass, to measure the seconds per vocabulary row
(fewer when a readout chunk holds fewer)."""

DEFAULT_WORKERS = 2
"""Ray workers assumed when ``--workers`` is not given (the executor's default without GPUs)."""


def _busiest(times: list[float], workers: int) -> float:
    """Time of the busiest of ``workers`` when items are dealt to whichever worker is free first."""
    load = [0.0] * max(workers, 1)
    for t in times:
        load[load.index(min(load))] += t
    return max(load)


def _weights_by_device(model) -> dict[str, int]:
    """Bytes of parameters per device: the accelerate device map's, or the model's one device."""
    placed = model.device_map or {"": str(model.device)}
    totals: dict[str, int] = {}
    for name, param in model.hf_model.named_parameters():
        owners = [k for k in placed if k == "" or name == k or name.startswith(f"{k}.")]
        device = placed[max(owners, key=len)] if owners else str(model.device)
        totals[device] = totals.get(device, 0) + param.numel() * param.element_size()
    return totals


@torch.inference_mode()
def _throughput(model, facts) -> tuple[float, float, float, float]:
    """``(seconds per token·block, seconds per forward, seconds per vocabulary row, seconds per
    readout pass)`` from two measured forwards and two measured readouts.

    The work estimate is for large batches (methods batch whole grids), so the throughput is
    measured on a probe of ``PROBE_ROWS`` copies of the first prompt's first ``PROBE_TOKENS``
    tokens (a bounded cost, whatever the prompts' length; the work of long prompts is counted in
    token·blocks); the fixed cost on a single token.
    """
    ids = facts.to_batch(model, [0]).input_ids[:, :PROBE_TOKENS]
    big, one = ids.expand(PROBE_ROWS, -1), ids[:, -1:]

    def best(run) -> float:
        times = []
        for _ in range(2):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return min(times)

    fixed = best(lambda: forward(model, one))
    full = best(lambda: forward(model, big))
    vectors = torch.randn(PROBE_VOCAB_ROWS, model.d_model, generator=torch.Generator().manual_seed(0))
    vectors = vectors.to(model.device, model.dtype)
    n = max(2, min(PROBE_VOCAB_ROWS, readout_chunk(model)))  # rows read in one pass
    targets = torch.zeros(n, dtype=torch.long)

    def readout(rows: int) -> float:
        return best(lambda: project_to_vocab(model, vectors[:rows], targets=targets[:rows], k=10))

    many, single = readout(n), readout(1)
    per_row = max(many - single, 0.0) / (n - 1)
    per_pass = max(single - per_row, 0.0)
    blocks = full - fixed - (PROBE_ROWS - 1) * per_row  # the probe reads out one row per prompt
    return max(blocks, 1e-9) / (big.numel() * model.n_layers), fixed, per_row, per_pass


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
