"""Primitives every method is built from: caching, projection, decompositions, knockout, patching,
tokens. Each works on the native HF model through hooks that are removed on exit.
"""

from recallscope.core.attention import eager_attention, pattern_hook
from recallscope.core.cache import Cache, forward, run_with_cache, select_positions
from recallscope.core.decompose import (
    Decomposition,
    head_outputs,
    head_source_outputs,
    neuron_outputs,
    resid_decomposition,
    resid_sites,
)
from recallscope.core.hooks import site_hook
from recallscope.core.knockout import Knockout, block_attention
from recallscope.core.patching import ablate_neurons, add_noise, patch, patch_cells
from recallscope.core.tokens import PromptBatch, find_token_span, tokenize
from recallscope.core.vocab import (
    VocabProjection,
    apply_final_norm,
    decode_tokens,
    final_norm_scale,
    project_to_vocab,
)

__all__ = [
    "Cache",
    "Decomposition",
    "Knockout",
    "PromptBatch",
    "VocabProjection",
    "ablate_neurons",
    "add_noise",
    "apply_final_norm",
    "block_attention",
    "decode_tokens",
    "eager_attention",
    "final_norm_scale",
    "find_token_span",
    "forward",
    "head_outputs",
    "head_source_outputs",
    "neuron_outputs",
    "patch",
    "patch_cells",
    "pattern_hook",
    "project_to_vocab",
    "resid_decomposition",
    "resid_sites",
    "run_with_cache",
    "select_positions",
    "site_hook",
    "tokenize",
]
