"""Token Lens (Yan & Jia Y3): equals the naive per-head loop; the parts partition ``attn_out``."""

from __future__ import annotations

import numpy as np
import pytest

import recallscope as rs
from oracles.token_lens import naive_token_lens
from recallscope.methods import token_lens as tl
from tiny import DISCOVERED, FLOAT32_INSIDE, ONE_TO_MANY, one_to_many_batch

FAMILIES = ["gpt2", "llama_gqa", "gemma2", "gpt_neox", "gptj", "opt", "qwen3", "mistral", *DISCOVERED]


def _row_inputs(batch, row: int, spans: list[str]):
    """Unpadded prompt ids, span positions (``last_token`` and absent spans handled) and tracked ids."""
    pad = int(batch.pad_lengths[row])
    ids = batch.input_ids[row, pad:]
    positions = {}
    for name in spans:
        if name == "last_token":
            positions[name] = [len(ids) - 1]
        elif name in batch.spans and batch.spans[name][row, 0] >= 0:
            positions[name] = [j - pad for j in batch.span_positions(name, row)]
        else:
            positions[name] = []
    return ids, positions


def _tracked_ids(batch, row: int, subject: bool = True) -> list[int]:
    answers = [int(batch.tracked[n][row]) for n in sorted(batch.tracked)] or [int(batch.target_ids[row])]
    if subject:
        answers.insert(0, int(batch.input_ids[row, batch.spans["subject"][row, 0]]))
    return answers


def _check_against_oracle(model, batch, result, rtol=1e-9, atol=1e-12):
    spans = [p for p in result.parts if p not in ("other", "bias")]
    for row in range(len(batch)):
        ids, positions = _row_inputs(batch, row, spans)
        expected = naive_token_lens(model, ids, positions, _tracked_ids(batch, row, result.config.subject))
        assert expected["parts"] == result.parts
        got = result.logit[row]  # [L, parts, n]
        present = result.present[row]
        assert np.isnan(got[:, ~present]).all()
        np.testing.assert_allclose(got[:, present], expected["logit"][:, present], rtol=rtol, atol=atol)
        for p, name in enumerate(spans):
            assert present[p] == bool(positions[name]), (row, name)


@pytest.mark.parametrize("name", FAMILIES)
def test_equals_the_naive_oracle_on_one_to_many_steps(name, tiny_models):
    model = tiny_models(name)
    batch = one_to_many_batch(model)
    result = tl.run(model, batch, tl.Config.preset("yan_jia"))
    has_bias = model.b_O(0) is not None
    assert result.parts == ["subject", "answer_1", "answer_2", "last_token", "other"] + ["bias"] * has_bias
    assert result.tracked == ["subject", "answer_1", "answer_2", "answer_3"]
    # padding moves the FLOAT32_INSIDE families' float32 parts by a rounding step
    loose = name in FLOAT32_INSIDE
    _check_against_oracle(model, batch, result, rtol=1e-6 if loose else 1e-9, atol=1e-9 if loose else 1e-12)


@pytest.mark.parametrize("name", FAMILIES)
def test_parts_sum_to_the_decoded_attention_output(name, tiny_models):
    model = tiny_models(name)
    batch = one_to_many_batch(model)
    result = tl.run(model, batch)
    # HF computes post-norms (Gemma-2/3, OLMo-2) in float32 even for float64 models, and the
    # FLOAT32_INSIDE families part of their attention: 1e-6 covers it
    atol = 1e-6 if model.spec.attn_post_norm or name in FLOAT32_INSIDE else 1e-10
    for row in range(len(batch)):
        ids, _ = _row_inputs(batch, row, [])
        expected = naive_token_lens(model, ids, {}, _tracked_ids(batch, row))["attn_out"]  # [L, n]
        np.testing.assert_allclose(np.nansum(result.logit[row], axis=1), expected, atol=atol)


@pytest.mark.parametrize("name", ["llama_gqa", "gpt2", "gemma2"])
def test_padded_batch_equals_one_by_one(name, tiny_models, monkeypatch):
    model = tiny_models(name)
    batch = one_to_many_batch(model)
    assert (batch.pad_lengths > 0).any()
    together = tl.run(model, batch)
    for row, prompt in enumerate(ONE_TO_MANY):
        alone = tl.run(model, one_to_many_batch(model, rows=[prompt]))
        # a lone step-1 row has no answer spans: its parts list is the same (fixed by the k tracked answers)
        assert alone.parts == together.parts
        np.testing.assert_allclose(alone.logit[0], together.logit[row], rtol=1e-9, atol=1e-12)
    monkeypatch.setattr(tl, "CHUNK_SIZE", 1)  # one forward per fact gives the same numbers
    np.testing.assert_allclose(tl.run(model, batch).logit, together.logit, rtol=1e-12, atol=1e-14)


def _plain_batch(model, spans=None):
    return rs.tokenize(
        model,
        ["The capital of France is", "Miles Davis plays the"],
        spans=spans or {"subject": ["France", "Miles Davis"]},
        targets=[" Paris", " trumpet"],
        fact_ids=["a", "b"],
    )


def test_overlapping_spans_go_to_the_first_listed(tiny_models):
    model = tiny_models("llama_gqa")
    batch = _plain_batch(model, {"subject": ["France", "Miles Davis"], "phrase": ["of France is", "plays"]})
    first = tl.run(model, batch, tl.Config(spans=("subject", "phrase")))
    _check_against_oracle(model, batch, first)
    ids, positions = _row_inputs(batch, 0, ["subject", "phrase"])
    assert set(positions["subject"]) < set(positions["phrase"])  # France lies inside "of France is"
    reverse = tl.run(model, batch, tl.Config(spans=("phrase", "subject")))
    _check_against_oracle(model, batch, reverse)
    # row 0: the subject is inside the phrase, so in the reverse order its part is empty (0, present)
    assert reverse.present[0, 1] and (reverse.logit[0, :, 1] == 0).all()
    # the union is split differently but sums to the same
    np.testing.assert_allclose(
        first.logit[:, :, :2].sum(2), reverse.logit[:, :, :2].sum(2), rtol=1e-9, atol=1e-12
    )
    np.testing.assert_allclose(first.logit[:, :, 2:], reverse.logit[:, :, 2:], rtol=1e-9, atol=1e-12)


def test_plain_factual_batch(tiny_models):
    model = tiny_models("opt")
    batch = _plain_batch(model)
    result = tl.run(model, batch)
    assert result.parts == ["subject", "last_token", "other", "bias"]
    assert result.tracked == ["subject", "answer_1"]
    assert result.roles == [("subject", "current")] * 2 and list(result.steps) == [1, 1]
    _check_against_oracle(model, batch, result)
    no_subject = tl.run(model, batch, tl.Config(subject=False))
    assert no_subject.tracked == ["answer_1"]
    np.testing.assert_allclose(no_subject.logit[..., 0], result.logit[..., 1], rtol=1e-12)
    facts = rs.FactSet([rs.Fact.from_template("The capital of {subject} is", "France", ["Paris"])])
    assert tl.run(model, facts).logit.shape == (1, model.n_layers, 4, 2)


def test_frame_arrays_average_provenance_and_cost(tiny_models):
    model = tiny_models("gpt2")
    batch = one_to_many_batch(model)
    result = tl.run(model, batch)
    frame = result.to_frame()
    assert list(frame.columns) == ["fact_id", "step", "layer", "span", "tracked", "role", "token", "logit"]
    L, n = model.n_layers, 4
    # rows: f0 step 1 (no answers), f1 step 2 (answer_1), f2 step 3 (both), f3 plain (none);
    # parts subject, answer_1, answer_2, last_token, other, bias
    per_fact = [4, 5, 6, 4]
    assert len(frame) == sum(per_fact) * L * n
    assert not frame["logit"].isna().any()
    assert set(frame.loc[frame.fact_id == "f0", "span"]) == {"subject", "last_token", "other", "bias"}
    assert set(frame.loc[frame.fact_id == "f2", "step"]) == {3}
    roles = frame.loc[(frame.fact_id == "f1") & (frame.layer == 0) & (frame.span == "other")]
    assert list(roles["role"]) == ["subject", "previous", "current", "future"]
    arrays = result.arrays()
    assert arrays["f1/logit"].shape == (L, 6, n) and np.isnan(arrays["f1/logit"][:, 2]).all()
    conventions = result.provenance["conventions"]
    assert conventions["parts"] == result.parts and conventions["projection"] == "frozen_scale"
    assert conventions["partition"].startswith("first listed span wins") and "bos" in conventions
    average = result.summary()
    assert {"step", "span", "layer", "tracked", "role", "logit", "logit_ci", "n"} <= set(average.columns)
    assert average.loc[(average.step == 1) & (average.span == "subject"), "n"].eq(2).all()
    assert result.tables() == {}
    cost = tl.cost(model, batch)
    assert cost.forwards == 1 and cost.token_blocks > 0 and cost.peak_bytes > 0


def test_errors(tiny_models):
    model = tiny_models("gpt2")
    batch = one_to_many_batch(model)
    with pytest.raises(rs.RecallscopeError, match="unknown span 'objct'"):
        tl.run(model, batch, tl.Config(spans=("subject", "objct")))
    with pytest.raises(rs.RecallscopeError, match="may not be"):
        tl.Config(spans=("subject", "other"))
    with pytest.raises(rs.RecallscopeError, match="distinct"):
        tl.Config(spans=("subject", "subject"))
    with pytest.raises(rs.RecallscopeError, match="non-empty tuple"):
        tl.Config(spans="subject")
    with pytest.raises(rs.RecallscopeError, match="has no field"):
        tl.Config.from_dict({"span": ["subject"]})
    plain = rs.tokenize(model, ["The capital of France is"], targets=[" Paris"])
    with pytest.raises(rs.RecallscopeError, match="subject span in every row"):
        tl.run(model, plain)
    assert tl.run(model, plain, tl.Config(spans=("last_token",), subject=False)).parts == [
        "last_token",
        "other",
        "bias",
    ]
