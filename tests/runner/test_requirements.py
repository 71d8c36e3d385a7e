"""Declared dependencies: which result serves a requirement, and that a run computes it once and
hands the stored rows over with the same numbers as computing it in place."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import recallscope as rs
from recallscope.methods import REGISTRY, logit_lens
from recallscope.methods import logprob_attribution as la
from recallscope.methods import neuron_ablation as na
from recallscope.methods import query_attribution as qa
from recallscope.methods.base import Given
from recallscope.runner import Job, run_job
from recallscope.runner.requirements import Source, plan_requirements, run_order

LA, QA, NA = "logprob_attribution", "query_attribution", "neuron_ablation"
FACTS = [
    {"subject": "France", "prompt": "The capital of France is", "target": "Paris"},
    {"subject": "Germany", "prompt": "The capital of Germany is", "target": "Berlin"},
    {"subject": "Rome", "prompt": "Rome is the capital of", "target": "Italy"},
]


def _configs(**configs):
    return {name: REGISTRY[name].Config.from_dict(values) for name, values in configs.items()}


def test_the_runs_own_result_serves_both_methods_that_require_it():
    configs = _configs(**{LA: {}, QA: {}, NA: {}})
    plan = plan_requirements(configs)
    assert set(plan) == {QA, NA}
    assert plan[QA][LA] == plan[NA][LA] == Source(LA, configs[LA], True)


def test_without_it_one_requirement_only_result_serves_both():
    plan = plan_requirements(_configs(**{QA: {}, NA: {}}))
    (source,) = {plan[QA][LA], plan[NA][LA]}
    assert not source.in_run and source.config.target == "top1" and source.config.n_top == 300
    assert set(source.config.levels) == {"neuron", "attn_unit"}


def test_a_result_that_cannot_serve_is_not_handed_over():
    plan = plan_requirements(
        _configs(**{LA: {"levels": ["head"]}, QA: {}, NA: {"target": "top1", "bias": False}})
    )
    assert not plan[QA][LA].in_run and not plan[NA][LA].in_run
    assert plan[QA][LA] != plan[NA][LA]  # the head's bias differs: two results


def test_serves():
    assert la.Config().serves(la.Config(levels=("neuron",), n_top=10, max_batch_rows=3))
    assert not la.Config(n_top=10).serves(la.Config())
    assert not la.Config(levels=("head",)).serves(la.Config(levels=("neuron",)))
    assert la.Config().serves(la.Config(target="gold"))  # checked fact by fact by who needs gold
    assert not la.Config(target="gold").serves(la.Config())
    assert not la.Config().serves(la.Config(bias=False))
    assert not la.Config(position_heads=3).serves(la.Config())
    assert la.Config(position_heads=3).serves(la.Config(levels=("neuron",)))
    assert logit_lens.Config.preset("geva").serves(
        logit_lens.Config.from_dict(logit_lens.Config.PRESETS["geva"])
    )
    assert not logit_lens.Config().serves(la.Config())


def test_run_order_puts_what_is_required_first():
    configs = _configs(**{NA: {}, "logit_lens": {}, LA: {}})
    assert run_order(configs, plan_requirements(configs)) == [LA, NA, "logit_lens"]


def test_obtain_hands_over_only_what_covers_the_batch(tiny_models):
    model = tiny_models("gpt2")
    batch = rs.tokenize(model, [f["prompt"] for f in FACTS], fact_ids=["a", "b", "c"])
    need = {"levels": ("neuron",), "n_top": 4}
    config = la.Config.from_dict(need)
    whole = Given.of(LA, config, la.run(model, batch, config))
    part = Given.obtain(LA, need, model, batch.select([2, 0]), {LA: whole})
    assert part.fact_ids == ("c", "a") and set(part.frame["fact_id"]) == {"a", "c"}
    assert {key.split("/")[0] for key in part.arrays} == {"a", "c"}
    missing = whole.select(["a"])
    computed = Given.obtain(LA, need, model, batch.select([0, 1]), {LA: missing})  # "b" is not there
    assert computed.fact_ids == ("a", "b") and computed is not missing
    np.testing.assert_allclose(
        computed.array("a", "neuron_score"), whole.array("a", "neuron_score"), atol=1e-12
    )


def _dataset(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text("\n".join(json.dumps(f) for f in FACTS) + "\n")
    return str(path)


def _counting(monkeypatch) -> list[int]:
    """Patch ``logprob_attribution.run`` to record the number of facts of each call."""
    module, calls = REGISTRY[LA], []
    original = module.run

    def run(model, batch, config=None):
        calls.append(len(batch))
        return original(model, batch, config)

    monkeypatch.setattr(module, "run", run)
    return calls


def test_a_requirement_only_result_is_computed_once_kept_out_of_results_and_resumed(
    tiny_models, tmp_path, monkeypatch
):
    model = tiny_models("gpt2")
    calls = _counting(monkeypatch)
    configs = {NA: {"target": "top1", "budgets": ["ffn:3", "attn:2"], "random_seeds": 1}}
    job = Job(
        out=tmp_path / "run", dataset=_dataset(tmp_path), known_only=False, methods=(QA, NA), configs=configs
    )
    store = run_job(job, model=model, progress=False, report=False)
    assert calls == [3]
    manifest = store.read_manifest()
    (key,) = manifest["requirements"]
    assert key.startswith(f"{LA}-") and manifest["requirements"][key]["n_facts"] == 3
    assert manifest["methods"][QA]["given"] == manifest["methods"][NA]["given"]
    assert not store.results_path(LA).exists() and list(manifest["methods"]) == [QA, NA]
    assert list(store.root.glob(f"chunks/{LA}-*/*.handover.safetensors"))
    run_job(job, model=model, progress=False, report=False)
    assert calls == [3]  # resumed: nothing recomputed
    facts = rs.load_facts(job.dataset)
    for module, name in ((qa, QA), (na, NA)):
        direct = module.run(model, facts, module.Config.from_dict(configs.get(name, {}))).to_frame()
        pd.testing.assert_frame_equal(
            store.read_table(name), direct, check_exact=False, rtol=1e-12, atol=1e-12
        )


def test_gold_target_recomputes_the_chunk_where_a_top1_differs_as_if_nothing_were_handed_over(
    tiny_models, tmp_path, monkeypatch
):
    model = tiny_models("gpt2")
    dataset = _dataset(tmp_path)
    facts = rs.load_facts(dataset)
    batch = facts.to_batch(model)
    differ = int((np.asarray(la.run(model, batch, la.Config()).target_ids) != batch.target_ids.numpy()).sum())
    calls = _counting(monkeypatch)
    configs = {NA: {"budgets": ["ffn:3"], "random_seeds": 0, "methods": ["coef", "logprob_increase"]}}
    job = Job(out=tmp_path / "run", dataset=dataset, known_only=False, methods=(LA, NA), configs=configs)
    store = run_job(job, model=model, progress=False, report=False)
    assert differ and calls == [3, 3]  # the random model misses some facts: their chunk is redone
    direct = na.run(model, facts, na.Config.from_dict(configs[NA])).to_frame()
    pd.testing.assert_frame_equal(store.read_table(NA), direct, check_exact=True)


@pytest.mark.slow
def test_a_default_run_computes_logprob_attribution_once(embedded_model, tmp_path, monkeypatch):
    calls = _counting(monkeypatch)
    job = Job(out=tmp_path / "run", methods=(LA, QA, NA), limit=3)
    store = run_job(job, model=embedded_model, progress=False, report=False)
    assert calls == [3]
    methods = store.read_manifest()["methods"]
    assert methods[QA]["given"] == methods[NA]["given"] == {LA: methods[LA]["store_key"]}


def test_plan_counts_a_shared_requirement_once(tiny_models, tmp_path):
    from recallscope.runner.plan import plan_job

    model = tiny_models("gpt2")
    job = Job(out=tmp_path / "run", dataset=_dataset(tmp_path), known_only=False, methods=(QA, NA))
    plan = plan_job(job, model=model, log=lambda _: None)
    assert [m.method for m in plan.methods] == [f"{LA} (required)", QA, NA]
    alone = qa.cost(model, rs.load_facts(job.dataset).to_batch(model), qa.Config())
    assert plan.methods[1].cost.forwards < alone.forwards  # the attribution is not counted again
    assert f"{LA} (required)" in str(plan)
    own = Job(out=tmp_path / "run", dataset=job.dataset, known_only=False, methods=(LA, QA, NA))
    with_own = plan_job(own, model=model, log=lambda _: None)
    assert [m.method for m in with_own.methods] == [LA, QA, NA]
