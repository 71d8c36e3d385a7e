"""recallscope: how does a language model recall a fact?

import recallscope as rs
model = rs.load_model("smollm2-135m")          # embedded default, no network
batch = rs.tokenize(model, ["The capital of France is"], spans={"subject": ["France"]}, targets=[" Paris"])
logits = rs.forward(model, batch)               # [1, d_vocab]
"""

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
