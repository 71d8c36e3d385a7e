"""Paper-style figures from stored result tables (pure functions: tables in, matplotlib figure out).

Token strings come from the model: :func:`token_label` escapes ``$`` so that a token is drawn as
written and never starts matplotlib math text.
"""

from __future__ import annotations

import base64
import io
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from recallscope.methods.general.summaries import average_by_bucket  # noqa: E402
from recallscope.report.layout import blank_reason, overlaps, place_legends  # noqa: E402
from recallscope.stats import mean_ci  # noqa: E402

__all__ = [
    "FigureFile",
    "save_figure",
    "causal_trace_average",
    "causal_trace_fact",
    "logit_lens_curves",
    "knockout_curves",
    "mean_curves",
    "head_grid",
    "head_scatter",
    "step_curves",
    "grouped_bars",
    "knockout_token_map",
    "token_label",
    "token_text",
]

STYLE = {"font.size": 9, "axes.titlesize": 10, "figure.dpi": 100}
_CMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
_TITLES = {"hidden": "single restored layer", "mlp": "MLP (window)", "attn": "attention (window)"}


@dataclass(frozen=True)
class FigureFile:
    """A figure written to ``figures/`` as PNG and SVG, with the PNG inlined for the report."""

    name: str
    caption: str
    png: Path
    svg: Path
    data_uri: str
    width: int
    height: int
    blank: str = ""
    """Why the figure carries no information ('' when it does): the report says so instead of it."""
    overlaps: tuple[str, ...] = ()
    """What its legends still cover after :func:`~recallscope.report.layout.place_legends` (nothing)."""


def save_figure(fig: plt.Figure, folder: Path, name: str, caption: str) -> FigureFile:
    """Write ``fig`` as ``folder/name.png`` and ``.svg``; close it; return where it is. Legends that
    cover a title or data are moved first, and a figure whose values are all 0 or missing is marked
    ``blank`` (:mod:`recallscope.report.layout`).
    """
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    with plt.rc_context(STYLE):
        place_legends(fig)
        blank, covered = blank_reason(fig), tuple(overlaps(fig, drawn=True))
        fig.savefig(buffer, format="png", bbox_inches="tight")
        fig.savefig(folder / f"{name}.svg", format="svg", bbox_inches="tight")
    plt.close(fig)
    data = buffer.getvalue()
    (folder / f"{name}.png").write_bytes(data)
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    files = (folder / f"{name}.png", folder / f"{name}.svg")
    return FigureFile(name, caption, *files, uri, width, height, blank, covered)


def token_text(token: str) -> str:
    """A token as readable text: control characters made visible, blank tokens quoted, empty as ``∅``."""
    visible = token.replace("\n", "⏎").replace("\t", "⇥").replace("\r", "")
    return visible if visible.strip() else (repr(visible) if visible else "∅")


def token_label(token: str) -> str:
    """A token as a figure label: :func:`token_text` with ``$`` escaped (no math text)."""
    return token_text(token).replace("$", r"\$")


def causal_trace_average(
    frame: pd.DataFrame,
    kind: str,
    buckets: Sequence[str],
    n_facts: int,
    *,
    value: str = "indirect_effect",
    label: str = "mean of p(restored) − p(corrupted)",
    title: str = "Average indirect effect",
) -> plt.Figure:
    """Mean indirect effect (or another ``value`` column) per token class × layer for one ``kind``
    (ROME's Figure 2 style).

    ``frame``: causal-tracing rows (``kind``, ``bucket``, ``layer``, ``value``).
    """
    rows = average_by_bucket(frame[frame["kind"] == kind])
    table = rows.pivot(index="bucket", columns="layer", values=value)
    table = table.reindex([b for b in buckets if b in table.index])
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(6.4, 0.35 * len(table) + 1.4))
        image = ax.pcolormesh(table.to_numpy(), cmap=_CMAPS.get(kind, "viridis"), vmin=0)
        ax.invert_yaxis()
        ax.set_yticks(np.arange(len(table)) + 0.5, table.index)
        _layer_ticks(ax, table.columns.to_numpy())
        ax.set_title(f"{title}: {_TITLES.get(kind, kind)} ({n_facts} facts)")
        fig.colorbar(image, ax=ax, label=label)
    return fig


def agreement_matrix(table: pd.DataFrame, title: str) -> plt.Figure:
    """Mean Spearman correlation between maps, ``table`` with columns ``a``, ``b``, ``spearman``."""
    names = list(dict.fromkeys([*table["a"], *table["b"]]))
    grid = pd.DataFrame(np.eye(len(names)), index=names, columns=names)
    for a, b, r in zip(table["a"], table["b"], table["spearman"], strict=True):
        grid.loc[a, b] = grid.loc[b, a] = r
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(1.1 * len(names) + 3.2, 0.55 * len(names) + 1.8))
        image = ax.pcolormesh(grid.to_numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
        ax.invert_yaxis()
        ax.set_yticks(np.arange(len(names)) + 0.5, names)
        ax.set_xticks(np.arange(len(names)) + 0.5, names, rotation=60, ha="right")
        for (i, j), r in np.ndenumerate(grid.to_numpy()):
            ax.text(j + 0.5, i + 0.5, f"{r:.2f}", ha="center", va="center", fontsize=7)
        ax.set_title(title)
        fig.colorbar(image, ax=ax, label="mean Spearman ρ over facts")
    return fig


def causal_trace_fact(frame: pd.DataFrame, kinds: Sequence[str], title: str) -> plt.Figure:
    """One fact's scores, ``position × layer`` per ``kind`` side by side; the corrupted span starred.

    ``frame``: the causal-tracing rows of one fact.
    """
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(kinds), figsize=(3.6 * len(kinds), 0.26 * _n_positions(frame) + 1.6))
        axes = np.atleast_1d(axes)
        for ax, kind in zip(axes, kinds, strict=True):
            rows = frame[frame["kind"] == kind]
            grid = rows.pivot(index="position", columns="layer", values="score")
            labels = rows.drop_duplicates("position").set_index("position").loc[grid.index]
            corrupted = labels["bucket"].str.contains("subject") & ~labels["bucket"].eq("before subject")
            ticks = [
                token_label(t) + ("*" if c else "") for t, c in zip(labels["token"], corrupted, strict=True)
            ]
            image = ax.pcolormesh(grid.to_numpy(), cmap=_CMAPS.get(kind, "viridis"))
            ax.invert_yaxis()
            ax.set_yticks(np.arange(len(grid)) + 0.5, ticks if ax is axes[0] else [""] * len(ticks))
            _layer_ticks(ax, grid.columns.to_numpy())
            ax.set_title(_TITLES.get(kind, kind))
            low = float(rows["low"].iloc[0])
            fig.colorbar(
                image, ax=ax, label=f"p({token_label(rows['target'].iloc[0]).strip()})  low={low:.3f}"
            )
        fig.suptitle(title.replace("$", r"\$"))
    return fig


def logit_lens_curves(frame: pd.DataFrame, targets: Sequence[str] | None = None) -> plt.Figure:
    """Tracked tokens over layers: mean probability with a 95% band (top), median rank with the
    interquartile band (bottom; ranks are heavy-tailed, so no mean).

    ``frame``: logit-lens rows (``site``, ``layer``, ``position``, ``target``, ``prob``, ``rank``).
    One column of panels per site; one line per (position, target).
    """
    targets = list(targets or frame["target"].unique())
    frame = frame[frame["target"].isin(targets)].assign(rank1=lambda f: f["rank"] + 1)
    by = ["site", "position", "target", "layer"]
    stats = mean_ci(frame, by, ["prob"])
    quantiles = frame.groupby(by, sort=False)["rank1"].quantile([0.25, 0.5, 0.75]).unstack()
    stats = stats.merge(quantiles.reset_index(), on=by)
    sites = list(dict.fromkeys(frame["site"]))
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(2, len(sites), figsize=(3.4 * len(sites) + 0.6, 5.2), squeeze=False)
        for column, site in enumerate(sites):
            lines = stats[stats["site"] == site].groupby(["position", "target"], sort=False)
            for (position, target), line in lines:
                top, bottom = axes[0, column], axes[1, column]
                top.plot(line["layer"], line["prob"], label=f"{target} @ {position}")
                low = (line["prob"] - line["prob_ci"]).clip(lower=0)
                top.fill_between(line["layer"], low, line["prob"] + line["prob_ci"], alpha=0.2)
                bottom.plot(line["layer"], line[0.5])
                bottom.fill_between(line["layer"], line[0.25], line[0.75], alpha=0.2)
                bottom.set_yscale("log")
            axes[0, column].set_title(site)
            axes[1, column].set_xlabel("layer")
        axes[0, 0].set_ylabel("probability (mean, 95% band)")
        axes[1, 0].set_ylabel("rank + 1 (median, IQR)")
        axes[0, -1].legend(fontsize=7, loc="upper left")
        fig.tight_layout()
    return fig


def mean_curves(
    frame: pd.DataFrame,
    *,
    y: str,
    group: str,
    title: str,
    ylabel: str,
    x: str = "layer",
    xlabel: str = "layer",
    label: Callable[[Any], str] = str,
    reference: dict[str, float] | None = None,
) -> plt.Figure:
    """Mean of ``y`` over facts per ``group`` along ``x``, with 95% bands (NaN rows left out).

    ``reference``: horizontal dashed lines by label (e.g. a baseline); 0 is drawn in grey.
    """
    stats = mean_ci(frame.dropna(subset=[y]), [group, x], [y])
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        for name, line in stats.groupby(group, sort=False):
            ax.plot(line[x], line[y], label=label(name))
            band = line[f"{y}_ci"]
            ax.fill_between(line[x], line[y] - band, line[y] + band, alpha=0.2)
        for name, value in (reference or {}).items():
            ax.axhline(value, color="black", ls="--", lw=0.8, label=name)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title.replace("$", r"\$"))
        ax.legend(fontsize=7)
        fig.tight_layout()
    return fig


def knockout_curves(frame: pd.DataFrame, window: int) -> plt.Figure:
    """Mean % change of p(top-1) per blocked source set over centre layers, 95% bands (Geva's Fig. 2).

    ``frame``: attention-knockout rows (``source``, ``layer``, ``change_pct``).
    """
    return mean_curves(
        frame,
        y="change_pct",
        group="source",
        label=lambda source: f"last ← {source}",
        xlabel=f"centre layer (window of {window})",
        ylabel="% change in p(prediction)",
        title=f"Attention knockout ({frame['fact_id'].nunique()} facts, mean, 95% band)",
    )


def knockout_token_map(frame: pd.DataFrame, title: str) -> plt.Figure:
    """One fact's ``position × layer`` map of the % change when only that position is blocked."""
    grid = frame.pivot(index="position", columns="layer", values="change_pct")
    labels = frame.drop_duplicates("position").set_index("position").loc[grid.index, "token"]
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(5.6, 0.26 * len(grid) + 1.6))
        limit = max(float(np.nanmax(np.abs(grid.to_numpy()))), 1e-9)
        image = ax.pcolormesh(grid.to_numpy(), cmap="RdBu", vmin=-limit, vmax=limit)
        ax.invert_yaxis()
        ax.set_yticks(np.arange(len(grid)) + 0.5, [token_label(t) for t in labels])
        _layer_ticks(ax, grid.columns.to_numpy())
        fig.colorbar(image, ax=ax, label="% change in p(prediction)")
        ax.set_title(title.replace("$", r"\$"), fontsize=9)
    return fig


def grouped_bars(table: pd.DataFrame, title: str, ylabel: str) -> plt.Figure:
    """Bars of ``table``'s values: one group per row (index), one bar per column."""
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(min(14.0, max(4.0, 0.55 * table.size + 1.5)), 3.6))
        x = _bars(ax, table)
        ax.set_xticks(x, [token_label(str(i)) for i in table.index], rotation=30, ha="right")
        ax.set_ylabel(ylabel)
        ax.set_title(title.replace("$", r"\$"))
        if table.shape[1] > 1:
            ax.legend(fontsize=7)
        fig.tight_layout()
    return fig


def _bars(ax, table: pd.DataFrame) -> np.ndarray:
    """Draw one bar per column side by side in each row's group; return the group centres."""
    width = 0.8 / max(1, table.shape[1])
    x = np.arange(len(table))
    for i, column in enumerate(table.columns):
        ax.bar(x + i * width - 0.4 + width / 2, table[column].to_numpy(), width, label=str(column))
    return x


def layer_bars(table: pd.DataFrame, title: str, ylabel: str, *, xlabel: str = "layer") -> plt.Figure:
    """Interleaved bars along layers: one group per row of ``table`` (index = layer), one bar per column."""
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(max(6.4, 0.12 * table.size + 1.5), 3.6))
        x = _bars(ax, table)
        step = max(1, len(table) // 15)
        ax.set_xticks(x[::step], [str(i) for i in table.index[::step]])
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title.replace("$", r"\$"))
        if table.shape[1] > 1:
            ax.legend(fontsize=7)
        fig.tight_layout()
    return fig


def head_grid(
    table: pd.DataFrame,
    value: str,
    title: str,
    label: str,
    *,
    diverging: bool = False,
    clip: float | None = None,
) -> plt.Figure:
    """A ``layer × head`` heat map of ``value`` (one row per head in ``table``).

    ``diverging``: a red–blue scale symmetric around 0 (signed values) instead of 0 → max in blue.
    ``clip``: with ``diverging``, the scale ends at this quantile of ``|value|`` (e.g. 0.95), so a
    few extreme cells do not wash out the rest; the colour-bar label says so.
    """
    grid = table.pivot(index="layer", columns="head", values=value).sort_index()
    magnitudes = np.abs(grid.to_numpy())
    limit = None
    if diverging:
        top = np.nanquantile(magnitudes, clip) if clip is not None else np.nanmax(magnitudes)
        limit = max(float(top), 1e-9)
        if clip is not None and limit < np.nanmax(magnitudes):
            label = f"{label} (colours clipped at ±{limit:.3g})"
    colors = dict(cmap="RdBu_r", vmin=-limit, vmax=limit) if diverging else dict(cmap="Blues", vmin=0)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(0.3 * grid.shape[1] + 2.6, 0.16 * len(grid) + 1.4))
        image = ax.pcolormesh(grid.to_numpy(), **colors)
        ax.invert_yaxis()
        step = max(1, len(grid) // 10)
        ax.set_yticks(np.arange(0, len(grid), step) + 0.5, grid.index[::step])
        ax.set_xticks(np.arange(grid.shape[1]) + 0.5, grid.columns)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(title.replace("$", r"\$"))
        fig.colorbar(image, ax=ax, label=label)
    return fig


ROLE_COLORS = {"subject": "tab:gray", "previous": "tab:red", "current": "tab:blue", "future": "tab:green"}
"""Line colours of the one-to-many roles (tracked tokens relative to the answer step)."""


def step_curves(
    frame: pd.DataFrame,
    *,
    y: str,
    row: str,
    title: str,
    ylabel: str,
    line: str = "role",
    order: Sequence[str] | None = None,
) -> plt.Figure:
    """Yan & Jia's figure layout: mean of ``y`` per layer, one panel per ``row`` value × answer step,
    one line (95% band) per ``line`` value (the tracked token's role by default).

    ``frame``: rows with ``step``, ``layer``, ``row``, ``line``, ``y`` and ``fact_id``. ``order``:
    the panel rows first (others follow in order of appearance). Panels without data are blank.
    """
    stats = mean_ci(frame.dropna(subset=[y]), [row, "step", line, "layer"], [y])
    present = list(dict.fromkeys(frame[row]))
    panels = [p for p in (order or []) if p in present] + [p for p in present if p not in (order or [])]
    steps = sorted(frame["step"].unique())
    names = list(dict.fromkeys(frame[line]))
    if line == "role":
        names = [r for r in ROLE_COLORS if r in names]
    colors = {n: ROLE_COLORS.get(n, f"C{i}") if line == "role" else f"C{i}" for i, n in enumerate(names)}
    with plt.rc_context(STYLE):
        size = (2.9 * len(steps) + 1.4, 2.2 * len(panels) + 0.8)
        fig, axes = plt.subplots(len(panels), len(steps), figsize=size, squeeze=False)
        for (i, panel), (j, step) in itertools.product(enumerate(panels), enumerate(steps)):
            ax = axes[i, j]
            cell = stats[(stats[row] == panel) & (stats["step"] == step)]
            if cell.empty:
                ax.set_axis_off()
                ax.text(0.5, 0.5, f"no {token_label(str(panel))} at step {step}", ha="center", fontsize=7)
                continue
            for name, curve in cell.groupby(line, sort=False):
                band = curve[f"{y}_ci"]
                ax.plot(curve["layer"], curve[y], color=colors[name])
                ax.fill_between(
                    curve["layer"], curve[y] - band, curve[y] + band, alpha=0.2, color=colors[name]
                )
            ax.axhline(0, color="grey", lw=0.5)
            n = frame.loc[(frame[row] == panel) & (frame["step"] == step), "fact_id"].nunique()
            ax.set_title(f"{token_label(str(panel))}, step {step} (n={n})", fontsize=8)
            ax.set_xlabel("layer" if i == len(panels) - 1 else "")
            ax.set_ylabel(ylabel if j == 0 else "")
        handles = [plt.Line2D([], [], color=colors[n], label=token_label(str(n))) for n in names]
        fig.legend(handles=handles, loc="upper right", fontsize=7)
        fig.suptitle(title.replace("$", r"\$"))
        fig.tight_layout(rect=(0, 0, 0.9, 1))
    return fig


def head_scatter(rates: pd.DataFrame, title: str, *, label_top: int = 5) -> plt.Figure:
    """Per-head promotion vs suppression rate (%), one panel per answer step, coloured by layer;
    the ``label_top`` heads with the highest combined rate are labelled ``L<layer>H<head>``.
    """
    steps = sorted(rates["step"].unique())
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(steps), figsize=(3.2 * len(steps) + 0.8, 3.2), squeeze=False)
        for ax, step in zip(axes[0], steps, strict=True):
            cell = rates[rates["step"] == step]
            x, y = 100 * cell["promotion_rate"], 100 * cell["suppression_rate"]
            points = ax.scatter(x, y, c=cell["layer"], cmap="viridis", s=12)
            top = cell.assign(total=x + y).nlargest(label_top, "total")
            for head in top.itertuples():
                ax.annotate(
                    f"L{int(head.layer)}H{int(head.head)}",
                    (100 * head.promotion_rate, 100 * head.suppression_rate),
                    fontsize=6,
                    xytext=(2, 2),
                    textcoords="offset points",
                )
            ax.set_xlabel("promotion rate (%)")
            ax.set_ylabel("suppression rate (%)")
            ax.set_title(f"step {step}", fontsize=8)
        fig.colorbar(points, ax=axes[0, -1], label="layer")
        fig.suptitle(title.replace("$", r"\$"))
        fig.tight_layout()
    return fig


def _layer_ticks(ax, layers: np.ndarray) -> None:
    step = max(1, len(layers) // 8)
    ax.set_xticks(np.arange(0, len(layers), step) + 0.5, layers[::step])
    ax.set_xlabel("layer")


def _n_positions(frame: pd.DataFrame) -> int:
    return int(frame["position"].nunique()) if len(frame) else 1


def estimate_scatter(verified: pd.DataFrame, title: str) -> plt.Figure:
    """Attribution-patching estimates against the exact effects of the verified nodes, per node type."""
    kinds = list(dict.fromkeys(verified["node"]))
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(kinds), figsize=(3.2 * len(kinds), 3.2), squeeze=False)
        for ax, kind in zip(axes[0], kinds, strict=True):
            rows = verified[verified["node"] == kind]
            ax.scatter(rows["exact"], rows["atp"], s=6, alpha=0.6)
            low = float(min(rows["exact"].min(), rows["atp"].min()))
            high = float(max(rows["exact"].max(), rows["atp"].max()))
            ax.plot([low, high], [low, high], color="grey", lw=0.7)
            ax.set_title(f"{kind} ({len(rows)} nodes)")
            ax.set_xlabel("exact effect (real patching)")
            ax.set_ylabel("AtP estimate" if ax is axes[0][0] else "")
        fig.suptitle(title)
        fig.tight_layout()
    return fig
