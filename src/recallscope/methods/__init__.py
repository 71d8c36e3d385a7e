"""Analyses of the four papers, one module per method.

Each module has ``NAME``, ``DESCRIPTION``, ``Config`` (paper presets via ``Config.preset(name)``),
a result class with ``to_frame()`` / ``arrays()``, and ``run(model, batch, config)``.
"""

from recallscope.methods import attention_knockout, causal_tracing, logit_lens

REGISTRY = {module.NAME: module for module in (logit_lens, attention_knockout, causal_tracing)}

__all__ = ["REGISTRY", "attention_knockout", "causal_tracing", "logit_lens"]
