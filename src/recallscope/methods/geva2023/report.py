"""Report sections of Geva et al.'s methods, built from stored tables only."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd

from recallscope.methods.geva2023.summaries import early_patching_summary, extraction_summary, rank_heads
from recallscope.report import figures
from recallscope.report.section import Options, Section, Table, fact_title, method_config, new_section


def attention_knockout_section(store, facts: pd.DataFrame, folder: Path, options: Options) -> Section:
    frame = store.read_table("attention_knockout")
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
    fig = figures.knockout_curves(frame, window)
    section.figures.append(figures.save_figure(fig, folder, "attention_knockout_curves", "Knockout curves"))
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
    tokens = store.read_table("attention_knockout", "tokens")
    for n, (fact_id, rows) in enumerate(tokens.groupby("fact_id", sort=False) if len(tokens) else []):
        if n < options.max_fact_figures:
            fig = figures.knockout_token_map(rows, "one position blocked: " + fact_title(facts, fact_id))
            item = figures.save_figure(
                fig, folder, f"attention_knockout_{n:04d}", "Attention knockout, per token"
            )
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
    fig = figures.mean_curves(
        rated,
        y="attributes_rate",
        group="position",
        reference={"subject embedding (baseline)": baseline},
        xlabel="layer (input of block; L = final residual)",
        ylabel="attributes rate, % (mean, 95% band)",
        title=f"Attributes rate per position ({n_facts} facts)",
    )
    section.figures.append(
        figures.save_figure(fig, folder, "attributes_rate_curves", "Attributes rate per position")
    )
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
                .map(lambda ts: " · ".join(figures.token_text(t) for t in ts))
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
    fig = figures.mean_curves(
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
    section.figures.append(figures.save_figure(fig, folder, "sublayer_knockout_curves", "Sublayer knockout"))
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
    fig = figures.mean_curves(
        long,
        y="extracts",
        group="sublayer",
        label=lambda sublayer: f"{sublayer} update",
        ylabel="% of facts whose update has the prediction on top",
        title=f"Extraction events per layer ({n_facts} facts, 95% band)",
    )
    section.figures.append(
        figures.save_figure(fig, folder, "extraction_rate_layers", "Extraction rate per layer")
    )
    stats = extraction_summary(frame).T.reset_index()
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
        fig = figures.grouped_bars(
            rate.to_frame("attention output recomputed"),
            f"Local counterfactuals: blocked keys ({n_facts} facts)",
            "% of facts extracting at some layer",
        )
        section.figures.append(
            figures.save_figure(fig, folder, "extraction_rate_counterfactuals", "Counterfactuals")
        )
    for fact_id, rows in frame.groupby("fact_id", sort=False):
        events = rows[rows["attn_extracts"] | rows["mlp_extracts"]]
        if events.empty:
            continue
        fact_table = events[["layer", "attn_extracts", "mlp_extracts", "attn_top_token", "mlp_top_token"]]
        fact_table = fact_table.assign(
            attn_top_token=fact_table["attn_top_token"].map(figures.token_text),
            mlp_top_token=fact_table["mlp_top_token"].map(figures.token_text),
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
    rates = early_patching_summary(frame)
    table = rates.pivot(index="source_layer", columns="positions", values="extraction_rate") * 100
    table.index = [f"from layer {layer}" for layer in table.index]
    table["unpatched"] = 100 * rates.groupby("source_layer", sort=True)["clean_rate"].first().to_numpy()
    fig = figures.grouped_bars(
        table,
        f"Extraction with early states patched in ({frame['fact_id'].nunique()} facts)",
        "% of facts extracting at some later layer",
    )
    section.figures.append(figures.save_figure(fig, folder, "early_patching_bars", "Early-state patching"))
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
    fig = figures.head_grid(
        ranked,
        "frac_in_top_k",
        f"Share of facts whose prediction is in the head's top {k} ({frame['fact_id'].nunique()} facts)",
        "share of facts",
    )
    section.figures.append(
        figures.save_figure(fig, folder, "head_mappings_grid", "Heads mapping subject → attribute")
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
                .map(lambda ts: " · ".join(figures.token_text(t) for t in ts))
                .to_numpy(),
            }
        )
        section.per_fact.setdefault(fact_id, []).append(
            Table.of("Top heads' mappings of the subject", fact_table)
        )
    return section


SECTIONS: dict[str, Callable[..., Section]] = {
    "attention_knockout": attention_knockout_section,
    "attributes_rate": attributes_rate_section,
    "sublayer_knockout": sublayer_knockout_section,
    "extraction_rate": extraction_rate_section,
    "early_patching": early_patching_section,
    "head_mappings": head_mappings_section,
}
