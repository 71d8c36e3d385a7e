"""Query attribution (Y&A-6): the batched core equals the naive loops; keys, shares and run() end to end."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import recallscope as rs
from oracles.query_attribution import frozen_norm, mlp_coeff, naive_query
from recallscope.core.query_keys import centred, component_cache, ffn_keys
from recallscope.methods import logprob_attribution as la
from recallscope.methods import query_attribution as qa
from recallscope.methods.base import Given
from recallscope.models.sites import Site
from tiny import DISCOVERED, FAMILY_NAMES, FLOAT32_INSIDE

PROMPTS = ["The capital of France is", "Famous Eiffel Tower stands in the city of"]


def _batch(model):
    # GPT-J computes attention scores in float32 even in float64 models, so its padded rows differ
    # from the unpadded oracle at ~1e-8: test it on one unpadded prompt
    return rs.tokenize(model, PROMPTS[:1] if model.spec.family in FLOAT32_INSIDE else PROMPTS)


def _value_rows(model, batch, seed: int = 0, n_neurons: int = 12, n_units: int = 10):
    """Random value rows per fact (every layer, units at real source positions), random Imp."""
    g = torch.Generator().manual_seed(seed)
    neurons, units = [], []
    for row, pad in enumerate(batch.pad_lengths.tolist()):
        n_real = batch.seq_len - pad
        for _ in range(n_neurons):
            layer, k = (int(torch.randint(high, (1,), generator=g)) for high in (model.n_layers, model.d_mlp))
            neurons.append((row, layer, k, float(torch.randn(1, generator=g))))
        for u in range(n_units):
            layer = u % model.n_layers
            head, dim, j = (
                int(torch.randint(h, (1,), generator=g)) for h in (model.n_heads, model.d_head, n_real)
            )
            units.append((row, layer, head, dim, pad + j, float(torch.randn(1, generator=g))))
    return (
        pd.DataFrame(neurons, columns=list(qa.NEURON_COLUMNS)),
        pd.DataFrame(units, columns=list(qa.UNIT_COLUMNS)),
    )


def _naive_rows(neurons, units, row: int, pad: int):
    n = neurons[neurons.fact_row == row]
    u = units[units.fact_row == row]
    return (
        list(zip(n.layer, n.neuron, n.imp, strict=True)),
        list(zip(u["layer"], u["head"], u["dim"], u["src"] - pad, u["imp"], strict=True)),
    )


def _assert_matches_naive(model, batch, result, neurons, units, config):
    for row in range(len(batch)):
        pad = int(batch.pad_lengths[row])
        naive = naive_query(
            model,
            batch.input_ids[row, pad:],
            *_naive_rows(neurons, units, row, pad),
            ffn_key_kind=config.ffn_key,
            centre=config.centre,
            guard=config.guard,
            n_query=config.n_query_neurons,
            n_show=config.n_show,
            n_tokens=config.n_tokens,
        )
        np.testing.assert_allclose(result.ffn_value_scores[row], naive["ffn_value"], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(result.attn_unit_scores[row], naive["attn_unit"], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(result.query_score[row], naive["query"], rtol=1e-9, atol=1e-12)
        assert result.n_unstable[row].tolist() == naive["unstable"]
        table = result.query_neurons[result.query_neurons.fact_id == result.fact_ids[row]]
        assert list(zip(table.layer, table.neuron, strict=True)) == [(i, k) for i, k, _ in naive["ranked"]]
        np.testing.assert_allclose(table.score, [s for _, _, s in naive["ranked"]], rtol=1e-9)
        for line in table.itertuples():
            if (line.layer, line.neuron) in naive["shown"]:
                layer, head, ov, own = naive["shown"][(line.layer, line.neuron)]
                assert (line.head_layer, line.head) == (layer, head)
                assert line.ov_top_tokens == rs.decode_tokens(model, torch.tensor(ov))
                assert line.value_top_tokens == rs.decode_tokens(model, torch.tensor(own))
            else:
                assert line.head == -1 and line.ov_top_tokens is None
        assert (table["head"] >= 0).sum() == min(config.n_show, len(table))


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa", "gemma2", "gpt_neox", "gptj", "opt", *DISCOVERED])
@pytest.mark.parametrize("ffn_key", ["linearized", "as_coded"])
def test_batched_core_equals_naive_loops(tiny_models, family, ffn_key):
    model = tiny_models(family)
    batch = _batch(model)
    neurons, units = _value_rows(model, batch)
    config = qa.Config(
        ffn_key=ffn_key, centre=ffn_key == "linearized", n_query_neurons=50, n_show=4, max_batch_rows=1
    )
    result = qa.query_scores(model, batch, neurons, units, config)
    _assert_matches_naive(model, batch, result, neurons, units, config)


@pytest.mark.parametrize("family", ["llama_gqa", "gpt2"])
@pytest.mark.parametrize("ffn_key", ["input_row", "value", "gate_row"])
def test_weight_row_keys_and_guard_equal_naive(tiny_models, family, ffn_key):
    model = tiny_models(family)
    if ffn_key == "gate_row" and not model.spec.gated_mlp:
        with pytest.raises(rs.RecallscopeError, match="needs a gated MLP"):
            qa.query_scores(
                model, _batch(model), *_value_rows(model, _batch(model)), qa.Config(ffn_key=ffn_key)
            )
        return
    batch = _batch(model)
    neurons, units = _value_rows(model, batch, seed=1)
    config = qa.Config(ffn_key=ffn_key, guard=0.5, n_query_neurons=20, n_show=3)
    result = qa.query_scores(model, batch, neurons, units, config)
    assert result.n_unstable.sum() > 0  # a large guard skips rows
    _assert_matches_naive(model, batch, result, neurons, units, config)


@pytest.mark.parametrize("family", ["llama_gqa", "gpt2", "gemma2"])
def test_shares_of_stable_rows_sum_to_one(tiny_models, family):
    model = tiny_models(family)
    batch = _batch(model)
    neurons, units = _value_rows(model, batch, seed=2)
    result = qa.query_scores(model, batch, neurons.assign(imp=1.0), units.assign(imp=1.0), qa.Config())
    stable_neurons = result.n_value_neurons - result.n_unstable[:, 0]
    stable_units = result.n_value_units - result.n_unstable[:, 1]
    np.testing.assert_allclose(result.ffn_value_scores.sum(-1), stable_neurons, rtol=1e-10)
    np.testing.assert_allclose(result.attn_unit_scores.sum(-1), stable_units, rtol=1e-10)
    # a unit reads the residual before its own block, so the last block's updates never feed one
    assert (result.attn_unit_scores[:, -2:] == 0).all()


@pytest.mark.parametrize("family", ["llama_gqa", "gemma2", "gpt2"])
def test_linearized_key_is_the_frozen_norm_gradient(tiny_models, family):
    model = tiny_models(family)
    batch = rs.tokenize(model, PROMPTS[:1])
    neurons = pd.DataFrame(
        [(0, layer, k, 1.0) for layer in range(model.n_layers) for k in (0, 5, 17)],
        columns=list(qa.NEURON_COLUMNS),
    )
    config = qa.Config(ffn_key="linearized", centre=True)
    acts = component_cache(model, batch, neurons, neurons.iloc[:0].assign(head=0, dim=0, src=0))
    keys = centred(model, ffn_keys(model, acts, neurons, config.ffn_key), config.centre)
    for m, (layer, k) in enumerate(zip(neurons.layer, neurons.neuron, strict=True)):
        cache = rs.run_with_cache(
            model, batch, [Site(layer, "resid_pre"), Site(layer, "attn_out")], positions=[-1]
        )
        x = cache[Site(layer, "resid_pre")][0, 0] + cache[Site(layer, "attn_out")][0, 0]
        _, rho = frozen_norm(model, layer, x)
        x = x.clone().requires_grad_(True)
        with torch.enable_grad():
            coeff = mlp_coeff(model, layer, frozen_norm(model, layer, x, rho)[0])[k]
            (grad,) = torch.autograd.grad(coeff, x)
        np.testing.assert_allclose(keys[m].numpy(), grad.numpy(), rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "phi"])
def test_plain_mlp_linearized_and_input_row_shares_agree(tiny_models, family):
    model = tiny_models(family)
    batch = _batch(model)
    neurons, units = _value_rows(model, batch, seed=3)
    lin = qa.query_scores(model, batch, neurons, units, qa.Config(ffn_key="linearized"))
    row = qa.query_scores(model, batch, neurons, units, qa.Config(ffn_key="input_row"))
    np.testing.assert_allclose(lin.ffn_value_scores, row.ffn_value_scores, rtol=1e-9, atol=1e-12)
    assert (lin.n_unstable == row.n_unstable).all()


def test_padded_batch_equals_one_by_one(tiny_models):
    model = tiny_models("llama_gqa")
    batch = _batch(model)
    neurons, units = _value_rows(model, batch, seed=4)
    config = qa.Config(n_query_neurons=40)
    together = qa.query_scores(model, batch, neurons, units, config)
    for row in range(len(batch)):
        alone = rs.tokenize(model, [PROMPTS[row]])
        shift = int(alone.pad_lengths[0]) - int(batch.pad_lengths[row])
        n, u = neurons[neurons.fact_row == row], units[units.fact_row == row]
        one = qa.query_scores(
            model, alone, n.assign(fact_row=0), u.assign(fact_row=0, src=u.src + shift), config
        )
        np.testing.assert_allclose(
            together.ffn_value_scores[row], one.ffn_value_scores[0], rtol=1e-9, atol=1e-12
        )
        np.testing.assert_allclose(
            together.attn_unit_scores[row], one.attn_unit_scores[0], rtol=1e-9, atol=1e-12
        )
        np.testing.assert_allclose(together.query_score[row], one.query_score[0], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa"])
def test_run_end_to_end(tiny_models, family):
    model = tiny_models(family)
    batch = rs.tokenize(model, PROMPTS, fact_ids=["f0", "f1"])
    config = qa.Config(n_value_neurons=8, n_value_units=6, n_query_neurons=25, n_show=3)
    result = qa.run(model, batch, config)
    need = la.Config.from_dict(qa.requires(config)["logprob_attribution"])
    values = Given.of("logprob_attribution", need, la.run(model, batch, need))
    neurons, units, known = qa.value_rows(values, batch, config)
    assert neurons.groupby("fact_row").size().tolist() == [8, 8] and len(units) == 12
    assert (units.src >= batch.pad_lengths.numpy()[units.fact_row]).all()
    _assert_matches_naive(model, batch, result, neurons, units, config)
    assert result.fact_ids == ["f0", "f1"] and list(result.target_ids) == [
        values.array(fact, "target_id")[0] for fact in values.fact_ids
    ]

    frame = result.to_frame()
    assert len(frame) == 2 * 2 * (2 * model.n_layers + 1)
    assert set(frame.analysis) == set(qa.ANALYSES) and frame.component.iloc[0] == "embed"
    assert frame[frame.component == "1.mlp_out"].component_layer.unique().tolist() == [1]
    tables = result.tables()
    summary = tables["summary"].set_index("fact_id")
    for fact, rows in tables["query_neurons"].groupby("fact_id"):
        known_f = known[known.fact_row == result.fact_ids.index(fact)]
        pairs = set(zip(known_f.layer, known_f.neuron, strict=True))
        expected = [(i, k) in pairs for i, k in zip(rows.layer, rows.neuron, strict=True)]
        assert rows.also_value_neuron.tolist() == expected
        assert summary.loc[fact, "n_query_and_value"] == sum(expected)
    assert set(result.arrays()) == {
        f"{f}/{n}" for f in ("f0", "f1") for n in ("ffn_value_scores", "attn_unit_scores", "query_score")
    }
    assert (result.value_units.src_pos >= 0).all()
    conventions = result.provenance["conventions"]
    assert conventions["ffn_key"] == "linearized" and conventions["bias"] is True
    estimate = qa.cost(model, batch, config)
    assert estimate.forwards >= 2 and estimate.peak_bytes > 0


def test_yu_preset(tiny_models):
    model = tiny_models("llama_gqa")
    config = qa.Config.preset("yu", n_value_neurons=5, n_value_units=5, n_query_neurons=10, n_show=2)
    assert config.ffn_key == "as_coded" and not config.centre and not config.bias
    result = qa.run(model, rs.tokenize(model, PROMPTS[:1]), config)
    assert result.provenance["conventions"]["ffn_key"] == "value"  # gated MLP: the Llama notebook's key
    assert np.isfinite(result.ffn_value_scores).all()


def test_errors():
    with pytest.raises(rs.RecallscopeError, match="ffn_key must be one of"):
        qa.Config(ffn_key="key")
    with pytest.raises(rs.RecallscopeError, match=r"guard must be a number in \[0, 1\), got 1.5"):
        qa.Config(guard=1.5)
    with pytest.raises(rs.RecallscopeError, match="n_show must be an integer ≥ 0"):
        qa.Config(n_show=-1)


def test_blocks_with_a_third_update_are_refused(tiny_models):
    model = tiny_models("gemma4_text")  # per-layer inputs: a component the shares would leave out
    with pytest.raises(rs.RecallscopeError, match="third update after the MLP .* ple_out"):
        qa.run(model, _batch(model))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_mlp_accessors_reproduce_the_mlp(tiny_models, family):
    model = tiny_models(family)
    batch = _batch(model)
    layer = 1
    if model.spec.at(layer).experts is not None:  # per-expert input weights: refused by name
        for accessor in (model.W_in, model.W_gate, model.mlp_act):
            with pytest.raises(rs.SiteError, match="mixture-of-experts MLP in block 1"):
                accessor(layer)
        return
    if model.spec.at(layer).mlp_in is None:  # Beam's float32 SwiGLU in a float64 model: not identified
        with pytest.raises(rs.SiteError, match="input side of block 1's MLP was not identified"):
            model.W_in(layer)
        return
    resid = Site(layer, "resid_pre" if model.spec.parallel else "resid_mid")
    cache = rs.run_with_cache(model, batch, [resid, Site(layer, "mlp_pre"), Site(layer, "mlp_post")])
    norm = model.spec.mlp_norm  # None: the MLP reads the residual itself (OLMo-2)
    x = cache[resid] * model.stream_scale(layer, resid.name.removeprefix("resid_"))  # the model's residual
    normed = x if norm is None else model.module(norm, layer)(x)

    def affine(W, b):
        return normed @ W + (0 if b is None else b)

    up = affine(model.W_in(layer), model.b_in(layer))
    act = model.mlp_act(layer)
    if model.spec.gated_mlp:
        pre = affine(model.W_gate(layer), model.b_gate(layer))
        post = act(pre) * up
    else:
        pre, post = up, act(up)
        with pytest.raises(rs.SiteError, match="no gated MLP"):
            model.W_gate(layer)
    torch.testing.assert_close(pre, cache[Site(layer, "mlp_pre")], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(post, cache[Site(layer, "mlp_post")], rtol=1e-6, atol=1e-6)
    assert model.W_in(layer).shape == (model.d_model, model.d_mlp)
