"""Analyses of the four papers, one folder per paper, one module per method.

=================  ==================================================================================
folder             methods
=================  ==================================================================================
``general``        causal_tracing, logit_lens, attribution_patching
``geva2023``       attention_knockout, attributes_rate, sublayer_knockout, extraction_rate,
                   early_patching, head_mappings
``yu2024``         logprob_attribution, query_attribution, neuron_ablation
``yan_jia2025``    early_decoding, head_promotion, span_knockout_mlp, token_lens
``lv2024``         argument_heads, mlp_regression, function_application, anti_overconfidence
=================  ==================================================================================

Each method module has ``NAME``, ``DESCRIPTION``, ``Config`` (paper presets via
``Config.preset(name)``), a result class with ``to_frame()`` / ``arrays()``, and
``run(model, batch, config)``. A paper's folder also holds its torch-free summaries of stored tables
(``summaries``) and its report sections (``report``). Modules load on first use:
``recallscope.methods.logit_lens`` and ``REGISTRY["logit_lens"]`` both import
``recallscope.methods.general.logit_lens``, so importing this package (or a paper's summaries)
does not import torch.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
from collections.abc import Iterator, Mapping
from types import ModuleType

from recallscope.errors import RecallscopeError

_METHODS: tuple[tuple[str, str], ...] = (  # (method, its paper's folder), in the order they run
    ("logit_lens", "general"),
    ("attention_knockout", "geva2023"),
    ("attributes_rate", "geva2023"),
    ("sublayer_knockout", "geva2023"),
    ("extraction_rate", "geva2023"),
    ("early_patching", "geva2023"),
    ("head_mappings", "geva2023"),
    ("logprob_attribution", "yu2024"),
    ("query_attribution", "yu2024"),
    ("neuron_ablation", "yu2024"),
    ("early_decoding", "yan_jia2025"),
    ("token_lens", "yan_jia2025"),
    ("span_knockout_mlp", "yan_jia2025"),
    ("head_promotion", "yan_jia2025"),
    ("argument_heads", "lv2024"),
    ("mlp_regression", "lv2024"),
    ("function_application", "lv2024"),
    ("anti_overconfidence", "lv2024"),
    ("causal_tracing", "general"),
    ("attribution_patching", "general"),
)
PAPERS: dict[str, tuple[str, ...]] = {}
"""Each paper's folder and its methods."""
for _name, _paper in _METHODS:
    PAPERS[_paper] = (*PAPERS.get(_paper, ()), _name)

_PATHS = {name: f"recallscope.methods.{paper}.{name}" for name, paper in _METHODS}
_REGISTERED: dict[str, ModuleType] = {}  # methods added at run time (register)
ENTRY_POINTS = "recallscope.methods"
"""Entry-point group through which other packages add methods (``name = "package.module"``)."""


@functools.cache
def _plugins() -> dict[str, str]:
    """Methods other installed packages declare: name → module path."""
    return {ep.name: ep.value for ep in importlib.metadata.entry_points(group=ENTRY_POINTS)}


def _load(name: str) -> ModuleType:
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name in _PATHS:
        return importlib.import_module(_PATHS[name])
    if name in _plugins():
        return register(importlib.import_module(_plugins()[name]))
    raise KeyError(name)


class _Registry(Mapping[str, ModuleType]):
    """Method name → module, each imported on first access: the built-in methods in run order, then
    methods registered at run time or through the ``recallscope.methods`` entry point.
    """

    def __getitem__(self, name: str) -> ModuleType:
        return _load(name)

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys([*_PATHS, *_REGISTERED, *_plugins()]))

    def __len__(self) -> int:
        return len(list(iter(self)))


REGISTRY: Mapping[str, ModuleType] = _Registry()
"""Every method by name, in run order."""


def check_method(module: ModuleType) -> None:
    """Check that ``module`` has the shape of a method (``recallscope.methods.base``'s contract).

    Raises:
        RecallscopeError: listing everything missing or of the wrong kind.
    """
    from recallscope.methods.base import check_method as check

    check(module)


def register(module: ModuleType) -> ModuleType:
    """Add a method module to :data:`REGISTRY` (for this process) after :func:`check_method`; a
    built-in method's name cannot be taken. Returns the module.
    """
    check_method(module)
    name = module.NAME
    if name in _PATHS and _load(name) is not module:
        raise RecallscopeError(f"method name {name!r} is taken by a built-in method: choose another NAME")
    _REGISTERED[name] = module
    return module


def __getattr__(name: str) -> ModuleType:
    """``recallscope.methods.<method>``: the method's module (in its paper's folder)."""
    try:
        return _load(name)
    except KeyError:
        raise AttributeError(f"module 'recallscope.methods' has no attribute {name!r}") from None


__all__ = ["ENTRY_POINTS", "PAPERS", "REGISTRY", "check_method", "register", *_PATHS]
