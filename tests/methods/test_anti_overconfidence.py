"""Anti-overconfidence (Lv et al. L7): attributions, split, fitted mitigation, evaluation and perplexity
equal the naive loop; heads + b_O + MLP sum to the decoded final-layer update; scale 1 is the clean
model; the split keeps few-shot variants together; the bootstrap is reproducible."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

import recallscope as rs
from oracles.anti_overconfidence import naive_anti_overconfidence
from recallscope.core.cache import forward
from recallscope.core.resume import equal_length_rows
from recallscope.core.subvalues import FrozenHead
from recallscope.core.tokens import encode_prompt
from recallscope.data.builtin import generic_text
from recallscope.methods import anti_overconfidence as ao
from recallscope.stats import bootstrap_ci, expected_calibration_error, paired_bootstrap_ci
from tiny import DISCOVERED, capital_facts

TOL = dict(rtol=1e-9, atol=1e-10)
# Gemma-2's HF post-norms run in float32 even for float64 models; the folded parts are float64
LOOSE = dict(rtol=1e-6, atol=1e-7)
FAMILIES = ["gpt2", "llama_gqa", "gemma2", "gpt_neox", "opt", "phi", "qwen3", "gptj", *DISCOVERED]


def _tol(model):
    return LOOSE if model.spec.attn_post_norm else TOL


def _check_against_oracle(model, facts, config, perplexity: bool = True) -> ao.AntiOverconfidenceResult:
    result = ao.run(model, facts, dataclasses.replace(config, perplexity=perplexity))
    text = torch.tensor(encode_prompt(model, generic_text())[0]) if perplexity else None
    naive = naive_anti_overconfidence(model, facts, config, text)
    tol = _tol(model)
    assert result.split == ["train" if t else "heldout" for t in naive["train"]]
    assert [(c.kind, c.layer, c.index) for c in result.components] == naive["components"]
    np.testing.assert_allclose(result.logit, naive["logit"], **tol)
    np.testing.assert_allclose(result.iw, naive["iw"], **tol)
    fit = result.fit
    assert list(zip(fit.kind, fit.layer, fit["index"], fit.scale, strict=True)) == [
        (*component, scale) for (component, scale), _ in naive["grid"]
    ]
    np.testing.assert_allclose(fit.train_log_prob, [v for _, v in naive["grid"]], **TOL)
    np.testing.assert_allclose(fit.train_gain, [v - naive["baseline"] for _, v in naive["grid"]], **TOL)
    row = result.mitigation.iloc[0]
    if naive["choice"] is None:
        assert row.component == "none" and not fit.chosen.any()
    else:
        (kind, layer, index), scale = naive["choice"]
        assert (row.kind, row.layer, row["index"], row.scale) == (kind, layer, index, scale)
        assert fit.chosen.sum() == 1
    for when in ("before", "after"):
        for name in ("prob", "log_prob", "correct", "confidence"):
            expected = [s[name] for s in naive[when]]
            np.testing.assert_allclose(result.facts[f"{name}_{when}"], expected, **TOL)
    if perplexity:
        for when in ("before", "after"):
            n_tokens, nll = zip(*naive[f"nll_{when}"], strict=True)
            assert list(result.perplexity.n_tokens) == list(n_tokens)
            np.testing.assert_allclose(result.perplexity[f"nll_{when}"], nll, **TOL)
    return result


@pytest.mark.parametrize("family", FAMILIES)
def test_equals_naive_oracle(tiny_models, family):
    model = tiny_models(family)
    result = _check_against_oracle(model, capital_facts(shots=1), ao.Config())
    assert len(result.fit) == ao.Config().max_candidates * 4  # tiny models have many negative parts
    assert result.mitigation.iloc[0].component != "none"


@pytest.mark.parametrize("family", ["llama_gqa", "gpt2", "gemma2"])
def test_last_position_two_layers_top1_equal_naive_oracle(tiny_models, family):
    model = tiny_models(family)
    config = ao.Config(positions="last", layers_from_end=2, target="top1", top_neurons=3, max_candidates=5)
    result = _check_against_oracle(model, capital_facts(shots=1), config, perplexity=False)
    assert set(result.to_frame().layer) == {model.n_layers - 2, model.n_layers - 1}
    assert (result.facts.correct_before == 1.0).all()  # top-1 targets
    assert result.perplexity.empty and np.isnan(result.mitigation.iloc[0].perplexity_before)


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa", "gemma2", "gpt_neox", "opt", "phi", *DISCOVERED])
def test_heads_bias_and_mlp_sum_to_the_decoded_final_layer_update(tiny_models, family):
    model = tiny_models(family)
    facts = capital_facts(shots=1)
    result = ao.run(model, facts, ao.Config(perplexity=False))
    batch = facts.to_batch(model)
    L = model.n_layers
    sites = [rs.Site(L - 1, "resid_pre"), rs.Site(L - 1, "resid_post")]
    for f in range(len(batch)):
        alone = batch.select([f])
        ids = alone.input_ids[:, int(alone.pad_lengths[0]) :]
        cache = rs.run_with_cache(model, ids, sites, positions=[-1])
        pre, post = (cache[s][:, 0].double() for s in sites)
        head = FrozenHead.from_final(model, post, bias=False)
        target = batch.target_ids[f : f + 1, None]
        logit = float(head.token_covectors(target)[0, 0] @ (post - pre)[0])
        mean = float(head.logits(post - pre)[0].mean())
        np.testing.assert_allclose(result.facts.final_layer_logit[f], logit, **_tol(model))
        np.testing.assert_allclose(result.facts.final_layer_iw[f], logit - mean, **_tol(model))
        frame = result.to_frame()
        mine = frame[(frame.fact_id == batch.fact_ids[f]) & (frame.kind != "neuron")]
        assert mine.logit.sum() == pytest.approx(result.facts.final_layer_logit[f], rel=1e-12)
    assert (result.facts.lowers == (result.facts.final_layer_logit < 0)).all()


@pytest.mark.parametrize("family", ["llama_gqa", "gpt2", "opt"])
def test_scale_one_is_the_clean_model(tiny_models, family):
    model = tiny_models(family)
    batch = capital_facts(shots=1).to_batch(model)
    L = model.n_layers
    cells = [(ao.Component("head", L - 1, 1), 1.0), (ao.Component("mlp", L - 1), 1.0)]
    cells += [(ao.Component("neuron", L - 1, 5), 1.0)]
    clean = forward(model, batch, logits="all")
    for cell in cells:
        with ao._scaled(model, [cell] * len(batch)):
            assert torch.equal(forward(model, batch, logits="all"), clean)
    config = ao.Config()
    for positions in ("all", "last"):
        config = ao.Config(positions=positions)
        for rows in map(np.asarray, equal_length_rows(batch, 16)):
            chunk, _, scores = ao._record(model, batch, rows, L - 1, config)
            local = np.arange(len(rows))
            untouched = ao._resumed_logits(model, chunk, local, [None] * len(rows), L - 1)
            for cell in cells:
                logits = ao._resumed_logits(model, chunk, local, [cell] * len(rows), L - 1)
                assert torch.equal(logits, untouched)
            # resuming the last block reproduces the recorded run (up to rounding on some families)
            log_prob = ao._scores(untouched, chunk.targets)["log_prob"]
            np.testing.assert_allclose(log_prob, scores["log_prob"], rtol=1e-12, atol=1e-12)
    with pytest.raises(rs.RecallscopeError, match="must not contain 1"):
        ao.Config(scales=(0.0, 1.0))


def test_scaling_a_component_changes_the_output(tiny_models):
    model = tiny_models("llama_gqa")
    batch = capital_facts().to_batch(model)
    clean = forward(model, batch)
    L = model.n_layers
    for cell in [(ao.Component("head", L - 1, 2), 0.0), (ao.Component("mlp", L - 1), 0.5)]:
        with ao._scaled(model, [cell, None, None, None, None]):
            changed = forward(model, batch)
        assert not torch.allclose(changed[0], clean[0]) and torch.equal(changed[1:], clean[1:])


def test_split_is_deterministic_and_keeps_few_shot_variants_together(tiny_models):
    facts = capital_facts(shots=1)
    keys = [f.attributes.get("base_id", f.fact_id) for f in facts]
    assert len(set(keys)) == 5 and "capital/France" in keys
    train = ao.split_facts(keys, 0.5, seed=0)
    np.testing.assert_array_equal(train, ao.split_facts(keys, 0.5, seed=0))
    assert train.sum() == 6  # 3 of 5 base facts (round half up), two variants each
    for key in set(keys):
        assert len({bool(t) for t, k in zip(train, keys, strict=True) if k == key}) == 1
    reordered = ao.split_facts(keys[::-1], 0.5, seed=0)
    np.testing.assert_array_equal(reordered, train[::-1])
    assert any(not np.array_equal(ao.split_facts(keys, 0.5, seed=s), train) for s in range(1, 6))
    model = tiny_models("llama_gqa")
    result = ao.run(model, facts, ao.Config(perplexity=False))
    by_fact = dict(zip(result.fact_ids, result.split, strict=True))
    for fact in facts:
        assert by_fact[fact.fact_id] == ("train" if train[list(facts).index(fact)] else "heldout")
    assert (result.facts.split == result.split).all()
    per_fact = ao.run(model, facts, ao.Config(perplexity=False, split_by="fact_id"))
    assert per_fact.split.count("train") == 5


def test_batch_size_and_fact_order_do_not_matter(tiny_models):
    model = tiny_models("gemma2")
    facts = capital_facts(shots=1)
    config = ao.Config(perplexity=False)
    together = ao.run(model, facts, config)
    alone = ao.run(model, facts, dataclasses.replace(config, batch_size=1))
    reversed_facts = facts.with_facts(list(facts)[::-1], {"step": "reverse"})
    backwards = ao.run(model, reversed_facts, config)
    np.testing.assert_allclose(alone.logit, together.logit, **TOL)
    np.testing.assert_allclose(backwards.logit[::-1], together.logit, **TOL)
    for other in (alone, backwards):
        pd.testing.assert_frame_equal(other.fit, together.fit, rtol=1e-9)
        pd.testing.assert_frame_equal(other.mitigation, together.mitigation, rtol=1e-9)
    pd.testing.assert_frame_equal(
        backwards.facts.iloc[::-1].reset_index(drop=True), together.facts, check_exact=False, rtol=1e-9
    )


def test_bootstrap_is_reproducible_with_the_seed():
    rng = np.random.default_rng(1)
    before, after = rng.normal(size=30), rng.normal(size=30) + 0.5
    first = paired_bootstrap_ci(before, after, n_boot=500, seed=3)
    assert first == paired_bootstrap_ci(before, after, n_boot=500, seed=3)
    assert first != paired_bootstrap_ci(before, after, n_boot=500, seed=4)
    assert first[0] == pytest.approx(np.mean(after - before), rel=1e-12)
    assert first[1] < first[0] < first[2]
    # by hand: resample the differences, take the 2.5% and 97.5% quantiles of the means
    draws = np.random.default_rng(3).integers(0, 30, size=(500, 30))
    means = (after - before)[draws].mean(1)
    assert first[1:] == pytest.approx(tuple(np.quantile(means, [0.025, 0.975])), rel=1e-12)
    assert bootstrap_ci([2.0]) == (2.0, 2.0)


def test_held_out_metrics_equal_a_hand_computation(tiny_models):
    model = tiny_models("llama_gqa")
    config = ao.Config(perplexity=False, bins=4, bootstrap=300, seed=2)
    result = ao.run(model, capital_facts(shots=1), config)
    again = ao.run(model, capital_facts(shots=1), config)
    pd.testing.assert_frame_equal(result.mitigation, again.mitigation)
    row, facts = result.mitigation.iloc[0], result.facts
    held = facts[facts.split == "heldout"]
    for when in ("before", "after"):
        conf, hit = held[f"confidence_{when}"].to_numpy(), held[f"correct_{when}"].to_numpy()
        ece = 0.0
        for b in range(4):
            inside = (conf >= b / 4) & ((conf < (b + 1) / 4) | (b == 3))
            if inside.any():
                ece += inside.mean() * abs(hit[inside].mean() - conf[inside].mean())
        assert row[f"ece_{when}"] == pytest.approx(ece, abs=1e-12)
        assert row[f"brier_{when}"] == pytest.approx(((1 - held[f"prob_{when}"]) ** 2).mean(), rel=1e-12)
        assert row[f"accuracy_{when}"] == held[f"correct_{when}"].mean()
    gain = held.prob_after - held.prob_before
    assert row.mean_prob_gain == pytest.approx(gain.mean(), rel=1e-12)
    low, high = bootstrap_ci(gain, n_boot=300, seed=2)
    assert (row.mean_prob_gain_low, row.mean_prob_gain_high) == pytest.approx((low, high), rel=1e-12)
    assert row.n_train + row.n_heldout == len(facts)
    assert row.lowers_fraction == facts.lowers.mean()
    assert expected_calibration_error([], []) != expected_calibration_error([], [])  # NaN


def test_result_frame_tables_summary_and_provenance(tiny_models):
    model = tiny_models("gpt2")
    result = ao.run(model, capital_facts(shots=1), ao.Config.preset("lv"))
    frame = result.to_frame()
    assert list(frame.columns) == ["fact_id", "split", "component", "kind", "layer", "index", "logit", "iw"]
    H, L = model.n_heads, model.n_layers
    C = len(result.components)  # heads, attn_bias (GPT-2 has b_O), mlp, 10 top neurons, candidate neurons
    extra = set(result.fit.component[result.fit.kind == "neuron"])
    assert C == H + 2 + 10 + len(extra - set(frame.component[:C][H + 2 : H + 12]))
    assert len(frame) == 10 * C
    assert set(frame.component) >= {"head 0", "attn_bias", "mlp"} and (frame.layer == L - 1).all()
    assert set(result.tables()) == {"facts", "fit", "mitigation", "perplexity"}
    facts_columns = ["fact_id", "split", "final_layer_logit", "final_layer_iw", "lowers"]
    facts_columns += [
        f"{n}_{w}" for n in ("prob", "log_prob", "correct", "confidence") for w in ("before", "after")
    ]
    assert list(result.facts.columns) == facts_columns
    mitigation = result.mitigation.iloc[0]
    assert mitigation.positions == "last" and result.config.preset_name == "lv"
    for name in ("accuracy_gain_low", "mean_prob_gain_high", "perplexity_before", "ece_after", "lowers_high"):
        assert name in result.mitigation.columns
    assert result.arrays()[f"{result.fact_ids[0]}/logit"].shape == (C,)
    table = ao.summary(frame, result.tables())
    assert len(table) == C and table.chosen.sum() == (mitigation.component != "none")
    assert table.candidate.sum() == result.fit.component.nunique()  # candidate neurons join the frame
    assert {"logit", "logit_ci", "iw", "frac_negative", "train_logit", "n"} <= set(table.columns)
    pd.testing.assert_frame_equal(table, result.summary())
    conventions = result.provenance["conventions"]
    assert conventions["projection"].startswith("frozen_scale") and "sha256" in conventions["split"]
    assert (
        "mean log-probability" in conventions["fitting_metric"]
        and "positions=last" in conventions["intervention"]
    )
    assert ao.needs_all_facts(ao.Config()) is True
    cost = ao.cost(model, capital_facts(shots=1).to_batch(model), ao.Config())
    assert cost.forwards > 2 and cost.token_blocks > 0


def test_too_few_facts_raise_clear_errors(tiny_models):
    model = tiny_models("llama_gqa")
    with pytest.raises(rs.RecallscopeError, match="needs facts to split"):
        ao.run(model, capital_facts(n=1))
    with pytest.raises(rs.RecallscopeError, match="each split needs at least 2 facts.*train_fraction"):
        ao.run(model, capital_facts(n=3))
    with pytest.raises(rs.RecallscopeError, match="each split needs at least 2 facts"):
        ao.split_facts(["a", "b", "c", "d"], 0.9)


def test_config_errors():
    with pytest.raises(rs.RecallscopeError, match=r"train_fraction must be a number in \(0, 1\), got 1.0"):
        ao.Config(train_fraction=1.0)
    with pytest.raises(
        rs.RecallscopeError, match="scales must be a non-empty tuple of distinct items, each a number ≥ 0"
    ):
        ao.Config(scales=(-0.5,))
    with pytest.raises(rs.RecallscopeError, match="scales must be a non-empty tuple"):
        ao.Config(scales=())
    with pytest.raises(rs.RecallscopeError, match="positions must be one of"):
        ao.Config(positions="end")
    with pytest.raises(rs.RecallscopeError, match="max_candidates must be an integer ≥ 1"):
        ao.Config(max_candidates=0)
    with pytest.raises(rs.RecallscopeError, match="no field 'scale'"):
        ao.Config.from_dict({"scale": 0.5})
    assert ao.Config(scales=(0, 0.5)).stable_hash() == ao.Config(scales=(0.0, 0.5)).stable_hash()
    assert ao.Config.from_dict({"scales": [0, 0.5]}).scales == (0.0, 0.5)
