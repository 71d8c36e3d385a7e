"""Small dataset-wide statistics shared by methods and reports."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

__all__ = ["mean_ci"]


def mean_ci(frame: pd.DataFrame, by: Sequence[str], columns: Sequence[str], z: float = 1.96) -> pd.DataFrame:
    """Mean of ``columns`` per group of ``by``, with ``<column>_ci`` (``z ×`` standard error) and ``n``.

    Groups keep their order of first appearance; a group of one row has a band of 0.
    """
    grouped = frame.groupby(list(by), sort=False)
    out = grouped[list(columns)].mean()
    sem = grouped[list(columns)].sem().fillna(0.0)
    for column in columns:
        out[f"{column}_ci"] = z * sem[column]
    out["n"] = grouped.size()
    return out.reset_index()
