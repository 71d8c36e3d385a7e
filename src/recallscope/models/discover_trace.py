"""The traced forward of architecture discovery (``models.discover``).

One forward of :data:`PROBE_IDS` with hooks on the modules outside the blocks, on each block and on
every module inside the probed block records each module's first call (float64 copies of its input
and output, and the routing an experts bank was called with); a torch-function mode finds the module
that takes the first ``[B, H, Q, K]`` softmax and the values its output is multiplied with (inline
attention). :func:`_first_calls` records only the first call of some named modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from recallscope.models.discover_modules import is_experts
from recallscope.models.experts import bank_inputs
from recallscope.models.families._common import get_module
from recallscope.models.kernels import SOFTMAXES, is_probabilities, probe_input

PROBE_IDS = (3, 17, 5, 11, 7, 2, 13)
"""Token ids of the traced forward (taken modulo the vocabulary)."""

# -- the traced forward --------------------------------------------------------------------------


@dataclass
class _Call:
    """First call of one module in the traced forward (float64 copies)."""

    order: int
    input: torch.Tensor | None
    output: torch.Tensor | None
    routing: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
    """``(expert index [S, k], router weights [S, k])`` an experts bank was called with."""


def _first_tensor(value) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


@dataclass
class _Trace:
    calls: dict[str, _Call] = field(default_factory=dict)
    """First call of each module."""
    later: list[tuple[str, _Call]] = field(default_factory=list)
    """Every further call of a module outside the blocks (a norm used twice, NanoChat)."""
    logits: torch.Tensor | None = None
    softmax_owner: str | None = None
    """Innermost module running when the first 4-D softmax of block 0 was taken (inline attention)."""
    softmax_value: torch.Tensor | None = None
    """The operand the first 4-D softmax output was multiplied with (the values), ``[B, H, K, d]``."""

    def get(self, name: str | None) -> _Call | None:
        return None if name is None else self.calls.get(name)


class _SoftmaxWatch(TorchFunctionMode):
    """Finds the module that takes the first ``[B, H, Q, K]`` softmax of block 0, and the values
    that softmax output is multiplied with.
    """

    def __init__(self, trace: _Trace, stack: list[str], block_prefix: str, n_heads: int, leaves=()) -> None:
        super().__init__()
        self.trace, self.stack, self.prefix, self.n_heads = trace, stack, block_prefix, n_heads
        self.leaves = set(leaves)
        """Modules that only wrap the softmax (``nn.Softmax``, CPM-Ant): their parent is the attention."""
        self.probs: torch.Tensor | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inside = [name for name in self.stack if name.startswith(self.prefix) and name not in self.leaves]
        if not inside or self.trace.softmax_value is not None:
            return out
        if (
            func in SOFTMAXES
            and isinstance(out, torch.Tensor)
            and self.probs is None
            and is_probabilities(out, self.n_heads)
        ):
            self.probs, self.trace.softmax_owner = out.reshape(-1, self.n_heads, *out.shape[-2:]), inside[-1]
        elif self.probs is not None and getattr(func, "__name__", "") in ("matmul", "bmm", "__matmul__"):
            first, second = args[0], args[1]
            if first.numel() == self.probs.numel() and torch.equal(
                first.reshape(-1).to(self.probs.dtype), self.probs.reshape(-1)
            ):  # probabilities @ values: [B, H_kv, K, d] (MQA broadcasts one head) or [B·H, K, d]
                batch = self.probs.shape[0]
                self.trace.softmax_value = second.detach().reshape(batch, -1, *second.shape[-2:]).double()
        return out


def _trace(model: nn.Module, blocks_path: str, block: int = 0) -> _Trace:
    """One forward of :data:`PROBE_IDS` recording every call of the modules outside the blocks, of
    each block, and of the modules inside block ``block`` (names relative to the model).
    """
    trace, stack, handles, open_calls, counter = _Trace(), [], [], [], [0]
    block_prefix = f"{blocks_path}.{block}"

    def record(name):
        def pre(module, args, kwargs):
            stack.append(name)
            first = _first_tensor(args) if args else _first_tensor(kwargs.get("hidden_states"))
            call = _Call(counter[0], _detached(first), None)
            if is_experts(module) and not hasattr(module, "has_gate"):  # checked against its weights
                _, index, weights = bank_inputs(module, args, kwargs)
                call.routing = (None if index is None else index.detach().clone(), _detached(weights))
            counter[0] += 1
            if name not in trace.calls:
                trace.calls[name] = call
            else:
                trace.later.append((name, call))
            open_calls.append(call)

        def post(module, args, kwargs, output):
            stack.pop()
            call = open_calls.pop()
            call.output = _detached(_first_tensor(output))

        return pre, post

    n_blocks = len(get_module(model, blocks_path))
    whole_blocks = {f"{blocks_path}.{i}" for i in range(n_blocks)}
    for name, module in model.named_modules():
        inside_blocks = name.startswith(blocks_path + ".")
        if name and (not inside_blocks or name in whole_blocks or name.startswith(block_prefix + ".")):
            pre, post = record(name)
            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(module.register_forward_hook(post, with_kwargs=True, always_call=True))
    ids = probe_input(model, PROBE_IDS)
    try:
        n_heads = int(getattr(_text_config(model), "num_attention_heads", 0) or 1)
        leaves = [name for name, m in model.named_modules() if isinstance(m, nn.Softmax | nn.Dropout)]
        with torch.no_grad(), _SoftmaxWatch(trace, stack, block_prefix, n_heads, leaves):
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    trace.logits = out.logits.detach().double()
    return trace


def _text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _detached(x: torch.Tensor | None) -> torch.Tensor | None:
    # a copy: modeling code may later add to the same tensor in place (Falcon's MLP output)
    return None if x is None or not x.is_floating_point() else x.detach().to(torch.float64, copy=True)


def _first_calls(model: nn.Module, names: list[str]) -> dict[str, _Call]:
    """One forward of :data:`PROBE_IDS` recording the first call of each named module (float64)."""
    calls: dict[str, _Call] = {}

    def keep(name: str):
        def post(module, args, kwargs, output):
            if name not in calls:
                first = _first_tensor(args) if args else _first_tensor(kwargs.get("hidden_states"))
                calls[name] = _Call(len(calls), _detached(first), _detached(_first_tensor(output)))

        return post

    handles = [
        get_module(model, name).register_forward_hook(keep(name), with_kwargs=True) for name in set(names)
    ]
    ids = probe_input(model, PROBE_IDS)
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return calls
