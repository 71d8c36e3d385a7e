"""Exception types raised by recallscope.

Every error raised on bad user input is a :class:`RecallscopeError`; messages say what was
wrong, what was expected and how to fix it.
"""

from __future__ import annotations

__all__ = [
    "RecallscopeError",
    "UnsupportedModelError",
    "ModelNotAvailableError",
    "SiteError",
    "ShapeError",
    "SpanError",
    "KnockoutError",
    "DatasetError",
]


class RecallscopeError(Exception):
    """Base class of every error recallscope raises on bad input."""


class UnsupportedModelError(RecallscopeError):
    """The model's architecture, or a feature of its config, is not supported."""


class ModelNotAvailableError(RecallscopeError):
    """The requested model cannot be found on this machine (and cannot be downloaded)."""


class SiteError(RecallscopeError):
    """A site name, layer or position does not exist for this model."""


class ShapeError(RecallscopeError):
    """A tensor passed in has the wrong shape."""


class SpanError(RecallscopeError):
    """A text span (subject, relation, answer) cannot be located in a prompt."""


class KnockoutError(RecallscopeError):
    """An attention knockout is ill-formed (e.g. it would block every key of a query)."""


class DatasetError(RecallscopeError):
    """A dataset or one of its rows is malformed (missing field, subject not in prompt, …)."""
