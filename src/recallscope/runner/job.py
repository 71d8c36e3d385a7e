"""What a run does: which model, which facts, which methods with which configs.

A :class:`Job` is what ``recallscope run``/``plan`` build from their flags; :func:`select_facts` and
:func:`method_configs` turn it into the facts and the ``(method, config)`` pairs the runner executes.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import random
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pandas as pd

from recallscope.data import FactSet, generate_lists, load_facts
from recallscope.data.builtin import one_to_many_names
from recallscope.data.loaders import check_source
from recallscope.data.variants import add_relation_context, add_swap_partners, shot_variants
from recallscope.defaults import DEFAULT_LIMIT, DEFAULT_MODEL
from recallscope.errors import RecallscopeError
from recallscope.methods import REGISTRY

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "Job",
    "DEFAULT_LIMIT",
    "resolve_methods",
    "method_configs",
    "load_dataset",
    "select_facts",
    "load_config_file",
]

EXECUTORS = ("local", "ray")


@dataclass(frozen=True, kw_only=True)
class Job:
    """One analysis run.

    Attributes:
        out: output folder.
        model: model name (embedded name, hub id, local folder or ``.gguf``).
        dataset: built-in dataset name or file path.
        methods: method names; empty or ``("all",)`` means every registered method (stored resolved).
        limit: analyse at most this many facts (a seeded sample, in dataset order); None: all.
        known_only: keep only facts the model answers correctly (first token).
        device, dtype: where and in which precision the model runs (None: defaults).
        device_map: spread the model over devices with accelerate (``"auto"`` …, or a
            ``{module: device}`` mapping; see :func:`~recallscope.models.load.load_model`), with
            ``max_memory`` per device and ``offload_folder`` for weights offloaded to disk.
        executor: ``"local"`` (this process) or ``"ray"`` (facts sharded over Ray workers, each
            holding the model; ``pip install -e '.[ray]'``).
        ray_address: the Ray cluster to join (``"auto"``, ``"ray://head:10001"``); None starts a
            local one.
        workers: Ray workers (None: one per GPU of the cluster, or 2 on a cluster without GPUs).
        batch_size: facts per chunk for every method (None: each method's ``CHUNK_SIZE``).
        seed: seed of the fact sample and, when given, of every method with a ``seed`` field.
        shots: prompt variants by number of demonstrations (``(0, 1)``: each selected fact zero-shot
            and with one demonstration of its relation; Lv et al. L8). Single-answer datasets only.
        configs: per method, config fields (and optionally ``preset``) overriding the defaults.
    """

    out: Path
    model: str = DEFAULT_MODEL
    dataset: str = "mixed"
    methods: tuple[str, ...] = ()
    limit: int | None = DEFAULT_LIMIT
    known_only: bool = True
    device: str | None = None
    dtype: str | None = None
    device_map: str | Mapping[str, Any] | None = None
    max_memory: Mapping[str, Any] | None = None
    offload_folder: str | None = None
    executor: str = "local"
    ray_address: str | None = None
    workers: int | None = None
    batch_size: int | None = None
    seed: int | None = None
    shots: tuple[int, ...] = (0,)
    configs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        if self.limit is not None and self.limit < 1:
            raise RecallscopeError(
                f"limit must be a positive number of facts (or None for all), got {self.limit}"
            )
        shots = tuple(sorted(set(int(n) for n in self.shots)))
        if not shots or shots[0] < 0:
            raise RecallscopeError(
                f"shots must be numbers of demonstrations >= 0 such as (0, 1), got {self.shots}"
            )
        object.__setattr__(self, "shots", shots)
        if self.executor not in EXECUTORS:
            raise RecallscopeError(
                f"unknown executor {self.executor!r}: expected one of {', '.join(EXECUTORS)}"
            )
        if self.workers is not None and self.workers < 1:
            raise RecallscopeError(f"workers must be a positive number of Ray workers, got {self.workers}")
        if self.batch_size is not None and self.batch_size < 1:
            raise RecallscopeError(f"batch_size must be positive, got {self.batch_size}")
        _check_dtype(self.dtype)
        _check_device(self.device)
        _check_model(self.model)
        check_source(self.dataset)  # an unknown name or a missing file, before any model loads
        names = tuple(m.NAME for m in resolve_methods(self.methods))
        object.__setattr__(self, "methods", names)
        unknown = set(self.configs) - set(REGISTRY)
        if unknown:
            raise RecallscopeError(
                f"the config has sections for unknown method(s) {sorted(unknown)}; "
                f"registered methods: {', '.join(REGISTRY)}"
            )
        method_configs(self)  # unknown fields and presets fail here, before any model is loaded

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "out": str(self.out),
            "configs": {k: dict(v) for k, v in self.configs.items()},
            "device_map": dict(self.device_map) if isinstance(self.device_map, Mapping) else self.device_map,
            "max_memory": None if self.max_memory is None else dict(self.max_memory),
        }

    def load_model(self):
        """The job's model, placed as the job says (device, dtype, device map)."""
        from recallscope.models.load import load_model

        return load_model(
            self.model,
            dtype=self.dtype,
            device=self.device,
            device_map=self.device_map,
            max_memory=self.max_memory,
            offload_folder=self.offload_folder,
        )


def resolve_methods(names: tuple[str, ...] | list[str]) -> list[ModuleType]:
    """The method modules for ``names`` (empty or ``("all",)``: every registered method)."""
    if not names or tuple(names) == ("all",):
        return list(REGISTRY.values())
    modules = []
    for name in names:
        if name not in REGISTRY:
            close = difflib.get_close_matches(name, REGISTRY, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise RecallscopeError(
                f"unknown method {name!r}; {hint}registered methods: {', '.join(REGISTRY)} "
                "(`recallscope methods` describes them)"
            )
        modules.append(REGISTRY[name])
    return modules


def method_configs(job: Job) -> dict[str, Any]:
    """``{method name: Config}``: defaults or a preset, the job's overrides, and the job's seed."""
    configs = {}
    for module in resolve_methods(job.methods):
        values = dict(job.configs.get(module.NAME, {}))
        preset = values.pop("preset", None)
        fields = module.Config.__dataclass_fields__
        if job.seed is not None and "seed" in fields and "seed" not in values:
            values["seed"] = job.seed
        configs[module.NAME] = (
            module.Config.preset(preset, **values) if preset else module.Config.from_dict(values)
        )
    return configs


def load_config_file(path: str | Path) -> dict[str, dict[str, Any]]:
    """Per-method config sections from a TOML or JSON file.

    TOML example::

        [causal_tracing]
        preset = "rome"
        samples = 3
        kinds = ["hidden"]
    """
    path = Path(path)
    if not path.exists():
        raise RecallscopeError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        values = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
        raise RecallscopeError(f"config file {path} is not valid {path.suffix[1:].upper()}: {err}") from None
    if not isinstance(values, dict) or any(not isinstance(v, dict) for v in values.values()):
        raise RecallscopeError(
            f"config file {path}: expected one section (table) per method, e.g. [causal_tracing]"
        )
    return values


def model_key(model) -> str:
    """A short hash of what determines a model's numbers (name, weights, dtype, device type)."""
    prov = model.provenance()
    keep = {k: prov.get(k) for k in ("name", "source", "revision", "file_sha256", "dtype", "model_class")}
    keep["device"] = str(model.device).split(":")[0]
    return content_hash(keep)


def content_hash(value: Any) -> str:
    """A short hash of a JSON-able ``value`` (store keys, fact digests, cache keys)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12]


def load_dataset(model, job: Job) -> FactSet:
    """The job's whole dataset as loaded (every fact that fits the context, before any sampling or
    filter): the pool of counterfactual and swap partners and of dataset-wide calibrations such as
    the causal-tracing noise level, so they do not change with ``--limit``, ``--seed`` or the known filter.
    One-to-many datasets load every template.
    """
    if job.dataset in one_to_many_names():
        return load_facts(job.dataset, templates="all").fit_context(model)
    return load_facts(job.dataset).fit_context(model)


def select_facts(
    model, job: Job, store=None, *, write: bool = True, dataset: FactSet | None = None
) -> FactSet:
    """Load the dataset, drop facts beyond the context, keep known ones, take the seeded sample.

    With ``known_only`` and a ``limit``, facts are tested in a seeded random order until ``limit``
    known ones are found (a uniform sample of the known facts, without testing the whole dataset),
    then kept in dataset order. With a ``store``, verdicts are read from ``known.json`` and, with
    ``write``, saved there. With ``job.shots``, each chosen fact comes in every shot variant (a few-shot
    variant the model does not know is dropped under ``known_only``). Every fact gets a counterfactual
    partner, a subject-swap partner and its relation's answers from the whole loaded dataset
    (:func:`~recallscope.data.variants.add_relation_context`,
    :func:`~recallscope.data.variants.add_swap_partners`);
    ``dataset`` is that dataset when the caller has loaded it already (:func:`load_dataset`).
    """
    facts = load_dataset(model, job) if dataset is None else dataset
    if job.dataset in one_to_many_names():
        if job.shots != (0,):
            raise RecallscopeError("--shots applies to single-answer datasets, not to one-to-many lists")
        return select_lists(model, job, store, write=write, dataset=facts)
    verdicts = _cached_verdicts(model, store)
    chosen = _known_sample(model, job, facts, verdicts)
    if job.shots != (0,):
        chosen = shot_variants(chosen, job.shots, pool=list(facts), seed=job.seed or 0).fit_context(model)
        if job.known_only:
            chosen = _known_only(model, chosen, verdicts)
    if store is not None and write and job.known_only:
        store.write_json("known.json", {"model_key": model_key(model), "verdicts": verdicts})
    chosen = add_relation_context(chosen, pool=list(facts), seed=job.seed or 0)
    return add_swap_partners(model, chosen, pool=list(facts), seed=job.seed or 0)


def known_key(fact) -> str:
    """The key of a fact's known-filter verdict: its id and a hash of the prompt and answers it was
    judged on, so that an edited fact is judged again instead of reusing a stale verdict.
    """
    return f"{fact.fact_id}@{content_hash([fact.prompt, list(fact.answers)])}"


def _judge(model, facts: FactSet, todo: list, verdicts: dict[str, bool]) -> None:
    """Add the verdicts of the facts ``todo`` (a list of facts of ``facts``) to ``verdicts``."""
    kept = {f.fact_id for f in facts.with_facts(todo, {"step": "chunk"}).known_by(model)}
    verdicts.update({known_key(f): f.fact_id in kept for f in todo})


def _known_only(model, facts: FactSet, verdicts: dict[str, bool]) -> FactSet:
    """The facts the model knows (verdicts cached in ``verdicts``, updated in place)."""
    todo = [f for f in facts if known_key(f) not in verdicts]
    for start in range(0, len(todo), _KNOWN_BATCH):
        _judge(model, facts, todo[start : start + _KNOWN_BATCH], verdicts)
    step = {"step": "known_by", "model": model.info.name, "criterion": "first_token", "variants": True}
    return facts.with_facts([f for f in facts if verdicts[known_key(f)]], step)


def _known_sample(model, job: Job, facts: FactSet, verdicts: dict[str, bool]) -> FactSet:
    """The seeded sample of ``job.limit`` facts (known ones with ``job.known_only``), in dataset order."""
    seed = job.seed or 0
    if not job.known_only:
        return facts.sample(job.limit, seed=seed) if job.limit is not None else facts
    order = list(range(len(facts)))
    if job.limit is not None:
        random.Random(seed).shuffle(order)
    known: list[int] = []
    checked = 0
    while checked < len(order) and (job.limit is None or len(known) < job.limit):
        block = order[checked : checked + _KNOWN_BATCH]
        checked += len(block)
        todo = [facts[i] for i in block if known_key(facts[i]) not in verdicts]
        if todo:
            _judge(model, facts, todo, verdicts)
        known += [i for i in block if verdicts[known_key(facts[i])]]
    step = {
        "step": "known_by",
        "model": model.info.name,
        "criterion": "first_token",
        "checked": checked,
        "known_among_checked": len(known),
        "seed": seed,
    }
    chosen = sorted(known[: job.limit] if job.limit is not None else known)
    return facts.with_facts([facts[i] for i in chosen], step)


_KNOWN_BATCH = 32
"""Facts tested per forward by the known filter."""


def select_lists(
    model, job: Job, store=None, *, write: bool = True, dataset: FactSet | None = None
) -> FactSet:
    """One-to-many datasets: the model's own k-item lists, as per-step facts (Yan & Jia, §2.1).

    Every template of every subject is a candidate list. In a seeded random order (with a
    ``limit``), lists are generated greedily in blocks until ``limit`` of them are kept: k distinct
    items that are all in the gold list (``known_only``) or just k distinct items (``--all-facts``).
    The kept lists, in dataset order, become ``k`` step facts each (:meth:`OneToManySet.to_facts`).
    Generated texts are saved in ``one_to_many.json`` (with ``write``) and reused on resume.
    """
    facts = load_dataset(model, job) if dataset is None else dataset
    k = int(facts[0].attributes.get("k", 3))
    order = list(range(len(facts)))
    if job.limit is not None:
        random.Random(job.seed or 0).shuffle(order)
    texts = _cached_texts(model, store, facts, k)
    kept_ids: set[str] = set()
    checked = 0
    while checked < len(order) and (job.limit is None or len(kept_ids) < job.limit):
        rows = order[checked : checked + _LIST_BATCH]
        block = facts.with_facts([facts[i] for i in rows], {"step": "chunk"})
        checked += len(block)
        lists = generate_lists(model, block, k=k, correct=job.known_only, texts=texts)
        texts.update({g.fact.fact_id: g.text for g in lists.generations})
        kept_ids.update(g.fact.fact_id for g in lists.kept)
    tried = facts.with_facts([facts[i] for i in sorted(order[:checked])], {"step": "chunk"})
    lists = generate_lists(model, tried, k=k, correct=job.known_only, texts=texts)  # parses only
    chosen = [facts[i].fact_id for i in order if facts[i].fact_id in kept_ids][: job.limit]
    lists.kept = [g for g in lists.kept if g.fact.fact_id in set(chosen)]
    report = {**lists.report, "checked": checked, "kept": len(lists.kept), "seed": job.seed or 0}
    if store is not None and write:
        store.write_json(
            "one_to_many.json",
            {
                "model_key": model_key(model),
                "k": k,
                "report": report,
                "texts": texts,
                "prompts": {f.fact_id: _list_key(f, k) for f in facts if f.fact_id in texts},
                "kept": sorted(chosen),
            },
        )
    steps = lists.to_facts()
    return facts.with_facts(list(steps), {"step": "one_to_many_lists", **report})


_LIST_BATCH = 16
"""Lists generated per block by :func:`select_lists`."""


def _list_key(fact, k: int) -> str:
    """A hash of what a generated list depends on besides the model: the prompt and k."""
    return content_hash([fact.prompt, k])


def _cached_texts(model, store, facts: FactSet, k: int) -> dict[str, str]:
    """The model's saved generations (``one_to_many.json``) whose prompt and k are unchanged."""
    cached = store.read_json("one_to_many.json") if store is not None else None
    if not isinstance(cached, dict) or cached.get("model_key") != model_key(model):
        return {}
    keys = dict(cached.get("prompts", {}))
    current = {f.fact_id: _list_key(f, k) for f in facts}
    return {i: t for i, t in dict(cached.get("texts", {})).items() if keys.get(i) == current.get(i)}


def _cached_verdicts(model, store) -> dict[str, bool]:
    """The known-filter verdicts saved for this model (keyed by :func:`known_key`; an older
    ``known.json`` keyed by fact id alone matches no key, so its facts are judged again).
    """
    cached = store.read_json("known.json") if store is not None else None
    if not isinstance(cached, dict) or cached.get("model_key") != model_key(model):
        return {}
    return {k: v for k, v in dict(cached.get("verdicts", {})).items() if "@" in k and isinstance(v, bool)}


def facts_frame(facts: FactSet) -> pd.DataFrame:
    """One row per fact: what the report shows next to each result."""
    return pd.DataFrame(
        {
            "fact_id": [f.fact_id for f in facts],
            "relation": [f.relation for f in facts],
            "subject": [f.subject for f in facts],
            "prompt": [f.prompt for f in facts],
            "target": [f.target for f in facts],
            "answers": [list(f.answers) for f in facts],
            "shots": [int(f.attributes.get("shots", 0)) for f in facts],
            "base_id": [f.attributes.get("base_id", f.fact_id) for f in facts],
        }
    )


def _check_model(name: str) -> None:
    """``--model``: a path must lead to a model (a hub id is checked when it loads)."""
    from recallscope.models.load import check_model_source

    check_model_source(name)


def _check_dtype(dtype: str | None) -> None:
    """``--dtype``: a name the loader knows, checked before any model loads."""
    from recallscope.models.load import resolve_dtype

    if dtype is None:
        return
    try:
        resolve_dtype(dtype)
    except ValueError as err:
        raise RecallscopeError(f"--dtype: {err}") from None


def _check_device(device: str | None) -> None:
    """``--device``: a device torch can name and this machine has, checked before any model loads."""
    import torch

    if device is None:
        return
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise RecallscopeError(
            f"--device: unknown device {device!r}; expected cpu, cuda, cuda:N or mps"
        ) from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise RecallscopeError(
                f"--device {device}: CUDA is not available here (torch {torch.__version__}); use "
                "--device cpu, or install a CUDA build of torch"
            )
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise RecallscopeError(
                f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s) (0-based)"
            )
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise RecallscopeError(f"--device {device}: MPS is not available here; use --device cpu")
