"""Models spread by accelerate: every method gives the numbers of the undivided model.

Here (CPU only) the device map keeps the embedding and block 0 in memory and offloads the other
blocks and the final norm to disk: their weights sit on the meta device between forwards, so hooks
see them only inside a forward and weight readers (``W_O``, ``W_U``, norms) must fetch them from
accelerate's store. Results must equal the in-memory model's exactly (float64).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from test_runner import FACTS, FAST

import recallscope as rs
from recallscope.methods import REGISTRY
from recallscope.runner import Job, run_job
from recallscope.runner.plan import plan_job
from tiny import byte_level_tokenizer, tiny_hf_model, tiny_model

pytestmark = pytest.mark.slow


def _offloaded(family: str, folder) -> rs.Model:
    """The tiny model of ``family`` with blocks 1… and the final norm offloaded to disk."""
    model = tiny_model(family)  # a fresh copy (same seed) of the session's model
    hf_model, spec = model.hf_model, model.spec
    n_layers = model.n_layers
    device_map = {"": "cpu", **{f"{spec.blocks}.{i}": "disk" for i in range(1, n_layers)}}
    device_map[spec.final_norm] = "disk"
    return rs.load_model(
        hf_model, tokenizer=byte_level_tokenizer(), device_map=device_map, offload_folder=str(folder)
    )


def _facts(n: int) -> rs.FactSet:
    return rs.FactSet(
        rs.Fact(fact_id=f["subject"], subject=f["subject"], prompt=f["prompt"], answers=[f["target"]])
        for f in FACTS[:n]
    )


def _results(model, name: str):
    module = REGISTRY[name]
    config = module.Config.from_dict(FAST.get(name, {}))
    facts = _facts(5 if getattr(module, "needs_all_facts", lambda c: False)(config) else 2)
    if hasattr(module, "prepare"):
        config = module.prepare(model, facts, config)
    return module.run(model, facts, config)


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa", "gemma2", "gpt_neox", "phi"])
def test_every_method_on_an_offloaded_model_equals_the_undivided_model(family, tiny_models, tmp_path):
    whole = tiny_models(family)
    split = _offloaded(family, tmp_path)
    assert split.device_map is not None and "disk" in split.device_map.values()
    assert split.block(1).parameters().__next__().device.type == "meta"  # really offloaded
    assert split.device.type == "cpu" and split.dtype == torch.float64
    for name in REGISTRY:
        expected, got = _results(whole, name), _results(split, name)
        pd.testing.assert_frame_equal(got.to_frame(), expected.to_frame(), check_exact=True, obj=name)
        for table, frame in expected.tables().items():
            pd.testing.assert_frame_equal(got.tables()[table], frame, check_exact=True, obj=f"{name}.{table}")
        arrays = expected.arrays()
        assert got.arrays().keys() == arrays.keys(), name
        for key, value in got.arrays().items():
            np.testing.assert_array_equal(value, arrays[key], err_msg=f"{name} {key}")


def test_weights_of_offloaded_modules_are_read_from_the_offload_store(tiny_models, tmp_path):
    whole, split = tiny_models("llama_gqa"), _offloaded("llama_gqa", tmp_path)
    for read in (lambda m: m.W_O(2), lambda m: m.W_out(1), lambda m: m.W_V(2), lambda m: m.W_U):
        assert torch.equal(read(split), read(whole))
    norm = split.norm_params(split.spec.final_norm)
    assert torch.equal(norm.weight, whole.norm_params(whole.spec.final_norm).weight)
    assert split.provenance()["device_map"] == {"cpu": 1, "disk": 3}


def test_runner_with_device_map_equals_the_in_memory_run(tiny_models, tmp_path):
    """The job's device map reaches the loader, and stored results equal the undivided model's."""
    model = tiny_models("gpt2")
    path = tmp_path / "facts.jsonl"
    path.write_text(
        "".join(
            f'{{"subject": "{f["subject"]}", "prompt": "{f["prompt"]}", "target": "{f["target"]}"}}\n'
            for f in FACTS
        )
    )
    common = dict(dataset=str(path), known_only=False, limit=None, methods=("logit_lens", "causal_tracing"))
    plain = run_job(
        Job(out=tmp_path / "a", configs=FAST, **common), model=model, progress=False, report=False
    )
    split = _offloaded("gpt2", tmp_path / "offload")
    job = Job(out=tmp_path / "b", configs=FAST, **common)
    spread = run_job(job, model=split, progress=False, report=True)
    for method in ("logit_lens", "causal_tracing"):
        pd.testing.assert_frame_equal(spread.read_table(method), plain.read_table(method), check_exact=True)
    assert spread.read_manifest()["model"]["device_map"] == {"cpu": 1, "disk": 3}
    html = (spread.root / "report.html").read_text()
    assert "<dt>device map</dt><dd>cpu: 1, disk: 3</dd>" in html
    assert "<dt>executor</dt><dd>local</dd>" in html


def test_device_map_flags_are_checked():
    with pytest.raises(ValueError, match="unknown device_map 'everywhere'"):
        rs.load_model(tiny_hf_model("gpt2"), tokenizer=byte_level_tokenizer(), device_map="everywhere")
    with pytest.raises(ValueError, match="only with a device_map"):
        rs.load_model(tiny_hf_model("gpt2"), tokenizer=byte_level_tokenizer(), max_memory={"cpu": "1GB"})


def test_plan_accounts_for_the_device_map_and_the_executor(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setattr("recallscope.runner.plan._throughput", lambda model, facts: (1e-6, 1e-3, 1e-5, 1e-4))
    path = tmp_path / "facts.jsonl"
    path.write_text("".join(json.dumps(f) + "\n" for f in FACTS))
    common = dict(dataset=str(path), known_only=False, limit=None, configs=FAST, batch_size=1)
    methods = ("logit_lens", "causal_tracing")
    local = plan_job(Job(out=tmp_path / "a", methods=methods, **common), model=tiny_models("gpt2"), log=print)
    split = _offloaded("gpt2", tmp_path / "offload")
    placed = plan_job(Job(out=tmp_path / "b", methods=methods, **common), model=split, log=print)
    assert placed.weights_by_device["disk"] > 0 and placed.weights_by_device["cpu"] > 0
    assert sum(placed.weights_by_device.values()) == local.weights_bytes
    assert placed.peak_bytes < local.peak_bytes  # weights on disk are not held in memory
    assert "on disk" in str(placed) and local.weights_by_device is None
    ray = Job(out=tmp_path / "c", methods=methods, executor="ray", workers=2, **common)
    spread = plan_job(ray, model=tiny_models("gpt2"), log=print)
    for one, two in zip(local.methods, spread.methods, strict=True):
        assert one.items == two.items == 5 and one.cost == two.cost
        assert two.seconds < one.seconds  # 5 items over 2 workers: the busiest does 3
    assert "executor ray: 2 workers" in str(spread) and "per worker" in str(spread)
