"""What every method shares: configs with presets, costs, and the provenance each result records.

The method protocol (what the runner, ``recallscope plan`` and the report rely on). A method
module defines:

- ``NAME`` and ``DESCRIPTION`` (one line, shown by ``recallscope methods``);
- ``Config``: a frozen :class:`MethodConfig` with documented fields, clean defaults and each
  paper's exact behaviour as a preset;
- ``run(model, facts_or_batch, config) -> Result``; the result is a dataclass subclassing
  :class:`MethodResult` (``provenance``, ``skipped`` as ``(fact_id, reason)``) with ``to_frame()``
  (tidy rows with a ``fact_id`` column), ``tables()`` (extra tidy tables by name, may be empty) and
  ``arrays()`` (named arrays keyed ``"<fact_id>/<name>"``);
- ``cost(model, batch, config) -> Cost``: forward passes, work and peak memory, without running;
- optionally ``prepare(model, facts, config, dataset=None) -> Config``: calibration done once before
  the facts are split into chunks; ``dataset`` is the whole loaded dataset (before sampling and the
  known filter; ``facts`` when None), e.g. for the causal-tracing noise level;
- ``CHUNK_SIZE``: facts per chunk the runner uses by default;
- optionally ``needs_all_facts(config) -> bool``: true when a result depends on the whole fact
  list (a fit on a training split evaluated on held-out facts, a pooled regression, a mean over
  the dataset). The runner then calls ``run`` once with every fact (the method batches its own
  forwards) under a store key that hashes the fact list;
- optionally ``requires(config) -> {method name: {field: value}}``: the results of other methods
  this one reuses, with the config values it needs them under (declared, never imported). ``run``
  then takes ``given`` (method name → :class:`Given`) and gets each with :meth:`Given.obtain`: the
  runner computes a required method once per run (the run's own result when its config
  :meth:`~MethodConfig.serves` the need), stores it and hands the stored rows over; called alone,
  ``run`` computes it. ``cost`` then takes ``given`` too, and counts the required methods not
  given (:meth:`Given.cost`). The result class of a method others reuse may add
  :meth:`MethodResult.handover`: arrays they read that ``arrays()`` does not keep. No method
  imports another.

Methods do no file I/O, plotting or progress bars. :func:`check_method` checks this shape;
``recallscope.methods.register`` (or the ``recallscope.methods`` entry point of another package)
adds a method that has it.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import html
import inspect
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from recallscope.core.decoding import choose_targets, logit_minus_mean
from recallscope.core.dtypes import upcast as wide
from recallscope.core.patching import window
from recallscope.core.tokens import as_batch
from recallscope.errors import RecallscopeError
from recallscope.methods.hints import check_fields

__all__ = [
    "check_method",
    "MethodConfig",
    "MethodResult",
    "Given",
    "required_config",
    "Cost",
    "result_provenance",
    "head_frame",
    "as_batch",
    "window",
    "wide",
    "choose_targets",
    "logit_minus_mean",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class MethodConfig:
    """Base of method configs: presets, dict round-trip with strict keys."""

    PRESETS: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    preset_name: str | None = None
    """The preset this config started from, if any (recorded in results)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every config checks its values against the fields' type hints first
        (:func:`~recallscope.methods.hints.check_fields`), then runs its own ``__post_init__``.
        """
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")
        if getattr(own, "_checks_hints", False):
            return

        def __post_init__(self) -> None:
            check_fields(self)
            if own is not None:
                own(self)

        __post_init__._checks_hints = True  # type: ignore[attr-defined]
        cls.__post_init__ = __post_init__  # type: ignore[method-assign]

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> MethodConfig:
        """The config of preset ``name`` (e.g. ``"rome"``), with ``overrides`` on top."""
        if name not in cls.PRESETS:
            raise RecallscopeError(
                f"{cls.__name__} has no preset {name!r}; presets: {', '.join(cls.PRESETS) or 'none'}"
            )
        return cls.from_dict({**cls.PRESETS[name], **overrides, "preset_name": name})

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> MethodConfig:
        """Build a config from a mapping, rejecting unknown keys with a suggestion."""
        fields = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in fields:
                close = difflib.get_close_matches(key, fields, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; fields: {', '.join(sorted(fields))}"
                raise RecallscopeError(f"{cls.__name__} has no field {key!r}{hint}")
        converted = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**converted)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def serves(self, need: MethodConfig) -> bool:
        """Whether a result computed under this config holds everything, with the same numbers, that
        one under ``need`` would (then the runner hands it to a method that requires ``need``).
        By default: the same fields, but for the preset's name.
        """
        mine, theirs = self.to_dict(), need.to_dict()
        return type(self) is type(need) and all(mine[k] == theirs[k] for k in mine if k != "preset_name")

    def stable_hash(self) -> str:
        """A short hash of the method's name and every field but ``preset_name`` (part of the
        result-store key). The name is the module's own, spelled as when every method was a module
        of ``recallscope.methods``, so stored runs stay resumable whichever folder holds the method.
        """
        values = {k: v for k, v in self.to_dict().items() if k != "preset_name"}
        text = json.dumps(values, sort_keys=True, default=str)
        method = type(self).__module__.rsplit(".", 1)[-1]
        return hashlib.sha256(f"recallscope.methods.{method}:{text}".encode()).hexdigest()[:12]


@dataclasses.dataclass(frozen=True, kw_only=True)
class MethodResult:
    """What every method's result carries besides its numbers (subclasses add those, and
    ``to_frame``, ``tables``, ``arrays`` and ``summary``).
    """

    config: MethodConfig
    """The config the result was computed with."""
    fact_ids: list[str]
    """The facts with results, in order (rows of the ``[fact, …]`` arrays)."""
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The model's provenance, the config and the conventions the numbers depend on
    (:func:`result_provenance`)."""
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    """``(fact_id, reason)`` of every fact left out."""

    @property
    def method(self) -> str:
        """The method's name (the ``NAME`` of the module that defines the result)."""
        return getattr(sys.modules[type(self).__module__], "NAME", type(self).__name__)

    def summary(self) -> pd.DataFrame:
        """This result's summary across its facts (one name for every method; over a whole run,
        the method module's ``summary`` of the stored table gives the same).
        """
        raise NotImplementedError(f"{type(self).__name__} defines no summary")

    def _repr_html_(self) -> str:
        """Jupyter: the method, its facts and skips, and its summary table (escaped by pandas)."""
        head = (
            f"<p><b>{html.escape(self.method)}</b>: {len(self.fact_ids)} facts, "
            f"{len(self.skipped)} skipped</p>"
        )
        try:
            summary = self.summary()
        except NotImplementedError:
            return head
        return head + summary.to_html(max_rows=40, escape=True, index=False)

    def plot(self, folder=None):
        """This result's report section (the report's own figures and tables; PNG and SVG files in
        ``folder``, a temporary one by default), shown inline in Jupyter.
        """
        from recallscope.report.result_view import plot_result

        return plot_result(self, folder)

    def per_fact(self, **named: Any) -> dict[str, np.ndarray]:
        """``"<fact_id>/<name>"`` → row ``i`` of each ``[fact, …]`` array in ``named``, for fact ``i``
        of ``self.fact_ids`` (what most ``arrays()`` return).
        """
        return {f"{fact}/{name}": a[i] for i, fact in enumerate(self.fact_ids) for name, a in named.items()}

    def handover(self) -> dict[str, np.ndarray]:
        """Arrays keyed ``"<fact_id>/<name>"`` that methods reusing this result read besides
        ``arrays()``; the runner stores them with the chunk, never in ``results/``. None by default.
        """
        return {}


@dataclasses.dataclass(frozen=True)
class Given:
    """A required method's stored result on some facts: what one method hands to another.

    ``frame``, ``tables`` (by name) and ``arrays`` (``"<fact_id>/<name>"``, with those of
    :meth:`MethodResult.handover`) hold only the rows of ``fact_ids``; ``skipped`` lists the facts
    the method left out, with its reasons.
    """

    method: str
    config: MethodConfig
    fact_ids: tuple[str, ...]
    frame: pd.DataFrame
    tables: Mapping[str, pd.DataFrame]
    arrays: Mapping[str, np.ndarray]
    skipped: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, method: str, config: MethodConfig, result: MethodResult) -> Given:
        """What the runner would store of ``result``."""
        return cls(
            method,
            config,
            tuple(result.fact_ids),
            result.to_frame(),
            result.tables(),
            {**result.arrays(), **result.handover()},
            tuple(map(tuple, result.skipped)),
        )

    def covers(self, fact_ids) -> bool:
        """Whether every one of ``fact_ids`` has rows here or is skipped here."""
        return set(fact_ids) <= {*self.fact_ids, *(fact for fact, _ in self.skipped)}

    def select(self, fact_ids) -> Given:
        """The rows of ``fact_ids``, in that order (those not here are left out)."""
        keep = set(fact_ids)
        rows = lambda frame: frame[frame["fact_id"].isin(keep)].reset_index(drop=True)  # noqa: E731
        return dataclasses.replace(
            self,
            fact_ids=tuple(dict.fromkeys(f for f in fact_ids if f in set(self.fact_ids))),
            frame=rows(self.frame),
            tables={name: rows(table) for name, table in self.tables.items()},
            arrays={k: v for k, v in self.arrays.items() if k.rsplit("/", 1)[0] in keep},
            skipped=tuple(s for s in self.skipped if s[0] in keep),
        )

    def merge(self, other: Given) -> Given:
        """These rows and ``other``'s (of other facts), in that order."""
        join = lambda a, b: pd.concat([f for f in (a, b) if not f.empty] or [a], ignore_index=True)  # noqa: E731
        return dataclasses.replace(
            self,
            fact_ids=self.fact_ids + other.fact_ids,
            frame=join(self.frame, other.frame),
            tables={
                name: join(self.tables.get(name, pd.DataFrame()), other.tables.get(name, pd.DataFrame()))
                for name in dict.fromkeys([*self.tables, *other.tables])
            },
            arrays={**self.arrays, **other.arrays},
            skipped=self.skipped + other.skipped,
        )

    @classmethod
    def obtain(cls, method: str, need: Mapping[str, Any], model, batch, given: Mapping[str, Given] | None):
        """The result of ``method`` with the config values ``need`` on the facts of ``batch``: the one
        ``given`` by the runner when it covers them, else computed here (through the registry: no
        method imports another).
        """
        fact_ids = list(batch.fact_ids or map(str, range(len(batch))))
        handed = (given or {}).get(method)
        if handed is not None and handed.covers(fact_ids):
            return handed.select(fact_ids)
        from recallscope.methods import REGISTRY

        config = required_config(method, need)
        return cls.of(method, config, REGISTRY[method].run(model, batch, config))

    @staticmethod
    def cost(requires: Mapping[str, Mapping[str, Any]], model, batch, given) -> Cost:
        """What computing the required methods not in ``given`` costs (a method's ``cost`` adds it)."""
        from recallscope.methods import REGISTRY

        total = Cost(0, 0.0, 0)
        for method, need in requires.items():
            if method not in (given or {}):
                total = total + REGISTRY[method].cost(model, batch, required_config(method, need))
        return total

    def array(self, fact_id: str, name: str) -> np.ndarray:
        return self.arrays[f"{fact_id}/{name}"]


def required_config(method: str, values: Mapping[str, Any]) -> MethodConfig:
    """The config of required ``method`` with ``values`` (as a method's ``requires`` lists them)."""
    from recallscope.methods import REGISTRY

    return REGISTRY[method].Config.from_dict(values)


def check_method(module: Any) -> None:
    """Check that ``module`` has the shape of a method (this module's docstring), before running it.

    Raises:
        RecallscopeError: naming everything that is missing or of the wrong kind.
    """
    problems = [f"{attr}: a non-empty string" for attr in ("NAME", "DESCRIPTION") if not _text(module, attr)]
    size = getattr(module, "CHUNK_SIZE", None)
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        problems.append("CHUNK_SIZE: a positive number of facts per chunk")
    config = getattr(module, "Config", None)
    if not (
        isinstance(config, type)
        and issubclass(config, MethodConfig)
        and config.__dataclass_params__.frozen  # (a subclass that is no dataclass inherits the base's)
        and "__dataclass_fields__" in vars(config)
    ):
        problems.append(
            "Config: a frozen dataclass (kw_only) subclassing recallscope.methods.base.MethodConfig"
        )
    for name in ("run", "cost"):
        if not callable(getattr(module, name, None)):
            problems.append(f"{name}(model, facts, config): a function")
    for name in ("prepare", "needs_all_facts", "requires"):
        if hasattr(module, name) and not callable(getattr(module, name)):
            problems.append(f"{name}: a function when present")
    prepare = getattr(module, "prepare", None)
    if callable(prepare) and "dataset" not in inspect.signature(prepare).parameters:
        problems.append("prepare(model, facts, config, dataset=None): takes the loaded dataset")
    if callable(getattr(module, "requires", None)):
        for name in ("run", "cost"):
            function = getattr(module, name, None)
            if callable(function) and "given" not in inspect.signature(function).parameters:
                problems.append(
                    f"{name}(model, facts, config, given=None): a method with requires takes given"
                )
    if problems:
        label = getattr(module, "__name__", repr(module))
        raise RecallscopeError(
            f"{label} is not a recallscope method: " + "; ".join(problems) + " (see recallscope.methods.base)"
        )


def _text(module: Any, attr: str) -> bool:
    value = getattr(module, attr, None)
    return isinstance(value, str) and bool(value.strip())


@dataclasses.dataclass(frozen=True)
class Cost:
    """What running a method on a batch takes, estimated without running it.

    Attributes:
        forwards: forward passes (full or resumed).
        token_blocks: work in units of one token row through one transformer block.
        peak_bytes: peak memory of activations and outputs beyond the model weights.
        vocab_rows: vectors read out over the whole vocabulary (a ``d_model × d_vocab`` product and
            a reduction over ``d_vocab`` each: a value direction built, a logit-lens readout; work
            over ``d_vocab`` without the product, such as an exact rank-1 score, counts as a
            fraction of a row); beyond the last-position logits of each forward.
    """

    forwards: int
    token_blocks: float
    peak_bytes: int
    vocab_rows: float = 0.0

    def __add__(self, other: Cost) -> Cost:
        return Cost(
            self.forwards + other.forwards,
            self.token_blocks + other.token_blocks,
            max(self.peak_bytes, other.peak_bytes),
            self.vocab_rows + other.vocab_rows,
        )


def result_provenance(model, config: MethodConfig, **conventions: Any) -> dict[str, Any]:
    """Model provenance plus the conventions a result was computed with."""
    return {"model": model.provenance(), "config": config.to_dict(), "conventions": conventions}


def head_frame(fact_ids: Sequence[str], n_groups: np.ndarray, **columns: np.ndarray) -> pd.DataFrame:
    """One row per fact × layer × head: ``fact_id``, ``layer``, ``head``, ``kv_head`` (``head //
    n_groups[layer]``), then ``columns``: ``[fact, layer, head]`` arrays, or ``[fact]`` ones repeated on
    each of the fact's rows.
    """
    shape = next(a.shape for a in columns.values() if a.ndim == 3)
    f, layer, head = (a.reshape(-1) for a in np.indices(shape))
    return pd.DataFrame(
        {
            "fact_id": np.array(fact_ids, dtype=object)[f],
            "layer": layer,
            "head": head,
            "kv_head": head // n_groups[layer],
            **{name: a[f] if a.ndim == 1 else a.reshape(-1) for name, a in columns.items()},
        }
    )
