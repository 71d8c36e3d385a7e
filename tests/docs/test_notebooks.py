"""docs/notebooks.md's first example runs as written on the embedded model (slow)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parents[2] / "docs" / "notebooks.md"

pytestmark = [pytest.mark.embedded, pytest.mark.slow]


def test_the_notebook_example_runs():
    code = re.findall(r"```python\n# notebook\n(.*?)```", PAGE.read_text(), flags=re.S)[0]
    scope: dict = {}
    exec(compile(code, str(PAGE), "exec"), scope)  # noqa: S102 (our own docs page)
    assert scope["section"].method == "logit_lens" and scope["section"].figures
    assert "<img" in scope["trace"].plot()._repr_html_()
    assert scope["lens"]._repr_html_().startswith("<p><b>logit_lens</b>: 3 facts")
