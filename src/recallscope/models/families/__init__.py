"""Registry of architecture families: ``model_type`` → spec builder.

To support a new family, add a module here with ``MODEL_TYPES`` and ``build_spec(model)`` and list
it in ``_FAMILY_MODULES``; ``rs.check_model`` then tells whether the spec is right.
"""

from __future__ import annotations

from torch import nn

from recallscope.errors import UnsupportedModelError
from recallscope.models.families import gemma, gpt2, gpt_neox, gptj, llama, opt, phi
from recallscope.models.families._common import get_module
from recallscope.models.spec import ArchSpec

__all__ = ["SUPPORTED_MODEL_TYPES", "spec_for", "get_module"]

_FAMILY_MODULES = (llama, gemma, gpt2, gpt_neox, gptj, opt, phi)
_BUILDERS = {t: m.build_spec for m in _FAMILY_MODULES for t in m.MODEL_TYPES}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(_BUILDERS))


def spec_for(model: nn.Module) -> ArchSpec:
    """Build and validate the :class:`ArchSpec` of a transformers ``*ForCausalLM`` model.

    Raises:
        UnsupportedModelError: unknown family, a config feature we would silently get wrong, or a
            module the spec expects is missing.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _BUILDERS:
        raise UnsupportedModelError(
            f"recallscope has no adapter for {type(model).__name__} (model_type={model_type!r}). "
            f"Supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}. To add a family, write a "
            "spec in recallscope/models/families/ and run `recallscope check-model` on it."
        )
    if not hasattr(model, "lm_head"):
        raise UnsupportedModelError(
            f"{type(model).__name__} has no `lm_head`: recallscope needs a causal LM with its "
            f"unembedding (load it with AutoModelForCausalLM, not AutoModel)"
        )
    try:
        spec = _BUILDERS[model_type](model)
    except AttributeError as err:
        raise UnsupportedModelError(
            f"{type(model).__name__} does not have the module layout the {model_type!r} adapter "
            f"expects ({err}); is it a custom or remote-code variant?"
        ) from None
    _check_paths(model, spec)
    return spec


def _check_paths(model: nn.Module, spec: ArchSpec) -> None:
    """Every path of the spec must name a module of the model."""
    model_paths = [spec.embed, spec.blocks, spec.final_norm, spec.unembed, spec.pos_embed]
    block_paths = [
        spec.ln_1,
        spec.ln_2,
        spec.attn,
        spec.o_proj,
        spec.mlp_in,
        spec.mlp_out_proj,
        spec.mlp,
        spec.mlp_gate,
        spec.attn_post_norm,
        spec.mlp_post_norm,
        spec.q_proj,
        spec.k_proj,
        spec.v_proj,
        spec.qkv_proj,
        spec.probs_module,
    ]
    missing = []
    for root, paths, prefix in ((model, model_paths, ""), (None, block_paths, f"{spec.blocks}.0.")):
        root = root if root is not None else get_module(model, f"{spec.blocks}.0")
        for path in filter(None, paths):
            try:
                get_module(root, path)
            except (AttributeError, IndexError):
                missing.append(prefix + path)
    if missing:
        raise UnsupportedModelError(
            f"{type(model).__name__} is missing modules the {spec.family!r} adapter needs: "
            f"{', '.join(missing)}"
        )
