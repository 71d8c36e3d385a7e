"""Analyses of the four papers, one module per method.

Each module has ``NAME``, ``DESCRIPTION``, ``Config`` (paper presets via ``Config.preset(name)``),
a result class with ``to_frame()`` / ``arrays()``, and ``run(model, batch, config)``.
"""

from recallscope.methods import (
    anti_overconfidence,
    argument_heads,
    attention_knockout,
    attributes_rate,
    causal_tracing,
    early_decoding,
    early_patching,
    extraction_rate,
    function_application,
    head_mappings,
    head_promotion,
    logit_lens,
    logprob_attribution,
    mlp_regression,
    neuron_ablation,
    query_attribution,
    span_knockout_mlp,
    sublayer_knockout,
    token_lens,
)

_MODULES = (
    logit_lens,
    attention_knockout,
    attributes_rate,
    sublayer_knockout,
    extraction_rate,
    early_patching,
    head_mappings,
    logprob_attribution,
    query_attribution,
    neuron_ablation,
    early_decoding,
    token_lens,
    span_knockout_mlp,
    head_promotion,
    argument_heads,
    mlp_regression,
    function_application,
    anti_overconfidence,
    causal_tracing,
)
REGISTRY = {module.NAME: module for module in _MODULES}

__all__ = [
    "REGISTRY",
    "anti_overconfidence",
    "argument_heads",
    "function_application",
    "mlp_regression",
    "attention_knockout",
    "attributes_rate",
    "causal_tracing",
    "early_decoding",
    "early_patching",
    "extraction_rate",
    "head_mappings",
    "head_promotion",
    "logit_lens",
    "logprob_attribution",
    "neuron_ablation",
    "query_attribution",
    "span_knockout_mlp",
    "sublayer_knockout",
    "token_lens",
]
