"""Vocabulary projection ("decoding") of residual vectors and components, ``methods.md`` §0.3/§5.3.

Three modes, which the four papers use differently:

- ``raw``: ``W_U·v`` (or ``E·v`` with ``matrix="embed"``), no final norm — Geva et al.;
- ``logit_lens``: the model's own head on ``v``: ``W_U·FinalNorm(v) + b_U`` (then Gemma-2's
  logit soft-cap), with the norm's scale computed from ``v`` itself. On the final residual this
  reproduces the model's logits;
- ``frozen_scale``: ``W_U·(γ ⊙ centre(v) / ρ)`` with ``ρ`` taken from a *reference* residual
  (``scale_from``, normally the actual final residual at the same position) — Yan & Jia, Yu &
  Ananiadou, direct logit attribution. It is linear in ``v``, so projecting a sum of components
  equals the sum of their projections. The constant terms ``W_U·β + b_U`` are added only with
  ``bias=True``, and no soft-cap is applied (it would break additivity).

Projections run in float32 at least (float64 stays float64), chunked over the vectors, and keep
only small reductions unless ``keep_logits=True``::

    proj = project_to_vocab(model, resid, "logit_lens", targets=batch.target_ids, k=5)
    proj.target_logprobs       # [B, n_layers]
    proj.topk_ids              # [B, n_layers, 5]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from recallscope.core.dtypes import compute_dtype, upcast
from recallscope.errors import ShapeError
from recallscope.models.model import Model

__all__ = [
    "ProjectionMode",
    "VocabProjection",
    "project_to_vocab",
    "readout_chunk",
    "readout_floats",
    "final_norm_scale",
    "apply_final_norm",
    "decode_tokens",
    "frozen_scale_readout",
]

ProjectionMode = Literal["raw", "logit_lens", "frozen_scale"]
PROJECTION_MODES = ("raw", "logit_lens", "frozen_scale")


@dataclass(frozen=True)
class VocabProjection:
    """Result of :func:`project_to_vocab`; leading shape ``S`` = the input's shape minus ``d_model``.

    Attributes:
        logits: ``[*S, d_vocab]`` when ``keep_logits``.
        log_normalizer: ``[*S]`` logsumexp over the vocabulary.
        target_logits, target_logprobs, target_ranks: ``[*S]`` (or ``[*S, n]`` for ``n`` targets
            per row); rank 0 = top token (number of tokens with a strictly larger logit).
        topk_ids, topk_logits: ``[*S, k]``.
    """

    mode: str
    log_normalizer: torch.Tensor
    logits: torch.Tensor | None = None
    target_logits: torch.Tensor | None = None
    target_logprobs: torch.Tensor | None = None
    target_ranks: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None
    topk_logits: torch.Tensor | None = None

    @property
    def target_probs(self) -> torch.Tensor | None:
        return None if self.target_logprobs is None else self.target_logprobs.exp()


def final_norm_scale(model: Model, resid: torch.Tensor) -> torch.Tensor:
    """``ρ [..., 1]`` of the final norm for residual vectors ``resid [..., d_model]``.

    RMSNorm: ``sqrt(mean(x²) + ε)``; LayerNorm: ``sqrt(var(x) + ε)`` (biased variance).
    """
    params = model.norm_params(model.spec.final_norm)
    x = upcast(resid)
    if params.kind == "rms":
        return (x.pow(2).mean(-1, keepdim=True) + params.eps).sqrt()
    return (x.var(-1, keepdim=True, unbiased=False) + params.eps).sqrt()


def apply_final_norm(
    model: Model, x: torch.Tensor, *, scale: torch.Tensor | None = None, bias: bool = True
) -> torch.Tensor:
    """Final norm of ``x [..., d_model]``; with ``scale`` given, its frozen-scale (linear) version."""
    params = model.norm_params(model.spec.final_norm)
    dtype = compute_dtype(x.dtype)
    x = x.to(dtype)
    if params.kind == "layer":
        x = x - x.mean(-1, keepdim=True)
    x = x / (final_norm_scale(model, x) if scale is None else scale.to(x.device, dtype))
    gain = params.gain(dtype, x.device)
    x = x if gain is None else x * gain
    if bias and params.bias is not None:
        x = x + params.bias.to(x.device, dtype)
    return x


@torch.no_grad()
def project_to_vocab(
    model: Model,
    x: torch.Tensor,
    mode: ProjectionMode = "logit_lens",
    *,
    scale_from: torch.Tensor | None = None,
    bias: bool | None = None,
    matrix: Literal["unembed", "embed"] = "unembed",
    targets: torch.Tensor | None = None,
    k: int = 0,
    keep_logits: bool = False,
    chunk_size: int | None = None,
) -> VocabProjection:
    """Project vectors ``x [*S, d_model]`` to the vocabulary.

    Args:
        model: the model.
        x: residual vectors or components.
        mode: ``raw``, ``logit_lens`` or ``frozen_scale`` (module docstring).
        scale_from: ``frozen_scale`` only: reference residual(s) ``[*S', d_model]`` broadcastable
            to ``x``'s leading shape whose final-norm scale is used.
        bias: add ``b_U`` (``raw`` with ``W_U``) or ``W_U·β + b_U`` (``frozen_scale``); default False.
            ``logit_lens`` always uses the model's full head.
        matrix: ``raw`` only: project with ``W_U`` or the input embedding ``E``.
        targets: token ids per batch row (``x``'s first axis): ``[B]`` or ``[B, n]``.
        k: number of top tokens to keep.
        keep_logits: also return the full logits (memory ``|S| × d_vocab``).
        chunk_size: vectors per chunk (default :func:`readout_chunk`: at most 256, fewer for a
            large vocabulary so one chunk's logits stay near ``READOUT_ELEMS``).
    """
    if mode not in PROJECTION_MODES:
        raise ValueError(f"unknown projection mode {mode!r}; expected one of {PROJECTION_MODES}")
    if x.shape[-1] != model.d_model:
        raise ShapeError(f"x must end in d_model={model.d_model}, got shape {tuple(x.shape)}")
    if mode == "frozen_scale" and scale_from is None:
        raise ValueError("mode='frozen_scale' needs scale_from= (the reference residual)")
    lead = x.shape[:-1]
    targets = None if targets is None else torch.as_tensor(targets, dtype=torch.long)
    vectors = _prepare(model, x, mode, scale_from, bias)  # [*S, d_model], normed as the mode says
    embed = matrix == "embed" and mode == "raw"
    weight = model.W_E if embed else model.W_U
    add_bias = mode == "logit_lens" or (bias and mode == "raw" and not embed)
    b_U = model.b_U if add_bias else None
    if mode == "frozen_scale" and bias:
        b_U = _frozen_bias(model, weight)
    softcap = model.spec.final_logit_softcap if mode == "logit_lens" else None
    tgt = None if targets is None else _broadcast_targets(targets, lead)
    flat = vectors.reshape(-1, model.d_model)
    chunk_size = chunk_size or readout_chunk(model)
    flat_tgt = None if tgt is None else tgt.reshape(flat.shape[0], -1)
    parts = [
        _reduce(
            _logits(flat[i : i + chunk_size], weight, b_U, softcap),
            None if flat_tgt is None else flat_tgt[i : i + chunk_size],
            k,
            keep_logits,
        )
        for i in range(0, flat.shape[0], chunk_size)
    ]
    return _assemble(mode, parts, lead, targets, k)


READOUT_ELEMS = 1 << 24
"""Logits per readout chunk (64 MB in float32): a 262k vocabulary reads 64 vectors at a time."""
READOUT_TEMPS = 2.5
"""Live ``[chunk, d_vocab]`` float buffers while a chunk is reduced: the logits, one temporary
(log-sum-exp or top-k) and, with targets, a target column's comparison and int32 count (measured as
allocated memory on 128k- and 262k-vocabulary models: 2.0 without targets, 2.3 with them)."""


def readout_chunk(model: Model) -> int:
    """Vectors per readout chunk: 256, or fewer so that a chunk holds about ``READOUT_ELEMS`` logits."""
    return max(1, min(256, READOUT_ELEMS // model.d_vocab))


def readout_floats(model: Model, n_rows: int) -> int:
    """Peak float buffers of reading ``n_rows`` vectors over the vocabulary (``cost()`` memory)."""
    return int(READOUT_TEMPS * min(n_rows, readout_chunk(model)) * model.d_vocab)


def _prepare(model, x, mode, scale_from, bias) -> torch.Tensor:
    if mode == "raw":
        return upcast(x)
    if mode == "logit_lens":
        return apply_final_norm(model, x)
    scale = final_norm_scale(model, scale_from)
    return apply_final_norm(model, x, scale=scale, bias=False)


def _frozen_bias(model: Model, weight: torch.Tensor) -> torch.Tensor | None:
    """``W_U·β + b_U``: the constant logits of the frozen-scale head."""
    beta = model.norm_params(model.spec.final_norm).bias
    dtype = compute_dtype(weight.dtype)
    total = None if beta is None else weight.to(dtype) @ beta.to(dtype)
    if model.b_U is not None:
        total = model.b_U.to(dtype) if total is None else total + model.b_U.to(dtype)
    return total


def _logits(vectors, weight, b_U, softcap) -> torch.Tensor:
    logits = vectors @ weight.to(vectors.device, vectors.dtype).T
    if b_U is not None:
        logits = logits + b_U.to(logits.device, logits.dtype)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _broadcast_targets(targets: torch.Tensor, lead: torch.Size) -> torch.Tensor:
    if not lead:
        raise ShapeError("targets need a batch axis: x must be [B, ..., d_model], got a single vector")
    if targets.dim() not in (1, 2) or targets.shape[0] != lead[0]:
        raise ShapeError(
            f"targets must be [B] or [B, n] with B={lead[0]} (the first axis of x), "
            f"got {tuple(targets.shape)}"
        )
    per_row = targets if targets.dim() == 2 else targets[:, None]  # [B, n]
    view = [per_row.shape[0]] + [1] * (len(lead) - 1) + [per_row.shape[1]]
    return per_row.reshape(view).expand(*lead, per_row.shape[1])


def _reduce(logits, targets, k, keep) -> dict:
    out = {"log_normalizer": logits.logsumexp(-1)}
    if keep:
        out["logits"] = logits
    if targets is not None:
        tl = logits.gather(-1, targets.to(logits.device))  # [c, n]
        out["target_logits"] = tl
        out["target_logprobs"] = tl - out["log_normalizer"][:, None]
        # one target column at a time, counted in int32: no [c, n, V] int64 buffer
        ranks = [(logits > tl[:, j : j + 1]).sum(-1, dtype=torch.int32) for j in range(tl.shape[1])]
        out["target_ranks"] = torch.stack(ranks, -1).long()
    if k:
        values, ids = logits.topk(k, dim=-1)
        out["topk_logits"], out["topk_ids"] = values, ids
    return out


def _assemble(mode, parts, lead, targets, k) -> VocabProjection:
    def cat(name, tail):
        if name not in parts[0]:
            return None
        return torch.cat([p[name] for p in parts]).reshape(*lead, *tail)

    has_targets = targets is not None
    tail = () if not has_targets or targets.dim() == 1 else (targets.shape[1],)
    return VocabProjection(
        mode=mode,
        log_normalizer=cat("log_normalizer", ()),
        logits=cat("logits", (-1,)),
        target_logits=cat("target_logits", tail) if has_targets else None,
        target_logprobs=cat("target_logprobs", tail) if has_targets else None,
        target_ranks=cat("target_ranks", tail) if has_targets else None,
        topk_ids=cat("topk_ids", (k,)) if k else None,
        topk_logits=cat("topk_logits", (k,)) if k else None,
    )


def decode_tokens(model: Model, ids: torch.Tensor) -> list | str:
    """Token ids ``[*S]`` → nested lists of their strings (each token decoded alone); a 0-d id → str."""
    ids = torch.as_tensor(ids)
    flat = ids.reshape(-1).tolist()
    strings = model.tokenizer.batch_decode([[i] for i in flat]) if flat else []
    if ids.dim() == 0:
        return strings[0]
    if ids.numel() == 0:
        return torch.empty(ids.shape[:-1] + (0,)).tolist() if ids.dim() > 1 else []
    out: list = strings
    for size in reversed(ids.shape[1:]):
        out = [out[i : i + size] for i in range(0, len(out), size)]
    return out


def frozen_scale_readout(
    vector: str = "c", *, detail: str, bias: bool | None = None, covector: str = "W_U", scale: str = "ρ_N"
) -> str:
    """How a result reads ``vector`` with the frozen-scale head, in words for its provenance.

    ``W_U (γ ⊙ centre(c)) / ρ_N``, no final soft-cap, and ``detail`` (which tokens are read, what the
    scale is). ``bias=None``: the method never adds the constant ``W_U β + b_U`` and says so before
    ``detail``; ``True`` or ``False``: its config chooses, and the term follows the formula when added::

        frozen_scale_readout("o_h", detail="tracked tokens only")
        # 'W_U (γ ⊙ centre(o_h)) / ρ_N; no bias, no final soft-cap; tracked tokens only'
        frozen_scale_readout(bias=True, detail="tracked tokens only")
        # 'W_U (γ ⊙ centre(c)) / ρ_N + W_U β + b_U; tracked tokens only; no final soft-cap'
    """
    formula = f"{covector} (γ ⊙ centre({vector})) / {scale}"
    if bias is None:
        return f"{formula}; no bias, no final soft-cap; {detail}"
    return formula + (" + W_U β + b_U" if bias else "") + f"; {detail}; no final soft-cap"
