"""The main job end to end on the embedded model: CLI run, resume after SIGKILL, escaped report, browser."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import load_file

from recallscope.methods import REGISTRY
from recallscope.report.claims import CLAIMS
from report.browser import chromium_unavailable_reason, open_in_chromium
from results import assert_same_result_files

pytestmark = [pytest.mark.embedded, pytest.mark.slow]

FAST = {
    "causal_tracing": {"samples": 1, "kinds": ["hidden", "mlp"]},
    "logprob_attribution": {"n_top": 20, "position_heads": 2},
    "query_attribution": {"n_value_neurons": 5, "n_value_units": 5, "n_query_neurons": 20, "n_show": 2},
    "neuron_ablation": {"budgets": ["ffn:5", "attn:5+ffn:5"], "random_seeds": 1},
}
XSS = "<script>alert(1)</script>"


def recallscope(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "recallscope", *map(str, args)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900, **kwargs)
    if check and done.returncode != 0:
        raise AssertionError(f"{command} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


@pytest.fixture(scope="module")
def fast_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "fast.json"
    path.write_text(json.dumps(FAST))
    return path


@pytest.fixture(scope="module")
def demo(tmp_path_factory, fast_config):
    """A finished CLI run: 3 known built-in facts, every method."""
    out = tmp_path_factory.mktemp("runs") / "demo"
    done = recallscope("run", "--limit", 3, "--config", fast_config, "--out", out)
    return out, done


def test_cli_run_writes_the_output_contract(demo):
    out, done = demo
    assert "report:" in done.stdout and (out / "report.html").exists()
    card = pd.read_parquet(out / "scorecard.parquet")
    assert set(card["key"]) == {claim.key for claim in CLAIMS} and "not run" not in set(card["verdict"])
    assert "findings (scorecard.parquet" in done.stdout and "rome.sites: " in done.stdout
    html = (out / "report.html").read_text()
    assert html.index('id="findings"') < html.index('id="summary"') < html.index('id="causal_tracing"')
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["dataset"]["n_facts"] == 3
    assert manifest["model"]["name"] == "smollm2-135m" and manifest["model"]["file_sha256"]
    assert set(manifest["methods"]) == set(REGISTRY)
    geva = {
        "attributes_rate": 3 * 5 * 31,  # facts × positions × (layers + final residual)
        "sublayer_knockout": 3 * (1 + 2 * 26),  # facts × (clean + 2 sublayers × starts 0..25)
        "extraction_rate": 3 * 30,
        "early_patching": 3 * 5 * 3 * 30,  # facts × source layers × position sets × layers
        "head_mappings": 3 * 30 * 9,  # facts × layers × heads
        "logprob_attribution": 3 * 30 * 2,  # facts × layers × (attn, mlp)
        "query_attribution": 3 * 2 * 61,  # facts × (ffn_value, attn_unit) × (embed + 2 × 30 layers)
        "neuron_ablation": 3 * (5 + 1) * 2,  # facts × (5 methods + 1 random seed) × budgets
        "early_decoding": 3 * 2 * 30 * 2,  # facts × (attn, mlp) × layers × (subject, answer)
        "token_lens": 3 * 30 * 3 * 2,  # facts × layers × (subject, last token, other) × tracked
        "span_knockout_mlp": 3 * 2 * 30 * 2,  # facts × (subject, last token) × layers × tracked
        "head_promotion": 3 * 30 * 9 * 2,  # facts × layers × heads × tracked
        "argument_heads": 3 * 30 * 9,  # facts × layers × heads
        "mlp_regression": 3 * 30 * 9,  # facts × MLP layers × feeding heads
        "function_application": 3 * 30 * 2,  # facts × layers × (mlp_out, remainder)
    }
    for method, n_rows in geva.items():
        assert len(pd.read_parquet(out / "results" / f"{method}.parquet")) == n_rows, method
    knockout = pd.read_parquet(out / "results" / "attention_knockout.parquet")
    assert len(knockout) == 3 * 3 * 30 and (knockout["clean_prob"] > 0).all()
    trace = pd.read_parquet(out / "results" / "causal_tracing.parquet")
    assert {"fact_id", "kind", "position", "layer", "token", "bucket", "score", "indirect_effect"} <= set(
        trace
    )
    assert trace["fact_id"].nunique() == 3 and set(trace["kind"]) == {"hidden", "mlp"}
    lens = pd.read_parquet(out / "results" / "logit_lens.parquet")
    assert {"fact_id", "site", "layer", "position", "target", "prob", "rank"} <= set(lens)
    top = lens[(lens.site == "resid_post") & (lens.layer == 29) & (lens.target == "top1")]
    assert (top["rank"] == 0).all()  # known facts: the last layer's lens is the model's own prediction
    assert len(pd.read_parquet(out / "results" / "logit_lens.topk.parquet")) == 3 * 3 * 30
    arrays = load_file(str(out / "results" / "causal_tracing.safetensors"))
    assert len(arrays) == 3 * 2 and all(a.shape[1] == 30 for a in arrays.values())
    figures = {p.name for p in (out / "figures").iterdir()}
    assert {
        "causal_tracing_average_mlp.png",
        "causal_tracing_average_mlp.svg",
        "logit_lens_curves.png",
        "attributes_rate_curves.png",
        "sublayer_knockout_curves.png",
        "extraction_rate_layers.png",
        "early_patching_bars.png",
        "head_mappings_grid.png",
        "logprob_attribution_layers.png",
        "logprob_attribution_heads.png",
        "logprob_attribution_subvalue_layers.png",
        "query_attribution_ffn_value.png",
        "query_attribution_attn_unit.png",
        "neuron_ablation_bars.png",
        "early_decoding_steps.png",
        "token_lens_steps.png",
        "span_knockout_mlp_steps.png",
        "head_promotion_scatter.png",
        "argument_heads_patching.png",
        "mlp_regression_coef.png",
        "function_application_relation_rank.png",
    } <= figures
    anti = manifest["methods"]["anti_overconfidence"]  # 3 facts cannot be split into 2 + 2
    assert len(anti["skipped"]) == 3 and all("at least 2 facts" in reason for _, reason in anti["skipped"])
    assert "at least 2 facts" in (out / "report.html").read_text()
    neurons = pd.read_parquet(out / "results" / "logprob_attribution.neurons.parquet")
    assert len(neurons) == 3 * 2 * 20 and neurons["logprob_increase"].notna().all()
    facts = pd.read_parquet(out / "facts.parquet")
    assert list(facts["fact_id"]) == list(dict.fromkeys(trace["fact_id"]))


def test_report_rebuilds_from_stored_results(demo, tmp_path):
    out, _ = demo
    before = (out / "report.html").read_text()
    (out / "report.html").unlink()
    done = recallscope("report", out)
    assert "report.html" in done.stdout and (out / "report.html").read_text() == before
    missing = recallscope("report", tmp_path, check=False)
    assert missing.returncode == 2 and "no manifest.json" in missing.stderr


def test_plan_and_methods(demo, fast_config):
    out, _ = demo
    planned = recallscope("plan", "--limit", 3, "--config", fast_config, "--out", out).stdout
    assert "causal_tracing" in planned and "peak memory" in planned
    line = next(x for x in planned.splitlines() if x.startswith("causal_tracing"))
    assert line.split()[1:3] == ["0", "0"]  # already done: nothing left to run
    fresh = recallscope("plan", "--limit", 5, "--config", fast_config, "--out", out / "new").stdout
    assert int(next(x for x in fresh.splitlines() if x.startswith("causal_tracing")).split()[2]) > 5
    listed = recallscope("methods").stdout
    assert "causal_tracing" in listed and "logit_lens" in listed and "rome" in listed
    bad = recallscope("run", "--methods", "causal_tracin", "--out", out / "x", check=False)
    assert bad.returncode == 2 and "did you mean 'causal_tracing'" in bad.stderr


def test_resume_after_sigkill_gives_identical_results(demo, tmp_path, fast_config):
    """Killed in the middle of causal tracing (the last method, one fact per chunk), then resumed: the
    results equal the uninterrupted demo run's (same facts and flags), bit for bit."""
    flags = ["--limit", 3, "--config", fast_config, "--no-report"]
    reference = demo[0]
    killed = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "recallscope", "run", *map(str, flags), "--out", str(killed)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    chunks = killed / "chunks"
    while time.monotonic() < deadline and process.poll() is None:
        done = list(chunks.glob("causal_tracing-*/*.json")) if chunks.exists() else []
        if len(done) >= 1:
            break
        time.sleep(0.02)
    assert process.poll() is None, "the run finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert json.loads((killed / "manifest.json").read_text())["status"] == "running"
    assert not (killed / "results" / "causal_tracing.parquet").exists()
    recallscope("run", *flags, "--out", killed)
    manifest = json.loads((killed / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["methods"]["causal_tracing"]["n_facts"] == 3
    files = assert_same_result_files(killed, reference)
    assert sum(name.endswith(".parquet") for name in files) >= 13


def test_run_with_layers_offloaded_to_disk_equals_the_in_memory_run(demo, fast_config, tmp_path):
    """``--device-map auto`` with 300 MB of CPU memory: 20 of the 30 blocks live on disk."""
    methods = "logit_lens,attention_knockout,causal_tracing,mlp_regression"
    out = tmp_path / "offloaded"
    flags = ["--limit", 3, "--methods", methods, "--config", fast_config, "--no-report"]
    recallscope("run", *flags, "--device-map", "auto", "--max-memory", "cpu=300MB", "--out", out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["device_map"]["disk"] >= 10
    for method in methods.split(","):
        expected = pd.read_parquet(demo[0] / "results" / f"{method}.parquet")
        pd.testing.assert_frame_equal(pd.read_parquet(out / "results" / f"{method}.parquet"), expected)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, fast_config):
    """A run over a dataset whose subject is a script tag, plus a bad row."""
    folder = tmp_path_factory.mktemp("hostile")
    rows = [
        {"subject": XSS, "prompt": f"The capital of {XSS} is", "target": "Paris", "relation": "<b>rel</b>"},
        {"subject": "France", "prompt": "The capital of France is", "target": "Paris"},
        {"subject": "Spain", "prompt": "The capital of Spain is"},
    ]
    (folder / "facts.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = folder / "run"
    recallscope(
        "run", "--dataset", folder / "facts.jsonl", "--all-facts", "--config", fast_config, "--out", out
    )
    return out


def test_report_escapes_model_and_dataset_strings(hostile):
    html = (hostile / "report.html").read_text()
    assert XSS not in html and "<b>rel</b>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert html.lower().count("<script") == 1  # the fact picker's, and no other
    manifest = json.loads((hostile / "manifest.json").read_text())
    assert manifest["dataset"]["n_facts"] == 2 and "row 3" in manifest["dataset"]["skipped"][0]
    assert "row 3" in html


def test_report_opens_in_chromium(hostile):
    reason = chromium_unavailable_reason()
    if reason:
        pytest.skip(reason)
    page = open_in_chromium(hostile / "report.html")
    assert page.console_errors == []
    assert page.requests_outside == []
    assert len(page.images) >= 8  # 2 averages, lens and knockout curves, per fact: trace and token map
    for image in page.images:
        assert image["naturalWidth"] > 0 and image["naturalHeight"] > 0, image["alt"]
    assert XSS in page.text  # shown as text, not run
    assert "smollm2-135m" in page.title
    assert page.document_width <= page.viewport_width == 1280  # no sideways scrolling
    assert "Scorecard" in page.text and page.text.index("Findings") < page.text.index("Summary")


def test_one_to_many_run_gives_the_yan_jia_figures_and_summary(tmp_path):
    """`run --dataset country_cities`: the model's own lists, 3 steps each, the Y&J suite and its report."""
    config = tmp_path / "o2m.json"
    config.write_text(json.dumps({"causal_tracing": {"samples": 1, "kinds": ["mlp"], "target": "gold"}}))
    methods = "early_decoding,token_lens,span_knockout_mlp,head_promotion,causal_tracing"
    out = tmp_path / "o2m"
    recallscope(
        "run",
        "--dataset",
        "country_cities",
        "--methods",
        methods,
        "--limit",
        2,
        "--config",
        config,
        "--out",
        out,
    )
    lists = json.loads((out / "one_to_many.json").read_text())
    assert lists["report"]["kept"] == 2 and len(lists["kept"]) == 2
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dataset"]["n_facts"] == 6 and manifest["status"] == "complete"
    early = pd.read_parquet(out / "results" / "early_decoding.parquet")
    assert len(early) == 6 * 2 * 30 * 4 and set(early["step"]) == {1, 2, 3}
    assert set(early["role"]) == {"subject", "previous", "current", "future"}
    lens = pd.read_parquet(out / "results" / "token_lens.parquet")
    assert len(lens) == 2 * (3 + 4 + 5) * 30 * 4  # parts: subject, answers so far, last token, other
    keys = ["fact_id", "layer", "tracked"]
    summed = lens.groupby(keys)["logit"].sum()
    attn = early[early["site"] == "attn"].set_index(keys)["logit"]
    np.testing.assert_allclose(summed.sort_index(), attn.sort_index(), atol=2e-4)  # the parts add up
    knockout = pd.read_parquet(out / "results" / "span_knockout_mlp.parquet")
    assert len(knockout) == 2 * (2 + 3 + 4) * 30 * 4
    heads = pd.read_parquet(out / "results" / "head_promotion.parquet")
    assert len(heads) == 6 * 30 * 9 * 4
    trace = pd.read_parquet(out / "results" / "causal_tracing.parquet")
    assert trace.groupby("fact_id")["span"].nunique().sort_values().tolist() == [1, 1, 2, 2, 3, 3]
    figures = {p.name for p in (out / "figures").iterdir()}
    assert {
        "early_decoding_steps.png",
        "token_lens_steps.png",
        "span_knockout_mlp_steps.png",
        "head_promotion_scatter.png",
        "causal_tracing_average_mlp.png",
        "causal_tracing_average_mlp_answer_1_step2.png",
        "causal_tracing_average_mlp_answer_2_step3.png",
    } <= figures
    html = (out / "report.html").read_text()
    assert "Step 2 (2 facts): MLPs in L15–29" in html and "Promote-then-suppress:" in html
    card = pd.read_parquet(out / "scorecard.parquet").set_index("key")
    judged = {"holds", "does not hold", "inconclusive"}
    assert card.loc["yan_jia.suppress", "verdict"] in judged and card.loc["yan_jia.promote", "n_facts"] == 6


def test_lv_run_gives_the_four_analyses_zero_and_one_shot(tmp_path):
    """`run --dataset lv_capitals --shots 0,1`: Lv et al.'s suite on known capitals, zero- and one-shot."""
    methods = "argument_heads,mlp_regression,function_application,anti_overconfidence"
    out = tmp_path / "lv"
    flags = ["--dataset", "lv_capitals", "--methods", methods, "--limit", 4, "--shots", "0,1"]
    recallscope("run", *flags, "--out", out)
    facts = pd.read_parquet(out / "facts.parquet")
    n = len(facts)
    assert set(facts["shots"]) == {0, 1} and 6 <= n <= 8 and facts["base_id"].nunique() == 4
    one_shot = facts[facts["shots"] == 1]
    assert one_shot["prompt"].str.match(r"^The capital of \w+ is \w+\. ").all()
    heads = pd.read_parquet(out / "results" / "argument_heads.parquet")
    assert len(heads) == n * 30 * 9 and heads["delta"].notna().all()
    assert len(pd.read_parquet(out / "results" / "argument_heads.mlp.parquet")) == n * 30
    assert len(pd.read_parquet(out / "results" / "mlp_regression.parquet")) == n * 30 * 9
    fit = pd.read_parquet(out / "results" / "mlp_regression.fit.parquet")
    assert len(fit) == n * 30 and fit["r2"].between(-1e-9, 1 + 1e-9).all()
    function = pd.read_parquet(out / "results" / "function_application.parquet")
    assert len(function) == n * 30 * 2 and function["follows"].notna().all()
    assert (function["relation_rank"] <= function["n_candidates"]).all()
    anti = pd.read_parquet(out / "results" / "anti_overconfidence.parquet")
    assert (
        set(anti["split"]) == {"train", "heldout"} and anti.groupby("fact_id")["split"].nunique().max() == 1
    )
    per_fact = pd.read_parquet(out / "results" / "anti_overconfidence.facts.parquet").merge(
        facts, on="fact_id"
    )
    assert len(per_fact) == n and per_fact.groupby("base_id")["split"].nunique().max() == 1
    mitigation = pd.read_parquet(out / "results" / "anti_overconfidence.mitigation.parquet")
    assert len(mitigation) == 1 and mitigation["perplexity_before"].iloc[0] > 1
    figures = {p.name for p in (out / "figures").iterdir()}
    for name in (
        "argument_heads_patching",
        "argument_heads_r",
        "mlp_regression_coef",
        "function_application_shift",
    ):
        assert {f"{name}_0shot.png", f"{name}_1shot.png"} <= figures, name
    assert "anti_overconfidence_components.png" in figures
    html = (out / "report.html").read_text()
    assert "Argument-passing heads" in html and "pass the argument (1-shot)" in html
    assert "Held-out mean probability" in html or "No candidate" in html
