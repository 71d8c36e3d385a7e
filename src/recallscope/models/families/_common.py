"""Helpers shared by the family specs: module lookup, dims from weights, strict config checks."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from recallscope.errors import UnsupportedModelError

__all__ = ["get_module", "refuse", "check_risky_keys"]

# Config attributes whose non-default value changes the computation in ways an adapter must
# handle explicitly. A family lists the ones it handles; any other non-empty one is refused.
_RISKY_KEYS = (
    "final_logit_softcapping",
    "attn_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "add_cross_attention",
    "is_encoder_decoder",
    "use_bidirectional_attention",
    "attention_chunk_size",
    "residual_multiplier",
    "embedding_multiplier",
    "attention_multiplier",
    "use_post_norm",
    "sandwich_norm",
)


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


def check_risky_keys(model: nn.Module, handled: Iterable[str] = ()) -> None:
    """Refuse any risky config attribute that is set (not None/False, or 1 for a factor) and not handled."""
    handled = set(handled)
    config = model.config
    problems = []
    for key in _RISKY_KEYS:
        value = getattr(config, key, None)
        neutral = value is None or value is False or (_is_factor(key) and value == 1)
        if key in handled or neutral:
            continue
        problems.append(f"config.{key}={value!r} is not handled by the {config.model_type!r} adapter")
    refuse(model, problems)


def _is_factor(key: str) -> bool:
    """Multipliers and scales are neutral at 1."""
    return key.endswith(("multiplier", "scale", "scaling"))
