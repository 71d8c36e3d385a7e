"""The tiny random models of the coverage matrix (``recallscope.coverage``).

:func:`tiny_config` shrinks a model type's config to :data:`TINY` sizes and :data:`N_LAYERS` layers
(per-layer lists cut to match, default configs that cannot build a model completed as their
checkpoints are: ``_COMPLETIONS``); :func:`tiny_model` builds a ``*ForCausalLM`` from it, refusing
configs that do not shrink below :data:`MAX_PARAMETERS`, and :func:`randomize_` gives its biases,
norm weights and block scalars random non-trivial values.
"""

from __future__ import annotations

import torch
import transformers
from torch import nn

TINY = {
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 96,
    "vocab_size": 320,
    "vocab_size_per_layer_input": 320,  # Gemma 3n's per-layer token embeddings
    "hidden_size_per_layer_input": 16,
    "laurel_rank": 8,
    "max_position_embeddings": 128,
    "num_local_experts": 4,
    "num_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 48,
    "n_shared_experts": 1,
    "ffn_hidden_size": 96,
    "n_inner": 96,
    "ffn_dim": 96,
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 0,
    "kv_lora_rank": 16,
    "q_lora_rank": 24,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    "sliding_window": 4,
    "window_size": 4,
    "rotary_dim": 8,
    "word_embed_proj_dim": 64,
    "embedding_dim": 64,
    "num_kv_shared_layers": 0,
    # constants that scale the embedding, the updates and the logits: not 1, so they are exercised
    "embedding_multiplier": 2.0,
    "residual_multiplier": 0.5,
    "logits_scaling": 4.0,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
"""Config values of the tiny models (set where the config has the attribute)."""
_OPTIONAL = ("embedding_multiplier", "residual_multiplier", "logits_scaling")
"""Keys of :data:`TINY` set only where the config uses them (not None), as are the token ids."""
N_LAYERS = 2
MAX_PARAMETERS = 3_000_000


def _complete_dbrx(config) -> None:
    config.attn_config.rope_theta = config.rope_parameters["rope_theta"]  # read, never used
    config.attn_config.clip_qkv = 8.0  # its modeling clamps unconditionally; DBRX's value


def _complete_cohere_compass(config) -> None:
    config.layer_types = ["sliding_attention", "full_attention"] * config.num_hidden_layers
    config.layer_types = config.layer_types[: config.num_hidden_layers]
    config.rope_parameters = {  # RoPE on sliding layers, none on full layers, as in Cohere2
        "sliding_attention": {"rope_type": "default", "rope_theta": 50_000.0},
        "full_attention": None,
    }


def _complete_llama4_text(config) -> None:
    # two layers cut from the default config both use RoPE and experts; its checkpoints have a layer
    # without RoPE (every 4th) and Maverick interleaves dense layers: block 0 dense, block 1 NoPE
    config.no_rope_layers = [1, 0]
    config.layer_types = ["chunked_attention", "full_attention"]
    config.moe_layers = [1]
    config.intermediate_size_mlp = TINY["intermediate_size"]


def _complete_gemma4(config) -> None:
    # the first two layers of the default schedule are both sliding: keep one global layer, whose
    # heads are wider (global_head_dim), as in every Gemma 4 checkpoint
    config.layer_types = ["sliding_attention", "full_attention"]
    config.per_layer_config = {1: {"head_dim": 2 * TINY["head_dim"]}}  # (its global_head_dim)


_COMPLETIONS = {  # default configs that cannot build a model, completed as their checkpoints are
    "dbrx": ("default config completed: attn_config.rope_theta, clip_qkv=8", _complete_dbrx),
    "llama4_text": (
        "layers as in its checkpoints: block 0 dense, block 1 without RoPE (and qk-norm)",
        _complete_llama4_text,
    ),
    "gemma4_text": ("layers as in its checkpoints: a sliding and a wider global layer", _complete_gemma4),
    "gemma4_unified_text": (
        "layers as in its checkpoints: a sliding and a wider global layer",
        _complete_gemma4,
    ),
    "cohere_compass_text": (
        "default config completed: RoPE on sliding layers, none on full layers",
        _complete_cohere_compass,
    ),
}


# -- tiny models -----------------------------------------------------------------------------------


def tiny_config(model_type: str) -> transformers.PretrainedConfig:
    """The config of ``model_type`` with every size shrunk to :data:`TINY` and :data:`N_LAYERS` layers
    (lists with one entry per layer are cut to match).
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config = _with_tiny_sizes(CONFIG_MAPPING[model_type])
    for sub in _sub_configs(config):
        _shrink(sub)
    if model_type in _COMPLETIONS:
        _COMPLETIONS[model_type][1](config)
    return config


def _with_tiny_sizes(config_class) -> transformers.PretrainedConfig:
    """The config built with the tiny sizes as arguments, so that what it derives from them when it
    is built (LongCat's ``qk_head_dim``, Laguna's per-layer head counts) follows them. Its default
    layer count and layer schedules (lists of layer kinds) are kept: :func:`_cut_layers` cuts them,
    as it cuts every per-layer list. The default config when the class refuses those arguments.
    """
    default = config_class()
    sizes = {  # layer schedules as the default config has them, not re-derived from TINY's sizes
        key: value
        for key, value in vars(default).items()
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value)
    }
    for key, value in TINY.items():
        optional = key.endswith("_token_id") or key in _OPTIONAL
        if key in vars(default) and not (optional and vars(default)[key] is None):
            sizes[key] = value
    try:
        return config_class(**sizes)
    except Exception:  # noqa: BLE001 - a config that validates its sizes against each other
        return default


def _sub_configs(config) -> list:
    """The config and the sub-configs the language model reads (text, attention, feed-forward)."""
    found = [config]
    for name in ("text_config", "attn_config", "ffn_config"):
        sub = getattr(config, name, None)
        if isinstance(sub, transformers.PretrainedConfig) and all(sub is not f for f in found):
            found.append(sub)
    return found


def _shrink(config) -> None:
    old_layers = _get(config, "num_hidden_layers")
    for key, value in TINY.items():
        _set_size(config, key, value)
    for key, value in list(vars(config).items()):  # every other feed-forward width
        wide = key.endswith("intermediate_size") or key in ("dim_ff", "d_ff", "ffn_dim")
        if (
            wide
            and isinstance(value, int)
            and not isinstance(value, bool)
            and value > TINY["intermediate_size"]
        ):
            _set_size(config, key, TINY["intermediate_size"])
    if _get(config, "kv_lora_rank"):  # latent attention: one key/value head per query head
        if hasattr(config, "num_key_value_heads"):
            config.num_key_value_heads = config.num_attention_heads
        if getattr(config, "qk_rope_head_dim", None) and hasattr(config, "head_dim"):
            config.head_dim = config.qk_rope_head_dim  # RoPE runs on the rope part only
    if hasattr(config, "_experts_implementation"):
        config._experts_implementation = "eager"  # the grouped kernels have no float64 version
    if isinstance(old_layers, int):
        _cut_layers(config, old_layers)


def _get(config, key: str):
    """``config.key`` or None (per-layer configs raise on global reads of per-layer attributes)."""
    try:
        return getattr(config, key, None)
    except Exception:  # noqa: BLE001
        return None


def _set_size(config, key: str, value) -> None:
    """Set ``key`` where the config has it (a token id or a multiplier only where it is in use)."""
    try:
        present = hasattr(config, key) or key in getattr(config, "attribute_map", {})
    except Exception:  # noqa: BLE001 - a per-layer attribute read globally
        return
    if not present:
        return
    current = _get(config, key)
    optional = key.endswith("_token_id") or key in _OPTIONAL
    if optional and current is None:
        return
    if not optional and _per_layer_list(config, current) and not isinstance(value, list | tuple):
        value = type(current)([value] * len(current))  # one entry per layer (Gemma 3n's widths)
    try:
        setattr(config, key, value)
    except Exception:  # noqa: BLE001 - a config may validate or derive a value: keep its own
        return


def _per_layer_list(config, value) -> bool:
    """Is ``value`` a list of numbers with one entry per layer (a size that varies by layer)?"""
    n_layers = _get(config, "num_hidden_layers")
    return (
        isinstance(value, list | tuple)
        and isinstance(n_layers, int)
        and len(value) == n_layers
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    )


def _cut_layers(config, old_layers: int) -> None:
    for key, value in list(vars(config).items()):
        if isinstance(value, list | tuple) and len(value) == old_layers and old_layers != N_LAYERS:
            setattr(config, key, type(value)(value[:N_LAYERS]))
    config.num_hidden_layers = N_LAYERS


def randomize_(model: nn.Module, seed: int = 0) -> None:
    """Give every bias and norm weight a random non-trivial value (many are zero or one at init,
    which would hide wrong handling of them), and every scalar a block multiplies its output by
    (Gemma 4's ``layer_scalar`` buffer, loaded from its checkpoints).
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            is_norm = "norm" in name.lower() or "ln_" in name
            if name.endswith("bias") or (is_norm and param.dim() == 1):
                noise = torch.randn(param.shape, generator=generator, dtype=torch.float64)
                base = 1.0 if is_norm and name.endswith("weight") else 0.0
                param.copy_((base + 0.3 * noise).to(param.dtype))
        for name, buffer in model.named_buffers():
            if name.endswith("layer_scalar") and buffer.numel() == 1:
                buffer.fill_(0.5 + float(torch.rand((), generator=generator, dtype=torch.float64)))


def tiny_model(model_type: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    """A tiny random ``*ForCausalLM`` of ``model_type`` (refuses configs that do not shrink)."""
    config = tiny_config(model_type)
    with torch.device("meta"):
        probe = transformers.AutoModelForCausalLM.from_config(config)
    n_parameters = sum(p.numel() for p in probe.parameters())
    if n_parameters > MAX_PARAMETERS:
        raise ValueError(f"its config does not shrink ({n_parameters:,} parameters with the tiny sizes)")
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype).eval()
    randomize_(model, seed)
    return model
