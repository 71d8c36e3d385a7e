"""The promote-then-suppress summary equals hand-computed numbers on small synthetic tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from recallscope.promote_suppress import promote_then_suppress

ROLES = {1: ("current", "future", "future"), 2: ("previous", "current", "future")}


def _early(values):
    """``values[(fact, step, site, layer, answer)] = logit`` → early_decoding rows (4 layers)."""
    rows = []
    for (fact, step, site, layer, j), logit in values.items():
        rows.append(
            dict(
                fact_id=fact,
                step=step,
                site=site,
                layer=layer,
                tracked=f"answer_{j}",
                role=ROLES[step][j - 1],
                logit=logit,
            )
        )
    return pd.DataFrame(rows)


def test_numbers_and_verdicts():
    rng = np.random.default_rng(0)
    values = {}
    for fact in ("a", "b"):
        for step in (1, 2):
            for site in ("attn", "mlp"):
                for layer in range(4):
                    for j in (1, 2, 3):
                        values[(f"{fact}{step}", step, site, layer, j)] = float(rng.normal())
    early = _early(values)
    lens = pd.DataFrame(
        [
            dict(
                fact_id=f,
                step=2,
                layer=layer,
                span=span,
                tracked=f"answer_{j}",
                role=ROLES[2][j - 1],
                logit=v,
            )
            for f, v0 in (("a2", -1.0), ("b2", -3.0))
            for layer in range(4)
            for span in ("subject", "answer_1")
            for j, v in ((1, v0 * (layer >= 2)), (2, 0.5), (3, 0.0))
        ]
    )
    summary = promote_then_suppress(early, lens, n_layers=4).set_index("step")
    for step in (1, 2):
        current = [
            sum(values[(f"{fact}{step}", step, "mlp", layer, step)] for layer in (2, 3))
            for fact in ("a", "b")
        ]
        assert summary.loc[step, "mlp_current"] == pytest.approx(np.mean(current))
        half = 1.96 * np.std(current, ddof=1) / np.sqrt(2)
        assert summary.loc[step, "mlp_current_ci"] == pytest.approx(half)
    future_1 = [
        np.mean([sum(values[(f"{f}1", 1, "mlp", layer, j)] for layer in (2, 3)) for j in (2, 3)])
        for f in "ab"
    ]
    assert summary.loc[1, "mlp_future"] == pytest.approx(np.mean(future_1))
    assert np.isnan(summary.loc[1, "lens_previous"]) and summary.loc[1, "suppress"] is None
    # answer_1's own span lowers answer_1 by v0 in layers 2 and 3: a: -2, b: -6
    assert summary.loc[2, "lens_previous"] == pytest.approx(-4.0)
    assert summary.loc[2, "lens_previous_frac"] == 1.0 and summary.loc[2, "suppress"]
    assert summary.loc[2, "lens_current"] == pytest.approx(1.0)  # 0.5 x 2 upper layers, span answer_1
    assert "Step 2 (2 facts)" in summary.loc[2, "line"] and "Promote-then-suppress" in summary.loc[2, "line"]
    assert "no previous answer to suppress" in summary.loc[1, "line"]


def test_without_token_lens():
    early = _early({("a", 1, "mlp", layer, j): 1.0 for layer in range(2) for j in (1, 2, 3)})
    summary = promote_then_suppress(early)
    assert summary.loc[0, "promote"] and summary.loc[0, "upper_from"] == 1
    assert summary.loc[0, "mlp_current"] == 1.0
