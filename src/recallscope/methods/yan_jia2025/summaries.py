"""Torch-free summaries of Yan & Jia's stored tables (head promotion rates).

The report imports these, so they use pandas and numpy only (no torch, no method module).
"""

from __future__ import annotations

import pandas as pd

from recallscope.errors import RecallscopeError

ROLES = ("subject", "previous", "current", "future")
"""Roles of tracked tokens (``recallscope.core.steps.ROLES``, not imported: it imports torch)."""

_KEYS = ["step", "layer", "head"]


def thresholds(frame: pd.DataFrame) -> pd.DataFrame:
    """Per ``step`` × ``layer``: ``mean`` and population ``std`` of every tracked logit.

    Taken over all heads and examples of ``frame`` (a :meth:`HeadPromotionResult.to_frame`, or
    several concatenated).
    """
    _check_frame(frame)
    grouped = frame.groupby(["step", "layer"], sort=True)["logit"]
    out = grouped.mean().to_frame("mean")
    out["std"] = grouped.std(ddof=0)
    return out.reset_index()


def rates(frame: pd.DataFrame, k: float = 1.0) -> pd.DataFrame:
    """Promotion and suppression rates of every head, with dataset-wide thresholds ``μ ± kσ``.

    Args:
        frame: a :meth:`HeadPromotionResult.to_frame` of all the facts (chunks concatenated).
        k: threshold width in standard deviations.

    Returns:
        One row per ``step`` × ``layer`` × ``head``: ``promotion_rate`` and ``suppression_rate``
        (fractions of examples with any tracked logit above ``μ + kσ`` / below ``μ − kσ``),
        ``n_examples``, the layer's ``mean`` and ``std``, and per role ``promotes_<role>`` /
        ``suppresses_<role>`` (role ∈ subject, previous, current, future): the same fractions over
        the examples that have a token of that role (NaN where none has).
    """
    limits = thresholds(frame)
    flags = frame.merge(limits, on=["step", "layer"], how="left")
    flags["promotes"] = (flags["logit"] > flags["mean"] + k * flags["std"]).astype(float)
    flags["suppresses"] = (flags["logit"] < flags["mean"] - k * flags["std"]).astype(float)
    per_example = flags.groupby([*_KEYS, "fact_id"], sort=True)[["promotes", "suppresses"]].max()
    out = per_example.groupby(level=_KEYS).mean()
    out.columns = ["promotion_rate", "suppression_rate"]
    out["n_examples"] = per_example.groupby(level=_KEYS).size()
    out = out.join(_role_rates(flags)).reset_index()
    return out.merge(limits, on=["step", "layer"], how="left")


def _role_rates(flags: pd.DataFrame) -> pd.DataFrame:
    """``promotes_<role>`` / ``suppresses_<role>`` per step × layer × head (NaN for absent roles)."""
    by_role = flags.pivot_table(
        index=[*_KEYS, "fact_id"], columns="role", values=["promotes", "suppresses"], aggfunc="max"
    )  # [examples, (verb, role)], NaN where the example has no token of the role
    out = by_role.groupby(level=_KEYS).mean()
    out.columns = [f"{verb}_{role}" for verb, role in out.columns]
    return out.reindex(columns=[f"{verb}_{role}" for verb in ("promotes", "suppresses") for role in ROLES])


def _check_frame(frame: pd.DataFrame) -> None:
    missing = {"fact_id", "step", "layer", "head", "role", "logit"} - set(frame.columns)
    if missing:
        raise RecallscopeError(
            f"head_promotion rates need a frame with columns fact_id, step, layer, head, role, logit; "
            f"missing {sorted(missing)}: pass HeadPromotionResult.to_frame() (or the stored table)"
        )
