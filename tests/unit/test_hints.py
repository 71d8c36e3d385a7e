"""Config values are checked against their fields' type hints, by name, before any model loads."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Literal

import pytest

from recallscope.errors import RecallscopeError
from recallscope.methods import REGISTRY
from recallscope.methods.base import MethodConfig
from recallscope.methods.hints import (
    DISTINCT,
    NON_EMPTY,
    AtLeast,
    AtMost,
    Between,
    NonNegative,
    Positive,
    describe,
    fits,
)
from recallscope.runner import Job


@dataclass(frozen=True, kw_only=True)
class Example(MethodConfig):
    mode: Literal["a", "b"] = "a"
    flag: bool = True
    count: Positive = 3
    scale: Annotated[float, AtLeast(0)] = 1.0
    layers: Annotated[tuple[NonNegative, ...], NON_EMPTY, DISTINCT] | None = None
    names: tuple[str, ...] = ("x",)
    checked: int = 0
    share: Annotated[float, Between(0, 1, high_open=True)] = 0.5
    digit: Annotated[int, AtLeast(0), AtMost(9)] = 0

    def __post_init__(self) -> None:  # runs after the hints: sees an int here
        if self.checked > self.count:
            raise RecallscopeError("checked must not exceed count")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"mode": "c"}, "mode must be one of ('a', 'b'), got 'c'"),
        ({"mode": 1}, "mode must be one of ('a', 'b'), got 1"),
        ({"flag": 1}, "flag must be True or False, got 1"),
        ({"count": "3"}, "count must be an integer ≥ 1, got '3'"),
        ({"count": True}, "count must be an integer ≥ 1, got True"),
        ({"count": 0}, "count must be an integer ≥ 1, got 0"),
        ({"scale": -0.5}, "scale must be a number ≥ 0, got -0.5"),
        ({"layers": ()}, "layers must be None or a non-empty tuple of distinct items, each an integer ≥ 0"),
        ({"layers": (1, 1)}, "layers must be None or a non-empty tuple of distinct items"),
        ({"layers": (1, -2)}, "each an integer ≥ 0, got (1, -2)"),
        ({"names": "x"}, "names must be a tuple of items, each a string, got 'x'"),
        ({"checked": "9"}, "checked must be an integer, got '9'"),
        ({"checked": 9}, "checked must not exceed count"),
        ({"share": 1}, "share must be a number in [0, 1), got 1"),
        ({"share": -0.1}, "share must be a number in [0, 1), got -0.1"),
        ({"share": math.nan}, "share must be a number in [0, 1), got nan"),
        ({"digit": 10}, "digit must be an integer ≥ 0 and ≤ 9, got 10"),
    ],
)
def test_a_value_that_does_not_fit_its_hint_is_refused_by_name(values, message):
    with pytest.raises(RecallscopeError) as err:
        Example(**values)
    assert message in str(err.value)
    assert str(err.value).startswith("test_hints config: ") or "exceed" in message


def test_values_that_fit_pass_and_every_problem_is_named():
    assert Example(scale=2, layers=(0, 3), names=["y"]).scale == 2  # an int is a number; lists are tuples
    with pytest.raises(RecallscopeError, match="mode must be .*; count must be"):
        Example(mode="z", count=-1)


def test_fits_and_describe():
    assert fits(None, Positive | None) and not fits(0, Positive | None)
    assert describe(Positive | None) == "None or an integer ≥ 1"
    assert (
        describe(Annotated[tuple[Literal["a"], ...], NON_EMPTY])
        == "a non-empty tuple of items, each one of ('a',)"
    )


def test_ranges_and_tuples_of_ranged_items():
    assert describe(Annotated[float, Between(0, 1)]) == "a number in [0, 1]"
    assert describe(Annotated[float, Between(0, 1, low_open=True, high_open=True)]) == "a number in (0, 1)"
    assert describe(Annotated[int, AtMost(9)]) == "an integer ≤ 9"
    assert describe(tuple[Positive, ...]) == "a tuple of items, each an integer ≥ 1"
    assert describe(tuple[tuple[str, Annotated[float, AtLeast(0)]], ...]) == (
        "a tuple of items, each a tuple of 2: a string, a number ≥ 0"
    )
    between = Annotated[float, Between(0, 1)]
    assert fits(0, between) and fits(1.0, between) and not fits(1.5, between) and not fits(math.inf, between)
    assert not fits(0, Annotated[float, Between(0, 1, low_open=True)])
    assert fits((1, 2), tuple[Positive, ...]) and not fits((1, 0), tuple[Positive, ...])
    assert not fits((("a", -1.0),), tuple[tuple[str, Annotated[float, AtLeast(0)]], ...])


def test_every_methods_defaults_and_presets_fit_their_hints():
    for module in REGISTRY.values():
        module.Config()
        for name in module.Config.PRESETS:
            module.Config.preset(name)


def test_a_config_file_of_the_wrong_type_fails_when_the_job_is_made(tmp_path):
    with pytest.raises(RecallscopeError, match="logit_lens config: k must be an integer ≥ 1, got 'abc'"):
        Job(out=tmp_path, configs={"logit_lens": {"k": "abc"}})
    with pytest.raises(RecallscopeError, match="logit_lens config: k must be an integer ≥ 1, got -5"):
        Job(out=tmp_path, configs={"logit_lens": {"k": -5}})
    with pytest.raises(
        RecallscopeError, match="causal_tracing config: samples must be None or an integer ≥ 1, got -5"
    ):
        Job(out=tmp_path, configs={"causal_tracing": {"samples": -5}})


# -- every method's numeric fields declare their range ------------------------------------------------

_RANGES = (AtLeast, AtMost, Between)

UNRANGED = {
    "logit_lens.positions": "token indices may be negative (-1 = each prompt's last token)",
}
"""``method.field`` → why an int / float in its hint has no range."""


def _unranged(hint) -> bool:
    """Whether an ``int`` or ``float`` somewhere in ``hint`` has no range marker."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        if args[0] in (int, float):
            return not any(isinstance(mark, _RANGES) for mark in hint.__metadata__)
        return _unranged(args[0])
    if origin in (typing.Union, types.UnionType, tuple):
        return any(_unranged(arg) for arg in args if arg is not Ellipsis)
    return hint in (int, float)


def _fitting(hint):
    """Some value that fits ``hint`` (the other items of a fixed-size tuple)."""
    return next(value for value in ("x", 0, 1, 0.5, (), None) if fits(value, hint))


def _out_of_range(hint) -> list:
    """Values of the right type that break a range marker somewhere in ``hint``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated and args[0] in (int, float):
        values = []
        for mark in hint.__metadata__:
            if isinstance(mark, AtLeast):
                values.append(mark.low - 1)
            elif isinstance(mark, AtMost):
                values.append(mark.high + 1)
            elif isinstance(mark, Between):
                values += [mark.low - 1, mark.high + 1]
                values += [mark.low] * mark.low_open + [mark.high] * mark.high_open
        return [args[0](value) for value in values]
    if origin is Annotated:
        return _out_of_range(args[0])
    if origin in (typing.Union, types.UnionType):
        return [value for arg in args for value in _out_of_range(arg)]
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return [(value,) for value in _out_of_range(args[0])]
    if origin is tuple:
        return [
            tuple(value if j == i else _fitting(other) for j, other in enumerate(args))
            for i, arg in enumerate(args)
            for value in _out_of_range(arg)
        ]
    return []


def _config_fields():
    for name, module in REGISTRY.items():
        hints = typing.get_type_hints(module.Config, include_extras=True)
        for field in dataclasses.fields(module.Config):
            yield name, module.Config, field.name, hints[field.name]


_OUT_OF_RANGE = [
    pytest.param(config, field, value, id=f"{name}.{field}={value!r}")
    for name, config, field, hint in _config_fields()
    for value in _out_of_range(hint)
]


def test_every_int_and_float_field_declares_its_range_or_says_why_not():
    unranged = {f"{name}.{field}" for name, _, field, hint in _config_fields() if _unranged(hint)}
    assert unranged - set(UNRANGED) == set(), "give these fields a range marker (hints.py) or a reason here"
    assert set(UNRANGED) - unranged == set(), "these fields have a range now: drop them from UNRANGED"
    assert len(_OUT_OF_RANGE) > 50  # the markers are found, in tuples and unions too


@pytest.mark.parametrize(("config", "field", "value"), _OUT_OF_RANGE)
def test_an_out_of_range_value_is_refused_when_the_config_is_built(config, field, value):
    with pytest.raises(RecallscopeError) as err:
        config.from_dict({field: value})
    method = config.__module__.rsplit(".", 1)[-1]
    assert f"{method} config: " in str(err.value)
    assert f"{field} must be " in str(err.value) and f"got {value!r}" in str(err.value)


def test_logit_lens_k_names_the_field():
    config = REGISTRY["logit_lens"].Config
    for bad in ("abc", -5, 0):
        with pytest.raises(RecallscopeError, match="k must be an integer ≥ 1, got"):
            config.from_dict({"k": bad})
