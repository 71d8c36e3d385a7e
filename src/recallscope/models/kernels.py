"""Which attention kernel a native model runs, and a probe of how its attention is wired.

transformers routes the attention of most models through its public ``AttentionInterface``: the
attention module computes queries, keys and values and calls the kernel named by
``config._attn_implementation`` (``"sdpa"``, ``"eager"``, or one registered by a library, as
recallscope registers ``recallscope_eager``). Older modeling code (BLOOM, MPT, GPT-Neo, and GPT-J
before transformers 5.25) computes its softmax inline instead. Which of the two a model does is
not read from its class name or source: :func:`interface_modules` runs the model once with a
probe kernel and reports which module called it first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import eager_mask

from recallscope.models.offload import OffloadedWeights

__all__ = ["attention_kernel", "first_interface_caller", "PROBE_KERNEL"]

PROBE_KERNEL = "recallscope_probe"


class _Called(Exception):
    """Raised by the probe kernel to end the probe forward at the first attention call."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def _probe(module: nn.Module, *args, **kwargs):
    raise _Called(module)


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


def first_interface_caller(hf_model: nn.Module, n_tokens: int = 3) -> nn.Module | None:
    """The first module that calls transformers' ``AttentionInterface`` in a forward of
    ``n_tokens`` tokens, or None if the forward completes without calling it. The forward stops
    at that call, so a probe costs the embedding and the first block's projections.
    """
    ids = torch.arange(n_tokens, device=_input_device(hf_model))[None]
    try:
        with torch.no_grad(), attention_kernel(hf_model, PROBE_KERNEL):
            hf_model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    except _Called as called:
        return called.module
    except Exception:  # noqa: BLE001 - inline attention code may reject the probe's masks: no call
        return None
    return None


def _input_device(hf_model: nn.Module) -> torch.device:
    embed = hf_model.get_input_embeddings()
    if embed.weight.device.type != "meta":
        return embed.weight.device
    return torch.device(OffloadedWeights(hf_model).execution_device(embed))
