"""The runner on a tiny model: chunked equals one call, resume, bad facts, store, job errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

import recallscope as rs
from recallscope.methods import REGISTRY, causal_tracing, logit_lens
from recallscope.methods.base import MethodResult
from recallscope.runner import Job, Store, load_config_file, method_configs, run_job
from recallscope.runner.plan import plan_job
from recallscope.runner.run import chunks
from recallscope.runner.store import atomic_write

FACTS = [
    {"subject": "France", "prompt": "The capital of France is", "target": "Paris"},
    {"subject": "Germany", "prompt": "The capital of Germany is", "target": "Berlin"},
    {"subject": "Eiffel Tower", "prompt": "The Eiffel Tower is in", "target": "Paris"},
    {"subject": "Rome", "prompt": "Rome is the capital of", "target": "Italy"},
    {"subject": "Tokyo", "prompt": "The city of Tokyo is in", "target": "Japan"},
]
FAST = {
    "causal_tracing": {"samples": 2, "kinds": ["hidden", "mlp"], "window": 3},
    # facts of no shared relation have no subject-swap partner: Gaussian noise; every node of the
    # rows verified, so that low-precision runs verify the same ones
    "attribution_patching": {
        "corruption": "gaussian",
        "metric": "logprob",
        "samples": 2,
        "verify": None,
        "nodes": ["resid", "mlp", "head"],
    },
}


@pytest.fixture
def dataset(tmp_path):
    path = tmp_path / "facts.jsonl"
    rows = [json.dumps(f) for f in FACTS] + [
        '{"subject": "Mars", "prompt": "Venus is a", "target": "planet"}'
    ]
    path.write_text("\n".join(rows) + "\n")
    return path


def _job(tmp_path, dataset, **overrides):
    values = dict(out=tmp_path / "run", dataset=str(dataset), known_only=False, limit=None, configs=FAST)
    return Job(**{**values, **overrides})


def test_chunked_run_equals_one_call(tiny_models, tmp_path, dataset):
    model = tiny_models("llama_gqa")
    job = _job(tmp_path, dataset, batch_size=2)
    store = run_job(job, model=model, progress=False, report=False)
    facts = rs.load_facts(str(dataset))
    assert [s.row for s in facts.skipped] == [6]  # the subject does not occur in its prompt
    configs = method_configs(job)
    config = causal_tracing.prepare(model, facts, configs["causal_tracing"])
    direct = causal_tracing.run(model, facts, config).to_frame()
    pd.testing.assert_frame_equal(store.read_table("causal_tracing"), direct, check_exact=True)
    lens = logit_lens.run(model, facts, configs["logit_lens"])
    stored = store.read_table("logit_lens")
    floats = ["prob", "logprob", "logit"]
    pd.testing.assert_frame_equal(stored.drop(columns=floats), lens.to_frame().drop(columns=floats))
    np.testing.assert_allclose(stored["logprob"], lens.to_frame()["logprob"], rtol=0, atol=1e-10)
    arrays = store.read_arrays("logit_lens")
    np.testing.assert_allclose(arrays[f"{facts[3].fact_id}/prob"], lens.prob[3], atol=1e-12)
    manifest = store.read_manifest()
    assert manifest["status"] == "complete" and manifest["dataset"]["n_facts"] == 5
    assert (
        "row 6" in manifest["dataset"]["skipped"][0] and "does not occur" in manifest["dataset"]["skipped"][0]
    )
    entry = manifest["methods"]["causal_tracing"]
    assert entry["n_facts"] == 5 and entry["chunks"] == 3 and entry["config"]["noise"] == config.noise
    assert entry["conventions"]["noise_rule"].startswith("3.0 x std") and entry["rows"]["rows"] == len(direct)
    assert manifest["model"]["dtype"] == "float64"
    assert set(store.read_facts()["fact_id"]) == {f.fact_id for f in facts}


def test_resume_recomputes_only_missing_chunks(tiny_models, tmp_path, dataset, monkeypatch):
    model = tiny_models("gpt2")
    job = _job(tmp_path, dataset, batch_size=2, methods=("causal_tracing",))
    store = run_job(job, model=model, progress=False, report=False)
    before = store.read_table("causal_tracing")
    folder = next((job.out / "chunks").iterdir())
    victim = sorted(folder.glob("*.json"))[1]
    victim.unlink()  # as if killed after writing the data but before the record
    calls = []
    original = causal_tracing.run
    monkeypatch.setattr(causal_tracing, "run", lambda m, f, c: calls.append(len(f)) or original(m, f, c))
    run_job(job, model=model, progress=False, report=False)
    assert calls == [2]
    pd.testing.assert_frame_equal(store.read_table("causal_tracing"), before, check_exact=True)
    run_job(job, model=model, progress=False, report=False)
    assert calls == [2]  # everything done: nothing recomputed
    lines = dataset.read_text().splitlines()
    lines[4] = lines[4].replace("Tokyo is in", "Tokyo lies in")  # same row, same id, other prompt
    dataset.write_text("\n".join(lines) + "\n")
    run_job(job, model=model, progress=False, report=False)
    assert calls == [2, 1]  # only the edited fact is traced again (the noise level is the same)
    trace = store.read_table("causal_tracing")
    tokens = trace[(trace.fact_id == "facts/5") & (trace.kind == "hidden") & (trace.layer == 0)]["token"]
    assert "".join(tokens) == "The city of Tokyo lies in"
    other = _job(tmp_path, dataset, batch_size=2, methods=("causal_tracing",), configs={})
    with pytest.raises(rs.RecallscopeError, match=r"holds a run of another job \(--config: "):
        run_job(other, model=model, progress=False, report=False)  # one job per folder
    assert calls[2:] == []
    run_job(other, model=model, progress=False, report=False, overwrite=True)
    assert calls[2:] == [2, 2, 1]  # started over: everything computed again


@pytest.mark.parametrize("batch_size", [4, 1])  # 1: the failing fact is a chunk of its own
def test_bad_fact_is_skipped_and_reported(batch_size, tiny_models, tmp_path, dataset, monkeypatch):
    model = tiny_models("gpt2")
    original = logit_lens.run

    def failing(m, facts, config):
        if any(f.subject == "Rome" for f in facts):
            raise rs.RecallscopeError("something about Rome")
        return original(m, facts, config)

    monkeypatch.setattr(logit_lens, "run", failing)
    job = _job(tmp_path, dataset, batch_size=batch_size, methods=("logit_lens",))
    store = run_job(job, model=model, progress=False, report=True)
    entry = store.read_manifest()["methods"]["logit_lens"]
    assert entry["n_facts"] == 4 and entry["skipped"] == [["facts/4", "something about Rome"]]
    assert "facts/4" not in set(store.read_table("logit_lens")["fact_id"])
    assert "something about Rome" in (job.out / "report.html").read_text()


def test_whole_dataset_method_gets_every_fact_in_one_call(tiny_models, tmp_path, dataset, monkeypatch):
    model = tiny_models("gpt2")
    calls = []
    original = logit_lens.run
    monkeypatch.setattr(logit_lens, "needs_all_facts", lambda config: True, raising=False)
    monkeypatch.setattr(logit_lens, "run", lambda m, f, c: calls.append(len(f)) or original(m, f, c))
    job = _job(tmp_path, dataset, batch_size=2, methods=("logit_lens",))
    store = run_job(job, model=model, progress=False, report=False)
    assert calls == [5] and store.read_manifest()["methods"]["logit_lens"]["chunks"] == 1
    run_job(job, model=model, progress=False, report=False)
    assert calls == [5]  # done: resumed
    lines = dataset.read_text().splitlines()
    dataset.write_text(
        "\n".join([*lines[:4], lines[4].replace("Tokyo is in", "Tokyo lies in"), *lines[5:]]) + "\n"
    )
    store = run_job(job, model=model, progress=False, report=False)
    assert calls == [5, 5]  # one fact edited: another fact list, another store key, all recomputed
    assert store.read_table("logit_lens")["fact_id"].nunique() == 5
    assert len(list((job.out / "chunks").iterdir())) == 2  # the old result is kept, never mixed in


def test_shots_give_zero_and_one_shot_variants_with_counterfactual_partners(tiny_models, tmp_path):
    from recallscope.runner.job import select_facts

    facts = select_facts(
        tiny_models("gpt2"),
        Job(out=tmp_path, dataset="lv_capitals", limit=3, known_only=False, shots=(1, 0), seed=2),
    )
    assert [f.attributes.get("shots", 0) for f in facts] == [0, 1] * 3
    for zero, one in zip(facts[::2], facts[1::2], strict=True):
        assert one.prompt.endswith(zero.prompt) and one.fact_id == zero.fact_id + "/1shot"
        assert zero.attributes["counterfactual"]["subject"] == one.attributes["counterfactual"]["subject"]
    with pytest.raises(rs.RecallscopeError, match="shots"):
        Job(out=tmp_path, shots=(-1,))


def test_plan_counts_work_and_resume(tiny_models, tmp_path, dataset):
    model = tiny_models("gpt2")
    job = _job(tmp_path, dataset, batch_size=2)
    plan = plan_job(job, model=model, log=lambda _: None)
    by_name = {m.method: m for m in plan.methods}
    assert by_name["logit_lens"].cost.forwards == 3 and by_name["causal_tracing"].cost.forwards > 10
    assert all(m.cost.token_blocks > 0 and m.cost.peak_bytes > 0 and m.seconds > 0 for m in plan.methods)
    assert "causal_tracing" in str(plan) and "peak memory" in str(plan)
    run_job(job, model=model, progress=False, report=False)
    again = plan_job(job, model=model, log=lambda _: None)
    assert all(m.facts_done == 5 and m.cost.forwards == 0 for m in again.methods)


def test_store_combine_orders_and_filters(tmp_path):
    store = Store(tmp_path)
    for name, ids in (("b", ["y", "z"]), ("a", ["x"])):
        frame = pd.DataFrame({"fact_id": ids, "v": range(len(ids))})
        arrays = {f"{i}/m": np.ones(2) * n for n, i in enumerate(ids)}
        record = {"fact_ids": ids, "digests": {i: "d" for i in ids}, "skipped": [], "seconds": 0}
        store.write_chunk("m", "k", name, frame, {}, arrays, record)
    assert store.done_facts("m", "k", {"x": "d", "y": "d", "z": "d", "w": "d"}) == {"x", "y", "z"}
    assert store.done_facts("m", "k", {"x": "d", "y": "edited"}) == {"x"}
    store.combine("m", "k", {"z": "d", "x": "d", "y": "edited"})
    assert store.read_table("m")["fact_id"].tolist() == ["z", "x"]
    assert set(store.read_arrays("m")) == {"z/m", "x/m"}  # y was edited since: left out
    assert [r.start for r in chunks(5, 2)] == [0, 2, 4] and len(chunks(0, 3)) == 0


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    def broken(path):
        path.write_text("partial")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(tmp_path / "x.json", broken)
    assert list(tmp_path.iterdir()) == []


def test_job_errors(tmp_path):
    with pytest.raises(
        rs.RecallscopeError, match="unknown method 'causal_tracin'; did you mean 'causal_tracing'"
    ):
        Job(out=tmp_path, methods=("causal_tracin",))
    with pytest.raises(rs.RecallscopeError, match="unknown method.*logitlens"):
        Job(out=tmp_path, configs={"logitlens": {}})
    with pytest.raises(rs.RecallscopeError, match="limit must be a positive"):
        Job(out=tmp_path, limit=0)
    with pytest.raises(rs.RecallscopeError, match="--device: unknown device 'banana'; expected cpu, cuda"):
        Job(out=tmp_path, device="banana")
    with pytest.raises(rs.RecallscopeError, match="--dtype: unknown dtype 'nonsense'; expected one of"):
        Job(out=tmp_path, dtype="nonsense")
    if not torch.cuda.is_available():
        with pytest.raises(rs.RecallscopeError, match="--device cuda:1: CUDA is not available here"):
            Job(out=tmp_path, device="cuda:1")
    assert Job(out=tmp_path, device="cpu", dtype="bf16").device == "cpu"
    with pytest.raises(rs.RecallscopeError, match="nosuch.jsonl: no such file, and not a built-in dataset"):
        Job(out=tmp_path, dataset=str(tmp_path / "nosuch.jsonl"))  # before any model loads
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(rs.RecallscopeError, match="empty.jsonl: the file is empty"):
        Job(out=tmp_path, dataset=str(tmp_path / "empty.jsonl"))
    with pytest.raises(rs.RecallscopeError, match="has no field 'sample'; did you mean 'samples'"):
        method_configs(Job(out=tmp_path, configs={"causal_tracing": {"sample": 3}}))
    bad = tmp_path / "c.toml"
    bad.write_text("[causal_tracing\nsamples = 3")
    with pytest.raises(rs.RecallscopeError, match="not valid TOML"):
        load_config_file(bad)
    bad.write_text('samples = 3\n[causal_tracing]\npreset = "rome"')
    with pytest.raises(rs.RecallscopeError, match="one section"):
        load_config_file(bad)
    good = tmp_path / "c.json"
    good.write_text(json.dumps({"causal_tracing": {"preset": "yan_jia", "samples": 4}}))
    config = method_configs(Job(out=tmp_path, configs=load_config_file(good), seed=7))["causal_tracing"]
    assert config.preset_name == "yan_jia" and config.samples == 4 and config.seed == 7


def test_every_method_follows_the_protocol(tiny_models):
    model = tiny_models("gpt2")
    facts = rs.FactSet(
        rs.Fact(fact_id=f["subject"], subject=f["subject"], prompt=f["prompt"], answers=[f["target"]])
        for f in FACTS[:2]
    )
    everything = rs.FactSet(
        rs.Fact(fact_id=f["subject"], subject=f["subject"], prompt=f["prompt"], answers=[f["target"]])
        for f in FACTS
    )
    drawn = 0
    for name, module in REGISTRY.items():
        assert module.NAME == name and module.DESCRIPTION and module.CHUNK_SIZE >= 1
        config = module.Config.from_dict(FAST.get(name, {}))
        whole = getattr(module, "needs_all_facts", lambda c: False)(config)  # a train/held-out split
        given = everything if whole else facts
        if hasattr(module, "prepare"):
            config = module.prepare(model, given, config)
        result = module.run(model, given, config)
        assert isinstance(result, MethodResult) and type(result).__dataclass_params__.frozen
        frame = result.to_frame()
        ids = {f.fact_id for f in given}
        assert set(result.fact_ids) == ids
        assert isinstance(result.summary(), pd.DataFrame) and len(result.summary())  # one name for all
        assert set(frame["fact_id"]) == ids
        assert all(key.split("/")[0] in ids for key in result.arrays())
        assert isinstance(result.tables(), dict) and result.skipped == []
        assert result.provenance["conventions"] and module.cost(model, facts, config).forwards >= 1
        shown = result.plot()  # the report's own section, for notebooks
        assert shown.method == name and shown._repr_html_().startswith("<h3>")
        drawn += bool(shown.figures or shown.tables)
    assert drawn >= len(REGISTRY) - 3  # a figure or table for nearly every method, even on 2 tiny facts
