"""Log-probability attribution kernels under a frozen head (Yu & Ananiadou, ``methods.md`` §3).

The parts of one chunk of facts, read at the last position ``N`` through the frozen-scale head
(:class:`~recallscope.core.subvalues.FrozenHead`), each scored by its log-probability increase over a
baseline residual (``x^ℓ`` for attention parts, ``r^ℓ = x^ℓ + a^ℓ`` for FFN parts)::

    logits, cap = capture_last(model, batch, levels)          # one forward, every site at N
    head = FrozenHead.from_final(model, cap["final"])
    layer_level(head, cap, targets)                           # Y&A-1: sublayers
    head_level(model, head, cap, targets, real, levels, n)    # Y&A-2 / Y&A-3: heads, positions
    subvalue_level(model, head, cap, targets, real, "neuron", "top", n_top)   # Y&A-4 / Y&A-5

Neurons and attention units get cheap exact bounds (:func:`~recallscope.core.subvalues.increase_bounds`)
and exact scores only where they can be among a row's top or bottom ``n_top`` (``exact="top"``) or
everywhere (``"all"``). Also the vocabulary side of the value vectors: their top / bottom tokens
(:func:`value_tokens`), norms and the targets' ranks in their directions (:func:`value_stats`).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from recallscope.core.attention import output_gate_hook
from recallscope.core.cache import forward
from recallscope.core.dtypes import compute_dtype, upcast
from recallscope.core.hooks import site_hook
from recallscope.core.subvalues import (
    FrozenHead,
    Subvalues,
    attn_subvalues,
    chunked_directions,
    direction_ranges,
    ffn_subvalues,
    increase_bounds,
    rank1_increase,
    select_candidates,
    value_vectors,
    vector_increase,
)
from recallscope.core.tokens import PromptBatch
from recallscope.core.vocab import READOUT_ELEMS, decode_tokens
from recallscope.models.model import Model
from recallscope.models.sites import Site

__all__ = [
    "WORK_ELEMS",
    "capture_last",
    "logprob_at",
    "layer_level",
    "head_level",
    "head_parts",
    "top_heads",
    "position_scores",
    "cached_subvalues",
    "subvalue_level",
    "exact_candidates",
    "exact_scores",
    "value_tokens",
    "value_stats",
    "target_ranks",
]

WORK_ELEMS = READOUT_ELEMS
"""Elements of a ``[·, d_vocab]`` work buffer (directions, logits of added vectors): as many as one
readout chunk of :func:`~recallscope.core.vocab.project_to_vocab`."""


def capture_last(model: Model, batch: PromptBatch, levels: Sequence[str]) -> tuple[torch.Tensor, dict]:
    """Clean logits ``[B, V]`` and the cached sites (at least float32).

    ``resid_pre``, ``attn_out``, ``mlp_out``, ``mlp_post`` at ``N`` stacked ``[B, L, ·]``; ``final``
    ``[B, d]`` (``resid_post`` of the last block); per layer ``pattern`` (the last query row
    ``[B, H, T]``) and ``v [B, T, H_kv, Dh]``.
    """
    levels = set(levels)
    names = ["resid_pre", "attn_out", "mlp_out"] + (["mlp_post"] if "neuron" in levels else [])
    attention = bool({"head", "position", "attn_unit"} & levels)
    saved: dict = {}

    def keep(key, pick):
        def save(act: torch.Tensor) -> None:
            act = pick(act.detach())
            saved[key] = upcast(act)

        return save

    last = lambda act: act[:, -1]  # noqa: E731
    with contextlib.ExitStack() as stack:
        for layer in range(model.n_layers):
            for name in names:
                stack.enter_context(site_hook(model, Site(layer, name), keep((name, layer), last)))
            if attention:
                row = lambda act: act[:, :, -1]  # noqa: E731
                stack.enter_context(site_hook(model, Site(layer, "pattern"), keep(("pattern", layer), row)))
                stack.enter_context(site_hook(model, Site(layer, "v"), keep(("v", layer), lambda act: act)))
                stack.enter_context(output_gate_hook(model, layer, keep(("gate", layer), last)))
        final = Site(model.n_layers - 1, "resid_post")
        stack.enter_context(site_hook(model, final, keep("final", last)))
        logits = upcast(forward(model, batch))
    cap = {name: torch.stack([saved[(name, layer)] for layer in range(model.n_layers)], 1) for name in names}
    cap["final"] = saved["final"]
    if attention:
        cap["pattern"] = [saved[("pattern", layer)] for layer in range(model.n_layers)]
        cap["v"] = [saved[("v", layer)] for layer in range(model.n_layers)]
        cap["gate"] = [saved.get(("gate", layer)) for layer in range(model.n_layers)]  # None: ungated
    cap["resid_mid"] = cap["resid_pre"] + cap["attn_out"]
    return logits, cap


def logprob_at(head: FrozenHead, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log p(t | x)`` for residuals ``x [B, n, d]`` → ``[B, n]`` (one ``[B, V]`` at a time)."""
    out = []
    for i in range(x.shape[1]):
        logits = head.logits(x[:, i])  # [B, V]
        out.append(logits.gather(-1, targets[:, None])[:, 0] - logits.logsumexp(-1))
    return torch.stack(out, 1)


def layer_level(head: FrozenHead, cap: dict, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Y&A-1: log-probs of ``x^ℓ``, ``r^ℓ`` and the attention / FFN increases."""
    pre = logprob_at(head, torch.cat([cap["resid_pre"], cap["final"][:, None]], 1), targets)  # [B, L+1]
    mid = logprob_at(head, cap["resid_mid"], targets)  # [B, L]
    after_ffn = logprob_at(head, cap["resid_mid"] + cap["mlp_out"], targets)
    return {
        "logprob_resid_pre": pre,
        "logprob_resid_mid": mid,
        "attn_score": mid - pre[:, :-1],
        "ffn_score": after_ffn - mid,
    }


def _attn(model: Model, cap: dict, layer: int) -> Subvalues:
    return attn_subvalues(model, layer, cap["pattern"][layer], cap["v"][layer], cap["gate"][layer])


def head_level(model, head, cap, targets, real, levels, position_heads) -> dict[str, torch.Tensor]:
    """Y&A-2 / Y&A-3: head outputs ``[B, L, H]`` and per-position outputs ``[B, L, H, T]`` on ``x^ℓ``.

    ``levels`` holds ``head`` and / or ``position``; the position level decomposes each row's top
    ``position_heads`` heads by absolute increase (None: every head), NaN for the others.
    ``real [B, T]`` marks the prompt tokens (pads get 0).
    """
    chunk = max(1, WORK_ELEMS // (len(targets) * model.d_vocab))
    layers = range(model.n_layers)
    per_layer = [head_parts(model, cap, layer) for layer in layers]  # ([B,H,d], [B,H,T,d])
    heads = []
    for layer, (outputs, _) in zip(layers, per_layer, strict=True):
        before, after = vector_increase(head, cap["resid_pre"][:, layer], outputs, targets, chunk=chunk)
        heads.append(after - before[:, None])
    out = {"head_score": torch.stack(heads, 1)} if "head" in levels else {}
    if "position" in levels:
        chosen = top_heads(torch.stack(heads, 1), position_heads)  # [B, L, H]
        positions = [
            position_scores(
                head, cap["resid_pre"][:, layer], per_layer[layer][1], chosen[:, layer], targets, chunk
            )
            for layer in layers
        ]
        out["position_score"] = torch.where(real[:, None, None], torch.stack(positions, 1), 0.0)
        out["attention"] = torch.stack(cap["pattern"], 1) * real[:, None, None]
    return out


def head_parts(model: Model, cap: dict, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Head outputs ``[B, H, d]`` and their per-source parts ``[B, H, T, d]`` at ``N``."""
    sub = _attn(model, cap, layer)
    coeffs = sub.coeffs.unflatten(1, (model.n_heads, model.d_head))  # [B, H, Dh, T]
    values = sub.values.unflatten(0, (model.n_heads, model.d_head))  # [H, Dh, d]
    parts = torch.einsum("bhnt,hnd->bhtd", coeffs, values)
    return parts.sum(2), parts


def top_heads(scores: torch.Tensor, n: int | None) -> torch.Tensor:
    """``[B, L, H]`` bool: each row's ``n`` heads of largest ``|score|`` (all when ``n`` is None)."""
    flat = scores.flatten(1)
    if n is None or n >= flat.shape[1]:
        return torch.ones_like(scores, dtype=torch.bool)
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    chosen.scatter_(1, flat.abs().topk(n, dim=1).indices, True)
    return chosen.view_as(scores)


def position_scores(head, base, parts, chosen, targets, chunk) -> torch.Tensor:
    """``[B, H, T]``: increases of the chosen heads' parts ``parts [B, H, T, d]``; NaN elsewhere."""
    B, H, T, _ = parts.shape
    out = torch.full((B, H, T), float("nan"), dtype=parts.dtype, device=parts.device)
    n = int(chosen.sum(1).max())
    if n == 0:
        return out
    order = torch.argsort((~chosen).to(torch.int8), dim=1, stable=True)[:, :n]  # chosen heads first
    picked = parts[torch.arange(B, device=parts.device)[:, None], order]  # [B, n, T, d]
    before, after = vector_increase(head, base, picked.flatten(1, 2), targets, chunk=chunk)
    score = (after - before[:, None]).unflatten(1, (n, T))
    keep = chosen.gather(1, order)[..., None].expand(-1, -1, T)
    out.scatter_(1, order[..., None].expand(-1, -1, T), torch.where(keep, score, float("nan")))
    return out


def cached_subvalues(model: Model, cap: dict, kind: str, layer: int) -> Subvalues:
    """The ``neuron`` (FFN) or ``attn_unit`` subvalues of ``layer`` at ``N`` from a :func:`capture_last`."""
    if kind == "neuron":
        return ffn_subvalues(model, layer, cap["mlp_post"][:, layer])
    return _attn(model, cap, layer)


def subvalue_level(model, head, cap, targets, real, kind, exact, n_top) -> dict[str, torch.Tensor]:
    """Y&A-4 / Y&A-5: coefficients, bounds and exact scores of every neuron or attention unit.

    Arrays ``[B, L, K, R]`` (``R = 1`` for neurons, ``T`` source positions for units), reshaped at
    the end to ``[B, L, d_mlp]`` / ``[B, L, H, Dh, T]``. ``kind``: ``neuron`` or ``attn_unit``;
    ``exact``: ``top`` (exact scores only where a subvalue can be in the row's top or bottom
    ``n_top``, NaN elsewhere) or ``all``.
    """
    base = cap["resid_mid"] if kind == "neuron" else cap["resid_pre"]  # [B, L, d]
    ranges_kind = "ffn" if kind == "neuron" else "attn"
    parts: dict[str, list] = {"coeff": [], "logit": [], "upper": [], "lower": []}
    for layers, base_logits in grouped_logits(head, base):
        for j, layer in enumerate(layers):
            sub = cached_subvalues(model, cap, kind, layer)
            ranges = direction_ranges(model, ranges_kind, layer, sub.values)
            bounds = increase_bounds(head, base_logits[:, j], sub.coeffs, sub.values, targets, ranges)
            parts["coeff"].append(sub.coeffs)
            for name in ("logit", "upper", "lower"):
                parts[name].append(bounds[name])
    out = {name: torch.stack(values, 1) for name, values in parts.items()}  # [B, L, K, R]
    before = logprob_at(head, base, targets)  # [B, L]
    valid = torch.ones_like(out["coeff"], dtype=torch.bool)
    if kind == "attn_unit":
        valid = valid & real[:, None, None, :]
    if exact == "all":
        chosen = valid
    else:
        chosen = exact_candidates(out["upper"], out["lower"], before, valid, n_top)
    score = exact_scores(model, head, cap, base, targets, kind, out["coeff"], chosen)
    out["score"] = torch.where(valid, score, torch.zeros_like(score))
    out["prob"] = before.exp()[..., None, None] * torch.expm1(out["score"])
    prefix = "neuron" if kind == "neuron" else "unit"
    shape = (model.d_mlp,) if kind == "neuron" else (model.n_heads, model.d_head, -1)
    return {f"{prefix}_{name}": value.flatten(2).unflatten(2, shape) for name, value in out.items()}


def exact_candidates(upper, lower, before, valid, n: int) -> torch.Tensor:
    """``[B, L, K, R]`` bool: the valid subvalues that can be in the row's exact top / bottom ``n``.

    By log-prob increase (``upper``, ``lower`` ``[B, L, K, R]``) or by probability increase, whose
    bounds are ``p_ℓ·expm1(bound)`` (monotone per layer; ``p_ℓ = exp(before [B, L])``), taken in
    units of the row's largest ``p_ℓ`` so that the selection's slack means the same for both.
    """
    p = (before - before.amax(-1, keepdim=True)).double().exp()[..., None, None]  # [B, L, 1, 1], ≤ 1
    prob_upper = p * torch.expm1(upper.double())
    prob_lower = p * torch.expm1(lower.double())
    chosen = torch.zeros_like(valid)
    for b in range(valid.shape[0]):
        keep = valid[b]
        pick = select_candidates(upper[b][keep][None], lower[b][keep][None], n)[0]
        pick |= select_candidates(prob_upper[b][keep][None], prob_lower[b][keep][None], n)[0]
        chosen[b][keep] = pick
    return chosen


def grouped_logits(head: FrozenHead, base: torch.Tensor) -> Iterator[tuple[range, torch.Tensor]]:
    """``(layers, bs(base[:, layers]) [B, g, V])`` for groups of layers of ``base [B, L, d]``.

    One product with the unembedding per group (about ``WORK_ELEMS`` logits): a large vocabulary's
    ``[V, d]`` matrix is read once per group instead of once per layer.
    """
    B, L, _ = base.shape
    size = max(1, WORK_ELEMS // max(1, B * head.model.d_vocab))
    for start in range(0, L, size):
        layers = range(start, min(start + size, L))
        yield layers, head.logits(base[:, layers.start : layers.stop])


def exact_scores(model, head, cap, base, targets, kind, coeffs, chosen) -> torch.Tensor:
    """``[B, L, K, R]`` exact log-prob increases where ``chosen``, NaN elsewhere.

    Directions are built once per value vector with a chosen subvalue in any row, for up to
    ``WORK_ELEMS / V`` vectors of a group of layers (:func:`grouped_logits`) in one product; every
    row then scores only its own chosen subvalues (all of them at once where all are chosen).
    """
    score = torch.full_like(coeffs, float("nan"))
    per = max(1, WORK_ELEMS // model.d_vocab)  # value vectors whose directions are built at once
    wanted = [chosen[:, layer].any(-1).any(0).nonzero()[:, 0] for layer in range(model.n_layers)]
    for layers, base_logits in grouped_logits(head, base):
        if not any(len(wanted[layer]) for layer in layers):
            continue
        values = {layer: cached_subvalues(model, cap, kind, layer).values for layer in layers}
        pairs = [(j, layer, k) for j, layer in enumerate(layers) for k in wanted[layer].tolist()]
        for i in range(0, len(pairs), per):
            block = pairs[i : i + per]  # ordered by layer
            D = head.directions(torch.stack([values[layer][k] for _, layer, k in block]))  # [n, V]
            start = 0
            for (j, layer), run in itertools.groupby(block, key=lambda pair: pair[:2]):
                ks = torch.tensor([k for _, _, k in run])
                stop = start + len(ks)
                _score_layer(
                    score, base_logits[:, j], coeffs, head, chosen, targets, layer, ks, D[start:stop]
                )
                start = stop
    return score


def _score_layer(score, base_logits, coeffs, head, chosen, targets, layer, ks, D) -> None:
    """Write the exact scores of value vectors ``ks`` of ``layer`` (directions ``D [k, V]``) into
    ``score``, for each row's chosen subvalues.
    """
    mask = chosen[:, layer, ks]  # [B, k, R]
    u = coeffs[:, layer, ks] / head.scale[:, None, None]  # [B, k, R]
    if mask.all():
        score[:, layer, ks] = rank1_increase(base_logits, u, D, targets, chunk_elems=WORK_ELEMS)
        return
    per = max(1, WORK_ELEMS // base_logits.shape[-1])  # the row's subvalues scored at once
    for b in range(len(targets)):
        k, r = mask[b].nonzero(as_tuple=True)  # the row's chosen subvalues
        for j in range(0, len(k), per):
            kj, rj, row = k[j : j + per], r[j : j + per], slice(b, b + 1)
            exact = rank1_increase(
                base_logits[row], u[b, kj, rj][None, :, None], D[kj], targets[row], chunk_elems=WORK_ELEMS
            )
            score[b, layer, ks[kj], rj] = exact[0, :, 0]


def _chunked_directions(model: Model, vectors: torch.Tensor) -> Iterator[torch.Tensor]:
    """Directions ``D_w [k, V]`` of ``vectors [K, d]``, ``WORK_ELEMS / V`` vectors at a time."""
    return chunked_directions(model, vectors, max(1, WORK_ELEMS // model.d_vocab))


@torch.no_grad()
def value_tokens(model, kind, layers, units, n: int) -> tuple[list[list[str]], list[list[str]]]:
    """Top and bottom ``n`` tokens of ``D_w = W_U (γ ⊙ centre(w))`` for value vectors ``(layer, unit)``."""
    top = np.zeros((len(layers), n), dtype=np.int64)
    bottom = np.zeros((len(layers), n), dtype=np.int64)
    if n and len(layers):
        for layer in np.unique(layers):
            rows = np.nonzero(layers == layer)[0]
            wanted, inverse = np.unique(units[rows], return_inverse=True)
            sublayer = "mlp" if kind == "neuron" else "attn"
            values = value_vectors(model, sublayer, int(layer))[torch.as_tensor(wanted)]
            high, low = [], []
            for D in _chunked_directions(model, values):
                high.append(D.topk(n, -1).indices.cpu().numpy())
                low.append((-D).topk(n, -1).indices.cpu().numpy())
            top[rows] = np.concatenate(high)[inverse]
            bottom[rows] = np.concatenate(low)[inverse]
    decode = lambda ids: decode_tokens(model, torch.as_tensor(ids)) if len(ids) else []  # noqa: E731
    return decode(top), decode(bottom)


@torch.no_grad()
def value_stats(model: Model, targets: np.ndarray, ranks: bool) -> dict[str, np.ndarray]:
    """Value-vector norms ``ffn_norm [L, d_mlp]`` and ``attn_norm [L, H, d_head]``.

    With ``ranks`` also the targets' ranks in ``±D_w``: ``ffn_rank_pos`` / ``ffn_rank_neg``
    ``[F, L, d_mlp]`` and ``attn_rank_pos`` / ``attn_rank_neg`` ``[F, L, H, d_head]``.
    """
    dtype, device = compute_dtype(model.dtype), model.W_U.device
    targets = torch.as_tensor(targets, device=device).long()
    out: dict[str, list] = {}
    for layer in range(model.n_layers):
        for kind, sublayer in (("ffn", "mlp"), ("attn", "attn")):
            vectors = value_vectors(model, sublayer, layer, dtype=dtype, device=device)
            out.setdefault(f"{kind}_norm", []).append(vectors.norm(dim=-1).double().cpu().numpy())
            if ranks:
                pos, neg = target_ranks(model, vectors, targets)
                out.setdefault(f"{kind}_rank_pos", []).append(pos)
                out.setdefault(f"{kind}_rank_neg", []).append(neg)
    shapes = {"ffn": (model.d_mlp,), "attn": (model.n_heads, model.d_head)}
    stacked = {name: np.stack(parts, -2) for name, parts in out.items()}  # [..., L, K]
    return {name: x.reshape(*x.shape[:-1], *shapes[name.split("_")[0]]) for name, x in stacked.items()}


def target_ranks(model: Model, vectors: torch.Tensor, targets: torch.Tensor) -> tuple[np.ndarray, ...]:
    """``[F, K]`` rank of each target in ``D_w`` and in ``−D_w`` for ``vectors [K, d]``."""
    pos, neg = [], []
    for D in _chunked_directions(model, vectors):
        at = D[:, targets].T  # [F, k]
        rows = range(len(targets))  # counts in int32: no [k, V] int64 buffer
        pos.append(torch.stack([(D > at[f, :, None]).sum(-1, dtype=torch.int32) for f in rows]))
        neg.append(torch.stack([(D < at[f, :, None]).sum(-1, dtype=torch.int32) for f in rows]))
    return torch.cat(pos, 1).long().cpu().numpy(), torch.cat(neg, 1).long().cpu().numpy()
