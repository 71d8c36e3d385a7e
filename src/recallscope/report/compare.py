"""One report across runs: their scorecards side by side and the main curves overlaid on a relative
depth axis, so that models of different depths, datasets, corruptions or configs can be set against
each other::

    recallscope compare runs/smollm runs/gpt2 --out runs/compare

:func:`write_comparison` reads each run folder's stored tables only (no model) and writes
``OUT/comparison.html`` (one file, styles and PNGs inlined, no script, no network; every string from
a run escaped), ``OUT/scorecard.parquet`` (every run's scorecard, with a ``run`` column) and
``OUT/figures/``. Depth is ``layer / (n_layers − 1)``: 0 the first block, 1 the last.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from recallscope.errors import RecallscopeError
from recallscope.report.figures import FigureFile, mean_curves, save_figure
from recallscope.report.scorecard import scorecard
from recallscope.runner.store import Store, atomic_write

__all__ = ["write_comparison", "CURVES", "Curve"]


@dataclass(frozen=True)
class Curve:
    """One overlaid figure: ``y`` of ``method``'s table, rows picked by ``rows``, per run."""

    method: str
    title: str
    rows: Callable[[pd.DataFrame], pd.Series]
    y: str
    ylabel: str


def _first_trace(frame: pd.DataFrame) -> pd.Series:
    """Causal-tracing rows of the first corruption, denoising (all rows of older runs)."""
    keep = pd.Series(True, index=frame.index)
    for column, wanted in (("corruption", None), ("direction", "denoising")):
        if column in frame.columns:
            pick = wanted if wanted in set(frame[column]) else frame[column].iloc[0]
            keep &= frame[column] == pick
    return keep


CURVES = (
    Curve(
        "causal_tracing", "MLP at the last subject token (causal tracing)",
        lambda f: _first_trace(f) & (f["kind"] == "mlp") & (f["bucket"] == "last subject"),
        "indirect_effect", "indirect effect",
    ),
    Curve(
        "causal_tracing", "Attention at the last token (causal tracing)",
        lambda f: _first_trace(f) & (f["kind"] == "attn") & (f["bucket"] == "last token"),
        "indirect_effect", "indirect effect",
    ),
    Curve(
        "attention_knockout", "Subject → last position (attention knockout)",
        lambda f: f["source"] == "subject", "change_pct", "% change in p(prediction)",
    ),
    Curve(
        "attention_knockout", "Non-subject → last position (attention knockout)",
        lambda f: f["source"] == "non_subject", "change_pct", "% change in p(prediction)",
    ),
    Curve(
        "logprob_attribution", "Attention layers' log-probability increase",
        lambda f: f["sublayer"] == "attn", "logprob_increase", "log-probability increase",
    ),
    Curve(
        "logprob_attribution", "MLP layers' log-probability increase",
        lambda f: f["sublayer"] == "mlp", "logprob_increase", "log-probability increase",
    ),
    Curve(
        "logit_lens", "The answer's probability in the residual stream (logit lens)",
        lambda f: (f["site"] == "resid_post") & (f["target"] == "gold") & (f["position"] == "last"),
        "prob", "p(answer)",
    ),
)  # fmt: skip
"""The overlaid figures, each drawn when at least one run has its method."""


@dataclass(frozen=True)
class _Run:
    label: str
    store: Store
    manifest: dict
    card: pd.DataFrame


def _n_layers(run: _Run, frame: pd.DataFrame) -> int:
    dims = run.manifest.get("model", {}).get("dims", {})
    return int(dims.get("n_layers") or frame["layer"].max() + 1)


def _labels(stores: Sequence[Store], manifests: Sequence[dict], given: Sequence[str] | None) -> list[str]:
    if given:
        if len(given) != len(stores):
            raise RecallscopeError(f"{len(given)} labels for {len(stores)} runs: give one --label per run")
        return list(given)
    labels = [f"{m['model']['name']} · {m['dataset']['name']}" for m in manifests]
    if len(set(labels)) < len(labels):
        labels = [f"{label} · {s.root.name}" for label, s in zip(labels, stores, strict=True)]
    if len(set(labels)) < len(labels):
        labels = [f"{label} ({i + 1})" for i, label in enumerate(labels)]
    return labels


def _runs(run_dirs: Sequence[str | os.PathLike], labels: Sequence[str] | None) -> list[_Run]:
    if len(run_dirs) < 2:
        raise RecallscopeError("compare needs at least two run folders")
    stores = [Store(d) for d in run_dirs]
    manifests = [s.read_manifest() for s in stores]
    for store, manifest in zip(stores, manifests, strict=True):
        if not manifest:
            raise RecallscopeError(
                f"{store.root} is not a recallscope run folder (no manifest.json); create one with "
                f"`recallscope run --out {store.root}`"
            )
    names = _labels(stores, manifests, labels)
    return [_Run(n, s, m, scorecard(s)) for n, s, m in zip(names, stores, manifests, strict=True)]


def _overlay(runs: list[_Run], curve: Curve, folder: Path, index: int) -> FigureFile | None:
    frames = []
    for run in runs:
        if curve.method not in run.store.methods():
            continue
        table = run.store.read_table(curve.method)
        rows = table[curve.rows(table)]
        if rows.empty:
            continue
        depth = rows["layer"] / max(1, _n_layers(run, table) - 1)
        frames.append(rows.assign(run=run.label, depth=depth.round(6))[["run", "fact_id", "depth", curve.y]])
    if not frames:
        return None
    frame = pd.concat(frames, ignore_index=True)
    fig = mean_curves(
        frame, y=curve.y, group="run", x="depth", xlabel="relative depth (layer / (layers − 1))",
        ylabel=curve.ylabel, title=f"{curve.title}: mean over facts, 95% band",
    )  # fmt: skip
    return save_figure(fig, folder, f"compare_{index:02d}_{curve.method}", curve.title)


def _scorecards(runs: list[_Run]) -> tuple[pd.DataFrame, list[dict]]:
    """Every run's scorecard (long, with ``run``), and one row per claim with a cell per run."""
    long = pd.concat([run.card.assign(run=run.label) for run in runs], ignore_index=True)
    rows = []
    for key, claim in long.groupby("key", sort=False):
        first = claim.iloc[0]
        cells = [claim[claim["run"] == run.label].iloc[0].to_dict() for run in runs]
        rows.append({"paper": first["paper"], "statement": first["statement"], "method": first["method"],
                     "cells": cells, "key": key})  # fmt: skip
    return long, rows


def write_comparison(
    run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike, labels: Sequence[str] | None = None
) -> Path:
    """Write ``out/comparison.html``, ``out/scorecard.parquet`` and ``out/figures/`` for the runs
    (module docstring); return the HTML's path.
    """
    from recallscope.report import _template

    runs = _runs(run_dirs, labels)
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    long, claims = _scorecards(runs)
    atomic_write(root / "scorecard.parquet", lambda p: long.to_parquet(p, index=False))
    figures = [f for i, c in enumerate(CURVES) if (f := _overlay(runs, c, root / "figures", i)) is not None]
    html = _template("comparison.html.j2").render(
        runs=[{"label": r.label, "root": str(r.store.root), "manifest": r.manifest} for r in runs],
        claims=claims,
        figures=figures,
        rule=long["rule"].iloc[0],
    )
    path = root / "comparison.html"
    atomic_write(path, lambda p: p.write_text(html, encoding="utf-8"))
    return path
