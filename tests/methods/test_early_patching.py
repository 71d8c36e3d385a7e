"""Early patching (G5): batched rows equal the naive per-layer loop; null patches are the clean run."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import recallscope as rs
from oracles.early_patching import attn_output, block_inputs, naive_patched, project, rank_and_score
from recallscope.methods import early_patching as ep

PROMPTS = ["The capital of France is", "Famous Eiffel Tower stands in the city of", "Miles Davis plays the"]
SUBJECTS = ["France", "Eiffel Tower", "Miles Davis"]


def _batch(model, rows=slice(None)):
    return rs.tokenize(model, PROMPTS[rows], spans={"subject": SUBJECTS[rows]})


def _unpadded(batch, row):
    pad = int(batch.pad_lengths[row])
    subject = tuple(int(v) - pad for v in batch.spans["subject"][row])
    return batch.input_ids[row, pad:], subject


@pytest.mark.parametrize(
    ("family", "readout"),
    [
        ("gpt2", "raw_embed"),
        ("llama_gqa", "logit_lens"),
        ("gemma2", "logit_lens"),
        ("gptj", "raw"),
        ("qwen3", "raw_embed"),
    ],
)
def test_batched_equals_naive_loop(tiny_models, family, readout):
    model = tiny_models(family)
    batch = _batch(model, slice(0, 2))
    config = ep.Config(source_layers=(0, 2), readout=readout, max_batch_rows=5)
    result = ep.run(model, batch, config)
    for row in range(len(batch)):
        ids, subject = _unpadded(batch, row)
        target = int(rs.forward(model, ids[None])[0].argmax())
        states = block_inputs(model, ids)
        for layer in range(model.n_layers):
            clean = rank_and_score(project(model, attn_output(model, ids, layer), readout), target)
            assert result.clean_rank[row, layer] == clean[0]
            assert result.clean_extracts[row, layer] == clean[2]
            np.testing.assert_allclose(result.clean_score[row, layer], clean[1], rtol=1e-9, atol=1e-12)
            for s, source in enumerate(config.source_layers):
                for p, name in enumerate(config.positions):
                    rank, score, extracts = naive_patched(
                        model, ids, subject, target, states, source, name, layer, readout
                    )
                    assert result.rank[row, s, p, layer] == rank, (source, name, layer)
                    assert result.extracts[row, s, p, layer] == extracts
                    np.testing.assert_allclose(result.score[row, s, p, layer], score, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa", "gptj"])
def test_patching_a_layer_into_itself_is_clean(tiny_models, family):
    model = tiny_models(family)
    result = ep.run(model, _batch(model), ep.Config(source_layers=(0, 1, 2)))
    for s, source in enumerate(result.source_layers):
        for p in range(len(result.positions)):
            np.testing.assert_array_equal(result.rank[:, s, p, source], result.clean_rank[:, source])
            np.testing.assert_array_equal(result.extracts[:, s, p, source], result.clean_extracts[:, source])
            np.testing.assert_allclose(
                result.score[:, s, p, source], result.clean_score[:, source], rtol=1e-12, atol=1e-12
            )


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa"])
def test_padded_batch_equals_one_by_one(tiny_models, family):
    model = tiny_models(family)
    config = ep.Config(source_layers=(0, 2), readout="raw_embed", max_batch_rows=4)
    together = ep.run(model, _batch(model), config)
    assert len(set(_batch(model).pad_lengths.tolist())) > 1  # rows really are padded differently
    for row in range(len(PROMPTS)):
        alone = ep.run(model, _batch(model, slice(row, row + 1)), config)
        np.testing.assert_array_equal(together.rank[row], alone.rank[0])
        np.testing.assert_allclose(together.score[row], alone.score[0], rtol=1e-9, atol=1e-12)
        np.testing.assert_array_equal(together.clean_rank[row], alone.clean_rank[0])


def test_summary_on_hand_made_frame():
    rows = [
        # fact, source_layer, positions, layer, extracts, clean_extracts, valid
        ("a", 0, "subject", 0, True, True, False),  # invalid layer: ignored
        ("a", 0, "subject", 1, False, True, True),
        ("a", 0, "subject", 2, False, False, True),
        ("b", 0, "subject", 0, False, False, False),
        ("b", 0, "subject", 1, False, False, True),
        ("b", 0, "subject", 2, True, True, True),
        ("a", 2, "subject", 2, True, True, False),  # no valid layer at all
        ("b", 2, "subject", 2, False, True, False),
    ]
    frame = pd.DataFrame(
        rows, columns=["fact_id", "source_layer", "positions", "layer", "extracts", "clean_extracts", "valid"]
    )
    out = ep.summary(frame).set_index(["source_layer", "positions"])
    assert out.loc[(0, "subject"), "extraction_rate"] == 0.5
    assert out.loc[(0, "subject"), "clean_rate"] == 1.0
    assert out.loc[(0, "subject"), "n_facts"] == 2 and out.loc[(0, "subject"), "n_layers"] == 2
    assert np.isnan(out.loc[(2, "subject"), "extraction_rate"]) and out.loc[(2, "subject"), "n_facts"] == 0


def test_tidy_rows_arrays_and_conventions(tiny_models):
    model = tiny_models("llama_gqa")
    batch = _batch(model)
    result = ep.run(model, batch, ep.Config.preset("geva"))
    assert result.source_layers == [0, 1]  # (0, 1, 5, 10, 20) scaled to 3 blocks
    frame = result.to_frame()
    assert len(frame) == 3 * 2 * 3 * model.n_layers
    assert list(frame.columns[:4]) == ["fact_id", "source_layer", "positions", "layer"]
    assert (frame["valid"] == (frame["layer"] > frame["source_layer"])).all()
    assert (frame["extracts"] == (frame["attn_rank"] == 0)).all()
    clean = frame[frame.source_layer == frame.layer]  # null patches
    assert (clean["attn_rank"] == clean["clean_rank"]).all()
    assert result.tables() == {} and set(result.summary()["positions"]) == set(ep.POSITION_SETS)
    assert set(result.arrays()) == {
        f"{f}/{n}" for f in "012" for n in ("rank", "score", "extracts", "clean_rank")
    }
    assert result.arrays()["0/rank"].shape == (2, 3, model.n_layers)
    conventions = result.provenance["conventions"]
    assert conventions["readout"] == "raw_embed" and conventions["source_layers"] == [0, 1]
    cost = ep.cost(model, batch, ep.Config(max_batch_rows=5))
    assert cost.forwards == 1 + -(-3 * 2 * 3 // 5) and cost.peak_bytes > 0


def test_a_tied_top_token_does_not_extract(tiny_models):
    model = tiny_models("gpt2")
    vectors = torch.zeros(2, 1, model.d_model, dtype=model.dtype)  # row 0: every token scores 0
    vectors[1, 0] = model.W_E[7]
    top = int((model.W_E @ model.W_E[7]).argmax())
    rank, _, extracts = ep._measure(model, vectors, torch.tensor([top, top]), "raw_embed")
    assert rank[0, 0] == 0 and not extracts[0, 0]
    assert rank[1, 0] == 0 and extracts[1, 0]


def test_default_source_layers():
    assert ep.default_source_layers(48) == (0, 1, 5, 10, 20)
    assert ep.default_source_layers(28) == (0, 1, 3, 6, 12)
    assert ep.default_source_layers(12) == (0, 1, 2, 5)
    assert ep.default_source_layers(3) == (0, 1)


def test_gold_target_and_last_only(tiny_models):
    model = tiny_models("gpt2")
    batch = rs.tokenize(model, ["France is"], targets=[" Paris"])  # no subject span needed for "last"
    result = ep.run(model, batch, ep.Config(positions=("last",), target="gold", source_layers=(1,)))
    assert result.target_tokens == [rs.core.vocab.decode_tokens(model, batch.target_ids)[0]]
    assert result.rank.shape == (1, 1, 1, model.n_layers)


def test_errors(tiny_models):
    with pytest.raises(rs.RecallscopeError, match="positions must be a non-empty tuple of distinct items"):
        ep.Config(positions=("relation",))
    with pytest.raises(rs.RecallscopeError, match="source_layers must be None or a non-empty tuple"):
        ep.Config(source_layers=(-1,))
    with pytest.raises(rs.RecallscopeError, match="readout must be one of"):
        ep.Config(readout="lens")
    model = tiny_models("gpt2")
    with pytest.raises(rs.RecallscopeError, match="source layer 7 does not exist"):
        ep.run(model, _batch(model), ep.Config(source_layers=(0, 7)))
    with pytest.raises(rs.RecallscopeError, match="needs a subject span"):
        ep.run(model, rs.tokenize(model, ["France is"]))
