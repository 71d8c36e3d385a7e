"""docs/contributing.md's worked example runs as written: its module registers as a method, runs
through the runner on a tiny model, and its naive-oracle test passes."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

import recallscope as rs
from recallscope import methods
from recallscope.runner import Job, Store, run_job

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "contributing.md"


def _blocks() -> dict[str, str]:
    """The guide's code blocks that start with ``# file: <path>``, by path."""
    found = re.findall(r"```python\n# file: (\S+)\n(.*?)```", GUIDE.read_text(), flags=re.S)
    return {path: code for path, code in found}


@pytest.fixture
def example(tmp_path, monkeypatch):
    """The example's module, imported from the guide's text and registered (for this test only)."""
    code = _blocks()["src/recallscope/methods/general/target_rank.py"]
    path = tmp_path / "target_rank.py"
    path.write_text(code)
    spec = importlib.util.spec_from_file_location("target_rank_example", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    monkeypatch.setattr(methods, "_REGISTERED", {})
    return methods.register(module)


def test_the_guide_names_four_files():
    assert set(_blocks()) == {
        "src/recallscope/methods/general/target_rank.py",
        "tests/methods/test_target_rank.py",
    }
    text = GUIDE.read_text()
    assert '("target_rank", "general"),' in text and "docs/methods/target_rank.md" in text


def test_the_example_passes_its_oracle_test(example, tiny_models):
    namespace: dict = {}
    exec(compile(_blocks()["tests/methods/test_target_rank.py"], "test_target_rank.py", "exec"), namespace)
    assert namespace["tr"] is example
    namespace["test_batched_equals_naive"](tiny_models)


def test_the_example_runs_through_the_runner(example, tiny_models, tmp_path):
    facts = tmp_path / "facts.jsonl"
    rows = [{"subject": "France", "prompt": "The capital of France is", "target": "Paris"}]
    facts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    job = Job(out=tmp_path / "run", dataset=str(facts), known_only=False, limit=None, methods=["target_rank"])
    run_job(job, model=tiny_models("llama_gqa"))
    frame = Store(tmp_path / "run").read_table("target_rank")
    assert list(frame.columns) == ["fact_id", "layer", "rank"] and len(frame) == 3


def test_check_method_names_what_is_missing():
    for module in methods.REGISTRY.values():
        methods.check_method(module)
    with pytest.raises(rs.RecallscopeError, match="NAME: a non-empty string.*run\\(model, facts, config\\)"):
        methods.check_method(type(sys)("not_a_method"))
    needy = type(sys)("needy")  # requires another method's result but cannot take it
    builtin = methods.REGISTRY["logit_lens"]
    vars(needy).update(
        {k: getattr(builtin, k) for k in ("NAME", "DESCRIPTION", "CHUNK_SIZE", "Config", "run", "cost")}
    )
    needy.requires = lambda config: {"logprob_attribution": {}}
    with pytest.raises(rs.RecallscopeError, match="a method with requires takes given"):
        methods.check_method(needy)
    impostor = type(sys)("impostor")  # a valid method that takes a built-in method's name
    builtin = methods.REGISTRY["logit_lens"]
    vars(impostor).update(
        {k: getattr(builtin, k) for k in ("NAME", "DESCRIPTION", "CHUNK_SIZE", "Config", "run", "cost")}
    )
    with pytest.raises(rs.RecallscopeError, match="taken by a built-in method"):
        methods.register(impostor)


def test_a_method_from_another_package_loads_through_its_entry_point(example, monkeypatch):
    monkeypatch.setattr(methods, "_REGISTERED", {})  # not registered by hand: only declared
    monkeypatch.setattr(methods, "_plugins", lambda: {"target_rank": example.__name__})
    assert list(methods.REGISTRY)[-1] == "target_rank"
    assert methods.REGISTRY["target_rank"] is example and methods.target_rank is example
