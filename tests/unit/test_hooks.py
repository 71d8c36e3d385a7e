"""Reading and writing every site, on every family: exact relations in float64."""

from __future__ import annotations

import pytest
import torch

import recallscope as rs
from recallscope import Site
from recallscope.core.attention import eager_attention
from recallscope.core.decompose import head_outputs, neuron_outputs


def _run(model, batch, sites, **kwargs):
    return rs.run_with_cache(model, batch, sites, logits="all", **kwargs)


def _close(a, b, tol=1e-10):
    scale = max(1.0, float(b.abs().max()))
    assert float((a - b).abs().max()) <= tol * scale


def test_canonical_shapes(setup):
    model, batch = setup
    B, T = batch.input_ids.shape
    d, H, Hkv, dh, dm = model.d_model, model.n_heads, model.n_kv_heads_at(1), model.d_head, model.d_mlp
    spec = model.spec.at(1)
    # queries and keys may be wider than the values (MiMo-V2): their width is the projection's
    dqk = dh if spec.q_proj is None else model.module(spec.q_proj, 1).out_features // H
    expected = {
        "embed": (B, T, d),
        "resid_pre": (B, T, d),
        "resid_post": (B, T, d),
        "attn_out": (B, T, d),
        "mlp_out": (B, T, d),
        "q": (B, T, H, dqk),
        "k": (B, T, Hkv, dqk),
        "v": (B, T, Hkv, dh),
        "z": (B, T, H, dh),
        "pattern": (B, H, T, T),
        "mlp_pre": (B, T, dm),
        "mlp_post": (B, T, dm),
    }
    if model.spec.at(1).experts is not None or model.spec.at(1).mlp_pre is None:
        del expected["mlp_pre"]  # a mixture of experts has no one activation input: mlp_post only
    sites = [Site(None if n == "embed" else 1, n) for n in expected]
    cache = _run(model, batch, sites)
    for site in sites:
        assert tuple(cache[site].shape) == expected[site.name], site


def test_positions_are_selected_per_site(setup):
    model, batch = setup
    sites = [Site(1, "resid_post"), Site(1, "pattern")]
    full = _run(model, batch, sites)
    last = _run(model, batch, sites, positions=[-1, 0])
    assert torch.equal(last[sites[0]], full[sites[0]][:, [-1, 0]])
    assert torch.equal(last[sites[1]], full[sites[1]][:, :, [-1, 0]])
    per_row = torch.tensor([[2], [3]])
    rows = _run(model, batch, sites, positions=per_row)
    assert torch.equal(rows[sites[0]][:, 0], full[sites[0]][[0, 1], [2, 3]])


def test_zeroing_a_head_removes_its_output(setup):
    model, batch = setup
    if model.spec.attn_post_norm:
        pytest.skip("Gemma-2's post-norm makes attn_out nonlinear in the heads (covered by check_model)")
    layer, head = 1, 2
    z_site, out_site = Site(layer, "z"), Site(layer, "attn_out")
    clean = _run(model, batch, [z_site, out_site])
    with rs.patch(model, z_site, torch.zeros(()), heads=[head]):
        ablated = _run(model, batch, [z_site, out_site])
    assert torch.equal(ablated[z_site][:, :, head], torch.zeros_like(ablated[z_site][:, :, head]))
    removed = head_outputs(model, layer, clean[z_site]).parts[:, :, head]
    _close(ablated[out_site], clean[out_site] - removed)


def test_zeroing_a_neuron_removes_its_output(setup):
    model, batch = setup
    if model.spec.mlp_post_norm:
        pytest.skip("Gemma-2's post-norm makes mlp_out nonlinear in the neurons")
    layer, neurons = 2, [0, 5]
    coeff_site, out_site = Site(layer, "mlp_post"), Site(layer, "mlp_out")
    clean = _run(model, batch, [coeff_site, out_site])
    with rs.ablate_neurons(model, layer, neurons):
        ablated = _run(model, batch, [coeff_site, out_site])
    assert torch.equal(ablated[coeff_site][..., neurons], torch.zeros_like(ablated[coeff_site][..., neurons]))
    removed = neuron_outputs(model, layer, clean[coeff_site]).parts[:, :, neurons].sum(2)
    _close(ablated[out_site], clean[out_site] - removed)


def test_zero_query_gives_uniform_attention(setup):
    """q = 0 makes every score 0 (RoPE, qk-norm and soft-cap keep 0 at 0): uniform over allowed keys."""
    model, batch = setup
    premise = {
        "olmo2": "its qk-norm spans every head: zeroing one head's query rescales the others'",
        "gpt_oss": "its attention sinks take part of every row",
        "mimo_v2_flash": "the attention sinks of its sliding-window blocks take part of every row",
        "bloom": "ALiBi adds a bias to every score",
    }
    if model.spec.family in premise:
        pytest.skip(premise[model.spec.family])
    layer, head = 1, 1
    pattern = Site(layer, "pattern")
    clean = _run(model, batch, [pattern])[pattern]
    with rs.patch(model, Site(layer, "q"), torch.zeros(()), heads=[head]):
        probs = _run(model, batch, [pattern])[pattern]
    allowed = (clean[:, head] > 0).to(probs.dtype)
    uniform = allowed / allowed.sum(-1, keepdim=True)
    real = batch.attention_mask.bool()
    _close(probs[:, head][real], uniform[real])
    others = [h for h in range(model.n_heads) if h != head]
    assert torch.equal(probs[:, others], clean[:, others])


def test_zero_values_of_a_kv_head_silence_its_query_heads(setup):
    model, batch = setup
    layer = 2
    kv_head = model.n_kv_heads_at(layer) - 1
    z_site = Site(layer, "z")
    with eager_attention(model):  # the kernel values are read in (Gemma 4) run in it: so does the clean run
        clean = _run(model, batch, [z_site])[z_site]
        with rs.patch(model, Site(layer, "v"), torch.zeros(()), heads=[kv_head]):
            z = _run(model, batch, [z_site])[z_site]
    group = [h for h in range(model.n_heads) if h // model.n_groups_at(layer) == kv_head]
    rest = [h for h in range(model.n_heads) if h not in group]
    real = batch.attention_mask.bool()
    assert float(z[real][:, group].abs().max()) == 0.0
    assert torch.equal(z[:, :, rest], clean[:, :, rest])


@pytest.mark.parametrize("name", ["q", "k", "v", "z", "mlp_pre", "mlp_post", "attn_out", "mlp_out"])
def test_patching_clean_into_clean_is_identity(setup, name):
    model, batch = setup
    if name == "mlp_pre" and (model.spec.at(1).experts is not None or model.spec.at(1).mlp_pre is None):
        pytest.skip("no one activation input (mlp_pre): a mixture of experts, or an MLP in float32 (Beam)")
    site = Site(1, name)
    clean = _run(model, batch, [site])
    with rs.patch(model, site, clean[site]):
        patched = _run(model, batch, [site])
    assert torch.equal(patched.logits, clean.logits)


def test_resid_pre_of_next_layer_is_resid_post(setup):
    model, batch = setup
    post, pre = Site(0, "resid_post"), Site(1, "resid_pre")
    clean = _run(model, batch, [post, pre])
    assert torch.equal(clean[post], clean[pre])
    value = torch.randn(model.d_model, dtype=torch.float64)
    with rs.patch(model, post, value, positions=[-2]):
        a = _run(model, batch, [])
    with rs.patch(model, pre, value, positions=[-2]):
        b = _run(model, batch, [])
    assert torch.equal(a.logits, b.logits)


def test_update_sites_are_what_the_block_adds(setup):
    model, batch = setup
    layer = 1
    sites = [Site(layer, n) for n in ("resid_pre", "attn_out", "mlp_out", "resid_post")]
    late = [Site(layer, "ple_out")] if model.spec.ple_update else []  # Gemma 4's per-layer input
    with rs.patch(model, Site(layer, "attn_out"), torch.zeros(())):
        cache = _run(model, batch, sites + late)
    pre, attn, mlp, post = (cache[s] for s in sites)
    assert float(attn.abs().max()) == 0.0
    _close(post, pre + mlp + sum(cache[s] for s in late))
    if late:  # the third update is a site of its own: zeroed, the block adds two
        with rs.patch(model, late[0], torch.zeros(())):
            cache = _run(model, batch, sites + late)
        assert float(cache[late[0]].abs().max()) == 0.0
        _close(cache[sites[3]], cache[sites[0]] + cache[sites[1]] + cache[sites[2]])


def test_resid_mid_read_and_write(setup):
    model, batch = setup
    mid, post, mlp = Site(1, "resid_mid"), Site(1, "resid_post"), Site(1, "mlp_out")
    if model.spec.parallel:
        with pytest.raises(rs.SiteError, match="resid_mid does not exist .* parallel"):
            _run(model, batch, [mid])
        return
    clean = _run(model, batch, [mid, Site(1, "resid_pre"), Site(1, "attn_out")])
    _close(clean[mid], clean[Site(1, "resid_pre")] + clean[Site(1, "attn_out")], tol=0)
    target = torch.randn(model.d_model, dtype=torch.float64)
    late = [Site(1, "ple_out")] if model.spec.ple_update else []  # Gemma 4's per-layer input
    with rs.patch(model, mid, target, positions=[-1]):
        patched = _run(model, batch, [mid, post, mlp, *late])
    _close(patched[mid][:, -1], target.expand(2, -1), tol=1e-12)
    _close(patched[post], patched[mid] + patched[mlp] + sum(patched[s] for s in late), tol=1e-12)


def test_ple_out_site_only_where_blocks_add_one(tiny_models):
    with pytest.raises(rs.SiteError, match="no third update after the MLP .* no ple_out site"):
        rs.site_hook(tiny_models("llama_gqa"), Site(0, "ple_out"), print)


def test_noise_on_embeddings(setup):
    model, batch = setup
    embed = Site(None, "embed")
    clean = _run(model, batch, [embed])[embed]
    noise = torch.randn(2, 2, model.d_model, dtype=torch.float64)
    rows, positions = torch.tensor([0, 1]), torch.tensor([[-2, -1], [-3, -1]])
    with rs.add_noise(model, noise, rows, positions):
        noisy = _run(model, batch, [embed])[embed]
    expected = clean.clone()
    expected[rows[:, None], positions % batch.seq_len] += noise
    _close(noisy, expected, tol=1e-15)  # (a scaled embed site writes back up to one rounding)
    assert torch.equal(noisy[:, :-3], clean[:, :-3])  # untouched positions are bit-identical


def test_pos_embed_site(setup):
    model, batch = setup
    site = Site(None, "pos_embed")
    if model.spec.pos_embed is None:
        with pytest.raises(rs.SiteError, match="has no learned position embedding"):
            _run(model, batch, [site])
        return
    pos = _run(model, batch, [site])[site]
    assert pos.shape == (2, batch.seq_len, model.d_model)


def _all_hooks(model):
    """Hook ids on every module (transformers installs some of its own, permanently)."""
    return {
        (name, kind, key)
        for name, m in model.hf_model.named_modules()
        for kind, hooks in (("fwd", m._forward_hooks), ("pre", m._forward_pre_hooks))
        for key in hooks
    }


def test_hooks_are_removed_after_an_exception(setup):
    model, batch = setup
    before = _all_hooks(model)

    def boom(act):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with rs.site_hook(model, Site(1, "z"), boom), rs.block_attention(model, [rs.Knockout([1], src=[0])]):
            rs.forward(model, batch)
    assert _all_hooks(model) == before
    assert model.attn_implementation in ("sdpa", "eager", "recallscope_eager")


def test_pattern_context_restores_the_kernel(setup):
    model, batch = setup
    before = model.attn_implementation
    with pytest.raises(RuntimeError):
        with rs.site_hook(model, Site(0, "pattern"), lambda p: (_ for _ in ()).throw(RuntimeError())):
            rs.forward(model, batch)
    assert model.attn_implementation == before


def test_layer_out_of_range(tiny_models):
    model = tiny_models("llama_gqa")
    with pytest.raises(rs.SiteError, match=r"layer 3 does not exist: expected 0 ≤ layer < 3"):
        rs.run_with_cache(model, torch.tensor([[1, 2]]), ["3.resid_post"])
    with pytest.raises(rs.SiteError, match="negative indices are not accepted"):
        rs.run_with_cache(model, torch.tensor([[1, 2]]), [Site(-1, "resid_post")])


def test_writing_the_wrong_shape_is_an_error(tiny_models):
    model = tiny_models("llama_gqa")
    with pytest.raises(rs.ShapeError, match=r"patch value of shape \(5,\) does not fit"):
        with rs.patch(model, "1.resid_post", torch.zeros(5, dtype=torch.float64)):
            rs.forward(model, torch.tensor([[1, 2, 3]]))
    with pytest.raises(rs.SiteError, match="has no head axis"):
        rs.patch(model, "1.resid_post", torch.zeros(()), heads=[0])
