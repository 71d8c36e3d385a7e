"""Report sections of the Lv et al. suite: argument heads, MLP regression, function application and
anti-overconfidence (``methods.md`` §1).

Runs with ``--shots 0,1`` hold every fact zero-shot and one-shot (L8): each section then shows its
figures and tables per variant, side by side, so the two mechanisms can be compared.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from recallscope.methods.lv2024.summaries import anti_overconfidence_summary as anti_summary
from recallscope.methods.lv2024.summaries import argument_passers, coefficients
from recallscope.methods.lv2024.summaries import function_application_summary as function_summary
from recallscope.report.figures import grouped_bars, head_grid, layer_bars, mean_curves, save_figure
from recallscope.report.section import Options, Section, Table, method_config, new_section

__all__ = ["SECTIONS"]


def _variants(frame: pd.DataFrame, facts: pd.DataFrame) -> Iterator[tuple[str, str, pd.DataFrame]]:
    """``(label, file suffix, rows)`` per shot variant; one unlabelled group when there is one."""
    shots = facts.set_index("fact_id")["shots"] if "shots" in facts else pd.Series(dtype=int)
    per_row = frame["fact_id"].map(shots).fillna(0).astype(int)
    values = sorted(per_row.unique())
    if len(values) <= 1:
        yield "", "", frame
        return
    for n in values:
        yield f" ({n}-shot)", f"_{n}shot", frame[per_row == n]


def _choices(store, method: str, fields: tuple[str, ...]) -> str:
    config = method_config(store, method)
    chosen = ", ".join(f"{name}={config[name]!r}" for name in fields if name in config)
    preset = config.get("preset_name")
    return f"Settings: {chosen}" + (f" (preset {preset!r})." if preset else ".")


def _head_label(table: pd.DataFrame, layer: str = "layer") -> pd.Series:
    return "L" + table[layer].astype(str) + "H" + table["head"].astype(str)


def argument_heads_section(store, facts: pd.DataFrame, folder: Path, options: Options) -> Section:
    frame = store.read_table("argument_heads")
    section = new_section(
        "argument_heads",
        "Argument-passing heads (Lv et al.)",
        "Which heads move the subject to the last position? For every head: its attention from the "
        "last position to the subject, the logit its output gives the subject's first token, their "
        "correlation over facts (an argument passer attends to the subject and writes its "
        "unembedding), and path patching: the change of the answer's logit minus the mean logit "
        "(iw) when only that head's output at the last position carries a counterfactual subject "
        "(every head's queries, keys and values held clean). A head passes the argument when it "
        "moves the subject (positive correlation, attention ≥ 0.1, positive subject logit) and its "
        "path-patching effect is among the 5 most negative.",
        frame,
    )
    if frame.empty:
        return section
    section.notes.append(
        _choices(store, "argument_heads", ("patching", "freeze_mlps", "attend_to", "projection", "target"))
    )
    columns = ["head_label", "attention", "subject_logit", "r", "delta", "delta_ci", "delta_pct", "passes"]
    for label, suffix, rows in _variants(frame, facts):
        passers = argument_passers(rows)
        if passers["delta"].notna().any():
            fig = head_grid(
                passers, "delta", f"Path patching: mean change of iw{label}", "Δ iw", diverging=True
            )
            section.figures.append(
                save_figure(fig, folder, f"argument_heads_patching{suffix}", f"Path patching{label}")
            )
        fig = head_grid(
            passers, "r", f"Attention × subject logit: correlation{label}", "Pearson r", diverging=True
        )
        section.figures.append(save_figure(fig, folder, f"argument_heads_r{suffix}", f"Correlation{label}"))
        fig = head_grid(passers, "attention", f"Attention from the last token to the subject{label}", "mean")
        section.figures.append(
            save_figure(fig, folder, f"argument_heads_attention{suffix}", f"Attention{label}")
        )
        top = passers.assign(head_label=_head_label(passers)).head(8)[columns]
        passing = passers[passers["passes"].fillna(False).astype(bool)]
        n = len(passing)
        names = ", ".join(_head_label(passing)) or "none"
        section.notes.append(f"Heads that pass the argument{label}: {names}.")
        section.tables.append(Table.of(f"Heads ranked: {n} pass the argument{label}", top, 3))
    mlp = store.read_table("argument_heads", "mlp")
    if not mlp.empty and "delta" in mlp:
        per_layer = mlp.groupby("layer")[["delta"]].mean()
        fig = layer_bars(per_layer, "Path patching of each MLP: mean change of iw", "Δ iw")
        section.figures.append(save_figure(fig, folder, "argument_heads_mlp", "MLP senders"))
    return section


def mlp_regression_section(store, facts: pd.DataFrame, folder: Path, options: Options) -> Section:
    frame = store.read_table("mlp_regression")
    section = new_section(
        "mlp_regression",
        "MLP activation: re-weighting of head outputs (Lv et al.)",
        "Each MLP's output at the last position is fitted by least squares on the outputs of the "
        "heads that feed it: a positive coefficient means the MLP adds that head's direction back "
        "(amplifies it), a negative one that it erases it. R² says how much of the MLP output the "
        "heads explain; the rest is the MLP's own component. The linearized coefficient is the "
        "exact first-order answer: the MLP's Jacobian at its actual input applied to the head's "
        "output, projected back on that output.",
        frame,
    )
    if frame.empty:
        return section
    section.notes.append(
        _choices(store, "mlp_regression", ("regressors", "pooled", "intercept", "space", "linearized"))
    )
    fit = store.read_table("mlp_regression", "fit")
    for label, suffix, rows in _variants(frame, facts):
        fits = fit[fit["fact_id"].isin(set(rows["fact_id"]))]
        coefs = coefficients(rows, fits)
        feeding = coefs[coefs["source_layer"] == coefs.groupby("layer")["source_layer"].transform("max")]
        fig = head_grid(
            feeding, "coef", f"Regression coefficient of each head{label}", "β", diverging=True, clip=0.95
        )
        section.figures.append(
            save_figure(fig, folder, f"mlp_regression_coef{suffix}", f"Coefficients{label}")
        )
        if feeding["linear_coef"].notna().any():
            fig = head_grid(
                feeding,
                "linear_coef",
                f"Linearized coefficient ⟨J o, o⟩/‖o‖²{label}",
                "β_lin",
                diverging=True,
            )
            section.figures.append(
                save_figure(fig, folder, f"mlp_regression_linear{suffix}", f"Linearized coefficients{label}")
            )
        section.notes.append(_activation_sentence(store, coefs, label))
        fig = mean_curves(
            fits.assign(fit="R²"),
            y="r2",
            group="fit",
            title=f"Fit of each MLP on its heads{label}",
            ylabel="R²",
        )
        section.figures.append(save_figure(fig, folder, f"mlp_regression_r2{suffix}", f"R² per layer{label}"))
        ranked = coefs.assign(head=_head_label(coefs, "source_layer"))
        shown = ["layer", "head", "coef", "coef_ci", "frac_positive", "linear_coef", "r2"]
        for title, order in (("amplified", False), ("erased", True)):
            top = ranked.sort_values("coef", ascending=order).head(6)
            section.tables.append(Table.of(f"Most {title} heads (MLP layer, head){label}", top[shown], 3))
        if "subject_rank_before" in fits:
            ranks = fits.groupby("layer")[["subject_rank_before", "subject_rank_after"]].median()
            ranks["improvement"] = ranks["subject_rank_before"] - ranks["subject_rank_after"]
            best = ranks.sort_values("improvement", ascending=False).head(6).reset_index()
            section.tables.append(
                Table.of(f"Layers whose MLP most raises the subject's rank (median ranks){label}", best, 1)
            )
    return section


def _activation_sentence(store, coefs: pd.DataFrame, label: str) -> str:
    """What the MLP right after the strongest argument passer does with that head (when both ran)."""
    if "argument_heads" not in store.methods():
        return f"Mean R² over layers{label}: {coefs.groupby('layer')['r2'].first().mean():.3f}."
    heads = store.read_table("argument_heads")
    if heads.empty or heads["delta"].isna().all():
        return f"Mean R² over layers{label}: {coefs.groupby('layer')['r2'].first().mean():.3f}."
    best = heads.groupby(["layer", "head"])["delta"].mean().idxmin()
    row = coefs[(coefs["source_layer"] == best[0]) & (coefs["head"] == best[1])]
    if row.empty:
        return f"The MLPs fitted here do not read head L{best[0]}H{best[1]} (the strongest argument passer)."
    row = row.iloc[0]
    low, high = row["coef"] - row["coef_ci"], row["coef"] + row["coef_ci"]
    verdict = "amplified" if low > 0 else "erased" if high < 0 else "neither amplified nor erased"
    return (
        f"MLP {int(row['layer'])} after the strongest argument passer L{best[0]}H{best[1]}{label}: β = "
        f"{row['coef']:+.3f} ± {row['coef_ci']:.3f} (linearized {row['linear_coef']:+.3f}), R² of the fit "
        f"{row['r2']:.3f}: {verdict}."
    )


def function_application_section(store, facts: pd.DataFrame, folder: Path, options: Options) -> Section:
    frame = store.read_table("function_application")
    section = new_section(
        "function_application",
        "Function application: MLP components toward the answer (Lv et al.)",
        "Each MLP's output at the last position (and its remainder after the fit on its heads) decoded "
        "with the frozen final-norm scale: the logit and rank of the answer, its rank among the answers "
        "of the same relation (1 = the component points to this subject's answer, not just any answer "
        "of the relation), and the counterfactual check: with another subject in the prompt, does the "
        "component follow the new subject's answer?",
        frame,
    )
    if frame.empty:
        return section
    section.notes.append(
        _choices(store, "function_application", ("components", "regressors", "intercept", "space", "target"))
    )
    for label, suffix, rows in _variants(frame, facts):
        for y, ylabel in (
            ("relation_rank", "rank among the relation's answers"),
            ("shift", "shift (logits)"),
        ):
            if rows[y].notna().any():
                fig = mean_curves(
                    rows,
                    y=y,
                    group="component",
                    title=f"{ylabel.capitalize()} per layer{label}",
                    ylabel=ylabel,
                )
                section.figures.append(
                    save_figure(fig, folder, f"function_application_{y}{suffix}", f"{ylabel}{label}")
                )
        table = function_summary(rows)
        shown = ["layer", "component", "logit", "rank_median", "relation_rank", "relation_top1"]
        shown += ["follow_rate", "shift", "shift_ci", "n"]
        best = table.sort_values("relation_top1", ascending=False).head(6)[shown]
        section.tables.append(
            Table.of(f"Layers whose component best picks this subject's answer{label}", best, 3)
        )
    return section


def anti_overconfidence_section(store, facts: pd.DataFrame, folder: Path, options: Options) -> Section:
    frame = store.read_table("anti_overconfidence")
    section = new_section(
        "anti_overconfidence",
        "Anti-overconfidence in the final layer (Lv et al.)",
        "Direct contribution of every final-layer component (heads, MLP, top neurons; frozen final-norm "
        "scale) to the answer's logit, and a label-free mitigation: the component and scale that most "
        "raise the answer's log-probability on a training split, applied to every input alike, "
        "evaluated on held-out facts (accuracy, mean probability, calibration) and on generic text "
        "(perplexity). Gains are held-out after − before with paired-bootstrap 95% intervals.",
        frame,
    )
    if frame.empty:
        return section
    section.notes.append(
        _choices(
            store,
            "anti_overconfidence",
            ("target", "train_fraction", "seed", "scales", "positions", "top_neurons", "layers_from_end"),
        )
    )
    tables = {
        n: store.read_table("anti_overconfidence", n) for n in ("facts", "fit", "mitigation", "perplexity")
    }
    mitigation = tables["mitigation"]
    if not mitigation.empty:
        row = mitigation.iloc[0]
        section.notes.append(_mitigation_sentence(row))
        card = pd.DataFrame({"quantity": list(row.index), "value": [_plain(v) for v in row.to_numpy()]})
        section.tables.append(Table.of("The mitigation and its held-out evaluation", card, 4))
    components = anti_summary(frame, tables)
    bars = components.set_index("component")[["logit", "iw"]]
    fig = grouped_bars(bars, "Final-layer components: mean direct effect on the answer", "logits")
    section.figures.append(
        save_figure(fig, folder, "anti_overconfidence_components", "Final-layer components")
    )
    shown = [
        c for c in ("layer", "component", "logit", "logit_ci", "iw", "frac_negative", "candidate", "chosen")
    ]
    ranked = components.sort_values("logit")[[c for c in shown if c in components]]
    section.tables.append(Table.of("Final-layer components, most negative first", ranked.head(12), 3))
    if not tables["fit"].empty:
        best = tables["fit"].sort_values("train_gain", ascending=False).head(12)
        section.tables.append(Table.of("Training grid: best candidate × scale cells", best, 4))
    for label, _, rows in _variants(tables["facts"], facts):
        if label:
            columns = [c for c in rows.columns if c.endswith(("_before", "_after"))]
            means = rows.groupby("split")[columns].mean().reset_index()
            section.tables.append(Table.of(f"Means per split{label}", means, 4))
    return section


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def _mitigation_sentence(row: pd.Series) -> str:
    lowers = f"The final layer lowers the answer's logit in {row['lowers_fraction']:.1%} of facts."
    if row["component"] == "none":
        return lowers + " No candidate × scale raised the training log-probability: no mitigation."
    return (
        f"{lowers} Mitigation: {row['component']} of layer {row['layer']} × {row['scale']:g}. Held-out "
        f"mean probability {row['mean_prob_before']:.3f} → {row['mean_prob_after']:.3f} "
        f"(gain {row['mean_prob_gain']:+.3f}, 95% CI [{row['mean_prob_gain_low']:+.3f}, "
        f"{row['mean_prob_gain_high']:+.3f}]); accuracy {row['accuracy_before']:.3f} → "
        f"{row['accuracy_after']:.3f}; ECE {row['ece_before']:.3f} → {row['ece_after']:.3f}; perplexity "
        f"of generic text {row['perplexity_before']:.2f} → {row['perplexity_after']:.2f}."
    )


SECTIONS = {
    "argument_heads": argument_heads_section,
    "mlp_regression": mlp_regression_section,
    "function_application": function_application_section,
    "anti_overconfidence": anti_overconfidence_section,
}
