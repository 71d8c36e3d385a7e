"""Function application (Lv et al. L6): the batched readings equal the naive per-prompt oracle, the
``mlp_out`` logits are early decoding's MLP logits, a fact that is its own counterfactual has no
shift, and batching and padding do not matter."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

import recallscope as rs
from oracles.early_decoding import unpadded
from oracles.function_application import first_token, naive_function_application
from recallscope.data.variants import add_relation_context, counterfactual_facts
from recallscope.methods import early_decoding as ed
from recallscope.methods import function_application as fa
from tiny import DISCOVERED, FLOAT32_INSIDE, capital_facts

TOL = dict(rtol=1e-9, atol=1e-10)
LOOSE = dict(rtol=1e-6, atol=1e-9)
FAMILIES = ["gpt2", "llama_gqa", "gemma2", "gpt_neox", "gptj", "opt", "phi", "qwen3", "mistral", *DISCOVERED]
NUMERIC = ["norm", "logit", "margin", "cosine", "cosine_others", "cf_logit_new", "cf_logit_old", "shift"]
EXACT = ["rank", "relation_rank", "n_candidates", "follows"]


def _check_against_oracle(model, facts, config: fa.Config) -> fa.FunctionApplicationResult:
    result = fa.run(model, facts, config)
    batch = facts.to_batch(model)
    cf_batch = counterfactual_facts(facts).to_batch(model) if config.counterfactual else None
    layers = list(config.layers) if config.layers is not None else list(range(model.n_layers))
    fit = dict(regressors=config.regressors, intercept=config.intercept, space=config.space)
    for i, fact in enumerate(facts):
        target = int(batch.target_ids[i])
        answers = fact.attributes["relation_answers"]
        candidates = [target] + [first_token(model, fact.prompt, a) for a in answers]
        expected = naive_function_application(
            model,
            unpadded(batch, i),
            None if cf_batch is None else unpadded(cf_batch, i),
            target,
            None if cf_batch is None else int(cf_batch.target_ids[i]),
            candidates,
            layers,
            config.components,
            **fit,
        )
        for name in NUMERIC + EXACT:
            if name not in expected:
                assert np.isnan(result.values[name][i]).all(), name
                continue
            want = expected[name].astype(float)
            if name in EXACT:
                np.testing.assert_array_equal(result.values[name][i], want, err_msg=name)
            else:
                tol = LOOSE if model.spec.family in FLOAT32_INSIDE else TOL  # float32 parts: padding
                np.testing.assert_allclose(result.values[name][i], want, **tol, err_msg=name)
        np.testing.assert_array_equal(result.top_token[i], expected["top_token"])
    return result


@pytest.mark.parametrize("family", FAMILIES)
def test_equals_naive_oracle(tiny_models, family):
    model = tiny_models(family)
    result = _check_against_oracle(model, capital_facts(), fa.Config())
    assert result.values["logit"].shape == (5, model.n_layers, 2)
    assert not result.skipped


@pytest.mark.parametrize(
    ("family", "options"),
    [
        ("llama_gqa", dict(intercept=True)),
        ("gpt2", dict(space="normalized", layers=(2, 0))),
        ("gpt_neox", dict(space="normalized", intercept=True)),
        ("gemma2", dict(regressors="earlier_layers", space="normalized")),
        ("gptj", dict(regressors="earlier_layers", components=("remainder",))),
        ("opt", dict(counterfactual=False, components=("remainder", "mlp_out"))),
    ],
)
def test_options_equal_naive_oracle(tiny_models, family, options):
    _check_against_oracle(tiny_models(family), capital_facts(), fa.Config(**options))


def test_one_shot_variants_equal_naive_oracle(tiny_models):
    facts = capital_facts(shots=1, n=4)
    result = _check_against_oracle(tiny_models("qwen3"), facts, fa.Config())
    assert any(f.endswith("/1shot") for f in result.fact_ids)


@pytest.mark.parametrize("family", ["llama_gqa", "gpt_neox", "gemma2"])
def test_mlp_out_logits_are_early_decodings_mlp_logits(tiny_models, family):
    """Decoding is linear and shares the frozen head: the ``mlp_out`` component's target logit is
    early decoding's MLP logit of the target, layer by layer, with or without the counterfactual rows
    (other padding) in the batch."""
    model = tiny_models(family)
    facts = capital_facts()
    early = ed.run(model, facts.to_batch(model), ed.Config(sites=("mlp",), subject=False))
    assert early.tracked.names == ["answer_1"]
    expected = early.logit[:, 0, :, 0]  # [F, layer]
    for counterfactual in (False, True):
        result = fa.run(model, facts, fa.Config(components=("mlp_out",), counterfactual=counterfactual))
        np.testing.assert_allclose(result.values["logit"][..., 0], expected, **TOL)


def test_own_counterfactual_has_no_shift(tiny_models):
    model = tiny_models("llama_gqa")
    facts = capital_facts()
    own = []
    for fact in facts:
        me = dict(
            fact_id=fact.fact_id,
            subject=fact.subject,
            prompt=fact.prompt,
            subject_span=fact.subject_span,
            answers=fact.answers,
        )
        own.append(dataclasses.replace(fact, attributes={**fact.attributes, "counterfactual": me}))
    result = fa.run(model, facts.with_facts(own, {"step": "own counterfactual"}))
    v = result.values
    np.testing.assert_allclose(v["shift"], 0.0, atol=1e-12)
    np.testing.assert_array_equal(v["follows"], 0.0)
    np.testing.assert_allclose(v["cf_logit_new"], v["logit"], **TOL)
    np.testing.assert_allclose(v["cf_logit_old"], v["logit"], **TOL)


@pytest.mark.parametrize("family", ["llama_gqa", "gemma2", "gpt2"])
def test_batched_equals_one_by_one(tiny_models, family):
    """Each fact alone (clean and counterfactual rows padded differently) gives the batch's numbers."""
    model = tiny_models(family)
    facts = capital_facts(shots=1, n=3)
    together = fa.run(model, facts)
    for i in range(len(facts)):
        alone = fa.run(model, facts[i : i + 1])
        assert alone.fact_ids == [together.fact_ids[i]]
        for name, value in alone.values.items():
            np.testing.assert_allclose(value[0], together.values[name][i], **TOL, err_msg=name)
        np.testing.assert_array_equal(alone.top_token[0], together.top_token[i])


def test_top1_target_is_the_greedy_token(tiny_models):
    model = tiny_models("gpt2")
    facts = capital_facts()
    result = fa.run(model, facts, fa.Config(target="top1"))
    greedy = rs.forward(model, facts.to_batch(model)).argmax(-1).numpy()
    np.testing.assert_array_equal(result.tables()["facts"].target_id.to_numpy(), greedy)
    cf_greedy = rs.forward(model, counterfactual_facts(facts).to_batch(model)).argmax(-1).numpy()
    np.testing.assert_array_equal(result.tables()["facts"].new_id.to_numpy(), cf_greedy)
    assert "greedy" in result.provenance["conventions"]["target"]


def test_fact_without_partner_is_reported_with_nan_counterfactual(tiny_models):
    model = tiny_models("llama_gqa")
    lone = rs.Fact.from_template(
        "The river of {subject} is", "Egypt", ["Nile"], relation="river", fact_id="r"
    )
    facts = rs.FactSet([*capital_facts(n=2), lone], name="mixed")
    result = fa.run(model, add_relation_context(facts))
    assert result.skipped == [
        ("r", "no counterfactual partner in the relation: counterfactual columns are NaN")
    ]
    frame = result.to_frame()
    assert frame[frame.fact_id == "r"][["cf_logit_new", "shift", "follows"]].isna().all().all()
    assert frame[frame.fact_id != "r"]["shift"].notna().all()
    lone_rows = frame[frame.fact_id == "r"]
    assert (lone_rows.n_candidates == 1).all() and (lone_rows.relation_rank == 1).all()
    assert lone_rows.margin.isna().all() and lone_rows.cosine_others.isna().all()


def test_frame_tables_arrays_and_summary(tiny_models):
    model = tiny_models("llama_gqa")
    result = fa.run(model, capital_facts(), fa.Config.preset("lv"))
    frame = result.to_frame()
    assert list(frame.columns) == fa.COLUMNS
    L = model.n_layers
    assert len(frame) == 5 * L * 2
    pick = frame[(frame.fact_id == "capital/Italy") & (frame.layer == 1) & (frame.component == "remainder")]
    assert pick.logit.item() == result.values["logit"][1, 1, 1]
    assert pick["rank"].item() == result.values["rank"][1, 1, 1] and frame["rank"].dtype == np.int64
    arrays = result.arrays()
    n = len(arrays["capital/France/candidate_ids"])
    assert arrays["capital/France/candidate_logits"].shape == (L, 2, n)
    np.testing.assert_array_equal(
        arrays["capital/France/candidate_logits"][..., 0], result.values["logit"][0]
    )
    facts = result.tables()["facts"]
    assert list(facts.fact_id) == result.fact_ids and facts.counterfactual_id.notna().all()
    conventions = result.provenance["conventions"]
    assert conventions["projection"].startswith("frozen_scale") and "no bias" in conventions["readout"]
    assert "feeding_layer" in conventions["components"]["remainder"]
    assert fa.cost(model, capital_facts()).forwards == 1
    # the summary equals a hand loop over (layer, component)
    summary = fa.summary(pd.concat([frame.iloc[:20], frame.iloc[20:]], ignore_index=True))
    assert len(summary) == L * 2
    for row in summary.itertuples(index=False):
        rows = frame[(frame.layer == row.layer) & (frame.component == row.component)]
        shifts = rows["shift"].to_numpy()
        assert row.logit == pytest.approx(rows.logit.mean(), rel=1e-12)
        assert row.rank_median == np.median(rows["rank"].to_numpy())
        assert row.relation_rank == pytest.approx(rows.relation_rank.mean())
        assert row.relation_top1 == pytest.approx(np.mean(rows.relation_rank.to_numpy() == 1))
        assert row.follow_rate == pytest.approx(rows.follows.mean())
        assert row.shift == pytest.approx(shifts.mean(), rel=1e-12)
        sem = shifts.std(ddof=1) / np.sqrt(len(shifts))
        assert row.shift_ci == pytest.approx(1.96 * sem, rel=1e-9)
        assert row.n == row.n_counterfactual == 5
    assert result.summary().equals(fa.summary(frame))


def test_config_and_input_errors(tiny_models):
    with pytest.raises(rs.RecallscopeError, match="components must be a non-empty tuple"):
        fa.Config(components=("mlp",))
    with pytest.raises(rs.RecallscopeError, match="regressors must be one of"):
        fa.Config(regressors="all")
    with pytest.raises(rs.RecallscopeError, match="space must be one of"):
        fa.Config(space="ln2")
    with pytest.raises(rs.RecallscopeError, match="target must be one of"):
        fa.Config(target="answer")
    with pytest.raises(rs.RecallscopeError, match="layers must be None"):
        fa.Config(layers=3)
    with pytest.raises(rs.RecallscopeError, match="counterfactual must be True or False"):
        fa.Config(counterfactual=1)
    model = tiny_models("gpt2")
    with pytest.raises(rs.RecallscopeError, match="layers 0–2"):
        fa.run(model, capital_facts(), fa.Config(layers=(5,)))
    with pytest.raises(rs.RecallscopeError, match="needs a FactSet"):
        fa.run(model, capital_facts().to_batch(model))
    with pytest.raises(rs.RecallscopeError, match="missing"):
        fa.summary(pd.DataFrame(columns=["fact_id", "layer"]))
    assert fa.Config.preset("lv") == fa.Config(preset_name="lv")
