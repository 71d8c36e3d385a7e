"""Report sections of the general methods (causal tracing, logit lens), built from stored tables only."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd

from recallscope.methods.general.summaries import bucket_names
from recallscope.report.figures import (
    causal_trace_average,
    causal_trace_fact,
    logit_lens_curves,
    save_figure,
    token_text,
)
from recallscope.report.section import Options, Section, Table, fact_title, new_section


def causal_tracing_section(store, facts: pd.DataFrame, folder: Path, options: Options) -> Section:
    frame = store.read_table("causal_tracing")
    section = new_section(
        "causal_tracing",
        "Causal tracing",
        "Noise corrupts the subject (and, in one-to-many step prompts, each previous answer on its "
        "own); restoring one clean state at a time shows where the answer's probability comes back. "
        "ROME reports two sites: the last subject token in early-middle MLPs and the last token in "
        "late layers.",
        frame,
    )
    if frame.empty:
        return section
    if "span" not in frame:  # stores written before spans were recorded
        frame = frame.assign(span="subject", step=1)
    kinds = list(dict.fromkeys(frame["kind"]))
    for (span, step), rows in _trace_groups(frame):
        n_facts = rows["fact_id"].nunique()
        suffix = "" if span == "subject" else f"_{span}_step{step}"
        label = "" if span == "subject" else f", {span} corrupted, step {step}"
        for kind in kinds:
            fig = causal_trace_average(rows, kind, bucket_names(span), n_facts)
            name = f"causal_tracing_average_{kind}{suffix}"
            section.figures.append(save_figure(fig, folder, name, f"Average indirect effect, {kind}{label}"))
    keys = ["fact_id", "span"]
    summary = frame.drop_duplicates(keys)[[*keys, "target", "low", "high"]]
    peak = frame.loc[frame.groupby([*keys, "kind"])["indirect_effect"].idxmax()]
    peak = peak.assign(peak=peak["token"].map(token_text) + " @ L" + peak["layer"].astype(str))
    peaks = peak.pivot(index=keys, columns="kind", values="peak").add_prefix("peak ").reset_index()
    table = summary.merge(peaks, on=keys)
    section.tables.append(
        Table.of(
            "Per fact and corrupted span: corrupted (low) and clean (high) scores, strongest cell", table
        )
    )
    subject = frame[frame["span"] == "subject"]
    n_facts = subject["fact_id"].nunique()
    for n, (fact_id, rows) in enumerate(subject.groupby("fact_id", sort=False)):
        if n < options.max_fact_figures:
            fig = causal_trace_fact(rows, kinds, fact_title(facts, fact_id))
            section.per_fact[fact_id] = [save_figure(fig, folder, f"causal_tracing_{n:04d}", "Causal trace")]
    if n_facts > options.max_fact_figures:
        section.notes.append(f"Per-fact figures for the first {options.max_fact_figures} of {n_facts} facts.")
    return section


def _trace_groups(frame: pd.DataFrame):
    """``((span, step), rows)``: the subject over all steps, each other span per answer step."""
    subject = frame[frame["span"] == "subject"]
    if not subject.empty:
        yield ("subject", 0), subject
    others = frame[frame["span"] != "subject"]
    yield from others.groupby(["span", "step"], sort=True)


def logit_lens_section(store, facts: pd.DataFrame, folder: Path, options: Options) -> Section:
    frame = store.read_table("logit_lens")
    topk = store.read_table("logit_lens", "topk")
    section = new_section(
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


SECTIONS: dict[str, Callable[..., Section]] = {
    "causal_tracing": causal_tracing_section,
    "logit_lens": logit_lens_section,
}
