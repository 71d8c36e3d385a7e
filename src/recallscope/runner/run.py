"""Execute a :class:`~recallscope.runner.job.Job`: chunk the facts, run each method, store, resume.

For each method the runner fixes the config (preset, overrides, seed, then the method's
dataset-wide ``prepare`` such as the causal-tracing noise level), derives the store key from
method, config and model, and runs the facts not yet done in fixed chunks (``CHUNK_SIZE`` facts or
``--batch-size``). The chunk partition depends only on the fact list, so a resumed run computes
exactly the chunks an uninterrupted run would. A chunk that fails with a recallscope error is
retried fact by fact; a fact that still fails is recorded as skipped with its reason, and the run
goes on. A method that requires another's result runs after it and gets its stored rows
(:mod:`~recallscope.runner.requirements`): each required result is computed once per run.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from types import ModuleType
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from recallscope.data import FactSet
from recallscope.errors import RecallscopeError
from recallscope.methods import REGISTRY
from recallscope.runner.folder import claim
from recallscope.runner.job import (
    Job,
    content_hash,
    facts_frame,
    load_dataset,
    method_configs,
    model_key,
    select_facts,
)
from recallscope.runner.requirements import Source, load_given, plan_requirements, run_order
from recallscope.runner.store import Store, utc_now

__all__ = ["run_job", "prepare_job", "chunks", "WorkItem", "run_item", "LocalExecutor"]


def _digest(values) -> str:
    return hashlib.sha256("\x00".join(values).encode()).hexdigest()[:8]


def fact_digest(fact) -> str:
    """A short hash of what a fact's results depend on (so an edited fact is redone on resume)."""
    content = [fact.fact_id, fact.subject, fact.prompt, list(fact.answers), list(fact.subject_span or ())]
    content.append(list(fact.relation_span or ()))
    for partner in ("counterfactual", "subject_swap"):  # path patching and subject swap read these prompts
        if partner in fact.attributes:
            content.append(fact.attributes[partner]["prompt"])
    return content_hash(content)


def chunks(n_facts: int, size: int) -> list[range]:
    """The fixed partition of ``n_facts`` into consecutive chunks of ``size``."""
    return [range(start, min(start + size, n_facts)) for start in range(0, n_facts, size)]


def prepare_job(
    job: Job, model=None, store: Store | None = None, log: Callable[[str], None] = print, write: bool = True
):
    """Load the model, select the facts, fix every config: ``(model, facts, configs, timings)``."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    if model is None:
        log(f"loading {job.model} ...")
        model = job.load_model()
    timings["load_model_s"] = time.perf_counter() - start
    start = time.perf_counter()
    dataset = load_dataset(model, job)
    facts = select_facts(model, job, store, write=write, dataset=dataset)
    timings["select_facts_s"] = time.perf_counter() - start
    if not len(facts):
        raise RecallscopeError(
            f"no fact to analyse in {job.dataset!r}"
            + (" that the model knows: try --all-facts" if job.known_only else "")
        )
    configs = {}
    for name, config in method_configs(job).items():
        prepare = getattr(REGISTRY[name], "prepare", None)
        configs[name] = prepare(model, facts, config, dataset=dataset) if prepare else config
    return model, facts, configs, timings


def run_job(
    job: Job, *, model=None, progress: bool = True, report: bool = True, overwrite: bool = False
) -> Store:
    """Run ``job`` (resuming finished work in ``job.out``) and write its report; return the store.

    ``job.out`` is claimed first (:func:`~recallscope.runner.folder.claim`): a folder holding
    another job is refused unless ``overwrite``, which deletes that run's files first.
    """
    log = tqdm.write if progress else (lambda _: None)
    store = Store(job.out)
    with claim(job, store, overwrite=overwrite):
        _run_claimed(job, store, model, progress, log)
        if report:
            from recallscope.report import write_report

            log(f"report: {write_report(store.root)}")
    return store


def _run_claimed(job: Job, store: Store, model, progress: bool, log: Callable[[str], None]) -> None:
    given = model is not None  # a model object from the caller: executors ship it to their workers
    model, facts, configs, timings = prepare_job(job, model, store, log)
    store.write_facts(facts_frame(facts))
    manifest = _manifest(job, model, facts, timings)
    previous = store.read_manifest()
    manifest["first_started"] = previous.get("first_started", previous.get("started", manifest["started"]))
    manifest["status"] = "running"
    store.write_manifest(manifest)
    mkey = model_key(model)
    plan = plan_requirements(configs)
    executor = make_executor(job, model, facts, given=given, log=log)
    keys: dict[tuple[str, str], str] = {}  # (method, config hash) → the store key of its result

    def run(name: str, config, sources=None, combine: bool = True) -> dict[str, Any]:
        key = f"{config.stable_hash()}-{mkey}"
        return _run_method(
            REGISTRY[name], model, facts, config, store, key, job, progress, executor,
            sources=sources, keys=keys, combine=combine,
        )  # fmt: skip

    try:
        for name in run_order(configs, plan):
            for source in plan.get(name, {}).values():
                if not source.in_run and (source.method, source.config.stable_hash()) not in keys:
                    entry = run(source.method, source.config, combine=False)
                    manifest.setdefault("requirements", {})[f"{source.method}-{entry['store_key']}"] = entry
            manifest["methods"][name] = run(name, configs[name], plan.get(name))
            store.write_manifest(manifest)
    finally:
        executor.close()
    manifest["methods"] = {name: manifest["methods"][name] for name in configs}  # the job's order
    if store.repairs:
        manifest["repairs"] = store.repairs
    manifest.update(status="complete", finished=utc_now())
    store.write_manifest(manifest)


@dataclass
class ChunkOutput:
    """What one chunk produced, ready for the store."""

    frame: pd.DataFrame
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    arrays: dict[str, Any] = field(default_factory=dict)
    conventions: dict[str, Any] = field(default_factory=dict)
    skipped: list[list[str]] = field(default_factory=list)
    handover: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, result) -> ChunkOutput:
        conventions = result.provenance.get("conventions", {})
        skipped = [list(s) for s in result.skipped]
        handover = getattr(result, "handover", dict)()  # (a result that is no MethodResult has none)
        return cls(result.to_frame(), result.tables(), result.arrays(), conventions, skipped, handover)

    @classmethod
    def merge(cls, outputs: list[ChunkOutput], skipped: list[list[str]]) -> ChunkOutput:
        if not outputs:
            return cls(pd.DataFrame({"fact_id": pd.Series([], dtype=object)}), skipped=skipped)
        names = outputs[0].tables
        return cls(
            pd.concat([o.frame for o in outputs], ignore_index=True),
            {n: pd.concat([o.tables[n] for o in outputs], ignore_index=True) for n in names},
            {k: v for o in outputs for k, v in o.arrays.items()},
            outputs[0].conventions,
            [s for o in outputs for s in o.skipped] + skipped,
            {k: v for o in outputs for k, v in o.handover.items()},
        )

    @property
    def fact_ids(self) -> list[str]:
        return list(dict.fromkeys(self.frame["fact_id"])) if "fact_id" in self.frame else []


def whole_dataset(module: ModuleType, config) -> bool:
    """Whether ``module`` needs every fact in one call (``needs_all_facts(config)``, e.g. a fit on a
    training split evaluated on held-out facts, or a regression pooled over the dataset).
    """
    check = getattr(module, "needs_all_facts", None)
    return bool(check is not None and check(config))


def chunking(module: ModuleType, config, job, facts: FactSet, key: str) -> tuple[int, str]:
    """``(chunk size, store key)`` of a method: its ``CHUNK_SIZE`` (or ``--batch-size``), or, for a
    whole-dataset method, one chunk under a key that also hashes the fact list (a different sample
    is a different result, never mixed with the old one).
    """
    if whole_dataset(module, config):
        return max(len(facts), 1), f"{key}-{_digest([fact_digest(f) for f in facts])}"
    return job.batch_size or getattr(module, "CHUNK_SIZE", 8), key


@dataclass(frozen=True)
class WorkItem:
    """One unit of work: a method's config on some facts, stored as chunk ``chunk`` under ``key``.

    ``indices`` point into the job's fact list; ``whole`` marks a whole-dataset call; ``given``
    holds the stored results the method requires, for these facts (attached just before the item
    runs). A work item is all an executor needs (with the model and the facts) to produce a
    :class:`ChunkOutput`.
    """

    method: str
    config: Any
    key: str
    chunk: str
    indices: tuple[int, ...]
    whole: bool = False
    given: tuple[tuple[str, Any], ...] = ()


def run_item(model, facts: FactSet, item: WorkItem) -> ChunkOutput:
    """What ``item`` produces on ``model``: the same wherever it runs (any executor calls this)."""
    module = REGISTRY[item.method]
    given = {"given": dict(item.given)} if item.given else {}
    if item.whole:
        return _run_whole(module, model, facts, item.config, given)
    return _run_chunk(module, model, facts, list(item.indices), item.config, given)


def work_items(module: ModuleType, facts: FactSet, config, key: str, job, store: Store | None):
    """``(items, store key, chunk size, digests)``: the chunks of ``module`` still to do."""
    size, key = chunking(module, config, job, facts, key)
    current = {f.fact_id: fact_digest(f) for f in facts}
    done = store.done_facts(module.NAME, key, current) if store is not None else set()
    whole = whole_dataset(module, config)
    items = []
    for rows in chunks(len(facts), size):
        indices = tuple(i for i in rows if facts[i].fact_id not in done)
        if indices:
            chunk = f"{rows.start:06d}-{_digest([current[facts[i].fact_id] for i in indices])}"
            items.append(WorkItem(module.NAME, config, key, chunk, indices, whole))
    return items, key, size, current


def _run_method(
    module: ModuleType,
    model,
    facts,
    config,
    store: Store,
    key,
    job,
    progress,
    executor,
    *,
    sources: Mapping[str, Source] | None = None,
    keys: dict[tuple[str, str], str],
    combine: bool = True,
):
    """Run the facts not done yet, chunk by chunk; combine; return the method's manifest entry.

    The executor runs the work items (here, or on workers) and hands back each finished chunk as
    soon as it is done; the chunk is written to the store at once, so a stopped run keeps it.
    ``sources``: the results the method requires (each stored under ``keys``), whose rows each
    item gets; ``combine``: write ``results/`` (not for a result computed only as a requirement).
    """
    name = module.NAME
    items, key, size, current = work_items(module, facts, config, key, job, store)
    keys[(name, config.stable_hash())] = key
    sources = dict(sources or {})
    given = {m: keys[(s.method, s.config.stable_hash())] for m, s in sources.items()}

    def attach(item: WorkItem) -> WorkItem:
        wanted = [facts[i].fact_id for i in item.indices]
        loaded = tuple((m, load_given(store, s, given[m], current, wanted)) for m, s in sources.items())
        return replace(item, given=loaded)

    n_todo = sum(len(item.indices) for item in items)
    bar = tqdm(total=len(facts), initial=len(facts) - n_todo, desc=name, unit="fact", disable=not progress)
    with bar:
        for item, output, seconds in executor.map(items, attach if sources else None):
            record = {
                "fact_ids": output.fact_ids,
                "digests": {facts[i].fact_id: current[facts[i].fact_id] for i in item.indices},
                "skipped": output.skipped,
                "seconds": round(seconds, 3),
                "conventions": output.conventions,
                "finished": utc_now(),
            }
            store.write_chunk(
                name, key, item.chunk, output.frame, output.tables, output.arrays, record, output.handover
            )
            bar.update(len(item.indices))
    sizes = store.combine(name, key, current) if combine else {}
    records = store.valid_records(name, key, current)
    n_done = sum(len(r["valid"].intersection(r["fact_ids"])) for r in records)
    seconds = sum(r["seconds"] for r in records)
    return {
        "description": module.DESCRIPTION,
        "config": config.to_dict(),
        "config_hash": config.stable_hash(),
        "store_key": key,
        "conventions": next((r["conventions"] for r in records if r["conventions"]), {}),
        **({"given": given} if given else {}),
        "n_facts": n_done,
        "rows": sizes,
        "skipped": [s for r in records for s in r["skipped"] if s[0] in r["valid"]],
        "chunks": len(records),
        "chunk_size": size,
        "seconds": round(seconds, 3),  # the chunks' own times are kept to 1 ms
        "facts_per_second": round(n_done / seconds, 4) if seconds else None,
    }


class LocalExecutor:
    """Runs work items one after the other in this process, on the job's model."""

    name = "local"

    def __init__(self, model, facts: FactSet) -> None:
        self.model, self.facts = model, facts

    def map(
        self, items: list[WorkItem], attach: Callable[[WorkItem], WorkItem] | None = None
    ) -> Iterator[tuple[WorkItem, ChunkOutput, float]]:
        """``(item, output, seconds)`` for each item, as each finishes; ``attach`` adds what an item
        needs from the store (its required results) just before it runs.
        """
        for item in items:
            item = attach(item) if attach else item
            start = time.perf_counter()
            output = run_item(self.model, self.facts, item)
            yield item, output, time.perf_counter() - start

    def close(self) -> None:
        pass


def make_executor(
    job: Job, model, facts: FactSet, *, given: bool = False, log: Callable[[str], None] = print
):
    """The executor ``job.executor`` names, ready to run work items of ``facts``.

    ``given``: ``model`` was built by the caller (not loadable from ``job.model``), so a remote
    executor ships it to its workers instead of loading ``job.model`` there.
    """
    if job.executor == "ray":
        from recallscope.runner.ray_executor import RayExecutor

        return RayExecutor(job, model, facts, given=given, log=log)
    return LocalExecutor(model, facts)


def _run_chunk(module, model, facts: FactSet, indices: list[int], config, given) -> ChunkOutput:
    """The output for the facts at ``indices``; a failing chunk is retried fact by fact, and a fact
    that fails alone is reported skipped with its error.
    """
    if len(indices) > 1:
        try:
            return _run_facts(module, model, facts, indices, config, given)
        except RecallscopeError:
            pass  # find the failing facts below
    outputs, skipped = [], []
    for i in indices:
        try:
            outputs.append(_run_facts(module, model, facts, [i], config, given))
        except RecallscopeError as err:
            skipped.append([facts[i].fact_id, str(err)])
    return ChunkOutput.merge(outputs, skipped)


def _run_facts(module, model, facts: FactSet, indices: list[int], config, given) -> ChunkOutput:
    subset = facts.with_facts([facts[i] for i in indices], {"step": "chunk"})
    return ChunkOutput.of(module.run(model, subset, config, **given))


def _run_whole(module, model, facts: FactSet, config, given) -> ChunkOutput:
    """A whole-dataset method's output; if it fails, every fact is reported skipped with the error."""
    try:
        return ChunkOutput.of(module.run(model, facts, config, **given))
    except RecallscopeError as err:
        return ChunkOutput.merge([], [[f.fact_id, str(err)] for f in facts])


def _manifest(job: Job, model, facts: FactSet, timings: dict[str, float]) -> dict[str, Any]:
    from recallscope import __version__

    return {
        "recallscope": __version__,
        "started": utc_now(),
        "job": {**job.to_dict(), "fact_sample_seed": job.seed or 0},
        "model": model.provenance(),
        "model_key": model_key(model),
        "dataset": {
            "name": facts.name,
            "n_facts": len(facts),
            "relations": facts.counts(),
            "provenance": facts.provenance,
            "skipped": [str(s) for s in facts.skipped],
        },
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "methods": {},
    }
