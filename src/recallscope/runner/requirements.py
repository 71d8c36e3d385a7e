"""Declared dependencies between methods: which stored result serves what a method requires.

A method's ``requires(config)`` names the methods it reuses and the config values it needs them
under. The runner computes each required result once per run: the run's own result of that method
when its config :meth:`~recallscope.methods.base.MethodConfig.serves` the need, else one computed
for the requirement alone (stored under its own key, never in ``results/``) and shared by every
method it serves. Each chunk of the requiring method then gets the stored rows of its facts as a
:class:`~recallscope.methods.base.Given`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from recallscope.methods import REGISTRY
from recallscope.methods.base import Given, MethodConfig, required_config

__all__ = ["Source", "plan_requirements", "run_order", "load_given"]


@dataclass(frozen=True)
class Source:
    """The result that serves one requirement: ``method`` under ``config``; ``in_run``: the run's
    own result of that method (else one computed for the requirement alone).
    """

    method: str
    config: MethodConfig
    in_run: bool


def plan_requirements(configs: Mapping[str, MethodConfig]) -> dict[str, dict[str, Source]]:
    """``{method: {required method: Source}}`` for the methods of ``configs`` that require others.

    A requirement is served by the run's own result when that config serves it, else by the first
    requirement-only config of that method that serves it (so two methods needing compatible
    results share one), else by its own config, added as a requirement-only result.
    """
    alone: dict[str, list[MethodConfig]] = {}
    plan: dict[str, dict[str, Source]] = {}
    for name, config in configs.items():
        requires = getattr(REGISTRY[name], "requires", None)
        for method, values in (requires(config) if requires else {}).items():
            need = required_config(method, values)
            own = configs.get(method)
            if own is not None and own.serves(need):
                plan.setdefault(name, {})[method] = Source(method, own, True)
                continue
            have = next((c for c in alone.get(method, []) if c.serves(need)), None)
            if have is None:
                have = need
                alone.setdefault(method, []).append(need)
            plan.setdefault(name, {})[method] = Source(method, have, False)
    return plan


def run_order(configs: Mapping[str, Any], plan: Mapping[str, Mapping[str, Source]]) -> list[str]:
    """The methods of ``configs`` in their order, but each after the run's results it requires."""
    order: list[str] = []

    def visit(name: str, seen: frozenset[str]) -> None:
        for source in plan.get(name, {}).values():
            if source.in_run and source.method not in order and source.method not in seen:
                visit(source.method, seen | {name})
        if name not in order:
            order.append(name)

    for name in configs:
        visit(name, frozenset())
    return order


def load_given(store, source: Source, key: str, facts: Mapping[str, str], wanted: list[str]) -> Given:
    """The stored rows of ``source`` (store key ``key``) for the facts ``wanted`` (current digests
    ``facts``): what a chunk of the requiring method gets.
    """
    rows = store.read_rows(source.method, key, facts, wanted)
    return Given(
        source.method,
        source.config,
        tuple(rows["fact_ids"]),
        rows["frame"],
        rows["tables"],
        rows["arrays"],
        tuple(tuple(s) for s in rows["skipped"]),
    )
