"""The known filter and one-to-many generation on the embedded SmolLM2."""

from __future__ import annotations

import pytest

import recallscope as rs
from recallscope.data.known import known_counts

pytestmark = pytest.mark.embedded


def test_known_filter_keeps_france_paris(embedded_model):
    facts = rs.load_facts("country_capital", templates="first")
    known = facts.known_by(embedded_model)
    france = [f for f in known if f.subject == "France"]
    assert france, "the embedded model should know that the capital of France is Paris"
    prediction = france[0].attributes["prediction"]
    assert prediction["top1"] == " Paris" and prediction["target_rank"] == 0
    counts = known_counts(known)
    assert counts["country_capital"]["total"] == len(facts)
    assert 0 < counts["country_capital"]["known"] == len(known) < len(facts)
    assert known.provenance["steps"][-1]["criterion"] == "first_token"


def test_greedy_prefix_is_stricter_for_multi_token_answers(embedded_model):
    facts = rs.load_facts("company_founder", templates="first")
    first = facts.known_by(embedded_model)
    full = facts.known_by(embedded_model, "greedy_prefix")
    assert {f.fact_id for f in full} <= {f.fact_id for f in first}
    with pytest.raises(rs.DatasetError, match="unknown known-filter criterion 'exact'"):
        facts.known_by(embedded_model, "exact")


def test_one_to_many_lists(embedded_model):
    facts = rs.load_facts("country_cities", templates="first")[:12]
    lists = rs.generate_lists(embedded_model, facts, k=3)
    assert lists.report["subjects"] == 12
    assert lists.report["kept"] + sum(lists.report["dropped"].values()) == 12
    assert lists.report["kept"] >= 1, lists.report
    batch = lists.step_batch(embedded_model, 3)
    assert set(batch.spans) == {"subject", "relation", "answer_1", "answer_2"}
    assert lists.tracked_ids(3).shape == (len(lists.kept), 3)
