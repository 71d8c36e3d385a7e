"""Which attention kernel a native model runs, and a probe of how its attention is wired.

transformers routes the attention of most models through its public ``AttentionInterface``: the
attention module computes queries, keys and values and calls the kernel named by
``config._attn_implementation`` (``"sdpa"``, ``"eager"``, or one registered by a library, as
recallscope registers ``recallscope_eager``). Older modeling code (BLOOM, MPT, GPT-Neo, and GPT-J
before transformers 5.25) computes its softmax inline instead. Which of the two a model does is
not read from its class name or source: :func:`first_interface_call` runs the model once with a
probe kernel and reports which module called it first, with the values it handed the kernel.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import eager_mask

from recallscope.models.offload import OffloadedWeights

__all__ = [
    "attention_kernel",
    "first_interface_call",
    "InterfaceCall",
    "PROBE_KERNEL",
    "SOFTMAXES",
    "is_probabilities",
    "probe_input",
]

PROBE_KERNEL = "recallscope_probe"

SOFTMAXES = frozenset({torch.softmax, torch.nn.functional.softmax, torch.Tensor.softmax})
"""The functions inline attention code takes its softmax with (as a ``TorchFunctionMode`` sees them)."""


def is_probabilities(out: torch.Tensor, n_heads: int) -> bool:
    """Could a softmax output be attention probabilities: ``[B, H, Q, K]`` or ``[B·H, Q, K]`` (XGLM)?"""
    return out.dim() == 4 or (out.dim() == 3 and out.shape[0] % n_heads == 0)


@dataclass(frozen=True)
class InterfaceCall:
    """The first call of transformers' ``AttentionInterface`` in a forward."""

    module: nn.Module
    """The attention module that called it."""
    value: torch.Tensor
    """The values it handed the kernel, ``[B, H_kv, K, d_head]`` in float64."""
    sinks: bool
    """It handed attention-sink logits too (``s_aux``, gpt-oss)."""


class _Called(Exception):
    """Raised by the probe kernel to end the probe forward at the first attention call."""

    def __init__(self, call: InterfaceCall) -> None:
        super().__init__()
        self.call = call


def _probe(module: nn.Module, query, key, value, attention_mask, **kwargs):
    raise _Called(InterfaceCall(module, value.detach().double(), kwargs.get("s_aux") is not None))


AttentionInterface.register(PROBE_KERNEL, _probe)
AttentionMaskInterface.register(PROBE_KERNEL, eager_mask)


@contextlib.contextmanager
def attention_kernel(hf_model: nn.Module, name: str) -> Iterator[None]:
    """Run ``hf_model`` with the attention kernel ``name`` (registered in ``AttentionInterface``)
    inside the context; the model's own choice is restored on exit.

    Sets ``config._attn_implementation``, the attribute every transformers attention module reads
    at each call (its setter also updates sub-configs).
    """
    config = hf_model.config
    old = config._attn_implementation
    if old == name:
        yield
        return
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = old


def probe_input(hf_model: nn.Module, token_ids: tuple[int, ...]) -> torch.Tensor:
    """Token ids ``[1, T]`` (modulo the vocabulary) on the input embedding's device."""
    embed = hf_model.get_input_embeddings()
    device = OffloadedWeights(hf_model).device_of(embed)
    return torch.tensor([token_ids], device=device) % embed.weight.shape[0]


def first_interface_call(hf_model: nn.Module, token_ids: tuple[int, ...]) -> InterfaceCall | None:
    """The first call of transformers' ``AttentionInterface`` in a forward of ``token_ids`` (taken
    modulo the vocabulary), or None if the forward completes without one. The forward stops at that
    call, so a probe costs the embedding and the first block's projections.
    """
    ids = probe_input(hf_model, token_ids)
    try:
        with torch.no_grad(), attention_kernel(hf_model, PROBE_KERNEL):
            hf_model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    except _Called as called:
        return called.call
    except Exception:  # noqa: BLE001 - inline attention code may reject the probe's masks: no call
        return None
    return None
