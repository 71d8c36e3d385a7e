"""Llama-like decoders: Llama (incl. SmolLM2), Mistral, Qwen2, Qwen3.

Sequential pre-norm blocks with RMSNorm, grouped-query attention with RoPE, and a gated SiLU MLP
``down(silu(gate(x)) * up(x))``. Qwen2 adds q/k/v biases; Qwen3 adds RMSNorm on queries and keys
(inside the native attention module, so nothing here changes). Sliding-window attention (Mistral,
Qwen2 ``use_sliding_window``) lives in the masks transformers builds, which our knockouts edit
rather than replace, so it is handled.
"""

from __future__ import annotations

from torch import nn

from recallscope.models.families._common import check_risky_keys, read_dims
from recallscope.models.spec import ArchSpec, Dims

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

LLAMALIKE_PATHS = dict(
    embed="model.embed_tokens",
    blocks="model.layers",
    final_norm="model.norm",
    unembed="lm_head",
    ln_1="input_layernorm",
    ln_2="post_attention_layernorm",
    attn="self_attn",
    q_proj="self_attn.q_proj",
    k_proj="self_attn.k_proj",
    v_proj="self_attn.v_proj",
    o_proj="self_attn.o_proj",
    mlp="mlp",
    mlp_gate="mlp.gate_proj",
    mlp_in="mlp.up_proj",
    mlp_out_proj="mlp.down_proj",
)


def llamalike_dims(model: nn.Module) -> Dims:
    """Dims of a model laid out like Llama (``head_dim`` may differ from ``d_model / n_heads``)."""
    config = model.config
    d_head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return read_dims(model, LLAMALIKE_PATHS, n_heads=config.num_attention_heads, d_head=d_head)


def build_spec(model: nn.Module) -> ArchSpec:
    """Spec of a Llama / Mistral / Qwen2 / Qwen3 ``*ForCausalLM``."""
    check_risky_keys(model)
    return ArchSpec(
        family=model.config.model_type,
        dims=llamalike_dims(model),
        **LLAMALIKE_PATHS,
        norm="rms",
        gated_mlp=True,
        qk_norm=model.config.model_type == "qwen3",
    )
