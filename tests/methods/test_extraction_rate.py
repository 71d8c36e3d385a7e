"""Extraction rate (G4/G6): batched == naive per-fact loops, the unmodified counterfactual is the real
update, renormalizing equals pre-softmax masking, padding changes nothing, and the summary statistics."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import recallscope as rs
from oracles.extraction_rate import blocked_positions, naive_fact
from recallscope.methods import extraction_rate as er
from tiny import DISCOVERED, FLOAT32_INSIDE, sentencepiece_tokenizer, tiny_model

PROMPTS = ["The capital of France is", "Famous Eiffel Tower stands in the city of"]
SUBJECTS = ["France", "Eiffel Tower"]
MORE_PROMPTS = [*PROMPTS, "Miles Davis plays the"]
MORE_SUBJECTS = [*SUBJECTS, "Miles Davis"]


def _batch(model, prompts=PROMPTS, subjects=SUBJECTS):
    return rs.tokenize(model, prompts, spans={"subject": subjects}, targets=[" Paris"] * len(prompts))


def _unpadded(batch, row):
    pad = int(batch.pad_lengths[row])
    return batch.input_ids[row, pad:], tuple(int(v) - pad for v in batch.spans["subject"][row])


def _check_against_naive(result, model, batch, readout, mode, target=None):
    config = result.config
    # the FLOAT32_INSIDE families compute part of their forward in float32
    tol = dict(rtol=1e-7, atol=1e-9) if model.spec.family in FLOAT32_INSIDE else dict(rtol=1e-9, atol=1e-10)
    for row in range(len(batch)):
        ids, subject = _unpadded(batch, row)
        gold = None if target is None else int(target[row])
        naive = naive_fact(
            model,
            ids,
            subject,
            target=gold,
            readout=readout,
            variants=config.counterfactuals,
            mode=mode,
            k=config.top_k_tokens,
        )
        assert result.target_ids[row] == naive["target"]
        for layer in range(model.n_layers):
            for kind in ("attn", "mlp", "subject"):
                rank, extracts, logit, top = naive[(kind, layer)]
                assert getattr(result, f"{kind}_rank")[row, layer] == rank, (kind, layer)
                np.testing.assert_allclose(getattr(result, f"{kind}_logit")[row, layer], logit, **tol)
                assert getattr(result, f"{kind}_top")[row, layer].tolist() == top
                if kind != "subject":
                    assert getattr(result, f"{kind}_extracts")[row, layer] == extracts
            for v, name in enumerate(config.counterfactuals):
                rank, extracts, logit, top1 = naive["cf"][(name, layer)]
                assert result.cf_rank[row, v, layer] == rank, (name, layer)
                assert result.cf_extracts[row, v, layer] == extracts, (name, layer)
                assert result.cf_top1[row, v, layer] == top1, (name, layer)
                np.testing.assert_allclose(result.cf_logit[row, v, layer], logit, **tol)


@pytest.mark.parametrize(
    "family", ["gpt2", "llama_gqa", "gemma2", "gptj", "gpt_neox", "opt", "phi", *DISCOVERED]
)
@pytest.mark.parametrize(
    ("mode", "readout"), [("renormalize", "logit_lens"), ("resoftmax", "raw_embed"), ("renormalize", "raw")]
)
def test_batched_equals_naive_loop(tiny_models, family, mode, readout):
    model = tiny_models(family)
    config = er.Config(readout=readout, counterfactual_mode=mode, top_k_tokens=5)
    batches = [_batch(model)]
    if family in FLOAT32_INSIDE:  # padding moves their float32 parts by a rounding step: unpadded rows
        batches = [_batch(model, [p], [s]) for p, s in zip(PROMPTS, SUBJECTS, strict=True)]
    for batch in batches:
        _check_against_naive(er.run(model, batch, config), model, batch, readout, mode)


def test_gold_target_against_naive(tiny_models):
    model = tiny_models("llama_mqa")
    batch = _batch(model)
    result = er.run(model, batch, er.Config(target="gold", counterfactuals=("subject", "all_but_first")))
    assert result.target_ids.tolist() == batch.target_ids.tolist()
    _check_against_naive(result, model, batch, "logit_lens", "renormalize", target=batch.target_ids)


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa", "llama_mqa", "gemma2", "gptj", "gpt_neox", "opt"])
def test_unmodified_counterfactual_is_the_real_update(tiny_models, family):
    model = tiny_models(family)
    batch = _batch(model)
    cap = er.capture(model, batch)
    real = batch.attention_mask.bool()
    for mode in ("renormalize", "resoftmax"):
        weights = er.counterfactual_weights(cap.pattern, er.blocked_keys(batch, ("none",)), real, mode)
        assert torch.equal(weights[:, :, 0], cap.pattern)  # blocking nothing leaves the row as it was
        rebuilt = er.counterfactual_outputs(model, cap, weights)[:, 0]  # [B, L, d_model]
        torch.testing.assert_close(rebuilt, cap.attn_out, rtol=1e-10, atol=1e-12)
    result = er.run(model, batch, er.Config(counterfactuals=("none", "all")))
    np.testing.assert_array_equal(result.cf_rank[:, 0], result.attn_rank)
    np.testing.assert_array_equal(result.cf_extracts[:, 0], result.attn_extracts)
    np.testing.assert_allclose(result.cf_logit[:, 0], result.attn_logit, rtol=1e-9)


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa", "gemma2", "gptj", "phi"])
def test_renormalize_equals_pre_softmax_masking(tiny_models, family):
    """Blocking keys of the last query in one layer only: that layer's real update equals the local
    counterfactual (earlier layers, and other queries, are untouched)."""
    model = tiny_models(family)
    batch = _batch(model)
    names = ("subject", "last", "non_subject_ex_last", "all_but_subject_last+last")
    blocked = er.blocked_keys(batch, names)
    cap = er.capture(model, batch)
    weights = er.counterfactual_weights(cap.pattern, blocked, batch.attention_mask.bool(), "renormalize")
    local = er.counterfactual_outputs(model, cap, weights)  # [B, n, L, d_model]
    rows = batch.select(torch.arange(len(batch)).repeat_interleave(len(names)))  # row b·n + v
    for layer in range(model.n_layers):
        mask = torch.zeros(len(rows), 1, batch.seq_len, batch.seq_len, dtype=torch.bool)
        mask[:, 0, -1, :] = blocked.flatten(0, 1)
        with rs.block_attention(model, {layer: mask}):
            knocked = er.capture(model, rows).attn_out[:, layer].unflatten(0, (len(batch), len(names)))
        torch.testing.assert_close(local[:, :, layer], knocked, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa", "mistral"])
def test_padded_batch_equals_one_by_one(tiny_models, family):
    model = tiny_models(family)
    batch = _batch(model, MORE_PROMPTS, MORE_SUBJECTS)
    config = er.Config(max_batch_rows=2, counterfactual_mode="resoftmax")
    together = er.run(model, batch, config)
    assert len(set(batch.pad_lengths.tolist())) > 1
    for row in range(len(batch)):
        alone = er.run(model, _batch(model, [MORE_PROMPTS[row]], [MORE_SUBJECTS[row]]), config)
        for name in ("target_ids", "attn_rank", "mlp_rank", "subject_rank", "attn_top", "mlp_top", "cf_rank"):
            np.testing.assert_array_equal(getattr(together, name)[row], getattr(alone, name)[0], err_msg=name)
        for name in ("attn_extracts", "mlp_extracts", "cf_extracts", "cf_top1"):
            np.testing.assert_array_equal(getattr(together, name)[row], getattr(alone, name)[0], err_msg=name)
        for name in ("attn_logit", "mlp_logit", "subject_logit", "cf_logit"):
            np.testing.assert_allclose(getattr(together, name)[row], getattr(alone, name)[0], rtol=1e-9)


def test_blocked_keys_with_bos_and_padding():
    model = tiny_model("llama_gqa", tokenizer=sentencepiece_tokenizer())
    batch = _batch(model)
    assert batch.n_prefix == 1  # <s> comes first: "first" is the BOS, which is not in the subject
    blocked = er.blocked_keys(batch, er.COUNTERFACTUALS)  # [B, n, T]
    for row in range(len(batch)):
        pad = int(batch.pad_lengths[row])
        ids, subject = _unpadded(batch, row)
        assert not blocked[row, :, :pad].any()  # padding is never a key
        for v, name in enumerate(er.COUNTERFACTUALS):
            got = {int(t) - pad for t in blocked[row, v].nonzero()[:, 0]}
            assert got == blocked_positions(len(ids), subject, name), name
    assert blocked[:, er.COUNTERFACTUALS.index("all_but_first")].sum(-1).tolist() == [
        int(n) - 1 for n in batch.attention_mask.sum(-1)
    ]
    result = er.run(model, batch, er.Config(counterfactual_mode="resoftmax", top_k_tokens=3))
    _check_against_naive(result, model, batch, "logit_lens", "resoftmax")


def test_resoftmax_differs_from_renormalize(tiny_models):
    model = tiny_models("gpt2")
    batch = _batch(model)
    cap = er.capture(model, batch)
    real = batch.attention_mask.bool()
    blocked = er.blocked_keys(batch, ("subject", "all"))
    renorm = er.counterfactual_weights(cap.pattern, blocked, real, "renormalize")
    resoft = er.counterfactual_weights(cap.pattern, blocked, real, "resoftmax")
    assert not torch.allclose(renorm[:, :, 0], resoft[:, :, 0])
    for weights in (renorm, resoft):  # surviving rows sum to 1, blocked keys get 0, "all" is all zeros
        torch.testing.assert_close(weights[:, :, 0].sum(-1), torch.ones_like(weights[:, :, 0, :, 0]))
        assert (weights[:, :, 0][blocked[:, None, 0, None, :].expand_as(weights[:, :, 0])] < 1e-300).all()
        assert not weights[:, :, 1].any()
    survivors = (~blocked[:, 0] & real)[:, None, None].expand_as(resoft[:, :, 0])  # [B, L, H, T]
    kept = resoft[:, :, 0]  # resoftmax of probabilities in [0, 1]: survivors within a factor e per head
    ratio = kept.masked_fill(~survivors, 0).amax(-1) / kept.masked_fill(~survivors, 1).amin(-1)
    assert survivors.any(-1).all() and (ratio <= np.e + 1e-9).all()
    one = er.run(model, batch, er.Config(counterfactuals=("subject",)))
    other = er.run(model, batch, er.Config(counterfactuals=("subject",), counterfactual_mode="resoftmax"))
    assert not np.allclose(one.cf_logit, other.cf_logit)
    np.testing.assert_array_equal(one.attn_rank, other.attn_rank)


def test_tidy_rows_and_conventions(tiny_models):
    model = tiny_models("llama_gqa")
    batch = _batch(model)
    config = er.Config.preset("geva")
    assert config.readout == "raw_embed" and config.counterfactual_mode == "resoftmax"
    result = er.run(model, batch, config)
    frame = result.to_frame()
    assert len(frame) == 2 * model.n_layers
    assert {
        "fact_id",
        "layer",
        "attn_rank",
        "mlp_rank",
        "attn_extracts",
        "mlp_extracts",
        "subject_rank",
    } <= set(frame.columns)
    assert (frame["attn_extracts"] <= (frame["attn_rank"] == 0)).all()
    assert frame["target"].tolist()[0] == rs.decode_tokens(model, torch.tensor(result.target_ids[0]))
    cf = result.tables()["counterfactuals"]
    assert len(cf) == 2 * model.n_layers * len(er.COUNTERFACTUALS)
    assert set(cf["variant"]) == set(er.COUNTERFACTUALS) and set(cf["fact_id"]) == {"0", "1"}
    arrays = result.arrays()
    assert arrays["0/attn_top"].shape == (model.n_layers, 10)
    assert arrays["1/counterfactual_rank"].shape == (len(er.COUNTERFACTUALS), model.n_layers)
    conventions = result.provenance["conventions"]
    assert conventions["readout"] == "raw_embed" and conventions["counterfactual_mode"] == "resoftmax"
    assert er.run(model, batch, er.Config(counterfactuals=())).tables() == {}
    cost = er.cost(model, batch, er.Config(max_batch_rows=1))
    assert (
        cost.forwards == 2 and cost.peak_bytes > 0 and cost.token_blocks == 2 * batch.seq_len * model.n_layers
    )
    layer_rates = er.layer_rates(frame)
    assert layer_rates["layer"].tolist() == list(range(model.n_layers)) and (layer_rates["n"] == 2).all()


def test_summary_on_hand_made_frame():
    # fact a: attn at layers 1, 2 and mlp at 2; b: mlp at 0, attn at 3; c: attn only at 0; d: nothing
    rows = []
    events = {"a": ({1, 2}, {2}), "b": ({3}, {0}), "c": ({0}, set()), "d": (set(), set())}
    subject_rank = {("a", 1): 7, ("a", 2): 3, ("b", 3): 0, ("c", 0): 12}
    for fact, (attn, mlp) in events.items():
        for layer in range(4):
            rows.append(
                {
                    "fact_id": fact,
                    "layer": layer,
                    "attn_extracts": layer in attn,
                    "mlp_extracts": layer in mlp,
                    "attn_rank": 0 if layer in attn else 5,
                    "subject_rank": subject_rank.get((fact, layer), 9),
                }
            )
    stats = er.summary(pd.DataFrame(rows)).iloc[0]
    assert stats.n_facts == 4
    assert stats.attn_example_rate == 0.75 and stats.mlp_example_rate == 0.5
    assert stats.attn_layers_mean == 1.0 and stats.attn_layers_mean_extracting == pytest.approx(4 / 3)
    assert stats.mlp_layers_mean == 0.5 and stats.mlp_layers_mean_extracting == 1.0
    assert (stats.attn_only_pct, stats.mlp_only_pct, stats.both_pct, stats.none_pct) == (25, 0, 50, 25)
    assert stats.attn_first_pct == 50  # a: attn 1 <= mlp 2; b: attn 3 > mlp 0
    assert stats.rank_gap_n == 4  # gaps 7, 3, 0, 12
    assert (stats.rank_gap_q1, stats.rank_gap_median, stats.rank_gap_q3) == (2.25, 5.0, 8.25)
    rates = er.layer_rates(pd.DataFrame(rows))
    assert rates["attn_rate"].tolist() == [0.25, 0.25, 0.25, 0.25] and rates["mlp_rate"].tolist()[0] == 0.25
    empty = er.summary(pd.DataFrame(rows).assign(attn_extracts=False, mlp_extracts=False)).iloc[0]
    assert empty.none_pct == 100 and np.isnan(empty.attn_first_pct) and np.isnan(empty.rank_gap_median)


def test_errors(tiny_models):
    with pytest.raises(rs.RecallscopeError, match="counterfactuals must be a tuple of distinct items"):
        er.Config(counterfactuals=("relation",))
    with pytest.raises(rs.RecallscopeError, match="counterfactual_mode must be"):
        er.Config(counterfactual_mode="mask")
    with pytest.raises(rs.RecallscopeError, match="readout must be one of"):
        er.Config(readout="tuned")
    with pytest.raises(rs.RecallscopeError, match="top_k_tokens must be an integer ≥ 1"):
        er.Config(top_k_tokens=0)
    model = tiny_models("gpt2")
    with pytest.raises(rs.RecallscopeError, match="needs a subject span in every prompt"):
        er.run(model, rs.tokenize(model, ["France is"]))
