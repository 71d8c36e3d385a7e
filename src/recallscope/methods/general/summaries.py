"""Torch-free summaries of the general methods' stored tables (causal tracing).

The report imports these, so they use pandas and numpy only (no torch, no method module).
"""

from __future__ import annotations

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


def average_by_bucket(frame: pd.DataFrame) -> pd.DataFrame:
    """ROME's average over facts of a :meth:`CausalTracingResult.to_frame` table.

    Each fact's positions of a class (e.g. the middle subject tokens) are averaged first, then the
    facts, so that every fact weighs the same. Columns: (span,) kind, bucket, layer, indirect_effect,
    score, n_facts.
    """
    if frame.empty:
        return frame
    spans = ["span"] if "span" in frame else []
    keys = [*spans, "kind", "bucket", "layer"]
    per_fact = frame.groupby(["fact_id", *keys], sort=False)[["indirect_effect", "score"]]
    grouped = per_fact.mean().reset_index().groupby(keys, sort=False)
    out = grouped[["indirect_effect", "score"]].mean()
    out["n_facts"] = grouped.size()
    return out.reset_index()
