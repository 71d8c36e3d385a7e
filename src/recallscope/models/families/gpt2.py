"""GPT-2.

Sequential pre-LayerNorm blocks, learned absolute positions, a fused ``c_attn`` projection laid out
``[q | k | v]`` and ``Conv1D`` weights stored ``[in, out]`` (the transpose of ``Linear``).
"""

from __future__ import annotations

from torch import nn

from recallscope.models.families._common import check_risky_keys, read_dims
from recallscope.models.spec import ArchSpec

MODEL_TYPES = ("gpt2",)


PATHS = dict(
    embed="transformer.wte",
    pos_embed="transformer.wpe",
    blocks="transformer.h",
    final_norm="transformer.ln_f",
    unembed="lm_head",
    ln_1="ln_1",
    ln_2="ln_2",
    attn="attn",
    qkv_proj="attn.c_attn",
    o_proj="attn.c_proj",
    mlp="mlp",
    mlp_in="mlp.c_fc",
    mlp_out_proj="mlp.c_proj",
)


def build_spec(model: nn.Module) -> ArchSpec:
    """Spec of a ``GPT2LMHeadModel``."""
    check_risky_keys(model)
    dims = read_dims(model, PATHS, n_heads=model.config.n_head, conv1d=True)
    return ArchSpec(family="gpt2", dims=dims, **PATHS, qkv_layout="split", norm="layer", conv1d=True)
