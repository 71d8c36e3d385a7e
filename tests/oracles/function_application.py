"""Naive function application (Lv et al. L6, ``methods.md`` §1.2): one unpadded prompt at a time.

A plain HF forward per prompt with hooks (:func:`oracles.early_decoding.capture`, plus a pre-hook on
every ``o_proj`` for its input ``z``, a hook on its output, and a pre-hook on every MLP norm for the
MLP's input). At the last position:

- the MLP output ``y`` is the hooked output of the MLP (or of its post-norm / OPT's ``fc2``);
- head ``h``'s output is ``z_h`` times its block of input columns of the raw ``o_proj`` weight,
  through Gemma-2's attention post-norm linearized at the actual attention output;
- the remainder is ``y − X β̂`` from ``numpy.linalg.lstsq`` (an all-ones column with an intercept),
  with the heads ``γ ⊙ centre(o) / ρ`` at the MLP norm's actual input in ``normalized`` space;
- each vector is decoded over the **full vocabulary** with the frozen final-norm scale
  (:func:`oracles.early_decoding.frozen_decoder`), and ranks, candidates' ranks and cosines are
  counted by hand.

No recallscope core helper (caches, site hooks, frozen head, regression) is used.
"""

from __future__ import annotations

import numpy as np
import torch

from oracles.early_decoding import capture, frozen_decoder


def _hooks(model):
    """Save ``z`` (``o_proj`` input), the ``o_proj`` output and the MLP norm's input at the last position."""
    H, Dh, d = model.n_heads, model.d_head, model.d_model

    def hooks(stack, saved):
        for layer in range(model.n_layers):
            o_proj = model.module(model.spec.o_proj, layer)
            # the residual the MLP reads: its norm's input, or its own input without a norm (OLMo-2)
            norm = model.module(model.spec.mlp_norm or model.spec.mlp, layer)

            def z_hook(module, args, kwargs, layer=layer):
                x = args[0] if args else next(iter(kwargs.values()))
                saved[("z", layer)] = x.detach().reshape(-1, H * Dh)[-1]

            def out_hook(module, args, out, layer=layer):
                saved[("attn_pre", layer)] = out.detach().reshape(-1, d)[-1]

            def norm_hook(module, args, kwargs, layer=layer):
                x = args[0] if args else next(iter(kwargs.values()))
                saved[("mlp_in", layer)] = x.detach().reshape(-1, d)[-1]

            stack.enter_context(o_proj.register_forward_pre_hook(z_hook, with_kwargs=True))
            stack.enter_context(o_proj.register_forward_hook(out_hook))
            stack.enter_context(norm.register_forward_pre_hook(norm_hook, with_kwargs=True))

    return hooks


def _heads(model, saved, layer: int) -> np.ndarray:
    """``[H, d]`` outputs of the heads of attention ``layer`` (Gemma-2's post-norm folded in)."""
    Dh = model.d_head
    weight = model.module(model.spec.o_proj, layer).weight.detach().double()
    linear = weight.T if model.spec.conv1d else weight  # [d_out, H·d_h]
    z = saved[("z", layer)].double()
    out = np.stack(
        [(linear[:, h * Dh : (h + 1) * Dh] @ z[h * Dh : (h + 1) * Dh]).numpy() for h in range(model.n_heads)]
    )
    if model.spec.attn_post_norm is not None:
        params = model.norm_params(model.spec.attn_post_norm, layer)
        pre = saved[("attn_pre", layer)].double().numpy()
        gain = params.weight.double().numpy()
        gain = 1 + gain if params.offset_one else gain
        out = out * gain / np.sqrt((pre**2).mean() + params.eps)
    return out


def _normalized(model, saved, layer: int, X: np.ndarray) -> np.ndarray:
    """The heads as the MLP norm sees them: ``γ ⊙ centre(o) / ρ`` at the MLP's actual input."""
    params = model.norm_params(model.spec.mlp_norm, layer)
    r = saved[("mlp_in", layer)].double().numpy()
    if params.kind == "layer":
        X, r = X - X.mean(-1, keepdims=True), r - r.mean()
    rho = np.sqrt((r**2).mean() + params.eps)
    if params.weight is not None:
        gain = params.weight.double().numpy()
        X = X * (1 + gain if params.offset_one else gain)
    return X / rho


def _feeding(model, layer: int) -> int | None:
    if not model.spec.parallel:
        return layer
    return layer - 1 if layer > 0 else None


def naive_components(
    model, ids: torch.Tensor, layers, *, regressors="feeding_layer", intercept=False, space="raw"
):
    """``({"mlp_out": [L, d], "remainder": [L, d]}, final residual [d])`` of the unpadded prompt ``ids``."""
    saved = capture(model, ids, extra=_hooks(model))
    mlp_out, remainder = [], []
    for layer in layers:
        y = saved[("mlp", layer)].double().numpy()
        mlp_out.append(y)
        feeding = _feeding(model, layer)
        sources = (
            [] if feeding is None else ([feeding] if regressors == "feeding_layer" else range(feeding + 1))
        )
        columns = [_heads(model, saved, s) for s in sources]
        X = np.concatenate(columns) if columns else np.zeros((0, model.d_model))  # [n, d]
        if space == "normalized" and len(X):
            X = _normalized(model, saved, layer, X)
        A = X.T  # [d, n]
        if intercept:
            A = np.concatenate([A, np.ones((model.d_model, 1))], 1)
        if A.shape[1]:
            beta = np.linalg.lstsq(A, y, rcond=None)[0]
            remainder.append(y - A @ beta)
        else:
            remainder.append(y.copy())
    return {"mlp_out": np.stack(mlp_out), "remainder": np.stack(remainder)}, saved["final"]


def first_token(model, prompt: str, answer: str) -> int:
    """The first token of ``" " + answer`` right after ``prompt``, read off the joint tokenization."""
    tok = model.tokenizer
    alone = tok(prompt)["input_ids"]
    return tok(prompt + " " + answer)["input_ids"][len(alone)]


def naive_readings(model, vector: np.ndarray, decode, target: int, candidates: list[int], W_U) -> dict:
    """The frame's numbers for one component, from its full-vocabulary logits (``W_U [V, d]`` numpy)."""
    logits = decode(torch.from_numpy(vector)).numpy()  # [V]
    logit = logits[target]
    others = [c for c in dict.fromkeys(candidates) if c != target]

    def cosine(t):
        return float(vector @ W_U[t] / (np.linalg.norm(vector) * np.linalg.norm(W_U[t])))

    return {
        "norm": float(np.linalg.norm(vector)),
        "logit": float(logit),
        "rank": 1 + int((logits > logit).sum()),
        "relation_rank": 1 + sum(1 for c in others if logits[c] > logit),
        "n_candidates": 1 + len(others),
        "margin": float(logit - np.mean([logits[c] for c in others])) if others else float("nan"),
        "cosine": cosine(target),
        "cosine_others": float(np.mean([cosine(c) for c in others])) if others else float("nan"),
        "top_token": model.tokenizer.decode([int(np.argmax(logits))]),
    }


def naive_function_application(
    model, ids, cf_ids, target: int, new: int | None, candidates, layers, components, **fit
) -> dict:
    """``{column: [L, C]}`` for one fact (``cf_ids``: its counterfactual prompt, or None)."""
    vectors, final = naive_components(model, ids, layers, **fit)
    decode = frozen_decoder(model, final)
    W_U = model.W_U.double().numpy()
    out: dict = {}
    for c, name in enumerate(components):
        for i in range(len(layers)):
            for key, value in naive_readings(
                model, vectors[name][i], decode, target, candidates, W_U
            ).items():
                out.setdefault(key, np.empty((len(layers), len(components)), dtype=object))[i, c] = value
    if cf_ids is not None:
        cf_vectors, cf_final = naive_components(model, cf_ids, layers, **fit)
        cf_decode = frozen_decoder(model, cf_final)
        for key in ("cf_logit_new", "cf_logit_old", "follows", "shift"):
            out[key] = np.zeros((len(layers), len(components)))
        for c, name in enumerate(components):
            for i in range(len(layers)):
                clean = decode(torch.from_numpy(vectors[name][i])).numpy()
                cf = cf_decode(torch.from_numpy(cf_vectors[name][i])).numpy()
                out["cf_logit_new"][i, c], out["cf_logit_old"][i, c] = cf[new], cf[target]
                out["follows"][i, c] = float(cf[new] > cf[target])
                out["shift"][i, c] = (cf[new] - cf[target]) - (clean[new] - clean[target])
    return out
