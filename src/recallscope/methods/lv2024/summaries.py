"""Torch-free summaries of Lv et al.'s stored tables (argument heads, MLP regression, function
application, anti-overconfidence).

The report imports these, so they use pandas and numpy only (no torch, no method module).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from recallscope.errors import RecallscopeError
from recallscope.stats import mean_ci


def anti_overconfidence_summary(
    frame: pd.DataFrame, tables: dict[str, pd.DataFrame] | None = None
) -> pd.DataFrame:
    """Per component over all facts of ``frame`` (a :meth:`AntiOverconfidenceResult.to_frame`).

    Returns:
        One row per ``layer`` × ``component`` (frame order) with ``kind``, ``index``, ``logit`` and
        ``iw`` (means), ``logit_ci`` / ``iw_ci`` (1.96 standard errors), ``n``, ``frac_negative``
        (share of facts where the logit contribution is < 0), ``train_logit`` (mean over train facts),
        and, when ``tables`` holds ``fit`` and ``mitigation``, ``candidate`` and ``chosen`` flags.
    """
    missing = {"fact_id", "split", "component", "kind", "layer", "index", "logit", "iw"} - set(frame.columns)
    if missing:
        raise RecallscopeError(
            f"anti_overconfidence summary needs the method's frame; missing columns {sorted(missing)}"
        )
    keys = ["layer", "component", "kind", "index"]
    out = mean_ci(frame, keys, ["logit", "iw"])
    grouped = frame.assign(negative=(frame.logit < 0).astype(float)).groupby(keys, sort=False)
    out["frac_negative"] = grouped["negative"].mean().to_numpy()
    train = frame[frame.split == "train"].groupby(keys, sort=False)["logit"].mean()
    out["train_logit"] = out.set_index(keys).index.map(train.to_dict()).astype(float)
    if tables and "fit" in tables and "mitigation" in tables:
        fit, chosen = tables["fit"], tables["mitigation"].iloc[0]
        pairs = set(zip(fit.layer, fit.component, strict=True))
        out["candidate"] = [pair in pairs for pair in zip(out.layer, out.component, strict=True)]
        out["chosen"] = (out.layer == chosen.layer) & (out.component == chosen.component)
    return out


def scores(frame: pd.DataFrame) -> pd.DataFrame:
    """Per head over the facts of ``frame`` (:meth:`ArgumentHeadsResult.to_frame`, chunks concatenated).

    Returns:
        One row per ``layer`` × ``head``: ``attention`` and ``subject_logit`` (means over facts),
        ``r`` (Pearson correlation of attention and subject_logit over facts; NaN with fewer than 2
        facts or a constant column), ``delta`` and ``delta_pct`` (means) with ``delta_ci`` and
        ``delta_pct_ci`` (95% normal half-widths, 1.96 × standard error; NaN without path
        patching), and ``n`` (facts).
    """
    missing = {"fact_id", "layer", "head", "attention", "subject_logit", "delta", "delta_pct"} - set(
        frame.columns
    )
    if missing:
        raise RecallscopeError(
            f"argument_heads scores need a frame with columns fact_id, layer, head, attention, "
            f"subject_logit, delta, delta_pct; missing {sorted(missing)}: pass "
            "ArgumentHeadsResult.to_frame() (or the stored table)"
        )
    frame = frame.sort_values(["layer", "head"], kind="stable")
    out = mean_ci(frame, ["layer", "head"], ["attention", "subject_logit", "delta", "delta_pct"])
    out = out.drop(columns=["attention_ci", "subject_logit_ci"])
    r = frame.groupby(["layer", "head"], sort=False).apply(_pearson, include_groups=False)
    out["r"] = r.to_numpy()
    columns = [
        "layer",
        "head",
        "attention",
        "subject_logit",
        "r",
        "delta",
        "delta_ci",
        "delta_pct",
        "delta_pct_ci",
        "n",
    ]
    return out[columns].reset_index(drop=True)


def _pearson(group: pd.DataFrame) -> float:
    x, y = group["attention"].to_numpy(float), group["subject_logit"].to_numpy(float)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def argument_passers(
    frame: pd.DataFrame, *, min_r: float = 0.0, min_attention: float = 0.1, top: int = 5
) -> pd.DataFrame:
    """:func:`scores` with the rule that flags argument-passing heads.

    A head **moves** the subject when, over the facts, ``r > min_r`` (a positive correlation by
    default: a head whose attention to the subject is saturated on every fact has little variance to
    correlate, so a high bar would reject the clearest passers), the mean ``attention ≥
    min_attention`` and the mean ``subject_logit > 0``. It **matters** when its mean path-patching
    ``delta`` is negative and among the ``top`` most negative of all heads. It **passes** the
    argument when both hold. Without path-patching numbers (``delta`` all NaN), ``matters`` is NaN
    and heads pass on ``moves`` alone.

    Returns:
        The scores with ``delta_rank`` (0 = most negative mean delta), ``moves``, ``matters``,
        ``passes``; passers first, then by ``delta``.
    """
    out = scores(frame)
    out["moves"] = (out["r"] > min_r) & (out["attention"] >= min_attention) & (out["subject_logit"] > 0)
    if out["delta"].notna().any():
        out["delta_rank"] = out["delta"].rank(method="first").astype("Int64") - 1
        out["matters"] = (out["delta"] < 0) & (out["delta_rank"] < top)
        out["passes"] = out["moves"] & out["matters"]
    else:
        out["delta_rank"] = pd.array([pd.NA] * len(out), dtype="Int64")
        out["matters"] = np.nan
        out["passes"] = out["moves"]
    order = out.assign(_not=~out["passes"].astype(bool)).sort_values(
        ["_not", "delta", "r"], ascending=[True, True, False]
    )
    return order.drop(columns="_not").reset_index(drop=True)


def function_application_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Per ``layer`` × ``component`` over all facts of ``frame`` (chunks concatenated).

    Columns: ``layer``, ``component``, ``logit`` (mean), ``rank_median``, ``relation_rank`` (mean),
    ``relation_top1`` (share with ``relation_rank == 1``), ``cosine`` (mean), ``follow_rate`` (mean
    of ``follows`` over facts with a counterfactual), ``shift`` (mean), ``shift_ci`` (95% normal
    band), ``n`` (facts) and ``n_counterfactual``.
    """
    missing = {"fact_id", "layer", "component", "logit", "rank", "relation_rank", "follows", "shift"} - set(
        frame.columns
    )
    if missing:
        raise RecallscopeError(
            f"function_application summary needs a frame with columns {COLUMNS}; missing {sorted(missing)}: "
            "pass FunctionApplicationResult.to_frame() (or the stored table)"
        )
    keys = ["layer", "component"]
    grouped = frame.groupby(keys, sort=True)
    out = grouped[["logit", "relation_rank", "cosine"]].mean()
    out.insert(1, "rank_median", grouped["rank"].median())
    out.insert(3, "relation_top1", grouped["relation_rank"].apply(lambda r: float((r == 1).mean())))
    out["follow_rate"] = grouped["follows"].mean()
    out["n"] = grouped.size()
    out = out.reset_index()
    shifts = frame.dropna(subset=["shift"])
    if len(shifts):
        band = mean_ci(shifts, keys, ["shift"]).rename(columns={"n": "n_counterfactual"})
        out = out.merge(band, on=keys, how="left")
    else:
        out["shift"], out["shift_ci"], out["n_counterfactual"] = np.nan, np.nan, 0
    out["n_counterfactual"] = out["n_counterfactual"].fillna(0).astype(np.int64)
    return out


def coefficients(frame: pd.DataFrame, fit: pd.DataFrame | None = None) -> pd.DataFrame:
    """Dataset-wide summary per MLP layer and regressor head (call it on all chunks concatenated).

    Args:
        frame: :meth:`MlpRegressionResult.to_frame` rows (several results concatenated).
        fit: the matching ``fit`` tables, for the layer's mean R².

    Returns:
        One row per ``layer`` × ``source_layer`` × ``head``: ``coef`` (mean over facts), ``coef_ci``
        (95% normal band, 1.96 standard errors), ``n`` (facts), ``frac_positive`` (fraction of facts
        with ``coef > 0``: amplified), ``effective_weight`` (mean ``1 + coef``), ``linear_coef`` (mean),
        ``linear_coef_ci``, and with ``fit`` ``r2`` and ``r2_adjusted`` (means over the layer's fits).
    """
    missing = {"fact_id", "layer", "source_layer", "head", "coef", "linear_coef"} - set(frame.columns)
    if missing:
        raise RecallscopeError(
            f"coefficients needs an mlp_regression frame (fact_id, layer, source_layer, head, coef, "
            f"linear_coef); missing {sorted(missing)}: pass MlpRegressionResult.to_frame() or the stored "
            "table"
        )
    keys = ["layer", "source_layer", "head"]
    out = mean_ci(frame.sort_values(keys, kind="stable"), keys, ["coef", "linear_coef"])
    grouped = frame.groupby(keys, sort=False)
    positive = grouped["coef"].apply(lambda c: float((c > 0).mean()))
    out = out.merge(positive.rename("frac_positive").reset_index(), on=keys)
    weight = grouped["effective_weight"].mean() if "effective_weight" in frame else None
    if weight is not None:
        out = out.merge(weight.rename("effective_weight").reset_index(), on=keys)
    if fit is not None:
        if not {"layer", "r2"} <= set(fit.columns):
            raise RecallscopeError("coefficients: fit must be the mlp_regression 'fit' table (layer, r2)")
        r2 = [c for c in ("r2", "r2_adjusted") if c in fit.columns]
        out = out.merge(fit.groupby("layer")[r2].mean().reset_index(), on="layer", how="left")
    order = [
        *keys,
        "coef",
        "coef_ci",
        "n",
        "frac_positive",
        "effective_weight",
        "linear_coef",
        "linear_coef_ci",
    ]
    order += ["r2", "r2_adjusted"] if fit is not None else []
    return out[[c for c in order if c in out.columns]]


COLUMNS = [
    "fact_id",
    "layer",
    "component",
    "norm",
    "logit",
    "rank",
    "relation_rank",
    "n_candidates",
    "margin",
    "cosine",
    "cosine_others",
    "top_token",
    "cf_logit_new",
    "cf_logit_old",
    "follows",
    "shift",
]
