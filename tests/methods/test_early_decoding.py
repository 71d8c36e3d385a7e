"""Early decoding (Yan & Jia Y1): the batched method equals the naive per-fact oracle, and the
decoded updates add up to the final residual's frozen-scale logits."""

from __future__ import annotations

import numpy as np
import pytest

import recallscope as rs
from oracles.early_decoding import (
    identity_parts,
    naive_early_decoding,
    per_row_results,
    tracked_ids,
    unpadded,
)
from recallscope.methods import early_decoding as ed
from tiny import DISCOVERED, ONE_TO_MANY, one_to_many_batch

# llama_scaled_residual: blocks that scale the residual (Beam's adds); its oracle knows the constants
FAMILIES = [
    "gpt2",
    "llama_gqa",
    "gemma2",
    "gpt_neox",
    "gptj",
    "opt",
    "phi",
    "qwen3",
    "mistral",
    "llama_scaled_residual",
    *DISCOVERED,
]
TOL = dict(rtol=1e-9, atol=1e-10)


def _runs(model, config):
    return per_row_results(ed.run, model, config)


@pytest.mark.parametrize("family", FAMILIES)
def test_equals_naive_oracle(tiny_models, family):
    model = tiny_models(family)
    for result, f, batch, row in _runs(model, ed.Config()):
        expected = naive_early_decoding(model, unpadded(batch, row), tracked_ids(batch, row))
        np.testing.assert_allclose(result.logit[f], expected, **TOL)
        assert result.tracked.names == ["subject", "answer_1", "answer_2", "answer_3"]


@pytest.mark.parametrize("family", [*FAMILIES, "gpt_neox_sequential", "llama_mqa", "gemma"])
def test_updates_and_embeddings_sum_to_the_final_residual(tiny_models, family):
    """Σ_ℓ (attn + mlp) + embeddings = x^L, read through the same frozen head (parallel blocks,
    Gemma-2 post-norms and learned positions included)."""
    model = tiny_models(family)
    for result, f, batch, row in _runs(model, ed.Config()):
        embed, final = identity_parts(model, unpadded(batch, row), tracked_ids(batch, row))
        np.testing.assert_allclose(result.logit[f].sum(axis=(0, 1)) + embed, final, **TOL)


@pytest.mark.parametrize("family", ["llama_gqa", "gpt2", "gemma2"])
def test_padded_batch_equals_one_by_one(tiny_models, family):
    model = tiny_models(family)
    together = ed.run(model, one_to_many_batch(model))
    assert (one_to_many_batch(model).pad_lengths > 0).any()
    for f, spec in enumerate(ONE_TO_MANY):
        alone = ed.run(model, one_to_many_batch(model, rows=[spec]))
        np.testing.assert_allclose(alone.logit[0], together.logit[f], **TOL)
        assert alone.tracked.tokens[0] == together.tracked.tokens[f]
        assert int(alone.tracked.steps[0]) == int(together.tracked.steps[f]) == len(spec[2]) + 1


def test_roles_steps_and_frame(tiny_models):
    model = tiny_models("llama_gqa")
    result = ed.run(model, one_to_many_batch(model), ed.Config.preset("yan_jia"))
    L, n = model.n_layers, 4
    assert result.logit.shape == (4, 2, L, n) and list(result.tracked.steps) == [1, 2, 3, 1]
    assert result.tracked.roles[1] == ["subject", "previous", "current", "future"]
    assert result.tracked.roles[2] == ["subject", "previous", "previous", "current"]
    frame = result.to_frame()
    assert list(frame.columns) == ["fact_id", "step", "site", "layer", "tracked", "role", "token", "logit"]
    assert len(frame) == 4 * 2 * L * n
    row = frame[
        (frame.fact_id == "f1") & (frame.site == "mlp") & (frame.layer == 2) & (frame.tracked == "answer_3")
    ]
    assert row.logit.item() == result.logit[1, 1, 2, 3] and row.role.item() == "future"
    assert row.token.item() == result.tracked.tokens[1][3] and row.step.item() == 2
    arrays = result.arrays()
    assert set(arrays) == {f"f{i}/logit" for i in range(4)} and arrays["f2/logit"].shape == (2, L, n)
    average = result.summary()
    assert {"step", "site", "layer", "tracked", "role", "logit", "logit_ci", "n"} <= set(average.columns)
    step1 = average[(average.step == 1) & (average.site == "attn") & (average.layer == 0)]
    assert (step1[step1.tracked == "answer_1"].n == 2).all()
    conventions = result.provenance["conventions"]
    assert conventions["projection"].startswith("frozen_scale") and conventions["positions"] == "last"
    assert conventions["layers"] == "block index" and conventions["bos"] == model.bos
    assert result.tables() == {} and result.method == "early_decoding"


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_plain_facts_track_the_target_as_answer_1(tiny_models, family):
    model = tiny_models(family)
    batch = rs.tokenize(
        model,
        ["The capital of France is", "Miles Davis plays the"],
        spans={"subject": ["France", "Miles Davis"]},
        targets=[" Paris", " trumpet"],
        fact_ids=["a", "b"],
    )
    result = ed.run(model, batch)
    assert result.tracked.names == ["subject", "answer_1"] and list(result.tracked.steps) == [1, 1]
    assert result.tracked.roles == [["subject", "current"]] * 2
    for f in range(2):
        expected = naive_early_decoding(model, unpadded(batch, f), tracked_ids(batch, f))
        np.testing.assert_allclose(result.logit[f], expected, **TOL)
    no_subject = ed.run(model, batch, ed.Config(subject=False, sites=("mlp",)))
    assert no_subject.tracked.names == ["answer_1"]
    np.testing.assert_allclose(no_subject.logit[:, 0, :, 0], result.logit[:, 1, :, 1], **TOL)


@pytest.mark.parametrize("family", ["gpt2", "gptj"])
def test_bias_adds_the_frozen_head_constant(tiny_models, family):
    """GPT-2: final LayerNorm bias ``W_U β``; GPT-J: also the unembedding bias ``b_U``."""
    model = tiny_models(family)
    batch = one_to_many_batch(model)
    plain, biased = ed.run(model, batch), ed.run(model, batch, ed.Config(bias=True))
    constant = model.W_U.double() @ model.norm_params(model.spec.final_norm).bias.double()
    constant = constant + (0 if model.b_U is None else model.b_U.double())
    expected = constant.numpy()[plain.tracked.ids]  # [F, n]
    np.testing.assert_allclose(
        biased.logit - plain.logit, np.broadcast_to(expected[:, None, None], plain.logit.shape), **TOL
    )


def test_config_errors_and_cost(tiny_models):
    with pytest.raises(rs.RecallscopeError, match="sites must be a non-empty tuple"):
        ed.Config(sites=("attn_out",))
    with pytest.raises(rs.RecallscopeError, match="sites must be a non-empty tuple"):
        ed.Config(sites="attn")
    with pytest.raises(rs.RecallscopeError, match="has no field 'site'; did you mean 'sites'"):
        ed.Config.from_dict({"site": ("attn",)})
    model = tiny_models("gpt2")
    batch = one_to_many_batch(model)
    cost = ed.cost(model, batch)
    assert cost.forwards == 1 and cost.token_blocks > 0 and cost.peak_bytes > 0
    with pytest.raises(rs.RecallscopeError, match="subject span"):
        plain = rs.tokenize(model, ["The capital of France is"], targets=[" Paris"])
        ed.run(model, plain)
    plain = rs.tokenize(model, ["The capital of France is"], targets=[" Paris"])
    assert ed.run(model, plain, ed.Config(subject=False)).tracked.names == ["answer_1"]
