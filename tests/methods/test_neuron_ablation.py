"""Neuron ablation (Y&A-7): batched zeroing equals naive hooks and hand-recomputed attention."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import recallscope as rs
from oracles.neuron_ablation import naive_ablate, naive_metrics, naive_target_rank, naive_zero_head
from recallscope.methods import neuron_ablation as na
from recallscope.stats import mean_ci
from tiny import DISCOVERED

PROMPTS = ["The capital of France is", "Famous Eiffel Tower stands in the city of", "Miles Davis plays the"]
SUBJECTS = ["France", "Eiffel Tower", "Miles Davis"]
TARGETS = [" Paris", " Paris", " trumpet"]
FAMILIES = ["gpt2", "llama_gqa", "gemma2", "gpt_neox", "gptj", "opt", *DISCOVERED]


def _batch(model):
    return rs.tokenize(model, PROMPTS, spans={"subject": SUBJECTS}, targets=TARGETS)


def _ids(batch, row):
    return batch.input_ids[row, int(batch.pad_lengths[row]) :]


def _random_selection(model, length: int, rng, n_ffn: int, n_attn: int) -> na.Selection:
    ffn = np.column_stack([rng.integers(0, model.n_layers, n_ffn), rng.integers(0, model.d_mlp, n_ffn)])
    bounds = (model.n_layers, model.n_heads, model.d_head, length)
    attn = np.column_stack([rng.integers(0, b, n_attn) for b in bounds])
    return na.Selection(ffn, attn)


def _assert_metrics(got: dict, row: int, expected: dict) -> None:
    for name in na.METRICS:
        np.testing.assert_allclose(got[name][row], expected[name], rtol=1e-9, atol=1e-12, err_msg=name)


# -- the core ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_empty_selection_is_the_clean_run(tiny_models, family):
    model = tiny_models(family)
    batch = _batch(model)
    targets = batch.target_ids
    got = na.ablate(model, batch, [na.Selection() for _ in range(len(batch))], targets)
    clean = na.target_metrics(rs.forward(model, batch), targets)
    for name in (*na.METRICS, "rank"):
        np.testing.assert_array_equal(got[name], clean[name])
    for row in range(len(batch)):  # and the metrics are the naive ones of the unpadded prompt
        _assert_metrics(got, row, naive_ablate(model, _ids(batch, row), int(targets[row])))


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_variants_equal_naive_oracle(tiny_models, family):
    """FFN neurons vs a plain mlp_post hook; attention units vs attention recomputed by hand."""
    model = tiny_models(family)
    batch = _batch(model)
    lengths = batch.attention_mask.sum(-1).tolist()
    rng = np.random.default_rng(1)
    rows = [0, 1, 2, 1, 0, 2, 2]
    sizes = [(4, 0), (0, 30), (3, 25), (model.n_layers * model.d_mlp, 0), (2, 200), (0, 1), (1, 0)]
    selections = [_random_selection(model, lengths[r], rng, *n) for r, n in zip(rows, sizes, strict=True)]
    got = na.ablate(model, batch, selections, batch.target_ids, rows=rows, max_batch_rows=3)
    for i, (row, selection) in enumerate(zip(rows, selections, strict=True)):
        expected = naive_ablate(
            model,
            _ids(batch, row),
            int(batch.target_ids[row]),
            selection.ffn.tolist(),
            selection.attn.tolist(),
        )
        _assert_metrics(got, i, expected)


@pytest.mark.parametrize("family", ["llama_gqa", "gpt2", "gptj"])
def test_batched_equals_one_by_one(tiny_models, family):
    model = tiny_models(family)
    batch = _batch(model)
    lengths = batch.attention_mask.sum(-1).tolist()
    rng = np.random.default_rng(2)
    rows = [2, 0, 1, 2]
    selections = [_random_selection(model, lengths[r], rng, 5, 20) for r in rows]
    together = na.ablate(model, batch, selections, batch.target_ids, rows=rows)
    for i, (row, selection) in enumerate(zip(rows, selections, strict=True)):
        alone = rs.tokenize(model, [PROMPTS[row]], targets=[TARGETS[row]])
        single = na.ablate(model, alone, [selection], alone.target_ids)
        for name in na.METRICS:
            np.testing.assert_allclose(together[name][i], single[name][0], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("family", ["llama_gqa", "gemma2", "gpt_neox", "opt"])
def test_all_units_of_a_head_equal_zeroing_its_z(tiny_models, family):
    model = tiny_models(family)
    batch = _batch(model)
    row, layer, head = 1, 1, 2
    length = int(batch.attention_mask[row].sum())
    units = [(layer, head, n, j) for n in range(model.d_head) for j in range(length)]
    got = na.ablate(model, batch, [na.Selection(attn=units)], batch.target_ids, rows=[row])
    expected = naive_zero_head(model, _ids(batch, row), int(batch.target_ids[row]), layer, head)
    _assert_metrics(got, 0, expected)
    clean = naive_metrics(rs.forward(model, _ids(batch, row)[None])[0], int(batch.target_ids[row]))
    assert got["logprob"][0] != pytest.approx(clean["logprob"], rel=1e-6)  # the edit did something


def test_selection_checks(tiny_models):
    model = tiny_models("gpt2")
    batch = _batch(model)
    assert len(na.Selection(ffn=[(0, 1), (0, 1)], attn=[(0, 0, 0, 0)])) == 2  # duplicates collapse
    length = int(batch.attention_mask[2].sum())  # src counts real tokens: `length` is past the end
    with pytest.raises(rs.RecallscopeError, match="attn selection out of range"):
        na.ablate(model, batch, [na.Selection(attn=[(0, 0, 0, length)])], batch.target_ids, rows=[2])
    with pytest.raises(rs.RecallscopeError, match="ffn selection out of range"):
        na.ablate(model, batch, [na.Selection(ffn=[(model.n_layers, 0)])], batch.target_ids, rows=[0])
    with pytest.raises(rs.RecallscopeError, match="one per row"):
        na.ablate(model, batch, [na.Selection()], batch.target_ids, rows=[0, 1])


# -- config, budgets, rankings, summary ------------------------------------------------------------


def test_budgets_parse_and_validate():
    assert na.parse_budget("ffn:10") == na.Budget("ffn:10", 10, 0)
    assert na.parse_budget(" attn:200 + FFN:100 ") == na.Budget("attn:200+ffn:100", 100, 200)
    for bad in ("ffn", "ffn:0", "ffn:-3", "mlp:10", "ffn:10+ffn:5", "attn:1.5", ""):
        with pytest.raises(rs.RecallscopeError, match="is not valid"):
            na.parse_budget(bad)
    with pytest.raises(rs.RecallscopeError, match="is not valid"):
        na.Config(budgets=("ffn:10", "neurons:5"))
    with pytest.raises(rs.RecallscopeError, match="repeat"):
        na.Config(budgets=("ffn:10", " ffn:10"))
    with pytest.raises(rs.RecallscopeError, match="methods must be a tuple of distinct items"):
        na.Config(methods=("logprob_increase", "gradient"))
    with pytest.raises(rs.RecallscopeError, match="nothing to ablate"):
        na.Config(methods=(), random_seeds=0)
    config = na.Config(budgets=("ffn:3", "attn:5+ffn:2"), methods=("coef",), random_seeds=2, seed=7)
    assert [(m, s, b.label) for m, s, b in config.variants] == [
        ("coef", -1, "ffn:3"),
        ("coef", -1, "attn:5+ffn:2"),
        ("random", 7, "ffn:3"),
        ("random", 7, "attn:5+ffn:2"),
        ("random", 8, "ffn:3"),
        ("random", 8, "attn:5+ffn:2"),
    ]
    assert config.max_k("ffn") == 3 and config.max_k("attn") == 5
    yu = na.Config.preset("yu")
    assert yu.bias is False and yu.target == "gold" and yu.budgets == na.BUDGETS


def test_top_ranked_breaks_ties_by_index_and_skips_nan():
    score = np.array([[1.0, np.nan, 3.0], [3.0, 0.5, 1.0]])
    assert na.top_ranked(score, 3).tolist() == [2, 3, 0]
    assert na.top_ranked(score, 10).tolist() == [2, 3, 0, 5, 4]
    assert na.top_ranked(score, 2).tolist() == na.top_ranked(score, 3).tolist()[:2]


def test_summary_equals_hand_computation():
    rows = []
    for fact, clean in (("a", 0.5), ("b", 0.25)):
        rows.append(dict(fact_id=fact, method="coef", seed=-1, budget="ffn:1", mrr=clean / 2, prob=clean / 4))
        for seed, after in ((0, clean), (1, clean / 2)):
            rows.append(dict(fact_id=fact, method="random", seed=seed, budget="ffn:1", mrr=after, prob=after))
    frame = pd.DataFrame(rows)
    frame["logprob"] = np.log(frame["prob"])
    frame["clean_mrr"] = frame["clean_prob"] = frame["fact_id"].map({"a": 0.5, "b": 0.25})
    frame["clean_logprob"] = np.log(frame["clean_prob"])
    frame["mrr_drop_pct"] = 100 * (frame["clean_mrr"] - frame["mrr"]) / frame["clean_mrr"]
    frame["prob_drop_pct"] = 100 * (frame["clean_prob"] - frame["prob"]) / frame["clean_prob"]
    frame["logprob_drop"] = frame["clean_logprob"] - frame["logprob"]
    out = na.summary(frame).set_index("method")
    assert out.loc["coef", "n"] == 2 and out.loc["random", "n"] == 2
    np.testing.assert_allclose(out.loc["coef", "mrr_drop_pct"], 50.0)
    np.testing.assert_allclose(out.loc["coef", "prob_drop_pct_ci"], 0.0)
    np.testing.assert_allclose(out.loc["random", "mrr_drop_pct"], 25.0)  # seeds averaged first: (0 + 50) / 2
    np.testing.assert_allclose(out.loc["coef", "logprob_drop"], np.log(4))
    np.testing.assert_allclose(out.loc["coef", "mrr_drop_pct_pooled"], 100 * (1 - (0.25 + 0.125) / 0.75))
    per_fact_random = [(0.5 + 0.25) / 2, (0.25 + 0.125) / 2]  # mean mrr over seeds, per fact
    np.testing.assert_allclose(out.loc["random", "mrr"], np.mean(per_fact_random))
    np.testing.assert_allclose(
        out.loc["random", "mrr_ci"], 1.96 * np.std(per_fact_random, ddof=1) / np.sqrt(2)
    )
    hand = mean_ci(frame[frame.method == "coef"], ["method", "budget"], ["prob"])
    np.testing.assert_allclose(out.loc["coef", "prob_ci"], hand["prob_ci"][0])


# -- run: rankings from logprob_attribution, random draws, tidy output -------------------------------

SMALL = dict(budgets=("ffn:3", "attn:5+ffn:2", "attn:7"), random_seeds=2, max_batch_rows=7)
IDS = ["paris", "eiffel", "davis"]


def _facts(model, rows=(0, 1, 2)):
    pick = lambda seq: [seq[r] for r in rows]  # noqa: E731
    return rs.tokenize(
        model, pick(PROMPTS), spans={"subject": pick(SUBJECTS)}, targets=pick(TARGETS), fact_ids=pick(IDS)
    )


def _naive_scores(model, attribution, a: int, method: str, target: int):
    """``{(kind, index): score}`` of every real subvalue of attribution fact ``a``, by plain loops."""
    from recallscope.core.subvalues import attn_subvalues, ffn_subvalues

    pad, scores = int(attribution.pad[a]), {}
    name = {"logprob_increase": "score", "prob_increase": "prob", "logit_increase": "logit"}.get(method)
    zero_v = torch.zeros(1, 1, model.n_kv_heads, model.d_head, dtype=torch.float64)
    for layer in range(model.n_layers):
        values = {
            "ffn": ffn_subvalues(model, layer, torch.zeros(1, model.d_mlp, dtype=torch.float64)).values,
            "attn": attn_subvalues(
                model, layer, torch.zeros(1, model.n_heads, 1, dtype=torch.float64), zero_v
            ).values,
        }
        for k in range(model.d_mlp):
            c = attribution.neuron_coeff[a, layer, k]
            exact = None if name is None else getattr(attribution, f"neuron_{name}")[a, layer, k]
            scores[("ffn", (layer, k))] = _naive_score(model, method, exact, c, values["ffn"][k], target)
        for h in range(model.n_heads):
            for n in range(model.d_head):
                for j in range(pad, attribution.unit_coeff.shape[-1]):
                    c = attribution.unit_coeff[a, layer, h, n, j]
                    exact = None if name is None else getattr(attribution, f"unit_{name}")[a, layer, h, n, j]
                    w = values["attn"][h * model.d_head + n]
                    scores[("attn", (layer, h, n, j - pad))] = _naive_score(
                        model, method, exact, c, w, target
                    )
    return scores


def _naive_score(model, method, exact, c, w, target):
    if exact is not None:
        return exact
    if method == "coef":
        return abs(c)
    if method == "coef_norm":
        return abs(c) * float(w.norm())
    return abs(c) / (naive_target_rank(model, w, target, 1 if c > 0 else -1) + 1)


def _naive_top(scores: dict, kind: str, k: int) -> list[tuple]:
    entries = [(-s, index) for (kd, index), s in scores.items() if kd == kind and not np.isnan(s)]
    return [index for _, index in sorted(entries)[:k]]


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa", "gemma2", "gptj"])
def test_run_ranks_and_ablates_like_the_naive_loops(tiny_models, family):
    from recallscope.methods import logprob_attribution as la

    model = tiny_models(family)
    batch = _facts(model)
    config = na.Config(**SMALL)
    result = na.run(model, batch, config)
    attribution = la.run(
        model, batch, la.Config(levels=("neuron", "attn_unit"), n_top=7, target="gold", bias=True)
    )
    frame = result.to_frame()
    assert len(frame) == 3 * len(config.variants) and list(result.fact_ids) == IDS
    for f in range(3):
        ids, target = _ids(batch, f), int(batch.target_ids[f])
        clean = naive_metrics(rs.forward(model, ids[None])[0], target)
        np.testing.assert_allclose(result.clean_logprob[f], clean["logprob"], rtol=1e-10)
        for method in config.methods:  # the rankings are the naive top-K of each score
            scores = _naive_scores(model, attribution, f, method, target)
            ffn, attn = result.rankings[f][method]
            assert [tuple(x) for x in ffn.tolist()] == _naive_top(scores, "ffn", 3), method
            assert [tuple(x) for x in attn.tolist()] == _naive_top(scores, "attn", 7), method
        for v, (method, seed, budget) in enumerate(result.variants):  # and ablating them is the naive run
            ffn, attn = result.rankings[f][method if seed < 0 else f"random{seed}"]
            parsed = na.parse_budget(budget)
            expected = naive_ablate(
                model, ids, target, ffn[: parsed.n_ffn].tolist(), attn[: parsed.n_attn].tolist()
            )
            assert result.n_ffn[f, v] == parsed.n_ffn and result.n_attn[f, v] == parsed.n_attn
            for name in na.METRICS:
                np.testing.assert_allclose(getattr(result, name)[f, v], expected[name], rtol=1e-9, atol=1e-12)


def test_batched_run_equals_one_by_one_and_random_is_reproducible(tiny_models):
    model = tiny_models("llama_gqa")
    config = na.Config(**SMALL, methods=("logprob_increase", "coef_inv_rank"))
    together = na.run(model, _facts(model), config)
    again = na.run(model, _facts(model, rows=(2, 0)), config)
    for f, fact in enumerate(again.fact_ids):
        t = together.fact_ids.index(fact)
        for name in (*na.METRICS, "n_ffn", "n_attn"):
            np.testing.assert_allclose(
                getattr(again, name)[f], getattr(together, name)[t], rtol=1e-9, atol=1e-12
            )
        for name, (ffn, attn) in again.rankings[f].items():
            np.testing.assert_array_equal(ffn, together.rankings[t][name][0])
            np.testing.assert_array_equal(attn, together.rankings[t][name][1])
    ffn, attn = together.rankings[2]["random0"]
    length = int(_facts(model).attention_mask[2].sum())
    assert len(np.unique(attn, axis=0)) == 7 and (attn[:, 3] < length).all() and (attn >= 0).all()
    other = na.run(model, _facts(model), na.Config(**{**SMALL, "random_seeds": 1, "seed": 5}))
    assert not np.array_equal(other.rankings[2]["random5"][1], attn)
    more = na.run(model, _facts(model), na.Config(**{**SMALL, "budgets": ("attn:20",)}, methods=()))
    np.testing.assert_array_equal(more.rankings[2]["random0"][1][:7], attn)  # nested over K


def test_tidy_rows_arrays_and_cost(tiny_models):
    model = tiny_models("gpt2")
    config = na.Config(**SMALL, methods=("coef", "logit_increase"))
    result = na.run(model, _facts(model, rows=(0, 1)), config)
    frame = result.to_frame()
    metrics = ["mrr", "prob", "logprob", "clean_mrr", "clean_prob", "clean_logprob"]
    drops = ["mrr_drop_pct", "prob_drop_pct", "logprob_drop"]
    assert list(frame.columns) == ["fact_id", "method", "seed", "budget", "n_ffn", "n_attn", *metrics, *drops]
    assert set(frame["method"]) == {"coef", "logit_increase", "random"}
    assert (frame.loc[frame.method != "random", "seed"] == -1).all()
    assert sorted(set(frame.loc[frame.method == "random", "seed"])) == [0, 1]
    np.testing.assert_allclose(frame["logprob_drop"], frame["clean_logprob"] - frame["logprob"])
    np.testing.assert_allclose(frame["prob_drop_pct"], 100 * (1 - frame["prob"] / frame["clean_prob"]))
    table = na.summary(frame)
    assert len(table) == 3 * 3 and set(table["n"]) == {2}
    assert set(result.arrays()) == {
        f"{fact}/{name}_{kind}"
        for fact in ("paris", "eiffel")
        for name in ("coef", "logit_increase", "random0", "random1")
        for kind in ("ffn", "attn")
    }
    assert result.tables() == {} and result.provenance["conventions"]["target"] == "gold"
    assert na.cost(model, _facts(model, rows=(0, 1)), config).forwards >= 1 + -(-2 * 15 // 7)
    with pytest.raises(rs.RecallscopeError, match="target='gold' needs"):
        na.run(model, rs.tokenize(model, ["France is"]), config)
