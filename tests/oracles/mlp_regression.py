"""Naive MLP "activation" regression (Lv et al. L5, ``methods.md`` §1.2): one unpadded prompt at a time.

A plain HF forward with hooks saving, at the last position: each ``o_proj`` input ``z`` and output,
the input of the norm in front of the MLP (the MLP's input residual), the MLP's output (after
Gemma-2's post-norm) and each block's output. Each head's output is ``z_h`` times its block of input
columns of the raw ``o_proj`` weight, sliced by hand (GPT-2's ``Conv1D`` stores the transpose), with
Gemma-2's attention post-norm linearized at the true attention output. Then:

- fits with ``numpy.linalg.lstsq`` per example (or on the stacked examples when pooled);
- the linearized MLP: the full ``d × d`` Jacobian of :func:`recallscope.core.mlp.mlp_function` by
  ``torch.autograd.functional.jacobian`` (reverse mode), times each head output;
- ranks: the logit lens written out by hand (final norm from the vector itself, ``W_U``, ``b_U``,
  soft-cap) over the full vocabulary.
"""

from __future__ import annotations

import numpy as np
import torch

from oracles.early_decoding import capture
from oracles.query_attribution import norm_gate
from recallscope.core.mlp import mlp_function


def _hooks(model):
    """Save ``z`` and the ``o_proj`` output, the MLP input, and the block output at the last position."""
    spec, d = model.spec, model.d_model
    blocks = model.module(spec.blocks)

    def hooks(stack, saved):
        for layer in range(model.n_layers):

            def z_in(module, args, kwargs, layer=layer):
                x = args[0] if args else next(iter(kwargs.values()))
                saved[("z", layer)] = x.detach().reshape(-1, x.shape[-1])[-1]

            def o_out(module, args, out, layer=layer):
                saved[("pre", layer)] = out.detach().reshape(-1, d)[-1]

            def mlp_in(module, args, kwargs, layer=layer):
                x = args[0] if args else next(iter(kwargs.values()))
                saved[("resid", layer)] = x.detach().reshape(-1, d)[-1]

            def block_out(module, args, out, layer=layer):
                out = out[0] if isinstance(out, tuple) else out
                saved[("post", layer)] = out.detach().reshape(-1, d)[-1]

            o_proj = model.module(spec.o_proj, layer)
            stack.enter_context(o_proj.register_forward_pre_hook(z_in, with_kwargs=True))
            stack.enter_context(o_proj.register_forward_hook(o_out))
            # the residual the MLP reads: its norm's input, or its own input without a norm (OLMo-2)
            reader = model.module(spec.ln_2 or spec.mlp, layer)
            stack.enter_context(reader.register_forward_pre_hook(mlp_in, with_kwargs=True))
            stack.enter_context(blocks[layer].register_forward_hook(block_out))

    return hooks


def head_output(model, saved: dict, layer: int, h: int) -> torch.Tensor:
    """``[d]`` float64 output of head ``h`` of ``layer`` (Gemma-2: post-norm at the true output's scale)."""
    Dh = model.d_head
    weight = model.module(model.spec.o_proj, layer).weight.detach().double()
    linear = weight.T if model.spec.conv1d else weight  # [d_out, H·d_h]
    o = linear[:, h * Dh : (h + 1) * Dh] @ saved[("z", layer)].double()[h * Dh : (h + 1) * Dh]
    if model.spec.attn_post_norm is None:
        return o
    params = model.norm_params(model.spec.attn_post_norm, layer)
    pre = saved[("pre", layer)].double()
    rho = torch.sqrt((pre**2).mean() + params.eps)
    gain = params.weight.double()
    gain = 1 + gain if params.offset_one else gain
    return gain * o / rho


def heads_of(model, layer: int, regressors: str) -> list[tuple[int, int]]:
    """Regressor ``(source_layer, head)``: the attention layer the MLP reads (``layer``, or ``layer-1``
    for parallel blocks, none for their MLP 0), or it and every earlier one."""
    feeding = layer - 1 if model.spec.parallel else layer
    if feeding < 0:
        return []
    sources = [feeding] if regressors == "feeding_layer" else list(range(feeding + 1))
    return [(s, h) for s in sources for h in range(model.n_heads)]


def normalized(model, layer: int, resid: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """``γ ⊙ centre(o) / ρ(resid)`` with the MLP norm's scale (and a gated norm's gate) frozen on its
    actual input.
    """
    if model.spec.ln_2 is None:  # the MLP reads the residual itself (OLMo-2): it sees o as it is
        return o
    params = model.norm_params(model.spec.ln_2, layer)
    if params.kind == "layer":
        rho = torch.sqrt(((resid - resid.mean()) ** 2).mean() + params.eps)
        o = o - o.mean()
    else:
        rho = torch.sqrt((resid**2).mean() + params.eps)
    gate = norm_gate(model, model.spec.ln_2, layer, resid)  # a gated norm's gate, frozen (else 1)
    if params.weight is None:
        return gate * o / rho
    gain = params.weight.double()
    gain = 1 + gain if params.offset_one else gain
    return gate * gain * o / rho


def logit_lens_ranks(model, W_U: torch.Tensor, x: torch.Tensor, tokens) -> list[float]:
    """1-based ranks of ``tokens`` under the model's own head applied to ``x [d]`` (full vocabulary;
    ``W_U`` the float64 unembedding, converted once by the caller); NaN for a token -1."""
    params = model.norm_params(model.spec.final_norm)
    x = x.double()
    if params.kind == "layer":
        x = x - x.mean()
    x = x / torch.sqrt((x**2).mean() + params.eps)
    if params.weight is not None:
        x = x * (1 + params.weight.double() if params.offset_one else params.weight.double())
    if params.bias is not None:
        x = x + params.bias.double()
    logits = W_U @ x
    if model.b_U is not None:
        logits = logits + model.b_U.double()
    cap = model.spec.final_logit_softcap
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return [float("nan") if t < 0 else float(1 + (logits > logits[t]).sum()) for t in tokens]


def lstsq(y: np.ndarray, X: np.ndarray, intercept: bool):
    """``(coef [n], c, remainder [m], r2)`` of ``y [m]`` on the columns of ``X [m, n]``."""
    A = np.concatenate([X, np.ones((len(y), 1))], 1) if intercept else X
    solution = np.linalg.lstsq(A, y, rcond=None)[0]
    remainder = y - A @ solution
    total = y - y.mean() if intercept else y
    r2 = 1 - (remainder @ remainder) / (total @ total)
    return (solution[:-1], solution[-1], remainder, r2) if intercept else (solution, None, remainder, r2)


def naive_mlp_regression(model, prompts, tokens, config) -> dict:
    """Every number of the method for unpadded prompts ``ids [T]`` with ``tokens`` ``(subject, target)``.

    Returns a dict of ``[F, layer(, n_max)]`` arrays named as the result's fields, plus ``remainder``
    ``[F, layer, d]`` and the ranks.
    """
    layers = list(range(model.n_layers)) if config.layers is None else list(config.layers)
    saved = [capture(model, ids, extra=_hooks(model)) for ids in prompts]
    F, d, W_U = len(prompts), model.d_model, model.W_U.double()
    heads = {layer: heads_of(model, layer, config.regressors) for layer in layers}
    n_max = max(len(h) for h in heads.values())
    out = {
        k: np.full((F, len(layers), n_max), np.nan)
        for k in ("coef", "head_norm", "linear_coef", "linear_norm")
    }
    names = [
        "r2",
        "r2_adjusted",
        "fitted_norm",
        "remainder_norm",
        "y_norm",
        "intercept",
        "linear_total_norm",
        "linear_total_cos",
    ]
    names += [f"{t}_rank_{w}" for t in ("subject", "target") for w in ("before", "after")]
    out.update({k: np.full((F, len(layers)), np.nan) for k in names})
    out["remainder"] = np.zeros((F, len(layers), d))
    for i, layer in enumerate(layers):
        ys, Xs, raws, resids = [], [], [], []
        for s in saved:
            y = s[("mlp", layer)].double()
            resid = s[("resid", layer)].double()
            raw = [head_output(model, s, src, h) for src, h in heads[layer]]
            X = raw if config.space == "raw" else [normalized(model, layer, resid, o) for o in raw]
            ys.append(y.numpy())
            Xs.append(np.stack([x.numpy() for x in X], 1) if X else np.zeros((d, 0)))
            raws.append(raw)
            resids.append(resid)
        n = len(heads[layer])
        for f in range(F):
            out["y_norm"][f, i] = np.linalg.norm(ys[f])
            for k, o in enumerate(raws[f]):
                out["head_norm"][f, i, k] = float(o.norm())
            after = saved[f][("post", layer)].double()
            for when, x in (("before", after - saved[f][("mlp", layer)].double()), ("after", after)):
                ranks = logit_lens_ranks(model, W_U, x, tokens[f])
                out[f"subject_rank_{when}"][f, i], out[f"target_rank_{when}"][f, i] = ranks
        if n == 0:  # only the intercept: a scalar per fact, or a vector shared by the facts when pooled
            offset = np.mean(ys, 0) if config.pooled else np.array([[y.mean()] for y in ys])
            for f in range(F):
                out["remainder"][f, i] = ys[f] - (offset if config.pooled else offset[f]) * config.intercept
            continue
        if config.pooled:
            _pooled(out, i, ys, Xs, config.intercept)
        else:
            for f in range(F):
                coef, c, rest, r2 = lstsq(ys[f], Xs[f], config.intercept)
                out["coef"][f, i, :n], out["r2"][f, i], out["remainder"][f, i] = coef, r2, rest
                out["intercept"][f, i] = np.nan if c is None else c
        m, c = d * (F if config.pooled else 1), int(config.intercept)
        out["r2_adjusted"][:, i] = 1 - (1 - out["r2"][:, i]) * (m - c) / (m - n - c)
        for f in range(F):
            out["remainder_norm"][f, i] = np.linalg.norm(out["remainder"][f, i])
            out["fitted_norm"][f, i] = np.linalg.norm(ys[f] - out["remainder"][f, i])
            if config.linearized:
                _linear(model, layer, resids[f], raws[f], ys[f], out, f, i)
    return out


def _pooled(out, i, ys, Xs, intercept: bool) -> None:
    """One ``β`` over all facts: stack the examples (centred over examples with an intercept)."""
    Y, X = np.stack(ys), np.stack(Xs)  # [F, d], [F, d, n]
    y_mean, X_mean = (Y.mean(0), X.mean(0)) if intercept else (0.0, 0.0)
    Yc, Xc = Y - y_mean, X - X_mean
    beta = np.linalg.lstsq(Xc.reshape(-1, X.shape[2]), Yc.reshape(-1), rcond=None)[0]
    offset = y_mean - X_mean @ beta if intercept else 0.0
    rest = Y - (np.einsum("fdn,n->fd", X, beta) + offset)
    r2 = 1 - (rest**2).sum() / (Yc**2).sum()
    out["coef"][:, i, : len(beta)] = beta
    out["r2"][:, i] = r2
    out["remainder"][:, i] = rest


def _linear(model, layer, resid, raw, y, out, f, i) -> None:
    mlp, at = mlp_function(model, layer), resid.to(model.dtype)
    J = torch.autograd.functional.jacobian(mlp, at, vectorize=True).double()  # [d, d], reverse mode
    total = torch.zeros_like(resid)
    for k, o in enumerate(raw):
        Jo = J @ o
        out["linear_coef"][f, i, k] = float(Jo @ o / (o @ o))
        out["linear_norm"][f, i, k] = float(Jo.norm())
        total = total + Jo
    out["linear_total_norm"][f, i] = float(total.norm())
    y = torch.as_tensor(y)
    out["linear_total_cos"][f, i] = float(total @ y / (total.norm() * y.norm()))
