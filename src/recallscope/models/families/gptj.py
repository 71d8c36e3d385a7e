"""GPT-J.

Parallel blocks sharing one LayerNorm: ``x + Attn(LN(x)) + MLP(LN(x))``; an unembedding bias
``b_U``. Its attention is transformers' legacy eager code (no ``AttentionInterface``), so the
attention probabilities are reached through the ``attn_dropout`` module they pass through.
"""

from __future__ import annotations

from torch import nn

from recallscope.models.families._common import check_risky_keys, read_dims
from recallscope.models.spec import ArchSpec

MODEL_TYPES = ("gptj",)


PATHS = dict(
    embed="transformer.wte",
    blocks="transformer.h",
    final_norm="transformer.ln_f",
    unembed="lm_head",
    ln_1="ln_1",
    attn="attn",
    q_proj="attn.q_proj",
    k_proj="attn.k_proj",
    v_proj="attn.v_proj",
    o_proj="attn.out_proj",
    probs_module="attn.attn_dropout",
    mlp="mlp",
    mlp_in="mlp.fc_in",
    mlp_out_proj="mlp.fc_out",
)


def build_spec(model: nn.Module) -> ArchSpec:
    """Spec of a ``GPTJForCausalLM``."""
    check_risky_keys(model)
    dims = read_dims(model, PATHS, n_heads=model.config.n_head)
    return ArchSpec(family="gptj", dims=dims, **PATHS, parallel=True, norm="layer")
