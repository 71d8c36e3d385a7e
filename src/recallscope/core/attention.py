"""Attention probabilities and hooks on the attention kernel (knockouts: :mod:`recallscope.core.knockout`).

Attention probabilities (the ``pattern`` site) come from :func:`pattern_hook`. For models wired
to transformers' ``AttentionInterface`` we register our own eager kernel, ``recallscope_eager``,
and switch to it only inside the contexts that need probabilities; it follows HF's eager kernel
step by step (scaling, soft-capping, additive mask, fp32 softmax for half precision) and is
checked against the model's own kernel by ``check_model``. Models whose attention computes its
softmax inline (BLOOM, MPT, GPT-Neo; ``spec.attention_interface`` is False) have that softmax's
``[B, H, Q, K]`` output tapped while their attention module runs (a ``TorchFunctionMode``), and
a pre-softmax knockout there renormalizes the kept probabilities, which is the same softmax.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import eager_mask

from recallscope.core.dtypes import compute_dtype
from recallscope.core.hooks import module_hook, site_hook
from recallscope.errors import UnsupportedModelError
from recallscope.models.kernels import SOFTMAXES, attention_kernel, eager_kernel, is_probabilities
from recallscope.models.model import Model
from recallscope.models.sites import Site

__all__ = [
    "pattern_hook",
    "edit_pattern",
    "eager_attention",
    "EAGER_IMPLEMENTATION",
    "MASKABLE",
    "kernel_value_hook",
    "kernel_qk_hook",
    "output_gate_hook",
]

KnockoutMode = Literal["pre_softmax", "post_softmax_zero"]
EAGER_IMPLEMENTATION = "recallscope_eager"
MASKABLE = ("sdpa", "eager", EAGER_IMPLEMENTATION)
"""Attention implementations that take a dense ``attention_mask`` (others run eager for a mask edit)."""

# attention module -> [(edits, fn)]; fn(probs [B, H, Q, K]) -> None | new probs
_PROB_HOOKS: weakref.WeakKeyDictionary[nn.Module, list] = weakref.WeakKeyDictionary()
_TAPS: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()
_VALUE_HOOKS: weakref.WeakKeyDictionary[nn.Module, list] = weakref.WeakKeyDictionary()
_OUTPUT_HOOKS: weakref.WeakKeyDictionary[nn.Module, list] = weakref.WeakKeyDictionary()
_QK_HOOKS: weakref.WeakKeyDictionary[nn.Module, list] = weakref.WeakKeyDictionary()


def _eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention with probability hooks; shapes as transformers' ``AttentionInterface``.

    ``query [B, H, Q, d_head]``, ``key``/``value [B, H_kv, K, d_head]`` → output ``[B, Q, H, d_head]``
    and probabilities ``[B, H, Q, K]``.
    """
    value = _run_value_hooks(module, value)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    for fn in _QK_HOOKS.get(module, ()):
        query, key = fn(query, key, scaling, softcap)
    output, probs = eager_kernel(
        query,
        key,
        value,
        attention_mask,
        scaling,
        softcap,
        s_aux,
        on_probs=lambda p: _run_prob_hooks(module, p),
    )
    return _run_output_hooks(module, output), probs


AttentionInterface.register(EAGER_IMPLEMENTATION, _eager_attention)


def _eager_mask(*args, dtype: torch.dtype = torch.float32, **kwargs) -> torch.Tensor | None:
    """Transformers' eager mask, with float64's "minus infinity" kept finite in float32: modeling
    code that runs its softmax in float32 on a float64 model (BLOOM, MPT, Gemma-2) then gives zero
    weights, not NaN, on rows that are all padding.
    """
    mask = eager_mask(*args, dtype=dtype, **kwargs)
    if mask is not None and dtype == torch.float64:
        mask = mask.clamp(min=torch.finfo(torch.float32).min / 2)
    return mask


AttentionMaskInterface.register(EAGER_IMPLEMENTATION, _eager_mask)


def _run_value_hooks(module: nn.Module, value: torch.Tensor) -> torch.Tensor:
    for fn in _VALUE_HOOKS.get(module, ()):
        new = fn(value)
        value = value if new is None else new
    return value


@contextlib.contextmanager
def kernel_value_hook(model: Model, layer: int, fn: Callable) -> Iterator[None]:
    """The ``v`` site of models whose values are no linear map of the residual (latent attention):
    ``fn(v [B, T, n_kv_heads, d_head])`` on the values layer ``layer``'s attention hands the kernel
    (a read, or a write if it returns new values). Runs recallscope's eager kernel inside.
    """
    if not model.spec.attention_interface:
        raise UnsupportedModelError(
            f"{model.spec.family}: the values of its inline attention code cannot be reached (no 'v' site)"
        )
    owner = model.module(model.spec.attn, layer)
    home = model.device

    width, full = model.d_head_at(layer), model.d_head  # narrower heads are padded with zeros

    def call(value: torch.Tensor) -> torch.Tensor | None:  # [B, H_kv, T, d] <-> canonical [B, T, H_kv, d]
        new = fn(torch.nn.functional.pad(value.transpose(1, 2).to(home), (0, full - width)))
        return None if new is None else new[..., :width].to(value.device, value.dtype).transpose(1, 2)

    entries = _VALUE_HOOKS.setdefault(owner, [])
    entries.append(call)
    try:
        with eager_attention(model):
            yield
    finally:
        entries.remove(call)


@contextlib.contextmanager
def kernel_qk_hook(model: Model, layer: int, fn: Callable) -> Iterator[None]:
    """``fn(query [B, T, n_heads, d_qk], key [B, T, n_kv_heads, d_qk], scaling, softcap)`` on the
    queries and keys layer ``layer``'s attention hands the kernel: after RoPE and any q/k norm, what
    the scores ``softcap(scaling · q·k)`` are made of (a read, or a write if it returns new
    ``(query, key)``). Runs recallscope's eager kernel inside; refused for inline attention code
    (BLOOM, MPT, GPT-Neo), whose queries and keys cannot be reached, and for attention that calls
    the kernel twice (DiffLlama's differential attention).
    """
    if not model.spec.attention_interface:
        raise UnsupportedModelError(
            f"{model.spec.family}: its attention code is inline, so the queries and keys its softmax "
            "reads cannot be reached"
        )
    owner, home = model.module(model.spec.attn, layer), model.device
    calls = []

    def call(query, key, scaling, softcap):  # [B, H, T, d] <-> canonical [B, T, H, d]
        calls.append(None)
        if len(calls) > 1:
            raise UnsupportedModelError(
                f"{model.spec.family}: block {layer}'s attention calls the kernel more than once in a "
                "forward, so its queries and keys are not one set"
            )
        new = fn(query.transpose(1, 2).to(home), key.transpose(1, 2).to(home), scaling, softcap)
        if new is None:
            return query, key
        return tuple(
            n.to(old.device, old.dtype).transpose(1, 2) for n, old in zip(new, (query, key), strict=True)
        )

    def reset(module, args, kwargs):
        calls.clear()

    entries = _QK_HOOKS.setdefault(owner, [])
    entries.append(call)
    try:
        with eager_attention(model), module_hook(owner, reset, "pre"):
            yield
    finally:
        entries.remove(call)


def _run_output_hooks(module: nn.Module, output: torch.Tensor) -> torch.Tensor:
    for fn in _OUTPUT_HOOKS.get(module, ()):
        fn(output)
    return output


@contextlib.contextmanager
def output_gate_hook(model: Model, layer: int, fn: Callable) -> Iterator[None]:
    """Calls ``fn(g [B, T, n_heads, d_head])`` with the per-position factor of an attention whose
    output is gated before ``W_O`` (``spec.attn_output_gate``: AFMoE's and MiniCPM5's sigmoid
    gates, BitNet's sub-norm): ``z = g ⊙ Σ_j α_j v_j``, read as ``z`` over the kernel's output and
    frozen, as a norm's scale is; 0 where the kernel's output is 0. Nothing is called for attention
    without a gate (``g`` is 1 there). Runs recallscope's eager kernel inside.
    """
    if not model.spec.attn_output_gate:
        yield
        return
    owner, seen = model.module(model.spec.attn, layer), []
    home = model.device

    def keep_mix(output: torch.Tensor) -> None:  # [B, T, H, d_head]
        seen.append(output.detach().to(home))

    def gate(z: torch.Tensor) -> None:  # [B, T, H, d_head]
        mix = seen.pop()
        dtype = compute_dtype(z.dtype)
        z, mix = z.to(dtype), mix.to(dtype).reshape(*z.shape[:-1], -1)
        mix = torch.nn.functional.pad(mix, (0, z.shape[-1] - mix.shape[-1]))  # z of narrower heads is padded
        fn(torch.where(mix != 0, z / torch.where(mix != 0, mix, 1), 0))

    entries = _OUTPUT_HOOKS.setdefault(owner, [])
    entries.append(keep_mix)
    try:
        with eager_attention(model), site_hook(model, Site(layer, "z"), gate):
            yield
    finally:
        entries.remove(keep_mix)


def _run_prob_hooks(module: nn.Module, probs: torch.Tensor) -> torch.Tensor:
    # editors (knockouts) run before readers, so readers see what the model really used
    for _, fn in sorted(_PROB_HOOKS.get(module, ()), key=lambda entry: not entry[0]):
        new = fn(probs)
        probs = probs if new is None else new
    return probs


def eager_attention(model: Model) -> contextlib.AbstractContextManager:
    """Run the model with recallscope's eager kernel inside the context (no-op for models whose
    attention does not go through the ``AttentionInterface``: they are eager already).
    """
    if not model.spec.attention_interface:
        return contextlib.nullcontext()
    return attention_kernel(model.hf_model, EAGER_IMPLEMENTATION)


class _SoftmaxTap(TorchFunctionMode):
    """While one inline attention module runs: every softmax output of attention probabilities,
    ``[B, H, Q, K]`` (or ``[B·H, Q, K]``, XGLM), goes through that module's probability hooks.
    """

    def __init__(self, module: nn.Module, n_heads: int) -> None:
        super().__init__()
        self.module, self.n_heads = module, n_heads

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if (
            func not in SOFTMAXES
            or not isinstance(out, torch.Tensor)
            or not is_probabilities(out, self.n_heads)
        ):
            return out
        if out.dim() == 4:
            return _run_prob_hooks(self.module, out)
        probs = out.view(-1, self.n_heads, *out.shape[1:])  # [B·H, Q, K] -> [B, H, Q, K]
        return _run_prob_hooks(self.module, probs).reshape(out.shape)


def _install_tap(module: nn.Module, n_heads: int) -> Any:
    """Forward hooks that put a :class:`_SoftmaxTap` around ``module``'s forward; returns a remover."""
    taps: list[_SoftmaxTap] = []

    def enter(mod, args, kwargs):
        taps.append(_SoftmaxTap(mod, n_heads))
        taps[-1].__enter__()

    def leave(mod, args, kwargs, output):
        taps.pop().__exit__(None, None, None)

    handles = [
        module.register_forward_pre_hook(enter, with_kwargs=True),
        module.register_forward_hook(leave, with_kwargs=True, always_call=True),
    ]
    return lambda: [h.remove() for h in handles]


def _on_home_device(model: Model, fn: Callable) -> Callable:
    """``fn`` seeing the probabilities on the model's input device (as every site hook does), its
    new probabilities put back where the layer runs (a device map may place layers elsewhere).
    """
    home = model.device

    def call(probs: torch.Tensor) -> torch.Tensor | None:
        new = fn(probs.to(home))
        return None if new is None else new.to(probs.device)

    return call


@contextlib.contextmanager
def _prob_hook(model: Model, layer: int, fn: Callable, *, edits: bool) -> Iterator[None]:
    """Call ``fn(probs [B, H, Q, K])`` in ``layer``'s attention (may return new probs)."""
    owner = model.module(model.spec.attn, layer)
    entry = (edits, _on_home_device(model, fn))
    entries = _PROB_HOOKS.setdefault(owner, [])
    entries.append(entry)
    try:
        if model.spec.attention_interface:
            with eager_attention(model):
                yield
        else:  # inline attention: one softmax tap per module, shared by its hooks
            if owner not in _TAPS:
                _TAPS[owner] = _install_tap(owner, model.n_heads)
            yield
    finally:
        entries.remove(entry)
        if not entries and owner in _TAPS:
            _TAPS.pop(owner)()


def pattern_hook(model: Model, layer: int, fn: Callable) -> contextlib.AbstractContextManager:
    """Context manager calling ``fn(pattern [B, n_heads, Q, K])`` each forward (a read, or a write
    if ``fn`` returns new probabilities). Runs eager attention inside the context.
    """
    return _prob_hook(model, layer, fn, edits=False)


def edit_pattern(model: Model, layer: int, fn: Callable) -> contextlib.AbstractContextManager:
    """Context manager calling ``fn(pattern [B, n_heads, Q, K])`` each forward to *edit* the
    probabilities (return new ones, or None to keep them). Edits run before every
    :func:`pattern_hook` reader, so readers see what the model used. Runs eager attention inside.
    """
    return _prob_hook(model, layer, fn, edits=True)
