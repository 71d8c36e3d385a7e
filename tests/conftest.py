"""Shared fixtures: tiny random models of every family, and the embedded SmolLM2 (loaded once)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # make tests/tiny.py importable

from tiny import FAMILY_NAMES, tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models():
    """Cache of tiny float64 models by family name (read-only: do not modify them in tests)."""
    cache: dict = {}

    def get(name: str, dtype: torch.dtype = torch.float64):
        if (name, dtype) not in cache:
            cache[(name, dtype)] = tiny_model(name, dtype=dtype)
        return cache[(name, dtype)]

    return get


@pytest.fixture(params=FAMILY_NAMES)
def family(request) -> str:
    return request.param


PROMPTS = ("The capital of France is", "The Eiffel Tower is in")


@pytest.fixture
def setup(family, tiny_models):
    """``(model, batch)``: the family's tiny float64 model and a left-padded batch of two prompts."""
    import recallscope as rs

    model = tiny_models(family)
    return model, rs.tokenize(model, PROMPTS)


@pytest.fixture(scope="session")
def embedded_model():
    """The embedded SmolLM2-135M, loaded once per test session, offline."""
    import recallscope as rs

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return rs.load_model("smollm2-135m", device="cpu")
    except rs.ModelNotAvailableError as err:
        pytest.fail(f"embedded model missing: {err}")
