"""Built-in datasets shipped with recallscope (``data/builtin/``).

Single-answer relations (``relations/*.json``), written by us from public, well-known facts, each
with several prompt templates; a short description of every subject (``descriptions/*.json``),
in our own words, for the attributes-rate analysis; one-to-many sets (``one_to_many/*.json``)
for Yan & Jia's list queries; and Lv et al.'s capital task (15 nations × 15 templates, from the
paper's code, ``methods.md`` L1).

Names: every relation file (``"country_capital"``, …), ``"mixed"`` (all relations; the default
of ``recallscope run``), ``"capitals"`` (= ``country_capital``), ``"lv_capitals"``, and the
one-to-many sets ``"country_cities"``, ``"artist_songs"``, ``"actor_movies"``.
"""

from __future__ import annotations

import functools
import hashlib
import json
from importlib import resources
from typing import Any, Literal

from recallscope.data.facts import Fact, FactSet
from recallscope.errors import DatasetError

__all__ = [
    "generic_text",
    "builtin_names",
    "load_builtin",
    "builtin_summary",
    "relation_names",
    "one_to_many_names",
]

TemplateChoice = Literal["rotate", "all", "first"] | int

LV_PAIRS = (
    ("China", "Beijing"),
    ("USA", "Washington"),
    ("Russia", "Moscow"),
    ("England", "London"),
    ("France", "Paris"),
    ("Japan", "Tokyo"),
    ("Italy", "Rome"),
    ("Canada", "Ottawa"),
    ("Australia", "Canberra"),
    ("Spain", "Madrid"),
    ("Egypt", "Cairo"),
    ("Portugal", "Lisbon"),
    ("Austria", "Vienna"),
    ("Greece", "Athens"),
    ("Thailand", "Bangkok"),
)
LV_PREFIXES = (
    "It's crucial to know that",
    "You are right to say that",
    "Therefore, it's correct to state that",
    "When asked, always remember that",
    "We confirm that",
    "Don't forget,",
    "Bear in mind,",
    "Keep in mind,",
    "Just a reminder,",
    "As we all know,",
    "According to the textbook,",
    "I am sure that",
    "Without a doubt,",
    "In case you didn't know,",
    "To emphasize,",
)
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}


def _files(folder: str) -> dict[str, Any]:
    root = resources.files("recallscope.data") / "builtin" / folder
    return {
        p.name.removesuffix(".json"): p
        for p in sorted(root.iterdir(), key=lambda p: p.name)
        if p.name.endswith(".json")
    }


@functools.cache
def _read(folder: str, name: str) -> dict:
    return json.loads(_files(folder)[name].read_text(encoding="utf-8"))


@functools.cache
def descriptions() -> dict[str, str]:
    """Subject → description, merged from every ``descriptions/*.json``."""
    merged: dict[str, str] = {}
    for name in _files("descriptions"):
        merged.update(_read("descriptions", name))
    return merged


@functools.cache
def generic_text() -> str:
    """A few paragraphs of everyday English prose, written for recallscope (no facts to recall).

    Used to measure side effects of interventions on ordinary text (perplexity), e.g. by the
    anti-overconfidence mitigation.
    """
    path = resources.files("recallscope.data") / "builtin" / "text" / "generic.txt"
    return path.read_text(encoding="utf-8").strip()


def relation_names() -> tuple[str, ...]:
    return tuple(_files("relations"))


def one_to_many_names() -> tuple[str, ...]:
    return tuple(_files("one_to_many"))


def builtin_names() -> tuple[str, ...]:
    return ("mixed", "capitals", "lv_capitals", *relation_names(), *one_to_many_names())


def load_builtin(name: str, *, templates: TemplateChoice = "rotate", k: int = 3) -> FactSet:
    """Load a built-in dataset by name (see the module docstring).

    Args:
        templates: which prompt template each fact uses: ``"rotate"`` (fact i uses template
            i mod n: varied phrasings, one prompt per fact), ``"all"`` (one fact per template),
            ``"first"``, or a template index.
        k: number of items asked for by one-to-many templates.
    """
    if name == "mixed":
        parts = [_relation_facts(rel, templates) for rel in relation_names()]
        facts = [f for part in parts for f in part]
    elif name in ("capitals", "country_capital"):
        facts = _relation_facts("country_capital", templates)
    elif name == "lv_capitals":
        facts = _lv_capitals()
    elif name in relation_names():
        facts = _relation_facts(name, templates)
    elif name in one_to_many_names():
        facts = _one_to_many_facts(name, templates, k)
    else:
        raise DatasetError(
            f"unknown built-in dataset {name!r}; built-in names: {', '.join(builtin_names())} "
            "(or pass the path of a .jsonl, .csv or .json file)"
        )
    provenance = {
        "source": f"builtin:{name}",
        "templates": templates,
        "n_loaded": len(facts),
        "data_sha256": _data_hash(),
    }
    return FactSet(facts, name=name, provenance=provenance)


def _choose(n_templates: int, index: int, choice: TemplateChoice) -> list[int]:
    if choice == "all":
        return list(range(n_templates))
    if choice == "rotate":
        return [index % n_templates]
    if choice == "first":
        return [0]
    if isinstance(choice, int) and 0 <= choice < n_templates:
        return [choice]
    raise DatasetError(f"templates={choice!r}: expected 'rotate', 'all', 'first' or 0..{n_templates - 1}")


def _relation_facts(name: str, choice: TemplateChoice) -> list[Fact]:
    data = _read("relations", name)
    return _render(name, data["templates"], data["facts"], choice)


def _one_to_many_facts(name: str, choice: TemplateChoice, k: int) -> list[Fact]:
    data = _read("one_to_many", name)
    templates = [t.replace("{k}", NUMBER_WORDS.get(k, str(k))) for t in data["templates"]]
    extra = lambda row: {"kind": "one_to_many", "k": k, "aliases": row.get("aliases", {})}  # noqa: E731
    return _render(name, templates, data["subjects"], choice, extra)


def _render(
    name: str, templates: list[str], rows: list[dict], choice: TemplateChoice, extra=None
) -> list[Fact]:
    """The facts of ``rows`` in the templates ``choice`` picks; ``extra(row)`` adds attributes."""
    about = descriptions()
    facts = []
    for i, row in enumerate(rows):
        for t in _choose(len(templates), i, choice):
            facts.append(
                Fact.from_template(
                    templates[t],
                    row["subject"],
                    row["answers"],
                    mention=row.get("mention"),
                    relation=name,
                    fact_id=f"{name}/{row['subject']}/t{t}",
                    description=about.get(row["subject"]),
                    attributes={
                        "template_index": t,
                        **({"mention": row["mention"]} if row.get("mention") else {}),
                        **(extra(row) if extra else {}),
                    },
                )
            )
    return facts


def _lv_capitals() -> list[Fact]:
    """Lv et al.'s capital task: 15 prefixes × 15 (nation, capital) pairs = 225 prompts."""
    about = descriptions()
    return [
        Fact.from_template(
            f"{prefix} the [capital] of {{subject}} is",
            nation,
            [capital],
            relation="country_capital",
            fact_id=f"lv_capitals/{nation}/t{t}",
            description=about.get(nation),
            attributes={"template_index": t, "shot_template": "The capital of {subject} is"},
        )
        for t, prefix in enumerate(LV_PREFIXES)
        for nation, capital in LV_PAIRS
    ]


@functools.cache
def _data_hash() -> str:
    digest = hashlib.sha256()
    for folder in ("relations", "descriptions", "one_to_many"):
        for name, path in _files(folder).items():
            digest.update(name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def builtin_summary() -> list[dict[str, Any]]:
    """One row per built-in dataset: name, kind, relations, facts (subjects), templates."""
    rows = []
    for name in relation_names():
        data = _read("relations", name)
        rows.append(
            {
                "name": name,
                "kind": "relation",
                "facts": len(data["facts"]),
                "templates": len(data["templates"]),
                "description": data["description"],
            }
        )
    for name in one_to_many_names():
        data = _read("one_to_many", name)
        answers = sum(len(s["answers"]) for s in data["subjects"])
        rows.append(
            {
                "name": name,
                "kind": "one_to_many",
                "facts": len(data["subjects"]),
                "templates": len(data["templates"]),
                "description": f"{data['description']} ({answers} gold answers)",
            }
        )
    rows.append(
        {
            "name": "lv_capitals",
            "kind": "relation",
            "facts": len(LV_PAIRS) * len(LV_PREFIXES),
            "templates": len(LV_PREFIXES),
            "description": "Lv et al. 2024: 15 nations × 15 templates",
        }
    )
    return rows
