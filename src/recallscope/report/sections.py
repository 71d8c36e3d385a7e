"""One report section per method, built from stored tables only.

A section function takes ``(store, facts, figures_dir, options)`` and returns a :class:`Section`:
its figures, tables and per-fact drill-down items. Later methods register theirs in ``SECTIONS``;
a method without one gets a generic preview of its table.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd

from recallscope.methods.general.report import SECTIONS as GENERAL
from recallscope.methods.geva2023.report import SECTIONS as GEVA
from recallscope.methods.lv2024.report import SECTIONS as LV
from recallscope.methods.yan_jia2025.report import SECTIONS as YAN_JIA
from recallscope.methods.yu2024.report import SECTIONS as YU
from recallscope.report.section import Options, Section, Table

__all__ = ["Section", "Table", "Options", "SECTIONS", "PAPERS", "build_section", "by_paper"]


def generic_section(method: str) -> Callable[..., Section]:
    def build(store, facts: pd.DataFrame, folder: Path, options: Options) -> Section:
        frame = store.read_table(method)
        section = Section(method, method.replace("_", " ").capitalize(), f"Rows of results/{method}.parquet.")
        section.tables.append(Table.of(f"First rows of {len(frame)}", frame.head(20)))
        return section

    return build


SECTIONS: dict[str, Callable[..., Section]] = {**GENERAL, **GEVA, **YU, **YAN_JIA, **LV}

PAPERS: dict[str, str] = {
    **dict.fromkeys(GEVA, "Geva et al. 2023: Dissecting recall of factual associations"),
    **dict.fromkeys(YU, "Yu & Ananiadou 2024: neuron-level knowledge attribution"),
    **dict.fromkeys(YAN_JIA, "Yan & Jia 2025: promote then suppress in one-to-many recall"),
    **dict.fromkeys(LV, "Lv et al. 2024: argument passing and function application"),
    **dict.fromkeys(GENERAL, "Localization: logit lens, causal tracing, attribution patching"),
}
"""The report's part of each method with a section of its own (others: "Other methods")."""


def by_paper(sections: list[Section]) -> list[tuple[str, list[Section]]]:
    """The sections grouped by paper, in the order their papers first appear."""
    groups: dict[str, list[Section]] = {}
    for section in sections:
        groups.setdefault(PAPERS.get(section.method, "Other methods"), []).append(section)
    return list(groups.items())


def build_section(method: str, store, facts: pd.DataFrame, folder: Path, options: Options) -> Section:
    return SECTIONS.get(method, generic_section(method))(store, facts, folder, options)
