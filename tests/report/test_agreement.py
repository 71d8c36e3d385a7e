"""Cross-method agreement on constructed profiles: identical rankings agree, reversed ones do not."""

from __future__ import annotations

import numpy as np
import pandas as pd

from recallscope.report.agreement import agreement_pairs, agreement_section, layer_profiles
from report.fake_store import FakeStore

FACTS = [f"f{i}" for i in range(4)]
LAYERS = 12


def _trace(weights) -> pd.DataFrame:
    rows = [(f, "mlp", "last subject", layer, weights[layer]) for f in FACTS for layer in range(LAYERS)]
    return pd.DataFrame(rows, columns=["fact_id", "kind", "bucket", "layer", "indirect_effect"])


def _logprob(weights) -> pd.DataFrame:
    rows = [(f, layer, "mlp", weights[layer]) for f in FACTS for layer in range(LAYERS)]
    return pd.DataFrame(rows, columns=["fact_id", "layer", "sublayer", "logprob_increase"])


def test_identical_rankings_agree_and_reversed_ones_do_not():
    weights = np.linspace(1, 0, LAYERS) ** 2
    same = FakeStore({"causal_tracing": _trace(weights), "logprob_attribution": _logprob(3 * weights)})
    pairs = agreement_pairs(layer_profiles(same))
    row = pairs.iloc[0]
    assert (row["component"], row["method_a"], row["method_b"]) == (
        "mlp",
        "causal tracing",
        "log-prob attribution",
    )
    assert row["spearman"] == 1.0 and row["top_overlap"] == 1.0 and (row["k"], row["n"]) == (5, LAYERS)
    reversed_ = FakeStore({"causal_tracing": _trace(weights), "logprob_attribution": _logprob(weights[::-1])})
    row = agreement_pairs(layer_profiles(reversed_)).iloc[0]
    assert row["spearman"] == -1.0 and row["top_overlap"] == 0.0


def test_one_method_alone_gives_no_section(tmp_path):
    store = FakeStore({"causal_tracing": _trace(np.arange(LAYERS, dtype=float))})
    assert agreement_pairs(layer_profiles(store)).empty and agreement_section(store, tmp_path) is None
    flat = FakeStore(
        {"causal_tracing": _trace(np.ones(LAYERS)), "logprob_attribution": _logprob(np.arange(12.0))}
    )
    assert np.isnan(
        agreement_pairs(layer_profiles(flat)).iloc[0]["spearman"]
    )  # a constant profile ranks nothing
