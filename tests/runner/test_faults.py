"""Fault injection: damaged files, edited facts, changed flags, a second process, a read-only
folder, odd encodings, a long prompt and every bad flag. Each case asserts the message a user
reads and that no result is lost or stale (exact comparison with an uninterrupted run).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import recallscope as rs
from recallscope.cli import main
from recallscope.methods import logit_lens
from recallscope.runner import Job, Store, run_job
from recallscope.runner.folder import LOCK
from runner.test_runner import FACTS


@pytest.fixture
def dataset(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text("".join(json.dumps(f) + "\n" for f in FACTS))
    return path


@pytest.fixture
def counted(monkeypatch):
    """The facts each ``logit_lens.run`` call got."""
    calls: list[int] = []
    original = logit_lens.run
    monkeypatch.setattr(logit_lens, "run", lambda m, f, c: calls.append(len(f)) or original(m, f, c))
    return calls


def _job(tmp_path, dataset, **overrides) -> Job:
    values = dict(
        out=tmp_path / "run", dataset=str(dataset), methods=("logit_lens",), known_only=False, limit=None
    )
    return Job(**{**values, "batch_size": 2, **overrides})


def _results(store: Store) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    return (
        store.read_table("logit_lens"),
        store.read_table("logit_lens", "topk"),
        store.read_arrays("logit_lens"),
    )


def _assert_same(store: Store, expected) -> None:
    frame, topk, arrays = _results(store)
    pd.testing.assert_frame_equal(frame, expected[0], check_exact=True)
    pd.testing.assert_frame_equal(topk, expected[1], check_exact=True)
    assert arrays.keys() == expected[2].keys()
    assert all(np.array_equal(arrays[k], expected[2][k]) for k in arrays)


def _chunk_files(job: Job) -> list[Path]:
    (folder,) = (job.out / "chunks").iterdir()
    return sorted(p for p in folder.iterdir() if p.is_file())


def _chunk_file(job: Job, start: str, suffix: str) -> Path:
    """The file of the chunk starting at fact ``start`` that ends in ``.suffix``."""
    (path,) = [
        p for p in _chunk_files(job) if p.name.startswith(f"{start}-") and p.name.split(".", 1)[1] == suffix
    ]
    return path


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGES = {
    "a truncated chunk Parquet": ("parquet", _truncate),
    "a truncated chunk table": ("topk.parquet", _truncate),
    "a truncated chunk safetensors": ("safetensors", _truncate),
    "a flipped byte (same size)": ("safetensors", _flip),
    "a missing chunk file": ("topk.parquet", Path.unlink),
    "a truncated chunk record": ("json", _truncate),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_chunk_is_reported_moved_aside_and_computed_again(
    damage, tiny_models, tmp_path, dataset, counted, capsys
):
    model = tiny_models("gpt2")
    job = _job(tmp_path, dataset)
    expected = _results(run_job(job, model=model, progress=False, report=False))
    assert counted == [2, 2, 1]
    suffix, hurt = DAMAGES[damage]
    victim = _chunk_file(job, "000002", suffix)
    hurt(victim)
    capsys.readouterr()
    store = run_job(job, model=model, progress=False, report=False)
    assert counted == [2, 2, 1, 2]  # the damaged chunk only
    err = capsys.readouterr().err
    record = victim.with_name(victim.name.split(".")[0] + ".json")
    assert f"recallscope: {record} is damaged (" in err and f"moved to {record.parent / 'corrupt'}/" in err
    assert any(p.name.startswith(record.name) for p in (record.parent / "corrupt").iterdir())
    _assert_same(store, expected)
    (repair,) = store.read_manifest()["repairs"]
    assert repair["path"] == str(record)
    run_job(job, model=model, progress=False, report=False)
    assert counted == [2, 2, 1, 2]  # healed: nothing more


def test_a_chunk_written_by_recallscope_0_1_is_still_used_and_checked(
    tiny_models, tmp_path, dataset, counted
):
    model = tiny_models("gpt2")
    job = _job(tmp_path, dataset)
    expected = _results(run_job(job, model=model, progress=False, report=False))
    for record in [p for p in _chunk_files(job) if p.suffix == ".json"]:  # records of 0.1 list no files
        record.write_text(
            json.dumps({k: v for k, v in json.loads(record.read_text()).items() if k != "files"})
        )
    store = run_job(job, model=model, progress=False, report=False)
    assert counted == [2, 2, 1]
    _assert_same(store, expected)
    _truncate(_chunk_file(job, "000000", "topk.parquet"))
    store = run_job(job, model=model, progress=False, report=False)
    assert counted == [2, 2, 1, 2]  # it does not open: done again
    _assert_same(store, expected)


def test_a_damaged_manifest_is_moved_aside_and_the_run_resumes(
    tiny_models, tmp_path, dataset, counted, capsys
):
    model = tiny_models("gpt2")
    job = _job(tmp_path, dataset)
    expected = _results(run_job(job, model=model, progress=False, report=False))
    manifest = job.out / "manifest.json"
    _truncate(manifest)
    with pytest.raises(rs.RecallscopeError, match=f"{manifest} is not a recallscope manifest .*cut short"):
        Store(job.out).read_manifest()
    assert main_exit(["report", str(job.out)]) == 2
    assert f"error: {manifest} is not a recallscope manifest" in capsys.readouterr().err
    store = run_job(job, model=model, progress=False, report=False)
    assert counted == [2, 2, 1]  # nothing recomputed: chunks are keyed by their content
    assert f"{manifest} is damaged (not valid JSON (cut short?))" in capsys.readouterr().err
    assert store.read_manifest()["status"] == "complete"
    _assert_same(store, expected)


def main_exit(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as done:
        main(argv)
    return done.value.code


# -- cached verdicts and lists follow the facts' content -------------------------------------------------


def _judged(monkeypatch) -> list[list[str]]:
    """Make the known filter deterministic (a fact is known when its target is Japan, Berlin or
    Paris) and record the facts it judges.
    """
    judged: list[list[str]] = []

    def known_by(self, model, criterion="first_token", *, batch_size=32):
        judged.append([f.fact_id for f in self])
        return self.filter(lambda f: f.answers[0] in ("Japan", "Berlin", "Paris"))

    monkeypatch.setattr(rs.FactSet, "known_by", known_by)
    return judged


def test_an_edited_fact_is_judged_again_not_served_a_stale_verdict(
    tiny_models, tmp_path, dataset, monkeypatch
):
    judged = _judged(monkeypatch)
    model = tiny_models("gpt2")
    job = _job(tmp_path, dataset, known_only=True)
    store = run_job(job, model=model, progress=False, report=False)
    assert list(store.read_facts().subject) == ["France", "Germany", "Eiffel Tower", "Tokyo"]
    dataset.write_text(dataset.read_text().replace('"Paris"}', '"Lyon"}', 1))  # France → Lyon
    store = run_job(job, model=model, progress=False, report=False)
    assert judged[-1] == ["facts/1"]  # only the edited fact is judged again
    assert list(store.read_facts().subject) == ["Germany", "Eiffel Tower", "Tokyo"]
    assert list(store.read_table("logit_lens").fact_id.unique()) == ["facts/2", "facts/3", "facts/5"]


def test_a_damaged_known_json_is_moved_aside_and_rebuilt(tiny_models, tmp_path, dataset, monkeypatch, capsys):
    judged = _judged(monkeypatch)
    model = tiny_models("gpt2")
    job = _job(tmp_path, dataset, known_only=True)
    run_job(job, model=model, progress=False, report=False)
    known = job.out / "known.json"
    _truncate(known)
    capsys.readouterr()
    store = run_job(job, model=model, progress=False, report=False)
    assert f"{known} is damaged" in capsys.readouterr().err
    assert len(judged) == 2 and json.loads(known.read_text())["verdicts"]
    assert list(store.read_facts().subject) == ["France", "Germany", "Eiffel Tower", "Tokyo"]


# -- one job per folder, never someone else's folder -------------------------------------------------------


def test_another_job_on_the_same_folder_is_refused_unless_overwrite(tiny_models, tmp_path, dataset, counted):
    model = tiny_models("gpt2")
    job = _job(tmp_path, dataset, methods=("logit_lens", "extraction_rate"))
    run_job(job, model=model, progress=False, report=False)
    before = {p: p.read_bytes() for p in job.out.rglob("*") if p.is_file() and p.name != LOCK}
    other = _job(tmp_path, dataset, limit=2)
    message = (
        f'--out {job.out} holds a run of another job (--methods: ["logit_lens", "extraction_rate"] there, '
        '["logit_lens"] now; --limit: null there, 2 now). Give a new --out for this job, or add --overwrite'
    )
    with pytest.raises(rs.RecallscopeError) as refused:
        run_job(other, model=model, progress=False, report=False)
    assert str(refused.value).startswith(message)
    assert {p: p.read_bytes() for p in before} == before  # nothing touched
    store = run_job(other, model=model, progress=False, report=False, overwrite=True)
    assert counted == [2, 2, 1]  # its two facts were finished, with the same settings: reused
    assert store.read_facts().shape[0] == 2 and not store.results_path("extraction_rate").exists()
    assert list(store.read_manifest()["methods"]) == ["logit_lens"]
    fresh = run_job(replace(other, out=tmp_path / "fresh"), model=model, progress=False, report=False)
    pd.testing.assert_frame_equal(store.read_table("logit_lens"), fresh.read_table("logit_lens"))


def test_a_folder_that_is_not_a_run_is_never_written_into(tiny_models, tmp_path, dataset):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "report.html").write_text("<p>my report</p>")
    (folder / "manifest.json").write_text('{"name": "my project"}')
    for overwrite in (False, True):
        with pytest.raises(rs.RecallscopeError) as refused:
            run_job(_job(tmp_path, dataset, out=folder), model=tiny_models("gpt2"), overwrite=overwrite)
        assert str(refused.value) == (
            f"--out {folder} is not empty and is not a recallscope run folder (it holds manifest.json, "
            "report.html); recallscope does not write into it: give a new or empty folder"
        )
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "report.html"]
    assert (folder / "report.html").read_text() == "<p>my report</p>"


def test_a_second_process_on_the_folder_is_refused_with_who_holds_it(tiny_models, tmp_path, dataset):
    job = _job(tmp_path, dataset)
    job.out.mkdir()
    holder = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from recallscope.runner.folder import _lock
        with _lock(Path({str(job.out)!r})):
            print("held", flush=True)
            time.sleep(60)
        """
    )
    process = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "held"
        with pytest.raises(rs.RecallscopeError) as refused:
            run_job(job, model=tiny_models("gpt2"), progress=False, report=False)
        assert str(refused.value).startswith(f"--out {job.out} is in use: process {process.pid} on ")
        assert str(refused.value).endswith("Wait until that run ends, or give another --out")
        assert not (job.out / "manifest.json").exists()
    finally:
        process.kill()
        process.wait()
    store = run_job(job, model=tiny_models("gpt2"), progress=False, report=False)  # the lock died with it
    assert store.read_manifest()["status"] == "complete"


def _without_override() -> list[str] | None:
    """A command prefix that runs as a user whom file permissions bind (root drops its override)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    return [setpriv, "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"]


def test_a_read_only_folder_is_refused_before_the_model_loads(tmp_path, dataset):
    prefix = _without_override()
    if prefix is None:
        pytest.skip("running as root without setpriv: cannot drop the permission override")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        command = [*prefix, sys.executable, "-m", "recallscope", "run", "--out", str(folder)]
        command += ["--dataset", str(dataset), "--methods", "logit_lens"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    finally:
        folder.chmod(0o755)
    assert done.returncode == 2, done.stderr
    assert (
        f"error: --out {folder}: cannot write there (Permission denied); choose a folder you can write "
        "to, e.g. --out ~/recallscope-runs/NAME"
    ) in done.stderr
    assert "loading" not in done.stderr and "Traceback" not in done.stderr
    assert list(folder.iterdir()) == []


# -- inputs refused before the model loads ---------------------------------------------------------------


def _bad_inputs(tmp_path: Path, dataset: Path) -> list[tuple[list[str], str]]:
    (tmp_path / "k_text.toml").write_text('[logit_lens]\nk = "abc"\n')
    (tmp_path / "k_negative.toml").write_text("[logit_lens]\nk = -5\n")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "a_file").write_text("")
    cases = [
        (
            ["--device", "banana"],
            "error: --device: unknown device 'banana'; expected cpu, cuda, cuda:N or mps",
        ),
        (["--dtype", "nonsense"], "error: --dtype: unknown dtype 'nonsense'"),
        (
            ["--config", str(tmp_path / "k_text.toml")],
            "error: logit_lens config: k must be an integer ≥ 1, got 'abc'",
        ),
        (
            ["--config", str(tmp_path / "k_negative.toml")],
            "error: logit_lens config: k must be an integer ≥ 1, got -5",
        ),
        (
            ["--model", "/nonexistent/path"],
            "error: model '/nonexistent/path': no such folder or file. --model takes",
        ),
        (["--model", str(tmp_path)], "the folder has no config.json, so it is not a saved model"),
        (
            ["--dataset", "no_such_set"],
            "error: no_such_set: no such file, and not a built-in dataset name (mixed, ",
        ),
        (["--dataset", str(tmp_path / "missing.jsonl")], f"{tmp_path / 'missing.jsonl'}"),
        (["--dataset", str(tmp_path / "empty.jsonl")], f"{tmp_path / 'empty.jsonl'}"),
        (["--methods", "logit_lense"], "error: unknown method 'logit_lense'; did you mean 'logit_lens'?"),
        (
            ["--out", str(tmp_path / "a_file")],
            f"Invalid value for '--out': Directory '{tmp_path / 'a_file'}' is a file",
        ),
        (["--limit", "abc"], "Invalid value for --limit: expected a number of facts or 'all', got 'abc'"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "error: --device cuda: CUDA is not available here"))
    return cases


def test_every_bad_flag_gets_a_message_before_the_model_loads(tmp_path, dataset, capsys, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("recallscope.models.load.load_model", no_loading)
    for flags, message in _bad_inputs(tmp_path, dataset):
        argv = ["run", "--out", str(tmp_path / "out"), "--dataset", str(dataset), *flags]
        assert main_exit(argv) == 2, flags
        err = capsys.readouterr().err
        assert message in err, (flags, err)
        assert "Traceback" not in err and "loading" not in err, flags
    assert not (tmp_path / "out").exists()


def test_debug_shows_the_traceback(tmp_path, dataset, capsys):
    argv = ["run", "--out", str(tmp_path / "out"), "--dataset", str(dataset), "--device", "banana"]
    assert main_exit(["--debug", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.rstrip().endswith("cuda:N or mps")


# -- odd encodings and a long prompt ------------------------------------------------------------------


def test_bom_and_latin1_files_run_with_the_bad_rows_reported(tiny_models, tmp_path, caplog):
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbfsubject,prompt,target\nFrance,The capital of France is,Paris\n")
    latin = tmp_path / "latin.jsonl"
    rows = [
        json.dumps(FACTS[1]).encode(),
        '{"subject": "Orléans", "prompt": "Orléans is in", "target": "France"}'.encode("latin-1"),
    ]
    latin.write_bytes(b"\n".join(rows) + b"\n")
    for path, subjects in ((bom, ["France"]), (latin, ["Germany"])):
        job = _job(tmp_path, path, out=tmp_path / path.stem)
        store = run_job(job, model=tiny_models("gpt2"), progress=False, report=False)
        assert list(store.read_facts().subject) == subjects
        assert store.read_table("logit_lens").fact_id.nunique() == 1
    assert f"skipped {latin.name}, row 2: not UTF-8" in caplog.text


def test_plan_measures_on_a_bounded_probe_whatever_the_prompt_length(tiny_models, tmp_path, monkeypatch):
    from recallscope.runner import plan as planning

    model = tiny_models("llama_gqa")
    n_ctx = model.hf_model.config.max_position_embeddings
    prompt = "ab " * ((n_ctx - 64) // 3) + "Tokyo is in"
    n_tokens = len(model.tokenizer(prompt).input_ids)
    assert 10 * planning.PROBE_TOKENS < n_tokens < n_ctx - 16
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"subject": "Tokyo", "prompt": prompt, "target": "Japan"}) + "\n")
    shapes = []
    original = planning.forward
    monkeypatch.setattr(
        planning, "forward", lambda m, ids, **kw: shapes.append(tuple(ids.shape)) or original(m, ids, **kw)
    )
    result = planning.plan_job(_job(tmp_path, path), model=model, log=lambda m: None)
    assert result.methods[0].cost.token_blocks >= n_tokens * model.n_layers  # the long prompt's work counts
    assert (
        shapes
        and max(rows * tokens for rows, tokens in shapes) <= planning.PROBE_ROWS * planning.PROBE_TOKENS
    )


@pytest.mark.slow
def test_the_issue_reproduction_an_edited_target_is_not_kept_as_known(embedded_model, tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text(
        '{"subject":"France","prompt":"The capital of France is","target":"Paris"}\n'
        '{"subject":"Japan","prompt":"The capital of Japan is","target":"Tokyo"}\n'
    )
    job = Job(out=tmp_path / "E", dataset=str(path), limit=3, methods=("logit_lens",))
    store = run_job(job, model=embedded_model, progress=False, report=False)
    assert list(store.read_facts().subject) == ["France", "Japan"]
    path.write_text(path.read_text().replace("Paris", "Lyon"))
    store = run_job(job, model=embedded_model, progress=False, report=False)
    assert list(store.read_facts().subject) == ["Japan"]
    assert list(store.read_table("logit_lens").fact_id.unique()) == ["f/2"]


def test_plan_reports_a_damaged_chunk_but_moves_nothing(tiny_models, tmp_path, dataset, capsys):
    from recallscope.runner.plan import plan_job

    model = tiny_models("gpt2")
    job = _job(tmp_path, dataset)
    run_job(job, model=model, progress=False, report=False)
    victim = _chunk_file(job, "000002", "parquet")
    _truncate(victim)
    files = sorted(p for p in job.out.rglob("*") if p.is_file())
    capsys.readouterr()
    plan = plan_job(job, model=model, log=lambda m: None)
    assert [(m.facts - m.facts_done) for m in plan.methods] == [2]  # the damaged chunk's facts are to do
    assert "is damaged (" in capsys.readouterr().err
    assert sorted(p for p in job.out.rglob("*") if p.is_file()) == files


@pytest.mark.slow
def test_a_5k_token_prompt_plans_on_a_bounded_probe_and_runs(embedded_model, tmp_path, monkeypatch):
    from recallscope.runner import plan as planning

    prompt = "Paris is a city. " * 1250 + "The capital of France is"
    assert len(embedded_model.tokenizer(prompt).input_ids) > 5000
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"subject": "France", "prompt": prompt, "target": "Paris"}) + "\n")
    job = _job(tmp_path, path)
    shapes = []
    original = planning.forward
    monkeypatch.setattr(
        planning, "forward", lambda m, ids, **kw: shapes.append(tuple(ids.shape)) or original(m, ids, **kw)
    )
    plan = planning.plan_job(job, model=embedded_model, log=lambda m: None)
    assert max(rows * tokens for rows, tokens in shapes) <= planning.PROBE_ROWS * planning.PROBE_TOKENS
    assert plan.methods[0].cost.token_blocks >= 5000 * embedded_model.n_layers
    store = run_job(job, model=embedded_model, progress=False, report=False)
    assert store.read_table("logit_lens").fact_id.unique().tolist() == ["long/1"]
