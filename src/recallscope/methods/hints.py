"""Config values checked against their fields' type hints, before a method's own checks run.

A :class:`~recallscope.methods.base.MethodConfig` field annotated ``Literal["a", "b"]``, ``bool``,
``int``, ``float``, ``str``, ``tuple[X, ...]``, ``Mapping[…]`` or a union of these (``int | None``)
accepts only such values, and ``Annotated`` markers add what a type cannot say: :class:`AtLeast`
(``Positive``, ``NonNegative``), :class:`AtMost` and :class:`Between` for numbers (also as the items
of a tuple: ``tuple[Positive, ...]``), :data:`NON_EMPTY` and :data:`DISTINCT` for tuples. A config from a
TOML file with ``k = "abc"`` or ``k = -5`` is refused when the config is built, naming the method,
the field, what it takes and what it got, before any model loads. Relations between fields stay in
the config's own ``__post_init__``, which runs after these checks and so sees values of the right
types.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union

from recallscope.errors import RecallscopeError

__all__ = [
    "check_fields",
    "describe",
    "fits",
    "AtLeast",
    "AtMost",
    "Between",
    "Positive",
    "NonNegative",
    "NON_EMPTY",
    "DISTINCT",
]


@dataclasses.dataclass(frozen=True)
class AtLeast:
    """``Annotated[int, AtLeast(1)]``: a number no smaller than ``low``."""

    low: float

    def __call__(self, value: Any) -> bool:
        return value >= self.low

    def __str__(self) -> str:
        return f"≥ {self.low}"


@dataclasses.dataclass(frozen=True)
class AtMost:
    """``Annotated[int, AtMost(9)]``: a number no larger than ``high``."""

    high: float

    def __call__(self, value: Any) -> bool:
        return value <= self.high

    def __str__(self) -> str:
        return f"≤ {self.high}"


@dataclasses.dataclass(frozen=True)
class Between:
    """``Annotated[float, Between(0, 1)]``: a number from ``low`` to ``high``, both included unless
    ``low_open`` / ``high_open`` leave that end out (``Between(0, 1, high_open=True)``: ``[0, 1)``).
    NaN and infinities never fit.
    """

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    def __call__(self, value: Any) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        return f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"


@dataclasses.dataclass(frozen=True)
class _Tuple:
    """A condition on a whole tuple (:data:`NON_EMPTY`, :data:`DISTINCT`)."""

    words: str
    holds: Any

    def __call__(self, value: Any) -> bool:
        return self.holds(value)

    def __str__(self) -> str:
        return self.words


NON_EMPTY = _Tuple("non-empty", lambda value: len(value) > 0)
DISTINCT = _Tuple("without repeats", lambda value: len(set(value)) == len(value))
Positive = typing.Annotated[int, AtLeast(1)]
NonNegative = typing.Annotated[int, AtLeast(0)]


def check_fields(config: Any) -> None:
    """Raise naming every field of the dataclass ``config`` whose value does not fit its hint."""
    hints = typing.get_type_hints(type(config), include_extras=True)
    method = type(config).__module__.rsplit(".", 1)[-1]
    problems = [
        f"{field.name} must be {describe(hints[field.name])}, got {getattr(config, field.name)!r}"
        for field in dataclasses.fields(config)
        if not fits(getattr(config, field.name), hints[field.name])
    ]
    if problems:
        raise RecallscopeError(f"{method} config: " + "; ".join(problems))


_SCALARS = {
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    type(None): lambda v: v is None,
}


def fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` is of the type ``hint`` says (elements of tuples included)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or isinstance(hint, typing.TypeVar):
        return True
    if origin is typing.Annotated:
        return fits(value, args[0]) and all(mark(value) for mark in hint.__metadata__ if callable(mark))
    if origin in (Union, types.UnionType):
        return any(fits(value, arg) for arg in args)
    if origin is Literal:
        return any(value == arg and type(value) is type(arg) for arg in args)
    if hint in _SCALARS:
        return _SCALARS[hint](value)
    if origin is tuple:
        return _fits_tuple(value, args)
    if origin is not None and isinstance(origin, type) and issubclass(origin, Mapping):
        return isinstance(value, Mapping)
    return isinstance(value, origin or hint) if isinstance(origin or hint, type) else True


def _fits_tuple(value: Any, args: tuple) -> bool:
    if not isinstance(value, (tuple, list)):
        return False
    if len(args) == 2 and args[1] is Ellipsis:
        return all(fits(item, args[0]) for item in value)
    return len(args) == len(value) and all(fits(v, a) for v, a in zip(value, args, strict=True))


def describe(hint: Any) -> str:
    """What ``hint`` accepts, in words: ``one of ('a', 'b')``, ``an integer ≥ 1 or None`` …"""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    marks = list(getattr(hint, "__metadata__", ()))
    if origin is typing.Annotated:
        inner = args[0]
        if typing.get_origin(inner) is tuple:
            return _describe_tuple(typing.get_args(inner), marks)
        bounds = " and ".join(str(mark) for mark in marks if callable(mark))
        return f"{describe(inner)} {bounds}" if bounds else describe(inner)
    if origin in (Union, types.UnionType):  # None first: "None or a tuple of …, each …"
        return " or ".join(describe(arg) for arg in sorted(args, key=lambda arg: arg is not type(None)))
    if origin is Literal:
        return f"one of {args!r}"
    if origin is tuple:
        return _describe_tuple(args, [])
    named = {bool: "True or False", int: "an integer", float: "a number", str: "a string", type(None): "None"}
    if hint in named:
        return named[hint]
    if origin is not None and isinstance(origin, type) and issubclass(origin, Mapping):
        return "a mapping"
    return f"a {getattr(hint, '__name__', hint)}"


def _describe_tuple(args: tuple, marks: list) -> str:
    if not (len(args) == 2 and args[1] is Ellipsis):
        return f"a tuple of {len(args)}: " + ", ".join(describe(arg) for arg in args)
    size = "non-empty " if NON_EMPTY in marks else ""
    items = "distinct items" if DISTINCT in marks else "items"
    return f"a {size}tuple of {items}, each {describe(args[0])}"
