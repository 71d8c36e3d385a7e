"""Sublayer knockout (G3): batched rows equal the naive per-window loop; null knockouts are the clean run."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import recallscope as rs
from oracles.sublayer_knockout import naive_references, naive_state, naive_state_rate, naive_window
from recallscope.core.attention import pattern_hook
from recallscope.core.hooks import site_hook
from recallscope.methods import sublayer_knockout as sk
from tiny import DISCOVERED, FLOAT32_INSIDE

TEST_FILTER = dict(top_k=80, keep=20, min_length=1)  # the tiny vocabulary has few clean tokens
FLOAT64 = dict(rtol=1e-9, atol=1e-12)
# these compute part of their attention in float32 even for float64 weights (tiny.FLOAT32_INSIDE)
TOLERANCE = dict.fromkeys(FLOAT32_INSIDE, dict(rtol=1e-5, atol=1e-7))


def _facts() -> rs.FactSet:
    fact = rs.Fact.from_template
    return rs.FactSet(
        [
            fact(
                "The [capital] of {subject} is",
                "France",
                ["Paris"],
                relation="capital",
                description="The capital of France is Paris. The Eiffel Tower is in the city of Paris.",
            ),
            fact(
                "{subject} [plays the]",
                "Miles Davis",
                ["trumpet"],
                relation="instrument",
                description="Miles Davis plays the trumpet in Rome and in Paris.",
            ),
            fact("The [official language of] {subject} is", "Japan", ["Japanese"], relation="language"),
            fact("The [currency of] {subject} is the", "Japan", ["yen"], relation="currency"),
            fact("{subject} was [founded by]", "Apple", ["Steve Jobs"], relation="founder"),  # no references
        ],
        name="tiny",
    )


def _config(model, facts, **kwargs) -> sk.Config:
    return sk.prepare(model, facts, sk.Config(**{"window": 2, "max_batch_rows": 5, **TEST_FILTER, **kwargs}))


def _unpadded(batch, row):
    pad = int(batch.pad_lengths[row])
    return batch.input_ids[row, pad:], int(batch.spans["subject"][row, 1]) - 1 - pad


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa", "gemma2", "gpt_neox", "gptj", *DISCOVERED])
@pytest.mark.parametrize(("mode", "how"), [("zero", "logit_lens"), ("as_coded", "raw_embed")])
def test_batched_equals_naive_loop(tiny_models, family, mode, how):
    model = tiny_models(family)
    facts = _facts()
    config = _config(model, facts, mlp_mode=mode, attn_mode=mode, readout=how)
    result = sk.run(model, facts, config)
    batch = facts.to_batch(model)
    target = result.target_layer
    states = sk._states(
        model, batch, batch.spans["subject"][:, 1] - 1, sk._rows(len(batch), config, target), config, target
    ).view(len(batch), 1 + 2 * (target + 1), -1)
    texts = rs.core.attributes.reference_texts(facts, config.subject_objects)
    tolerance = TOLERANCE.get(family, FLOAT64)
    for row in range(len(batch)):
        ids, position = _unpadded(batch, row)
        refs = naive_references(model, texts[row], config.min_length, config.lowercase_references)
        clean = naive_state(model, ids, position, target, [], "mlp", mode)
        torch.testing.assert_close(states[row, 0], clean, **tolerance)
        np.testing.assert_allclose(
            result.clean_rate[row], naive_state_rate(model, clean, refs, config)[0], rtol=1e-12
        )
        for s, sublayer in enumerate(config.sublayers):
            for start in range(target + 1):
                layers = naive_window(start, config.window, target)
                state = naive_state(model, ids, position, target, layers, sublayer, mode)
                torch.testing.assert_close(states[row, 1 + s * (target + 1) + start], state, **tolerance)
                expected, n_top = naive_state_rate(model, state, refs, config)
                np.testing.assert_allclose(result.rate[row, s, start], expected, rtol=1e-12)
                assert result.n_top[row, s, start] == n_top
    assert np.isnan(result.rate[4]).all() and not result.has_references[4]
    if family != "gpt_neo":  # its tiny random model never ranks a reference token in its top tokens
        assert np.nanmax(result.rate) > 0  # the test is not vacuous


@pytest.mark.parametrize("family", ["llama_gqa", "gpt_neox"])
@pytest.mark.parametrize("mode", sk.MODES)
def test_padded_batch_equals_one_by_one(tiny_models, family, mode):
    model = tiny_models(family)
    facts = _facts()
    config = _config(model, facts, max_batch_rows=128, mlp_mode=mode, attn_mode=mode)
    full = sk.run(model, facts, config)
    for i in range(len(facts)):
        one = sk.run(model, facts[i : i + 1], config)
        np.testing.assert_allclose(one.rate[0], full.rate[i], rtol=1e-12)
        np.testing.assert_allclose(one.clean_rate[0], full.clean_rate[i], rtol=1e-12)
        np.testing.assert_array_equal(one.n_top[0], full.n_top[i])
        assert one.top_tokens[0] == full.top_tokens[i]


@pytest.mark.parametrize("family", ["gpt2", "mistral", "gptj"])
def test_null_rows_equal_the_clean_run(tiny_models, family):
    model = tiny_models(family)
    batch = _facts().to_batch(model)
    site = rs.Site(1, "resid_post")
    clean = rs.run_with_cache(model, batch, [site])[site]
    nobody = torch.zeros(len(batch), dtype=torch.bool)
    for sublayer in sk.SUBLAYERS:
        for mode in sk.MODES:
            with sk.knock_out(model, 1, sublayer, mode, rows=nobody, attention_mask=batch.attention_mask):
                knocked = rs.run_with_cache(model, batch, [site])[site]
            real = batch.attention_mask.bool()
            torch.testing.assert_close(knocked[real], clean[real], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa", "gptj"])
def test_as_coded_attention_is_uniform_over_the_causal_prefix(tiny_models, family):
    model = tiny_models(family)
    batch = rs.tokenize(model, ["France is", "The Eiffel Tower is in"])
    seen = {}

    def read(probs):
        seen["pattern"] = probs.clone()

    with pattern_hook(model, 1, read):
        rs.forward(model, batch)
    clean = seen["pattern"]
    rows = torch.tensor([True, False])
    with sk.knock_out(model, 1, "attn", "as_coded", rows=rows, attention_mask=batch.attention_mask):
        with pattern_hook(model, 1, read):
            rs.forward(model, batch)
    pattern = seen["pattern"]  # [B, H, T, T]
    pad = int(batch.pad_lengths[0])
    n_tokens = batch.seq_len
    for query in range(pad, n_tokens):
        expected = torch.zeros(n_tokens, dtype=pattern.dtype)
        expected[pad : query + 1] = 1.0 / (query + 1 - pad)
        torch.testing.assert_close(pattern[0, :, query], expected.expand(model.n_heads, -1), rtol=0, atol=0)
    torch.testing.assert_close(pattern[1], clean[1], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("family", ["gpt2", "gemma2", "gpt_neox"])
def test_zero_modes_remove_the_update(tiny_models, family):
    model = tiny_models(family)
    batch = rs.tokenize(model, ["France is", "The Eiffel Tower is in"])
    seen = {}

    def keep(name):
        return lambda act: seen.__setitem__(name, act.clone())

    for sublayer, site in (("mlp", "mlp_out"), ("attn", "attn_out")):
        with sk.knock_out(model, 0, sublayer, "zero", rows=torch.tensor([False, True])):
            with site_hook(model, rs.Site(0, site), keep(site)):
                rs.forward(model, batch)
        assert (seen[site][1] == 0).all() and (seen[site][0] != 0).any()
    with sk.knock_out(model, 0, "mlp", "as_coded"):
        with site_hook(model, rs.Site(0, "mlp_out"), keep("mlp_out")):
            rs.forward(model, batch)
    bias = model.b_out(0)
    expected = torch.zeros(model.d_model, dtype=model.dtype) if bias is None else bias
    if family == "gemma2":  # the post-MLP norm of a zero update is zero
        expected = torch.zeros_like(expected)
    torch.testing.assert_close(seen["mlp_out"], expected.expand_as(seen["mlp_out"]), rtol=0, atol=0)


def test_prompt_batch_with_references_equals_factset(tiny_models):
    model = tiny_models("qwen2")
    facts = _facts()
    config = _config(model, facts)
    texts = rs.core.attributes.reference_texts(facts, config.subject_objects)
    from_facts = sk.run(model, facts, config)
    from_batch = sk.run(model, facts.to_batch(model), config, references=texts)
    np.testing.assert_array_equal(from_facts.rate, from_batch.rate)
    assert from_batch.provenance["conventions"]["references"] == "given by the caller"


def test_tidy_rows_and_conventions(tiny_models):
    model = tiny_models("llama_gqa")
    facts = _facts()
    result = sk.run(model, facts, _config(model, facts))
    target = result.target_layer
    assert target == 2  # round(40 * 3 / 48)
    frame = result.to_frame()
    per_fact = 1 + 2 * (target + 1)
    assert len(frame) == len(facts) * per_fact
    none = frame[frame.sublayer == "none"]
    assert (
        len(none) == len(facts) and (none[["start_layer", "window_start", "window_stop"]] == -1).all().all()
    )
    np.testing.assert_allclose(frame["change"], frame["attributes_rate"] - frame["clean_rate"])
    first = frame[(frame.sublayer == "mlp") & (frame.start_layer == 2)].iloc[0]
    assert (first.window_start, first.window_stop, first.target_layer) == (2, 3, 2)
    assert not frame[frame.fact_id == "founder/Apple"]["has_references"].any()
    assert set(result.arrays()) == {f"{f.fact_id}/rate" for f in facts}
    assert result.arrays()["capital/France/rate"].shape == (2, target + 1)
    tokens = result.tables()["top_tokens"]
    assert list(tokens.columns) == ["fact_id", "rank", "token", "in_references"]
    assert tokens.groupby("fact_id").size().max() <= sk.TOP_TOKENS_SHOWN
    conventions = result.provenance["conventions"]
    assert conventions["target_layer"] == 2 and conventions["readout"] == "logit_lens"
    assert "over the whole dataset" in conventions["references"]
    cost = sk.cost(model, facts, sk.Config(max_batch_rows=7))
    assert cost.forwards == -(-len(facts) * per_fact // 7) and cost.peak_bytes > 0


def test_presets_and_target_layer_rule():
    geva = sk.Config.preset("geva")
    assert (geva.window, geva.mlp_mode, geva.attn_mode, geva.readout) == (
        11,
        "as_coded",
        "as_coded",
        "raw_embed",
    )
    assert not geva.lowercase_references and (geva.top_k, geva.keep, geva.min_length) == (500, 50, 3)
    layers = {48: 40, 28: 23, 3: 2, 1: 0}
    for n_layers, expected in layers.items():
        assert sk.resolve_target_layer(SimpleNamespace(n_layers=n_layers), sk.Config()) == expected
    assert sk.knockout_window(38, 11, 40) == range(38, 41)


def test_errors(tiny_models):
    model = tiny_models("gpt2")
    with pytest.raises(rs.RecallscopeError, match="sublayers must be a non-empty tuple of distinct items"):
        sk.Config(sublayers=("mlp", "mlp"))
    with pytest.raises(rs.RecallscopeError, match="mlp_mode must be one of"):
        sk.Config(mlp_mode="mean")
    with pytest.raises(rs.RecallscopeError, match="keep <= top_k"):
        sk.Config(top_k=10, keep=20)
    with pytest.raises(rs.RecallscopeError, match="out of range: the model has 3 blocks"):
        sk.run(model, _facts(), sk.Config(target_layer=3))
    batch = _facts().to_batch(model)
    with pytest.raises(rs.RecallscopeError, match="needs references="):
        sk.run(model, batch)
    with pytest.raises(rs.RecallscopeError, match="one sequence of texts per prompt"):
        sk.run(model, batch, references=[["Paris"]])
    with pytest.raises(rs.RecallscopeError, match="needs a subject span"):
        sk.run(model, rs.tokenize(model, ["France is"]), references=[["Paris"]])
