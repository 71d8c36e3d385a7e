"""Head mappings (G7): batched OV maps equal the naive per-head loop and the explicit [V, V] matrix;
the value weights are the real ``v``; GQA heads read ``h // n_groups``; the OV map of a lone token is
what the head really writes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import recallscope as rs
from oracles.head_mappings import head_vectors, naive_head_mappings, token_embeddings
from recallscope.core.decompose import head_outputs
from recallscope.methods import head_mappings as hm
from tiny import FAMILY_NAMES

PROMPTS = ["The capital of France is", "Famous Eiffel Tower stands in the city of"]
SUBJECTS = ["France", "Eiffel Tower"]
CONFIGS = {
    "default": hm.Config(max_batch_rows=1),
    "geva": hm.Config.preset("geva"),
    "last_raw": hm.Config(subject_tokens="last", readout="raw", top_k=5),
    "first_lens_gold": hm.Config(subject_tokens="first", input_norm=False, target="gold", top_k=3),
}


def _batch(model, prompts=PROMPTS, subjects=SUBJECTS):
    return rs.tokenize(model, prompts, spans={"subject": subjects}, targets=[" Paris"] * len(prompts))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_value_weights_give_the_v_site(tiny_models, family):
    """``ln_1(resid_pre) W_V + b_V`` is the ``v`` the model computes, for every family and layout."""
    model = tiny_models(family)
    if model.spec.v_proj is None and model.spec.qkv_proj is None:
        pytest.skip("values normalized in the attention (Gemma 4's v_norm): read in the kernel, no W_V")
    batch = _batch(model)
    layers = range(model.n_layers)
    sites = [rs.Site(layer, name) for layer in layers for name in ("resid_pre", "v")]
    cache = rs.run_with_cache(model, batch, sites)
    for layer in layers:
        x = cache[rs.Site(layer, "resid_pre")] * model.stream_scale(layer, "pre")  # the model's residual
        x = x if model.spec.ln_1 is None else model.module(model.spec.ln_1, layer)(x)  # OLMo-2: no norm
        v = torch.einsum("btd,kde->btke", x, model.W_V(layer))
        v = v if model.b_V(layer) is None else v + model.b_V(layer)
        torch.testing.assert_close(v, cache[rs.Site(layer, "v")], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize(
    "family", ["gpt2", "llama_gqa", "llama_mqa", "gpt_neox", "gemma2", "gptj", "phi", "opt"]
)
def test_batched_equals_naive_loop(tiny_models, family, config):
    model = tiny_models(family)
    batch = _batch(model)
    result = hm.run(model, batch, config)
    for row in range(len(batch)):
        pad = int(batch.pad_lengths[row])
        ids = batch.input_ids[row, pad:]
        subject = tuple(int(v) - pad for v in batch.spans["subject"][row])
        naive = naive_head_mappings(model, ids, subject, config, gold=int(batch.target_ids[row]))
        assert result.target_ids[row] == naive["target"]
        np.testing.assert_array_equal(result.mapping_rank[row], naive["mapping_rank"].numpy())
        np.testing.assert_array_equal(result.top_ids[row], naive["top_ids"].numpy())
        np.testing.assert_array_equal(result.output_rank[row], naive["output_rank"].numpy())
        np.testing.assert_allclose(
            result.output_logit[row], naive["output_logit"].numpy(), rtol=1e-9, atol=1e-12
        )


def test_gqa_query_heads_read_kv_head_h_div_n_groups(tiny_models):
    model = tiny_models("llama_gqa")  # 4 query heads, 2 kv heads: kv(h) = 0, 0, 1, 1 (not 0, 1, 0, 1)
    assert (model.n_heads, model.n_kv_heads) == (4, 2)
    x = token_embeddings(model, torch.tensor([5, 77, 140]))
    for layer in range(model.n_layers):
        fast = hm.ov_outputs(model, layer, x)  # [3, H, d]
        for head in range(model.n_heads):
            right = head_vectors(model, layer, head, x, norm=True)
            torch.testing.assert_close(fast[:, head], right, rtol=1e-10, atol=1e-12)
            if head // model.n_groups != head % model.n_kv_heads:
                wrong = head_vectors(model, layer, head, x, norm=True, kv_head=head % model.n_kv_heads)
                assert not torch.allclose(fast[:, head], wrong, atol=1e-3)


@pytest.mark.parametrize("family", ["llama_gqa", "llama_mqa", "gpt_neox", "gptj", "phi", "qwen3"])
def test_ov_map_of_a_lone_token_is_the_real_head_output(tiny_models, family):
    """A one-token prompt attends only to itself: at layer 0 each head writes exactly its OV map."""
    model = tiny_models(family)
    batch = rs.tokenize(model, ["The"], spans={"subject": ["The"]})
    assert batch.seq_len == 1
    cache = rs.run_with_cache(model, batch, ["embed", "0.z"])
    real = head_outputs(model, 0, cache["0.z"]).parts[:, 0]  # [1, H, d]
    torch.testing.assert_close(hm.ov_outputs(model, 0, cache["embed"][:, 0]), real, rtol=1e-10, atol=1e-12)
    result = hm.run(model, batch, hm.Config(readout="raw"))
    np.testing.assert_array_equal(result.mapping_rank[0, 0], result.output_rank[0, 0])


def test_gemma_inputs_carry_the_embedding_scale(tiny_models):
    model = tiny_models("gemma2")
    ids = torch.tensor([5, 6])
    scaled = token_embeddings(model, ids)
    torch.testing.assert_close(scaled, model.W_E[ids] * model.d_model**0.5, rtol=1e-6, atol=0)
    batch = rs.tokenize(model, ["The capital"], spans={"subject": ["The capital"]})
    embed = rs.run_with_cache(model, batch, ["embed"])["embed"]
    torch.testing.assert_close(
        hm.subject_inputs(batch, embed, "mean")[0], token_embeddings(model, batch.input_ids[0]).mean(0)
    )


def test_batched_equals_one_by_one(tiny_models):
    model = tiny_models("llama_gqa")
    prompts = PROMPTS + ["Miles Davis plays the"]
    subjects = SUBJECTS + ["Miles Davis"]
    config = hm.Config(max_batch_rows=2)
    together = hm.run(model, _batch(model, prompts, subjects), config)
    for row in range(3):
        alone = hm.run(model, _batch(model, prompts[row : row + 1], subjects[row : row + 1]), config)
        for name in ("target_ids", "mapping_rank", "top_ids", "output_rank"):
            np.testing.assert_array_equal(getattr(together, name)[row], getattr(alone, name)[0])
        np.testing.assert_allclose(together.output_logit[row], alone.output_logit[0], rtol=1e-10, atol=1e-12)


def test_tidy_rows_tables_and_conventions(tiny_models):
    model = tiny_models("llama_gqa")
    batch = rs.tokenize(
        model,
        PROMPTS + ["Miles Davis plays the"],
        spans={"subject": [*SUBJECTS, None]},
        fact_ids=["a", "b", "c"],
    )
    result = hm.run(model, batch, hm.Config(top_k=40))
    assert result.skipped == [("c", "no subject span")] and result.fact_ids == ["a", "b"]
    frame = result.to_frame()
    assert len(frame) == 2 * model.n_layers * model.n_heads
    assert list(frame.columns) == [
        "fact_id",
        "layer",
        "head",
        "kv_head",
        "mapping_rank",
        "in_top_k",
        "output_rank",
        "output_logit",
        "target",
    ]
    assert (frame["kv_head"] == frame["head"] // 2).all()
    assert (frame["in_top_k"] == (frame["mapping_rank"] < 40)).all()
    top = result.tables()["top_tokens"]
    assert len(top) == frame["in_top_k"].sum() and all(len(t) == 40 for t in top["top_tokens"])
    first = top.iloc[0]
    f = result.fact_ids.index(first.fact_id)
    assert first.top_tokens == rs.decode_tokens(
        model, torch.as_tensor(result.top_ids[f, first["layer"], first["head"]])
    )
    assert first.top_tokens[first.mapping_rank] == first.target
    assert set(result.arrays()) == {
        f"{f}/{n}" for f in "ab" for n in ("mapping_rank", "top_ids", "output_rank")
    }
    assert result.arrays()["a/top_ids"].shape == (model.n_layers, model.n_heads, 40)
    conventions = result.provenance["conventions"]
    assert conventions["readout"] == "logit_lens" and "h // n_groups" in conventions["ov_map"]
    assert hm.cost(model, batch, hm.Config(max_batch_rows=2)).forwards == 2


def test_rank_heads_orders_by_fraction_then_mean_rank():
    frame = pd.DataFrame(
        {
            "fact_id": ["a", "b", "c"] * 3,
            "layer": [0] * 3 + [1] * 3 + [1] * 3,
            "head": [0] * 3 + [0] * 3 + [1] * 3,
            "mapping_rank": [0, 50, 60, 3, 4, 90, 1, 2, 3],
            "in_top_k": [True, False, False, True, True, False, True, True, True],
        }
    )
    ranked = hm.rank_heads(frame)
    assert list(zip(ranked["layer"], ranked["head"], strict=True)) == [(1, 1), (1, 0), (0, 0)]
    assert ranked["n_in_top_k"].tolist() == [3, 2, 1] and ranked["n_facts"].tolist() == [3, 3, 3]
    np.testing.assert_allclose(ranked["frac_in_top_k"], [1, 2 / 3, 1 / 3])
    np.testing.assert_allclose(ranked["mean_mapping_rank"], [2, 97 / 3, 110 / 3])
    tie = frame.assign(in_top_k=True, mapping_rank=np.where(frame["layer"] == 0, 0, frame["mapping_rank"]))
    ranked = hm.rank_heads(tie)  # every fraction is 1: mean ranks 0 < 2 < 32.3 decide
    assert ranked[["layer", "head"]].values.tolist() == [[0, 0], [1, 1], [1, 0]]


def test_errors(tiny_models):
    with pytest.raises(rs.RecallscopeError, match="subject_tokens must be one of"):
        hm.Config(subject_tokens="all")
    with pytest.raises(rs.RecallscopeError, match="readout must be one of"):
        hm.Config(readout="lens")
    with pytest.raises(rs.RecallscopeError, match="top_k must be an integer ≥ 1"):
        hm.Config(top_k=0)
    model = tiny_models("gpt2")
    with pytest.raises(rs.RecallscopeError, match="need a subject span"):
        hm.run(model, rs.tokenize(model, ["France is"]))
    batch = rs.tokenize(model, ["France is"], spans={"subject": ["France"]})
    with pytest.raises(rs.RecallscopeError, match="exceeds the vocabulary"):
        hm.run(model, batch, hm.Config(top_k=10_000))
    with pytest.raises(rs.RecallscopeError, match="target='gold' needs"):
        hm.run(model, batch, hm.Config(target="gold"))
