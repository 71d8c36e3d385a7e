"""Gemma and Gemma-2.

Llama-like, with three twists that change numbers if ignored:

- the token embedding is multiplied by ``sqrt(d_model)`` (inside the native embedding module, so
  the ``embed`` site already includes it; raw ``E·v`` projections use the unscaled matrix);
- RMSNorms multiply by ``1 + w`` instead of ``w`` (``norm_offset_one``);
- Gemma-2 only: sandwich norms around attention and MLP (their outputs are ``attn_out`` and
  ``mlp_out``), soft-capped attention scores (eager attention only, which transformers enforces)
  and soft-capped final logits (``final_logit_softcap``).
"""

from __future__ import annotations

from torch import nn

from recallscope.models.families._common import check_risky_keys
from recallscope.models.families.llama import LLAMALIKE_PATHS, llamalike_dims
from recallscope.models.spec import ArchSpec

MODEL_TYPES = ("gemma", "gemma2")


def build_spec(model: nn.Module) -> ArchSpec:
    """Spec of a Gemma or Gemma-2 ``*ForCausalLM``."""
    config = model.config
    if config.model_type == "gemma":
        check_risky_keys(model)
        return ArchSpec(
            family="gemma",
            dims=llamalike_dims(model),
            **LLAMALIKE_PATHS,
            norm="rms",
            norm_offset_one=True,
            gated_mlp=True,
        )
    check_risky_keys(model, handled=("final_logit_softcapping", "attn_logit_softcapping"))
    paths = dict(LLAMALIKE_PATHS, ln_2="pre_feedforward_layernorm")
    return ArchSpec(
        family="gemma2",
        dims=llamalike_dims(model),
        **paths,
        attn_post_norm="post_attention_layernorm",
        mlp_post_norm="post_feedforward_layernorm",
        norm="rms",
        norm_offset_one=True,
        gated_mlp=True,
        final_logit_softcap=config.final_logit_softcapping,
        attn_logit_softcap=config.attn_logit_softcapping,
        notes=(
            "attn_out / mlp_out are the outputs of the sandwich post-norms; per-head and per-neuron "
            "contributions fold the post-norm in with its actual (frozen) scale",
        ),
    )
