"""One-to-many lists: parsing, matching, and per-step prompts with spans."""

from __future__ import annotations

import pytest
import torch

import recallscope as rs
from recallscope.data.facts import Fact, FactSet
from recallscope.data.one_to_many import ListGeneration, OneToManySet, _with_tracked, match_item, parse_items

PROMPT = "List three cities from France: 1."


@pytest.mark.parametrize(
    "text",
    [
        " Paris 2. Lyon 3. Marseille\n\nThese are big.",
        " Paris\n2. Lyon\n3. Marseille\n4. Nice",
        " Paris, 2. Lyon, 3. Marseille.",
        "\n Paris\n 2. Lyon 3. Marseille (1990)",
    ],
)
def test_parse_formats(text):
    items, spans = parse_items(PROMPT, text, 3)
    assert items == ["Paris", "Lyon", "Marseille"]
    assert [(PROMPT + text)[a:b] for a, b in spans] == items


def test_parse_quoted_songs_and_short_lists():
    prompt = 'List three songs performed by Queen: 1. "'
    items, _ = parse_items(prompt, 'Bohemian Rhapsody" 2. "We Will Rock You" 3. "Don\'t Stop Me Now"', 3)
    assert items == ["Bohemian Rhapsody", "We Will Rock You", "Don't Stop Me Now"]
    assert parse_items(PROMPT, " Paris 2. Lyon", 3)[0] == ["Paris", "Lyon"]
    assert parse_items(PROMPT, "", 3)[0] == []


def test_match_item():
    assert match_item("the Beatles", ["Beatles"]) == "Beatles"
    assert match_item("São Paulo", ["Sao Paulo"]) == "Sao Paulo"
    assert match_item("NEW YORK", ["New York City"], {"New York City": ["New York"]}) == "New York City"
    assert match_item("Lyons", ["Lyon"]) is None


def _generation(model, text):
    gold = ["Paris", "Lyon", "Marseille", "Nice", "Lille"]
    fact = Fact.from_template(
        "List three [cities] from {subject}: 1.", "France", gold, relation="country_cities"
    )
    items, spans = parse_items(fact.prompt, text, 3)
    matches = tuple(match_item(i, fact.answers) for i in items)
    return ListGeneration(fact, text, tuple(items), tuple(spans), matches)


def test_problems():
    assert _generation(None, " Paris 2. Lyon").problem(3) == "generated 2 of 3 items"
    assert _generation(None, " Paris 2. Lyon 3. Berlin").problem(3) == "not in the gold list: ['Berlin']"
    assert _generation(None, " Paris 2. Lyon 3. Paris").problem(3) == "repeated answers"
    assert _generation(None, " Paris 2. Lyon 3. Nice").problem(3) is None


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_steps_carry_previous_answers_and_track_all_answers(name, tiny_models):
    model = tiny_models(name)
    gen = _with_tracked(model, _generation(model, " Paris 2. Lyon 3. Nice\n"), 3)
    lists = OneToManySet(k=3, generations=[gen], kept=[gen])
    steps = [lists.steps(s)[0] for s in (1, 2, 3)]
    assert steps[0].prompt == PROMPT and steps[0].target == " Paris"
    assert steps[1].prompt == PROMPT + " Paris 2." and steps[1].target == " Lyon"
    assert steps[2].prompt == PROMPT + " Paris 2. Lyon 3." and steps[2].target == " Nice"
    batch = lists.step_batch(model, 3)
    decode = model.tokenizer.decode
    for j, answer in ((1, "Paris"), (2, "Lyon")):
        start, end = batch.spans[f"answer_{j}"][0].tolist()
        assert decode(batch.input_ids[0, start:end]).strip() == answer
    start, end = batch.spans["subject"][0].tolist()
    assert decode(batch.input_ids[0, start:end]).strip() == "France"
    tracked = lists.tracked_ids(2)
    assert tracked.shape == (1, 3)
    for step in (1, 2, 3):  # answer j's tracked token is the target of step j
        assert int(lists.step_batch(model, step).target_ids[0]) == int(tracked[0, step - 1])
    assert int(batch.target_ids[0]) == int(tracked[0, 2])
    with pytest.raises(rs.DatasetError, match="step must be 1 … 3"):
        lists.steps(4)
    records = lists.to_records(model)
    assert [r["target_answer_idx"] for r in records] == [0, 1, 2]
    last = records[-1]
    assert last["three_answers_label_list"] == ["Paris", "Lyon", "Nice"]
    assert last["query"] == PROMPT + " Paris 2. Lyon 3."
    start, end = last["prev_answer_2_start_end_idx"]
    assert decode(last["query_input_ids"][start:end]).strip() == "Lyon"
    assert last["target_answer_tokens"][0] == last["three_answers_token_list"][2]


def test_generate_lists_reports_what_was_dropped(tiny_models):
    model = tiny_models("gpt2")  # random weights: it will not list real cities
    facts = FactSet(
        [Fact.from_template("List three [cities] from {subject}: 1.", "France", ["Paris", "Lyon"])]
    )
    lists = rs.generate_lists(model, facts, k=3, max_new_tokens=6)
    assert (
        lists.report["subjects"] == 1
        and lists.report["kept"] == 0
        and sum(lists.report["dropped"].values()) == 1
    )
    assert len(lists.generations[0].text) > 0 and lists.steps(1) == []
    assert isinstance(lists.tracked_ids(1), torch.Tensor)


def test_to_facts_are_step_facts_the_batch_reads(tiny_models):
    model = tiny_models("llama_gqa")
    gen = _with_tracked(model, _generation(model, " Paris, 2. Lyon (1999) - big, 3. Nice\n"), 3)
    assert gen.items == ("Paris", "Lyon", "Nice")  # a year cuts the item anywhere
    lists = OneToManySet(k=3, generations=[gen], kept=[gen])
    facts = lists.to_facts()
    assert [f.fact_id for f in facts] == [f"{gen.fact.fact_id}/step{s}" for s in (1, 2, 3)]
    step3 = facts[2]
    assert step3.prompt == PROMPT + " Paris, 2. Lyon (1999) - big, 3." and step3.target == " Nice"
    assert step3.attributes["step"] == 3 and step3.attributes["gold_answers"] == ["Paris", "Lyon", "Nice"]
    batch = facts.to_batch(model)
    assert set(batch.spans) == {"subject", "relation", "answer_1", "answer_2"}
    assert batch.spans["answer_2"][0].tolist() == [-1, -1] and batch.spans["answer_2"][2, 0] >= 0
    for step in (1, 2, 3):
        same = lists.step_batch(model, step)
        assert torch.equal(batch.select([step - 1]).input_ids[:, -same.seq_len :], same.input_ids)
        assert int(batch.target_ids[step - 1]) == int(same.target_ids[0])
    assert [int(batch.tracked[f"answer_{j}"][0]) for j in (1, 2, 3)] == list(gen.tracked_ids)


def test_generate_lists_reuses_texts_and_can_skip_the_gold_check(tiny_models):
    model = tiny_models("gpt2")
    fact = Fact.from_template("List three [cities] from {subject}: 1.", "France", ["Paris"], fact_id="f")
    facts = FactSet([fact])
    given = {"f": " Paris 2. Berlin 3. Rome"}
    strict = rs.generate_lists(model, facts, k=3, texts=given)  # nothing generated: the text is given
    assert strict.generations[0].text == given["f"] and strict.report["kept"] == 0
    loose = rs.generate_lists(model, facts, k=3, texts=given, correct=False)
    assert loose.report["kept"] == 1 and loose.report["criterion"] == "k distinct items"
    assert loose.to_facts()[1].target == " Berlin"
    repeated = rs.generate_lists(model, facts, k=3, texts={"f": " Rome 2. Rome 3. Oslo"}, correct=False)
    assert repeated.report["dropped"] == {"repeated answers": 1}
