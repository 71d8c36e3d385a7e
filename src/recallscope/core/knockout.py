"""Attention-edge knockout.

Two ways to stop a query position ``dst`` from reading a key position ``src`` (``methods.md`` §5.5):

- ``pre_softmax`` (default; Geva et al.): the score is set to −∞ before the softmax, so the
  remaining probabilities renormalize. Implemented by editing the ``attention_mask`` keyword that
  transformers hands to each attention module, so SDPA (and eager) kernels stay in use.
- ``post_softmax_zero`` (Yan & Jia): the probability is set to 0 after the softmax and the rest is
  *not* renormalized. This needs the probabilities, so those forwards run eager attention.

A knockout may differ per batch row (``rows``), which turns a whole sweep of windows and position
sets into one batched forward::

    kos = [Knockout(layers=range(w, w + 9), src=subject, dst=[-1], rows=[i]) for i, w in enumerate(starts)]
    with block_attention(model, kos):
        logits = forward(model, batch.repeat(len(starts)))
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from recallscope.core.attention import MASKABLE, eager_attention, edit_pattern
from recallscope.core.hooks import module_hook
from recallscope.errors import KnockoutError
from recallscope.models.model import Model

__all__ = ["Knockout", "KnockoutMode", "block_attention", "compile_knockouts"]

KnockoutMode = Literal["pre_softmax", "post_softmax_zero"]


@dataclass(frozen=True)
class Knockout:
    """Query positions ``dst`` may not attend to key positions ``src`` in ``layers``.

    Positions are indices into the (left-padded) sequence; negative ones count from the end, so
    ``dst=(-1,)`` is the last prompt token of every row. ``heads`` (query heads) and ``rows``
    (batch rows) default to all.
    """

    layers: Sequence[int]
    src: Sequence[int]
    dst: Sequence[int] = (-1,)
    heads: Sequence[int] | None = None
    rows: Sequence[int] | None = None

    def __post_init__(self) -> None:
        for name in ("layers", "src", "dst", "heads", "rows"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(int(v) for v in value))


def compile_knockouts(
    knockouts: Iterable[Knockout], layer: int, shape: tuple[int, int, int, int]
) -> torch.Tensor | None:
    """Boolean ``blocked [B, 1|H, Q, K]`` for ``layer`` (True = edge removed), or None if unused.

    ``shape`` is ``(B, H, Q, K)``.
    """
    active = [ko for ko in knockouts if layer in ko.layers]
    return _compile(tuple(active), shape) if active else None


def _compile(active: tuple[Knockout, ...], shape: tuple[int, int, int, int]) -> torch.Tensor:
    batch, n_heads, n_query, n_key = shape
    per_head = any(ko.heads is not None for ko in active)
    sizes = (batch, n_heads if per_head else 1, n_query, n_key)
    cells: list[tuple[int, ...]] = []
    for ko in active:  # plain Python ints: one tensor write at the end
        axes = [
            _positions(v, size, what)
            for v, size, what in zip(
                (ko.rows, ko.heads, ko.dst, ko.src), sizes, ("rows", "heads", "dst", "src"), strict=True
            )
        ]
        cells.extend(itertools.product(*axes))
    blocked = torch.zeros(sizes, dtype=torch.bool)
    if cells:
        blocked[tuple(torch.tensor(cells, dtype=torch.long).T)] = True
    return blocked


def _positions(values: Sequence[int] | None, size: int, what: str) -> Sequence[int]:
    if values is None:
        return range(size)
    if any(not -size <= v < size for v in values):
        raise KnockoutError(f"knockout {what} {list(values)} out of range for size {size}")
    return [v % size for v in values]


@contextlib.contextmanager
def block_attention(
    model: Model,
    knockouts: Sequence[Knockout] | Mapping[int, torch.Tensor],
    mode: KnockoutMode = "pre_softmax",
) -> Iterator[None]:
    """Remove attention edges inside the context.

    Args:
        model: the model.
        knockouts: a list of :class:`Knockout`, or precompiled masks ``{layer: blocked}`` with
            ``blocked`` a boolean tensor broadcastable to ``[B, n_heads, Q, K]`` (True = removed).
        mode: ``"pre_softmax"`` (−∞ before softmax, renormalized) or ``"post_softmax_zero"``
            (probability zeroed after softmax, not renormalized).

    Raises:
        KnockoutError: a pre-softmax knockout would leave a query with no key to attend to.
    """
    if mode not in ("pre_softmax", "post_softmax_zero"):
        raise KnockoutError(f"unknown knockout mode {mode!r}; use 'pre_softmax' or 'post_softmax_zero'")
    if isinstance(knockouts, Mapping):
        layers = sorted(knockouts)
        masks: Callable = lambda layer, shape: knockouts[layer]  # noqa: E731
    else:
        knockouts = list(knockouts)
        layers = sorted({layer for ko in knockouts for layer in ko.layers})
        active = {layer: tuple(ko for ko in knockouts if layer in ko.layers) for layer in layers}
        cache: dict = {}  # layers with the same active knockouts share one mask

        def masks(layer, shape):
            key = (tuple(map(id, active[layer])), shape)
            if key not in cache:
                cache[key] = _compile(active[layer], shape)
            return cache[key]

    for layer in layers:
        model.check_layer(layer)
    by_mask = mode == "pre_softmax" and model.spec.attention_interface
    with contextlib.ExitStack() as stack:
        if by_mask and model.attn_implementation not in MASKABLE:
            stack.enter_context(eager_attention(model))  # flash/flex kernels take no dense mask
        for layer in layers:
            if by_mask:
                hook = _mask_prehook(model, layer, masks)
                stack.enter_context(module_hook(model.module(model.spec.attn, layer), hook, "pre"))
            else:  # post-softmax zero, or pre-softmax as a renormalization of inline softmaxes
                edit = _zero_probs(model, layer, masks, renormalize=mode == "pre_softmax")
                stack.enter_context(edit_pattern(model, layer, edit))
        yield


def _zero_probs(model: Model, layer: int, masks: Callable, *, renormalize: bool) -> Callable:
    """Zero the blocked probabilities; with ``renormalize`` divide by what is left, which equals a
    softmax whose blocked scores were −∞.
    """

    def edit(probs: torch.Tensor) -> torch.Tensor:
        blocked = masks(layer, (probs.shape[0], model.n_heads, probs.shape[2], probs.shape[3]))
        blocked = blocked.to(probs.device)
        kept = probs.masked_fill(blocked, 0.0)
        if not renormalize:
            return kept
        _check_not_empty(probs > 0, kept > 0, layer)
        total = kept.sum(-1, keepdim=True)
        touched = blocked.any(-1, keepdim=True) & (total > 0)  # other rows stay bit-identical
        return torch.where(touched, kept / torch.where(touched, total, torch.ones_like(total)), probs)

    return edit


def _mask_prehook(model: Model, layer: int, masks: Callable) -> Callable:
    def pre(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        batch, n_query = hidden.shape[:2]
        mask = kwargs.get("attention_mask")
        n_key = n_query if mask is None else mask.shape[-1]
        blocked = masks(layer, (batch, model.n_heads, n_query, n_key)).to(hidden.device)
        if mask is None:  # SDPA's is_causal fast path: no padding, no active sliding window
            mask = torch.ones(n_query, n_key, dtype=torch.bool, device=hidden.device).tril()[None, None]
        if mask.dtype == torch.bool:
            allowed, new = mask, mask & ~blocked
        else:
            allowed = mask > torch.finfo(mask.dtype).min / 2
            new = mask.masked_fill(blocked, torch.finfo(mask.dtype).min)
        _check_not_empty(allowed, allowed & ~blocked, layer)
        return args, {**kwargs, "attention_mask": new}

    return pre


def _check_not_empty(before: torch.Tensor, after: torch.Tensor, layer: int) -> None:
    """A query that could attend somewhere must still attend somewhere (else softmax is NaN)."""
    emptied = before.any(-1) & ~after.any(-1)
    if emptied.any():
        row, head, query = (int(i) for i in emptied.nonzero()[0])
        raise KnockoutError(
            f"pre-softmax knockout in layer {layer} blocks every key of query position {query} "
            f"(batch row {row}, head {head}): softmax over nothing is undefined. Keep at least one "
            "source unblocked (e.g. the query position itself), or use mode='post_softmax_zero'"
        )
