"""The promote-then-suppress summary of one-to-many recall (Yan & Jia 2025, ``methods.md`` §2.5).

Yan & Jia's finding, per answer step: upper-layer MLPs **promote** the answers — the current one and
those not generated yet — while attention reading the **previous answers' spans** suppresses the
answers already given, so the model does not repeat itself. This module tests both halves on the
results of :mod:`~recallscope.methods.yan_jia2025.early_decoding` (MLP updates decoded per layer) and
:mod:`~recallscope.methods.yan_jia2025.token_lens` (attention updates decoded per source span)::

    early = rs.methods.early_decoding.run(model, facts).to_frame()
    lens = rs.methods.token_lens.run(model, facts).to_frame()
    summary = promote_then_suppress(early, lens, n_layers=model.n_layers)
    for line in summary["line"]:
        print(line)

Every number is a sum of frozen-scale direct logits over the upper layers (``ℓ ≥ upper_from``,
default the upper half, as the paper's figures show layers 16–32 of 32), averaged over the step's
facts, with a 95% normal-approximation half-width.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["promote_then_suppress", "per_fact_stats", "STATS"]

_NEGATIVE = ("lens_previous", "lens_current", "attn_previous")
"""Statistics whose ``_frac`` counts facts below 0 (the others: above 0)."""

STATS = {
    "mlp_current": "upper MLPs on the current answer",
    "mlp_future": "upper MLPs on the answers not generated yet",
    "mlp_previous": "upper MLPs on the previous answers",
    "lens_previous": "attention from each previous answer's span on that answer",
    "lens_current": "attention from the previous answers' spans on the current answer",
    "attn_previous": "upper attention (all sources) on the previous answers",
}
"""The per-fact statistics, each a sum over the upper layers (mean over answers of the role)."""


def _per_fact(rows: pd.DataFrame) -> pd.Series:
    """Per fact: Σ over upper layers, then the mean over the tracked answers of the selection."""
    if rows.empty:
        return pd.Series(dtype=float)
    summed = rows.groupby(["fact_id", "tracked"])["logit"].sum()
    return summed.groupby(level="fact_id").mean()


def _stats(early: pd.DataFrame, lens: pd.DataFrame | None) -> dict[str, pd.Series]:
    mlp, attn = early[early["site"] == "mlp"], early[early["site"] == "attn"]
    out = {
        "mlp_current": _per_fact(mlp[mlp["role"] == "current"]),
        "mlp_future": _per_fact(mlp[mlp["role"] == "future"]),
        "mlp_previous": _per_fact(mlp[mlp["role"] == "previous"]),
        "attn_previous": _per_fact(attn[attn["role"] == "previous"]),
    }
    if lens is not None and not lens.empty:
        from_answers = lens[lens["span"].str.startswith("answer_")]
        own = from_answers[
            (from_answers["span"] == from_answers["tracked"]) & (from_answers["role"] == "previous")
        ]
        out["lens_previous"] = _per_fact(own)
        current = from_answers[from_answers["role"] == "current"]
        out["lens_current"] = (
            current.groupby("fact_id")["logit"].sum() if not current.empty else pd.Series(dtype=float)
        )
    return out


def _mean_ci(values: pd.Series) -> tuple[float, float, int]:
    n = len(values)
    if n == 0:
        return float("nan"), float("nan"), 0
    half = 1.96 * float(values.std(ddof=1)) / np.sqrt(n) if n > 1 else float("nan")
    return float(values.mean()), half, n


def per_fact_stats(
    early: pd.DataFrame,
    lens: pd.DataFrame | None = None,
    *,
    n_layers: int | None = None,
    upper_from: int | None = None,
) -> pd.DataFrame:
    """One row per fact and answer step: ``fact_id, step`` and each statistic of :data:`STATS` that
    the step has (NaN where a fact has none); inputs as :func:`promote_then_suppress`.
    """
    n_layers = n_layers or int(early["layer"].max()) + 1
    upper_from = n_layers // 2 if upper_from is None else upper_from
    frames = []
    for step in sorted(early["step"].unique()):
        e = early[(early["step"] == step) & (early["layer"] >= upper_from)]
        lens_step = None if lens is None else lens[(lens["step"] == step) & (lens["layer"] >= upper_from)]
        stats = {name: values for name, values in _stats(e, lens_step).items() if len(values)}
        frame = pd.DataFrame(stats, index=pd.Index(sorted(e["fact_id"].unique()), name="fact_id"))
        frames.append(frame.reset_index().assign(step=int(step)))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["fact_id", "step"])


def promote_then_suppress(
    early: pd.DataFrame,
    lens: pd.DataFrame | None = None,
    *,
    n_layers: int | None = None,
    upper_from: int | None = None,
) -> pd.DataFrame:
    """One row per answer step: the promotion and suppression numbers and a one-line verdict.

    Args:
        early: :mod:`early_decoding` rows (``fact_id, step, site, layer, tracked, role, logit``).
        lens: :mod:`token_lens` rows (``fact_id, step, layer, span, tracked, role, logit``), or None.
        n_layers: the model's layers (default: the largest layer in ``early`` + 1).
        upper_from: first upper layer (default ``n_layers // 2``).

    Returns:
        Columns ``step, n_facts, upper_from``, for each statistic of :data:`STATS` its mean, ``_ci``
        (95% half-width) and ``_frac`` (fraction of facts with the expected sign: > 0 for MLP
        promotion, < 0 for the attention statistics), ``promote`` (upper MLPs raise the current
        answer and do not lower the future ones), ``suppress`` (attention from each previous answer's
        span lowers that answer, and more than it lowers the current one; None when a step has
        nothing to suppress) and ``line`` (the sentence).
    """
    n_layers = n_layers or int(early["layer"].max()) + 1
    upper_from = n_layers // 2 if upper_from is None else upper_from
    stats = per_fact_stats(early, lens, n_layers=n_layers, upper_from=upper_from)
    rows = []
    for step, per_fact in stats.groupby("step", sort=True):
        row: dict = {"step": int(step), "n_facts": per_fact["fact_id"].nunique(), "upper_from": upper_from}
        for name in STATS:
            values = per_fact[name].dropna() if name in per_fact else pd.Series(dtype=float)
            if values.empty:
                continue
            mean, ci, n = _mean_ci(values)
            negative = name in _NEGATIVE
            frac = float(((values < 0) if negative else (values > 0)).mean())
            row.update({name: mean, f"{name}_ci": ci, f"{name}_frac": frac})
        row["promote"] = bool(row["mlp_current"] > 0 and not row.get("mlp_future", 0) < 0)
        previous, current = row.get("lens_previous", np.nan), row.get("lens_current", np.nan)
        specific = np.isnan(current) or previous < current  # the given answer more than the new one
        row["suppress"] = None if np.isnan(previous) else bool(previous < 0 and specific)
        row["line"] = _line(row, n_layers)
        rows.append(row)
    return pd.DataFrame(rows)


def _fmt(row: dict, name: str) -> str:
    mean, ci, frac = row.get(name, np.nan), row.get(f"{name}_ci", np.nan), row.get(f"{name}_frac", np.nan)
    ci_text = "" if np.isnan(ci) else f" ± {ci:.2f}"
    return f"{mean:+.2f}{ci_text} ({frac:.0%} of facts {'<' if name in _NEGATIVE else '>'} 0)"


def _line(row: dict, n_layers: int) -> str:
    layers = f"L{row['upper_from']}–{n_layers - 1}"
    parts = [f"Step {row['step']} ({row['n_facts']} facts): MLPs in {layers} give the current answer "]
    parts.append(_fmt(row, "mlp_current"))
    if not np.isnan(row.get("mlp_future", np.nan)):
        parts.append(f", the answers not generated yet {_fmt(row, 'mlp_future')}")
    if not np.isnan(row.get("mlp_previous", np.nan)):
        parts.append(f", the answers already given {_fmt(row, 'mlp_previous')}")
    if row["suppress"] is None:
        parts.append(f"; no previous answer to suppress. Promotion: {'yes' if row['promote'] else 'no'}.")
        return "".join(parts)
    parts.append(
        f"; attention from each previous answer's span gives that answer {_fmt(row, 'lens_previous')}"
    )
    if not np.isnan(row.get("lens_current", np.nan)):
        parts.append(f" and the current answer {_fmt(row, 'lens_current')}")
    both = row["promote"] and row["suppress"]
    verdict = "yes" if both else "no" if not (row["promote"] or row["suppress"]) else "partly"
    parts.append(
        f". Promote-then-suppress: {verdict} "
        f"(promotion {'yes' if row['promote'] else 'no'}, suppression {'yes' if row['suppress'] else 'no'})."
    )
    return "".join(parts)
