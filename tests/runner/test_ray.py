"""The Ray executor on a local cluster of two CPU workers: the local executor's results, a worker
killed mid-chunk, resume after a local run, Ray missing.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import transformers
from test_runner import FACTS

import recallscope as rs
from recallscope.runner import Job, Store, method_configs, run_job
from recallscope.runner.ray_executor import _identity, _Worker
from recallscope.runner.run import WorkItem
from results import assert_same_result_files

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow

CONFIGS = {
    "causal_tracing": {"samples": 2, "kinds": ["hidden", "mlp"], "window": 3},
    "mlp_regression": {"pooled": True},  # a whole-dataset method: every fact in one call
}


def _setup_hook(plan: Path):
    """A worker setup hook: ``logit_lens`` kills its worker process the first time it gets the fact
    named in ``plan`` (a JSON file ``{"fact_id", "marker"}``, read at each call; the marker file
    records that it happened).
    """

    def hook() -> None:
        from recallscope.methods import logit_lens

        run = logit_lens.run

        def crashing_run(model, facts, config):
            crash = json.loads(plan.read_text()) if plan.exists() else None
            if crash and crash["fact_id"] in {f.fact_id for f in facts}:
                marker = Path(crash["marker"])
                if not marker.exists():
                    marker.touch()
                    os._exit(1)  # as if killed: no exception, the process is gone
            return run(model, facts, config)

        logit_lens.run = crashing_run

    return hook


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local Ray of 2 CPUs, started once; the executor joins it. Yields the path of the workers'
    plan (see :func:`_setup_hook`).
    """
    if ray.is_initialized():
        pytest.skip("Ray is already running in this process")
    plan = tmp_path_factory.mktemp("ray") / "crash.json"
    ray.init(
        num_cpus=2,
        num_gpus=0,
        include_dashboard=False,
        runtime_env={"worker_process_setup_hook": _setup_hook(plan)},
    )
    yield plan
    ray.shutdown()


@pytest.fixture
def one_thread():
    """The local runs use one thread, as each worker of the 2-CPU cluster does (same bits)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def dataset(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text("".join(json.dumps(f) + "\n" for f in FACTS))
    return path


def _job(tmp_path, dataset, out: str, **overrides) -> Job:
    values = dict(
        out=tmp_path / out,
        dataset=str(dataset),
        known_only=False,
        limit=None,
        configs=CONFIGS,
        batch_size=2,
        methods=("logit_lens",),
    )
    return Job(**{**values, **overrides})


def _assert_same_results(a: Store, b: Store) -> None:
    """Every results table and array, and the manifest's counts, equal to the bit."""
    ma, mb = a.read_manifest(), b.read_manifest()
    assert ma["dataset"] == mb["dataset"] and list(ma["methods"]) == list(mb["methods"])
    for name, entry in ma["methods"].items():
        for key in ("store_key", "n_facts", "skipped", "rows", "chunks", "config", "conventions"):
            assert entry[key] == mb["methods"][name][key], (name, key)
    assert_same_result_files(a.root, b.root)


def _chunk_files(store: Store) -> dict[str, list[str]]:
    return {d.name: sorted(p.name for p in d.iterdir()) for d in sorted((store.root / "chunks").iterdir())}


def test_ray_run_equals_local_run(cluster, one_thread, tiny_models, tmp_path, dataset):
    model = tiny_models("gpt2")
    methods = ("logit_lens", "causal_tracing", "mlp_regression")
    local = run_job(
        _job(tmp_path, dataset, "local", methods=methods), model=model, progress=False, report=False
    )
    job = _job(tmp_path, dataset, "ray", methods=methods, executor="ray", workers=2)
    store = run_job(job, model=model, progress=False, report=False)
    _assert_same_results(local, store)
    entries = store.read_manifest()["methods"]
    assert entries["logit_lens"]["chunks"] == 3 and entries["mlp_regression"]["chunks"] == 1
    assert entries["logit_lens"]["n_facts"] == 5 and entries["mlp_regression"]["n_facts"] == 5
    assert _chunk_files(local) == _chunk_files(store)
    assert ray.is_initialized()  # the executor joined the running Ray and left it running


def test_ray_run_resumes_a_local_run_and_survives_a_killed_worker(
    cluster, one_thread, tiny_models, tmp_path, dataset, capsys
):
    model = tiny_models("gpt2")
    full = run_job(_job(tmp_path, dataset, "full"), model=model, progress=False, report=False)
    job = _job(tmp_path, dataset, "run")
    store = run_job(job, model=model, progress=False, report=False)
    folder = next((job.out / "chunks").iterdir())
    missing = {p.stem for p in sorted(folder.glob("*.json"))[1:]}
    for name in missing:
        (folder / f"{name}.json").unlink()  # as if the local run had been killed after its first chunk
    stamps = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}
    marker = tmp_path / "crashed"
    cluster.write_text(json.dumps({"fact_id": "facts/4", "marker": str(marker)}))
    ray_job = _job(tmp_path, dataset, "run", executor="ray", workers=2)
    try:
        run_job(ray_job, model=model, progress=True, report=False)
    finally:
        cluster.unlink()
    assert marker.exists()  # a worker died in the middle of the chunk of facts 3 and 4
    assert "ray: 2 workers on the running Ray (cpu; 1 CPU each)" in capsys.readouterr().out
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}
    assert {name for name in after if stamps.get(name) != after[name]} == {
        p.name for p in folder.iterdir() if p.name.split(".")[0] in missing
    }  # only the missing chunks were computed
    _assert_same_results(full, store)
    assert _chunk_files(full) == _chunk_files(store)  # each chunk written once, nothing left over
    key = store.read_manifest()["methods"]["logit_lens"]["store_key"]
    fact_ids = [i for r in store.chunk_records("logit_lens", key) for i in r["fact_ids"]]
    assert sorted(fact_ids) == [f"facts/{i}" for i in range(1, 6)]
    run_job(ray_job, model=model, progress=True, report=False)
    assert "ray:" not in capsys.readouterr().out  # nothing left to do: no worker started


def test_worker_with_another_install_refuses_to_run(cluster, tiny_models, tmp_path, dataset):
    model = tiny_models("gpt2")
    facts = rs.load_facts(str(dataset))
    expected = {**_identity(model), "transformers": "0.0"}  # as if the driver had another version
    worker = _Worker(_job(tmp_path, dataset, "run"), torch.get_num_threads(), expected)
    shared = [ray.put(model), ray.put(facts)]
    assert f"transformers {transformers.__version__} (driver: 0.0)" in worker.ready(shared)
    item = WorkItem(
        "logit_lens", method_configs(_job(tmp_path, dataset, "run"))["logit_lens"], "k", "c", (0,)
    )
    with pytest.raises(rs.RecallscopeError, match="install the same recallscope, torch and transformers"):
        worker.run(item, shared)


def test_missing_ray_is_a_clear_error(tiny_models, tmp_path, dataset, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    job = _job(tmp_path, dataset, "run", executor="ray")
    with pytest.raises(rs.RecallscopeError, match=r"needs Ray: pip install -e '\.\[ray\]'"):
        run_job(job, model=tiny_models("gpt2"), progress=False, report=False)
