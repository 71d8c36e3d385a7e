"""The embedded SmolLM2-135M: loads offline, recalls Paris, passes every check, behaves as expected."""

from __future__ import annotations

import pytest
import torch

import recallscope as rs
from recallscope import Knockout, Site
from recallscope.models import gguf

pytestmark = pytest.mark.embedded


def test_loads_offline_with_the_expected_shape(embedded_model):
    m = embedded_model
    assert (m.n_layers, m.n_heads, m.n_kv_heads, m.d_model, m.d_head) == (30, 9, 3, 576, 64)
    assert (m.d_mlp, m.d_vocab, m.spec.family, m.dtype) == (1536, 49152, "llama", torch.float32)
    assert m.info.source == "embedded" and len(m.info.file_sha256) == 64


def test_second_load_uses_the_cache(embedded_model, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("dequantized again instead of using the cache")

    monkeypatch.setattr(gguf, "_dequantize_into", fail)
    again = rs.load_model("smollm2-135m", device="cpu")
    assert again.info == embedded_model.info


def test_paris_is_the_top_token(embedded_model):
    batch = rs.tokenize(embedded_model, ["The capital of France is"], targets=[" Paris"])
    assert batch.n_prefix == 0  # the tokenizer adds no BOS; its bos_token is a chat marker
    probs = rs.forward(embedded_model, batch).softmax(-1)[0]
    assert int(probs.argmax()) == int(batch.target_ids[0])
    assert rs.decode_tokens(embedded_model, probs.argmax()) == " Paris"
    assert 0.6 < float(probs.max()) < 0.9


def test_logit_lens_finds_paris_late(embedded_model):
    batch = rs.tokenize(embedded_model, ["The capital of France is"], targets=[" Paris"])
    sites = [Site(layer, "resid_post") for layer in range(30)]
    resid = rs.run_with_cache(embedded_model, batch, sites, positions=[-1]).stack(sites)[:, :, 0]
    proj = rs.project_to_vocab(embedded_model, resid, "logit_lens", targets=batch.target_ids, k=3)
    assert proj.target_ranks.shape == (1, 30)
    assert int(proj.target_ranks[0, -1]) == 0 and int(proj.target_ranks[0, 5]) > 100


def test_blocking_subject_to_last_in_upper_middle_layers_lowers_the_answer(embedded_model):
    """Geva et al.'s finding, on the embedded model, batched: one row per 9-layer window."""
    prompt = "The famous Eiffel Tower is located in the beautiful city of"
    batch = rs.tokenize(embedded_model, [prompt], spans={"subject": ["Eiffel Tower"]}, targets=[" Paris"])
    subject = batch.span_positions("subject", 0)
    starts = [0, 5, 13, 17]
    grid = batch.select([0] * len(starts))
    kos = [Knockout(layers=range(s, s + 9), src=subject, rows=[i]) for i, s in enumerate(starts)]
    clean = rs.forward(embedded_model, batch).log_softmax(-1)[0, batch.target_ids[0]]
    with rs.block_attention(embedded_model, kos):
        knocked = rs.forward(embedded_model, grid).log_softmax(-1)[:, batch.target_ids[0]]
    drop = clean - knocked  # [windows]
    assert float(drop[2]) > 0.3 and float(drop[3]) > 0.3  # windows from layer 13 on hurt (log-prob)
    assert abs(float(drop[0])) < 0.1 and abs(float(drop[1])) < 0.1  # early windows barely matter
