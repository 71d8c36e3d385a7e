"""Figures and the self-contained HTML report, built from a run folder's stored results only.

``write_report(run_dir)`` reads ``manifest.json``, ``facts.parquet`` and ``results/``, writes the
scorecard of the papers' claims to ``scorecard.parquet`` (:mod:`recallscope.report.scorecard`), the
figures to ``figures/`` (PNG and SVG) and ``report.html`` (one file: styles and PNGs inlined, one
small inline script for the fact picker, no network), findings first. Every string from the model
or the dataset is HTML-escaped by the template engine (Jinja2 autoescape).
"""

from __future__ import annotations

import os
from pathlib import Path

import jinja2

from recallscope.errors import RecallscopeError
from recallscope.report.agreement import agreement_section
from recallscope.report.scorecard import scorecard
from recallscope.report.section import Options, Table
from recallscope.runner.store import Store, atomic_write

__all__ = ["write_report", "Options", "scorecard", "LONG_TABLE"]

LONG_TABLE = 12
"""Tables with more rows than this are folded (open them to read)."""


def write_report(run_dir: str | os.PathLike, options: Options | None = None) -> Path:
    """Write ``run_dir/report.html`` (and ``run_dir/figures/``) from the stored results; return its path."""
    store = Store(run_dir)
    manifest = store.read_manifest()
    if not manifest:
        raise RecallscopeError(
            f"{run_dir} is not a recallscope run folder (no manifest.json); "
            f"create one with `recallscope run --out {run_dir}`"
        )
    from recallscope.report.sections import build_section, by_paper  # (they import the methods' sections)

    options = options or Options()
    facts = store.read_facts()
    folder = store.root / "figures"
    card = scorecard(store)
    atomic_write(store.root / "scorecard.parquet", lambda p: card.to_parquet(p, index=False))
    sections = [build_section(m, store, facts, folder, options) for m in store.methods()]
    agreement = agreement_section(store, folder)
    per_fact = {
        fact_id: [(s.title, item) for s in sections for item in s.per_fact.get(fact_id, [])]
        for fact_id in facts["fact_id"]
    }
    html = _template().render(
        manifest=manifest,
        scorecard=card.to_dict("records"),
        agreement=agreement,
        facts=facts.to_dict("records"),
        papers=by_paper(sections),
        per_fact=per_fact,
        skipped=_skipped(manifest),
        is_table=lambda item: isinstance(item, Table),
        long_table=LONG_TABLE,
    )
    path = store.root / "report.html"
    atomic_write(path, lambda p: p.write_text(html, encoding="utf-8"))
    return path


def _template(name: str = "report.html.j2") -> jinja2.Template:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("recallscope.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["plain"] = _plain
    env.filters["num"] = _number
    return env.get_template(name)


def _plain(value) -> str:
    """Dicts and lists as ``k: v, …`` text instead of Python reprs."""
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_plain(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_plain(v) for v in value)
    return "" if value is None else str(value)


def _number(value) -> str:
    """A number in 3 significant digits ('' for NaN)."""
    return "" if value is None or value != value else f"{value:.3g}"


def _skipped(manifest: dict) -> list[tuple[str, str, str]]:
    """``(where, what, why)`` for every dataset row and fact left out."""
    rows = [("dataset", "", reason) for reason in manifest.get("dataset", {}).get("skipped", [])]
    for method, entry in manifest.get("methods", {}).items():
        rows += [(method, fact_id, reason) for fact_id, reason in entry.get("skipped", [])]
    return rows
