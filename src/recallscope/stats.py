"""Small dataset-wide statistics shared by methods and reports."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

__all__ = ["mean_ci", "bootstrap_ci", "paired_bootstrap_ci", "expected_calibration_error"]


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


def bootstrap_ci(
    values: Sequence[float] | np.ndarray, *, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values``, reproducible with ``seed``.

    ``n_boot`` resamples of ``len(values)`` draws with replacement (``numpy.random.default_rng(seed)``);
    the interval is the ``(1 − level)/2`` and ``(1 + level)/2`` quantiles of the resampled means.
    Returns ``(nan, nan)`` for no values and ``(v, v)`` for one value.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    if x.size == 1:
        return float(x[0]), float(x[0])
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(1)  # [n_boot]
    tail = (1.0 - level) / 2
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def paired_bootstrap_ci(
    before: Sequence[float] | np.ndarray,
    after: Sequence[float] | np.ndarray,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """Mean of ``after − before`` over paired items, with its percentile bootstrap interval.

    The pairs are resampled together (:func:`bootstrap_ci` of the differences). Returns
    ``(mean difference, low, high)``.
    """
    a, b = np.asarray(after, dtype=np.float64), np.asarray(before, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values need one shape, got before {b.shape} and after {a.shape}")
    diff = a - b
    low, high = bootstrap_ci(diff, n_boot=n_boot, seed=seed, level=level)
    return (float(diff.mean()) if diff.size else float("nan")), low, high


def expected_calibration_error(
    confidence: Sequence[float] | np.ndarray, correct: Sequence[float] | np.ndarray, bins: int = 10
) -> float:
    """ECE of top-1 predictions: ``Σ_b (n_b / n) |accuracy_b − mean confidence_b|``.

    Bins split ``[0, 1]`` into ``bins`` equal widths; bin ``b`` holds ``b/bins ≤ conf < (b+1)/bins``
    (a confidence of exactly 1 falls in the last bin). NaN for no items.
    """
    conf = np.asarray(confidence, dtype=np.float64)
    hit = np.asarray(correct, dtype=np.float64)
    if conf.size == 0:
        return float("nan")
    index = np.minimum((conf * bins).astype(np.int64), bins - 1)
    total = 0.0
    for b in np.unique(index):
        members = index == b
        total += members.sum() / conf.size * abs(hit[members].mean() - conf[members].mean())
    return float(total)
