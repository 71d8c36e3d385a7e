"""GPT-2.

Sequential pre-LayerNorm blocks, learned absolute positions, a fused ``c_attn`` projection laid out
``[q | k | v]`` and ``Conv1D`` weights stored ``[in, out]`` (the transpose of ``Linear``).
"""

from __future__ import annotations

from torch import nn

from recallscope.models.families._common import check_risky_keys
from recallscope.models.spec import ArchSpec, Dims

MODEL_TYPES = ("gpt2",)


def build_spec(model: nn.Module) -> ArchSpec:
    """Spec of a ``GPT2LMHeadModel``."""
    check_risky_keys(model)
    config = model.config
    block = model.transformer.h[0]
    return ArchSpec(
        family="gpt2",
        dims=Dims(
            n_layers=len(model.transformer.h),
            n_heads=config.n_head,
            n_kv_heads=config.n_head,
            d_model=config.n_embd,
            d_head=config.n_embd // config.n_head,
            d_mlp=block.mlp.c_proj.weight.shape[0],
            d_vocab=model.lm_head.out_features,
        ),
        embed="transformer.wte",
        pos_embed="transformer.wpe",
        blocks="transformer.h",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        ln_1="ln_1",
        ln_2="ln_2",
        attn="attn",
        qkv_proj="attn.c_attn",
        qkv_layout="split",
        o_proj="attn.c_proj",
        mlp="mlp",
        mlp_in="mlp.c_fc",
        mlp_out_proj="mlp.c_proj",
        norm="layer",
        conv1d=True,
    )
