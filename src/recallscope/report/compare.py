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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from recallscope.errors import RecallscopeError
from recallscope.methods.general.summaries import first_trace
from recallscope.report.figures import FigureFile, mean_curves, save_figure
from recallscope.report.scorecard import scorecard
from recallscope.runner.store import Store, atomic_write

__all__ = ["write_comparison", "CURVES", "Curve"]


@dataclass(frozen=True)
class Curve:
    """One overlaid figure: ``y`` of ``method``'s rows whose columns equal ``where``, per run (causal
    tracing: its first corruption, denoising, :func:`~recallscope.methods.general.summaries.first_trace`).
    """

    method: str
    title: str
    where: tuple[tuple[str, str], ...]
    y: str
    ylabel: str

    def rows(self, table: pd.DataFrame) -> pd.DataFrame:
        if self.method == "causal_tracing":
            table = first_trace(table)
        keep = pd.Series(True, index=table.index)
        for column, value in self.where:
            keep &= table[column] == value
        return table[keep]


_KNOCKOUT = ("change_pct", "% change in p(prediction)")
_LOGPROB = ("logprob_increase", "log-probability increase")

CURVES = (
    Curve("causal_tracing", "MLP at the last subject token (causal tracing)",
          (("kind", "mlp"), ("bucket", "last subject")), "indirect_effect", "indirect effect"),
    Curve("causal_tracing", "Attention at the last token (causal tracing)",
          (("kind", "attn"), ("bucket", "last token")), "indirect_effect", "indirect effect"),
    Curve("attention_knockout", "Subject → last position (attention knockout)",
          (("source", "subject"),), *_KNOCKOUT),
    Curve("attention_knockout", "Non-subject → last position (attention knockout)",
          (("source", "non_subject"),), *_KNOCKOUT),
    Curve("logprob_attribution", "Attention layers' log-probability increase",
          (("sublayer", "attn"),), *_LOGPROB),
    Curve("logprob_attribution", "MLP layers' log-probability increase", (("sublayer", "mlp"),), *_LOGPROB),
    Curve("logit_lens", "The answer's probability in the residual stream (logit lens)",
          (("site", "resid_post"), ("target", "gold"), ("position", "last")), "prob", "p(answer)"),
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
        rows = curve.rows(table)
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
