"""Log-prob attribution (Y&A-1 … Y&A-5): batched fast scores equal the naive one-vector-at-a-time oracle."""

from __future__ import annotations

import numpy as np
import pytest

import recallscope as rs
from oracles.logprob_attribution import naive_attribution
from recallscope.methods import logprob_attribution as la
from tiny import DISCOVERED, FLOAT32_INSIDE

PROMPTS = ["The capital of France is", "Famous Eiffel Tower stands in the city of", "Rome is in"]
SUBJECTS = ["France", "Eiffel Tower", "Rome"]
TARGETS = [" Paris", " Paris", " Italy"]
TOL = dict(rtol=1e-9, atol=1e-12)


def _batch(model, rows=(0, 1, 2)):
    pick = lambda seq: [seq[i] for i in rows]  # noqa: E731
    return rs.tokenize(model, pick(PROMPTS), spans={"subject": pick(SUBJECTS)}, targets=pick(TARGETS))


def _row(batch, row):
    pad = int(batch.pad_lengths[row])
    return pad, batch.input_ids[row, pad:]


def _check_fact(result, f, expected, pad) -> None:
    """Every array of fact ``f`` equals the oracle's (pads cut; NaN entries of ``top`` mode skipped)."""
    close = lambda a, b: np.testing.assert_allclose(a, b, **TOL)  # noqa: E731
    assert int(result.target_ids[f]) == expected["target"]
    close(result.final_scale[f], expected["rho"])
    close(result.logprob_resid_pre[f], expected["lp_pre"])
    close(result.logprob_resid_mid[f], expected["lp_mid"])
    close(result.attn_score[f], expected["attn"])
    close(result.ffn_score[f], expected["ffn"])
    close(result.head_score[f], expected["head"])
    positions = result.position_score[f, ..., pad:]
    decomposed = ~np.isnan(positions).all(-1)  # heads beyond position_heads are NaN
    assert decomposed.sum() >= min(decomposed.size, result.config.position_heads or decomposed.size)
    close(positions[decomposed], expected["position"][decomposed])
    close(result.attention[f, ..., pad:], expected["attention"])
    assert not result.position_score[f, ..., :pad].any() and not result.unit_coeff[f, ..., :pad].any()
    for name, key in (("neuron", "neuron"), ("unit", "unit")):
        cut = (lambda a: a[f, ..., pad:]) if name == "unit" else (lambda a: a[f])  # noqa: E731
        close(cut(getattr(result, f"{name}_coeff")), expected[f"{key}_coeff"])
        close(cut(getattr(result, f"{name}_logit")), expected[f"{key}_logit"])
        score, prob = cut(getattr(result, f"{name}_score")), cut(getattr(result, f"{name}_prob"))
        done = ~np.isnan(score)
        close(score[done], expected[key][done])
        close(prob[done], expected[f"{key}_prob"][done])
        assert np.array_equal(done, ~np.isnan(prob))
        upper, lower = cut(getattr(result, f"{name}_upper")), cut(getattr(result, f"{name}_lower"))
        assert (lower <= expected[key] + 1e-12).all() and (expected[key] <= upper + 1e-12).all()


@pytest.mark.parametrize(
    "family", ["gpt2", "llama_gqa", "gemma2", "gpt_neox", "gptj", "opt", "phi", "qwen3", *DISCOVERED]
)
@pytest.mark.parametrize("bias,target", [(True, "top1"), (False, "gold")])
def test_exact_all_equals_oracle(tiny_models, family, bias, target):
    model = tiny_models(family)
    config = la.Config(bias=bias, target=target, exact="all", position_heads=None, max_batch_rows=2)
    batch = _batch(model, rows=(0, 1))
    # GPT-J computes attention scores in float32 even for float64 weights, so left padding moves
    # them by ~1e-9: compare its prompts unpadded (padding is checked on other families)
    runs = [(la.run(model, batch, config), batch, f) for f in range(len(batch))]
    if family in FLOAT32_INSIDE:
        runs = [
            (la.run(model, _batch(model, rows=(f,)), config), _batch(model, rows=(f,)), 0) for f in (0, 1)
        ]
    for result, rows, f in runs:
        pad, ids = _row(rows, f)
        gold = int(rows.target_ids[f]) if target == "gold" else None
        expected = naive_attribution(model, ids, bias, target=gold)
        _check_fact(result, f, expected, pad)
        assert not np.isnan(result.neuron_score[f]).any() and not np.isnan(result.unit_score[f]).any()


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa", "gemma2", "gpt_neox"])
def test_top_mode_finds_the_exact_top_and_bottom(tiny_models, family):
    model = tiny_models(family)
    batch = _batch(model)
    n = 5
    result = la.run(model, batch, la.Config(exact="top", n_top=n, max_batch_rows=2))
    tables = result.tables()
    for f in range(len(batch)):
        pad, ids = _row(batch, f)
        expected = naive_attribution(model, ids, True)
        _check_fact(result, f, expected, pad)
        for kind, name, table in (("neuron", "neuron", "neurons"), ("unit", "unit", "attn_units")):
            rows = tables[table][tables[table].fact_id == str(f)]
            oracle = np.sort(expected[kind].reshape(-1))
            top, bottom = rows[rows.end == "top"], rows[rows.end == "bottom"]
            assert top["rank"].tolist() == list(range(1, n + 1))
            np.testing.assert_allclose(top.logprob_increase, oracle[::-1][:n], **TOL)
            np.testing.assert_allclose(bottom.logprob_increase, oracle[:n], **TOL)
            # probability ranking: the exact top / bottom n by prob increase were all scored
            prob = getattr(result, f"{name}_prob")[f]
            prob = prob[..., pad:] if name == "unit" else prob
            by_prob = np.sort(expected[f"{kind}_prob"].reshape(-1))
            got = np.sort(prob[~np.isnan(prob)])
            np.testing.assert_allclose(got[::-1][:n], by_prob[::-1][:n], **TOL)
            np.testing.assert_allclose(got[:n], by_prob[:n], **TOL)
    assert np.isnan(result.neuron_score).any() or np.isnan(result.unit_score).any()  # something pruned


@pytest.mark.parametrize("family", ["llama_gqa", "gpt2"])
def test_position_level_of_the_top_heads_only(tiny_models, family):
    """``position_heads=n`` decomposes each fact's n heads of largest |increase|, exactly as ``None`` does."""
    model = tiny_models(family)
    batch = _batch(model)
    levels = ("head", "position")
    every = la.run(model, batch, la.Config(levels=levels, position_heads=None))
    some = la.run(model, batch, la.Config(levels=levels, position_heads=2))
    for f in range(len(batch)):
        flat = np.abs(every.head_score[f]).reshape(-1)
        chosen = np.zeros_like(flat, dtype=bool)
        chosen[np.argsort(-flat, kind="stable")[:2]] = True
        chosen = chosen.reshape(every.head_score[f].shape)
        pad = int(some.pad[f])
        mine, full = some.position_score[f, ..., pad:], every.position_score[f, ..., pad:]
        np.testing.assert_allclose(mine[chosen], full[chosen], **TOL)
        assert np.isnan(mine[~chosen]).all() and not some.position_score[f, ..., :pad].any()
        rows = some.tables()["positions"]
        rows = rows[rows.fact_id == str(f)]
        assert len(rows) == 2 * len(every.tokens[f]) and not rows.logprob_increase.isna().any()


def test_padded_batch_equals_one_by_one(tiny_models):
    model = tiny_models("llama_gqa")
    batch = _batch(model)
    config = la.Config(n_top=4, max_batch_rows=2)
    together = la.run(model, batch, config)
    for f in range(len(batch)):
        alone = la.run(model, _batch(model, rows=(f,)), config)
        pad = int(together.pad[f])
        assert alone.pad[0] == 0 and alone.tokens[0] == together.tokens[f]
        for name in (
            "logprob_resid_pre",
            "attn_score",
            "ffn_score",
            "head_score",
            "neuron_score",
            "neuron_prob",
        ):
            np.testing.assert_allclose(getattr(alone, name)[0], getattr(together, name)[f], **TOL)
        for name in ("position_score", "attention", "unit_coeff", "unit_score", "unit_upper"):
            np.testing.assert_allclose(getattr(alone, name)[0], getattr(together, name)[f, ..., pad:], **TOL)
        for table in ("neurons", "attn_units"):
            mine = together.tables()[table]
            mine = mine[mine.fact_id == str(f)].drop(columns="fact_id").reset_index(drop=True)
            theirs = alone.tables()[table].drop(columns="fact_id")
            np.testing.assert_allclose(mine.logprob_increase, theirs.logprob_increase, **TOL)
            assert mine.drop(columns=["coeff", "logprob_increase", "prob_increase", "logit_increase"]).equals(
                theirs.drop(columns=["coeff", "logprob_increase", "prob_increase", "logit_increase"])
            )


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa", "gemma2", "gptj", *DISCOVERED])
def test_decompositions_sum_back(tiny_models, family):
    model = tiny_models(family)
    pad, ids = _row(_batch(model, rows=(0,)), 0)
    expected = naive_attribution(model, ids, True)
    heads = expected["head_out"]  # [L, H, d]
    np.testing.assert_allclose(expected["position_out"].sum(2), heads, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(expected["unit_out_sum"], heads, rtol=1e-9, atol=1e-10)
    atol = 1e-6 if model.spec.attn_post_norm else 1e-10  # Gemma-2: HF runs the post-norm in fp32
    total = heads.sum(1) + expected["attn_rest"]  # Σ_h o_h + b_O (Gemma-2: post-norm linearized)
    np.testing.assert_allclose(total, expected["attn_out"], rtol=1e-9, atol=atol)


@pytest.mark.parametrize("family", ["gpt2", "gemma2", "gpt_neox"])
def test_layer_scores_telescope(tiny_models, family):
    model = tiny_models(family)
    result = la.run(model, _batch(model), la.Config(levels=("layer",)))
    total = result.attn_score.sum(1) + result.ffn_score.sum(1)
    lp = result.logprob_resid_pre
    np.testing.assert_allclose(total, lp[:, -1] - lp[:, 0], rtol=1e-9, atol=1e-10)
    assert result.head_score is None and result.neuron_score is None and set(result.tables()) == set()
    if family != "gemma2":  # bs(final) = the model's logits (Gemma-2 soft-caps them)
        logits = rs.forward(model, _batch(model)).double().log_softmax(-1)
        expected = logits[np.arange(len(lp)), result.target_ids].numpy()
        np.testing.assert_allclose(lp[:, -1], expected, rtol=1e-9, atol=1e-6)


def test_frames_tables_arrays_and_conventions(tiny_models):
    model = tiny_models("llama_gqa")
    batch = _batch(model)
    result = la.run(model, batch, la.Config.preset("yu", n_top=3, n_tokens=4))
    frame = result.to_frame()
    L = model.n_layers
    assert len(frame) == len(batch) * L * 2 and frame.sublayer.tolist()[:2] == ["attn", "mlp"]
    np.testing.assert_allclose(frame.logprob_after - frame.logprob_before, frame.logprob_increase)
    np.testing.assert_allclose(
        frame.prob_increase, np.exp(frame.logprob_after) - np.exp(frame.logprob_before)
    )
    tables = result.tables()
    assert set(tables) == {"heads", "positions", "neurons", "attn_units"}
    assert len(tables["heads"]) == len(batch) * L * model.n_heads
    assert (tables["heads"].kv_head == tables["heads"]["head"] // model.n_groups).all()
    positions = tables["positions"]
    heads = min(result.config.position_heads, L * model.n_heads)  # the top heads of each fact
    assert len(positions) == sum(len(t) for t in result.tokens) * heads
    assert positions.src_pos.min() == 0
    units = tables["attn_units"]
    assert (units.src_pos >= 0).all() and len(units) == len(batch) * 2 * 3
    assert all(
        units.token[i] == result.tokens[int(units.fact_id[i])][units.src_pos[i]] for i in range(len(units))
    )
    neurons = tables["neurons"]
    assert {"top_tokens", "bottom_tokens", "promoted_tokens", "demoted_tokens", "rank", "end"} <= set(neurons)
    assert all(len(t) == 4 for t in neurons.top_tokens)
    flip = neurons.coeff < 0
    assert (neurons.promoted_tokens[flip] == neurons.bottom_tokens[flip]).all()
    assert (neurons.promoted_tokens[~flip] == neurons.top_tokens[~flip]).all()
    arrays = result.arrays()
    assert arrays["1/unit_score"].shape == (L, model.n_heads, model.d_head, len(result.tokens[1]))
    assert arrays["0/head_score"].shape == (L, model.n_heads) and "2/neuron_coeff" in arrays
    conventions = result.provenance["conventions"]
    assert conventions["bias"] is False and conventions["projection"] == "frozen_scale"
    assert result.provenance["config"]["preset_name"] == "yu"
    cost = la.cost(model, batch, la.Config(max_batch_rows=2))
    assert cost.forwards == 2 and cost.peak_bytes > 0
    few = la.cost(model, batch, la.Config(n_top=1, max_batch_rows=2))
    assert la.cost(model, batch, la.Config(exact="all", max_batch_rows=2)).vocab_rows > few.vocab_rows


def test_errors():
    with pytest.raises(rs.RecallscopeError, match="levels must be"):
        la.Config(levels=("neurons",))
    with pytest.raises(rs.RecallscopeError, match="levels must be"):
        la.Config(levels="neuron")
    with pytest.raises(rs.RecallscopeError, match="exact must be one of"):
        la.Config(exact="some")
    with pytest.raises(rs.RecallscopeError, match="target must be"):
        la.Config(target="answer")
    with pytest.raises(rs.RecallscopeError, match="n_top must be an integer ≥ 1"):
        la.Config(n_top=0)
    with pytest.raises(rs.RecallscopeError, match="did you mean 'n_top'"):
        la.Config.from_dict({"ntop": 3})
