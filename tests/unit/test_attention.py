"""Attention-edge knockout and attention patterns: exact properties on every family."""

from __future__ import annotations

import pytest
import torch

import recallscope as rs
from recallscope import Knockout, Site
from recallscope.core.attention import eager_attention
from recallscope.core.knockout import compile_knockouts


def _pattern(model, batch, layer, **kwargs):
    site = Site(layer, "pattern")
    cache = rs.run_with_cache(model, batch, [site], logits="all", **kwargs)
    return cache[site], cache.logits


def test_post_softmax_zero_does_not_renormalize(setup):
    model, batch = setup
    layer, src = 1, [-3, -2]
    clean, _ = _pattern(model, batch, layer)
    with rs.block_attention(model, [Knockout([layer], src=src)], mode="post_softmax_zero"):
        probs, _ = _pattern(model, batch, layer)
    assert torch.equal(probs[:, :, -1, src], torch.zeros_like(probs[:, :, -1, src]))
    kept = [p for p in range(batch.seq_len) if p - batch.seq_len not in src]
    assert torch.equal(probs[:, :, -1, kept], clean[:, :, -1, kept])  # same kernel, untouched


def test_pre_softmax_renormalizes(setup):
    model, batch = setup
    layer, src = 1, [-3, -2]
    clean, _ = _pattern(model, batch, layer)
    with rs.block_attention(model, [Knockout([layer], src=src)]):
        probs, _ = _pattern(model, batch, layer)
    assert torch.equal(probs[:, :, -1, src], torch.zeros_like(probs[:, :, -1, src]))
    expected = clean[:, :, -1].clone()
    sink = 1 - expected.sum(-1, keepdim=True)  # attention sinks (gpt-oss) keep their share
    expected[..., src] = 0
    total = expected.sum(-1, keepdim=True) + sink
    expected, sink = expected / total, sink / total
    assert torch.allclose(probs[:, :, -1], expected, atol=1e-12)
    assert torch.allclose(
        probs[:, :, -1].sum(-1) + sink[..., 0], torch.ones((), dtype=probs.dtype), atol=1e-12
    )


def test_per_head_knockout_leaves_other_heads_alone(setup):
    model, batch = setup
    layer = 2
    clean, _ = _pattern(model, batch, layer)
    with rs.block_attention(model, [Knockout([layer], src=[-2], heads=[0])]):
        probs, _ = _pattern(model, batch, layer)
    assert float(probs[:, 0, -1, -2].abs().max()) == 0.0
    assert torch.equal(probs[:, 1:], clean[:, 1:])


def test_blocking_every_key_is_refused_pre_softmax_and_zero_post_softmax(setup):
    model, batch = setup
    layer = 1
    everything = Knockout([layer], src=range(batch.seq_len), dst=[-1])
    with pytest.raises(rs.KnockoutError, match=r"blocks every key of query position .* Keep at least one"):
        with rs.block_attention(model, [everything]):
            rs.forward(model, batch)
    with rs.block_attention(model, [everything], mode="post_softmax_zero"):
        z = rs.run_with_cache(model, batch, [Site(layer, "z")])[Site(layer, "z")]
    assert float(z[:, -1].abs().max()) == 0.0


def test_knockout_lowers_nothing_else_in_earlier_layers(setup):
    model, batch = setup
    site = Site(0, "resid_post")
    clean = rs.run_with_cache(model, batch, [site])[site]
    with rs.block_attention(model, [Knockout([1, 2], src=[-2])]):
        after = rs.run_with_cache(model, batch, [site])[site]
    assert torch.equal(after, clean)


def test_precompiled_masks_equal_knockouts(setup):
    model, batch = setup
    kos = [Knockout([1], src=[-2], rows=[0]), Knockout([1, 2], src=[-3], heads=[1], rows=[1])]
    shape = (2, model.n_heads, batch.seq_len, batch.seq_len)
    masks = {layer: compile_knockouts(kos, layer, shape) for layer in (1, 2)}
    with rs.block_attention(model, kos):
        a = rs.forward(model, batch, logits="all")
    with rs.block_attention(model, masks):
        b = rs.forward(model, batch, logits="all")
    assert torch.equal(a, b)


def test_compile_knockouts():
    kos = [Knockout(layers=[0], src=[1], dst=[-1], rows=[1]), Knockout(layers=[0, 1], src=[0], heads=[2])]
    blocked = compile_knockouts(kos, 0, (2, 4, 3, 3))
    assert blocked.shape == (2, 4, 3, 3)
    assert blocked[1, :, 2, 1].all() and not blocked[0, :, 2, 1].any()
    assert blocked[:, 2, 2, 0].all() and blocked.sum() == 4 + 2
    assert compile_knockouts(kos, 5, (2, 4, 3, 3)) is None
    assert compile_knockouts(kos[:1], 0, (2, 4, 3, 3)).shape == (2, 1, 3, 3)
    with pytest.raises(rs.KnockoutError, match=r"knockout src \[7\] out of range for size 3"):
        compile_knockouts([Knockout([0], src=[7])], 0, (1, 4, 3, 3))


def test_bad_mode_and_layer(tiny_models):
    model = tiny_models("llama_gqa")
    with pytest.raises(rs.KnockoutError, match="unknown knockout mode 'zero'"):
        with rs.block_attention(model, [], mode="zero"):
            pass
    with pytest.raises(rs.SiteError, match="layer 9 does not exist"):
        with rs.block_attention(model, [Knockout([9], src=[0])]):
            pass


def test_sliding_window_is_kept_by_knockout(tiny_models):
    """Mistral with window 4: a knockout edits the windowed mask rather than replacing it."""
    model = tiny_models("mistral")
    batch = rs.tokenize(model, ["The Eiffel Tower is located in the city of Paris in France"])
    assert batch.seq_len > 4
    clean, _ = _pattern(model, batch, 1)
    assert float(clean[0, :, -1, :-4].abs().max()) == 0.0  # outside the window
    with rs.block_attention(model, [Knockout([1], src=[-2])]):
        with eager_attention(model):
            probs, eager = _pattern(model, batch, 1)
        sdpa = rs.forward(model, batch, logits="all")
    assert float(probs[0, :, -1, :-4].abs().max()) == 0.0 and float(probs[0, :, -1, -2].abs().max()) == 0.0
    assert torch.allclose(sdpa, eager, atol=1e-10)


def test_pattern_rows_sum_to_one(setup):
    model, batch = setup
    probs, _ = _pattern(model, batch, 2)
    real = batch.attention_mask.bool()
    sums = probs.sum(-1).transpose(1, 2)[real]
    if model.spec.at(2).attention_sinks:  # the sink takes the rest of each row
        assert bool(((sums > 0) & (sums < 1)).all())
        return
    assert torch.allclose(sums, torch.ones_like(sums), atol=1e-12)


def test_pattern_readers_see_edited_probabilities_in_any_nesting_order(setup):
    model, batch = setup
    layer, seen = 1, []
    knockout = rs.block_attention(model, [Knockout([layer], src=[-2])], mode="post_softmax_zero")
    with rs.site_hook(model, Site(layer, "pattern"), lambda p: seen.append(p[:, :, -1, -2].clone())):
        with knockout:
            rs.forward(model, batch)
    assert float(seen[0].abs().max()) == 0.0
