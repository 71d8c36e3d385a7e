"""Fact datasets: ``Fact``/``FactSet``, built-in sets, file loaders, the known filter, one-to-many lists."""

from recallscope.data.builtin import builtin_names, builtin_summary
from recallscope.data.facts import Fact, FactSet, SkippedRow, annotate
from recallscope.data.known import known_by, known_counts
from recallscope.data.loaders import load_facts
from recallscope.data.one_to_many import OneToManySet, generate_lists, match_item, parse_items

__all__ = [
    "Fact",
    "FactSet",
    "OneToManySet",
    "SkippedRow",
    "annotate",
    "builtin_names",
    "builtin_summary",
    "generate_lists",
    "known_by",
    "known_counts",
    "load_facts",
    "match_item",
    "parse_items",
]
