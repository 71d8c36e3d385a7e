"""Logit lens / early decoding: exact relations with the model's own computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import recallscope as rs
from recallscope.data.facts import Fact
from recallscope.data.one_to_many import ListGeneration, OneToManySet, _with_tracked, match_item, parse_items
from recallscope.methods import logit_lens as ll

PROMPTS = ["The capital of France is", "Miles Davis plays the"]


def _batch(model):
    return rs.tokenize(
        model,
        PROMPTS,
        spans={"subject": ["France", "Miles Davis"]},
        targets=[" Paris", " trumpet"],
        fact_ids=["a", "b"],
    )


def test_last_resid_post_equals_the_model_logits(family, tiny_models):
    model = tiny_models(family)
    batch = _batch(model)
    result = ll.run(model, batch, ll.Config(sites=("resid_post",), targets=("gold", "top1")))
    logprobs = rs.forward(model, batch).double().log_softmax(-1)
    # HF computes RMSNorm in float32 even for float64 models: 1e-6 covers it
    expected = logprobs[torch.arange(2)[:, None], torch.stack([batch.target_ids, logprobs.argmax(-1)], 1)]
    np.testing.assert_allclose(result.logprob[:, 0, -1, 0, :], expected.numpy(), atol=1e-6)
    assert (result.rank[:, 0, -1, 0, 1] == 0).all()  # top1 has rank 0 at the last layer


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa", "gpt_neox", "gptj", "gemma4_text"])
def test_frozen_scale_updates_sum_to_the_final_logits(name, tiny_models):
    """Yan & Jia's decoding is additive: embeddings + every attn/MLP update (and per-layer input,
    Gemma 4) = the final residual."""
    model = tiny_models(name)
    batch = _batch(model)
    sites = ("attn_out", "mlp_out") + (("ple_out",) if model.spec.ple_update else ())
    updates = ll.run(model, batch, ll.Config(sites=sites, mode="frozen_scale", targets=("gold",)))
    final = ll.run(model, batch, ll.Config(sites=("resid_post",), mode="frozen_scale", targets=("gold",)))
    embed = rs.run_with_cache(
        model, batch, ["embed", "pos_embed"] if model.spec.pos_embed else ["embed"], positions=[-1]
    )
    resid = rs.run_with_cache(model, batch, [f"{model.n_layers - 1}.resid_post"], positions=[-1])
    x0 = sum(embed[s][:, 0] for s in embed)
    proj = rs.project_to_vocab(
        model,
        x0,
        "frozen_scale",
        scale_from=resid[f"{model.n_layers - 1}.resid_post"][:, 0],
        targets=batch.target_ids,
    )
    total = updates.logit[:, :, :, 0, 0].sum(axis=(1, 2)) + proj.target_logits.numpy()
    np.testing.assert_allclose(total, final.logit[:, 0, -1, 0, 0], atol=1e-9)


def test_positions_and_targets(tiny_models):
    model = tiny_models("llama_gqa")
    batch = _batch(model)
    config = ll.Config(
        sites=("resid_pre",),
        positions=("last", "subject_first", "subject_last", 0),
        targets=("gold", "top1", "subject"),
        k=3,
    )
    result = ll.run(model, batch, config)
    assert result.prob.shape == (2, 1, model.n_layers, 4, 3) and result.topk_ids.shape == (
        2,
        1,
        model.n_layers,
        4,
        3,
    )
    first = batch.spans["subject"][:, 0]
    assert result.target_tokens[1][2] == rs.decode_tokens(model, batch.input_ids[1, first[1]])
    cache = rs.run_with_cache(model, batch, ["1.resid_pre"], positions=torch.stack([first, first], 1))
    direct = rs.project_to_vocab(model, cache["1.resid_pre"][:, :1], "logit_lens", targets=batch.target_ids)
    np.testing.assert_allclose(
        result.logprob[:, 0, 1, 1, 0], direct.target_logprobs[:, 0].numpy(), atol=1e-12
    )
    frame = result.to_frame()
    assert len(frame) == 2 * model.n_layers * 4 * 3 and set(frame["target"]) == {"gold", "top1", "subject"}
    assert len(result.topk_frame()) == 2 * model.n_layers * 4 and len(result.topk_frame()["topk"][0]) == 3
    average = result.summary()
    assert set(average.columns) >= {"prob", "prob_ci", "n"} and (average["n"] == 2).all()
    assert (batch.pad_lengths > 0).any()  # index 0 is each prompt's own first token, not padding
    starts = ll._positions(batch, [0, 1, -1])
    assert (starts[:, 0] == batch.pad_lengths).all() and (starts[:, 1] == batch.pad_lengths + 1).all()
    assert (starts[:, 2] == batch.seq_len - 1).all()
    with pytest.raises(rs.RecallscopeError, match="position 40 is outside"):
        ll._positions(batch, [40])


def test_errors(tiny_models):
    model = tiny_models("gpt2")
    batch = _batch(model)
    with pytest.raises(rs.RecallscopeError, match="unknown position 'object_last'"):
        ll.run(model, batch, ll.Config(positions=("object_last",)))
    with pytest.raises(rs.RecallscopeError, match="unknown target 'answer_9'"):
        ll.run(model, batch, ll.Config(targets=("answer_9",)))
    with pytest.raises(rs.RecallscopeError, match="sites must be a non-empty tuple"):
        ll.Config(sites=("resid",))
    with pytest.raises(rs.RecallscopeError, match="parallel blocks"):
        ll.run(tiny_models("gptj"), _batch(tiny_models("gptj")), ll.Config(sites=("resid_mid",)))


def test_yan_jia_preset_on_one_to_many_steps(tiny_models):
    model = tiny_models("llama_gqa")
    gold = ["Paris", "Lyon", "Nice", "Lille", "Brest"]
    fact = Fact.from_template(
        "List three [cities] from {subject}: 1.", "France", gold, relation="country_cities"
    )
    text = " Paris 2. Lyon 3. Nice\n"
    items, spans = parse_items(fact.prompt, text, 3)
    gen = _with_tracked(
        model,
        ListGeneration(fact, text, tuple(items), tuple(spans), tuple(match_item(i, gold) for i in items)),
        3,
    )
    batch = OneToManySet(k=3, generations=[gen], kept=[gen]).step_batch(model, 2)
    result = ll.run(model, batch, ll.Config.preset("yan_jia"))
    assert result.targets == ["answer_1", "answer_2", "answer_3", "subject"]
    assert (
        result.sites == ["attn_out", "mlp_out"]
        and result.provenance["conventions"]["projection"] == "frozen_scale"
    )
    assert result.target_tokens[0][1].strip() == "Lyon"[: len(result.target_tokens[0][1].strip())]
