"""Torch-free summaries of the general methods' stored tables (causal tracing).

The report imports these, so they use pandas and numpy only (no torch, no method module).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

BUCKETS = (
    "before subject",
    "first subject",
    "middle subject",
    "last subject",
    "first subsequent",
    "further tokens",
    "last token",
)
"""ROME's position classes when the subject is corrupted (:func:`bucket_names` for other spans)."""


def bucket_names(span: str = "subject") -> tuple[str, ...]:
    """The position classes, in order, when ``span`` is corrupted ("first answer_1", …)."""
    return tuple(b.replace("subject", span) for b in BUCKETS)


def position_class(t: int, b: int, e: int, n: int) -> str:
    """ROME's class of position ``t`` of ``n`` when the subject is ``[b, e)``."""
    if t == n - 1:
        return "last token"
    if t < b:
        return "before subject"
    if t == e - 1:
        return "last subject"
    if t == b:
        return "first subject"
    if t < e:
        return "middle subject"
    return "first subsequent" if t == e else "further tokens"


def average_by_bucket(frame: pd.DataFrame) -> pd.DataFrame:
    """ROME's average over facts of a :meth:`CausalTracingResult.to_frame` table.

    Each fact's positions of a class (e.g. the middle subject tokens) are averaged first, then the
    facts, so that every fact weighs the same. Columns: (span, corruption, direction,) kind, bucket,
    layer, indirect_effect, score, (normalized,) n_facts.
    """
    if frame.empty:
        return frame
    keys = [k for k in ("span", "corruption", "direction") if k in frame] + ["kind", "bucket", "layer"]
    values = [v for v in ("indirect_effect", "score", "normalized") if v in frame]
    per_fact = frame.groupby(["fact_id", *keys], sort=False)[values]
    grouped = per_fact.mean().reset_index().groupby(keys, sort=False)
    out = grouped[values].mean()
    out["n_facts"] = grouped.size()
    return out.reset_index()


def first_trace(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of a causal-tracing table's first corruption, denoising (all rows of a table written
    before corruptions and directions were columns): the one trace readings across runs compare.
    """
    for column, wanted in (("corruption", None), ("direction", "denoising")):
        if column in frame.columns and not frame.empty:
            pick = wanted if wanted in set(frame[column]) else frame[column].iloc[0]
            frame = frame[frame[column] == pick]
    return frame


METRIC_COLUMNS = ("prob", "logprob", "logit_diff", "kl")
"""The metric columns of a causal-tracing table (every cell has all of them)."""


def importance_maps(frame: pd.DataFrame) -> pd.DataFrame:
    """Every (corruption, direction, metric) map of a causal-tracing table in one orientation.

    Rows from the corrupted span on (earlier positions are the same in both runs), with ``map``
    (``"<corruption>/<direction>/<metric>"``) and ``importance``: larger means patching the state
    matters more (denoising: the metric, noising: minus it; KL, which falls toward the clean run,
    flipped). Maps that are undefined (``logit_diff`` without a subject swap) are dropped.
    """
    rows = frame[~frame["bucket"].str.startswith("before")]
    rows = rows.assign(
        corruption=rows.get("corruption", "gaussian"), direction=rows.get("direction", "denoising")
    )
    ids = ["fact_id", "span", "kind", "corruption", "direction", "position", "layer", "bucket"]
    metrics = [m for m in METRIC_COLUMNS if m in rows]
    long = rows.melt(id_vars=ids, value_vars=metrics, var_name="metric", value_name="value").dropna(
        subset=["value"]
    )
    sign = np.where(long["direction"] == "noising", -1.0, 1.0) * np.where(long["metric"] == "kl", -1.0, 1.0)
    name = long["corruption"] + "/" + long["direction"] + "/" + long["metric"]
    return long.assign(map=name, importance=long["value"] * sign)


def agreement(frame: pd.DataFrame) -> pd.DataFrame:
    """Per fact, span, kind and pair of maps (:func:`importance_maps`): the Spearman rank correlation
    of the two position × layer maps and whether they peak in the same cell.

    Columns: fact_id, span, kind, a, b, spearman, same_peak.
    """
    maps = importance_maps(frame)
    out = []
    for (fact, span, kind), rows in maps.groupby(["fact_id", "span", "kind"], sort=False):
        grid = rows.pivot_table(index=["position", "layer"], columns="map", values="importance", sort=False)
        corr = grid.rank().corr()  # Pearson of ranks (average ties) = Spearman
        peak = grid.idxmax()
        names = list(grid.columns)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                out.append((fact, span, kind, a, b, float(corr.loc[a, b]), peak[a] == peak[b]))
    return pd.DataFrame(out, columns=["fact_id", "span", "kind", "a", "b", "spearman", "same_peak"])


def agreement_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """:func:`agreement` averaged over facts: mean Spearman, share of facts with the same peak, n_facts."""
    pairs = agreement(frame)
    if pairs.empty:
        return pairs
    grouped = pairs.groupby(["span", "kind", "a", "b"], sort=False)
    out = grouped.agg(
        spearman=("spearman", "mean"), same_peak=("same_peak", "mean"), n_facts=("fact_id", "nunique")
    )
    return out.reset_index()


def peaks(frame: pd.DataFrame) -> pd.DataFrame:
    """Where each map peaks, per fact, span and kind: columns fact_id, span, kind, map, bucket, layer."""
    maps = importance_maps(frame)
    best = maps.loc[maps.groupby(["fact_id", "span", "kind", "map"], sort=False)["importance"].idxmax()]
    return best[["fact_id", "span", "kind", "map", "bucket", "layer"]].reset_index(drop=True)


def verification_summary(verified: pd.DataFrame) -> pd.DataFrame:
    """Attribution patching against real patching, per node type: Spearman and Pearson correlation
    of AtP with the exact effects over the verified nodes (all facts pooled), the largest and the mean
    absolute error, the mean absolute exact effect, and the counts.

    Columns: node, n_nodes, n_facts, spearman, pearson, max_abs_error, mean_abs_error, mean_abs_exact.
    """
    columns = [
        "node",
        "n_nodes",
        "n_facts",
        "spearman",
        "pearson",
        "max_abs_error",
        "mean_abs_error",
        "mean_abs_exact",
    ]
    rows = []
    for node, part in verified.groupby("node", sort=False):
        error = (part["atp"] - part["exact"]).abs()
        ranks = part[["atp", "exact"]].rank()
        rows.append(
            (node, len(part), part["fact_id"].nunique(), ranks["atp"].corr(ranks["exact"]),
             part["atp"].corr(part["exact"]), error.max(), error.mean(), part["exact"].abs().mean())
        )  # fmt: skip
    return pd.DataFrame(rows, columns=columns)
