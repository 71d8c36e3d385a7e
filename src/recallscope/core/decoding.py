"""Decoding at the last position, shared by methods: the dtype activations are kept in,
last-position caches, and the frozen-scale logits of tracked tokens (``methods.md`` §2.2) with
their tidy frame.

::

    acts, final = last_position_cache(model, batch, sites)   # {site: [B, ...]}, [B, d_model]
    head = FrozenHead.from_final(model, final)
    logits = decode_tracked(head, vectors, tracked.ids)       # [B, ..., n]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from recallscope.core.cache import run_with_cache
from recallscope.core.dtypes import compute_dtype, upcast
from recallscope.core.steps import Tracked
from recallscope.core.subvalues import FrozenHead
from recallscope.core.tokens import PromptBatch
from recallscope.errors import RecallscopeError
from recallscope.models.model import Model
from recallscope.models.sites import Site

__all__ = [
    "TrackedInfo",
    "work_dtype",
    "last_position",
    "last_position_cache",
    "decode_tracked",
    "tracked_frame",
    "choose_targets",
    "logit_minus_mean",
]


@dataclass(frozen=True)
class TrackedInfo:
    """The tracked tokens of ``F`` facts as plain data (what results keep of a :class:`Tracked`).

    Attributes:
        names: ``[n]`` ``subject``, ``answer_1`` … ``answer_k``.
        ids: ``[F, n]`` token ids.
        roles: ``[F][n]`` ``subject`` / ``previous`` / ``current`` / ``future``.
        steps: ``[F]`` answer step of each fact.
        tokens: ``[F][n]`` token strings.
    """

    names: list[str]
    ids: np.ndarray
    roles: list[list[str]]
    steps: np.ndarray
    tokens: list[list[str]]

    @classmethod
    def from_tracked(cls, tracked: Tracked) -> TrackedInfo:
        return cls(
            names=list(tracked.names),
            ids=tracked.ids.numpy(),
            roles=[list(r) for r in tracked.roles],
            steps=tracked.steps.numpy(),
            tokens=[list(t) for t in tracked.tokens],
        )


def work_dtype(model: Model) -> torch.dtype:
    """The dtype activations are kept in: the model's, at least float32."""
    return compute_dtype(model.dtype)


def last_position(
    model: Model, batch: PromptBatch, sites: Sequence[Site], *, dtype: torch.dtype | None = None
) -> dict[Site, torch.Tensor]:
    """One forward keeping ``sites`` at the last position ``N``: ``{site: [B, ...]}`` (the site's
    shape without the position axis), in ``dtype`` (default: the model's).
    """
    cache = run_with_cache(model, batch, list(sites), positions=[-1], dtype=dtype)
    return {site: cache[site][:, 0] for site in sites}


def last_position_cache(model: Model, batch: PromptBatch, sites: Sequence[Site]) -> tuple[dict, torch.Tensor]:
    """:func:`last_position` of ``sites`` and of the final residual (``resid_post`` of the last
    block, ``[B, d_model]``), in :func:`work_dtype`.
    """
    final = Site(model.n_layers - 1, "resid_post")
    acts = last_position(model, batch, [*sites, final], dtype=work_dtype(model))
    return {site: acts[site] for site in sites}, acts[final]


def decode_tracked(head: FrozenHead, vectors: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Frozen-scale logits of each row's tracked tokens for vectors read at ``N``.

    Args:
        head: the frozen head of the ``B`` rows.
        vectors: ``[B, ..., d_model]`` components of each row.
        ids: ``[B, n]`` tracked token ids.

    Returns:
        ``[B, ..., n]``; with ``head.bias`` its constant logits of the tokens are added.
    """
    u = head.token_covectors(ids)  # [B, n, d]
    flat = vectors.to(u.device, u.dtype).reshape(len(vectors), -1, vectors.shape[-1])  # [B, M, d]
    logits = torch.einsum("bmd,bnd->bmn", flat, u).reshape(*vectors.shape[:-1], u.shape[1])
    if head.bias is not None:
        constant = head.bias[ids.to(head.bias.device).long()]  # [B, n]
        logits = logits + constant.view(len(ids), *[1] * (vectors.dim() - 2), -1)
    return logits


def tracked_frame(
    fact_ids: Sequence[str], tracked: TrackedInfo, values: np.ndarray, axes: Mapping[str, Sequence]
) -> pd.DataFrame:
    """A tidy frame of ``values [F, *axes, n]`` (one row per fact × axes × tracked token).

    Columns ``fact_id``, ``step``, the ``axes`` (labelled by their sequences), ``tracked``, ``role``,
    ``token`` and ``logit``.
    """
    index = np.indices(values.shape).reshape(values.ndim, -1)
    f, t = index[0], index[-1]
    columns: dict[str, np.ndarray] = {
        "fact_id": np.array(fact_ids, dtype=object)[f],
        "step": np.asarray(tracked.steps, dtype=np.int64)[f],
    }
    for i, (name, labels) in enumerate(axes.items()):
        columns[name] = np.asarray(list(labels))[index[1 + i]]
    columns["tracked"] = np.array(tracked.names, dtype=object)[t]
    columns["role"] = _object_grid(tracked.roles)[f, t]
    columns["token"] = _object_grid(tracked.tokens)[f, t]
    columns["logit"] = values.reshape(-1)
    return pd.DataFrame(columns)


def _object_grid(rows: Sequence[Sequence[str]]) -> np.ndarray:
    """``[F][n]`` strings as an ``[F, n]`` object array (never splits strings into characters)."""
    grid = np.empty((len(rows), len(rows[0]) if rows else 0), dtype=object)
    for i, row in enumerate(rows):
        grid[i, :] = list(row)
    return grid


def choose_targets(batch, logits: torch.Tensor, target: str) -> torch.Tensor:
    """The token each row is scored on: the model's clean ``top1`` or the ``gold`` answer's first.

    Args:
        batch: the :class:`~recallscope.core.tokens.PromptBatch` (``target_ids`` for ``gold``).
        logits: clean last-position logits ``[B, d_vocab]``.
        target: ``"top1"`` or ``"gold"``.

    Returns:
        ``[B]`` token ids on the CPU.
    """
    if target == "top1":
        return logits.argmax(-1).cpu()
    if target != "gold":
        raise RecallscopeError(f"target must be 'top1' or 'gold', got {target!r}")
    if batch.target_ids is None:
        raise RecallscopeError("target='gold' needs a batch with targets (facts have answers)")
    return batch.target_ids.long().cpu()


def logit_minus_mean(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Lv et al.'s ``iw`` metric (``methods.md`` L2): ``ℓ[target] − mean_v ℓ[v]``.

    Args:
        logits: ``[B, d_vocab]``.
        targets: ``[B]`` token ids.

    Returns:
        ``[B]`` in at least float32.
    """
    logits = upcast(logits)
    picked = logits.gather(-1, targets.to(logits.device).long()[:, None])[:, 0]
    return picked - logits.mean(-1)
