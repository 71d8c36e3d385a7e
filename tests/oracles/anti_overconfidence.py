"""Naive anti-overconfidence (Lv et al. L7, ``methods.md`` §1): one unpadded prompt at a time.

Written from the method notes, not from recallscope's implementation:

- attribution: one plain HF forward per fact with hooks on ``o_proj`` (input ``z`` and output), on
  the MLP output projection (input: the coefficients ``c_k``; output: the MLP before Gemma-2's
  post-norm) and on the modules whose output is added to the residual stream; each head output
  ``W_O[:, h·d_h:(h+1)·d_h] z_h``, ``b_O``, the MLP update and every neuron ``c_k w_k`` (Gemma-2's
  post-norm linearized at its actual scale) is decoded over the **full vocabulary** with the frozen
  final-norm scale; ``logit`` is the target's entry, ``iw`` the target's minus the vocabulary mean;
- the split: distinct ``base_id`` ranked by ``sha256(f"{seed}:{key}")``, the first
  ``round(fraction × n)`` (half up) are train;
- candidates: train-mean logit < 0 (heads, MLP, the most negative neurons), most negative first;
- the grid: for every candidate, every scale and every train fact, a plain forward with a hook that
  multiplies the component (the head's ``z`` slice at the ``o_proj`` input, the MLP module's output,
  the neuron's coefficient at the output projection's input) at every or the last position;
- evaluation and perplexity: the same hooked forward, one fact (one text window) at a time.
"""

from __future__ import annotations

import contextlib
import hashlib

import numpy as np
import torch

from oracles import experts
from oracles.early_decoding import capture, frozen_decoder, unpadded
from oracles.head_promotion import _head_output, _post_norm, _z_hooks


def _mlp_hooks(model, layers):
    """Save the MLP output projection's input (coefficients) and output at the last position."""

    def hooks(stack, saved):
        if model.spec.experts is not None:  # a mixture of experts: coefficients by hand from its input
            return _expert_hooks(model, layers)(stack, saved)
        for layer in layers:
            proj = model.module(model.spec.mlp_out_proj, layer)

            def pre(module, args, kwargs, layer=layer):
                x = args[0] if args else next(iter(kwargs.values()))
                saved[("coeffs", layer)] = x.detach().reshape(-1, model.d_mlp)[-1]

            def post(module, args, out, layer=layer):
                saved[("mlp_pre", layer)] = out.detach().reshape(-1, model.d_model)[-1].clone()

            stack.enter_context(proj.register_forward_pre_hook(pre, with_kwargs=True))
            stack.enter_context(proj.register_forward_hook(post))

    return hooks


def _expert_hooks(model, layers):
    def hooks(stack, saved):
        for layer in layers:
            block = model.module(model.spec.mlp, layer)

            def post(module, args, out, layer=layer):
                normed = args[0].detach().reshape(-1, model.d_model)[-1].double()
                out = out[0] if isinstance(out, tuple) else out
                saved[("coeffs", layer)] = experts.coefficients(model, layer, normed.to(model.dtype)).detach()
                saved[("mlp_pre", layer)] = out.detach().reshape(-1, model.d_model)[-1].clone()

            stack.enter_context(block.register_forward_hook(post))

    return hooks


def _value(model, layer: int, k: int) -> torch.Tensor:
    if model.spec.experts is not None:
        return experts.value_vector(model, layer, k).double()
    W = model.module(model.spec.mlp_out_proj, layer).weight.detach().double()  # Linear [d, d_mlp]
    return W[k] if model.spec.conv1d else W[:, k]  # GPT-2's Conv1D is [d_mlp, d]


def _mlp_post(model, layer: int, pre: torch.Tensor):
    """Gemma-2's MLP post-norm linearized at the true MLP output ``pre``: ``c ↦ γ c / ρ``."""
    if model.spec.mlp_post_norm is None:
        return lambda c: c
    params = model.norm_params(model.spec.mlp_post_norm, layer)
    rho = torch.sqrt((pre**2).mean() + params.eps)
    gain = params.weight.to(pre.dtype)
    gain = 1 + gain if params.offset_one else gain
    return lambda c: gain * c / rho


def naive_attribution(model, ids: torch.Tensor, target: int, layers, neurons=None) -> dict:
    """``{(kind, layer, index): (logit, iw)}`` for every head, ``attn_bias`` (if any), ``mlp`` and
    every neuron of ``layers`` (or only ``neurons[layer]``), at the last position of the unpadded
    prompt ``ids``."""
    both = lambda stack, saved: (_z_hooks(model)(stack, saved), _mlp_hooks(model, layers)(stack, saved))  # noqa: E731
    saved = {k: v.double() for k, v in capture(model, ids, extra=both).items()}
    decode = frozen_decoder(model, saved["final"])

    def read(vector):
        logits = decode(vector)
        return float(logits[target]), float(logits[target] - logits.mean())

    out = {}
    for layer in layers:
        o_proj = model.module(model.spec.o_proj, layer)
        post = _post_norm(model, layer, saved[("pre", layer)])
        weight = o_proj.weight.detach().double()
        for h in range(model.n_heads):
            out[("head", layer, h)] = read(
                post(_head_output(model, weight, saved[("z", layer)], h, "input_columns"))
            )
        if o_proj.bias is not None:
            out[("attn_bias", layer, -1)] = read(post(o_proj.bias.detach().double()))
        out[("mlp", layer, -1)] = read(saved[("mlp", layer)])
        mlp_post = _mlp_post(model, layer, saved[("mlp_pre", layer)])
        for k in range(model.d_mlp) if neurons is None else neurons[layer]:
            out[("neuron", layer, k)] = read(mlp_post(saved[("coeffs", layer)][k] * _value(model, layer, k)))
    return out


def split(keys, fraction: float, seed: int) -> list[bool]:
    unique = sorted(set(keys))
    ranked = sorted(unique, key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).hexdigest())
    n_train = min(max(int(fraction * len(unique) + 0.5), 1), len(unique) - 1)
    return [k in ranked[:n_train] for k in keys]


@contextlib.contextmanager
def scaled(model, cell, positions: str):
    """A plain hook multiplying one component by ``scale`` at every or the last position (batch 1)."""
    if cell is None:
        yield
        return
    (kind, layer, index), scale = cell

    def mask(x, width):
        flat = x.reshape(-1, width)  # batch 1: rows are positions
        factor = torch.ones(flat.shape[0], 1, dtype=x.dtype, device=x.device)
        if positions == "all":
            factor[:] = scale
        else:
            factor[-1] = scale
        return flat, factor

    if kind == "head":
        module, Dh = model.module(model.spec.o_proj, layer), model.d_head

        def pre(mod, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            flat, factor = mask(x, model.n_heads * Dh)
            flat = flat.clone()
            flat[:, index * Dh : (index + 1) * Dh] *= factor
            return (flat.reshape(x.shape), *args[1:]), kwargs

        handle = module.register_forward_pre_hook(pre, with_kwargs=True)
    elif kind == "neuron" and model.spec.experts is not None:  # add (scale - 1) c_k w_k to the output
        module = model.module(model.spec.mlp, layer)
        w_k = _value(model, layer, index)

        def post(mod, args, out):
            x = out[0] if isinstance(out, tuple) else out
            normed = args[0].reshape(-1, model.d_model)
            c = torch.stack([experts.coefficients(model, layer, row)[index] for row in normed])
            flat, factor = mask(x, model.d_model)
            new = (flat + (factor - 1) * c[:, None] * w_k.to(flat.dtype)).reshape(x.shape)
            return (new, *out[1:]) if isinstance(out, tuple) else new

        handle = module.register_forward_hook(post)
    elif kind == "neuron":
        module = model.module(model.spec.mlp_out_proj, layer)

        def pre(mod, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            flat, factor = mask(x, model.d_mlp)
            flat = flat.clone()
            flat[:, index : index + 1] *= factor
            return (flat.reshape(x.shape), *args[1:]), kwargs

        handle = module.register_forward_pre_hook(pre, with_kwargs=True)
    else:
        spec = model.spec
        module = model.module(spec.mlp_post_norm or spec.mlp or spec.mlp_out_proj, layer)

        def post(mod, args, out):
            x = out[0] if isinstance(out, tuple) else out
            flat, factor = mask(x, model.d_model)
            new = (flat * factor).reshape(x.shape)
            return (new, *out[1:]) if isinstance(out, tuple) else new

        handle = module.register_forward_hook(post)
    try:
        yield
    finally:
        handle.remove()


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.hf_model(input_ids=ids[None].to(model.device), use_cache=False).logits[0].double()


def scores(model, ids, target: int, cell=None, positions: str = "all") -> dict:
    with scaled(model, cell, positions):
        logp = _logits(model, ids)[-1].log_softmax(-1)
    return {
        "prob": float(logp[target].exp()),
        "log_prob": float(logp[target]),
        "correct": float(int(logp.argmax()) == target),
        "confidence": float(logp.max().exp()),
    }


def text_nll(model, ids: torch.Tensor, window: int, cell=None) -> list[tuple[int, float]]:
    """``(tokens scored, summed NLL)`` per window of ``ids``, the component scaled at every position."""
    out = []
    for start in range(0, len(ids), window):
        chunk = ids[start : start + window]
        if len(chunk) < 2:
            continue
        with scaled(model, cell, "all"):
            logp = _logits(model, chunk).log_softmax(-1)
        out.append((len(chunk) - 1, float(sum(-logp[i, int(chunk[i + 1])] for i in range(len(chunk) - 1)))))
    return out


def _components_and_candidates(model, attributions, train, layers, config):
    """The frame's components and the ``(component, train mean)`` candidates, by plain loops."""
    F = len(attributions)
    train_rows = [f for f in range(F) if train[f]]

    def mean(key, rows):
        return sum(attributions[f][key][0] for f in rows) / len(rows)

    components, pool, top_of = [], [], {}
    for layer in layers:
        components += [("head", layer, h) for h in range(model.n_heads)]
        if ("attn_bias", layer, -1) in attributions[0]:
            components.append(("attn_bias", layer, -1))
        components.append(("mlp", layer, -1))
        strength = [abs(mean(("neuron", layer, n), range(F))) for n in range(model.d_mlp)]
        top_of[layer] = sorted(range(model.d_mlp), key=lambda n: (-strength[n], n))[: config.top_neurons]
        components += [("neuron", layer, n) for n in top_of[layer]]
        for key in [("head", layer, h) for h in range(model.n_heads)] + [("mlp", layer, -1)]:
            if mean(key, train_rows) < 0:
                pool.append((key, mean(key, train_rows)))
        neuron_means = [mean(("neuron", layer, n), train_rows) for n in range(model.d_mlp)]
        for n in sorted(range(model.d_mlp), key=lambda n: (neuron_means[n], n))[: config.top_neurons]:
            if neuron_means[n] < 0:
                pool.append((("neuron", layer, n), neuron_means[n]))
    ranked = sorted(enumerate(pool), key=lambda item: (item[1][1], item[0]))
    candidates = [c for _, c in ranked[: config.max_candidates]]
    for (kind, layer, n), _ in candidates:  # candidate neurons outside the top join the components
        if kind == "neuron" and n not in top_of[layer]:
            at = max(i for i, c in enumerate(components) if c[1] == layer) + 1
            components.insert(at, ("neuron", layer, n))
            top_of[layer].append(n)
    return components, candidates


def naive_anti_overconfidence(model, facts, config, text_ids=None) -> dict:
    """Everything the method computes, by loops; ``text_ids`` the perplexity text (None: skipped)."""
    batch = facts.to_batch(model)
    F = len(batch)
    layers = range(model.n_layers - config.layers_from_end, model.n_layers)
    prompts = [unpadded(batch, f) for f in range(F)]
    if config.target == "gold":
        targets = [int(t) for t in batch.target_ids]
    else:
        targets = [int(_logits(model, ids)[-1].argmax()) for ids in prompts]
    by_base = config.split_by == "base_id"
    train = split(
        [f.attributes.get("base_id", f.fact_id) if by_base else f.fact_id for f in facts],
        config.train_fraction,
        config.seed,
    )
    attributions = [naive_attribution(model, prompts[f], targets[f], layers) for f in range(F)]
    components, candidates = _components_and_candidates(model, attributions, train, layers, config)
    train_rows = [f for f in range(F) if train[f]]
    before = [scores(model, prompts[f], targets[f]) for f in range(F)]
    baseline = sum(before[f]["log_prob"] for f in train_rows) / len(train_rows)
    grid = []
    for component, _ in candidates:
        for scale in config.scales:
            values = [
                scores(model, prompts[f], targets[f], (component, scale), config.positions)["log_prob"]
                for f in train_rows
            ]
            grid.append(((component, scale), sum(values) / len(values)))
    choice = None
    if grid:
        best = max(range(len(grid)), key=lambda i: (grid[i][1], -i))
        choice = grid[best][0] if grid[best][1] > baseline else None
    after = [scores(model, prompts[f], targets[f], choice, config.positions) for f in range(F)]
    out = {
        "train": train,
        "targets": targets,
        "components": components,
        "logit": np.array([[attributions[f][c][0] for c in components] for f in range(F)]),
        "iw": np.array([[attributions[f][c][1] for c in components] for f in range(F)]),
        "candidates": candidates,
        "grid": grid,
        "baseline": baseline,
        "choice": choice,
        "before": before,
        "after": after,
    }
    if text_ids is not None:
        window = min(config.ppl_window, model.max_context or config.ppl_window)
        out["nll_before"] = text_nll(model, text_ids, window)
        out["nll_after"] = text_nll(model, text_ids, window, choice)
    return out
