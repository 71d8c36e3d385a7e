"""Built-in datasets: sizes, schema, rendering and spans on both tokenizer styles."""

from __future__ import annotations

import pytest

import recallscope as rs
from recallscope.data import builtin
from tiny import byte_level_tokenizer, sentencepiece_tokenizer, tiny_hf_model

REQUIRED = {
    "country_capital",
    "country_language",
    "country_currency",
    "country_continent",
    "city_country",
    "landmark_city",
    "company_founder",
    "company_headquarters",
    "product_developer",
    "person_native_language",
    "athlete_sport",
    "musician_instrument",
    "element_symbol",
}


def test_required_relations_and_sizes():
    relations = builtin.relation_names()
    assert REQUIRED <= set(relations) and len(relations) >= 12
    mixed = rs.load_facts("mixed", templates="first")
    assert len(mixed) >= 600
    for row in builtin.builtin_summary():
        if row["kind"] == "relation":
            assert row["templates"] >= 3, row
    assert set(mixed.relations) == set(relations)


def test_every_subject_has_a_description():
    about = builtin.descriptions()
    subjects = [f.subject for f in rs.load_facts("mixed", templates="first")]
    for name in builtin.one_to_many_names():
        subjects += [f.subject for f in rs.load_facts(name, templates="first")]
    missing = [s for s in subjects if s not in about]
    assert not missing, f"subjects without a description: {missing[:10]}"
    assert all(20 <= len(text.split()) <= 100 for text in about.values())


@pytest.mark.parametrize("relation", builtin.relation_names())
def test_every_template_renders_with_spans(relation):
    facts = rs.load_facts(relation, templates="all")
    n_templates = len(builtin._read("relations", relation)["templates"])
    assert len(facts) == n_templates * len(rs.load_facts(relation, templates="first"))
    for fact in facts:
        assert fact.prompt[slice(*fact.subject_span)].casefold() == fact.subject.casefold()
        assert fact.relation_span is not None and fact.prompt[slice(*fact.relation_span)].strip()
        assert fact.prompt == fact.prompt.strip()
        assert fact.prompt[0].isupper() or not fact.prompt[0].isalpha()
        assert fact.description


def test_template_choices():
    first = rs.load_facts("country_capital", templates="first")
    rotate = rs.load_facts("country_capital")
    assert len(first) == len(rotate)
    assert {f.attributes["template_index"] for f in first} == {0}
    assert len({f.attributes["template_index"] for f in rotate}) >= 3
    assert rs.load_facts("capitals", templates=1)[0].attributes["template_index"] == 1
    with pytest.raises(rs.DatasetError, match=r"templates=9: expected 'rotate', 'all', 'first' or 0"):
        rs.load_facts("country_capital", templates=9)
    with pytest.raises(rs.DatasetError, match="unknown built-in dataset|no such file"):
        rs.load_facts("no_such_set")


def test_lv_capitals():
    facts = rs.load_facts("lv_capitals")
    assert len(facts) == 225 and len({f.attributes["template_index"] for f in facts}) == 15
    fact = next(f for f in facts if f.subject == "France" and f.attributes["template_index"] == 9)
    assert fact.prompt == "As we all know, the capital of France is" and fact.target == " Paris"


@pytest.mark.parametrize("name", ["country_cities", "artist_songs", "actor_movies"])
def test_one_to_many_sets(name):
    data = builtin._read("one_to_many", name)
    assert len(data["subjects"]) >= 40 and len(data["templates"]) >= 3
    assert all(len(s["answers"]) >= 5 for s in data["subjects"])
    facts = rs.load_facts(name, k=3)
    assert facts[0].prompt.startswith("List three") and facts[0].attributes["kind"] == "one_to_many"
    assert facts[0].prompt.rstrip('"').rstrip().endswith("1.")


@pytest.mark.parametrize("tokenizer", [byte_level_tokenizer, sentencepiece_tokenizer], ids=["bpe", "spm"])
def test_subject_spans_on_both_tokenizer_styles(tokenizer):
    """Every built-in prompt (unicode, articles, subjects at position 0) gets exact subject tokens."""
    model = rs.load_model(tiny_hf_model("llama_gqa"), tokenizer=tokenizer())
    facts = rs.load_facts("mixed", templates="all")
    subjects = {f.fact_id: f.subject for f in facts}
    for batch in facts.batches(model, 256):
        for row in range(len(batch)):
            start, end = batch.spans["subject"][row].tolist()
            assert batch.pad_lengths[row] + batch.n_prefix <= start < end <= batch.seq_len
            if model.tokenizer.unk_token_id in batch.input_ids[row, start:end].tolist():
                continue  # a character outside the tiny tokenizer's alphabet
            text = model.tokenizer.decode(batch.input_ids[row, start:end])
            subject = subjects[batch.fact_ids[row]].casefold()
            assert subject in text.casefold(), (batch.prompts[row], text)
            first = model.tokenizer.decode(batch.input_ids[row, start : start + 1])
            after_first = model.tokenizer.decode(batch.input_ids[row, start + 1 : end]).casefold()
            # the span starts where the subject does (a bare "▁" word-start token may lead it)
            assert subject not in after_first or not first.strip(), (batch.prompts[row], text)


@pytest.mark.parametrize("relation", builtin.relation_names())
def test_relation_file_schema(relation):
    data = builtin._read("relations", relation)
    subjects = [row["subject"] for row in data["facts"]]
    assert len(subjects) == len(set(subjects)), "duplicate subjects"
    for row in data["facts"]:
        assert set(row) <= {"subject", "mention", "answers"}
        assert row["answers"] and all(a == a.strip() and a for a in row["answers"]), row
        assert len(set(row["answers"])) == len(row["answers"]), row


@pytest.mark.parametrize("name", ["country_cities", "artist_songs", "actor_movies"])
def test_one_to_many_gold_lists_are_distinct_after_normalization(name):
    from recallscope.data.one_to_many import _normalize

    for row in builtin._read("one_to_many", name)["subjects"]:
        normalized = [_normalize(a) for a in row["answers"]]
        assert len(set(normalized)) == len(normalized), row["subject"]
        for answer in row.get("aliases", {}):
            assert answer in row["answers"], (row["subject"], answer)
