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
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import eager_mask

from recallscope.models.offload import OffloadedWeights

__all__ = [
    "attention_kernel",
    "eager_kernel",
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
    """Could a softmax output be attention probabilities: ``[B, H, Q, K]`` or ``[B·H, Q, K]`` (XGLM),
    with ``H = n_heads``? (Other softmaxes have four dimensions too: the ``[B, T, n, n]`` stream-mixing
    weights of hyper-connections.)
    """
    if out.dim() == 4:
        return out.shape[1] == n_heads
    return out.dim() == 3 and out.shape[0] % n_heads == 0


@dataclass(frozen=True)
class InterfaceCall:
    """The first call of transformers' ``AttentionInterface`` in a forward."""

    module: nn.Module
    """The attention module that called it."""
    value: torch.Tensor
    """The values it handed the kernel, ``[B, H_kv, K, d_head]`` in float64."""
    output: torch.Tensor
    """What the kernel returns for those inputs (eager math), ``[B, Q, H, d_head]`` in float64."""
    sinks: bool
    """It handed attention-sink logits too (``s_aux``, gpt-oss)."""
    calls: int = 1
    """How many times that module called the kernel in its forward (2 for DiffLlama's differential
    attention, one softmax per call)."""


class _Called(Exception):
    """Raised when the first attention module that called the probe kernel returns: ends the probe."""

    def __init__(self, call: InterfaceCall) -> None:
        super().__init__()
        self.call = call


def eager_kernel(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    on_probs: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Transformers' eager attention, step by step (scaling, soft-capping, additive or boolean
    mask, sinks, float32 softmax for half precision).

    ``query [B, H, Q, d_head]``, ``key``/``value [B, H_kv, K, d_head]`` → output ``[B, Q, H, d_head]``
    and probabilities ``[B, H, Q, K]``; ``on_probs`` may read or replace the probabilities before
    they mix the values.
    """
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # GQA: query head h reads key/value head h // groups (= HF's repeat_kv)
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # [B, H, Q, K]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        mask = attention_mask[..., : key.shape[-2]]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    upcast = torch.float32 if scores.dtype in (torch.float16, torch.bfloat16) else None
    if s_aux is None:
        probs = torch.softmax(scores, dim=-1, dtype=upcast).to(query.dtype)
    else:  # attention sinks (gpt-oss): one extra logit per head takes part in the softmax, then is dropped
        sink = s_aux.reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1).to(scores.dtype)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1, dtype=upcast)[..., :-1].to(
            query.dtype
        )
    if on_probs is not None:
        probs = on_probs(probs)
    output = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return output, probs


@dataclass
class _ProbeState:
    probed: frozenset[int] | None = None
    """Ids of the modules whose first attention call the probe reports (None: any module's)."""
    call: InterfaceCall | None = None


_STATE = _ProbeState()


def _stop(module: nn.Module, inputs, output) -> None:
    """Forward hook on every module probed: the module that made the first call has returned."""
    if _STATE.call is not None and _STATE.call.module is module:
        raise _Called(_STATE.call)


def _probe(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """Eager attention that records the first call of a probed module, counts that module's further
    calls, and ends the forward when the module returns.
    """
    args = (query, key, value, attention_mask, *(kwargs.get(k) for k in ("scaling", "softcap", "s_aux")))
    state = _STATE
    if state.probed is not None and id(module) not in state.probed:  # not the block probed
        return eager_kernel(*args)
    if state.call is None:
        wide = (a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
        output = eager_kernel(*wide)[0].detach()
        state.call = InterfaceCall(module, value.detach().double(), output, kwargs.get("s_aux") is not None)
    elif state.call.module is module:
        state.call = dataclasses.replace(state.call, calls=state.call.calls + 1)
    return eager_kernel(*args)


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


def first_interface_call(
    hf_model: nn.Module, token_ids: tuple[int, ...], within: nn.Module | None = None
) -> InterfaceCall | None:
    """The first call of transformers' ``AttentionInterface`` in a forward of ``token_ids`` (taken
    modulo the vocabulary), or None if the forward completes without one. The forward stops when the
    calling module returns, so a probe costs the embedding and the first block's attention. With ``within`` (a
    block), the first call from a module inside it; calls before it run transformers' eager math.
    """
    ids = probe_input(hf_model, token_ids)
    _STATE.probed = None if within is None else frozenset(id(m) for m in within.modules())
    handles = [m.register_forward_hook(_stop) for m in (within or hf_model).modules()]
    try:
        with torch.no_grad(), attention_kernel(hf_model, PROBE_KERNEL):
            hf_model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    except _Called as called:
        return called.call
    except Exception:  # noqa: BLE001 - inline attention code may reject the probe's masks: no call
        return None
    finally:
        for handle in handles:
            handle.remove()
        _STATE.probed, _STATE.call = None, None
    return None
