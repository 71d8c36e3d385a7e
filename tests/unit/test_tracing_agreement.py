"""Agreement between causal-tracing maps, from synthetic tables (pandas only)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from recallscope.methods.general.summaries import agreement, agreement_summary, importance_maps, peaks


def _frame(values: dict[tuple[str, str], np.ndarray]) -> pd.DataFrame:
    """One fact, kind mlp; per (corruption, direction) the prob map ``[P, L]`` (position 0 before the
    subject, 1 its last token, then the last token); KL falls as the probability rises."""
    buckets = ["before subject", "last subject", "last token"]
    rows = [
        dict(fact_id="f", span="subject", kind="mlp", corruption=corruption, direction=direction,
             position=position, layer=layer, bucket=buckets[position], prob=prob, logprob=np.log(prob),
             logit_diff=np.nan, kl=1 - prob)
        for (corruption, direction), grid in values.items()
        for (position, layer), prob in np.ndenumerate(grid)
    ]  # fmt: skip
    return pd.DataFrame(rows)


def test_same_maps_agree_and_opposite_directions_are_oriented():
    grid = np.array([[0.5, 0.5, 0.5], [0.1, 0.9, 0.3], [0.2, 0.4, 0.6]])
    frame = _frame({("gaussian", "denoising"): grid, ("subject_swap", "noising"): 1 - grid})
    maps = importance_maps(frame)
    assert set(maps["map"]) == {
        f"{c}/{m}" for c in ("gaussian/denoising", "subject_swap/noising") for m in ("prob", "logprob", "kl")
    }
    assert (maps["position"] > 0).all()  # positions before the span are dropped
    pairs = agreement(frame).set_index(["a", "b"])
    # noising with 1 - grid means patching the same cells breaks the answer: the same importance ranking
    assert pairs.loc[("gaussian/denoising/prob", "subject_swap/noising/prob"), "spearman"] == pytest.approx(
        1.0
    )
    assert pairs.loc[("gaussian/denoising/prob", "gaussian/denoising/kl"), "spearman"] == pytest.approx(1.0)
    assert bool(pairs.loc[("gaussian/denoising/prob", "subject_swap/noising/prob"), "same_peak"])
    where = peaks(frame).set_index("map")
    assert (
        where.loc["gaussian/denoising/prob", "bucket"] == "last subject"
        and where.loc["gaussian/denoising/prob", "layer"] == 1
    )


def test_reversed_maps_disagree():
    grid = np.array([[0.5, 0.5], [0.1, 0.9], [0.2, 0.4]])
    reversed_ = grid.copy()
    reversed_[1:] = 1 - grid[1:]
    frame = _frame({("gaussian", "denoising"): grid, ("resample", "denoising"): reversed_})
    summary = agreement_summary(frame).set_index(["a", "b"])
    row = summary.loc[("gaussian/denoising/prob", "resample/denoising/prob")]
    assert row["spearman"] == pytest.approx(-1.0) and row["same_peak"] == 0.0 and row["n_facts"] == 1
