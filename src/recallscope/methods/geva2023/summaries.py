"""Torch-free summaries of Geva et al.'s stored tables (early patching, extraction rate, head mappings).

The report imports these, so they use pandas and numpy only (no torch, no method module).
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def early_patching_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Extraction rates per ``(source_layer, positions)`` of a :meth:`EarlyPatchingResult.to_frame` table.

    Over the valid layers (``layer > source_layer``) only: ``extraction_rate`` = fraction of facts whose
    patched MHSA output extracts the target at some layer (max over layers, then mean over facts);
    ``clean_rate`` = the same for the unpatched outputs over the same layers; ``n_facts`` (facts with a
    valid layer) and ``n_layers`` (valid layers). A pair with no valid layer (``ℓ0 = L - 1``) gets NaN
    rates and zero counts.
    """
    keys = ["source_layer", "positions"]
    groups = frame[keys].drop_duplicates().set_index(keys).index
    valid = frame[frame["valid"].astype(bool)]
    per_fact = valid.groupby([*keys, "fact_id"], sort=False)[["extracts", "clean_extracts"]].max()
    rates = (
        per_fact.astype(float)
        .groupby(level=keys, sort=False)
        .agg(
            extraction_rate=("extracts", "mean"),
            clean_rate=("clean_extracts", "mean"),
            n_facts=("extracts", "size"),
        )
    )
    rates["n_layers"] = valid.groupby(keys, sort=False)["layer"].nunique()
    out = rates.reindex(groups)
    out[["n_facts", "n_layers"]] = out[["n_facts", "n_layers"]].fillna(0).astype(int)
    return out.reset_index()


def extraction_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """G4/G6 statistics over the facts of a :meth:`ExtractionRateResult.to_frame` frame.

    Returns a one-row frame with columns ``n_facts``; ``attn_example_rate`` / ``mlp_example_rate``
    (fraction of facts with ≥ 1 extraction event); ``attn_layers_mean`` / ``mlp_layers_mean``
    (extracting layers per fact, over all facts) and ``*_layers_mean_extracting`` (over facts with ≥ 1
    event); ``attn_only_pct``, ``mlp_only_pct``, ``both_pct``, ``none_pct`` (co-occurrence, %);
    ``attn_first_pct`` (among "both", % whose first attention event is at or before the first MLP
    event); and ``rank_gap_n``, ``rank_gap_q1``, ``rank_gap_median``, ``rank_gap_q3`` of
    ``subject_rank − attn_rank`` over the (fact, layer) pairs where attention extracts (G6).
    Undefined statistics are NaN.
    """
    per_fact = frame.groupby("fact_id", sort=False)
    counts = {s: per_fact[f"{s}_extracts"].sum() for s in ("attn", "mlp")}
    any_attn, any_mlp = counts["attn"] > 0, counts["mlp"] > 0
    row: dict[str, float] = {"n_facts": len(counts["attn"])}
    for s, n in counts.items():
        row[f"{s}_example_rate"] = float((n > 0).mean())
        row[f"{s}_layers_mean"] = float(n.mean())
        row[f"{s}_layers_mean_extracting"] = float(n[n > 0].mean()) if (n > 0).any() else np.nan
    groups = {
        "attn_only": any_attn & ~any_mlp,
        "mlp_only": ~any_attn & any_mlp,
        "both": any_attn & any_mlp,
        "none": ~any_attn & ~any_mlp,
    }
    row.update({f"{name}_pct": 100 * float(mask.mean()) for name, mask in groups.items()})
    row["attn_first_pct"] = _attn_first_pct(frame, groups["both"])
    events = frame[frame["attn_extracts"]]
    gap = (events["subject_rank"] - events["attn_rank"]).astype(float)
    row["rank_gap_n"] = len(gap)
    for name, q in (("q1", 0.25), ("median", 0.5), ("q3", 0.75)):
        row[f"rank_gap_{name}"] = float(gap.quantile(q)) if len(gap) else np.nan
    return pd.DataFrame([row])


def _attn_first_pct(frame: pd.DataFrame, both: pd.Series) -> float:
    """Among facts where both sublayers extract, % whose first attention event is not later."""
    if not both.any():
        return np.nan
    first = {s: frame[frame[f"{s}_extracts"]].groupby("fact_id")["layer"].min() for s in ("attn", "mlp")}
    facts = both[both].index
    return 100 * float((first["attn"][facts] <= first["mlp"][facts]).mean())


def rank_heads(frame: pd.DataFrame) -> pd.DataFrame:
    """Heads sorted by the fraction of facts whose attribute is in their top-k (ties: lower mean rank).

    Args:
        frame: :meth:`HeadMappingsResult.to_frame` rows (``layer``, ``head``, ``mapping_rank``,
            ``in_top_k``; ``output_rank`` is averaged too when present), possibly of many chunks.

    Returns:
        One row per (layer, head): ``n_facts``, ``n_in_top_k``, ``frac_in_top_k``,
        ``mean_mapping_rank`` (and ``mean_output_rank``), best head first.
    """
    extra = {"mean_output_rank": ("output_rank", "mean")} if "output_rank" in frame else {}
    ranked = (
        frame.groupby(["layer", "head"], as_index=False)
        .agg(
            n_facts=("in_top_k", "size"),
            n_in_top_k=("in_top_k", "sum"),
            frac_in_top_k=("in_top_k", "mean"),
            mean_mapping_rank=("mapping_rank", "mean"),
            **extra,
        )
        .sort_values(
            ["frac_in_top_k", "mean_mapping_rank", "layer", "head"], ascending=[False, True, True, True]
        )
    )
    return ranked.reset_index(drop=True)
