"""Span knockout → MLP logits (Yan & Jia Y4): batched rows equal the naive per-span loop, null
knockouts are the clean run, and a full post-softmax knockout leaves only the attention bias."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import recallscope as rs
from oracles.span_knockout_mlp import naive_attn_out, naive_run
from recallscope.core.knockout import block_attention
from recallscope.core.steps import span_masks
from recallscope.methods import span_knockout_mlp as sk
from tiny import DISCOVERED, FLOAT32_INSIDE, one_to_many_batch

FAMILIES = ["gpt2", "llama_gqa", "gemma2", "gpt_neox", "gptj", "opt", "qwen3", "mistral", *DISCOVERED]
EXACT = dict(rtol=1e-9, atol=1e-11)


def _expected(model, batch, result, mode: str, layers=None):
    """The oracle's clean / knockout logits of every frame row, and final probabilities."""
    masks = span_masks(batch, result.config.spans)
    clean, knocked, p_clean, p_knocked = [], [], [], []
    for b in range(len(batch)):
        pad = int(batch.pad_lengths[b])
        ids = batch.input_ids[b, pad:]
        current = result.roles[b].index("current")
        tracked = [int(batch.input_ids[b, batch.spans["subject"][b, 0]])] + [
            int(batch.tracked[f"answer_{j}"][b]) for j in (1, 2, 3)
        ]
        decoded, probs = naive_run(model, ids, [], mode, layers)
        p_clean.append(float(probs[tracked[current]]))
        for r in np.flatnonzero(result.row_fact == b):
            src = [int(j) - pad for j in masks[result.row_span[r]][b].nonzero()[:, 0]]
            ko, ko_probs = naive_run(model, ids, src, mode, layers)
            clean.append(decoded[:, tracked].numpy())
            knocked.append(ko[:, tracked].numpy())
            p_knocked.append(float(ko_probs[tracked[current]]))
    return np.stack(clean), np.stack(knocked), np.array(p_clean), np.array(p_knocked)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["post_softmax_zero", "pre_softmax"])
def test_batched_equals_naive_oracle(tiny_models, family, mode):
    model = tiny_models(family)
    batch = one_to_many_batch(model)
    result = sk.run(model, batch, sk.Config(mode=mode, max_batch_rows=5))  # 15 rows in 3 forwards
    assert result.row_span == [
        *["subject", "last_token"],
        *["subject", "answer_1", "last_token"],
        *["subject", "answer_1", "answer_2", "last_token"],
        *["subject", "last_token"],
    ]
    clean, knocked, p_clean, p_knocked = _expected(model, batch, result, mode)
    # padding moves the FLOAT32_INSIDE families' float32 parts by a rounding step
    tol = dict(rtol=1e-6, atol=1e-9) if family in FLOAT32_INSIDE else EXACT
    np.testing.assert_allclose(result.logit_clean[result.row_fact], clean, **tol)
    np.testing.assert_allclose(result.logit_knockout, knocked, **tol)
    np.testing.assert_allclose(result.delta, clean - knocked, **tol)
    np.testing.assert_allclose(result.p_clean, p_clean, **tol)
    np.testing.assert_allclose(result.p_knockout, p_knocked, **tol)
    assert np.abs(result.delta).max() > 100 * tol["atol"]  # the knockouts do something


@pytest.mark.parametrize("family", ["llama_gqa", "gpt2"])
def test_layer_subset_equals_naive_oracle(tiny_models, family):
    model = tiny_models(family)
    batch = one_to_many_batch(model)
    result = sk.run(model, batch, sk.Config(layers=(2, 1)))
    clean, knocked, _, p_knocked = _expected(model, batch, result, "post_softmax_zero", layers={1, 2})
    np.testing.assert_allclose(result.logit_knockout, knocked, **EXACT)
    np.testing.assert_allclose(result.p_knockout, p_knocked, **EXACT)
    assert result.provenance["conventions"]["knockout_scope"] == "layers [1, 2], all heads at once"


@pytest.mark.parametrize("mode", ["post_softmax_zero", "pre_softmax"])
@pytest.mark.parametrize("family", ["gpt2", "llama_gqa", "gemma2"])
def test_knockout_of_nothing_is_the_clean_run(tiny_models, family, mode):
    model = tiny_models(family)
    batch = one_to_many_batch(model)
    span = batch.span_mask("subject")[2]
    blocked = torch.stack([torch.zeros_like(span), torch.zeros_like(span), span])
    ids = torch.stack([batch.tracked[f"answer_{j}"][[2, 2, 2]] for j in (1, 2, 3)], 1)
    current = batch.tracked["answer_3"][[2, 2, 2]]
    logits, probs = sk._forward_rows(
        model, batch, torch.tensor([2, 2, 2]), blocked, ids, current, range(model.n_layers), mode
    )
    assert torch.equal(logits[1], logits[0]) and torch.equal(probs[1], probs[0])  # Δ = 0 exactly
    assert not torch.allclose(logits[2], logits[0])
    plain = sk._forward_rows(model, batch, torch.tensor([2]), blocked[:1], ids[:1], current[:1], [], mode)
    np.testing.assert_allclose(logits[0], plain[0][0], rtol=1e-12, atol=1e-13)  # no knockout context
    np.testing.assert_allclose(probs[0], plain[1][0], rtol=1e-12)


def test_absent_spans_give_no_rows(tiny_models):
    model = tiny_models("llama_gqa")
    batch = one_to_many_batch(model)
    result = sk.run(model, batch, sk.Config(spans=("answer_2", "relation")))
    assert result.row_span == ["answer_2"] and result.row_fact.tolist() == [2]
    assert {fact for fact, _ in result.skipped} == {"f0", "f1", "f3"}
    assert set(result.arrays()) == {"f2/delta"} and len(result.to_frame()) == model.n_layers * 4


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa", "gemma2", "gpt_neox", "gptj", "opt"])
def test_zeroing_every_source_leaves_the_attention_bias(tiny_models, family):
    model = tiny_models(family)
    batch = one_to_many_batch(model)
    edges = sk._last_row_edges(batch.attention_mask.bool())
    sites = [rs.Site(layer, "attn_out") for layer in range(model.n_layers)]
    with block_attention(model, {layer: edges for layer in range(model.n_layers)}, "post_softmax_zero"):
        cache = rs.run_with_cache(model, batch, sites, positions=[-1])
    for layer, site in enumerate(sites):
        b_O = model.b_O(layer)
        expected = torch.zeros(model.d_model, dtype=torch.float64) if b_O is None else b_O.double()
        np.testing.assert_allclose(cache[site][:, 0], expected.expand(len(batch), -1), atol=1e-12)
        ids = batch.input_ids[0, int(batch.pad_lengths[0]) :]
        naive = naive_attn_out(model, ids, list(range(len(ids))), "post_softmax_zero")
        np.testing.assert_allclose(naive[layer], expected, atol=1e-12)  # the oracle's kernel agrees


@pytest.mark.parametrize("family", ["llama_gqa", "opt"])
def test_padded_batch_equals_one_by_one(tiny_models, family):
    model = tiny_models(family)
    batch = one_to_many_batch(model)
    assert (batch.pad_lengths > 0).any()
    together = sk.run(model, batch, sk.Config(max_batch_rows=64)).to_frame()
    alone = [sk.run(model, batch.select([b]), sk.Config(max_batch_rows=2)) for b in range(len(batch))]
    frames = [r.to_frame() for r in alone]
    expected = pd.concat(frames, ignore_index=True)
    assert together[["fact_id", "span", "layer", "tracked", "role", "token"]].equals(
        expected[["fact_id", "span", "layer", "tracked", "role", "token"]]
    )
    for column in ("logit_clean", "logit_knockout", "delta"):
        np.testing.assert_allclose(together[column], expected[column], rtol=1e-9, atol=1e-11)


def test_pre_softmax_knockout_of_every_source_raises(tiny_models):
    model = tiny_models("gpt2")
    prompt = "The capital of France is"
    batch = rs.tokenize(model, [prompt], spans={"whole": [prompt]}, targets=[" Paris"])
    assert batch.span_mask("whole").all()
    config = sk.Config(spans=("whole",), subject=False, mode="pre_softmax")
    with pytest.raises(rs.KnockoutError, match="blocks every key of query position"):
        sk.run(model, batch, config)
    result = sk.run(model, batch, sk.Config(spans=("whole",), subject=False))  # post-softmax: allowed
    assert result.row_span == ["whole"] and np.isfinite(result.logit_knockout).all()


def test_frame_tables_arrays_and_conventions(tiny_models):
    model = tiny_models("llama_gqa")
    batch = one_to_many_batch(model)
    result = sk.run(model, batch, sk.Config.preset("yan_jia"))
    L, n_rows = model.n_layers, 11
    frame = result.to_frame()
    assert list(frame.columns) == [
        *["fact_id", "step", "span", "layer", "tracked", "role", "token"],
        *["logit_clean", "logit_knockout", "delta"],
    ]
    assert len(frame) == n_rows * L * 4
    np.testing.assert_array_equal(frame["delta"], frame["logit_clean"] - frame["logit_knockout"])
    row = frame[(frame.fact_id == "f2") & (frame.tracked == "answer_2")].iloc[0]
    assert row.step == 3 and row.role == "previous" and row.token == " Rome"
    assert set(frame[frame.fact_id == "f1"]["span"]) == {"subject", "answer_1", "last_token"}
    final = result.tables()["final"]
    assert (
        list(final.columns) == ["fact_id", "step", "span", "p_clean", "p_knockout"] and len(final) == n_rows
    )
    assert ((final.p_clean > 0) & (final.p_clean < 1)).all()
    arrays = result.arrays()
    assert set(arrays) == {"f0/delta", "f1/delta", "f2/delta", "f3/delta"}
    assert arrays["f2/delta"].shape == (4, L, 4) and arrays["f0/delta"].shape == (2, L, 4)
    average = result.summary()
    assert {"delta", "delta_ci", "n"} <= set(average.columns) and average["n"].sum() == len(frame)
    conventions = result.provenance["conventions"]
    assert conventions["knockout_mode"] == "post_softmax_zero" and conventions["renormalized"] is False
    assert conventions["knockout_scope"] == "all layers and heads at once"
    assert (
        conventions["knockout_rows"] == "last position only" and conventions["projection"] == "frozen_scale"
    )
    assert "bos" in conventions and result.provenance["config"]["preset_name"] == "yan_jia"
    assert sk.Config.preset("yan_jia").stable_hash() == sk.Config().stable_hash()
    cost = sk.cost(model, batch, sk.Config(max_batch_rows=4))
    assert cost.forwards == 4 and cost.token_blocks == 15 * batch.seq_len * L and cost.peak_bytes > 0


def test_plain_factual_batch(tiny_models):
    model = tiny_models("gpt2")
    batch = rs.tokenize(
        model, ["The capital of France is"], spans={"subject": ["France"]}, targets=[" Paris"]
    )
    result = sk.run(model, batch)
    assert result.tracked == ("subject", "answer_1") and result.row_span == ["subject", "last_token"]
    assert result.roles == (("subject", "current"),) and result.steps.tolist() == [1]


def test_errors(tiny_models):
    with pytest.raises(rs.RecallscopeError, match="mode must be one of"):
        sk.Config(mode="zero")
    with pytest.raises(rs.RecallscopeError, match="spans must be a non-empty tuple"):
        sk.Config(spans="subject")
    with pytest.raises(rs.RecallscopeError, match="spans must be a non-empty tuple"):
        sk.Config(spans=())
    with pytest.raises(rs.RecallscopeError, match="layers must be None"):
        sk.Config(layers=())
    with pytest.raises(rs.RecallscopeError, match="max_batch_rows must be an integer ≥ 1"):
        sk.Config(max_batch_rows=0)
    with pytest.raises(rs.RecallscopeError, match="no field 'modes'; did you mean 'mode'"):
        sk.Config.from_dict({"modes": "pre_softmax"})
    model = tiny_models("gpt2")
    batch = one_to_many_batch(model)
    with pytest.raises(rs.RecallscopeError, match="layer 7 does not exist"):
        sk.run(model, batch, sk.Config(layers=(7,)))
    with pytest.raises(rs.RecallscopeError, match="unknown span 'object'"):
        sk.run(model, batch, sk.Config(spans=("object",)))
    with pytest.raises(rs.RecallscopeError, match="got no facts"):
        sk.run(model, batch.select([]))
