"""Naive query attribution from ``methods.md`` Y&A-6: one unpadded prompt, loops over rows and components.

Value rows are given: neurons ``(layer, k, imp)`` and units ``(layer, head, dim, j, imp)`` with ``j``
a position of the unpadded prompt.
"""

from __future__ import annotations

import torch

import recallscope as rs
from oracles import experts
from recallscope.models.sites import Site


def activations(model, ids: torch.Tensor) -> dict:
    """Every ``resid_pre``, ``attn_out``, ``mlp_out``, ``mlp_post`` of one prompt, ``[T, ·]`` each."""
    names = ("resid_pre", "attn_out", "mlp_out", "mlp_post")
    sites = [Site(i, n) for i in range(model.n_layers) for n in names]
    cache = rs.run_with_cache(model, ids[None], sites)
    return {(i, n): cache[Site(i, n)][0] for i in range(model.n_layers) for n in names}


def components(model, acts: dict, pos: int, layer: int, with_attn: bool) -> list[tuple[int, torch.Tensor]]:
    """``(index, vector)``: embed, A^0, F^0, …, A^{layer-1}, F^{layer-1} (and A^layer) at ``pos``."""
    out = [(0, acts[(0, "resid_pre")][pos])]
    for i in range(layer):
        out += [(1 + 2 * i, acts[(i, "attn_out")][pos]), (2 + 2 * i, acts[(i, "mlp_out")][pos])]
    if with_attn:
        out.append((1 + 2 * layer, acts[(layer, "attn_out")][pos]))
    return out


def gain(model, path: str, layer: int) -> torch.Tensor:
    g = model.norm_params(path, layer).gain(model.dtype, "cpu")
    return torch.ones(model.d_model, dtype=model.dtype) if g is None else g


def norm_gate(model, path: str | None, layer: int, x: torch.Tensor) -> torch.Tensor:
    """The gate ``σ(mlp(norm(x)))`` a gated norm (AXK2's GatedRMSNorm) multiplies its norm's output
    by, for ``x [..., d]``, by hand; 1 for a plain norm.
    """
    module = None if path is None else model.module(path, layer)
    if module is None or not hasattr(module, "mlp"):
        return torch.ones(model.d_model, dtype=x.dtype)
    return torch.sigmoid(module.mlp(module.norm(x)).float()).to(x.dtype).detach()  # float32, as AXK2 does


def weight_vector(module, k: int, side: str) -> torch.Tensor:
    """``side="in"``: the input weights of output ``k``; ``"out"``: the output vector of input ``k``."""
    w = module.weight.detach()
    conv1d = type(module).__name__ == "Conv1D"  # GPT-2: [in, out]
    if side == "in":
        return w[:, k] if conv1d else w[k]
    return w[k] if conv1d else w[:, k]


def ffn_key(model, acts: dict, layer: int, k: int, how: str) -> torch.Tensor:
    """The key of FFN neuron ``(layer, k)`` at the last position (before centring)."""
    spec = model.spec
    if how == "as_coded":
        how = "value" if spec.gated_mlp else "input_row"
    x = acts[(layer, "resid_pre")][-1]
    if not spec.parallel:
        x = x + acts[(layer, "attn_out")][-1]
    g2 = gain(model, spec.ln_2, layer) * norm_gate(model, spec.ln_2, layer, x)
    if how == "value":
        return _value_vector(model, layer, k) * g2
    if how in ("input_row", "gate_row"):
        path = spec.mlp_in if how == "input_row" else spec.mlp_gate
        return weight_vector(model.module(path, layer), k, "in") * g2
    normed, rho = frozen_norm(model, layer, x)
    normed = normed.detach().requires_grad_(True)
    with torch.enable_grad():
        coeff = mlp_coeff(model, layer, normed)[k]
        (grad,) = torch.autograd.grad(coeff, normed)
    return g2 / rho * grad


def frozen_norm(model, layer: int, x: torch.Tensor, rho: torch.Tensor | None = None):
    """The MLP's norm of ``x`` computed by hand, with its scale ``ρ`` (frozen when given)."""
    if model.spec.ln_2 is None:  # the MLP reads the residual itself (OLMo-2)
        return x, torch.ones((), dtype=x.dtype)
    params = model.norm_params(model.spec.ln_2, layer)
    centred = x - x.mean() if params.kind == "layer" else x
    if rho is None:
        rho = (centred.detach().pow(2).mean() + params.eps).sqrt()
    out = centred / rho * gain(model, model.spec.ln_2, layer)
    out = out if params.bias is None else out + params.bias
    return out * norm_gate(model, model.spec.ln_2, layer, x.detach()), rho


def mlp_coeff(model, layer: int, normed: torch.Tensor) -> torch.Tensor:
    """``c [d_mlp]`` from the MLP's own projection modules and activation; for a mixture of experts,
    from its router and experts by hand: ``w_e · act(x W_gate[e]) ⊙ (x W_up[e])`` over the top-k."""
    spec = model.spec
    if spec.experts is not None:
        return experts.coefficients(model, layer, normed)
    act = model.mlp_act(layer)
    up = model.module(spec.mlp_in, layer)(normed[None])[0]
    if spec.gate_up is not None:  # one projection writes [gate | up] (or [up | gate]): Phi-3
        first, second = up.chunk(2)
        gate, up = (first, second) if spec.gate_up == "gate_first" else (second, first)
        return act(gate) * up
    if spec.gated_mlp:
        return act(model.module(spec.mlp_gate, layer)(normed[None])[0]) * up
    return act(up)


def ffn_subvalue(model, acts: dict, layer: int, pos: int, k: int) -> torch.Tensor:
    """``c_k w_k`` at ``pos`` as added to the residual (Gemma-2: through the post-norm's actual scale)."""
    c = acts[(layer, "mlp_post")][pos]
    s = c[k] * _value_vector(model, layer, k)
    if model.spec.mlp_post_norm is not None:
        if model.spec.experts is None:
            pre = model.module(model.spec.mlp_out_proj, layer)(c[None])[0].detach()
        else:  # the experts' (and shared expert's) output: every neuron's c_k w_k summed
            pre = sum(c[i] * _value_vector(model, layer, i) for i in range(len(c))).detach()
        params = model.norm_params(model.spec.mlp_post_norm, layer)
        s = s * gain(model, model.spec.mlp_post_norm, layer) / (pre.pow(2).mean() + params.eps).sqrt()
    return s


def top_tokens(model, vector: torch.Tensor, n: int) -> list[int]:
    """Top ``n`` token ids of ``W_U (γ_f ⊙ centre(v))``."""
    params = model.norm_params(model.spec.final_norm)
    v = vector - vector.mean() if params.kind == "layer" else vector
    g = params.gain(model.dtype, "cpu")
    v = v if g is None else v * g
    return (model.W_U @ v).topk(n).indices.tolist()


def ov_tokens(model, layer: int, head: int, w: torch.Tensor, n: int) -> list[int]:
    """Top tokens of ``W_O^h (W_V^h ln_1(w) + b_V^h)`` (+ Gemma-2 post-attention norm)."""
    ln_1 = model.spec.ln_1  # None: the attention reads the residual itself (OLMo-2)
    x = w if ln_1 is None else model.module(ln_1, layer)(w[None])[0].detach()
    W_V = model.W_V(layer)  # [H_kv, d, d_head] of this layer
    kv = head // (model.n_heads // len(W_V))
    v = x @ W_V[kv]
    if model.b_V(layer) is not None:
        v = v + model.b_V(layer)[kv]
    out = v @ model.W_O(layer)[head]
    if model.spec.attn_post_norm is not None:
        out = model.module(model.spec.attn_post_norm, layer)(out[None])[0].detach()
    return top_tokens(model, out, n)


def add_shares(scores: list, parts: list, imp: float, guard: float) -> bool:
    """Add ``share_c · imp`` of the ``(index, c·key)`` parts into ``scores``; False when guarded."""
    total = sum(d for _, d in parts)
    if abs(total) < guard * sum(abs(d) for _, d in parts) or total == 0:
        return False
    for i, d in parts:
        scores[i] += d / total * imp
    return True


def naive_query(
    model,
    ids: torch.Tensor,
    neurons: list,
    units: list,
    *,
    ffn_key_kind: str = "linearized",
    centre: bool = True,
    guard: float = 1e-3,
    n_query: int = 300,
    n_show: int = 10,
    n_tokens: int = 10,
) -> dict:
    """Y&A-6 (a)–(d) for one prompt ``ids [T]``."""
    acts = activations(model, ids)
    L, n_comp = model.n_layers, 2 * model.n_layers + 1
    centre = centre and model.spec.norm == "layer"
    dot = lambda c, key: float((c - c.mean()) @ key) if centre else float(c @ key)  # noqa: E731
    out = {"ffn_value": [0.0] * n_comp, "attn_unit": [0.0] * n_comp, "unstable": [0, 0, 0]}

    for layer, k, imp in neurons:  # (a)
        key = ffn_key(model, acts, layer, k, ffn_key_kind)
        parts = [(i, dot(c, key)) for i, c in components(model, acts, -1, layer, not model.spec.parallel)]
        out["unstable"][0] += not add_shares(out["ffn_value"], parts, imp, guard)

    query = torch.zeros(L, model.d_mlp, dtype=torch.float64)
    best = {}
    for layer, head, dim, j, imp in units:  # (b) and (c)
        W_V = model.W_V(layer)  # [H_kv, d, d_head] of this layer
        key = W_V[head // (model.n_heads // len(W_V))][:, dim] * gain(model, model.spec.ln_1, layer)
        key = key * norm_gate(model, model.spec.ln_1, layer, acts[(layer, "resid_pre")][j])
        parts = [(i, dot(c, key)) for i, c in components(model, acts, j, layer, False)]
        out["unstable"][1] += not add_shares(out["attn_unit"], parts, imp, guard)
        denom = dot(acts[(layer, "resid_pre")][j], key)
        if abs(denom) < guard * sum(abs(d) for _, d in parts) or denom == 0:
            out["unstable"][2] += 1
            continue
        for i in range(layer):
            for k in range(model.d_mlp):
                share = dot(ffn_subvalue(model, acts, i, j, k), key) / denom * imp
                query[i, k] += share
                if (i, k) not in best or share > best[(i, k)][0]:
                    best[(i, k)] = (share, layer, head)
    out["query"] = query

    flat = query.reshape(-1)
    order = sorted((float(-flat[f]), f) for f in range(len(flat)) if flat[f] != 0)
    out["ranked"] = [(f // model.d_mlp, f % model.d_mlp, float(flat[f])) for _, f in order[:n_query]]
    out["shown"] = {
        (i, k): shown_tokens(model, i, k, *best[(i, k)][1:], n_tokens) for i, k, _ in out["ranked"][:n_show]
    }
    return out


def shown_tokens(model, i: int, k: int, layer: int, head: int, n: int) -> tuple:
    """(d): ``(head layer, head, OV-mapped top tokens, own top tokens)`` of FFN neuron ``(i, k)``."""
    w = _value_vector(model, i, k)
    if model.spec.mlp_post_norm is not None:
        w = w * gain(model, model.spec.mlp_post_norm, i)
    return layer, head, ov_tokens(model, layer, head, w, n), top_tokens(model, w, n)


def _value_vector(model, layer: int, k: int) -> torch.Tensor:
    """The vector neuron ``k`` writes: a column of the down projection, or of expert ``k // width``'s
    (its bias for the last neuron of each expert that has one)."""
    spec = model.spec
    if spec.experts is None:
        return weight_vector(model.module(spec.mlp_out_proj, layer), k, "out")
    return experts.value_vector(model, layer, k)
