"""The architecture spec of a model: discovered, then overridden by hand where discovery cannot tell.

Every model goes through :func:`recallscope.models.discover.discover_spec`. A model type listed in
``OVERRIDES`` then gets a small hand-written change on top (a refusal, a note, a field discovery
cannot see), and its spec says ``source="written"``. ``rs.check_model`` validates the result either
way; :func:`spec_for` runs the structural part of that validation (every block has every module of
the spec, of the same class as block 0's) before any method runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from torch import nn

from recallscope.errors import UnsupportedModelError
from recallscope.models.discover import discover_spec
from recallscope.models.families._common import get_module, refuse
from recallscope.models.families.overrides import OVERRIDES
from recallscope.models.spec import ArchSpec

__all__ = ["spec_for", "get_module", "OVERRIDES", "BLOCK_PATHS"]

BLOCK_PATHS = (
    "ln_1",
    "ln_2",
    "attn",
    "o_proj",
    "attn_update",
    "q_proj",
    "k_proj",
    "v_proj",
    "qkv_proj",
    "mlp",
    "mlp_update",
    "mlp_in",
    "mlp_gate",
    "mlp_act",
    "mlp_out_proj",
    "experts",
    "shared_expert_down",
    "shared_expert_gate",
    "attn_post_norm",
    "mlp_post_norm",
)
"""Spec fields that name a module of a block."""

_REFUSED_CONFIG = {
    "is_encoder_decoder": "an encoder-decoder model (recallscope analyses decoder-only models)",
    "add_cross_attention": "its blocks attend to an encoder (cross-attention)",
    "use_bidirectional_attention": "its attention is bidirectional, not causal",
}


def _refused(config, key: str) -> bool:
    """Is ``key`` of :data:`_REFUSED_CONFIG` in use? Gemma 4's ``use_bidirectional_attention="vision"``
    makes only image tokens attend both ways: text stays causal.
    """
    value = getattr(config, key, False)
    return bool(value) and not (key == "use_bidirectional_attention" and value == "vision")


def spec_for(model: nn.Module) -> ArchSpec:
    """The validated :class:`ArchSpec` of a transformers ``*ForCausalLM`` model.

    Raises:
        UnsupportedModelError: a config feature we would silently get wrong, an architecture
            discovery cannot read (the message names the module and the check), or blocks that
            differ from block 0.
    """
    config = getattr(model, "config", None)
    if config is None or model.get_output_embeddings() is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no output embedding: recallscope needs a causal LM with its "
            f"unembedding (load it with AutoModelForCausalLM, not AutoModel)"
        )
    refuse(model, [f"config.{key}: {why}" for key, why in _REFUSED_CONFIG.items() if _refused(config, key)])
    spec = discover_spec(model)
    override: Callable | None = OVERRIDES.get(getattr(config, "model_type", None))
    if override is not None:
        spec = dataclasses.replace(override(model, spec), source="written")
    _check_blocks(model, spec)
    return spec


def _check_blocks(model: nn.Module, spec: ArchSpec) -> None:
    """Every block has every module of its spec (``spec.at(layer)``), of the same class as in the
    first block that spec describes.
    """
    blocks = get_module(model, spec.blocks)
    groups = [layers for layers, _ in spec.variants] or [tuple(range(len(blocks)))]
    problems = []
    for layers in groups:
        problems += _unlike(blocks, spec.at(layers[0]), layers[0], layers[1:])
    if problems:
        listed = "\n  - ".join(problems)
        raise UnsupportedModelError(
            f"{type(model).__name__}: its blocks are not alike (recallscope needs every block built like "
            f"the first block its spec describes):\n  - {listed}"
        )


def _unlike(blocks: nn.ModuleList, spec: ArchSpec, first: int, others: tuple[int, ...]) -> list[str]:
    problems = []
    for field in BLOCK_PATHS:
        path = getattr(spec, field)
        if path is None:
            continue
        kind = type(get_module(blocks[first], path))
        for index in others:
            try:
                other = type(get_module(blocks[index], path))
            except (AttributeError, IndexError):
                problems.append(f"block {index} has no {path!r} ({field})")
                break
            if other is not kind:
                problems.append(
                    f"block {index}'s {path!r} is a {other.__name__}, block {first}'s a {kind.__name__}"
                )
                break
    return problems
