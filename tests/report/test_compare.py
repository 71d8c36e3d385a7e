"""`recallscope compare`: two runs of tiny models of different depths give one report with both
scorecards and their curves on one relative depth axis; labels are escaped; bad input is refused."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from recallscope.errors import RecallscopeError
from recallscope.report.claims import CLAIMS
from recallscope.report.compare import write_comparison
from recallscope.runner import Job, run_job
from tiny import tiny_model

FACTS = [
    {"subject": "France", "prompt": "The capital of France is", "target": "Paris"},
    {"subject": "Germany", "prompt": "The capital of Germany is", "target": "Berlin"},
    {"subject": "Rome", "prompt": "Rome is the capital of", "target": "Italy"},
]
METHODS = ("logit_lens", "attention_knockout", "causal_tracing", "logprob_attribution")
CONFIGS = {"causal_tracing": {"samples": 2, "kinds": ["mlp", "attn"], "window": 3}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    path = root / "facts.jsonl"
    path.write_text("\n".join(json.dumps(f) for f in FACTS) + "\n")
    folders = []
    for name, layers in (("gpt2", 3), ("llama_gqa", 5)):
        overrides = {"n_layer": layers} if name == "gpt2" else {"num_hidden_layers": layers}
        model = tiny_model(name, **overrides)
        job = Job(out=root / name, dataset=str(path), known_only=False, methods=METHODS, configs=CONFIGS)
        run_job(job, model=model, progress=False, report=False)
        folders.append(root / name)
    return folders


def test_two_runs_give_one_report_with_both_scorecards(runs, tmp_path):
    labels = ["three <b>layers</b>", "five layers"]
    path = write_comparison(runs, tmp_path / "cmp", labels=labels)
    html = path.read_text()
    assert "three &lt;b&gt;layers&lt;/b&gt;" in html and "<b>layers</b>" not in html
    assert "<script" not in html.lower()
    card = pd.read_parquet(tmp_path / "cmp" / "scorecard.parquet")
    assert len(card) == 2 * len(CLAIMS) and set(card["run"]) == set(labels)
    assert set(card.loc[card["key"] == "rome.sites", "verdict"]) <= {"holds", "does not hold", "inconclusive"}
    assert html.count('class="verdict') == 2 * len(CLAIMS)
    figures = sorted(p.name for p in (tmp_path / "cmp" / "figures").glob("*.png"))
    assert len(figures) == 7 and html.count("<img ") + html.count("not drawn") == 7


def test_depth_puts_models_of_different_depths_on_one_axis(runs, tmp_path):
    from recallscope.report import compare

    captured = []
    real = compare.mean_curves

    def spy(frame, **kwargs):
        captured.append(frame)
        return real(frame, **kwargs)

    compare.mean_curves = spy
    try:
        write_comparison(runs, tmp_path / "cmp")
    finally:
        compare.mean_curves = real
    lens = next(f for f in captured if "prob" in f.columns)
    depths = lens.groupby("run")["depth"].agg(["min", "max", "nunique"])
    assert (depths["min"] == 0).all() and (depths["max"] == 1).all()
    assert sorted(depths["nunique"]) == [3, 5]  # 3 and 5 layers, each spread over 0..1


def test_default_labels_and_errors(runs, tmp_path):
    html = write_comparison(runs, tmp_path / "cmp").read_text()
    assert "GPT2LMHeadModel · facts" in html and "LlamaForCausalLM · facts" in html  # model · dataset
    with pytest.raises(RecallscopeError, match="at least two run folders"):
        write_comparison(runs[:1], tmp_path / "x")
    with pytest.raises(RecallscopeError, match="not a recallscope run folder"):
        write_comparison([runs[0], tmp_path], tmp_path / "x")
    with pytest.raises(RecallscopeError, match="one --label per run"):
        write_comparison(runs, tmp_path / "x", labels=["only one"])
