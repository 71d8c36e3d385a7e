"""Report sections of Yu & Ananiadou's methods, built from stored tables only."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd

from recallscope.methods.yu2024.summaries import neuron_ablation_summary
from recallscope.report.figures import (
    grouped_bars,
    head_grid,
    layer_bars,
    save_figure,
    token_text,
)
from recallscope.report.section import Options, Section, Table, method_config, new_section


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


SECTIONS: dict[str, Callable[..., Section]] = {
    "logprob_attribution": logprob_attribution_section,
    "query_attribution": query_attribution_section,
    "neuron_ablation": neuron_ablation_section,
}
