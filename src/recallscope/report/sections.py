"""One report section per method, built from stored tables only.

A section function takes ``(store, facts, figures_dir, options)`` and returns a :class:`Section`:
its figures, tables and per-fact drill-down items. Later methods register theirs in ``SECTIONS``;
a method without one gets a generic preview of its table.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd

from recallscope.methods.causal_tracing import bucket_names
from recallscope.methods.early_patching import summary as early_summary
from recallscope.methods.extraction_rate import summary
from recallscope.methods.head_mappings import rank_heads
from recallscope.methods.neuron_ablation import summary as neuron_ablation_summary
from recallscope.report.figures import (
    causal_trace_average,
    causal_trace_fact,
    grouped_bars,
    head_grid,
    knockout_curves,
    knockout_token_map,
    layer_bars,
    logit_lens_curves,
    mean_curves,
    save_figure,
    token_text,
)
from recallscope.report.lv import SECTIONS as LV_SECTIONS
from recallscope.report.one_to_many import SECTIONS as ONE_TO_MANY_SECTIONS
from recallscope.report.section import Options, Section, Table, fact_title, method_config, new_section

__all__ = ["Section", "Table", "Options", "SECTIONS", "build_section"]


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


def attention_knockout_section(store, facts: pd.DataFrame, folder: Path, options: Options) -> Section:
    frame = store.read_table("attention_knockout")
    tokens = store.read_table("attention_knockout", "tokens")
    section = new_section(
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
            fig = knockout_token_map(rows, "one position blocked: " + fact_title(facts, fact_id))
            item = save_figure(fig, folder, f"attention_knockout_{n:04d}", "Attention knockout, per token")
            section.per_fact.setdefault(fact_id, []).append(item)
    return section


def attributes_rate_section(store, facts: pd.DataFrame, folder: Path, options: Options) -> Section:
    frame = store.read_table("attributes_rate")
    section = new_section(
        "attributes_rate",
        "Attributes rate (subject enrichment)",
        "Each layer's hidden state at five positions is decoded; the share of its top clean tokens that "
        "are about the subject (from the subject's description) is the attributes rate. Geva et al. see "
        "it climb through the early-middle layers at the last subject token, well above other positions.",
        frame,
    )
    if frame.empty:
        return section
    rated = frame[frame["has_references"]]
    n_facts, n_bare = rated["fact_id"].nunique(), frame["fact_id"].nunique() - rated["fact_id"].nunique()
    if n_bare:
        section.notes.append(f"{n_bare} facts have no text about their subject: left out of the means.")
    if rated.empty:
        return section
    baseline = float(rated.drop_duplicates("fact_id")["baseline_rate"].mean())
    fig = mean_curves(
        rated,
        y="attributes_rate",
        group="position",
        reference={"subject embedding (baseline)": baseline},
        xlabel="layer (input of block; L = final residual)",
        ylabel="attributes rate, % (mean, 95% band)",
        title=f"Attributes rate per position ({n_facts} facts)",
    )
    section.figures.append(save_figure(fig, folder, "attributes_rate_curves", "Attributes rate per position"))
    means = rated.groupby(["position", "layer"], sort=False)["attributes_rate"].mean().reset_index()
    peaks = means.loc[means.groupby("position", sort=False)["attributes_rate"].idxmax()]
    table = peaks.rename(columns={"attributes_rate": "peak mean rate", "layer": "at layer"})
    table["final-layer mean"] = means.groupby("position", sort=False)["attributes_rate"].last().to_numpy()
    table["baseline"] = baseline
    section.tables.append(Table.of("Peak of the mean attributes rate per position", table, 1))
    top = store.read_table("attributes_rate", "top_tokens")
    top = top[top["position"] == "subject_last"]
    for fact_id, rows in top.groupby("fact_id", sort=False):
        rates = frame[(frame["fact_id"] == fact_id) & (frame["position"] == "subject_last")]
        every = rows.iloc[:: max(1, len(rows) // 8)]
        fact_table = pd.DataFrame(
            {
                "layer": every["layer"].to_numpy(),
                "rate": rates.set_index("layer").loc[every["layer"], "attributes_rate"].to_numpy(),
                "top tokens at the last subject token": every["tokens"]
                .map(lambda ts: " · ".join(token_text(t) for t in ts))
                .to_numpy(),
            }
        )
        section.per_fact[fact_id] = [Table.of("Attributes rate, top clean tokens", fact_table, 1)]
    return section


def sublayer_knockout_section(store, facts: pd.DataFrame, folder: Path, options: Options) -> Section:
    frame = store.read_table("sublayer_knockout")
    section = new_section(
        "sublayer_knockout",
        "Sublayer knockout",
        "The MLP or attention updates of a window of layers are removed at every position, and the "
        "attributes rate of the last subject token is measured again at a late layer. Geva et al. find "
        "that removing early MLPs lowers it sharply while attention matters much less.",
        frame,
    )
    if frame.empty:
        return section
    rated = frame[frame["has_references"]]
    if rated.empty:
        section.notes.append("No fact has a text about its subject: no rate to show.")
        return section
    target, window = int(rated["target_layer"].iloc[0]), int(rated["window_stop"].max())
    size = int((rated["window_stop"] - rated["window_start"]).max())
    clean = float(rated.drop_duplicates("fact_id")["clean_rate"].mean())
    knocked = rated[rated["sublayer"] != "none"]
    fig = mean_curves(
        knocked,
        y="attributes_rate",
        group="sublayer",
        x="start_layer",
        label=lambda sublayer: f"{sublayer} updates removed",
        reference={"no intervention": clean},
        xlabel=f"first removed layer (window of {size}, up to layer {window - 1})",
        ylabel=f"attributes rate at layer {target}, %",
        title=f"Sublayer knockout ({rated['fact_id'].nunique()} facts, mean, 95% band)",
    )
    section.figures.append(save_figure(fig, folder, "sublayer_knockout_curves", "Sublayer knockout"))
    means = knocked.groupby(["sublayer", "start_layer"], sort=False)["change"].mean().reset_index()
    lowest = means.loc[means.groupby("sublayer", sort=False)["change"].idxmin()]
    table = lowest.rename(columns={"change": "largest mean drop", "start_layer": "first removed layer"})
    table["clean rate"] = clean
    section.tables.append(Table.of(f"Largest mean drop of the rate at layer {target}", table, 1))
    return section


def extraction_rate_section(store, facts: pd.DataFrame, folder: Path, options: Options) -> Section:
    frame = store.read_table("extraction_rate")
    section = new_section(
        "extraction_rate",
        "Attribute extraction",
        "At each layer, does the attention update or the MLP update at the last position have the "
        "prediction as its top token? Geva et al. find that attention extracts the attribute in more "
        "examples than the MLPs. Local counterfactuals recompute one layer's attention output with some "
        "keys blocked.",
        frame,
    )
    if frame.empty:
        return section
    n_facts = frame["fact_id"].nunique()
    long = frame.melt(["fact_id", "layer"], ["attn_extracts", "mlp_extracts"], "sublayer", "extracts")
    long["extracts"] = 100 * long["extracts"].astype(float)
    long["sublayer"] = long["sublayer"].str.removesuffix("_extracts")
    fig = mean_curves(
        long,
        y="extracts",
        group="sublayer",
        label=lambda sublayer: f"{sublayer} update",
        ylabel="% of facts whose update has the prediction on top",
        title=f"Extraction events per layer ({n_facts} facts, 95% band)",
    )
    section.figures.append(save_figure(fig, folder, "extraction_rate_layers", "Extraction rate per layer"))
    stats = summary(frame).T.reset_index()
    stats.columns = ["statistic", "value"]
    section.tables.append(
        Table.of("Extraction statistics (G4) and rank gap at attention events (G6)", stats, 2)
    )
    best = frame.groupby("fact_id")[["attn_rank", "mlp_rank", "subject_rank"]].min()
    best = best.quantile([0.25, 0.5, 0.75]).T.reset_index()
    best.columns = ["rank of the prediction (best layer)", "25%", "median", "75%"]
    section.tables.append(Table.of("Best rank over layers per fact (0 = extraction)", best, 1))
    cf = store.read_table("extraction_rate", "counterfactuals")
    if len(cf):
        any_layer = cf.groupby(["variant", "fact_id"], sort=False)["extracts"].any()
        rate = 100 * any_layer.groupby("variant", sort=False).mean()
        fig = grouped_bars(
            rate.to_frame("attention output recomputed"),
            f"Local counterfactuals: blocked keys ({n_facts} facts)",
            "% of facts extracting at some layer",
        )
        section.figures.append(save_figure(fig, folder, "extraction_rate_counterfactuals", "Counterfactuals"))
    for fact_id, rows in frame.groupby("fact_id", sort=False):
        events = rows[rows["attn_extracts"] | rows["mlp_extracts"]]
        if events.empty:
            continue
        fact_table = events[["layer", "attn_extracts", "mlp_extracts", "attn_top_token", "mlp_top_token"]]
        fact_table = fact_table.assign(
            attn_top_token=fact_table["attn_top_token"].map(token_text),
            mlp_top_token=fact_table["mlp_top_token"].map(token_text),
        )
        section.per_fact.setdefault(fact_id, []).append(
            Table.of("Layers with an extraction event", fact_table)
        )
    return section


def early_patching_section(store, facts: pd.DataFrame, folder: Path, options: Options) -> Section:
    frame = store.read_table("early_patching")
    section = new_section(
        "early_patching",
        "Extraction after patching early representations",
        "The input of each block is patched, at the subject, the other tokens or the last token, with "
        "that example's state from an early layer, and the block's attention output is tested again "
        "for extraction. Geva et al. expect early (not yet enriched) subject states to hurt extraction.",
        frame,
    )
    if frame.empty:
        return section
    rates = early_summary(frame)
    table = rates.pivot(index="source_layer", columns="positions", values="extraction_rate") * 100
    table.index = [f"from layer {layer}" for layer in table.index]
    table["unpatched"] = 100 * rates.groupby("source_layer", sort=True)["clean_rate"].first().to_numpy()
    fig = grouped_bars(
        table,
        f"Extraction with early states patched in ({frame['fact_id'].nunique()} facts)",
        "% of facts extracting at some later layer",
    )
    section.figures.append(save_figure(fig, folder, "early_patching_bars", "Early-state patching"))
    section.tables.append(Table.of("Extraction rate (%) per source layer and patched positions", table, 1))
    return section


def head_mappings_section(store, facts: pd.DataFrame, folder: Path, options: Options) -> Section:
    frame = store.read_table("head_mappings")
    section = new_section(
        "head_mappings",
        "Head mappings (OV circuits)",
        "Each head's value-output circuit is applied to the subject's token embeddings and read in the "
        "vocabulary: does the head map the subject to the predicted attribute by its parameters alone? "
        "Geva et al. find that the heads that extract attributes often encode such mappings.",
        frame,
    )
    if frame.empty:
        return section
    ranked = rank_heads(frame)
    k = int(method_config(store, "head_mappings").get("top_k", 10))
    fig = head_grid(
        ranked,
        "frac_in_top_k",
        f"Share of facts whose prediction is in the head's top {k} ({frame['fact_id'].nunique()} facts)",
        "share of facts",
    )
    section.figures.append(
        save_figure(fig, folder, "head_mappings_grid", "Heads mapping subject → attribute")
    )
    top = ranked.head(15).copy()
    label = "L" + top.pop("layer").astype(str) + "H" + top.pop("head").astype(str)
    top.insert(0, "head", label)
    section.tables.append(
        Table.of(f"Heads whose OV map most often puts the prediction in its top {k}", top, 2)
    )
    tokens = store.read_table("head_mappings", "top_tokens")
    best = set(zip(ranked["layer"].head(5), ranked["head"].head(5), strict=True))
    for fact_id, rows in tokens.groupby("fact_id", sort=False) if len(tokens) else []:
        rows = rows[[(lay, h) in best for lay, h in zip(rows["layer"], rows["head"], strict=True)]]
        if rows.empty:
            continue
        fact_table = pd.DataFrame(
            {
                "head": ("L" + rows["layer"].astype(str) + "H" + rows["head"].astype(str)).to_numpy(),
                "rank of prediction": rows["mapping_rank"].to_numpy(),
                "top tokens of the subject's OV map": rows["top_tokens"]
                .map(lambda ts: " · ".join(token_text(t) for t in ts))
                .to_numpy(),
            }
        )
        section.per_fact.setdefault(fact_id, []).append(
            Table.of("Top heads' mappings of the subject", fact_table)
        )
    return section


def logprob_attribution_section(store, facts: pd.DataFrame, folder: Path, options: Options) -> Section:
    frame = store.read_table("logprob_attribution")
    section = new_section(
        "logprob_attribution",
        "Log-probability attribution (layers, heads, neurons)",
        "Each component is added alone to the residual stream it enters (attention to the layer's input, "
        "FFN to the residual after attention) and the log-probability of the prediction is read with the "
        "final norm's scale frozen. Yu & Ananiadou find the largest increases in deep layers, from a few "
        "heads and a few FFN 'value neurons'.",
        frame,
    )
    if frame.empty:
        return section
    n_facts = frame["fact_id"].nunique()
    layers = frame.pivot_table(index="layer", columns="sublayer", values="logprob_increase", aggfunc="mean")
    layers = layers.rename(columns={"attn": "attention", "mlp": "FFN"})
    fig = layer_bars(
        layers, f"Log-probability increase per layer ({n_facts} facts, mean)", "log-prob increase"
    )
    section.figures.append(save_figure(fig, folder, "logprob_attribution_layers", "Layer-level increase"))
    best = pd.concat(
        [
            layers[column].nlargest(5).rename("mean increase").reset_index().assign(sublayer=column)
            for column in layers.columns
        ]
    )[["sublayer", "layer", "mean increase"]]
    totals = frame.groupby(["fact_id", "sublayer"])["logprob_increase"].sum().groupby("sublayer").mean()
    section.notes.append(
        "Mean total increase per fact: "
        + ", ".join(f"{'attention' if k == 'attn' else 'FFN'} {v:.3f}" for k, v in totals.items())
    )
    section.tables.append(Table.of("Layers with the largest mean increase", best, 3))
    heads = store.read_table("logprob_attribution", "heads")
    if len(heads):
        ranked = heads.groupby(["layer", "head"], as_index=False)["logprob_increase"].mean()
        fig = head_grid(
            ranked,
            "logprob_increase",
            f"Head-level increase ({n_facts} facts, mean)",
            "log-prob increase",
            diverging=True,
        )
        section.figures.append(save_figure(fig, folder, "logprob_attribution_heads", "Head-level increase"))
        top = ranked.nlargest(10, "logprob_increase")
        top.insert(0, "head label", "L" + top["layer"].astype(str) + "H" + top["head"].astype(str))
        section.tables.append(Table.of("Heads with the largest mean increase", top, 3))
    _subvalue_tables(store, section, folder, n_facts)
    return section


def _subvalue_tables(store, section: Section, folder: Path, n_facts: int) -> None:
    """Where the top value neurons / attention units sit, the most frequent ones, and per-fact lists."""
    neurons = store.read_table("logprob_attribution", "neurons")
    units = store.read_table("logprob_attribution", "attn_units")
    counts = {}
    for name, rows in (("FFN neurons", neurons), ("attention units", units)):
        if len(rows):
            top = rows[rows["end"] == "top"]
            counts[name] = top.groupby("layer").size() / n_facts
    if counts:
        table = pd.DataFrame(counts).fillna(0.0).sort_index()
        n_top = int(neurons["rank"].max()) if len(neurons) else int(units["rank"].max())
        fig = layer_bars(
            table, f"Where the top {n_top} subvalues of a fact sit (mean count per fact)", "count"
        )
        section.figures.append(
            save_figure(fig, folder, "logprob_attribution_subvalue_layers", "Top subvalues")
        )
    if len(neurons):
        top = neurons[neurons["end"] == "top"]
        often = (
            top.groupby(["layer", "neuron"])
            .agg(
                n_facts=("fact_id", "nunique"),
                mean_increase=("logprob_increase", "mean"),
                top_tokens=("top_tokens", "first"),
                bottom_tokens=("bottom_tokens", "first"),
            )
            .reset_index()
            .sort_values(["n_facts", "mean_increase"], ascending=False)
            .head(15)
        )
        for column in ("top_tokens", "bottom_tokens"):
            often[column] = often[column].map(_tokens)
        section.tables.append(Table.of("FFN value neurons most often in a fact's top list", often, 3))
    for kind, rows, columns in (
        ("FFN value neurons", neurons, ["layer", "neuron"]),
        ("attention units", units, ["layer", "head", "dim", "src_pos", "token"]),
    ):
        for fact_id, fact_rows in (
            rows[rows["end"] == "top"].groupby("fact_id", sort=False) if len(rows) else []
        ):
            shown = fact_rows.nsmallest(8, "rank")
            fact_table = shown[columns + ["coeff", "logprob_increase"]].copy()
            fact_table["promoted tokens"] = shown["promoted_tokens"].map(_tokens).to_numpy()
            if "token" in fact_table:
                fact_table["token"] = fact_table["token"].map(token_text)
            section.per_fact.setdefault(fact_id, []).append(Table.of(f"Top {kind}", fact_table, 3))


def _tokens(tokens, n: int = 6) -> str:
    return " · ".join(token_text(t) for t in list(tokens)[:n])


def query_attribution_section(store, facts: pd.DataFrame, folder: Path, options: Options) -> Section:
    frame = store.read_table("query_attribution")
    section = new_section(
        "query_attribution",
        "Query attribution (what activates the value neurons)",
        "A top value neuron's coefficient is set by the inner product of its key with the residual "
        "stream, which is a sum of earlier components; each component's share of that inner product, "
        "times the neuron's importance, is added to the component. The same is done for the top "
        "attention units at their source position, and for the FFN neurons feeding them ('query neurons').",
        frame,
    )
    if frame.empty:
        return section
    n_facts = frame["fact_id"].nunique()
    for analysis, title in (("ffn_value", "FFN value neurons"), ("attn_unit", "attention units")):
        rows = frame[frame["analysis"] == analysis]
        if rows.empty:
            continue
        table = rows.pivot_table(index="component_layer", columns="sublayer", values="score", aggfunc="sum")
        table = (table / n_facts).fillna(0.0)
        table = table[[c for c in ("embed", "attn", "mlp") if c in table.columns]]
        fig = layer_bars(
            table,
            f"Query layers of the top {title} ({n_facts} facts, mean)",
            "accumulated share × increase",
            xlabel="layer (−1: embedding)",
        )
        section.figures.append(
            save_figure(fig, folder, f"query_attribution_{analysis}", f"Query layers: {title}")
        )
    neurons = store.read_table("query_attribution", "query_neurons")
    if len(neurons):
        often = (
            neurons.groupby(["layer", "neuron"])
            .agg(
                n_facts=("fact_id", "nunique"),
                mean_score=("score", "mean"),
                also_value=("also_value_neuron", "mean"),
            )
            .reset_index()
            .sort_values(["n_facts", "mean_score"], ascending=False)
            .head(15)
        )
        section.tables.append(Table.of("Query FFN neurons most often in a fact's top list", often, 3))
        share = 100 * float(neurons["also_value_neuron"].mean())
        section.notes.append(
            f"{share:.1f}% of the listed query neurons are also top value neurons of the fact."
        )
    return section


def neuron_ablation_section(store, facts: pd.DataFrame, folder: Path, options: Options) -> Section:
    frame = store.read_table("neuron_ablation")
    section = new_section(
        "neuron_ablation",
        "Neuron ablation (evaluation of the attributions)",
        "The top-K FFN neurons and attention units chosen by each attribution score are zeroed at the "
        "last position, and the target's reciprocal rank, probability and log-probability are measured "
        "again, against K random subvalues. Yu & Ananiadou find that a few hundred top subvalues by "
        "log-probability increase remove almost all of the prediction, and random ones nothing.",
        frame,
    )
    if frame.empty:
        return section
    stats = neuron_ablation_summary(frame)
    budgets = list(dict.fromkeys(frame["budget"]))
    bars = stats.pivot(index="budget", columns="method", values="prob_drop_pct").reindex(budgets)
    fig = grouped_bars(
        bars, f"Drop of the target's probability ({frame['fact_id'].nunique()} facts, mean)", "drop, %"
    )
    section.figures.append(save_figure(fig, folder, "neuron_ablation_bars", "Ablation of top subvalues"))
    table = stats[
        [
            "method",
            "budget",
            "n",
            "mrr_drop_pct",
            "mrr_drop_pct_ci",
            "prob_drop_pct",
            "prob_drop_pct_ci",
            "logprob_drop",
            "logprob_drop_ci",
        ]
    ]
    table = table.rename(columns=lambda c: c.replace("_pct", " %").replace("_ci", " ±95%").replace("_", " "))
    section.tables.append(Table.of("Mean drops per attribution method and budget", table, 2))
    clean = frame.drop_duplicates("fact_id")[["clean_mrr", "clean_prob"]].mean()
    target = method_config(store, "neuron_ablation").get("target", "gold")
    section.notes.append(
        f"Before ablation: mean reciprocal rank {clean['clean_mrr']:.3f}, mean probability "
        f"{clean['clean_prob']:.3f} (target: {target})."
    )
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
    "attributes_rate": attributes_rate_section,
    "sublayer_knockout": sublayer_knockout_section,
    "extraction_rate": extraction_rate_section,
    "early_patching": early_patching_section,
    "head_mappings": head_mappings_section,
    "logprob_attribution": logprob_attribution_section,
    "query_attribution": query_attribution_section,
    "neuron_ablation": neuron_ablation_section,
    **ONE_TO_MANY_SECTIONS,
    **LV_SECTIONS,
}


def build_section(method: str, store, facts: pd.DataFrame, folder: Path, options: Options) -> Section:
    return SECTIONS.get(method, generic_section(method))(store, facts, folder, options)
