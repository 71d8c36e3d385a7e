"""Fact and FactSet: rendering, spans, validation, filters and provenance."""

from __future__ import annotations

import pytest

import recallscope as rs
from recallscope.data.facts import Fact, FactSet, render_template


def test_from_template_spans():
    fact = Fact.from_template(
        "The [capital] of {subject} is", "France", ["Paris"], relation="country_capital"
    )
    assert fact.prompt == "The capital of France is"
    assert fact.prompt[slice(*fact.subject_span)] == "France"
    assert fact.prompt[slice(*fact.relation_span)] == "capital"
    assert fact.target == " Paris" and fact.fact_id == "country_capital/France"
    assert fact.template == "The capital of {subject} is"


def test_mention_with_article_and_capitalisation():
    fact = Fact.from_template(
        "{subject}'s [capital city] is", "United States", ["Washington"], mention="the United States"
    )
    assert fact.prompt == "The United States's capital city is"
    assert fact.prompt[slice(*fact.subject_span)] == "United States"
    with pytest.raises(rs.DatasetError, match="does not contain subject"):
        Fact.from_template("{subject} is", "France", ["x"], mention="Germany")


def test_capitalisation_keeps_camel_case_names():
    assert render_template("{subject} is", "iPhone")[0] == "iPhone is"
    assert render_template("{subject} is", "gold")[0] == "Gold is"


def test_render_template_errors():
    assert render_template("[a] {subject} [b]", "X") == ("A X b", (2, 3), (0, 5))
    with pytest.raises(rs.DatasetError, match="exactly once"):
        render_template("{subject} and {subject}", "X")
    with pytest.raises(rs.DatasetError, match="unbalanced"):
        render_template("[a {subject}", "X")


def test_continuation_after_quote_or_space():
    fact = Fact("f", "Queen", 'Songs by Queen: 1. "', ("Bohemian Rhapsody",))
    assert fact.target == "Bohemian Rhapsody"
    assert Fact("g", "X", "X is ", ("y",)).target == "y"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            dict(subject="Spain", prompt="The capital of France is", answers=("Paris",)),
            "does not occur in prompt",
        ),
        (dict(subject="France", prompt="The capital of France is", answers=("",)), "empty target"),
        (dict(subject="France", prompt="The capital of France is", answers=()), "empty target"),
        (dict(subject=" ", prompt="x", answers=("y",)), "empty subject"),
        (dict(subject="a", prompt="a", answers=("y",), subject_span=(0, 5)), "outside the prompt"),
    ],
)
def test_fact_validation(kwargs, message):
    with pytest.raises(rs.DatasetError, match=message):
        Fact(fact_id="x", **kwargs)


def _facts():
    return FactSet(
        [
            Fact(f"r{i % 3}/{i}", f"S{i}", f"About S{i} it is", (f"A{i}",), relation=f"r{i % 3}")
            for i in range(12)
        ],
        name="toy",
    )


def test_factset_filter_sample_group_and_provenance():
    facts = _facts()
    assert len(facts) == 12 and facts.relations == ("r0", "r1", "r2") and facts.counts()["r1"] == 4
    even = facts.filter(lambda f: int(f.subject[1:]) % 2 == 0, description="even")
    assert len(even) == 6 and even.provenance["steps"][-1] == {"step": "even", "n_after": 6}
    a, b = facts.sample(5, seed=1), facts.sample(5, seed=1)
    assert [f.fact_id for f in a] == [f.fact_id for f in b] and len(a) == 5
    assert [f.fact_id for f in facts.sample(5, seed=2)] != [f.fact_id for f in a]
    groups = facts.by_relation()
    assert list(groups) == ["r0", "r1", "r2"] and all(len(g) == 4 for g in groups.values())
    assert isinstance(facts[2:4], FactSet) and len(facts[2:4]) == 2
    assert facts.sample(50).provenance["steps"][-1]["n_after"] == 12


def test_duplicate_ids_are_refused():
    fact = Fact("same", "X", "X is", ("y",))
    with pytest.raises(rs.DatasetError, match="duplicate fact_id"):
        FactSet([fact, fact])


def test_to_batch_spans_and_targets(tiny_models):
    model = tiny_models("gpt2")
    facts = FactSet(
        [
            Fact.from_template("The [capital] of {subject} is", "France", ["Paris"], relation="c"),
            Fact.from_template("{subject} [plays the]", "Miles Davis", ["trumpet"], relation="m"),
        ]
    )
    batch = facts.to_batch(model)
    assert batch.fact_ids == ("c/France", "m/Miles Davis")
    decode = model.tokenizer.decode
    for row, (subject, relation) in enumerate([("France", "capital"), ("Miles Davis", "plays the")]):
        s0, s1 = batch.spans["subject"][row].tolist()
        r0, r1 = batch.spans["relation"][row].tolist()
        assert decode(batch.input_ids[row, s0:s1]).strip() == subject
        assert decode(batch.input_ids[row, r0:r1]).strip() == relation
    assert [len(b) for b in facts.batches(model, 1)] == [1, 1]


def test_fit_context_skips_long_prompts(tiny_models):
    model = tiny_models("gpt2")  # 64 positions
    long = Fact("long", "X", "X " + "word " * 100, ("y",))
    facts = FactSet([long, Fact("short", "X", "X is", ("y",))]).fit_context(model)
    assert [f.fact_id for f in facts] == ["short"]
    assert "more than the model's context (64)" in str(facts.skipped[0])


@pytest.mark.parametrize("tokenizer", ["bpe", "spm"])
def test_unicode_and_repeated_subject_spans(tokenizer):
    from tiny import byte_level_tokenizer, sentencepiece_tokenizer, tiny_hf_model

    tok = byte_level_tokenizer() if tokenizer == "bpe" else sentencepiece_tokenizer()
    model = rs.load_model(tiny_hf_model("llama_gqa"), tokenizer=tok)
    facts = FactSet(
        [
            Fact.from_template("The city of {subject} [is in]", "São Paulo", ["Brazil"], fact_id="a"),
            Fact("b", "Nestlé", "Nestlé, like Nestlé's rivals, is based in", ("Vevey",)),
            Fact.from_template("{subject} [is in]", "Zürich", ["Switzerland"], fact_id="c"),
        ]
    )
    batch = facts.to_batch(model)
    for row, subject in enumerate(["São Paulo", "Nestlé", "Zürich"]):
        start, end = batch.spans["subject"][row].tolist()
        assert model.tokenizer.decode(batch.input_ids[row, start:end]).strip() == subject
    assert batch.spans["subject"][1].tolist()[0] == batch.pad_lengths[1] + batch.n_prefix  # first occurrence
