"""Argument heads (Lv et al. L3 + L4): path patching by resuming the recorded clean run equals the
literal path patching with frozen q/k/v, attention × subject projection equals the naive per-head
readout, a clean patch changes nothing, batched equals looped, and the per-head summary equals a hand
computation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from oracles.argument_heads import last_values, naive_path_patching, naive_readouts
from oracles.early_decoding import unpadded
from recallscope.data.variants import counterfactual_facts
from recallscope.errors import RecallscopeError
from recallscope.methods import argument_heads as ah
from tiny import DISCOVERED, FLOAT32_INSIDE, capital_facts

TOL = dict(rtol=1e-9, atol=1e-10)
FAMILIES = ["gpt2", "llama_gqa", "gemma2", "gpt_neox", "gptj", "opt", "phi", "qwen3", "mistral", *DISCOVERED]


def _tol(model):
    # GPT-J computes attention scores in float32 even for float64 weights, so the left padding of the
    # batched readouts moves its patterns and head outputs by ~1e-9
    return dict(rtol=1e-6, atol=1e-7) if model.spec.family in FLOAT32_INSIDE else TOL


def _oracle_values(model, facts, mean: bool):
    """Per fact ``(cf_z, cf_mlp)`` read one unpadded counterfactual prompt at a time (their mean)."""
    cf = counterfactual_facts(facts)
    cf_batch = cf.to_batch(model)
    values = [last_values(model, unpadded(cf_batch, i)) for i in range(len(cf))]
    if mean:
        z = torch.stack([v[0] for v in values]).mean(0)
        mlp = torch.stack([v[1] for v in values]).mean(0)
        values = [(z, mlp)] * len(values)
    return values


MODES = {
    "per_example": dict(patching="per_example", freeze_mlps=False),
    "per_example_frozen": dict(patching="per_example", freeze_mlps=True, target="top1"),
    "mean": dict(patching="mean", freeze_mlps=False, target="top1"),
    "mean_frozen": dict(patching="mean", freeze_mlps=True),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", MODES)
def test_path_patching_equals_literal_oracle(tiny_models, family, mode):
    model = tiny_models(family)
    facts = capital_facts()
    config = ah.Config(**MODES[mode])
    result = ah.run(model, facts, config)
    batch = facts.to_batch(model)
    values = _oracle_values(model, facts, mean=config.patching == "mean")
    for f in range(len(facts)):
        target = "top1" if config.target == "top1" else int(batch.target_ids[f])
        clean, token, heads, mlps = naive_path_patching(
            model, unpadded(batch, f), *values[f], target, config.freeze_mlps
        )
        assert result.target[f] == token
        np.testing.assert_allclose(result.clean[f], clean, **_tol(model))
        np.testing.assert_allclose(result.patched[f], heads, **_tol(model))
        np.testing.assert_allclose(result.mlp_patched[f], mlps, **_tol(model))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("preset", [None, "lv"])
def test_readouts_equal_naive_oracle(tiny_models, family, preset):
    model = tiny_models(family)
    facts = capital_facts()
    config = ah.Config.preset(preset, path_patching=False) if preset else ah.Config(path_patching=False)
    result = ah.run(model, facts, config)
    batch = facts.to_batch(model)
    for f in range(len(facts)):
        pad = int(batch.pad_lengths[f])
        subject = [p - pad for p in batch.span_positions("subject", f)]
        attention, logit = naive_readouts(
            model, unpadded(batch, f), subject, config.projection, config.attend_to
        )
        np.testing.assert_allclose(result.attention[f], attention, **_tol(model))
        np.testing.assert_allclose(result.subject_logit[f], logit, **_tol(model))
        assert result.subject_token[f] == int(batch.input_ids[f, batch.spans["subject"][f, 0]])
    frame = result.to_frame()
    assert frame[["clean", "patched", "delta", "delta_pct"]].isna().all().all()
    assert result.tables() == {}


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa", "gpt_neox", "opt"])
def test_clean_patch_changes_nothing(tiny_models, family):
    """The counterfactual prompt is the clean prompt itself: every delta is zero (to rounding)."""
    model = tiny_models(family)
    facts = capital_facts()
    selfish = facts.with_facts(
        [
            dataclasses.replace(
                f,
                attributes={
                    **f.attributes,
                    "counterfactual": {
                        "fact_id": f.fact_id,
                        "subject": f.subject,
                        "prompt": f.prompt,
                        "subject_span": f.subject_span,
                        "answers": f.answers,
                    },
                },
            )
            for f in facts
        ],
        {"step": "self counterfactual"},
    )
    for freeze in (False, True):
        result = ah.run(model, selfish, ah.Config(freeze_mlps=freeze))
        frame, mlp = result.to_frame(), result.tables()["mlp"]
        assert np.abs(frame["delta"]).max() < 1e-12
        assert np.abs(mlp["delta"]).max() < 1e-12


@pytest.mark.parametrize("family", ["llama_gqa", "gpt2"])
def test_batched_equals_looped(tiny_models, family):
    model = tiny_models(family)
    facts = capital_facts()
    together = ah.run(model, facts, ah.Config(batch_size=3))
    for f in range(len(facts)):
        alone = ah.run(model, facts[f : f + 1], ah.Config())
        for name in ("attention", "subject_logit", "clean", "patched", "mlp_patched"):
            np.testing.assert_allclose(getattr(alone, name)[0], getattr(together, name)[f], **TOL)
    frame = together.to_frame()
    assert len(frame) == len(facts) * model.n_layers * model.n_heads
    assert list(frame.columns) == [
        "fact_id",
        "layer",
        "head",
        "attention",
        "subject_logit",
        "clean",
        "patched",
        "delta",
        "delta_pct",
    ]
    np.testing.assert_allclose(frame["delta"], frame["patched"] - frame["clean"], **TOL)
    np.testing.assert_allclose(frame["delta_pct"], 100 * frame["delta"] / frame["clean"], **TOL)
    mlp = together.tables()["mlp"]
    assert list(mlp.columns) == ["fact_id", "layer", "clean", "patched", "delta", "delta_pct"]
    heads_only = ah.run(model, facts, ah.Config(mlps=False))
    np.testing.assert_allclose(heads_only.patched, together.patched, **TOL)
    assert heads_only.tables() == {} and np.isnan(heads_only.mlp_patched).all()
    arrays = together.arrays()
    np.testing.assert_allclose(arrays["capital/Italy/delta"], together.patched[1] - together.clean[1])


def test_scores_equal_a_hand_computation(tiny_models):
    model = tiny_models("llama_gqa")
    result = ah.run(model, capital_facts())
    frame = result.to_frame()
    got = ah.summary(frame)
    assert len(got) == model.n_layers * model.n_heads
    for row in got.itertuples():
        cell = frame[(frame["layer"] == row.layer) & (frame["head"] == row.head)]
        x, y, d = cell["attention"].to_numpy(), cell["subject_logit"].to_numpy(), cell["delta"].to_numpy()
        n = len(cell)
        assert row.n == n
        np.testing.assert_allclose(row.attention, x.mean(), **TOL)
        np.testing.assert_allclose(row.subject_logit, y.mean(), **TOL)
        r = ((x - x.mean()) * (y - y.mean())).sum() / np.sqrt(
            ((x - x.mean()) ** 2).sum() * ((y - y.mean()) ** 2).sum()
        )
        np.testing.assert_allclose(row.r, r, **TOL)
        np.testing.assert_allclose(row.delta, d.mean(), **TOL)
        np.testing.assert_allclose(row.delta_ci, 1.96 * d.std(ddof=1) / np.sqrt(n), **TOL)
        pct = cell["delta_pct"].to_numpy()
        np.testing.assert_allclose(row.delta_pct_ci, 1.96 * pct.std(ddof=1) / np.sqrt(n), **TOL)
    passers = ah.argument_passers(frame, min_r=0.0, min_attention=0.0, top=3)
    flagged = passers[passers.passes]
    assert (flagged["delta"] < 0).all() and (flagged["delta_rank"] < 3).all()
    assert (flagged["r"] >= 0).all() and (flagged["subject_logit"] > 0).all()
    lowest = got.nsmallest(3, "delta")
    expected = lowest[(lowest["r"] >= 0) & (lowest["subject_logit"] > 0) & (lowest["delta"] < 0)]
    pairs = lambda t: set(zip(t["layer"], t["head"], strict=True))  # noqa: E731
    assert pairs(flagged) == pairs(expected)
    # chunks concatenated: scores read the whole frame
    halves = pd.concat(
        [ah.run(model, capital_facts()[i : i + 3]).to_frame() for i in (0, 3)], ignore_index=True
    )
    np.testing.assert_allclose(ah.summary(halves)["delta"], got["delta"], **TOL)


def test_clear_errors(tiny_models):
    model = tiny_models("gpt2")
    facts = capital_facts()
    with pytest.raises(RecallscopeError, match="pass a FactSet"):
        ah.run(model, facts.to_batch(model))
    result = ah.run(model, facts.to_batch(model), ah.Config(path_patching=False))
    assert np.isnan(result.clean).all()
    lonely = facts.with_facts(
        [dataclasses.replace(f, relation=f"alone_{i}", attributes={}) for i, f in enumerate(facts)],
        {"step": "t"},
    )
    with pytest.raises(RecallscopeError, match="no counterfactual partner"):
        ah.run(model, lonely)
    mixed = facts.with_facts(
        [*facts, dataclasses.replace(facts[0], relation="alone", fact_id="x", attributes={})], {}
    )
    result = ah.run(model, mixed)
    assert result.skipped and result.skipped[0][0] == "x" and "x" not in result.fact_ids
    with pytest.raises(RecallscopeError, match="patching must be one of"):
        ah.Config(patching="median")
    with pytest.raises(RecallscopeError, match="batch_size"):
        ah.Config(batch_size=0)
    with pytest.raises(RecallscopeError, match="missing"):
        ah.summary(pd.DataFrame({"layer": [0]}))
    assert ah.needs_all_facts(ah.Config.preset("lv_code")) and not ah.needs_all_facts(ah.Config.preset("lv"))
    assert not ah.needs_all_facts(ah.Config(patching="mean", path_patching=False))
    cost = ah.cost(model, facts, ah.Config())
    assert cost.forwards > 0 and cost.peak_bytes > 0
