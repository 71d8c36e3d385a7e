"""Subvalues in vocabulary space and their log-probability increase (Yu & Ananiadou, ``methods.md`` §3).

The *frozen-scale head* ("bs-values") reads a vector ``v [d_model]`` as::

    bs(v) = W_U (γ ⊙ centre(v)) / ρ  (+ W_U β + b_U when bias)                          [d_vocab]

with ``γ, β`` the final norm's gain and bias, ``centre`` the LayerNorm mean subtraction (identity for
RMSNorm) and ``ρ`` the final norm's scale on the row's actual final residual ``x^L_N``. ``bs`` is
linear up to the constant bias, so the bs-values of a sum are the sum of bs-values, and on ``x^L_N``
itself it gives the model's logits (before Gemma-2's soft-cap). The paper's code drops the bias
(``bias=False``).

A *subvalue* is a coefficient times a static value vector: FFN neuron ``k`` of layer ``ℓ`` writes
``c_k w_k`` and attention unit ``(h, n, j)`` writes ``α_{N,j} v_{j,n} W_O[h, n]``. Its importance is
the log-probability increase of the target ``t`` when it is added to a baseline residual ``x``::

    Imp = log p(t | x + a·w) − log p(t | x),    log p(t | y) = bs_t(y) − logsumexp(bs(y))

Because ``bs(x + a·w) = bs(x) + (a/ρ)·D_w`` with the static direction ``D_w = W_U (γ ⊙ centre(w))``,
scoring a subvalue is a rank-1 update and one logsumexp (:func:`rank1_increase`), with no forward.

Cheap exact bounds (:func:`increase_bounds`) need only two dot products per subvalue: with
``p = softmax(bs(x))``, ``u = a/ρ`` and ``R_w = max D_w − min D_w``, Jensen's inequality and
Hoeffding's lemma give::

    u (D_w[t] − E_p D_w) − u² R_w² / 8  ≤  Imp  ≤  u (D_w[t] − E_p D_w)

so the top and bottom ``n`` of tens of thousands of subvalues are found exactly by scoring only the
few whose bounds overlap the ``n``-th best (:func:`select_candidates`).
"""

from __future__ import annotations

import hashlib
import os
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from recallscope.core.dtypes import upcast
from recallscope.core.updates import update_gain, update_map
from recallscope.core.vocab import final_norm_scale
from recallscope.errors import ShapeError
from recallscope.models.model import Model

__all__ = [
    "FrozenHead",
    "value_directions",
    "chunked_directions",
    "Subvalues",
    "ffn_subvalues",
    "attn_subvalues",
    "value_vectors",
    "vector_increase",
    "rank1_increase",
    "increase_bounds",
    "select_candidates",
    "direction_ranges",
]

_EXP_SAFE = 60.0
"""Largest gap between the shift and the true maximum for which ``exp`` cannot underflow in fp32."""


def value_directions(
    model: Model, vectors: torch.Tensor, *, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Static directions ``D_v = W_U (γ ⊙ centre(v))`` of ``vectors [..., d]`` → ``[..., d_vocab]``.

    The frozen head without ``1/ρ`` or bias (so it needs no forward), in ``dtype`` (default: the
    vectors' dtype, at least float32) on the vectors' device.
    """
    dtype = dtype or upcast(vectors).dtype
    params = model.norm_params(model.spec.final_norm)
    x = vectors.to(dtype)
    if params.kind == "layer":
        x = x - x.mean(-1, keepdim=True)
    gain = params.gain(dtype, x.device)
    x = x if gain is None else x * gain
    return x @ model.W_U.to(x.device, dtype).T


def chunked_directions(
    model: Model, vectors: torch.Tensor, step: int, *, dtype: torch.dtype | None = None
) -> Iterator[torch.Tensor]:
    """:func:`value_directions` of ``vectors [K, d]``, ``step`` vectors at a time (``[k, V]`` each)."""
    for i in range(0, len(vectors), step):
        yield value_directions(model, vectors[i : i + step], dtype=dtype)


@dataclass(frozen=True)
class FrozenHead:
    """The frozen-scale final head of ``B`` rows.

    Attributes:
        model: the model.
        scale: ``[B]`` the final norm's ``ρ`` on each row's final residual.
        bias: ``[d_vocab]`` constant logits ``W_U β + b_U``, or None.
    """

    model: Model
    scale: torch.Tensor
    bias: torch.Tensor | None

    @classmethod
    def from_final(cls, model: Model, final_resid: torch.Tensor, *, bias: bool = True) -> FrozenHead:
        """The head of rows whose final residual (before the final norm) is ``final_resid [B, d]``."""
        if final_resid.dim() != 2 or final_resid.shape[-1] != model.d_model:
            shape = tuple(final_resid.shape)
            raise ShapeError(f"final_resid must be [B, d_model={model.d_model}], got {shape}")
        scale = final_norm_scale(model, final_resid)[:, 0]
        constant = None
        if bias:
            dtype = scale.dtype
            beta = model.norm_params(model.spec.final_norm).bias
            W_U = model.W_U.to(scale.device, dtype)
            constant = None if beta is None else W_U @ beta.to(scale.device, dtype)
            if model.b_U is not None:
                b_U = model.b_U.to(scale.device, dtype)
                constant = b_U if constant is None else constant + b_U
        return cls(model, scale, constant)

    @property
    def dtype(self) -> torch.dtype:
        return self.scale.dtype

    def directions(self, vectors: torch.Tensor) -> torch.Tensor:
        """Static directions ``D_v = W_U (γ ⊙ centre(v))``, ``[..., d]`` → ``[..., V]``; no ρ, no bias."""
        return value_directions(self.model, vectors.to(self.scale.device), dtype=self.dtype)

    def covectors(self, weights: torch.Tensor) -> torch.Tensor:
        """Covectors ``y [..., d]`` with ``y · v = Σ_t weights[t] D_v[t]`` for every ``v``.

        ``weights`` is ``[..., d_vocab]``.

        One-hot weights give the target's column of every direction, probabilities its mean.
        """
        back = weights.to(self.scale.device, self.dtype) @ self.model.W_U.to(self.scale.device, self.dtype)
        params = self.model.norm_params(self.model.spec.final_norm)
        gain = params.gain(self.dtype, back.device)
        back = back if gain is None else back * gain
        return (
            back - back.mean(-1, keepdim=True) if params.kind == "layer" else back
        )  # adjoint of γ ⊙ centre(·)

    def token_covectors(self, ids: torch.Tensor) -> torch.Tensor:
        """Per-row covectors of chosen tokens: ``u [B, n, d]`` with ``c · u[b, i] = bs(c)[ids[b, i]]``
        (without the bias) for any component ``c [d]`` of row ``b``.

        ``ids`` is ``[B, n]``; cheaper than :meth:`logits` when only a few tokens are followed.
        """
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.scale.device)
        rows = self.model.W_U.to(self.scale.device, self.dtype)[ids]  # [B, n, d]
        params = self.model.norm_params(self.model.spec.final_norm)
        gain = params.gain(self.dtype, rows.device)
        rows = rows if gain is None else rows * gain
        if params.kind == "layer":
            rows = rows - rows.mean(-1, keepdim=True)  # centring is self-adjoint
        return rows / self.scale[:, None, None]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``bs(x)`` for ``x [B, ..., d]`` → ``[B, ..., d_vocab]``."""
        view = self.scale.reshape(-1, *([1] * (x.dim() - 1)))
        out = self.directions(x) / view
        return out if self.bias is None else out + self.bias


@dataclass(frozen=True)
class Subvalues:
    """Subvalue ``(k, r)`` of row ``b`` is ``coeffs[b, k, r] · values[k]`` (a ``[d_model]`` vector).

    Attributes:
        coeffs: ``[B, K, R]`` coefficients (``R`` subvalues share each value vector: 1 for FFN
            neurons, the source positions for attention units).
        values: ``[K, d_model]`` static value vectors.
        rest: ``[B, d_model]`` what the sublayer adds besides the subvalues (biases), so
            ``Σ_{k,r} subvalues + rest`` is the sublayer's output.
    """

    coeffs: torch.Tensor
    values: torch.Tensor
    rest: torch.Tensor

    def total(self) -> torch.Tensor:
        """``[B, d_model]`` the sublayer output they sum to."""
        return torch.einsum("bkr,kd->bd", self.coeffs, self.values) + self.rest


def _update(model: Model, sublayer: str, layer: int, pre: torch.Tensor):
    """``(γ [d] | None, factor [B])`` of the sublayer's post-norm and residual scale, or None."""
    update = update_map(model, sublayer, layer, pre)
    return None if update is None else (update.gain, update.factor[:, 0])


def _finish(coeffs, values, bias, post) -> Subvalues:
    B, d = coeffs.shape[0], values.shape[-1]
    rest = torch.zeros(B, d, dtype=values.dtype, device=values.device)
    if bias is not None:
        rest = rest + bias.to(values.device, values.dtype)
    if post is not None:
        gain, factor = post
        if gain is not None:
            values, rest = values * gain, rest * gain
        coeffs, rest = coeffs * factor[:, None, None], rest * factor[:, None]
    return Subvalues(coeffs, values, rest)


@torch.no_grad()
def ffn_subvalues(model: Model, layer: int, coeffs: torch.Tensor) -> Subvalues:
    """FFN neurons of ``layer`` at one position: ``coeffs [B, d_mlp]`` (the ``mlp_post`` site).

    ``values = W_out [d_mlp, d]`` (⊙ Gemma-2's post-norm gain, whose ``1/ρ`` goes into the coefficients).
    """
    c = upcast(coeffs)
    W_out = model.W_out(layer).to(c.device, c.dtype)
    b_out = model.b_out(layer)
    pre = c @ W_out + (0 if b_out is None else b_out.to(c.device, c.dtype))
    return _finish(c[..., None], W_out, b_out, _update(model, "mlp", layer, pre))


@torch.no_grad()
def attn_subvalues(
    model: Model, layer: int, pattern: torch.Tensor, v: torch.Tensor, gate: torch.Tensor | None = None
) -> Subvalues:
    """Attention units ``(h, n, j)`` of ``layer`` at one query position.

    Args:
        pattern: ``[B, n_heads, T]`` the query's attention probabilities.
        v: ``[B, T, n_kv_heads, d_head]`` values of every key position.
        gate: ``[B, n_heads, d_head]`` the query's output gate (``spec.attn_output_gate``; see
            :func:`~recallscope.core.attention.output_gate_hook`), or None for 1.

    Returns:
        ``K = n_heads · d_head`` value vectors ``W_O[h, n]`` (unit index ``k = h·d_head + n``) with
        ``R = T`` coefficients ``α_{h,j} v_{j, kv(h), n}`` (times the gate ``g_{h,n}``) each;
        query head ``h`` reads key/value head ``h // n_groups``.
    """
    v = model.per_query_head(upcast(v), layer)  # [B, T, H, d_head]
    coeffs = torch.einsum("bht,bthn->bhnt", pattern.to(v.dtype), v)  # [B, H, d_head, T]
    coeffs = (coeffs if gate is None else coeffs * gate.to(v.dtype)[..., None]).flatten(1, 2)
    W_O = model.W_O(layer).to(v.device, v.dtype).flatten(0, 1)  # [H*d_head, d]
    b_O = model.b_O(layer)
    pre = coeffs.sum(-1) @ W_O + (0 if b_O is None else b_O.to(v.device, v.dtype))
    return _finish(coeffs, W_O, b_O, _update(model, "attn", layer, pre))


def value_vectors(
    model: Model, sublayer: str, layer: int, *, dtype: torch.dtype | None = None, device=None
) -> torch.Tensor:
    """The static value vectors of ``layer`` as :func:`ffn_subvalues` (``sublayer="mlp"``, ``[d_mlp, d]``)
    and :func:`attn_subvalues` (``"attn"``, ``[H·d_head, d]``) use them: Gemma-2's post-norm gain folded in.

    In ``dtype`` on ``device`` when given, else in the weights' dtype (at least float32) on their device.
    """
    values = model.W_out(layer) if sublayer == "mlp" else model.W_O(layer).flatten(0, 1)
    values = upcast(values) if dtype is None else values.to(device, dtype)
    gain = update_gain(model, sublayer, layer, values.dtype, values.device)
    return values if gain is None else values * gain


def _log_softmax_at(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return logits.gather(-1, targets[..., None])[..., 0] - logits.logsumexp(-1)


@torch.no_grad()
def vector_increase(
    head: FrozenHead, base: torch.Tensor, deltas: torch.Tensor, targets: torch.Tensor, *, chunk: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of the targets before and after adding each delta to the base.

    Args:
        head: the frozen head of the ``B`` rows.
        base: ``[B, d]`` baseline residuals.
        deltas: ``[B, n, d]`` vectors added one at a time.
        targets: ``[B]`` token ids.

    Returns:
        ``logprob_before [B]`` and ``logprob_after [B, n]``.
    """
    targets = targets.to(head.scale.device).long()
    base_logits = head.logits(base)  # [B, V]
    before = _log_softmax_at(base_logits, targets)
    after = []
    for i in range(0, deltas.shape[1], chunk):
        logits = base_logits[:, None] + head.directions(deltas[:, i : i + chunk]) / head.scale[:, None, None]
        after.append(_log_softmax_at(logits, targets[:, None].expand(-1, logits.shape[1])))
    after = torch.cat(after, 1) if after else base_logits.new_zeros(len(base), 0)
    return before, after


@torch.no_grad()
def rank1_increase(
    base_logits: torch.Tensor,
    coeffs: torch.Tensor,
    directions: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_elems: int | None = None,
) -> torch.Tensor:
    """Exact ``log p(t | base + u·D) − log p(t | base)`` for every row, direction and coefficient.

    Args:
        base_logits: ``[B, V]`` the baseline's logits ``bs(x)``.
        coeffs: ``[B, K, R]`` scaled coefficients ``u = a/ρ``.
        directions: ``[K, V]`` static directions ``D``.
        targets: ``[B]`` token ids.
        chunk_elems: elements of the ``[·, V]`` work buffer (memory bound); default 2M on the CPU
            (cache-sized), 64M on a GPU (few large kernels).

    Returns:
        ``[B, K, R]`` log-probability increases.

    Each logsumexp is shifted by the bound ``max(bs(x)) + |u|·max|D|`` instead of an exact maximum,
    which factorizes ``Σ_v exp(bs_v + u·D_v − shift) = exp(u·D − |u|·max|D|) · exp(bs − max bs)``: one
    fused multiply-add, one in-place ``exp``, one in-place product and one row sum per chunk. Rows where
    the shift could underflow (``2|u|·max|D| > 60``) are redone with the exact maximum.

    The sum over the vocabulary is a row reduction, not a matrix-vector product: each score then comes
    out the same whichever subvalues share its chunk (so a deeper ``n_top`` never reorders near-ties)
    and stays within 2e-5 of float64 for every chunk shape (a float32 product with one direction did not).
    """
    B, K, R = coeffs.shape
    if chunk_elems is None:
        chunk_elems = 1 << (26 if base_logits.device.type == "cuda" else 21)
    targets = targets.to(base_logits.device).long()
    base_max = base_logits.amax(-1)  # [B]
    base_exp = (base_logits - base_max[:, None]).exp()  # [B, V], ≤ 1
    base_lse = base_exp.sum(-1).log() + base_max
    out = torch.empty(B, K, R, dtype=base_logits.dtype, device=base_logits.device)
    per = max(1, chunk_elems // max(1, B * R * base_logits.shape[-1]))
    for k in range(0, K, per):
        D = directions[k : k + per].to(base_logits.dtype)  # [k', V]
        u = coeffs[:, k : k + per].to(base_logits.dtype)  # [B, k', R]
        reach = u.abs() * D.abs().amax(-1)[None, :, None]  # [B, k', R] ≥ |u·D| everywhere
        y = torch.addcmul(-reach[..., None], u[..., None], D[None, :, None, :])  # u·D − reach
        total = y.exp_().mul_(base_exp[:, None, None, :]).sum(-1)
        lse = total.log() + base_max[:, None, None] + reach
        unsafe = 2 * reach > _EXP_SAFE
        if unsafe.any():
            x = base_logits[:, None, None, :] + u[..., None] * D[None, :, None, :]
            lse = torch.where(unsafe, x.logsumexp(-1), lse)
        gain = u * D[:, targets].T[:, :, None]  # [B, k', R]: u·D[t]
        out[:, k : k + per] = gain - (lse - base_lse[:, None, None])
    return out


@torch.no_grad()
def increase_bounds(
    head: FrozenHead,
    base_logits: torch.Tensor,
    coeffs: torch.Tensor,
    values: torch.Tensor,
    targets: torch.Tensor,
    ranges: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Per-subvalue bounds on the log-probability increase and the direct logit gain, all ``[B, K, R]``.

    Args:
        base_logits: ``[B, V]`` the baseline's logits.
        coeffs: ``[B, K, R]`` raw coefficients (``1/ρ`` is applied here).
        values: ``[K, d]`` value vectors.
        targets: ``[B]`` token ids.
        ranges: ``[K]`` ``max D − min D`` of each value vector's direction (:func:`direction_ranges`).

    Returns:
        ``upper`` (the first-order estimate ``u (D[t] − E_p D)``, an upper bound by Jensen),
        ``lower`` (``upper − u² R² / 8``, Hoeffding) and ``logit`` (``u·D[t]``, the direct logit
        contribution of the subvalue).
    """
    targets = targets.to(base_logits.device).long()
    onehot = torch.nn.functional.one_hot(targets, base_logits.shape[-1]).to(base_logits.dtype)
    vals = values.to(base_logits.device, base_logits.dtype)
    at_target = head.covectors(onehot) @ vals.T  # [B, K]
    mean = head.covectors(base_logits.softmax(-1)) @ vals.T  # [B, K]
    u = coeffs.to(base_logits.dtype) / head.scale[:, None, None]
    upper = u * (at_target - mean)[..., None]
    lower = upper - u.pow(2) * ranges.to(u.device, u.dtype).pow(2)[None, :, None] / 8
    return {"upper": upper, "lower": lower, "logit": u * at_target[..., None]}


def select_candidates(
    upper: torch.Tensor, lower: torch.Tensor, n: int, *, slack: float = 1e-4
) -> torch.Tensor:
    """Which subvalues may be among the top ``n`` or the bottom ``n`` of each row.

    Args:
        upper, lower: ``[B, M]`` bounds (flattened over every subvalue of a row).
        n: how many to rank exactly at each end.
        slack: widening of the bounds that absorbs rounding.

    Returns:
        ``[B, M]`` bool; every subvalue of the exact top and bottom ``n`` is selected.
    """
    M = upper.shape[1]
    if n >= M:
        return torch.ones_like(upper, dtype=torch.bool)
    pad = slack * (1 + upper.abs().amax(-1, keepdim=True))
    top_floor = lower.topk(n, dim=-1).values[:, -1:]  # the n-th best guaranteed score
    bottom_ceiling = (-upper).topk(n, dim=-1).values[:, -1:].neg()  # the n-th worst guaranteed score
    return (upper + pad >= top_floor) | (lower - pad <= bottom_ceiling)


_RANGES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def direction_ranges(
    model: Model, kind: str, layer: int, values: torch.Tensor, *, chunk: int = 256
) -> torch.Tensor:
    """``[K]`` ``max − min`` over the vocabulary of ``W_U (γ ⊙ centre(values[k]))``, memoized per model.

    Args:
        kind: a name for the value vectors (``"ffn"``, ``"attn"``) used as the memo key with ``layer``.
        values: ``[K, d]`` static value vectors (the same every call for the same key).

    Models with a weights hash (the embedded model, hub revisions) also keep the ranges on disk in
    recallscope's cache, so a later process does not project every value vector again.
    """
    memo = _RANGES.get(model)
    if memo is None:
        memo = _RANGES[model] = _load_ranges(model)
    key = (kind, layer, values.shape[0])
    if key not in memo:
        parts = []
        for i in range(0, values.shape[0], chunk):
            D = value_directions(model, values[i : i + chunk])
            parts.append(D.amax(-1) - D.amin(-1))
        memo[key] = torch.cat(parts)
        _save_ranges(model, memo)
    return memo[key].to(values.device)


def _ranges_file(model: Model):
    """Where a model's ranges live on disk, or None when its weights have no stable identity."""
    info = model.info
    if not (info.file_sha256 or info.revision):
        return None
    from recallscope.models.gguf import cache_dir

    ident = f"{info.name}|{info.source}|{info.file_sha256}|{info.revision}|{model.dtype}"
    return cache_dir() / "subvalue-ranges" / f"{hashlib.sha256(ident.encode()).hexdigest()[:16]}.pt"


def _load_ranges(model: Model) -> dict:
    path = _ranges_file(model)
    if path is None or not path.exists():
        return {}
    try:
        return dict(torch.load(path, map_location="cpu", weights_only=True))  # tensors only, never code
    except Exception:  # a damaged cache file is recomputed, never trusted
        return {}


def _save_ranges(model: Model, memo: dict) -> None:
    path = _ranges_file(model)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save({k: v.cpu() for k, v in memo.items()}, tmp)
    os.replace(tmp, path)
