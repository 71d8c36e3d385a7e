"""The command line, run in-process."""

from __future__ import annotations

import subprocess
import sys

import pytest

import recallscope as rs
from recallscope.cli import main


def run(argv, capsys):
    with pytest.raises(SystemExit) as done:
        main(argv)
    out = capsys.readouterr()
    return done.value.code, out.out, out.err


def test_help(capsys):
    code, out, _ = run(["--help"], capsys)
    assert code == 0 and "check-model" in out and "run" in out


def test_check_model_help(capsys):
    code, out, _ = run(["check-model", "--help"], capsys)
    assert code == 0 and "conformance checks" in out


def test_missing_model_is_a_clean_error(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run(["check-model", "nobody/no-such-model"], capsys)
    assert code == 2
    assert "error: model 'nobody/no-such-model' is not available" in err
    assert "Traceback" not in err


def test_run_needs_an_output_folder(capsys):
    code, _, err = run(["run"], capsys)
    assert code == 2 and "--out" in err


def test_python_dash_m():
    out = subprocess.run([sys.executable, "-m", "recallscope", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "check-model" in out.stdout


@pytest.mark.embedded
@pytest.mark.slow
def test_check_model_on_the_embedded_model(capsys, embedded_model):
    code, out, _ = run(["check-model", "smollm2-135m", "--device", "cpu"], capsys)
    assert code == 0, out
    assert "check-model smollm2-135m (spec: discovered)" in out
    n = len(rs.check.CHECKS)
    assert f"{n}/{n} checks passed" in out
    assert "spec (discovered): llama" in out and "mlp_gate = mlp.gate_proj" in out


def test_run_flag_errors(capsys, tmp_path):
    code, _, err = run(["run", "--limit", "some", "--out", str(tmp_path)], capsys)
    assert code == 2 and "expected a number of facts or 'all', got 'some'" in err
    code, _, err = run(["plan", "--methods", "logit_lenz", "--out", str(tmp_path)], capsys)
    assert code == 2 and "did you mean 'logit_lens'" in err
    config = tmp_path / "c.toml"
    config.write_text("[causal_tracing]\nsampels = 3\n")
    code, _, err = run(["run", "--config", str(config), "--out", str(tmp_path)], capsys)
    assert code == 2 and "has no field 'sampels'; did you mean 'samples'" in err


def test_methods_lists_the_registry(capsys):
    code, out, _ = run(["methods"], capsys)
    assert code == 0 and "causal_tracing" in out and "rome, yan_jia" in out and "logit_lens" in out
    assert "geva2023" in out and "lv2024" in out  # the paper folder of each method


def test_datasets_lists_the_builtin_sets(capsys):
    code, out, _ = run(["datasets"], capsys)
    assert code == 0
    assert "country_capital" in out and "lv_capitals" in out and "artist_songs" in out
    assert "single-answer facts in" in out


@pytest.mark.embedded
def test_datasets_known_by_the_embedded_model(capsys, embedded_model):
    code, out, _ = run(["datasets", "--known-by", "smollm2-135m", "--device", "cpu"], capsys)
    assert code == 0, out
    assert "facts smollm2-135m knows (first_token, templates=rotate)" in out
    assert "country_capital" in out.split("knows")[1] and "total:" in out
