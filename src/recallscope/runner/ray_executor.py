"""``--executor ray``: work items sharded over Ray workers, each holding the model resident.

Every worker is a Ray actor that loads the job's model once (or receives the caller's model object)
and keeps it, with the facts (shipped once to the object store), for the whole run; it then runs
work items with :func:`~recallscope.runner.run.run_item`, exactly as the local executor does. The
driver keeps every worker busy (:data:`AHEAD` items queued on each) and yields each finished chunk
as soon as it arrives, so the runner writes it to the driver's store at once: workers never touch
the store, and the cluster needs no shared filesystem.

A worker whose process dies (killed, out of memory, node lost) is restarted by Ray, and the items
it held are run again, up to :data:`RETRIES` times each; an item's result is yielded once, whatever
happened to its earlier attempts. A Python exception raised by a method is not retried: it reaches
the driver with the worker's traceback.

With GPUs, each worker gets one (``device_map`` jobs: an equal share of the cluster's GPUs), and
places its own copy of the model there; without, the cluster's CPUs are shared between workers.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator

from recallscope.data import FactSet
from recallscope.errors import RecallscopeError
from recallscope.runner.job import Job, model_key
from recallscope.runner.run import ChunkOutput, WorkItem, run_item

__all__ = ["RayExecutor", "RETRIES", "AHEAD"]

RETRIES = 3
"""Times a work item runs again after the worker holding it died."""

AHEAD = 2
"""Work items queued on each worker, so it starts the next one while the driver stores the last."""


def _import_ray():
    try:
        import ray
    except ImportError:
        raise RecallscopeError(
            "--executor ray needs Ray: pip install -e '.[ray]' in recallscope's folder "
            "(or pip install 'ray>=2.40')"
        ) from None
    return ray


def _identity(model) -> dict[str, str]:
    """What must agree between the driver's model and a worker's for results to be the same."""
    versions = model.provenance()["versions"]
    return {
        "model key": model_key(model),
        **{k: versions[k] for k in ("recallscope", "torch", "transformers")},
    }


def _share(amounts: list[float], workers: int) -> float:
    """The largest amount of a resource each of ``workers`` can hold, placed on nodes that have
    ``amounts`` of it: a whole number, or a fraction when workers outnumber the units (Ray's rule).
    """
    for each in range(int(max(amounts, default=0)), 0, -1):
        if sum(int(a // each) for a in amounts) >= workers:
            return float(each)
    return math.floor(1e4 / math.ceil(workers / max(sum(amounts), 1))) / 1e4


class _Worker:
    """A Ray actor: the model and the facts, resident; runs work items on them.

    ``shared`` (object refs of the caller's model or None, and of the facts, in a list so that Ray
    passes them unresolved) comes with every call and is read on the first one, also after a
    restart.
    """

    def __init__(self, job: Job, threads: int, expected: dict[str, str]) -> None:
        self.job, self.threads, self.expected = job, threads, expected
        self.model = self.facts = self.mismatch = None

    def _load(self, shared: list) -> None:
        if self.model is not None:
            return
        import socket

        import ray
        import torch

        torch.set_num_threads(self.threads)
        model, self.facts = ray.get(shared)
        self.model = self.job.load_model() if model is None else model
        found, expected = _identity(self.model), self.expected
        differ = [f"{k} {found[k]} (driver: {expected[k]})" for k in expected if found[k] != expected[k]]
        if differ:
            self.mismatch = (
                f"the model on Ray worker {socket.gethostname()} differs from the driver's: "
                f"{', '.join(differ)}; install the same recallscope, torch and transformers, and the same "
                "model, on every node"
            )

    def ready(self, shared: list) -> str | None:
        self._load(shared)
        return self.mismatch

    def run(self, item: WorkItem, shared: list) -> tuple[ChunkOutput, float]:
        self._load(shared)
        if self.mismatch:  # a worker restarted on another node
            raise RecallscopeError(self.mismatch)
        start = time.perf_counter()
        output = run_item(self.model, self.facts, item)
        return output, time.perf_counter() - start


class RayExecutor:
    """Runs work items on Ray workers that hold the model; yields each chunk as it finishes.

    Args:
        job: the job (``ray_address``, ``workers``, and how workers load the model).
        model: the driver's model; workers must end up with the same (same :func:`model_key`).
        facts: the job's facts, which work items index.
        given: ``model`` was built by the caller: ship it to the workers instead of loading
            ``job.model`` on each.
        log: where to say how many workers run where.
    """

    name = "ray"

    def __init__(
        self, job: Job, model, facts: FactSet, *, given: bool = False, log: Callable[[str], None] = print
    ) -> None:
        self.ray = _import_ray()
        self.job, self.model, self.facts, self.given, self.log = job, model, facts, given, log
        self.workers: list = []
        self.shared: list = []  # object refs of the model (when given) and the facts
        self.started_ray = False

    def map(
        self, items: list[WorkItem], attach: Callable[[WorkItem], WorkItem] | None = None
    ) -> Iterator[tuple[WorkItem, ChunkOutput, float]]:
        """``(item, output, seconds)`` for each item, in the order they finish; ``attach`` adds what
        an item needs from the store (read here, shipped with the item) just before it is sent.
        """
        if not items:
            return
        if not self.workers:
            self.start()
        todo = list(reversed(items))
        running: dict = {}  # object ref -> (item, worker index)
        load = [0] * len(self.workers)

        def submit() -> None:
            while todo and min(load) < AHEAD:
                w = load.index(min(load))
                item = todo.pop()
                item = attach(item) if attach else item
                running[self.workers[w].run.remote(item, self.shared)] = (item, w)
                load[w] += 1

        submit()
        while running:
            [ref], _ = self.ray.wait(list(running), num_returns=1)
            item, w = running.pop(ref)
            load[w] -= 1
            output, seconds = self._get(ref, item)
            submit()
            yield item, output, seconds

    def _get(self, ref, item: WorkItem) -> tuple[ChunkOutput, float]:
        errors = self.ray.exceptions
        try:
            return self.ray.get(ref)
        except errors.RayTaskError:  # the method raised: its own error, with the worker's traceback
            raise
        except errors.RayError as err:
            raise RecallscopeError(
                f"ray: {item.method} chunk {item.chunk} failed: its worker died and the chunk was "
                f"retried {RETRIES} times; last error: {err}"
            ) from err

    def start(self) -> None:
        """Join or start Ray, start the workers and check they hold the driver's model (``map``
        does it when it first has work; call it to have the workers ready beforehand).
        """
        ray, job = self.ray, self.job
        if not ray.is_initialized():
            if job.ray_address:
                ray.init(address=job.ray_address)
            else:
                ray.init(include_dashboard=False)
            self.started_ray = True
        where = job.ray_address or ("a local Ray" if self.started_ray else "the running Ray")
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        n_gpus = sum(n.get("GPU", 0) for n in nodes)
        device = str(self.model.device).split(":")[0]
        if device == "cuda" and not n_gpus:
            raise RecallscopeError(f"the model is on cuda but the Ray cluster ({where}) has no GPU")
        if device != "cuda" and n_gpus and job.device is None:
            raise RecallscopeError(
                f"the Ray cluster ({where}) has {n_gpus:g} GPUs but the model loaded here is on {device} "
                "(results are keyed by device type): run recallscope on a node with a GPU, or pass "
                "--device cpu to run the workers on CPUs"
            )
        n = job.workers or (int(n_gpus) if device == "cuda" else 2)
        if device == "cuda":
            gpus = _share([a.get("GPU", 0) for a in nodes], n)
            resources = {"num_cpus": 1, "num_gpus": gpus if job.device_map else min(gpus, 1)}
        else:
            resources = {"num_cpus": _share([a.get("CPU", 0) for a in nodes], n)}
        threads = max(1, int(resources["num_cpus"]))
        placed = job if job.device_map else dataclasses.replace(job, device=device)
        self.shared = [ray.put(self.model if self.given else None), ray.put(self.facts)]
        actor = ray.remote(_Worker).options(max_restarts=-1, max_task_retries=RETRIES, **resources)
        self.workers = [actor.remote(placed, threads, _identity(self.model)) for _ in range(n)]
        each = " + ".join(f"{resources[k]:g} {k[4:-1].upper()}" for k in sorted(resources, reverse=True))
        self.log(f"ray: {n} worker{'s' * (n > 1)} on {where} ({device}; {each} each)")
        try:
            problems = ray.get([w.ready.remote(self.shared) for w in self.workers])
        except ray.exceptions.RayError as err:
            raise RecallscopeError(f"ray: a worker could not start: {err}") from err
        if any(problems):
            raise RecallscopeError(next(p for p in problems if p))

    def close(self) -> None:
        """Stop the workers; disconnect from Ray if this executor connected (a local Ray it started
        stops, a cluster keeps running).
        """
        for worker in self.workers:
            self.ray.kill(worker)
        self.workers, self.shared = [], []
        if self.started_ray:
            self.ray.shutdown()
            self.started_ray = False
