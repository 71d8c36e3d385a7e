"""Naive Token Lens, straight from ``methods.md`` §2.2 Algorithm Y3 (Yan & Jia).

One unpadded prompt, batch size 1. The attention probabilities are recomputed by hand from the
queries and keys (after RoPE) that transformers hands to its attention interface, and recorded with
the values they mix (GPT-J: its own probabilities via ``output_attentions`` and the ``v`` site);
``z`` and ``attn_out`` come from a cached forward (``Σ_j α_{N,j} v_j`` is checked against ``z``). Then
explicit loops over layers, parts and heads: ``z_h(P) = Σ_{j∈P} α_{N,j} v_j`` (query head h reads
key/value head ``h // n_groups``; a gated output multiplies it by ``g = z / mix``), heads
concatenated, the ``o_proj`` module applied (minus its
bias), Gemma-2's attention post-norm applied at its actual scale, and the result decoded over the
**full** vocabulary as ``W_U (γ ⊙ centre(c)) / ρ_final`` before picking the tracked tokens.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import eager_mask

import recallscope as rs
from recallscope.models.sites import Site

_ORACLE = "token_lens_oracle"
_RECORDS: list[dict] = []


def _naive_attention(
    module, query, key, value, attention_mask, scaling=None, softcap=None, s_aux=None, **kwargs
):
    """Plain float64-safe attention that records ``α [B, H, Q, K]`` and the values it mixes.

    ``query [B, H, Q, d_h]`` (after RoPE), ``key``/``value [B, H_kv, K, d_h]``; query head h reads
    key/value head ``h // (H / H_kv)``.
    """
    groups = query.shape[1] // key.shape[1]
    key_h = key.repeat_interleave(groups, dim=1)
    value_h = value.repeat_interleave(groups, dim=1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = query @ key_h.transpose(2, 3) * scaling
    if softcap is not None:  # Gemma-2
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:  # additive (causal, sliding window)
        scores = scores + attention_mask[..., : key.shape[-2]]
    if s_aux is None:
        probs = torch.softmax(scores, dim=-1)
    else:  # a learned sink logit per head joins every row's softmax, then is dropped (gpt-oss)
        sinks = s_aux.reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores, sinks], -1), dim=-1)[..., :-1]
    _RECORDS.append({"module": module, "alpha": probs.detach(), "v": value.detach()})
    return (probs @ value_h).transpose(1, 2).contiguous(), probs


AttentionInterface.register(_ORACLE, _naive_attention)
AttentionMaskInterface.register(_ORACLE, eager_mask)


def attention_probs(model, ids: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Per layer ``α [H, T, T]`` of the prompt ``ids [T]`` and the values ``[T, H_kv, d_h]``.

    Recomputed from the queries and keys by :func:`_naive_attention`; GPT-J's legacy attention
    (no attention interface) gives its own probabilities through ``output_attentions`` and no values.
    """
    config = model.hf_model.config
    old = config._attn_implementation
    config._attn_implementation = _ORACLE
    _RECORDS.clear()
    try:
        out = model.hf_model(ids[None], output_attentions=True, use_cache=False)
    finally:
        config._attn_implementation = old
    if not _RECORDS:  # GPT-J
        return [a[0].double() for a in out.attentions], None
    owners = [model.module(model.spec.attn, layer) for layer in range(model.n_layers)]
    by_module = {id(r["module"]): r for r in _RECORDS}
    records = [by_module[id(owner)] for owner in owners]
    return [r["alpha"][0].double() for r in records], [r["v"][0].transpose(0, 1).double() for r in records]


def _decoder(model, final: torch.Tensor):
    """``c [d] ↦ W_U (γ ⊙ centre(c)) / ρ [V]`` with ``ρ`` the final norm's scale on ``final [d]``."""
    params = model.norm_params(model.spec.final_norm)
    centred = final - final.mean() if params.kind == "layer" else final
    rho = torch.sqrt((centred**2).mean() + params.eps)
    gain = torch.ones_like(final) if params.weight is None else params.weight.double()
    gain = 1 + gain if params.offset_one else gain
    W_U = model.W_U.double()

    def decode(c: torch.Tensor) -> torch.Tensor:
        c = c - c.mean() if params.kind == "layer" else c
        return W_U @ (gain * c / rho)

    return decode


def partition(T: int, spans: dict[str, list[int]]) -> dict[str, list[int]]:
    """First listed span wins; positions in no span are ``other``."""
    taken: set[int] = set()
    out = {}
    for name, positions in spans.items():
        out[name] = [j for j in positions if j not in taken]
        taken |= set(positions)
    out["other"] = [j for j in range(T) if j not in taken]
    return out


@torch.no_grad()
def naive_token_lens(model, ids: torch.Tensor, spans: dict[str, list[int]], tracked: list[int]) -> dict:
    """Token Lens of the prompt ``ids [T]`` at its last position.

    Args:
        spans: span name → source positions in the prompt, in priority order.
        tracked: token ids to read.

    Returns:
        ``parts`` (the spans, ``other`` and ``bias`` if ``o_proj`` has one), ``logit [L, parts, n]``
        and ``attn_out [L, n]`` (the model's own ``attn_out`` at ``N``, decoded the same way).
    """
    L, H, Dh, T = model.n_layers, model.n_heads, model.d_head, len(ids)
    sites = [Site(layer, name) for layer in range(L) for name in ("v", "z", "attn_out")]
    cache = rs.run_with_cache(model, ids[None], [*sites, Site(L - 1, "resid_post")])
    probs, values = attention_probs(model, ids)
    decode = _decoder(model, cache[Site(L - 1, "resid_post")][0, -1].double())
    sets = partition(T, spans)
    o_proj = [model.module(model.spec.o_proj, layer) for layer in range(L)]
    has_bias = o_proj[0].bias is not None
    parts = [*sets, "bias"] if has_bias else list(sets)
    logit = np.zeros((L, len(parts), len(tracked)))
    attn_out = np.zeros((L, len(tracked)))
    for layer in range(L):
        v = cache[Site(layer, "v")][0].double() if values is None else values[layer]  # [T, H_kv, Dh]
        g = H // v.shape[1]  # query heads per key/value head in this layer
        alpha = probs[layer][:, -1]  # [H, T]
        z_site = cache[Site(layer, "z")][0, -1].double()  # [H, Dh]
        whole = sum(alpha[:, j, None] * v[j].repeat_interleave(g, 0) for j in range(T))  # [H, Dh]
        gate = _gate(model, whole, z_site)
        vectors = []
        for positions in sets.values():
            z = torch.zeros(H, Dh, dtype=torch.float64)
            for h in range(H):
                for j in positions:
                    z[h] += alpha[h, j] * v[j, h // g] * gate[h]
            vectors.append(_o_proj(o_proj[layer], z.reshape(-1)))
        # self-check: all parts together are the model's own mix z at N
        rtol, atol = (1e-9, 1e-12) if model.dtype == torch.float64 else (1e-3, 1e-5)
        np.testing.assert_allclose((whole * gate).numpy(), z_site.numpy(), rtol=rtol, atol=atol)
        if has_bias:
            vectors.append(o_proj[layer].bias.detach().double())
        vectors = _post_norm(model, layer, vectors, o_proj[layer], z_site)
        for p, vector in enumerate(vectors):
            logit[layer, p] = decode(vector)[tracked].numpy()
        attn_out[layer] = decode(cache[Site(layer, "attn_out")][0, -1].double())[tracked].numpy()
    return {"parts": parts, "logit": logit, "attn_out": attn_out}


def _gate(model, mix: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Gated attention output (BitNet's sub-norm, sigmoid gates): ``z = g ⊙ mix`` at the query, so
    ``g = z / mix`` element by element (0 where the mix is 0); 1 for attention without a gate.
    """
    if not model.spec.attn_output_gate:
        return torch.ones_like(mix)
    gate = torch.zeros_like(mix)
    for h in range(mix.shape[0]):
        for n in range(mix.shape[1]):
            if mix[h, n] != 0:
                gate[h, n] = z[h, n] / mix[h, n]
    return gate


def _o_proj(module, z: torch.Tensor) -> torch.Tensor:
    """The ``o_proj`` module applied to concatenated heads ``z [H·Dh]``, without its bias."""
    with torch.no_grad():
        z = z.to(module.weight.dtype)
        return (module(z) - module(torch.zeros_like(z))).double()


def _post_norm(model, layer, vectors, o_proj, z_site):
    """Gemma-2: ``γ ⊙ c / ρ(y)`` with ``y = o_proj(z)`` the whole pre-norm update; identity otherwise."""
    path = model.spec.attn_post_norm
    if path is None:
        return vectors
    norm = model.module(path, layer)
    with torch.no_grad():
        y = o_proj(z_site.reshape(-1).to(o_proj.weight.dtype)).double()
    eps = getattr(norm, "eps", None) or norm.variance_epsilon
    rho = torch.sqrt((y**2).mean() + eps)
    gain = norm.weight.double() + (1 if model.spec.norm_offset_one else 0)
    return [gain * c / rho for c in vectors]
