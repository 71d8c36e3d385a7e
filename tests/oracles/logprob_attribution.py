"""Naive log-probability attribution, straight from ``methods.md`` §3 (Y&A-1 … Y&A-5).

One unpadded prompt, one cached forward, then explicit loops: every score is
``log_softmax(bs(baseline + vector))[t] − log_softmax(bs(baseline))[t]`` with the frozen-scale head
written out here (no ``recallscope.core.subvalues``). Head outputs come from ``z`` and ``W_O``
slices; positions and units from the pattern's last row and the values.
"""

from __future__ import annotations

import numpy as np
import torch

import recallscope as rs
from recallscope.models.sites import Site


def frozen_head(model, final: torch.Tensor, bias: bool):
    """``bs(v)`` for one vector ``v [d]`` with the final norm's scale frozen at ``final [d]``."""
    params = model.norm_params(model.spec.final_norm)
    if params.kind == "rms":
        rho = torch.sqrt((final**2).mean() + params.eps)
    else:
        rho = torch.sqrt(((final - final.mean()) ** 2).mean() + params.eps)
    gain = torch.ones_like(final) if params.weight is None else params.weight.double()
    gain = 1 + gain if params.offset_one else gain
    W_U = model.W_U.double()
    constant = torch.zeros(W_U.shape[0], dtype=torch.float64)
    if bias and params.bias is not None:
        constant = constant + W_U @ params.bias.double()
    if bias and model.b_U is not None:
        constant = constant + model.b_U.double()

    def bs(v: torch.Tensor) -> torch.Tensor:
        v = v - v.mean() if params.kind == "layer" else v
        return W_U @ (gain * v / rho) + constant

    return bs, float(rho)


def _post_norm(model, path, layer: int, pre: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Gemma-2's post-norm linearized at the actual output ``pre [d]``: ``c ↦ γ ⊙ c / ρ(pre)``,
    returned as ``(γ, 1/ρ)``; ``(1, 1)`` for models without one."""
    if path is None:
        return torch.ones_like(pre), 1.0
    params = model.norm_params(path, layer)
    rho = torch.sqrt((pre**2).mean() + params.eps)
    gain = params.weight.double()
    return (1 + gain if params.offset_one else gain), float(1 / rho)


def capture(model, ids: torch.Tensor) -> dict:
    """Every site of every layer over all positions of one prompt ``ids [T]`` (float64)."""
    names = ("resid_pre", "attn_out", "mlp_out", "mlp_post", "z", "v", "pattern")
    sites = [Site(layer, name) for layer in range(model.n_layers) for name in names]
    sites.append(Site(model.n_layers - 1, "resid_post"))
    cache = rs.run_with_cache(model, ids[None], sites, logits="last")
    out = {(s.layer, s.name): cache[s][0].double() for s in sites}
    out["logits"] = cache.logits[0].double()
    return out


def naive_attribution(model, ids: torch.Tensor, bias: bool, target: int | None = None) -> dict:
    """All Y&A-1 … Y&A-5 quantities at the last position of the unpadded prompt ``ids [T]``."""
    c = capture(model, ids)
    L, H, Dh, T = model.n_layers, model.n_heads, model.d_head, len(ids)
    t = int(c["logits"].argmax()) if target is None else target
    bs, rho = frozen_head(model, c[(L - 1, "resid_post")][-1], bias)

    def lp(v):
        return float(torch.log_softmax(bs(v), -1)[t])

    def logit(v):  # direct logit gain of v (no bias)
        return float(bs(v)[t] - bs(torch.zeros_like(v))[t])

    d, d_mlp = model.d_model, model.d_mlp
    shapes = {
        "lp_pre": (L + 1,),
        "lp_mid": (L,),
        "attn": (L,),
        "ffn": (L,),
        "head": (L, H),
        "position": (L, H, T),
        "attention": (L, H, T),
        "neuron": (L, d_mlp),
        "neuron_coeff": (L, d_mlp),
        "neuron_prob": (L, d_mlp),
        "neuron_logit": (L, d_mlp),
        "unit": (L, H, Dh, T),
        "unit_coeff": (L, H, Dh, T),
        "unit_prob": (L, H, Dh, T),
        "unit_logit": (L, H, Dh, T),
        "head_out": (L, H, d),
        "position_out": (L, H, T, d),
        "unit_out_sum": (L, H, d),
        "attn_out": (L, d),
        "attn_rest": (L, d),
    }
    out = {"target": t, "rho": rho, **{key: np.zeros(shape) for key, shape in shapes.items()}}
    for layer in range(L):
        x = c[(layer, "resid_pre")][-1]
        a = c[(layer, "attn_out")][-1]
        m = c[(layer, "mlp_out")][-1]
        r = x + a
        out["lp_pre"][layer], out["lp_mid"][layer] = lp(x), lp(r)
        out["attn"][layer] = lp(r) - lp(x)
        out["ffn"][layer] = lp(r + m) - lp(r)
        out["attn_out"][layer] = a.numpy()
        _attention(model, c, layer, x, (lp, logit), out)
        _neurons(model, c, layer, r, (lp, logit), out)
    out["lp_pre"][L] = lp(c[(L - 1, "resid_post")][-1])
    return out


def _attention(model, c, layer, x, readouts, out) -> None:
    """Y&A-2 heads (from z), Y&A-3 positions and Y&A-5 units (from pattern and v), baseline ``x``."""
    lp, logit = readouts
    H, Dh, T = model.n_heads, model.d_head, c[(layer, "v")].shape[0]
    W_O = model.W_O(layer).double()  # [H, Dh, d]
    b_O = model.b_O(layer)
    z = c[(layer, "z")][-1]  # [H, Dh]
    pattern = c[(layer, "pattern")][:, -1]  # [H, T]
    v = c[(layer, "v")]  # [T, H_kv, Dh]
    pre = sum(z[h] @ W_O[h] for h in range(H)) + (0 if b_O is None else b_O.double())
    gain, scale = _post_norm(model, model.spec.attn_post_norm, layer, pre)

    def post(vector):
        return gain * vector * scale

    if b_O is not None:
        out["attn_rest"][layer] = post(b_O.double()).numpy()
    base = lp(x)
    for h in range(H):
        kv = h // (H // v.shape[1])  # v [T, H_kv, Dh] of this layer
        o = post(z[h] @ W_O[h])
        out["head_out"][layer, h] = o.numpy()
        out["head"][layer, h] = lp(x + o) - base
        gate = _gate(model, z[h], sum(pattern[h, j] * v[j, kv] for j in range(T)))  # [Dh]
        for j in range(T):
            u = post(pattern[h, j] * (v[j, kv] * gate) @ W_O[h])
            out["position_out"][layer, h, j] = u.numpy()
            out["position"][layer, h, j] = lp(x + u) - base
            out["attention"][layer, h, j] = float(pattern[h, j])
            for n in range(Dh):
                coeff = pattern[h, j] * v[j, kv, n] * gate[n]
                unit = post(coeff * W_O[h, n])
                out["unit_out_sum"][layer, h] += unit.numpy()
                out["unit_coeff"][layer, h, n, j] = float(coeff) * scale
                out["unit_logit"][layer, h, n, j] = logit(unit)
                score = lp(x + unit) - base
                out["unit"][layer, h, n, j] = score
                out["unit_prob"][layer, h, n, j] = np.exp(base + score) - np.exp(base)


def _gate(model, z: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """A gated attention output (sigmoid gate, sub-norm): ``z = g ⊙ mix`` per head, so ``g = z / mix``
    element by element (0 where the mix is 0); 1 without a gate."""
    if not model.spec.attn_output_gate:
        return torch.ones_like(mix)
    return torch.tensor(
        [float(a) / float(b) if b != 0 else 0.0 for a, b in zip(z, mix, strict=True)], dtype=mix.dtype
    )


def _neurons(model, c, layer, r, readouts, out) -> None:
    """Y&A-4: FFN subvalues ``c_k w_k`` on the baseline ``r``."""
    lp, logit = readouts
    coeffs = c[(layer, "mlp_post")][-1]  # [d_mlp]
    W_out = model.W_out(layer).double()  # [d_mlp, d]
    b_out = model.b_out(layer)
    pre = coeffs @ W_out + (0 if b_out is None else b_out.double())
    gain, scale = _post_norm(model, model.spec.mlp_post_norm, layer, pre)
    base = lp(r)
    for k in range(len(coeffs)):
        s = gain * (coeffs[k] * scale) * W_out[k]
        out["neuron_coeff"][layer, k] = float(coeffs[k]) * scale
        out["neuron_logit"][layer, k] = logit(s)
        score = lp(r + s) - base
        out["neuron"][layer, k] = score
        out["neuron_prob"][layer, k] = np.exp(base + score) - np.exp(base)
