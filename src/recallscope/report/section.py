"""What a report section is: figures, tables and per-fact items, built from stored tables only."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from recallscope.report.figures import FigureFile

__all__ = ["Section", "Table", "Options", "new_section", "method_config", "fact_title"]


@dataclass
class Table:
    """A small table for the report: column names and rows of plain values (escaped when rendered)."""

    caption: str
    columns: list[str]
    rows: list[list[Any]]

    @classmethod
    def of(cls, caption: str, frame: pd.DataFrame, digits: int = 4) -> Table:
        wide = frame.astype({c: "float64" for c in frame.select_dtypes("float32").columns})
        rounded = wide.round(digits) if len(frame) else frame  # float64 first: 1.991, not 1.9910000562
        return cls(caption, [str(c) for c in frame.columns], rounded.astype(object).values.tolist())


@dataclass
class Section:
    """What the report shows for one method."""

    method: str
    title: str
    intro: str
    figures: list[FigureFile] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    per_fact: dict[str, list[FigureFile | Table]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def _repr_html_(self) -> str:
        """Jupyter: the section's title, notes, figures (inlined PNGs) and tables, every string escaped."""
        parts = [f"<h3>{html.escape(self.title)}</h3>", f"<p>{html.escape(self.intro)}</p>"]
        parts += [f"<p><em>{html.escape(note)}</em></p>" for note in self.notes]
        for f in self.figures:
            if f.blank:
                parts.append(f"<p><em>{html.escape(f.caption)}: not drawn, {html.escape(f.blank)}.</em></p>")
            else:
                parts.append(f'<figure><img src="{f.data_uri}" alt="{html.escape(f.caption)}">'
                             f"<figcaption>{html.escape(f.caption)}</figcaption></figure>")  # fmt: skip
        for t in self.tables:
            frame = pd.DataFrame(t.rows, columns=t.columns)
            parts.append(f"<p><b>{html.escape(t.caption)}</b></p>" + frame.to_html(index=False, escape=True))
        return "\n".join(parts)


@dataclass(frozen=True)
class Options:
    """Report options."""

    max_fact_figures: int = 40
    """Facts that get per-fact figures (the rest get tables only, to keep the file small)."""


def method_config(store, method: str) -> dict[str, Any]:
    """The config a method ran with, from the manifest (empty when unknown)."""
    entry = store.read_manifest().get("methods", {}).get(method, {})
    return entry.get("config", {}) if isinstance(entry, dict) else {}


def fact_title(facts: pd.DataFrame, fact_id: str) -> str:
    row = facts[facts["fact_id"] == fact_id]
    return fact_id if row.empty else f"{row['prompt'].iloc[0]} →{row['target'].iloc[0]}"


def new_section(method: str, title: str, intro: str, frame: pd.DataFrame) -> Section:
    section = Section(method, title, intro)
    if frame.empty:
        section.notes.append("No fact was analysed.")
    return section
