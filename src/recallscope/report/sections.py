"""One report section per method, built from stored tables only.

A section function takes ``(store, facts, figures_dir, options)`` and returns a :class:`Section`:
its figures, tables and per-fact drill-down items. Later methods register theirs in ``SECTIONS``;
a method without one gets a generic preview of its table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from recallscope.methods.causal_tracing import BUCKETS
from recallscope.report.figures import (
    FigureFile,
    causal_trace_average,
    causal_trace_fact,
    knockout_curves,
    knockout_token_map,
    logit_lens_curves,
    save_figure,
    token_text,
)

__all__ = ["Section", "Table", "SECTIONS", "build_section"]


@dataclass
class Table:
    """A small table for the report: column names and rows of plain values (escaped when rendered)."""

    caption: str
    columns: list[str]
    rows: list[list[Any]]

    @classmethod
    def of(cls, caption: str, frame: pd.DataFrame, digits: int = 4) -> Table:
        rounded = frame.round(digits) if len(frame) else frame
        return cls(caption, [str(c) for c in frame.columns], rounded.astype(object).values.tolist())


@dataclass
class Section:
    """What the report shows for one method."""

    method: str
    title: str
    intro: str
    figures: list[FigureFile] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    per_fact: dict[str, list[FigureFile | Table]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Options:
    """Report options."""

    max_fact_figures: int = 40
    """Facts that get per-fact figures (the rest get tables only, to keep the file small)."""


def causal_tracing_section(store, facts: pd.DataFrame, folder: Path, options: Options) -> Section:
    frame = store.read_table("causal_tracing")
    section = _new_section(
        "causal_tracing",
        "Causal tracing",
        "Noise corrupts the subject; restoring one clean state at a time shows where the answer's "
        "probability comes back. ROME reports two sites: the last subject token in early-middle MLPs "
        "and the last token in late layers.",
        frame,
    )
    if frame.empty:
        return section
    kinds = list(dict.fromkeys(frame["kind"]))
    n_facts = frame["fact_id"].nunique()
    for kind in kinds:
        fig = causal_trace_average(frame, kind, BUCKETS, n_facts)
        section.figures.append(
            save_figure(fig, folder, f"causal_tracing_average_{kind}", f"Average indirect effect, {kind}")
        )
    summary = frame.drop_duplicates("fact_id")[["fact_id", "target", "low", "high"]]
    peak = frame.loc[frame.groupby(["fact_id", "kind"])["indirect_effect"].idxmax()]
    peak = peak.assign(peak=peak["token"].map(token_text) + " @ L" + peak["layer"].astype(str))
    peaks = peak.pivot(index="fact_id", columns="kind", values="peak").add_prefix("peak ").reset_index()
    table = summary.merge(peaks, on="fact_id")
    section.tables.append(
        Table.of("Per fact: corrupted (low) and clean (high) scores, strongest cell", table)
    )
    for n, (fact_id, rows) in enumerate(frame.groupby("fact_id", sort=False)):
        if n < options.max_fact_figures:
            fig = causal_trace_fact(rows, kinds, _fact_title(facts, fact_id))
            section.per_fact[fact_id] = [save_figure(fig, folder, f"causal_tracing_{n:04d}", "Causal trace")]
    if n_facts > options.max_fact_figures:
        section.notes.append(f"Per-fact figures for the first {options.max_fact_figures} of {n_facts} facts.")
    return section


def logit_lens_section(store, facts: pd.DataFrame, folder: Path, options: Options) -> Section:
    frame = store.read_table("logit_lens")
    topk = store.read_table("logit_lens", "topk")
    section = _new_section(
        "logit_lens",
        "Logit lens",
        "Each layer's residual stream and sublayer updates decoded into the vocabulary: when does the "
        "answer become the model's prediction?",
        frame,
    )
    if frame.empty:
        return section
    fig = logit_lens_curves(frame)
    section.figures.append(
        save_figure(fig, folder, "logit_lens_curves", "Tracked tokens over layers, 95% bands")
    )
    site = frame["site"].iloc[0]
    position = frame["position"].iloc[0]
    top1 = topk[(topk["site"] == site) & (topk["position"] == position)].copy()
    top1["top token"] = top1["topk"].map(lambda tokens: token_text(tokens[0]) if len(tokens) else "")
    common = top1.groupby("layer")["top token"].agg(lambda s: s.value_counts().index[0])
    share = top1.groupby("layer")["top token"].agg(lambda s: s.value_counts().iloc[0] / len(s))
    table = pd.DataFrame(
        {"layer": common.index, "most frequent top token": common.values, "share of facts": share.values}
    )
    section.tables.append(
        Table.of(f"Most frequent top-1 token per layer ({site}, position {position})", table, 2)
    )
    for fact_id, rows in top1.groupby("fact_id", sort=False):
        tokens = rows["topk"].map(lambda ts: " · ".join(token_text(t) for t in ts[:5]))
        fact_table = pd.DataFrame(
            {"layer": rows["layer"].to_numpy(), f"top-5 ({site} @ {position})": tokens.to_numpy()}
        )
        section.per_fact[fact_id] = [Table.of("Logit lens, top tokens per layer", fact_table)]
    return section


def attention_knockout_section(store, facts: pd.DataFrame, folder: Path, options: Options) -> Section:
    frame = store.read_table("attention_knockout")
    tokens = store.read_table("attention_knockout", "tokens")
    section = _new_section(
        "attention_knockout",
        "Attention knockout",
        "The last position is stopped from attending to the subject, to the other (relation) tokens or "
        "to itself, in a window of layers around each layer. Geva et al. report that relation tokens "
        "matter first and the subject later, in upper-middle layers.",
        frame,
    )
    if frame.empty:
        return section
    window = int((frame["window_stop"] - frame["window_start"]).max())
    fig = knockout_curves(frame, window)
    section.figures.append(save_figure(fig, folder, "attention_knockout_curves", "Knockout curves"))
    strongest = frame.loc[frame.groupby(["fact_id", "source"])["change_pct"].idxmin()]
    strongest = strongest.assign(
        drop=strongest["change_pct"].round(1).astype(str) + "% @ L" + strongest["layer"].astype(str)
    )
    table = strongest.pivot(index="fact_id", columns="source", values="drop").add_prefix("largest drop: ")
    table = frame.drop_duplicates("fact_id")[["fact_id", "target", "clean_prob", "subject_at_start"]].merge(
        table.reset_index(), on="fact_id"
    )
    section.tables.append(
        Table.of("Per fact: prediction, clean probability, largest drop per source set", table)
    )
    for n, (fact_id, rows) in enumerate(tokens.groupby("fact_id", sort=False) if len(tokens) else []):
        if n < options.max_fact_figures:
            fig = knockout_token_map(rows, "one position blocked: " + _fact_title(facts, fact_id))
            item = save_figure(fig, folder, f"attention_knockout_{n:04d}", "Attention knockout, per token")
            section.per_fact.setdefault(fact_id, []).append(item)
    return section


def _new_section(method: str, title: str, intro: str, frame: pd.DataFrame) -> Section:
    section = Section(method, title, intro)
    if frame.empty:
        section.notes.append("No fact was analysed.")
    return section


def generic_section(method: str) -> Callable[..., Section]:
    def build(store, facts: pd.DataFrame, folder: Path, options: Options) -> Section:
        frame = store.read_table(method)
        section = Section(method, method.replace("_", " ").capitalize(), f"Rows of results/{method}.parquet.")
        section.tables.append(Table.of(f"First rows of {len(frame)}", frame.head(20)))
        return section

    return build


SECTIONS: dict[str, Callable[..., Section]] = {
    "causal_tracing": causal_tracing_section,
    "logit_lens": logit_lens_section,
    "attention_knockout": attention_knockout_section,
}


def build_section(method: str, store, facts: pd.DataFrame, folder: Path, options: Options) -> Section:
    return SECTIONS.get(method, generic_section(method))(store, facts, folder, options)


def _fact_title(facts: pd.DataFrame, fact_id: str) -> str:
    row = facts[facts["fact_id"] == fact_id]
    return fact_id if row.empty else f"{row['prompt'].iloc[0]} →{row['target'].iloc[0]}"
