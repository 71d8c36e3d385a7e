"""Hand-written changes on top of a discovered spec, for what discovery cannot tell.

``OVERRIDES[model_type](hf_model, spec) -> spec``. Keep each one small and say why it exists.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from torch import nn

from recallscope.models.spec import ArchSpec

__all__ = ["OVERRIDES"]


def _opt(model: nn.Module, spec: ArchSpec) -> ArchSpec:
    """OPT scales its queries by ``d_head**-0.5`` after ``q_proj``, inside its attention module;
    the ``q`` site is ``q_proj``'s output, so say so (a forward cannot show where a scale sits).
    """
    note = "the q site is q_proj's output; OPT scales queries by d_head**-0.5 after it"
    return dataclasses.replace(spec, notes=(*spec.notes, note))


def _gemma(model: nn.Module, spec: ArchSpec) -> ArchSpec:
    """Gemma's embedding module multiplies by ``sqrt(d_model)`` inside itself: the ``embed`` site
    includes the scale, the weight matrix ``W_E`` does not.
    """
    note = "the embed site includes Gemma's sqrt(d_model) scale; W_E (raw embedding projections) does not"
    return dataclasses.replace(spec, notes=(*spec.notes, note))


OVERRIDES: dict[str, Callable[[nn.Module, ArchSpec], ArchSpec]] = {
    "opt": _opt,
    "gemma": _gemma,
    "gemma2": _gemma,
}
