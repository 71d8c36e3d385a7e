"""Report sections of the Yan & Jia suite (one-to-many recall): early decoding, Token Lens, span
knockout → MLP, head promotion/suppression, and the promote-then-suppress summary.

Every figure has one panel per answer step and one line per tracked token's role (subject, previous
answers, the current answer, answers not generated yet), as in the paper.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from recallscope.methods.yan_jia2025.summaries import rates as head_rates
from recallscope.promote_suppress import promote_then_suppress
from recallscope.report.figures import head_scatter, save_figure, step_curves
from recallscope.report.section import Options, Section, Table, new_section

__all__ = [
    "early_decoding_section",
    "token_lens_section",
    "span_knockout_mlp_section",
    "head_promotion_section",
]

_ROLES = (
    "roles: subject (its first token), previous (answers already given), current (this step's "
    "answer), future (answers not generated yet)"
)


def _n_layers(frame: pd.DataFrame) -> int:
    return int(frame["layer"].max()) + 1


def early_decoding_section(store, facts: pd.DataFrame, folder: Path, options: Options) -> Section:
    frame = store.read_table("early_decoding")
    section = new_section(
        "early_decoding",
        "Early decoding of attention and MLP updates (one-to-many)",
        "Each layer's attention and MLP update at the last position, read with the final norm's scale "
        "frozen from the real final residual (direct logits, additive over layers). Yan & Jia find that "
        "MLPs promote every answer, also those not generated yet, while attention suppresses the answers "
        f"already given. Lines are means with 95% bands; {_ROLES}.",
        frame,
    )
    if frame.empty:
        return section
    fig = step_curves(
        frame.replace({"site": {"attn": "attention", "mlp": "MLP"}}),
        y="logit",
        row="site",
        title="Direct logits of the tracked tokens per layer",
        ylabel="logit",
    )
    section.figures.append(
        save_figure(fig, folder, "early_decoding_steps", "Attention vs MLP updates per step")
    )
    _lists_table(store, section)
    lens = store.read_table("token_lens")
    summary = promote_then_suppress(frame, lens if len(lens) else None, n_layers=_n_layers(frame))
    section.notes.extend(summary["line"])
    keep = [c for c in summary.columns if c != "line" and not c.endswith("_frac")]
    section.tables.append(
        Table.of("Promote-then-suppress per step (sums over the upper layers)", summary[keep], 3)
    )
    if not len(lens):
        section.notes.append("Run token_lens too to test the suppression half of promote-then-suppress.")
    return section


def _lists_table(store, section: Section) -> None:
    """The one-to-many data step: how many lists were kept, and why the others were dropped."""
    lists = store.read_json("one_to_many.json")
    if not lists:
        return
    report = lists.get("report", {})
    dropped = ", ".join(f"{why}: {n}" for why, n in report.get("dropped", {}).items()) or "none"
    section.notes.append(
        f"Lists: {report.get('kept', 0)} of {report.get('checked', report.get('subjects', 0))} generated "
        f"(subject, template) lists kept ({report.get('criterion', '')}); dropped: {dropped}."
    )
    kept = set(lists.get("kept", []))
    rows = [
        (fact_id, text.strip()[:120]) for fact_id, text in lists.get("texts", {}).items() if fact_id in kept
    ]
    table = pd.DataFrame(rows, columns=["list", "the model's generation"]).sort_values("list")
    section.tables.append(Table.of("The model's own lists (greedy)", table))


def token_lens_section(store, facts: pd.DataFrame, folder: Path, options: Options) -> Section:
    frame = store.read_table("token_lens")
    section = new_section(
        "token_lens",
        "Token Lens: attention updates by source span (one-to-many)",
        "The part of each layer's attention update at the last position that reads a given span "
        "(subject, a previous answer, the last token; 'other' is the rest), decoded with the frozen "
        "final-norm scale. The parts add up to the attention update. Yan & Jia find that attention to a "
        f"previous answer's span lowers that answer in late layers. {_ROLES}.",
        frame,
    )
    if frame.empty:
        return section
    shown = frame[frame["span"] != "bias"]
    order = ["subject", *sorted(s for s in shown["span"].unique() if s.startswith("answer_")), "last_token"]
    fig = step_curves(
        shown, y="logit", row="span", order=order, title="Token Lens per source span", ylabel="logit"
    )
    section.figures.append(save_figure(fig, folder, "token_lens_steps", "Token Lens per span and step"))
    upper = frame[frame["layer"] >= _n_layers(frame) // 2]
    keys = ["step", "span", "role"]
    per_token = upper.groupby([*keys, "fact_id", "tracked"])["logit"].sum()
    table = per_token.groupby([*keys, "fact_id"]).mean().groupby(keys).mean()
    table = table.rename("mean Σ upper-layer logit").reset_index()
    section.tables.append(Table.of("Mean sum over the upper layers, per step, span and role", table, 3))
    return section


def span_knockout_mlp_section(store, facts: pd.DataFrame, folder: Path, options: Options) -> Section:
    frame = store.read_table("span_knockout_mlp")
    section = new_section(
        "span_knockout_mlp",
        "Span knockout → MLP outputs (one-to-many)",
        "The last position stops attending to a span in every layer and head at once (post-softmax "
        "weights zeroed, not renormalized, unless configured otherwise); Δ is the drop of each MLP "
        "output's direct logit (clean − knockout). Δ > 0: the MLP's promotion of the token needs "
        f"attention to the span; Δ < 0: its suppression does. {_ROLES}.",
        frame,
    )
    if frame.empty:
        return section
    order = ["subject", *sorted(s for s in frame["span"].unique() if s.startswith("answer_"))]
    title = "MLP logit change under span knockout"
    fig = step_curves(frame, y="delta", row="span", order=order, title=title, ylabel="Δ logit")
    section.figures.append(
        save_figure(fig, folder, "span_knockout_mlp_steps", "Knockout Δ per span and step")
    )
    final = store.read_table("span_knockout_mlp", "final")
    if len(final):
        table = final.groupby(["step", "span"], as_index=False)[["p_clean", "p_knockout"]].mean()
        section.tables.append(
            Table.of("Mean final probability of the current answer, clean and knocked out", table, 3)
        )
    return section


def head_promotion_section(store, facts: pd.DataFrame, folder: Path, options: Options) -> Section:
    frame = store.read_table("head_promotion")
    section = new_section(
        "head_promotion",
        "Heads that promote and suppress (one-to-many)",
        "Each head's output at the last position, decoded with the frozen final-norm scale. A head "
        "promotes in an example when a tracked token's logit exceeds μ + kσ of its layer (over all "
        "heads and examples of the step) and suppresses when one falls below μ − kσ.",
        frame,
    )
    if frame.empty:
        return section
    rates = head_rates(frame)
    fig = head_scatter(rates, "Per-head promotion vs suppression rate")
    section.figures.append(
        save_figure(fig, folder, "head_promotion_scatter", "Head promotion vs suppression")
    )
    label = "L" + rates["layer"].astype(str) + "H" + rates["head"].astype(str)
    rates = rates.assign(head_label=label)
    columns = ["step", "head_label", "promotion_rate", "suppression_rate"]
    columns += [c for c in rates.columns if c.startswith(("promotes_", "suppresses_"))]
    for by in ("promotion_rate", "suppression_rate", "suppresses_previous"):
        ranked = rates.dropna(subset=[by]).sort_values(by, ascending=False)
        top = ranked.groupby("step").head(5)[columns]
        section.tables.append(Table.of(f"Heads with the highest {by.replace('_', ' ')} per step", top, 3))
    return section


SECTIONS = {
    "early_decoding": early_decoding_section,
    "token_lens": token_lens_section,
    "span_knockout_mlp": span_knockout_mlp_section,
    "head_promotion": head_promotion_section,
}
