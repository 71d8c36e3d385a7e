"""GPT-NeoX / Pythia.

Parallel blocks by default (``use_parallel_residual``): ``x + Attn(LN1(x)) + MLP(LN2(x))`` with two
separate LayerNorms; sequential when that flag is off. The fused ``query_key_value`` projection is
laid out per head: ``[h0: q k v | h1: q k v | …]``. Partial rotary embeddings are applied by the
native module.
"""

from __future__ import annotations

from torch import nn

from recallscope.models.families._common import check_risky_keys, read_dims
from recallscope.models.spec import ArchSpec

MODEL_TYPES = ("gpt_neox",)


PATHS = dict(
    embed="gpt_neox.embed_in",
    blocks="gpt_neox.layers",
    final_norm="gpt_neox.final_layer_norm",
    unembed="lm_head",
    ln_1="input_layernorm",
    ln_2="post_attention_layernorm",
    attn="attention",
    qkv_proj="attention.query_key_value",
    o_proj="attention.dense",
    mlp="mlp",
    mlp_in="mlp.dense_h_to_4h",
    mlp_out_proj="mlp.dense_4h_to_h",
)


def build_spec(model: nn.Module) -> ArchSpec:
    """Spec of a ``GPTNeoXForCausalLM``."""
    check_risky_keys(model)
    config = model.config
    return ArchSpec(
        family="gpt_neox",
        dims=read_dims(model, PATHS, n_heads=config.num_attention_heads),
        **PATHS,
        qkv_layout="per_head",
        parallel=bool(config.use_parallel_residual),
        norm="layer",
    )
