"""recallscope: how does a language model recall a fact?

import recallscope as rs
model = rs.load_model("smollm2-135m")          # embedded default, no network
batch = rs.tokenize(model, ["The capital of France is"], spans={"subject": ["France"]}, targets=[" Paris"])
logits = rs.forward(model, batch)               # [1, d_vocab]
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for type checkers and IDEs; at run time each name loads on first use
    from recallscope import methods
    from recallscope.check import CheckReport, check_model
    from recallscope.core import (
        Cache,
        Decomposition,
        Knockout,
        PromptBatch,
        VocabProjection,
        ablate_neurons,
        add_noise,
        block_attention,
        decode_tokens,
        forward,
        head_outputs,
        head_source_outputs,
        neuron_outputs,
        patch,
        patch_cells,
        project_to_vocab,
        resid_decomposition,
        run_with_cache,
        site_hook,
        tokenize,
    )
    from recallscope.data import Fact, FactSet, generate_lists, load_facts
    from recallscope.errors import (
        DatasetError,
        KnockoutError,
        ModelNotAvailableError,
        RecallscopeError,
        ShapeError,
        SiteError,
        SpanError,
        UnsupportedModelError,
    )
    from recallscope.models import DEFAULT_MODEL, Model, Site, load_model, parse_site
    from recallscope.promote_suppress import promote_then_suppress

_EXPORTS = {
    "ablate_neurons": "recallscope.core",
    "add_noise": "recallscope.core",
    "block_attention": "recallscope.core",
    "Cache": "recallscope.core",
    "check_model": "recallscope.check",
    "CheckReport": "recallscope.check",
    "DatasetError": "recallscope.errors",
    "decode_tokens": "recallscope.core",
    "Decomposition": "recallscope.core",
    "DEFAULT_MODEL": "recallscope.defaults",
    "Fact": "recallscope.data",
    "FactSet": "recallscope.data",
    "forward": "recallscope.core",
    "generate_lists": "recallscope.data",
    "head_outputs": "recallscope.core",
    "head_source_outputs": "recallscope.core",
    "Knockout": "recallscope.core",
    "KnockoutError": "recallscope.errors",
    "load_facts": "recallscope.data",
    "load_model": "recallscope.models",
    "methods": "recallscope.methods",
    "Model": "recallscope.models",
    "ModelNotAvailableError": "recallscope.errors",
    "neuron_outputs": "recallscope.core",
    "parse_site": "recallscope.models",
    "patch": "recallscope.core",
    "patch_cells": "recallscope.core",
    "project_to_vocab": "recallscope.core",
    "promote_then_suppress": "recallscope.promote_suppress",
    "PromptBatch": "recallscope.core",
    "RecallscopeError": "recallscope.errors",
    "resid_decomposition": "recallscope.core",
    "run_with_cache": "recallscope.core",
    "ShapeError": "recallscope.errors",
    "Site": "recallscope.models",
    "site_hook": "recallscope.core",
    "SiteError": "recallscope.errors",
    "SpanError": "recallscope.errors",
    "tokenize": "recallscope.core",
    "UnsupportedModelError": "recallscope.errors",
    "VocabProjection": "recallscope.core",
}
"""Where each public name lives. Names load on first use, so ``recallscope --help`` and worker processes
do not pay for torch, transformers and every method up front."""

__version__ = "0.1.0"

__all__ = [
    "Cache",
    "CheckReport",
    "DatasetError",
    "Fact",
    "FactSet",
    "DEFAULT_MODEL",
    "Decomposition",
    "Knockout",
    "KnockoutError",
    "Model",
    "ModelNotAvailableError",
    "PromptBatch",
    "RecallscopeError",
    "ShapeError",
    "Site",
    "SiteError",
    "SpanError",
    "UnsupportedModelError",
    "VocabProjection",
    "ablate_neurons",
    "add_noise",
    "block_attention",
    "check_model",
    "decode_tokens",
    "forward",
    "generate_lists",
    "promote_then_suppress",
    "head_outputs",
    "head_source_outputs",
    "load_facts",
    "load_model",
    "methods",
    "neuron_outputs",
    "parse_site",
    "patch",
    "patch_cells",
    "project_to_vocab",
    "resid_decomposition",
    "run_with_cache",
    "site_hook",
    "tokenize",
]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'recallscope' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name])
    value = module if _EXPORTS[name] == f"recallscope.{name}" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
