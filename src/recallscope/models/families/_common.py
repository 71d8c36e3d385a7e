"""Helpers shared by the spec code: module lookup and refusals that list every problem."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from recallscope.errors import UnsupportedModelError

__all__ = ["get_module", "refuse"]


def get_module(root: nn.Module, path: str) -> nn.Module:
    """Return ``root.a.b.c`` for ``path == "a.b.c"`` (integers index ``ModuleList``s)."""
    module = root
    for part in path.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module


def refuse(model: nn.Module, problems: Iterable[str]) -> None:
    """Raise one :class:`UnsupportedModelError` listing every problem found, or do nothing."""
    problems = list(problems)
    if problems:
        listed = "\n  - ".join(problems)
        raise UnsupportedModelError(
            f"{type(model).__name__} uses config features recallscope does not support, "
            f"which would silently change results:\n  - {listed}"
        )
