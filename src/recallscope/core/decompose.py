"""Exact decompositions of the residual stream into components (``methods.md`` §5.4).

Axis names map to ``methods.md`` §0.3 as follows: ``batch`` = B, ``pos`` = a kept position,
``head`` = query head h (of H = ``n_heads``), ``kv_head`` = h // (H / H_kv), ``src`` = key position
j, ``neuron`` = k (of ``d_mlp``), ``d_model`` = d, ``d_head`` = d_h.

Every function returns a :class:`Decomposition` whose ``parts`` summed over the component axis,
plus ``rest``, equal the activation the model computed:

- :func:`head_outputs`: ``attn_out = Σ_h o^h + b_O`` with ``o^h = z^h W_O^h`` (GQA needs nothing
  special here: ``z`` is per query head);
- :func:`head_source_outputs`: ``o^h_p = Σ_j α^h_{p,j} v^{kv(h)}_j W_O^h`` at query positions ``p``
  (Token Lens; query head h reads key/value head ``h // n_groups``; a gated output multiplies each
  term by the query position's gate ``g_p``);
- :func:`neuron_outputs`: ``mlp_out = Σ_k c_k w_k + b_out``, optionally projected onto directions
  first so the ``[…, d_mlp, d_model]`` stack is never built;
- :func:`resid_decomposition`: ``resid_post[L-1] = embed (+ pos_embed) + Σ_ℓ (attn_out^ℓ + mlp_out^ℓ)``
  for sequential and parallel blocks.

Sandwich post-norms (Gemma-2/3, OLMo-2) are folded in with their actual (frozen) scale and constant
residual multipliers (Granite) as they are (:mod:`recallscope.core.updates`), so the identities stay
exact there too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from recallscope.core.dtypes import compute_dtype
from recallscope.core.updates import apply_update, update_map
from recallscope.errors import RecallscopeError, ShapeError
from recallscope.models.model import Model
from recallscope.models.sites import Site

__all__ = [
    "SLICINGS",
    "Decomposition",
    "head_vectors",
    "ov_outputs",
    "head_outputs",
    "head_source_outputs",
    "neuron_outputs",
    "resid_decomposition",
    "resid_sites",
    "post_norm_note",
]


SLICINGS = ("input_columns", "reference_code")
"""How :func:`head_vectors` cuts ``W_O`` into heads: by its input columns (right), or as Yan & Jia's
released code does (a reinterpretation of the memory of ``o_proj.weight``)."""


@dataclass(frozen=True)
class Decomposition:
    """``parts.sum(axis) + rest`` equals the decomposed activation.

    Attributes:
        parts: the components, with a component axis ``axis``.
        rest: constant term (biases), broadcastable to the activation; 0 when there is none.
        axis: index of the component axis in ``parts``.
        labels: a name per component (for residual decompositions).
    """

    parts: torch.Tensor
    rest: torch.Tensor | float
    axis: int | tuple[int, ...]
    labels: tuple[str, ...] = ()

    def total(self) -> torch.Tensor:
        """The reconstructed activation."""
        return self.parts.sum(self.axis) + self.rest


@torch.no_grad()
def head_outputs(model: Model, layer: int, z: torch.Tensor) -> Decomposition:
    """Per-head outputs ``[B, P, n_heads, d_model]`` from ``z [B, P, n_heads, d_head]``.

    Sum over heads plus ``rest`` equals ``attn_out`` at the same positions.
    """
    _check_shape(z, (model.n_heads, model.d_head), "z")
    dtype = compute_dtype(z.dtype)
    W_O = model.W_O(layer).to(z.device, dtype)
    parts = torch.einsum("bphe,hed->bphd", z.to(dtype), W_O)
    return _with_bias(model, layer, parts, model.b_O(layer), "attn", axis=2)


@torch.no_grad()
def head_source_outputs(
    model: Model, layer: int, pattern: torch.Tensor, v: torch.Tensor, gate: torch.Tensor | None = None
) -> Decomposition:
    """Per-head, per-source outputs at query positions.

    Args:
        pattern: attention probabilities at the query positions ``[B, n_heads, P, T]``.
        v: values of all key positions ``[B, T, n_kv_heads, d_head]``.
        gate: the output gate at the query positions ``[B, P, n_heads, d_head]`` for attention
            whose output is gated before ``W_O`` (:func:`~recallscope.core.attention.output_gate_hook`;
            ``spec.attn_output_gate``); None means 1.

    Returns:
        parts ``[B, P, n_heads, T, d_model]``; summed over heads and sources, plus ``rest``, they
        equal ``attn_out`` at the query positions.
    """
    _check_shape(v, (model.n_kv_heads_at(layer), model.d_head), "v")
    dtype = compute_dtype(v.dtype)
    v = model.per_query_head(v.to(dtype), layer)  # [B, T, H, d_head]: head h reads kv h // g
    weighted = torch.einsum("bhpt,bthe->bphte", pattern.to(dtype), v)
    if gate is not None:
        weighted = weighted * gate.to(dtype)[:, :, :, None]
    parts = torch.einsum("bphte,hed->bphtd", weighted, model.W_O(layer).to(v.device, dtype))
    return _with_bias(model, layer, parts, model.b_O(layer), "attn", axis=(2, 3))


@torch.no_grad()
def neuron_outputs(
    model: Model, layer: int, coeffs: torch.Tensor, *, onto: torch.Tensor | None = None
) -> Decomposition:
    """Per-neuron contributions ``c_k w_k`` from ``coeffs [B, P, d_mlp]`` (the ``mlp_post`` site).

    Args:
        onto: optional directions ``[d_model]`` or ``[n, d_model]``; then parts are the scalars
            ``c_k (w_k · u)`` of shape ``[B, P, d_mlp]`` or ``[B, P, d_mlp, n]`` and nothing of size
            ``d_mlp × d_model`` per position is built.

    Returns:
        parts ``[B, P, d_mlp, d_model]`` (or projected); sum over neurons plus ``rest`` equals
        ``mlp_out`` (or its projection).
    """
    _check_shape(coeffs, (model.d_mlp,), "coeffs")
    dtype = compute_dtype(coeffs.dtype)
    coeffs = coeffs.to(dtype)
    W_out = model.W_out(layer).to(coeffs.device, dtype)  # [d_mlp, d_model]
    b_out = model.b_out(layer)
    raw = coeffs @ W_out + (0 if b_out is None else b_out.to(coeffs.device, dtype))
    update = update_map(model, "mlp", layer, raw)  # post-norm / residual scale
    scale = None if update is None else update(torch.ones_like(raw))  # [B, P, d_model]
    if onto is None:
        parts = coeffs[..., None] * W_out  # [B, P, d_mlp, d_model]
        parts = parts if scale is None else parts * scale[..., None, :]
        rest = 0.0 if b_out is None else b_out.to(coeffs.device, dtype)
        rest = rest if scale is None else rest * scale
        return Decomposition(parts, rest, axis=2)
    u = onto.to(coeffs.device, dtype)
    u = u[None] if u.dim() == 1 else u  # [n, d_model]
    if scale is None:
        parts = coeffs[..., None] * (W_out @ u.T)  # [B, P, d_mlp, n]
    else:
        parts = coeffs[..., None] * torch.einsum("kd,bpd,nd->bpkn", W_out, scale, u)
    rest = 0.0
    if b_out is not None:
        folded = b_out.to(coeffs.device, dtype) * (1 if scale is None else scale)
        rest = folded @ u.T
    if onto.dim() == 1:
        parts, rest = parts[..., 0], rest if isinstance(rest, float) else rest[..., 0]
    return Decomposition(parts, rest, axis=2)


def head_vectors(model: Model, layer: int, z: torch.Tensor, slicing: str = "input_columns") -> torch.Tensor:
    """Per-head outputs ``[B, n_heads, d_model]`` of ``layer`` from ``z [B, n_heads, d_head]`` (one position).

    ``input_columns``: ``z_h W_O[h]`` (Gemma-2's post-norm folded in); ``reference_code``: the released
    code's ``z_h · o_proj.weight.view(H, d_h, d)[h]`` (same post-norm folding).
    """
    if slicing == "input_columns":
        return head_outputs(model, layer, z[:, None]).parts[:, 0]
    if slicing != "reference_code":
        raise RecallscopeError(f"wo_slicing must be one of {SLICINGS}, got {slicing!r}")
    W_O = model.W_O(layer).to(z.device, z.dtype)  # [H, d_head, d]
    weight = W_O.flatten(0, 1).T.contiguous()  # HF Linear layout [d_out, H·d_head]
    sliced = weight.view(
        model.n_heads, model.d_head, model.d_model
    )  # memory reinterpretation, not a transpose
    parts = torch.einsum("bhe,hed->bhd", z, sliced)
    b_O = model.b_O(layer)
    raw = torch.einsum("bhe,hed->bd", z, W_O) + (0 if b_O is None else b_O.to(z.device, z.dtype))
    update = update_map(model, "attn", layer, raw)  # post-norm at the true output; residual scale
    return parts if update is None else update(parts, axes=(1,))


def ov_outputs(model: Model, layer: int, x: torch.Tensor, *, input_norm: bool = True) -> torch.Tensor:
    """Every head's OV map of input vectors: ``x [N, d_model]`` → ``out [N, n_heads, d_model]``.

    ``out[:, h] = (norm(x) W_V[h // n_groups] + b_V[h // n_groups]) W_O[h]`` with block ``layer``'s
    pre-attention norm (when ``input_norm``), then Gemma-2's post-attention norm on each head alone.
    Computed in at least float32; the norms run in the model's dtype, as in its forward.
    """
    dtype = compute_dtype(model.dtype)
    spec = model.spec.at(layer)
    if input_norm and spec.ln_1 is not None:  # no norm: the attention reads the residual (OLMo-2)
        x = model.module(spec.ln_1, layer)(x.to(model.dtype))
    x = x.to(dtype)
    v = torch.einsum("nd,kde->nke", x, model.W_V(layer).to(x.device, dtype))  # [N, n_kv_heads, d_head]
    b_V = model.b_V(layer)
    if b_V is not None:
        v = v + b_V.to(x.device, dtype)
    # query head h = kv * n_groups + g reads kv head h // n_groups: W_O [H, e, d] -> [kv, g, e, d]
    groups = (model.n_kv_heads_at(layer), model.n_groups_at(layer))
    W_O = model.W_O(layer).to(x.device, dtype).unflatten(0, groups)
    out = torch.einsum("nke,kged->nkgd", v, W_O).flatten(1, 2)  # [N, H, d_model]
    return apply_update(model, "attn", layer, out)  # post-norm in the model's dtype, residual scale


def _with_bias(model, layer, parts, bias, sublayer, axis) -> Decomposition:
    """Attach the output bias and fold the sublayer's post-norm and residual scale into the parts."""
    axes = (axis,) if isinstance(axis, int) else axis
    dtype, device = parts.dtype, parts.device
    rest = 0.0 if bias is None else bias.to(device, dtype)
    raw = parts.sum(axes) + rest  # [B, P, d_model]
    update = update_map(model, sublayer, layer, raw)
    if update is not None:
        parts, rest = (
            update(parts, axes=axes),
            update(torch.as_tensor(rest, dtype=dtype, device=device).expand_as(raw)),
        )
    return Decomposition(parts, rest, axis=axes[0] if len(axes) == 1 else axes)


def resid_sites(model: Model) -> list[Site]:
    """The sites :func:`resid_decomposition` needs."""
    sites = [Site(None, "embed")] + ([Site(None, "pos_embed")] if model.spec.pos_embed else [])
    updates = ("attn_out", "mlp_out") + (("ple_out",) if model.spec.ple_update else ())
    for layer in range(model.n_layers):
        sites += [Site(layer, name) for name in updates]
    return sites


@torch.no_grad()
def resid_decomposition(model: Model, cache, *, upto: int | None = None) -> Decomposition:
    """``resid_post[upto]`` (default: last block) as embeddings + every attention and MLP update.

    Args:
        cache: a :class:`~recallscope.core.cache.Cache` holding :func:`resid_sites`.

    Returns:
        parts ``[B, P, n_components, d_model]`` labelled ``embed``, ``pos_embed``, ``0.attn_out``,
        ``0.mlp_out`` (``0.ple_out``: Gemma 3n/4's per-layer inputs), …; ``rest`` is 0.
    """
    upto = model.n_layers - 1 if upto is None else model.check_layer(upto)
    labels, parts = [], []
    for site in resid_sites(model):
        if site.layer is None or site.layer <= upto:
            labels.append(str(site))
            parts.append(cache[site])
    dtype = compute_dtype(parts[0].dtype)
    stacked = torch.stack([p.to(dtype) for p in parts], dim=2)
    return Decomposition(stacked, 0.0, axis=2, labels=tuple(labels))


def _check_shape(x: torch.Tensor, tail: tuple[int, ...], name: str) -> None:
    if tuple(x.shape[-len(tail) :]) != tail:
        raise ShapeError(f"{name} must end in {tail}, got shape {tuple(x.shape)}")


def post_norm_note(model, how: str = "attention post-norm folded in at its actual scale") -> str:
    """``"; Gemma-2 <how>"`` for a model whose updates pass a post-norm (a note for a result's
    provenance), else ``""``.
    """
    return f"; Gemma-2 {how}" if model.spec.attn_post_norm else ""
