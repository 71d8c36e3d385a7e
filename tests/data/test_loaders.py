"""File loaders: good files, malformed rows (reported and skipped), and generated rows."""

from __future__ import annotations

import csv
import json
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import recallscope as rs


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_jsonl_good_and_bad_rows(tmp_path, caplog):
    path = write_jsonl(
        tmp_path / "facts.jsonl",
        [
            {
                "subject": "France",
                "prompt": "The capital of France is",
                "target": " Paris",
                "relation": "cap",
            },
            {"subject": "Japan", "template": "The capital of {} is", "answers": ["Tokyo", "Edo"], "extra": 1},
            {
                "subject": "Italy",
                "prompt": "The capital of Spain is",
                "target": "Rome",
            },  # subject not in prompt
            {"subject": "Peru", "prompt": "The capital of Peru is", "target": ""},  # empty target
            {"prompt": "The capital of Chile is", "target": "Santiago"},  # no subject
            {"subject": "Cuba", "target": "Havana"},  # no prompt/template
            "{not json",
            {"subject": "Iran", "template": "{} and {}", "target": "Tehran"},  # two placeholders
        ],
    )
    facts = rs.load_facts(path)
    assert [f.fact_id for f in facts] == ["facts/1", "facts/2"]
    assert facts[0].target == " Paris" and facts[0].relation == "cap"
    assert facts[1].prompt == "The capital of Japan is" and facts[1].answers == ("Tokyo", "Edo")
    assert facts[1].attributes["extra"] == 1 and facts[1].template == "The capital of {subject} is"
    reasons = {s.row: s.reason for s in facts.skipped}
    assert sorted(reasons) == [3, 4, 5, 6, 7, 8]
    assert "subject 'Italy' does not occur in prompt" in reasons[3]
    assert "empty target" in reasons[4]
    assert reasons[5] == "missing field 'subject'"
    assert "missing field 'prompt' (or 'template')" in reasons[6]
    assert reasons[7].startswith("invalid JSON")
    assert "exactly one {}" in reasons[8]
    assert facts.provenance["n_skipped"] == 6 and len(facts.provenance["sha256"]) == 64
    assert "facts.jsonl, row 3:" in caplog.text  # reported, not silent


def test_csv_with_answers_column(tmp_path):
    path = tmp_path / "facts.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["fact_id", "subject", "prompt", "answers", "note"])
        writer.writerow(["a", "Miles Davis", "Miles Davis plays the", "trumpet|trumpets", "jazz"])
        writer.writerow(["b", "Yo-Yo Ma", "Yo-Yo Ma plays the", "", ""])
    facts = rs.load_facts(path)
    assert (
        len(facts) == 1
        and facts[0].answers == ("trumpet", "trumpets")
        and facts[0].attributes["note"] == "jazz"
    )
    assert facts.skipped[0].row == 3 and "missing field 'target' (or 'answers')" in facts.skipped[0].reason


def test_rome_known_facts(tmp_path):
    records = [
        {
            "known_id": 0,
            "subject": "Vinson Massif",
            "attribute": "Antarctica",
            "template": "{} is located in the continent of",
            "prediction": " Antarctica, and",
            "prompt": "Vinson Massif is located in the continent of",
            "relation_id": "P30",
        },
        {
            "known_id": 1,
            "subject": "Beats Music",
            "attribute": "Apple",
            "template": "{} is owned by",
            "prompt": "Beats Music is owned by",
            "relation_id": "P127",
        },
        {
            "known_id": 2,
            "subject": "Nobody",
            "attribute": "X",
            "template": "{} is",
            "prompt": "Somebody is",
            "relation_id": "P1",
        },
    ]
    path = tmp_path / "known_1000.json"
    path.write_text(json.dumps(records))
    facts = rs.load_facts(path)
    assert facts.provenance["format"] == "known_facts"
    assert [f.fact_id for f in facts] == ["known_0", "known_1"]
    assert facts[0].target == " Antarctica" and facts[0].relation == "P30"
    assert facts[0].template == "{subject} is located in the continent of"
    assert facts.skipped[0].row == 3


def test_counterfact(tmp_path):
    record = {
        "case_id": 7,
        "requested_rewrite": {
            "prompt": "The mother tongue of {} is",
            "relation_id": "P103",
            "subject": "Danielle Darrieux",
            "target_new": {"str": "English", "id": "Q1860"},
            "target_true": {"str": "French", "id": "Q150"},
        },
        "paraphrase_prompts": ["Danielle Darrieux speaks"],
    }
    path = tmp_path / "counterfact.json"
    path.write_text(json.dumps([record, {"case_id": 8}]))
    facts = rs.load_facts(path)
    assert facts.provenance["format"] == "counterfact"
    fact = facts[0]
    assert fact.fact_id == "cf_7" and fact.prompt == "The mother tongue of Danielle Darrieux is"
    assert fact.target == " French" and fact.attributes["target_new"] == "English"
    assert fact.attributes["paraphrase_prompts"] == ["Danielle Darrieux speaks"]
    assert facts.skipped[0].reason == "missing field 'requested_rewrite'"


def test_files_without_valid_rows_and_missing_files(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"subject": "x"}, "nope"])
    with pytest.raises(rs.DatasetError, match=r"bad.jsonl: no valid row \(2 rows, all skipped\)"):
        rs.load_facts(path)
    with pytest.raises(rs.DatasetError, match="no such file, and not a built-in dataset name"):
        rs.load_facts(tmp_path / "missing.jsonl")
    other = tmp_path / "facts.txt"
    other.write_text("x")
    with pytest.raises(rs.DatasetError, match="cannot tell the format"):
        rs.load_facts(other)
    with pytest.raises(rs.DatasetError, match="unknown format 'xml'"):
        rs.load_facts(path, format="xml")


def test_context_check_with_a_model(tmp_path, tiny_models):
    path = write_jsonl(
        tmp_path / "facts.jsonl",
        [
            {"subject": "France", "prompt": "The capital of France is", "target": "Paris"},
            {"subject": "X", "prompt": "X " + "very " * 80 + "long", "target": "y"},
        ],
    )
    facts = rs.load_facts(path, model=tiny_models("gpt2"))
    assert len(facts) == 1 and "more than the model's context" in facts.skipped[-1].reason


_text = st.text(alphabet=string.ascii_letters + " ,.'é", min_size=0, max_size=12)
_row = st.fixed_dictionaries(
    {},
    optional={
        "subject": st.one_of(_text, st.integers()),
        "prompt": _text,
        "template": _text,
        "target": st.one_of(_text, st.none()),
        "answers": st.lists(_text, max_size=3),
        "relation": _text,
    },
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(_row, min_size=1, max_size=8))
def test_generated_rows_are_loaded_or_reported(tmp_path_factory, rows):
    """Every row either becomes a valid fact or is skipped with its row number; nothing crashes."""
    path = write_jsonl(tmp_path_factory.mktemp("h") / "rows.jsonl", rows)
    try:
        facts = rs.load_facts(path)
    except rs.DatasetError as err:
        assert "no valid row" in str(err)
        return
    assert len(facts) + len(facts.skipped) == len(rows)
    assert sorted(s.row for s in facts.skipped) == sorted(set(s.row for s in facts.skipped))
    for fact in facts:
        assert fact.prompt[slice(*fact.subject_span)] == fact.subject
        assert all(a.strip() for a in fact.answers)


def test_byte_order_marks_and_other_encodings(tmp_path):
    """UTF-8 with a byte-order mark loads every row; rows that are not UTF-8 (a Latin-1 file) are
    reported one by one and the others load."""
    rows = [
        {"subject": "France", "prompt": "The capital of France is", "target": "Paris"},
        {"subject": "Japan", "prompt": "The capital of Japan is", "target": "Tokyo"},
    ]
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(r) for r in rows).encode() + b"\n")
    assert [f.subject for f in rs.load_facts(str(jsonl))] == ["France", "Japan"]
    csv_bom = tmp_path / "bom.csv"
    csv_bom.write_bytes(b"\xef\xbb\xbf" + b"subject,prompt,target\nFrance,The capital of France is,Paris\n")
    assert [f.subject for f in rs.load_facts(str(csv_bom))] == ["France"]  # no "missing field subject"
    latin = tmp_path / "latin.csv"
    text = "subject,prompt,target\nFrance,The capital of France is,Paris\nQuébec,Québec is in,Canada\n"
    latin.write_bytes(text.encode("latin-1"))
    loaded = rs.load_facts(str(latin))
    assert [f.subject for f in loaded] == ["France"]
    assert loaded.skipped[0].row == 3 and "not UTF-8 text (byte 0xe9)" in loaded.skipped[0].reason
    latin_jsonl = tmp_path / "latin.jsonl"
    latin_jsonl.write_bytes(json.dumps(rows[0]).encode() + b'\n{"subject": "Qu\xe9bec"}\n')
    loaded = rs.load_facts(str(latin_jsonl))
    assert len(loaded) == 1 and "save the file as UTF-8" in loaded.skipped[0].reason
    separator = tmp_path / "sep.jsonl"  # U+2028 inside a string is data, not a line break
    separator.write_text(
        json.dumps({**rows[0], "prompt": "The capital\u2028of France is"}, ensure_ascii=False) + "\n"
    )
    assert "\u2028" in rs.load_facts(str(separator))[0].prompt
