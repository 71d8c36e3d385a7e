"""Few-shot variants and counterfactual partners (``recallscope.data.variants``, Lv et al. L1)."""

from __future__ import annotations

import pytest

import recallscope as rs
from recallscope.data.variants import (
    add_relation_context,
    counterfactual_facts,
    render_subject,
    shot_variants,
    with_shots,
)

LV = rs.load_facts("lv_capitals")


def test_one_shot_prepends_a_demonstration_of_another_subject_in_the_paper_format():
    shot = with_shots(LV[:15], 1, pool=list(LV))
    assert len(shot) == 15
    for fact, base in zip(shot, LV[:15], strict=True):
        prefix = fact.attributes["shot_prefix"]
        assert fact.prompt == prefix + base.prompt
        assert prefix.startswith("The capital of ") and prefix.endswith(". ")
        assert base.subject not in prefix and base.answers[0] not in prefix
        assert fact.prompt[slice(*fact.subject_span)] == base.subject
        assert fact.fact_id == f"{base.fact_id}/1shot" and fact.attributes["base_id"] == base.fact_id


def test_shot_variants_are_deterministic_and_keep_each_fact_next_to_its_variants():
    facts = rs.load_facts("landmark_city")[:4]
    a = shot_variants(facts, (0, 1), pool=list(rs.load_facts("landmark_city")), seed=3)
    b = shot_variants(facts, (1, 0), pool=list(rs.load_facts("landmark_city")), seed=3)
    assert [f.prompt for f in a] == [f.prompt for f in b]
    assert [f.attributes.get("shots", 0) for f in a] == [0, 1] * 4
    assert with_shots(facts, 0) is facts


def test_counterfactual_swaps_only_the_subject_and_uses_the_partners_mention():
    pool = list(rs.load_facts("landmark_city"))
    facts = add_relation_context(rs.load_facts("landmark_city")[:6], pool=pool, seed=0)
    for fact in facts:
        cf = fact.attributes["counterfactual"]
        assert cf["subject"] != fact.subject and cf["answers"][0] != fact.answers[0]
        assert cf["prompt"][slice(*cf["subject_span"])] == cf["subject"]
        partner = next(p for p in pool if p.fact_id == cf["fact_id"])
        expected, _ = render_subject(fact, partner.subject, partner.attributes.get("mention"))
        assert cf["prompt"] == expected
        assert fact.answers[0] in fact.attributes["relation_answers"]


def test_few_shot_counterfactual_keeps_the_demonstration_and_the_partner_of_the_zero_shot_fact():
    facts = add_relation_context(shot_variants(LV[:3], (0, 1), pool=list(LV)), pool=list(LV))
    zero, one = facts[0], facts[1]
    assert one.attributes["counterfactual"]["subject"] == zero.attributes["counterfactual"]["subject"]
    assert one.attributes["counterfactual"]["prompt"] == (
        one.attributes["shot_prefix"] + zero.attributes["counterfactual"]["prompt"]
    )


def test_counterfactual_facts_are_aligned_and_a_fact_without_partner_is_a_clear_error():
    facts = add_relation_context(LV[:5], pool=list(LV))
    cf = counterfactual_facts(facts)
    assert [f.attributes["clean_id"] for f in cf] == [f.fact_id for f in facts]
    lonely = rs.FactSet([rs.Fact("a", "France", "The capital of France is", ("Paris",), relation="r")])
    with pytest.raises(rs.DatasetError, match="no counterfactual subject"):
        counterfactual_facts(lonely)


def test_fact_without_template_swaps_the_subject_characters():
    fact = rs.Fact("a", "France", "Everyone knows the capital of France is", ("Paris",), relation="r")
    prompt, span = render_subject(fact, "Spain")
    assert prompt == "Everyone knows the capital of Spain is" and prompt[slice(*span)] == "Spain"


def test_generic_text_ships_with_the_package():
    from recallscope.data.builtin import generic_text

    text = generic_text()
    assert len(text.split()) > 250 and "\n\n" in text
