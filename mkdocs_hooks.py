"""MkDocs hook: the "Methods" section of the navigation, one group per paper, built from the pages in
``docs/methods/`` in the order the registry runs the methods (a new method's page needs no nav line).
"""

from __future__ import annotations

from pathlib import Path

from recallscope.methods import PAPERS

TITLES = {
    "general": "General",
    "geva2023": "Geva et al. 2023",
    "yu2024": "Yu & Ananiadou 2024",
    "yan_jia2025": "Yan & Jia 2025",
    "lv2024": "Lv et al. 2024",
}


def on_config(config):
    pages = {path.stem for path in (Path(config["docs_dir"]) / "methods").glob("*.md")}
    sections = [
        {TITLES.get(paper, paper): [f"methods/{name}.md" for name in names if name in pages]}
        for paper, names in PAPERS.items()
    ]
    others = sorted(pages - {name for names in PAPERS.values() for name in names})
    if others:
        sections.append({"Other methods": [f"methods/{name}.md" for name in others]})
    config["nav"] = [
        {"Methods": sections} if isinstance(item, dict) and "Methods" in item else item
        for item in config["nav"]
    ]
    return config
