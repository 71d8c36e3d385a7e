"""Attributes rate (G2): the batched method equals the naive per-prompt oracle; references and filters."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import recallscope as rs
from oracles import attributes_rate as naive
from recallscope.core import attributes as attr
from recallscope.methods import attributes_rate as ar
from tiny import DISCOVERED

ABOUT = {
    "France": "France is a country whose capital is Paris. The Eiffel Tower is in Paris.",
    "Japan": "Japan uses the yen, and the official language of Japan is Japanese.",
}


def _facts():
    facts = [
        rs.Fact.from_template(
            "The capital of {subject} is", "France", ["Paris"], fact_id="fr", description=ABOUT["France"]
        ),
        rs.Fact.from_template(
            "The currency of {subject} is the", "Japan", ["yen"], fact_id="jp", description=ABOUT["Japan"]
        ),
        rs.Fact.from_template("Steve Jobs founded {subject}, based in", "Apple", ["Cupertino"], fact_id="ap"),
        rs.Fact.from_template("{subject} was founded by", "Apple", ["Steve Jobs"], fact_id="ap2"),
    ]
    return rs.FactSet(facts, name="test")


SMALL = dict(top_k=60, keep=12, min_length=2)


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa", "gemma2", "gpt_neox", "qwen3", *DISCOVERED])
@pytest.mark.parametrize("readout", ["logit_lens", "raw_embed"])
def test_batched_equals_naive(tiny_models, family, readout):
    model = tiny_models(family)
    facts = _facts()
    config = ar.prepare(model, facts, ar.Config(readout=readout, **SMALL))
    result = ar.run(model, facts, config)
    batch = facts.to_batch(model)
    texts = attr.reference_texts(facts, config.subject_objects)
    for row in range(len(facts)):
        pad = int(batch.pad_lengths[row])
        ids = batch.input_ids[row, pad:]
        start, stop = (int(v) - pad for v in batch.spans["subject"][row])
        refs = naive.references(model, texts[row], SMALL["min_length"], True)
        where = {
            "subject_last": stop - 1,
            "subject_first": start,
            "after_subject": min(stop, len(ids) - 1),
            "last": len(ids) - 1,
            "first": 0,
        }
        for p, name in enumerate(config.positions):
            assert result.token_index[row, p] == where[name]
            for layer, h in enumerate(naive.states(model, ids, where[name])):
                expected = naive.rate(
                    model,
                    h,
                    refs,
                    readout,
                    **{k: SMALL[k] for k in ("top_k", "keep")},
                    min_length=SMALL["min_length"],
                )
                got = result.rate[row, p, layer]
                assert (math.isnan(expected) and math.isnan(got)) or got == pytest.approx(expected), (
                    name,
                    layer,
                )
        mean = _embeddings(model, ids[start:stop]).mean(0)
        expected = naive.rate(model, mean, refs, readout, SMALL["top_k"], SMALL["keep"], SMALL["min_length"])
        assert result.baseline[row] == pytest.approx(expected, nan_ok=True)


def _embeddings(model, ids):
    """What the embedding modules hand block 0 for ``ids`` (Gemma's scale, BLOOM's LayerNorm)."""
    with torch.no_grad():
        rows = model.hf_model.get_input_embeddings()(ids)
        if model.spec.embed_norm is not None:
            rows = model.module(model.spec.embed_norm)(rows)
    return rows


def test_references_fall_back_to_other_facts_about_the_subject(tiny_models):
    model = tiny_models("gpt2")
    facts = _facts()
    config = ar.prepare(model, facts, ar.Config(**SMALL))
    assert config.subject_objects == {"Apple": ("Cupertino", "Steve Jobs")}
    texts = attr.reference_texts(facts, config.subject_objects)
    assert texts[0] == (ABOUT["France"],)
    assert texts[2] == (" Steve Jobs",) and texts[3] == (" Cupertino",)  # never the fact's own answer
    alone = ar.run(model, facts.with_facts([facts[3]], {"step": "one"}), config)
    assert alone.n_references[0] > 0  # the dataset-wide objects survive chunking
    bare = ar.run(model, facts.with_facts([facts[3]], {"step": "one"}), ar.Config(**SMALL))
    assert bare.n_references == [0] and np.isnan(bare.rate).all()
    assert not bare.to_frame()["has_references"].any()


def test_reference_filter_is_case_sensitive_only_as_coded(tiny_models):
    model = tiny_models("gpt2")
    f = attr.TokenFilter(min_length=2)
    text = ["The Paris"]
    assert "The" not in attr.reference_strings(model, text, f)
    coded = attr.reference_strings(model, text, attr.TokenFilter(min_length=2, lowercase_references=False))
    assert any(s.strip() == "The" for s in coded)


def test_clean_top_tokens_keeps_the_first_survivors():
    class P:
        topk_ids = __import__("torch").tensor([[5, 1, 7, 2, 9, 3]])

    clean = __import__("torch").tensor([0, 1, 1, 1, 0, 0, 0, 1, 0, 1], dtype=bool)
    ids, count = attr.clean_top_tokens(P, clean, 3)
    assert ids.tolist() == [[1, 7, 2]] and count.tolist() == [3]
    ids, count = attr.clean_top_tokens(P, clean, 6)
    assert ids.tolist() == [[1, 7, 2, 9, 3, -1]] and count.tolist() == [5]


def test_rate_counts_overlap_over_kept_tokens():
    import torch

    refs = torch.zeros(2, 10, dtype=torch.bool)
    refs[0, [1, 2]] = True
    rates = attr.attributes_rate(torch.tensor([[[1, 7, 2, -1]], [[1, 2, 3, 4]]]), refs)
    assert rates[0, 0] == pytest.approx(100 * 2 / 3) and math.isnan(rates[1, 0])


def test_tidy_rows_tables_and_provenance(tiny_models):
    model = tiny_models("llama_gqa")
    facts = _facts()
    result = ar.run(model, facts, ar.Config(**SMALL))
    frame = result.to_frame()
    assert len(frame) == len(facts) * len(ar.POSITIONS) * (model.n_layers + 1)
    assert set(frame.columns) >= {"fact_id", "position", "layer", "attributes_rate", "baseline_rate", "token"}
    top = result.tables()["top_tokens"]
    assert len(top) == len(frame) and all(len(t) <= ar.SHOWN_TOKENS for t in top["tokens"])
    assert set(result.arrays()) == {
        f"{f}/{n}" for f in ("fr", "jp", "ap", "ap2") for n in ("rate", "top_ids")
    }
    conv = result.provenance["conventions"]
    assert conv["readout"] == "logit_lens" and "resid_pre" in conv["layers"]
    assert ar.Config.preset("geva").readout == "raw_embed"


def test_bad_config_and_missing_references(tiny_models):
    with pytest.raises(rs.RecallscopeError, match="positions"):
        ar.Config(positions=("middle",))
    with pytest.raises(rs.RecallscopeError, match="keep"):
        ar.Config(keep=600)
    model = tiny_models("gpt2")
    batch = _facts().to_batch(model)
    with pytest.raises(rs.RecallscopeError, match="references="):
        ar.run(model, batch)
    result = ar.run(model, batch, ar.Config(**SMALL), references=[[ABOUT["France"]]] * len(batch))
    assert result.n_references[0] > 0
