"""Figure checks from matplotlib's own layout: blank figures are named, legends never cover titles,
drawn points or other axes; on constructed figures and on every figure of a tiny run's report."""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from recallscope.report import figures  # noqa: E402
from recallscope.report.layout import blank_reason, overlaps, place_legends  # noqa: E402
from report.browser import chromium_unavailable_reason, open_in_chromium, pick_fact  # noqa: E402

X = np.linspace(0, 1, 200)


def test_blank_figures_are_named():
    fig, ax = plt.subplots()
    ax.plot(X, np.zeros_like(X), label="flat")
    ax.axhline(0, color="k")
    assert blank_reason(fig) == "every value is 0"
    fig, ax = plt.subplots()
    ax.imshow(np.full((3, 4), np.nan))
    assert blank_reason(fig) == "every value is missing"
    fig, ax = plt.subplots()
    ax.bar([0, 1], [0.0, 0.0])
    assert blank_reason(fig) == "every value is 0"
    ax.bar([2], [0.5])
    assert blank_reason(fig) == ""
    plt.close("all")


def test_a_legend_over_the_title_or_the_data_is_moved():
    fig, ax = plt.subplots()
    ax.plot(X, 0.95 + 0 * X, label="a flat line at the top")
    ax.plot(X, X, label="a diagonal")
    ax.set_title("a title")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, 1.12))
    assert any("title" in problem for problem in overlaps(fig))
    place_legends(fig)
    assert overlaps(fig) == []
    fig, axes = plt.subplots(1, 2)
    for ax in axes:
        for k in range(6):
            ax.plot(X, np.sin(9 * X + k), label=f"curve {k}")
        ax.legend(loc="center")
        ax.set_title("dense")
    assert any("drawn points" in problem for problem in overlaps(fig))
    place_legends(fig)
    assert overlaps(fig) == []
    plt.close("all")


def test_titles_that_run_into_each_other_are_reported():
    fig, axes = plt.subplots(1, 2, figsize=(6, 3))
    for ax in axes:
        ax.plot(X, X)
        ax.set_title("a title far too long for half of a six-inch figure, running into its neighbour")
    assert any("overlap" in problem for problem in overlaps(fig))


def test_save_figure_records_blank_and_overlaps(tmp_path):
    fig, ax = plt.subplots()
    ax.plot(X, np.zeros_like(X))
    saved = figures.save_figure(fig, tmp_path, "flat", "A flat line")
    assert saved.blank == "every value is 0" and saved.overlaps == () and saved.png.exists()


def test_every_figure_of_a_tiny_report_keeps_its_legends_clear(tiny_models, tmp_path, monkeypatch):
    """A tiny run of the methods whose figures have legends: after placement, no legend of any figure
    covers a title, drawn points or other axes, and every figure has a size."""
    from recallscope.runner import Job, run_job

    facts = [
        {"subject": "France", "prompt": "The capital of France is", "target": "Paris"},
        {"subject": "Germany", "prompt": "The capital of Germany is", "target": "Berlin"},
        {"subject": "Rome", "prompt": "Rome is the capital of", "target": "Italy"},
    ]
    path = tmp_path / "facts.jsonl"
    path.write_text("\n".join(json.dumps(f) for f in facts) + "\n")
    seen = []
    real = figures.overlaps

    def record(fig, **options):
        found = real(fig, **options)
        assert found == real(fig)  # the drawing the legend placement left is the figure as it is
        seen.append((fig.axes[0].get_title() if fig.axes else "", found))
        return found

    monkeypatch.setattr(figures, "overlaps", record)
    methods = ("logit_lens", "attention_knockout", "causal_tracing", "early_decoding", "logprob_attribution")
    configs = {"causal_tracing": {"samples": 2, "kinds": ["hidden", "mlp"], "window": 3}}
    job = Job(out=tmp_path / "run", dataset=str(path), known_only=False, methods=methods, configs=configs)
    store = run_job(job, model=tiny_models("gpt2"), progress=False, report=True)
    assert len(seen) >= 5 and all(found == [] for _, found in seen), seen
    html = (store.root / "report.html").read_text()
    assert 'width="0"' not in html and 'height="0"' not in html
    assert (store.root / "scorecard.parquet").exists() and "Where the methods agree" in html
    assert html.count('<details class="paper" open>') == 4  # localization, Geva, Yan & Jia, Yu
    if chromium_unavailable_reason() is None:
        page = open_in_chromium(store.root / "report.html")
        assert page.console_errors == [] and page.requests_outside == []
        assert page.document_width <= page.viewport_width == 1280  # no sideways scrolling
        assert all(image["naturalWidth"] > 0 and image["naturalHeight"] > 0 for image in page.images)
        states = pick_fact(store.root / "report.html", "fact-1")
        assert [e["shown"] for e in states["before"]] == [True, True, True] and states["errors"] == []
        assert [(e["shown"], e["open"]) for e in states["picked"]] == [
            (False, False),
            (True, True),
            (False, False),
        ]
        assert all(e["shown"] and not e["open"] for e in states["all"])


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")
