"""Naive early decoding (Yan & Jia Y1, ``methods.md`` §2.2): one unpadded prompt at a time.

A plain HF forward with forward hooks on the modules whose outputs are added to the residual
stream (the attention module, or Gemma-2's attention post-norm; the MLP, its post-norm, or OPT's
``fc2``) and a pre-hook on the final norm (the final residual). Every vector at the last position
is decoded over the **full vocabulary** as ``W_U (γ ⊙ centre(c) / ρ)`` with ``ρ`` the final norm's
scale on the final residual, and the tracked tokens are picked afterwards. No recallscope core
helper (caches, site hooks, frozen head) is used.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch


def frozen_decoder(model, final: torch.Tensor, dtype: torch.dtype = torch.float64):
    """``logits(c) = W_U (γ ⊙ centre(c) / ρ)`` (full vocabulary, no bias), ``ρ`` frozen at ``final [d]``,
    computed in ``dtype`` (float64 in tests; the benchmark uses the model's)."""
    params = model.norm_params(model.spec.final_norm)
    x = final.to(dtype)
    if params.kind == "rms":
        rho = torch.sqrt((x**2).mean() + params.eps)
    else:
        rho = torch.sqrt(((x - x.mean()) ** 2).mean() + params.eps)
    gain = torch.ones_like(x) if params.weight is None else params.weight.to(dtype)
    gain = 1 + gain if params.offset_one else gain
    W_U = model.W_U.to(dtype)

    def decode(c: torch.Tensor) -> torch.Tensor:
        c = c.to(dtype)
        c = c - c.mean() if params.kind == "layer" else c
        return W_U @ (gain * c / rho)

    return decode


def _last(out, d: int, scale: float = 1.0) -> torch.Tensor:
    """The last position of a module output (a tuple's first item; ``[1, T, d]`` or OPT's ``[T, d]``),
    copied (Falcon adds to its MLP output in place) and times the model's residual multiplier."""
    out = out[0] if isinstance(out, tuple) else out
    return out.detach().reshape(-1, d)[-1].clone() * scale


def update_scales(model) -> list[float]:
    """Per block, what one unit of its attention and MLP modules' outputs adds to the final residual:
    the residual multiplier (Granite), or for Beam's depth-scaled adds (``out = sqrt((n-1)/n) x +
    f / sqrt(n)`` at add ``n = 2, 3, …, N = 2L + 1``) ``1 / sqrt(n)`` times every later add's
    ``sqrt((n'-1)/n')``, which telescopes to ``1 / sqrt(N)``.
    """
    if _beam_like(model):
        return [embedding_scale(model)] * model.n_layers
    return [model.spec.residual_scale] * model.n_layers


def embedding_scale(model) -> float:
    """What one unit of block 0's input adds to the final residual: 1, or Beam's ``Π_n sqrt((n-1)/n)
    = 1 / sqrt(N)``."""
    return 1 / math.sqrt(2 * model.n_layers + 1) if _beam_like(model) else 1.0


def _beam_like(model) -> bool:
    """Beam, or the Llama test family whose blocks add as Beam's do (``tiny.residual_coefficients``)."""
    return model.spec.family == "beam" or getattr(model.hf_model, "beam_like_residual", False)


def capture(model, ids: torch.Tensor, extra=None) -> dict:
    """Last-position ``attn`` / ``mlp`` updates ``[L, d]`` and the final residual ``[d]`` of ``ids [T]``.

    ``extra(stack, saved)`` may register more hooks on the same forward.
    """
    spec, d, saved, scales = model.spec, model.d_model, {}, update_scales(model)

    def keep(key):
        return lambda module, args, out: saved.__setitem__(key, _last(out, d, scales[key[1]]))

    def final(module, args):
        saved["final"] = args[0].detach()[0, -1]

    with contextlib.ExitStack() as stack:
        for layer in range(model.n_layers):
            # the modules whose outputs the block adds (BLOOM adds the residual inside its sublayers,
            # so there it is the output projections)
            attn = model.module(spec.attn_out, layer)
            mlp = model.module(spec.mlp_out, layer)
            stack.enter_context(attn.register_forward_hook(keep(("attn", layer))))
            stack.enter_context(mlp.register_forward_hook(keep(("mlp", layer))))
        stack.enter_context(model.module(spec.final_norm).register_forward_pre_hook(final))
        if extra is not None:
            extra(stack, saved)
        with torch.no_grad():
            model.hf_model(input_ids=ids[None].to(model.device), use_cache=False)
    return saved


def naive_early_decoding(
    model, ids: torch.Tensor, token_ids, sites=("attn", "mlp"), dtype: torch.dtype = torch.float64
) -> np.ndarray:
    """``[site, layer, n]`` logits of ``token_ids`` for every update of the unpadded prompt ``ids``."""
    saved = capture(model, ids)
    decode = frozen_decoder(model, saved["final"], dtype)
    out = np.zeros((len(sites), model.n_layers, len(token_ids)))
    for s, site in enumerate(sites):
        for layer in range(model.n_layers):
            logits = decode(saved[(site, layer)])  # [V]
            for i, token in enumerate(token_ids):
                out[s, layer, i] = float(logits[int(token)])
    return out


def identity_parts(model, ids: torch.Tensor, token_ids) -> tuple[np.ndarray, np.ndarray]:
    """``[n]`` frozen-scale logits of the block-0 input ``x^0`` (embeddings, scaled, + positions)
    and ``[n]`` those of the final residual ``x^L``, at the last position of ``ids``."""

    def hooks(stack, saved):
        def first(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            saved["x0"] = hidden.detach()[0, -1]

        block = model.module(model.spec.blocks)[0]
        stack.enter_context(block.register_forward_pre_hook(first, with_kwargs=True))

    saved = capture(model, ids, extra=hooks)
    decode = frozen_decoder(model, saved["final"])
    x0, xL = decode(saved["x0"] * embedding_scale(model)), decode(saved["final"])
    return np.array([float(x0[int(t)]) for t in token_ids]), np.array([float(xL[int(t)]) for t in token_ids])


def unpadded(batch, row: int) -> torch.Tensor:
    """``[T_row]`` the prompt of ``row`` without its left padding."""
    return batch.input_ids[row, int(batch.pad_lengths[row]) :]


def tracked_ids(batch, row: int) -> list[int]:
    """The subject's first token and every tracked answer (else the target) of ``row``, read off the
    batch by hand."""
    ids = [int(batch.input_ids[row, batch.spans["subject"][row, 0]])]
    names = sorted(batch.tracked, key=lambda n: int(n.rsplit("_", 1)[1]))
    return ids + ([int(batch.tracked[n][row]) for n in names] if names else [int(batch.target_ids[row])])


def per_row_results(run, model, config) -> list[tuple]:
    """``(result, row in result, batch, row in batch)`` for every row of ``one_to_many_batch``.

    GPT-J computes attention scores in float32 even for float64 weights, BLOOM its softmax and
    Falcon its rotations, so left padding moves them by ~1e-9: their rows run unpadded, one at a time
    (padding is checked on other families).
    """
    from tiny import FLOAT32_INSIDE, ONE_TO_MANY, one_to_many_batch

    batch = one_to_many_batch(model)
    if model.spec.family not in FLOAT32_INSIDE:
        result = run(model, batch, config)
        return [(result, f, batch, f) for f in range(len(batch))]
    alone = [one_to_many_batch(model, rows=[spec]) for spec in ONE_TO_MANY]
    return [(run(model, b, config), 0, b, 0) for b in alone]
