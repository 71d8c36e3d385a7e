"""Attention knockout (G1): batched rows equal the naive per-window loop; null knockouts are the clean run."""

from __future__ import annotations

import numpy as np
import pytest

import recallscope as rs
from oracles.attention_knockout import naive_prob, naive_window, source_positions
from recallscope.methods import attention_knockout as ak
from tiny import DISCOVERED

PROMPTS = ["The capital of France is", "Famous Eiffel Tower stands in the city of"]
SUBJECTS = ["France", "Eiffel Tower"]


def _batch(model):
    return rs.tokenize(model, PROMPTS, spans={"subject": SUBJECTS}, targets=[" Paris", " Paris"])


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa", "gemma2", "gpt_neox", "phi", *DISCOVERED])
@pytest.mark.parametrize("mode", ["pre_softmax", "post_softmax_zero"])
def test_batched_equals_naive_loop(tiny_models, family, mode):
    model = tiny_models(family)
    batch = _batch(model)
    config = ak.Config(window=3, mode=mode, max_batch_rows=7)
    result = ak.run(model, batch, config)
    for row in range(len(batch)):
        pad = int(batch.pad_lengths[row])
        ids = batch.input_ids[row, pad:]
        subject = tuple(int(v) - pad for v in batch.spans["subject"][row])
        clean = rs.forward(model, ids[None])[0].double().softmax(-1)
        target = int(clean.argmax())
        np.testing.assert_allclose(result.clean_prob[row], float(clean[target]), rtol=1e-10)
        for s, source in enumerate(config.sources):
            src = source_positions(len(ids), subject, source)
            for layer in range(model.n_layers):
                layers = naive_window(layer, config.window, model.n_layers)
                expected = naive_prob(model, ids, target, layers, src, mode)
                np.testing.assert_allclose(result.prob[row, s, layer], expected, rtol=1e-9, atol=1e-12)
        for t in (0, subject[0], len(ids) - 1):
            expected = naive_prob(model, ids, target, naive_window(1, 3, model.n_layers), [t], mode)
            np.testing.assert_allclose(result.token_maps[row][t, 1], expected, rtol=1e-9, atol=1e-12)


def test_tidy_rows_and_conventions(tiny_models):
    model = tiny_models("llama_gqa")
    result = ak.run(model, _batch(model), ak.Config(window=9))
    frame = result.to_frame()
    assert len(frame) == 2 * 3 * model.n_layers and set(frame["source"]) == set(ak.SOURCES)
    edge = frame[(frame.layer == 0)].iloc[0]
    assert edge.window_start == 0 and edge.window_stop == min(model.n_layers, 5)
    np.testing.assert_allclose(
        frame["change_pct"], 100 * (frame["prob"] - frame["clean_prob"]) / frame["clean_prob"]
    )
    tokens = result.tables()["tokens"]
    assert set(tokens["fact_id"]) == {"0", "1"} and tokens.groupby("fact_id").size().tolist() == [
        len(result.tokens[0]) * model.n_layers,
        len(result.tokens[1]) * model.n_layers,
    ]
    assert result.provenance["conventions"]["knockout_mode"] == "pre_softmax"
    assert set(result.arrays()) == {"0/prob", "1/prob", "0/token_map", "1/token_map"}
    assert ak.cost(model, _batch(model), ak.Config()).forwards >= 2


def test_no_source_blocked_equals_clean(tiny_models):
    model = tiny_models("gpt2")
    batch = rs.tokenize(model, ["France is"], spans={"subject": ["France"]})
    result = ak.run(model, batch, ak.Config(sources=("non_subject",), token_map=False))
    np.testing.assert_allclose(result.prob[0, 0], result.clean_prob[0], rtol=1e-14)  # batch shapes differ


def test_errors(tiny_models):
    with pytest.raises(rs.RecallscopeError, match="sources must be a non-empty tuple"):
        ak.Config(sources=("relation",))
    model = tiny_models("gpt2")
    batch = rs.tokenize(model, ["France is"])
    with pytest.raises(rs.RecallscopeError, match="needs a subject span"):
        ak.run(model, batch)
