"""Causal tracing and logit lens on the embedded SmolLM2."""

from __future__ import annotations

import random

import pytest

import recallscope as rs
from oracles.causal_tracing import SITE, naive_cell, window_layers
from recallscope.methods import causal_tracing as ct
from recallscope.methods import logit_lens as ll

pytestmark = pytest.mark.embedded


@pytest.fixture(scope="module")
def capital(embedded_model):
    batch = rs.tokenize(
        embedded_model,
        ["The capital of France is"],
        spans={"subject": ["France"]},
        targets=[" Paris"],
        fact_ids=["france"],
    )
    config = ct.Config(samples=3, noise=0.3)
    return batch, config, ct.run(embedded_model, batch, config)


def test_causal_tracing_equals_the_naive_loop(embedded_model, capital):
    batch, config, result = capital
    trace = result.traces[0]
    ids = batch.input_ids[0]
    rng = random.Random(0)
    cells = [
        (k, t, layer) for k in config.kinds for t in range(trace.span[0], len(ids)) for layer in range(30)
    ]
    for kind, t, layer in rng.sample(cells, 6):
        layers = window_layers(kind, layer, config.window, embedded_model.n_layers)
        expected, _ = naive_cell(
            embedded_model,
            ids,
            trace.span,
            trace.target_ids[0],
            samples=3,
            noise=0.3,
            restore=layers,
            site=SITE[kind],
            position=t,
        )
        assert trace.scores[kind][t, layer] == pytest.approx(expected, abs=1e-5)


def test_causal_tracing_recovers_paris(capital):
    _, _, result = capital
    trace = result.traces[0]
    assert trace.target == " Paris" and trace.high > 0.5 and trace.low < trace.high / 2
    assert trace.scores["hidden"][-1, -1] == pytest.approx(trace.high, abs=1e-5)  # last state restores all
    subject = trace.span[1] - 1
    assert trace.scores["hidden"][subject, :5].max() > trace.low + 0.5 * (trace.high - trace.low)
    assert trace.scores["hidden"][: trace.span[0]].max() == pytest.approx(
        trace.low
    )  # before the subject: no-op


def test_logit_lens_paris_appears_in_the_last_layers(embedded_model):
    batch = rs.tokenize(embedded_model, ["The capital of France is"], targets=[" Paris"])
    result = ll.run(embedded_model, batch, ll.Config(sites=("resid_post",), targets=("gold",)))
    ranks = result.rank[0, 0, :, 0, 0]
    assert ranks[-1] == 0 and ranks[:10].min() > 50
