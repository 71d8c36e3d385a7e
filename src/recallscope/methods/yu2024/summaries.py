"""Torch-free summaries of Yu & Ananiadou's stored tables (neuron ablation).

The report imports these, so they use pandas and numpy only (no torch, no method module).
"""

from __future__ import annotations

import pandas as pd

from recallscope.stats import mean_ci

SUMMARY_COLUMNS = (
    "mrr_drop_pct",
    "prob_drop_pct",
    "logprob_drop",
    "mrr",
    "prob",
    "logprob",
    "clean_mrr",
    "clean_prob",
    "clean_logprob",
)


def neuron_ablation_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Per method × budget: mean drops and metrics across facts with 95% CIs (``<column>_ci``), ``n`` facts.

    Random rows are first averaged over seeds per fact. ``mrr_drop_pct_pooled`` and
    ``prob_drop_pct_pooled`` are the drops of the means, ``100·(1 − mean after / mean clean)``.

    Args:
        frame: :meth:`NeuronAblationResult.to_frame` rows, possibly of many chunks.
    """
    keys = ["fact_id", "method", "budget"]
    per_fact = frame.groupby(keys, sort=False)[list(SUMMARY_COLUMNS)].mean().reset_index()
    out = mean_ci(per_fact, ["method", "budget"], SUMMARY_COLUMNS)
    for name in ("mrr", "prob"):
        out[f"{name}_drop_pct_pooled"] = 100 * (1 - out[name] / out[f"clean_{name}"])
    return out
