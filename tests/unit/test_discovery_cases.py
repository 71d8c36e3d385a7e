"""Architectures discovery meets in the coverage matrix, checked by what their sites and specs say."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import recallscope as rs
from recallscope import coverage
from recallscope.core.attention import output_gate_hook
from recallscope.core.cache import forward
from recallscope.core.decompose import resid_sites
from recallscope.core.hooks import module_hook
from recallscope.models.sites import Site
from tiny import byte_level_tokenizer, tiny_hf_model


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


def test_residual_scaled_by_block_is_fitted_and_read_in_units_of_the_final_residual():
    """Beam: add n keeps sqrt((n-1)/n) of the residual and adds 1/sqrt(n) of the sublayer's output."""
    model = _load("beam")
    adds = [(math.sqrt((n - 1) / n), 1 / math.sqrt(n)) for n in range(2, 2 * model.n_layers + 2)]
    expected = [(*adds[2 * i], *adds[2 * i + 1]) for i in range(model.n_layers)]
    np.testing.assert_allclose(model.spec.residual_mix, expected, rtol=1e-12)
    last = model.n_layers - 1
    assert model.stream_scale(last, "post") == 1.0  # the last block's output is the model's own residual
    sites = [Site(None, "embed"), Site(last, "resid_post")]
    sites += [Site(layer, name) for layer in range(model.n_layers) for name in ("attn_out", "mlp_out")]
    batch = _batch(model)
    cache = rs.run_with_cache(model, batch, sites)
    out = model.hf_model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True
    )
    n_adds = 2 * model.n_layers + 1
    total = cache[sites[0]] + sum(cache[site] for site in sites[2:])
    torch.testing.assert_close(total, cache[sites[1]], rtol=1e-10, atol=1e-12)  # the sites only add
    # the embedding contributes 1/sqrt(N) of itself to the final residual (Π sqrt((n-1)/n))
    torch.testing.assert_close(
        cache[sites[0]], out.hidden_states[0] / math.sqrt(n_adds), rtol=1e-10, atol=1e-12
    )


def test_heads_wider_in_some_blocks_are_padded_with_zero_features():
    """Gemma 4: its global layers' heads are twice as wide; text attends causally (bidirectional
    attention is only among image tokens, use_bidirectional_attention="vision")."""
    model = _load("gemma4_unified_text")
    assert model.hf_model.config.use_bidirectional_attention == "vision"
    widths = [model.d_head_at(layer) for layer in range(model.n_layers)]
    assert widths == [16, 32] and model.d_head == 32
    W_O = model.W_O(0)  # [H, 32, d]: block 0's heads are 16 wide, padded with zero rows
    assert W_O.shape == (model.n_heads, 32, model.d_model) and not W_O[:, 16:].any() and W_O[:, :16].any()
    batch = _batch(model)
    sites = [Site(0, "z"), Site(0, "v"), Site(0, "attn_out")]
    cache = rs.run_with_cache(model, batch, sites)
    assert cache[sites[0]].shape[-1] == cache[sites[1]].shape[-1] == 32
    assert not cache[sites[0]][..., 16:].any() and not cache[sites[1]][..., 16:].any()
    with rs.patch(model, sites[0], cache[sites[0]]):  # writing back what was read changes nothing
        again = rs.run_with_cache(model, batch, sites[2:])
    assert torch.equal(again[sites[2]], cache[sites[2]])


def test_per_layer_inputs_are_a_third_update_of_their_own():
    """Gemma 4 (E2B, E4B): after the MLP each block adds norm(W_proj (act(W_gate r) ⊙ e_l)) of its
    residual r and the token's per-layer embedding e_l, then multiplies by its layer_scalar."""
    model = _load("gemma4_text")
    assert model.spec.ple_update == "post_per_layer_input_norm"
    assert model.spec.mlp_out_proj == "mlp.down_proj"  # not the per-layer projection, written later
    scalars = [float(model.block(layer).layer_scalar) for layer in range(model.n_layers)]
    np.testing.assert_allclose(model.spec.ple_mix, scalars, rtol=1e-12)  # (random in the tiny model)
    batch = _batch(model)
    sites = [Site(layer, name) for layer in range(model.n_layers) for name in ("resid_mid", "ple_out")]
    ple = Site(model.n_layers - 1, "ple_out")
    sites += [Site(model.n_layers - 1, name) for name in ("mlp_out", "resid_post")]
    cache = rs.run_with_cache(model, batch, sites)
    module_out = []
    norm = model.module("post_per_layer_input_norm", model.n_layers - 1)
    with module_hook(norm, lambda mod, args, kwargs, out: module_out.append(out), "fwd"):
        forward(model, batch)
    # the last block's output is the model's residual: the site is what the module wrote, times the scalar
    torch.testing.assert_close(cache[ple], module_out[0] * scalars[-1], rtol=1e-12, atol=1e-12)
    last = model.n_layers - 1
    total = cache[Site(last, "resid_mid")] + cache[Site(last, "mlp_out")] + cache[ple]
    torch.testing.assert_close(total, cache[Site(last, "resid_post")], rtol=1e-12, atol=1e-12)
    decomposition = rs.resid_decomposition(model, rs.run_with_cache(model, batch, resid_sites(model)))
    assert [label for label in decomposition.labels if label.endswith("ple_out")] == [
        f"{layer}.ple_out" for layer in range(model.n_layers)
    ]


def test_resume_replays_the_recorded_per_layer_inputs():
    """Resuming from block 1 with its recorded input gives the recorded logits, though the model
    would otherwise derive per-layer inputs from the resumed input (and fail to invert it)."""
    from recallscope.core.resume import record_run, resume

    model = _load("gemma4_text")
    ids = _batch(model).input_ids[:1, -4:]
    state = record_run(model, ids, logits_to_keep=4)
    assert state.block_inputs is not None and all(len(inputs) == 1 for inputs in state.block_inputs)
    hidden = state.stream[:, 1, 2:]
    logits = resume(model, state, torch.tensor([0]), start_layer=1, start_pos=2, hidden=hidden)
    torch.testing.assert_close(logits[0, -1], state.logits[0, -1], rtol=1e-10, atol=1e-10)


def test_blocks_that_reuse_another_blocks_keys_and_values_are_refused_by_name():
    """Gemma 4's E2B and E4B checkpoints share keys and values across their last layers."""
    layers = ["sliding_attention", "full_attention"] * 2
    hf_model = tiny_hf_model("gemma4_text", num_hidden_layers=4, num_kv_shared_layers=2, layer_types=layers)
    with pytest.raises(rs.UnsupportedModelError, match="block 2 has no key projection .* key/value sharing"):
        rs.load_model(hf_model, tokenizer=byte_level_tokenizer(), device="cpu")
