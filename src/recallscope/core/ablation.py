"""Zeroing subvalues at the last position in batched forwards, and the target's metrics after it
(Yu & Ananiadou's neuron ablation, ``methods.md`` Y&A-7).

A :class:`Selection` lists the subvalues of one row to zero at the last position ``N``: FFN neurons
``(ℓ, k)`` (``mlp_post[ℓ]`` at ``N`` set to 0) and attention units ``(ℓ, h, n, j)``
(``α_{N,j} v_{j,kv(h),n}``, times the output gate if the attention has one, subtracted from ``z[ℓ]``
at ``N``, read live in the same intervened forward). :func:`ablate` applies any per-row selections,
every row of a chunk in one forward, and returns :func:`target_metrics`; :func:`top_ranked` picks
the top-``k`` scored subvalues (ties by the lower flat index, so smaller budgets select prefixes).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from recallscope.core.attention import output_gate_hook, pattern_hook
from recallscope.core.cache import forward
from recallscope.core.dtypes import upcast
from recallscope.core.hooks import site_hook
from recallscope.core.tokens import PromptBatch
from recallscope.errors import RecallscopeError
from recallscope.models.model import Model
from recallscope.models.sites import Site

__all__ = ["METRICS", "Selection", "ablate", "target_metrics", "top_ranked"]

METRICS = ("mrr", "prob", "logprob")


@dataclass(frozen=True)
class Selection:
    """Subvalues zeroed at the last position of one row.

    Attributes:
        ffn: ``[n, 2]`` int ``(layer, neuron)``.
        attn: ``[m, 4]`` int ``(layer, head, dim, src)``, ``src`` counted from the start of the
            real prompt (no padding).
    """

    ffn: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.int64))
    attn: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), dtype=np.int64))

    def __post_init__(self) -> None:
        for name, width in (("ffn", 2), ("attn", 4)):
            value = np.asarray(getattr(self, name), dtype=np.int64).reshape(-1, width)
            object.__setattr__(self, name, np.unique(value, axis=0))

    def __len__(self) -> int:
        return len(self.ffn) + len(self.attn)


def target_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, np.ndarray]:
    """Metrics of ``targets [R]`` in ``logits [R, d_vocab]``: float64 ``mrr``, ``prob``, ``logprob`` and
    int64 ``rank`` (0 = top; tokens with a strictly larger logit), each ``[R]``.
    """
    logits = upcast(logits)
    targets = torch.as_tensor(targets, device=logits.device).long()
    at = logits.gather(1, targets[:, None])
    rank = (logits > at).sum(-1, dtype=torch.int32).long()  # an int32 count: no [R, V] int64 buffer
    logprob = (at[:, 0] - logits.logsumexp(-1)).double()
    return {
        "mrr": (1.0 / (rank + 1).double()).cpu().numpy(),
        "prob": logprob.exp().cpu().numpy(),
        "logprob": logprob.cpu().numpy(),
        "rank": rank.cpu().numpy(),
    }


@torch.no_grad()
def ablate(
    model: Model,
    batch: PromptBatch,
    selections: Sequence[Selection],
    targets: torch.Tensor | Sequence[int],
    *,
    rows: Sequence[int] | None = None,
    max_batch_rows: int = 64,
) -> dict[str, np.ndarray]:
    """Zero each selection at the last position and read its row's target.

    Args:
        model: the model.
        batch: the prompts (left-padded).
        selections: ``R`` selections, zeroed together per ablated row.
        targets: ``[B]`` token id of each prompt of ``batch``.
        rows: ``[R]`` the prompt each selection is applied to (default: selection ``i`` → prompt ``i``).
        max_batch_rows: ablated rows per forward.

    Returns:
        :func:`target_metrics` of the ``R`` ablated rows.
    """
    rows = np.arange(len(batch)) if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
    if len(rows) != len(selections):
        raise RecallscopeError(f"got {len(selections)} selections for {len(rows)} rows; give one per row")
    targets = torch.as_tensor(targets).long().cpu()
    lengths = batch.attention_mask.sum(-1).tolist()
    for row, selection in zip(rows.tolist(), selections, strict=True):
        _check_selection(model, selection, lengths[row])
    parts = []
    for begin in range(0, len(rows), max_batch_rows):
        part = rows[begin : begin + max_batch_rows]
        sub = batch.select(part)
        ffn, attn = _layer_indices(model, sub, selections[begin : begin + max_batch_rows])
        with _zeroing(model, ffn, attn):  # one part's logits held at a time
            parts.append(target_metrics(forward(model, sub), targets[part]))
    if not parts:
        return {name: np.zeros(0) for name in (*METRICS, "rank")}
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def _check_selection(model: Model, selection: Selection, length: int) -> None:
    """Raise if a selected subvalue does not exist in a prompt of ``length`` real tokens."""
    for name, bounds in (
        ("ffn", (model.n_layers, model.d_mlp)),
        ("attn", (model.n_layers, model.n_heads, model.d_head, length)),
    ):
        index = getattr(selection, name)
        if len(index) and ((index < 0).any() or (index >= np.array(bounds)).any()):
            fields = "(layer, neuron)" if name == "ffn" else "(layer, head, dim, src)"
            raise RecallscopeError(
                f"{name} selection out of range: each {fields} must satisfy 0 ≤ value < {bounds} "
                f"(src counts real prompt tokens from the start, without padding)"
            )


def _layer_indices(model: Model, batch: PromptBatch, selections: Sequence[Selection]) -> tuple[dict, dict]:
    """Per layer, ``(row, neuron)`` and ``(row, head, dim, padded src)`` index tensors of the chunk."""
    pads = batch.pad_lengths.numpy()
    ffn_rows, attn_rows = [], []
    for r, selection in enumerate(selections):
        ffn_rows.append(np.column_stack([np.full(len(selection.ffn), r), selection.ffn]))
        attn = selection.attn + np.array([0, 0, 0, pads[r]])
        attn_rows.append(np.column_stack([np.full(len(attn), r), attn]))
    ffn = np.concatenate(ffn_rows).reshape(-1, 3)
    attn = np.concatenate(attn_rows).reshape(-1, 5)
    return _by_layer(ffn), _by_layer(attn)


def _by_layer(index: np.ndarray) -> dict[int, torch.Tensor]:
    """``[n, 1 + 1 + m]`` rows ``(row, layer, ...)`` → layer → ``[1 + m, n_layer]`` index tensor."""
    layers = index[:, 1]
    return {
        int(layer): torch.as_tensor(np.delete(index[layers == layer], 1, axis=1).T)
        for layer in np.unique(layers)
    }


@contextlib.contextmanager
def _zeroing(model: Model, ffn: dict, attn: dict) -> Iterator[None]:
    """Hooks zeroing ``ffn[layer] = (row, neuron)`` and ``attn[layer] = (row, head, dim, src)`` at ``N``."""
    with contextlib.ExitStack() as stack:
        for layer, (row, neuron) in ffn.items():
            stack.enter_context(site_hook(model, Site(layer, "mlp_post"), _zero_neurons(row, neuron)))
        for layer, index in attn.items():
            _remove_units(model, layer, index, stack)
        yield


def _zero_neurons(row: torch.Tensor, neuron: torch.Tensor):
    def edit(act: torch.Tensor) -> torch.Tensor:  # [r, T, d_mlp]
        act = act.clone()
        act[row.to(act.device), -1, neuron.to(act.device)] = 0
        return act

    return edit


def _remove_units(model: Model, layer: int, index: torch.Tensor, stack: contextlib.ExitStack) -> None:
    """Subtract ``α_{N,j} v_{j,kv(h),n}`` (times the output gate ``g_{N,h,n}``, if the attention
    has one) of each unit from ``z[layer]`` at ``N``, read live.
    """
    live: dict[str, torch.Tensor] = {}

    def keep_v(v: torch.Tensor) -> None:  # [r, T, H_kv, d_head]
        live["v"] = v

    def keep_pattern(pattern: torch.Tensor) -> None:  # [r, H, T, T]
        live["alpha"] = pattern[:, :, -1]

    def edit_z(z: torch.Tensor) -> torch.Tensor:  # [r, T, H, d_head]
        row, head, dim, src = index.to(z.device)
        alpha = upcast(live["alpha"][row, head, src])
        value = upcast(live["v"][row, src, head // model.n_groups_at(layer), dim])
        contribution = alpha * value  # (a float32 pattern of a float64 model: BLOOM's softmax)
        if "gate" in live:
            contribution = contribution * upcast(live["gate"][row, -1, head, dim])
        removed = torch.zeros(z.shape[0], z.shape[2], z.shape[3], dtype=contribution.dtype, device=z.device)
        removed.index_put_((row, head, dim), contribution, accumulate=True)
        z = z.clone()
        z[:, -1] = (upcast(z[:, -1]) - removed).to(z.dtype)
        live.clear()
        return z

    stack.enter_context(site_hook(model, Site(layer, "v"), keep_v))
    stack.enter_context(pattern_hook(model, layer, keep_pattern))
    stack.enter_context(output_gate_hook(model, layer, lambda g: live.update(gate=g)))  # reads z first
    stack.enter_context(site_hook(model, Site(layer, "z"), edit_z))


def top_ranked(score: np.ndarray, k: int) -> np.ndarray:
    """Flat indices of the ``k`` largest non-NaN entries of ``score``, best first (ties: lower index)."""
    flat = score.reshape(-1)
    index = np.flatnonzero(~np.isnan(flat))
    values = flat[index]
    if k <= 0:
        return index[:0]
    if k < len(index):
        kth = np.partition(values, len(values) - k)[len(values) - k]  # the k-th largest value
        keep = values >= kth
        index, values = index[keep], values[keep]
    order = np.lexsort((index, -values))
    return index[order][:k]
