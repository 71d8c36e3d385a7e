"""Report sections of the general methods (causal tracing, logit lens), built from stored tables only."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd

from recallscope.methods.general.summaries import agreement_summary, bucket_names, peaks, verification_summary
from recallscope.report import figures
from recallscope.report.section import Options, Section, Table, fact_title, method_config, new_section


def causal_tracing_section(store, facts: pd.DataFrame, folder: Path, options: Options) -> Section:
    frame = store.read_table("causal_tracing")
    section = new_section(
        "causal_tracing",
        "Causal tracing",
        "A corruption (Gaussian noise, a swapped-in subject, resampled tokens) replaces the subject (and, "
        "in one-to-many step prompts, each previous answer on its own); patching one state at a time "
        "between the clean and the corrupted run shows where the answer comes back (denoising) or "
        "breaks (noising). ROME reports two sites: the last subject token in early-middle MLPs and "
        "the last token in late layers; Zhang & Nanda (2024) find the MLP site much weaker under a "
        "subject swap.",
        frame,
    )
    if frame.empty:
        return section
    settings = _tracing_settings(method_config(store, "causal_tracing"))
    if settings:
        section.notes.append(settings)
    defaults = dict(span="subject", step=1, corruption="gaussian", direction="denoising", partner="")
    frame = frame.assign(**{k: v for k, v in defaults.items() if k not in frame})  # older stores
    variants = list(dict.fromkeys(zip(frame["corruption"], frame["direction"], strict=True)))
    kinds = list(dict.fromkeys(frame["kind"]))
    for (span, step), rows in _trace_groups(frame):
        for corruption, direction in variants:
            part = rows[(rows["corruption"] == corruption) & (rows["direction"] == direction)]
            if not part.empty:
                _average_figures(
                    section, part, folder, kinds, span, step, (corruption, direction), len(variants)
                )
    keys = ["fact_id", "span", "corruption", "direction"]
    summary = frame.drop_duplicates(keys)[[*keys, "partner", "target", "low", "high"]]
    peak = frame.loc[frame.groupby([*keys, "kind"])["indirect_effect"].idxmax()]
    peak = peak.assign(peak=peak["token"].map(figures.token_text) + " @ L" + peak["layer"].astype(str))
    peaks = peak.pivot(index=keys, columns="kind", values="peak").add_prefix("peak ").reset_index()
    table = summary.merge(peaks, on=keys)
    if len(variants) == 1:
        table = table.drop(columns=["corruption", "direction", "partner"])
    section.tables.append(
        Table.of(
            "Per fact and corrupted span: corrupted (low) and clean (high) scores, strongest cell", table
        )
    )
    _agreement(section, frame, folder, kinds)
    subject = frame[(frame["span"] == "subject") & (frame["corruption"] == variants[0][0])]
    subject = subject[subject["direction"] == variants[0][1]]
    n_facts = subject["fact_id"].nunique()
    for n, (fact_id, rows) in enumerate(subject.groupby("fact_id", sort=False)):
        if n < options.max_fact_figures:
            fig = figures.causal_trace_fact(rows, kinds, fact_title(facts, fact_id))
            section.per_fact[fact_id] = [
                figures.save_figure(fig, folder, f"causal_tracing_{n:04d}", "Causal trace")
            ]
    if n_facts > options.max_fact_figures:
        section.notes.append(f"Per-fact figures for the first {options.max_fact_figures} of {n_facts} facts.")
    return section


def _tracing_settings(config: dict) -> str:
    """The settings a reader needs to judge the traces, and how to get ROME's where they differ."""
    if not config:
        return ""
    corruptions = config.get("corruptions", ["gaussian"])
    text = (
        f"Settings: {config.get('samples')} corrupted copies per fact, window {config.get('window')}, "
        f"corruptions {', '.join(corruptions)}, metric {config.get('metric', 'prob')}."
    )
    noisy = {"gaussian", "resample"} & set(corruptions)
    if noisy and (config.get("samples") or 10) < 10:
        text += (
            " ROME averages 10 noise draws (these are its first draws): add `[causal_tracing] preset = "
            '"rome"` to a --config file for its settings.'
        )
    return text


def _average_figures(section, rows, folder, kinds, span, step, variant, n_variants) -> None:
    """ROME's average figure per kind; with several corruptions / directions, of the normalized effect."""
    n_facts = rows["fact_id"].nunique()
    suffix = "" if span == "subject" else f"_{span}_step{step}"
    label = "" if span == "subject" else f", {span} corrupted, step {step}"
    if variant != ("gaussian", "denoising"):
        suffix += f"_{variant[0]}_{variant[1]}"
    if n_variants > 1:
        label += f", {variant[0]} {variant[1]}"
    normalized = n_variants > 1 or variant != ("gaussian", "denoising")
    options = {}
    if normalized and variant[1] == "noising":  # the share of the gap a corrupted state takes away
        rows = rows.assign(normalized=1 - rows["normalized"])
        options = {"value": "normalized", "label": "mean of (clean − patched) / (clean − corrupted)"}
    elif normalized:
        options = {"value": "normalized", "label": "mean of (patched − corrupted) / (clean − corrupted)"}
    if normalized:
        options["title"] = "Average normalized effect"
    for kind in kinds:
        fig = figures.causal_trace_average(rows, kind, bucket_names(span), n_facts, **options)
        name = f"causal_tracing_average_{kind}{suffix}"
        section.figures.append(figures.save_figure(fig, folder, name, f"Average effect, {kind}{label}"))


def _agreement(section, frame: pd.DataFrame, folder: Path, kinds: list[str]) -> None:
    """Where corruptions, directions and metrics agree (subject span): a matrix and a table."""
    subject = frame[frame["span"] == "subject"]
    table = agreement_summary(subject)
    if table.empty:
        return
    kind = "mlp" if "mlp" in kinds else kinds[0]
    rows = table[table["kind"] == kind]
    main = rows[rows["a"].str.endswith("/prob") & rows["b"].str.endswith("/prob")]
    shown = main if len(main) else rows
    title = f"Agreement of the {kind} maps (subject corrupted)"
    fig = figures.agreement_matrix(shown, title)
    section.figures.append(figures.save_figure(fig, folder, f"causal_tracing_agreement_{kind}", title))
    where = peaks(subject)
    where = where[where["map"].str.endswith(("/prob", "/logit_diff"))]
    located = where.groupby(["kind", "map"], sort=False).agg(
        peak_at_last_subject=("bucket", lambda b: float((b == "last subject").mean())),
        peak_at_last_token=("bucket", lambda b: float((b == "last token").mean())),
        median_peak_layer=("layer", "median"),
    )
    section.tables.append(
        Table.of(
            "Agreement between corruptions, directions and metrics per kind: mean Spearman ρ of the "
            "position × layer maps over facts, and the share of facts whose maps peak in the same cell",
            _one_factor(table).drop(columns=["span"]),
            3,
        )
    )
    section.tables.append(
        Table.of("Where each map peaks (share of facts, median layer)", located.reset_index(), 2)
    )


def _one_factor(table: pd.DataFrame) -> pd.DataFrame:
    """The pairs of maps that differ in one factor: the corruption / direction, or the metric."""
    a, b = (table[c].str.rsplit("/", n=1, expand=True) for c in ("a", "b"))
    return table[(a[0] == b[0]) | (a[1] == b[1])]


def _trace_groups(frame: pd.DataFrame):
    """``((span, step), rows)``: the subject over all steps, each other span per answer step."""
    subject = frame[frame["span"] == "subject"]
    if not subject.empty:
        yield ("subject", 0), subject
    others = frame[frame["span"] != "subject"]
    yield from others.groupby(["span", "step"], sort=True)


def logit_lens_section(store, facts: pd.DataFrame, folder: Path, options: Options) -> Section:
    frame = store.read_table("logit_lens")
    section = new_section(
        "logit_lens",
        "Logit lens",
        "Each layer's residual stream and sublayer updates decoded into the vocabulary: when does the "
        "answer become the model's prediction?",
        frame,
    )
    if frame.empty:
        return section
    fig = figures.logit_lens_curves(frame)
    section.figures.append(
        figures.save_figure(fig, folder, "logit_lens_curves", "Tracked tokens over layers, 95% bands")
    )
    site = frame["site"].iloc[0]
    position = frame["position"].iloc[0]
    topk = store.read_table("logit_lens", "topk")
    top1 = topk[(topk["site"] == site) & (topk["position"] == position)].copy()
    top1["top token"] = top1["topk"].map(lambda tokens: figures.token_text(tokens[0]) if len(tokens) else "")
    common = top1.groupby("layer")["top token"].agg(lambda s: s.value_counts().index[0])
    share = top1.groupby("layer")["top token"].agg(lambda s: s.value_counts().iloc[0] / len(s))
    table = pd.DataFrame(
        {"layer": common.index, "most frequent top token": common.values, "share of facts": share.values}
    )
    section.tables.append(
        Table.of(f"Most frequent top-1 token per layer ({site}, position {position})", table, 2)
    )
    for fact_id, rows in top1.groupby("fact_id", sort=False):
        tokens = rows["topk"].map(lambda ts: " · ".join(figures.token_text(t) for t in ts[:5]))
        fact_table = pd.DataFrame(
            {"layer": rows["layer"].to_numpy(), f"top-5 ({site} @ {position})": tokens.to_numpy()}
        )
        section.per_fact[fact_id] = [Table.of("Logit lens, top tokens per layer", fact_table)]
    return section


def attribution_patching_section(store, facts: pd.DataFrame, folder: Path, options: Options) -> Section:
    frame = store.read_table("attribution_patching")
    section = new_section(
        "attribution_patching",
        "Attribution patching",
        "The first-order (AtP) estimate of each node's noising effect, from one forward and one "
        "backward per fact, and the check: the nodes with the largest estimates patched for real. "
        "Where the two disagree (low Spearman, large errors), trust the exact effects.",
        frame,
    )
    verified = store.read_table("attribution_patching", "verification")
    if frame.empty or verified.empty:
        return section
    table = verification_summary(verified)
    section.tables.append(
        Table.of(
            "AtP against real patching of the verified nodes (all facts pooled), per node type", table, 4
        )
    )
    title = "AtP estimate vs exact noising effect"
    fig = figures.estimate_scatter(verified, title)
    section.figures.append(figures.save_figure(fig, folder, "attribution_patching_scatter", title))
    heads = frame[frame["node"] == "head"].groupby(["fact_id", "layer", "index"])["atp"].sum().reset_index()
    top = heads.groupby(["layer", "index"])["atp"].mean().reset_index().rename(columns={"index": "head"})
    top = top.reindex(top["atp"].abs().sort_values(ascending=False).index).head(10)
    section.tables.append(Table.of("Heads with the largest mean AtP (summed over positions)", top, 4))
    neurons = store.read_table("attribution_patching", "neurons")
    if not neurons.empty:
        best = neurons.reindex(neurons["atp"].abs().sort_values(ascending=False).index).head(15)
        best = best.assign(token=best["token"].map(figures.token_text))
        shown = best[["fact_id", "layer", "position", "token", "index", "atp", "exact"]]
        section.tables.append(Table.of("Neurons with the largest AtP (index: the neuron)", shown, 5))
    return section


SECTIONS: dict[str, Callable[..., Section]] = {
    "attribution_patching": attribution_patching_section,
    "causal_tracing": causal_tracing_section,
    "logit_lens": logit_lens_section,
}
