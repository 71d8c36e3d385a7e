"""The README's Python example runs as written, on the embedded model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.embedded

README = Path(__file__).parents[2] / "README.md"


def test_readme_example_runs(embedded_model, monkeypatch):
    import recallscope as rs

    monkeypatch.setattr(rs, "load_model", lambda *args, **kwargs: embedded_model)  # loaded once per session
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    ranks, paris = namespace["lens"].target_ranks, int(namespace["batch"].target_ids[0])
    assert ranks.shape == (1, embedded_model.n_layers) and int(ranks[0, -1]) == 0
    p_clean = torch.softmax(namespace["logits"][0], -1)[paris]
    p_knocked = torch.softmax(namespace["knocked"][0], -1)[paris]
    assert p_knocked < p_clean
