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
- optionally ``prepare(model, facts, config) -> Config``: dataset-wide calibration done once before
  the facts are split into chunks (e.g. the causal-tracing noise level);
- ``CHUNK_SIZE``: facts per chunk the runner uses by default;
- optionally ``needs_all_facts(config) -> bool``: true when a result depends on the whole fact
  list (a fit on a training split evaluated on held-out facts, a pooled regression, a mean over
  the dataset). The runner then calls ``run`` once with every fact (the method batches its own
  forwards) under a store key that hashes the fact list.

Methods do no file I/O, plotting or progress bars. :func:`check_method` checks this shape;
``recallscope.methods.register`` (or the ``recallscope.methods`` entry point of another package)
adds a method that has it.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from recallscope.core.dtypes import upcast
from recallscope.errors import RecallscopeError

__all__ = [
    "check_method",
    "MethodConfig",
    "MethodResult",
    "Cost",
    "result_provenance",
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

    def stable_hash(self) -> str:
        """A short hash of the method's name and every field but ``preset_name`` (part of the
        result-store key). The name is the module's own, spelled as when every method was a module
        of ``recallscope.methods``, so stored runs stay resumable whichever folder holds the method.
        """
        values = {k: v for k, v in self.to_dict().items() if k != "preset_name"}
        text = json.dumps(values, sort_keys=True, default=str)
        method = type(self).__module__.rsplit(".", 1)[-1]
        return hashlib.sha256(f"recallscope.methods.{method}:{text}".encode()).hexdigest()[:12]


@dataclasses.dataclass(kw_only=True)
class MethodResult:
    """What every method's result carries besides its numbers (subclasses add those, and
    ``to_frame``, ``tables`` and ``arrays``).
    """

    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The model's provenance, the config and the conventions the numbers depend on
    (:func:`result_provenance`)."""
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    """``(fact_id, reason)`` of every fact left out."""


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
    for name in ("prepare", "needs_all_facts"):
        if hasattr(module, name) and not callable(getattr(module, name)):
            problems.append(f"{name}: a function when present")
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
    """

    forwards: int
    token_blocks: float
    peak_bytes: int

    def __add__(self, other: Cost) -> Cost:
        return Cost(
            self.forwards + other.forwards,
            self.token_blocks + other.token_blocks,
            max(self.peak_bytes, other.peak_bytes),
        )


def window(layer: int, size: int, n_layers: int) -> range:
    """The window of ``size`` layers centred on ``layer`` used by ROME and Geva et al.'s code:
    ``[ℓ - size//2, ℓ - (-size//2))``, clipped to ``[0, n_layers)``.
    """
    return range(max(0, layer - size // 2), min(n_layers, layer - (-size // 2)))


def result_provenance(model, config: MethodConfig, **conventions: Any) -> dict[str, Any]:
    """Model provenance plus the conventions a result was computed with."""
    return {"model": model.provenance(), "config": config.to_dict(), "conventions": conventions}


def as_batch(model, facts_or_batch):
    """A :class:`~recallscope.core.tokens.PromptBatch` from a batch or a :class:`FactSet`."""
    from recallscope.core.tokens import PromptBatch

    return facts_or_batch if isinstance(facts_or_batch, PromptBatch) else facts_or_batch.to_batch(model)


def wide(logits: torch.Tensor) -> torch.Tensor:
    """Logits in at least float32 (bf16/fp16 models); float64 is kept."""
    return upcast(logits)


def choose_targets(batch, logits: torch.Tensor, target: str) -> torch.Tensor:
    """The token each row is scored on: the model's clean ``top1`` or the ``gold`` answer's first.

    Args:
        batch: the :class:`~recallscope.core.tokens.PromptBatch` (``target_ids`` for ``gold``).
        logits: clean last-position logits ``[B, d_vocab]``.
        target: ``"top1"`` or ``"gold"``.

    Returns:
        ``[B]`` token ids on the CPU.
    """
    if target == "top1":
        return logits.argmax(-1).cpu()
    if target != "gold":
        raise RecallscopeError(f"target must be 'top1' or 'gold', got {target!r}")
    if batch.target_ids is None:
        raise RecallscopeError("target='gold' needs a batch with targets (facts have answers)")
    return batch.target_ids.long().cpu()


def logit_minus_mean(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Lv et al.'s ``iw`` metric (``methods.md`` L2): ``ℓ[target] − mean_v ℓ[v]``.

    Args:
        logits: ``[B, d_vocab]``.
        targets: ``[B]`` token ids.

    Returns:
        ``[B]`` in at least float32.
    """
    logits = wide(logits)
    picked = logits.gather(-1, targets.to(logits.device).long()[:, None])[:, 0]
    return picked - logits.mean(-1)
