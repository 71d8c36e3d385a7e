"""Architectures discovery meets in the coverage matrix, checked by what their sites and specs say."""

from __future__ import annotations

import pytest
import torch

import recallscope as rs
from recallscope import coverage
from recallscope.core.attention import output_gate_hook
from recallscope.core.cache import forward
from recallscope.models.sites import Site
from tiny import byte_level_tokenizer


def _load(model_type: str) -> rs.Model:
    return rs.load_model(coverage.tiny_model(model_type), tokenizer=byte_level_tokenizer(), device="cpu")


def _batch(model: rs.Model):
    return rs.tokenize(model, ["The capital of France is", "Paris is in"])


@pytest.mark.parametrize(("model_type", "gated"), [("afmoe", True), ("minicpm5_moe", True), ("llama", False)])
def test_a_gated_attention_output_is_found_and_read_as_z_over_the_mix(model_type, gated):
    model = _load(model_type)
    assert model.spec.attn_output_gate is gated
    if not gated:
        return
    gates, zs = [], []
    with rs.site_hook(model, Site(0, "z"), zs.append):
        with output_gate_hook(model, 0, gates.append):
            forward(model, _batch(model))
    (gate,), (z,) = gates, zs
    assert gate.shape == z.shape == (2, z.shape[1], model.n_heads, model.d_head)
    # a sigmoid gate: strictly between 0 and 1 wherever the mix is not 0
    assert bool(((gate > 0) & (gate < 1)).all())


def test_one_norm_for_the_embedding_and_the_final_residual_is_told_apart_by_call():
    model = _load("nanochat")  # model.norm normalizes the embedding, then the final residual
    assert model.spec.embed_norm == model.spec.final_norm
    seen = []
    batch = _batch(model)
    with rs.site_hook(model, Site(None, "embed"), seen.append):
        forward(model, batch)
    assert len(seen) == 1  # the final residual's call is not the embed site
    norm = model.module(model.spec.final_norm)
    raw = model.hf_model.get_input_embeddings()(batch.input_ids.to(model.device))
    torch.testing.assert_close(seen[0], norm(raw), rtol=0, atol=0)


def test_a_position_table_without_a_module_is_the_pos_embed_site():
    model = _load("ctrl")  # adds rows of a sinusoid buffer to the scaled token embedding
    assert model.spec.pos_table
    ids = rs.tokenize(model, ["The capital of France is"])  # one unpadded row: positions 0..T-1
    table = dict([*model.hf_model.named_buffers(), *model.hf_model.named_parameters()])[model.spec.pos_embed]
    seen = []
    with rs.site_hook(model, Site(None, "pos_embed"), seen.append):
        clean = forward(model, ids)
    T = ids.input_ids.shape[1]
    torch.testing.assert_close(seen[0][0], table[:T].to(seen[0].dtype), rtol=1e-12, atol=1e-12)
    with rs.site_hook(model, Site(None, "pos_embed"), torch.zeros_like):
        without = forward(model, ids)
    assert not torch.allclose(clean, without)
    original = table.clone()
    try:
        table.zero_()
        zeroed = forward(model, ids)
    finally:
        table.copy_(original)
    torch.testing.assert_close(without, zeroed, rtol=1e-12, atol=1e-12)


def test_blocks_run_repeatedly_are_refused_as_recurrent_depth():
    with pytest.raises(rs.UnsupportedModelError, match="recurrent depth"):
        _load("hrm_text")
    assert coverage.classify("hrm_text").status == "excluded"


def test_key_value_heads_that_differ_by_block_are_kept_per_block():
    """MiMo-V2: its sliding-window blocks have twice the key/value heads, and sinks; values are rescaled."""
    model = _load("mimo_v2_flash")
    counts = [model.n_kv_heads_at(layer) for layer in range(model.n_layers)]
    assert counts == [2, 4] and model.n_kv_heads == 4
    assert [model.spec.at(layer).attention_sinks for layer in range(model.n_layers)] == [False, True]
    with pytest.raises(rs.SiteError, match="n_groups_at"):
        _ = model.n_groups
    assert model.kv_head_rule() == "head // n_groups (2 in blocks [0]; 1 in blocks [1])"
    config = model.hf_model.config
    assert model.spec.value_scale == config.attention_value_scale != 1.0
    sites = [Site(layer, "v") for layer in range(model.n_layers)]
    cache = rs.run_with_cache(model, _batch(model), sites)
    for layer, site in enumerate(sites):  # the v site is what the kernel receives: W_V includes the scale
        assert cache[site].shape[2] == counts[layer] == model.W_V(layer).shape[0]
        v_proj = model.module("self_attn.v_proj", layer)
        assert torch.allclose(
            model.W_V(layer).permute(1, 0, 2).flatten(1), v_proj.weight.T * config.attention_value_scale
        )


def test_a_gated_input_norm_is_read_as_its_norm_and_a_frozen_gate():
    """AXK2: norm(x) ⊙ σ(mlp(norm(x))) in front of the attention (and of its experts)."""
    model = _load("axk2")
    gates = dict(model.spec.at(1).norm_gates)
    assert gates == {
        "input_layernorm": "input_layernorm.norm",
        "post_attention_layernorm": "post_attention_layernorm.norm",
    }
    assert dict(model.spec.at(0).norm_gates) == {"input_layernorm": "input_layernorm.norm"}  # a dense block
    params = model.norm_params("input_layernorm", 1)  # the norm inside the gated one
    assert torch.equal(params.weight, model.module("input_layernorm.norm", 1).weight)
    x = torch.randn(3, model.d_model, dtype=model.dtype)
    gate = model.norm_gate("input_layernorm", 1, x)
    wrapper = model.module("input_layernorm", 1)
    assert torch.allclose(wrapper.norm(x) * gate, wrapper(x), atol=1e-12)
    assert bool(((gate > 0) & (gate < 1)).all())  # a sigmoid gate
    assert model.norm_gate("post_attention_layernorm", 0, x) is None  # block 0's is a plain norm
