"""Helpers shared by the family specs: module lookup, dims from weights, strict config checks."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from recallscope.errors import UnsupportedModelError
from recallscope.models.spec import Dims

__all__ = ["get_module", "refuse", "check_risky_keys", "read_dims"]

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


def read_dims(
    model: nn.Module, paths: dict[str, str], *, n_heads: int, d_head: int | None = None, conv1d: bool = False
) -> Dims:
    """Dims from the modules named in ``paths`` (only head counts come from the config).

    ``n_kv_heads`` is read from the key projection when the family has a separate one.
    """
    blocks = get_module(model, paths["blocks"])
    d_model = get_module(model, paths["embed"]).embedding_dim
    d_head = d_head or d_model // n_heads
    out_proj = get_module(blocks[0], paths["mlp_out_proj"])
    k_proj = paths.get("k_proj")
    return Dims(
        n_layers=len(blocks),
        n_heads=n_heads,
        n_kv_heads=get_module(blocks[0], k_proj).out_features // d_head if k_proj else n_heads,
        d_model=d_model,
        d_head=d_head,
        d_mlp=out_proj.weight.shape[0] if conv1d else out_proj.in_features,
        d_vocab=get_module(model, paths["unembed"]).out_features,
    )
