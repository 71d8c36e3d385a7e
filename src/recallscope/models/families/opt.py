"""OPT.

Sequential pre-LayerNorm blocks with learned positions (offset by 2). The MLP has no module of its
own (``fc1``/``fc2`` sit on the block) and runs on flattened ``[B*T, d]`` tensors, which the site
hooks reshape. OPT-350m style models (post-LN ``do_layer_norm_before=False``, ``project_in`` /
``project_out``) are refused: their residual stream is not a sum of sublayer updates.
"""

from __future__ import annotations

from torch import nn

from recallscope.models.families._common import check_risky_keys, read_dims, refuse
from recallscope.models.spec import ArchSpec

MODEL_TYPES = ("opt",)

PATHS = dict(
    embed="model.decoder.embed_tokens",
    pos_embed="model.decoder.embed_positions",
    blocks="model.decoder.layers",
    final_norm="model.decoder.final_layer_norm",
    unembed="lm_head",
    ln_1="self_attn_layer_norm",
    ln_2="final_layer_norm",
    attn="self_attn",
    q_proj="self_attn.q_proj",
    k_proj="self_attn.k_proj",
    v_proj="self_attn.v_proj",
    o_proj="self_attn.out_proj",
    mlp_in="fc1",
    mlp_out_proj="fc2",
)


def build_spec(model: nn.Module) -> ArchSpec:
    """Spec of an ``OPTForCausalLM``."""
    config = model.config
    problems = []
    if not config.do_layer_norm_before:
        problems.append(
            "do_layer_norm_before=False (post-LayerNorm blocks, e.g. opt-350m): the residual is "
            "re-normalized after every sublayer, so it is not a sum of sublayer updates"
        )
    if config.word_embed_proj_dim != config.hidden_size:
        problems.append(
            f"word_embed_proj_dim={config.word_embed_proj_dim} != hidden_size={config.hidden_size} "
            "(project_in/project_out around the decoder)"
        )
    if getattr(config, "_remove_final_layer_norm", False):
        problems.append("_remove_final_layer_norm=True (no final LayerNorm)")
    refuse(model, problems)
    check_risky_keys(model)
    return ArchSpec(
        family="opt",
        dims=read_dims(model, PATHS, n_heads=config.num_attention_heads),
        **PATHS,
        flat_mlp=True,
        norm="layer",
        notes=("the q site is q_proj's output; OPT scales queries by d_head**-0.5 after it",),
    )
