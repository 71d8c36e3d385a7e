"""The scorecard's verdict rule and every claim's measure, on constructed tables whose answer is known."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from recallscope.report import claims as c
from recallscope.report.scorecard import MIN_FACTS, judge, scorecard
from report.fake_store import FakeStore

FACTS = [f"f{i}" for i in range(8)]


def _verdict(claim_key: str, store) -> pd.Series:
    claim = next(claim for claim in c.CLAIMS if claim.key == claim_key)
    return scorecard(store, (claim,)).iloc[0]


# -- the rule -----------------------------------------------------------------------------------------


def test_judge_holds_does_not_hold_and_inconclusive():
    rng = np.random.default_rng(0)
    up = 1.0 + 0.1 * rng.standard_normal(8)
    assert judge(up, 1)["verdict"] == "holds"
    assert judge(up, -1)["verdict"] == "does not hold"
    assert judge(-up, -1)["verdict"] == "holds"
    around_zero = np.array([0.1, -0.1, 0.2, -0.2, 0.05, -0.05, 0.15, -0.15])
    assert judge(around_zero, 1)["verdict"] == "inconclusive" == judge(around_zero, 0)["verdict"]
    few = judge(up[: MIN_FACTS - 1], 1)
    assert few["verdict"] == "inconclusive" and few["ci_low"] > 0  # too few facts, however clear
    assert judge(up, 0)["verdict"] == "holds" and judge([], 1)["verdict"] == "inconclusive"
    nan = judge(np.r_[up, np.nan], 1)
    assert nan["n_facts"] == 8 and nan["verdict"] == "holds"


def test_a_verdict_never_holds_when_its_interval_contains_zero():
    rng = np.random.default_rng(1)
    for _ in range(300):
        values = rng.normal(rng.uniform(-1, 1), rng.uniform(0.1, 3), size=int(rng.integers(1, 30)))
        for side in (1, -1, 0):
            row = judge(values, side)
            if row["verdict"] == "holds":
                assert row["ci_low"] > 0 or row["ci_high"] < 0
                assert side == 0 or np.sign(row["ci_low"]) == side
            if row["ci_low"] <= 0 <= row["ci_high"]:
                assert row["verdict"] == "inconclusive"


def test_not_run_not_applicable_and_two_sided_finding():
    empty = _verdict("yu.top_neurons", FakeStore({}))
    assert empty["verdict"] == "not run" and "neuron_ablation" in empty["reason"]
    frame = pd.DataFrame(
        [
            (f, layer, part, 0.1 if part == "attn" else 0.5)
            for f in FACTS
            for layer in range(3)
            for part in ("attn", "mlp")
        ],
        columns=["fact_id", "layer", "sublayer", "logprob_increase"],
    )
    row = _verdict("yu.attention_vs_ffn", FakeStore({"logprob_attribution": frame}))
    assert row["verdict"] == "holds" and row["finding"] == "FFN layers add more"
    assert row["effect"] == pytest.approx(3 * (0.1 - 0.5))


# -- each claim on tables with a known answer ------------------------------------------------------------


def _knockout(subject_peak: int, other_peak: int, n_layers: int = 12) -> pd.DataFrame:
    rows = []
    for f in FACTS:
        for source, peak in (("subject", subject_peak), ("non_subject", other_peak), ("last", 5)):
            for layer in range(n_layers):
                rows.append((f, source, layer, -80.0 if abs(layer - peak) <= 1 else 0.0))
    return pd.DataFrame(rows, columns=["fact_id", "source", "layer", "change_pct"])


def test_flow_order():
    early_relation = _verdict("geva.flow_order", FakeStore({"attention_knockout": _knockout(8, 2)}))
    assert early_relation["verdict"] == "holds"
    assert early_relation["effect"] == pytest.approx(6 / 11)  # depths, not layers
    assert _verdict("geva.flow_order", FakeStore({"attention_knockout": _knockout(2, 8)}))["verdict"] == (
        "does not hold"
    )


def _sublayer(mlp_change: float, attn_change: float, clean: float = 10.0) -> pd.DataFrame:
    rows = []
    for i, f in enumerate(FACTS):
        for sublayer, change in (("mlp", mlp_change), ("attn", attn_change), ("none", 0.0)):
            for start in range(0, 20, 2):
                wobble = 0.1 * ((i + start) % 3 - 1)
                late = start > 10  # beyond half the target layer: not counted
                rows.append((f, sublayer, -1 if sublayer == "none" else start, 20,
                             0.0 if late else change + wobble, clean))  # fmt: skip
    return pd.DataFrame(
        rows, columns=["fact_id", "sublayer", "start_layer", "target_layer", "change", "clean_rate"]
    )


def test_mlp_enrichment():
    assert (
        _verdict("geva.mlp_enrichment", FakeStore({"sublayer_knockout": _sublayer(-6, -1)}))["verdict"]
        == "holds"
    )
    assert _verdict("geva.mlp_enrichment", FakeStore({"sublayer_knockout": _sublayer(-1, -6)}))[
        "verdict"
    ] == ("does not hold")
    floor = _verdict("geva.mlp_enrichment", FakeStore({"sublayer_knockout": _sublayer(-6, -1, clean=0.0)}))
    assert floor["verdict"] == "inconclusive" and "non-zero attributes rate" in floor["reason"]


def test_extraction():
    def frame(attn, mlp):
        return pd.DataFrame(
            [(f, layer, attn and layer == 3, mlp and layer == 4) for f in FACTS for layer in range(6)],
            columns=["fact_id", "layer", "attn_extracts", "mlp_extracts"],
        )

    assert (
        _verdict("geva.extraction", FakeStore({"extraction_rate": frame(True, False)}))["verdict"] == "holds"
    )
    assert _verdict("geva.extraction", FakeStore({"extraction_rate": frame(False, True)}))["verdict"] == (
        "does not hold"
    )
    none = _verdict("geva.extraction", FakeStore({"extraction_rate": frame(False, False)}))
    assert none["verdict"] == "inconclusive" and "no attention or MLP update" in none["reason"]


def test_ov_heads():
    def frame(rank):
        return pd.DataFrame(
            [(f, layer, head, rank + head) for f in FACTS for layer in range(2) for head in range(5)],
            columns=["fact_id", "layer", "head", "mapping_rank"],
        )

    best = _verdict("geva.ov_heads", FakeStore({"head_mappings": frame(0)}, d_vocab=1000))
    p = 1 - (1 - 1 / 1000) ** 10  # ten heads, the best at rank 0
    assert best["verdict"] == "holds" and best["effect"] == pytest.approx(-np.log10(p) - 1 / np.log(10))
    assert _verdict("geva.ov_heads", FakeStore({"head_mappings": frame(600)}, d_vocab=1000))["verdict"] == (
        "does not hold"
    )
    unknown = _verdict("geva.ov_heads", FakeStore({"head_mappings": frame(0)}))
    assert unknown["verdict"] == "not applicable" and "vocabulary size" in unknown["reason"]


def _tracing(mlp_peak: int, attn_peak: int, n_layers: int = 10) -> pd.DataFrame:
    rows = []
    for f in FACTS:
        for kind, bucket, peak in (("mlp", "last subject", mlp_peak), ("attn", "last token", attn_peak)):
            for layer in range(n_layers):
                rows.append((f, kind, bucket, layer, 1.0 if layer == peak else 0.1, "gaussian", "denoising"))
            rows.append((f, kind, bucket, 0, 9.0, "gaussian", "noising"))  # another direction: not read
    return pd.DataFrame(
        rows, columns=["fact_id", "kind", "bucket", "layer", "indirect_effect", "corruption", "direction"]
    )


def test_rome_sites():
    row = _verdict("rome.sites", FakeStore({"causal_tracing": _tracing(2, 8)}))
    assert row["verdict"] == "holds" and row["effect"] == pytest.approx(6 / 9)
    assert _verdict("rome.sites", FakeStore({"causal_tracing": _tracing(8, 2)}))["verdict"] == "does not hold"


def test_top_neurons():
    rows = []
    for i, f in enumerate(FACTS):
        rows += [
            (f, "logprob_increase", -1, "ffn:10", 3.0 + 0.1 * i),
            (f, "logprob_increase", -1, "ffn:100", 9.0),
        ]
        rows += [(f, "random", s, "ffn:10", 0.1 * s) for s in range(3)]
    frame = pd.DataFrame(rows, columns=["fact_id", "method", "seed", "budget", "logprob_drop"])
    row = _verdict("yu.top_neurons", FakeStore({"neuron_ablation": frame}))
    assert row["verdict"] == "holds" and row["effect"] == pytest.approx(3.35 - 0.1)
    no_baseline = frame[frame["method"] != "random"]
    assert (
        _verdict("yu.top_neurons", FakeStore({"neuron_ablation": no_baseline}))["verdict"] == "not applicable"
    )


def _early(steps=(1,), promote=1.0) -> pd.DataFrame:
    rows = []
    for f in FACTS:
        for step in steps:
            for layer in range(10):
                rows.append((f, step, "mlp", layer, f"a{step}", "current", promote))
    return pd.DataFrame(rows, columns=["fact_id", "step", "site", "layer", "tracked", "role", "logit"])


def test_promote_and_suppress():
    store = FakeStore({"early_decoding": _early(promote=0.5)})
    row = _verdict("yan_jia.promote", store)
    assert row["verdict"] == "holds" and row["effect"] == pytest.approx(5 * 0.5)  # upper half: layers 5–9
    lens = pd.DataFrame(
        [(f, 1, layer, "subject", "a1", "current", -1.0) for f in FACTS for layer in range(10)],
        columns=["fact_id", "step", "layer", "span", "tracked", "role", "logit"],
    )
    alone = _verdict("yan_jia.suppress", FakeStore({"early_decoding": _early(), "token_lens": lens}))
    assert alone["verdict"] == "not applicable" and "earlier answer" in alone["reason"]
    second = pd.DataFrame(
        [(f, 2, layer, "answer_1", "answer_1", "previous", -0.3) for f in FACTS for layer in range(10)],
        columns=lens.columns,
    )
    store = FakeStore({"early_decoding": _early((1, 2)), "token_lens": pd.concat([lens, second])})
    row = _verdict("yan_jia.suppress", store)
    assert row["verdict"] == "holds" and row["effect"] == pytest.approx(5 * -0.3)


def test_argument_heads_picks_heads_on_the_other_facts():
    rows, noise = [], np.random.default_rng(3).normal(0, 0.05, size=(len(FACTS), 10))
    for i, f in enumerate(FACTS):
        for head in range(10):
            rows.append((f, 3, head, -4.0 if head == 7 else noise[i, head]))
    frame = pd.DataFrame(rows, columns=["fact_id", "layer", "head", "delta"])
    row = _verdict("lv.argument_heads", FakeStore({"argument_heads": frame}))
    assert row["verdict"] == "holds" and row["effect"] == pytest.approx(4 / 5 - 4 / 10, abs=0.05)
    flat = frame.assign(delta=np.where(frame["head"] == 7, 0.0, frame["delta"]))
    assert (
        _verdict("lv.argument_heads", FakeStore({"argument_heads": flat}))["verdict"] != "holds"
    )  # noise only


def test_lv_regression_final_layer_and_mitigation():
    fit = pd.DataFrame([(f, layer, 0.2 + 0.01 * layer) for f in FACTS for layer in range(4)],
                       columns=["fact_id", "layer", "r2_adjusted"])  # fmt: skip
    assert _verdict("lv.mlp_regression", FakeStore({("mlp_regression", "fit"): fit}))["verdict"] == "holds"
    facts = pd.DataFrame(
        {
            "fact_id": FACTS,
            "split": ["train"] * 2 + ["heldout"] * 6,
            "final_layer_logit": np.linspace(-2, -1, 8),
            "log_prob_before": np.full(8, -2.0),
            "log_prob_after": np.linspace(-1.9, -1.5, 8),
        }
    )
    store = FakeStore({("anti_overconfidence", "facts"): facts})
    assert _verdict("lv.final_layer", store)["verdict"] == "holds"
    gain = _verdict("lv.mitigation", store)
    assert gain["verdict"] == "holds" and gain["n_facts"] == 6
    train_only = FakeStore({("anti_overconfidence", "facts"): facts.assign(split="train")})
    assert _verdict("lv.mitigation", train_only)["verdict"] == "not applicable"


def test_every_claim_is_tested_here():
    tested = {
        "geva.flow_order", "geva.mlp_enrichment", "geva.extraction", "geva.ov_heads", "rome.sites",
        "yu.top_neurons", "yu.attention_vs_ffn", "yan_jia.promote", "yan_jia.suppress", "lv.argument_heads",
        "lv.mlp_regression", "lv.final_layer", "lv.mitigation",
    }  # fmt: skip
    assert {claim.key for claim in c.CLAIMS} == tested


def test_the_docs_page_lists_every_claim():
    from pathlib import Path

    page = (Path(__file__).parents[2] / "docs" / "scorecard.md").read_text()
    assert all(f"`{claim.key}`" in page for claim in c.CLAIMS)


def test_an_empty_or_partial_table_is_inconclusive_not_an_error():
    store = FakeStore({("anti_overconfidence", "facts"): pd.DataFrame(columns=["fact_id"])})
    row = _verdict("lv.final_layer", store)
    assert row["verdict"] == "inconclusive" and "stored no rows" in row["reason"]
    store.tables[("anti_overconfidence", "facts")] = pd.DataFrame({"fact_id": FACTS})  # an older run
    row = _verdict("lv.final_layer", store)
    assert row["verdict"] == "inconclusive" and "final_layer_logit" in row["reason"]


def test_results_render_in_jupyter(tiny_models):
    """A method result's ``_repr_html_``: its name, facts and summary table, strings escaped."""
    import recallscope as rs
    from recallscope.methods import logit_lens

    model = tiny_models("gpt2")
    batch = rs.tokenize(model, ["<b>The capital of France is"], targets=[" Paris"], fact_ids=["<i>f</i>"])
    html = logit_lens.run(model, batch)._repr_html_()
    assert html.startswith("<p><b>logit_lens</b>: 1 facts, 0 skipped</p>") and "<table" in html
    assert "<i>f</i>" not in html


def test_yan_jia_is_judged_per_answer_step_when_facts_have_several():
    lens = pd.DataFrame(
        [(f, step, layer, "answer_1", "answer_1", "previous", -0.3 * step)
         for f in FACTS for step in (2, 3) for layer in range(10)],
        columns=["fact_id", "step", "layer", "span", "tracked", "role", "logit"],
    )  # fmt: skip
    store = FakeStore({"early_decoding": _early((1, 2, 3)), "token_lens": lens})
    card = scorecard(store).set_index("key")
    steps = [k for k in card.index if ".step" in k]
    assert steps == [
        "yan_jia.promote.step1", "yan_jia.promote.step2", "yan_jia.suppress.step2",
        "yan_jia.promote.step3", "yan_jia.suppress.step3",
    ]  # fmt: skip
    assert list(card.index).index("yan_jia.promote.step1") == list(card.index).index("yan_jia.suppress") + 1
    assert card.loc["yan_jia.suppress.step3", "effect"] == pytest.approx(5 * -0.9)
    assert (card.loc[steps, "verdict"] == "holds").all()
    assert not any(".step" in k for k in scorecard(FakeStore({"early_decoding": _early()}))["key"])


def _extraction(attn: bool, mlp: bool) -> pd.DataFrame:
    return pd.DataFrame(
        [(f, layer, attn and layer == 3, mlp and layer == 4) for f in FACTS for layer in range(6)],
        columns=["fact_id", "layer", "attn_extracts", "mlp_extracts"],
    )


def _logprob(attn: float, mlp: float) -> pd.DataFrame:
    rows = [(f, layer, part, attn if part == "attn" else mlp) for f in FACTS for layer in range(3)
            for part in ("attn", "mlp")]  # fmt: skip
    return pd.DataFrame(rows, columns=["fact_id", "layer", "sublayer", "logprob_increase"])


def _ablation(top: float, random: float) -> pd.DataFrame:
    rows = [(f, "logprob_increase", -1, "ffn:10", top + 0.01 * i) for i, f in enumerate(FACTS)]
    rows += [(f, "random", s, "ffn:10", random) for f in FACTS for s in range(2)]
    return pd.DataFrame(rows, columns=["fact_id", "method", "seed", "budget", "logprob_drop"])


def _lv_facts(sign: float) -> pd.DataFrame:
    gain = sign * np.linspace(0.1, 0.5, 8)
    return pd.DataFrame(
        {"fact_id": FACTS, "split": "heldout", "final_layer_logit": sign * np.linspace(1, 2, 8),
         "log_prob_before": -2.0, "log_prob_after": -2.0 + gain}
    )  # fmt: skip


def _fit(sign: float) -> pd.DataFrame:
    return pd.DataFrame([(f, layer, sign * (0.2 + 0.01 * layer)) for f in FACTS for layer in range(4)],
                        columns=["fact_id", "layer", "r2_adjusted"])  # fmt: skip


AOC, FIT = ("anti_overconfidence", "facts"), ("mlp_regression", "fit")

# claim → (table, the table where it holds, the table where the opposite holds, mirrored effects)
PAIRS = {
    "geva.flow_order": ("attention_knockout", _knockout(8, 2), _knockout(2, 8)),
    "geva.mlp_enrichment": ("sublayer_knockout", _sublayer(-6, -1), _sublayer(-1, -6)),
    "geva.extraction": ("extraction_rate", _extraction(True, False), _extraction(False, True)),
    "rome.sites": ("causal_tracing", _tracing(2, 8), _tracing(8, 2)),
    "yu.top_neurons": ("neuron_ablation", _ablation(3, 0), _ablation(0, 3.035)),
    "yu.attention_vs_ffn": ("logprob_attribution", _logprob(0.5, 0.1), _logprob(0.1, 0.5)),
    "yan_jia.promote": ("early_decoding", _early(promote=0.5), _early(promote=-0.5)),
    "lv.mlp_regression": (FIT, _fit(1), _fit(-1)),
    "lv.final_layer": (AOC, _lv_facts(-1), _lv_facts(1)),
    "lv.mitigation": (AOC, _lv_facts(1), _lv_facts(-1)),
}


@pytest.mark.parametrize("key", sorted(PAIRS))
def test_holds_does_not_hold_and_inconclusive_on_known_frames(key):
    """Each claim on frames where it holds, where the opposite holds, and on half of the facts from
    each (effects of both signs): holds, does not hold (or 'holds' with the other finding for a
    two-sided claim), inconclusive."""
    table, good, bad = PAIRS[key]
    row = _verdict(key, FakeStore({table: good}))
    assert row["verdict"] == "holds", row.to_dict()
    opposite = _verdict(key, FakeStore({table: bad}))
    two_sided = next(c for c in c.CLAIMS if c.key == key).side == 0
    assert opposite["verdict"] == ("holds" if two_sided else "does not hold"), opposite.to_dict()
    assert not two_sided or opposite["finding"] != row["finding"]
    half = set(FACTS[::2])
    mixed = pd.concat([good[good["fact_id"].isin(half)], bad[~bad["fact_id"].isin(half)]])
    assert _verdict(key, FakeStore({table: mixed}))["verdict"] == "inconclusive"
