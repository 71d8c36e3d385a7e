"""Config values are checked against their fields' type hints, by name, before any model loads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import pytest

from recallscope.errors import RecallscopeError
from recallscope.methods import REGISTRY
from recallscope.methods.base import MethodConfig
from recallscope.methods.hints import DISTINCT, NON_EMPTY, AtLeast, NonNegative, Positive, describe, fits
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


def test_every_methods_defaults_and_presets_fit_their_hints():
    for module in REGISTRY.values():
        module.Config()
        for name in module.Config.PRESETS:
            module.Config.preset(name)


def test_a_config_file_of_the_wrong_type_fails_when_the_job_is_made(tmp_path):
    with pytest.raises(RecallscopeError, match="logit_lens config: k must be an integer, got 'abc'"):
        Job(out=tmp_path, configs={"logit_lens": {"k": "abc"}})
    with pytest.raises(
        RecallscopeError, match="causal_tracing config: samples must be an integer ≥ 1, got -5"
    ):
        Job(out=tmp_path, configs={"causal_tracing": {"samples": -5}})
