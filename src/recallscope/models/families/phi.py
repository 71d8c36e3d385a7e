"""Phi (Phi-1, Phi-1.5, Phi-2).

Parallel blocks sharing one LayerNorm, partial rotary embeddings, biases everywhere and an
unembedding bias. Optional qk LayerNorms live inside the native attention module.
"""

from __future__ import annotations

from torch import nn

from recallscope.models.families._common import check_risky_keys, read_dims
from recallscope.models.spec import ArchSpec

MODEL_TYPES = ("phi",)


PATHS = dict(
    embed="model.embed_tokens",
    blocks="model.layers",
    final_norm="model.final_layernorm",
    unembed="lm_head",
    ln_1="input_layernorm",
    attn="self_attn",
    q_proj="self_attn.q_proj",
    k_proj="self_attn.k_proj",
    v_proj="self_attn.v_proj",
    o_proj="self_attn.dense",
    mlp="mlp",
    mlp_in="mlp.fc1",
    mlp_out_proj="mlp.fc2",
)


def build_spec(model: nn.Module) -> ArchSpec:
    """Spec of a ``PhiForCausalLM``."""
    check_risky_keys(model)
    config = model.config
    return ArchSpec(
        family="phi",
        dims=read_dims(model, PATHS, n_heads=config.num_attention_heads),
        **PATHS,
        parallel=True,
        norm="layer",
        qk_norm=bool(getattr(config, "qk_layernorm", False)),
    )
