"""What every method shares: configs with presets, and the provenance each result records.

A method module defines ``NAME``, ``DESCRIPTION``, a frozen ``Config`` (a :class:`MethodConfig`
whose defaults are the scientifically clean variant, with each paper's exact behaviour as a
preset), a result class and ``run(model, batch, config)``. Methods do no file I/O, plotting or
progress bars.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any, ClassVar

from recallscope.errors import RecallscopeError

__all__ = ["MethodConfig", "result_provenance", "as_batch"]


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


def result_provenance(model, config: MethodConfig, **conventions: Any) -> dict[str, Any]:
    """Model provenance plus the conventions a result was computed with."""
    return {"model": model.provenance(), "config": config.to_dict(), "conventions": conventions}


def as_batch(model, facts_or_batch):
    """A :class:`~recallscope.core.tokens.PromptBatch` from a batch or a :class:`FactSet`."""
    from recallscope.core.tokens import PromptBatch

    return facts_or_batch if isinstance(facts_or_batch, PromptBatch) else facts_or_batch.to_batch(model)
