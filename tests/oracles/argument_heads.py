"""Naive argument-head analysis (Lv et al. L3 + L4, ``methods.md`` §1.2): one unpadded prompt at a time.

L3, literal path patching: for every sender (each head, each MLP) one full forward of the clean prompt
in which every layer's ``q``, ``k``, ``v`` (all positions; and ``z`` for a gated attention output,
whose gate reads the residual too) are set to their clean cached values with ``site_hook``, the
sender's ``z`` (an MLP sender's ``mlp_out``) at the last position is set to its counterfactual
value, and, with ``freeze_mlps``, the MLP outputs after the sender (for a head, its own
layer's too) are set to their clean values. The metric ``iw`` is read on the full-vocabulary logits.

L4: the attention row of the last position from ``run_with_cache``'s ``pattern``; each head's output
``z_h`` times its hand-sliced block of the raw ``o_proj`` weight (Gemma-2's post-norm linearized at the
true output, :mod:`oracles.head_promotion`), decoded over the full vocabulary: frozen-scale
(:func:`oracles.early_decoding.frozen_decoder`) or raw ``W_U o``.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from oracles.early_decoding import capture, frozen_decoder
from oracles.head_promotion import _head_output, _post_norm, _z_hooks
from recallscope.core.cache import run_with_cache
from recallscope.core.hooks import site_hook
from recallscope.models.sites import Site


def last_values(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``z [L, H, d_head]`` and ``mlp_out [L, d]`` at the last position of the unpadded prompt ``ids``."""
    layers = range(model.n_layers)
    sites = [Site(layer, "z") for layer in layers] + [Site(layer, "mlp_out") for layer in layers]
    cache = run_with_cache(model, ids[None], sites, positions=[-1])
    z = torch.stack([cache[Site(layer, "z")][0, 0] for layer in layers])
    mlp = torch.stack([cache[Site(layer, "mlp_out")][0, 0] for layer in layers])
    return z, mlp


def _iw(logits: torch.Tensor, target: int) -> float:
    logits = logits.double()
    return float(logits[target] - logits.mean())


def _held(value: torch.Tensor):
    """Site edit: the whole activation becomes ``value`` (its clean cached copy)."""
    return lambda act: value.clone()


def _setter(value: torch.Tensor, heads: int | None = None):
    """Site edit: the last position (head ``heads`` of ``z``) becomes ``value``."""

    def edit(act):
        new = act.clone()
        if heads is None:
            new[0, -1] = value
        else:
            new[0, -1, heads] = value
        return new

    return edit


def naive_path_patching(
    model, ids: torch.Tensor, cf_z: torch.Tensor, cf_mlp: torch.Tensor, target: str | int, freeze_mlps: bool
) -> tuple[float, int, np.ndarray, np.ndarray]:
    """``(clean iw, target id, [L, H] patched iw of each head, [L] of each MLP)`` for ``ids [T]``.

    ``cf_z [L, H, d_head]`` / ``cf_mlp [L, d]``: the senders' counterfactual values at the last
    position; ``target``: a token id or ``"top1"``.
    """
    L, H = model.n_layers, model.n_heads
    # a gated attention output reads the residual as q/k/v do: its heads' z is held clean with them
    held = ("q", "k", "v", "z") if model.spec.attn_output_gate else ("q", "k", "v")
    frozen = [Site(layer, name) for layer in range(L) for name in (*held, "mlp_out")]
    clean = run_with_cache(model, ids[None], frozen, logits="last")
    token = int(clean.logits[0].argmax()) if target == "top1" else int(target)

    def forward(edits) -> float:
        with contextlib.ExitStack() as stack:
            for layer in range(L):
                for name in held:
                    stack.enter_context(site_hook(model, Site(layer, name), _held(clean[Site(layer, name)])))
            for site, fn in edits:
                stack.enter_context(site_hook(model, site, fn))
            with torch.no_grad():
                logits = model.hf_model(input_ids=ids[None].to(model.device), use_cache=False).logits
        return _iw(logits[0, -1], token)

    def held_mlps(first: int):
        if not freeze_mlps:
            return []
        return [(Site(layer, "mlp_out"), _held(clean[Site(layer, "mlp_out")])) for layer in range(first, L)]

    heads = np.zeros((L, H))
    mlps = np.zeros(L)
    for layer in range(L):
        for h in range(H):
            heads[layer, h] = forward([(Site(layer, "z"), _setter(cf_z[layer, h], h)), *held_mlps(layer)])
        mlps[layer] = forward([(Site(layer, "mlp_out"), _setter(cf_mlp[layer])), *held_mlps(layer + 1)])
    return _iw(clean.logits[0], token), token, heads, mlps


def naive_readouts(
    model, ids: torch.Tensor, subject: list[int], projection: str, attend_to: str
) -> tuple[np.ndarray, np.ndarray]:
    """``([L, H] attention to the subject, [L, H] subject logit)`` of ``ids [T]`` (float64).

    ``subject``: the subject's token positions in ``ids``; the subject token is ``ids[subject[0]]``.
    """
    L, H = model.n_layers, model.n_heads
    keys = subject if attend_to == "span" else subject[:1]
    cache = run_with_cache(model, ids[None], [Site(layer, "pattern") for layer in range(L)], positions=[-1])
    attention = np.array(
        [
            [float(cache[Site(layer, "pattern")][0, h, 0, keys].double().sum()) for h in range(H)]
            for layer in range(L)
        ]
    )
    saved = capture(model, ids, extra=_z_hooks(model))
    saved = {key: value.double() for key, value in saved.items()}
    decode = frozen_decoder(model, saved["final"])
    W_U = model.W_U.double()
    token = int(ids[subject[0]])
    logit = np.zeros((L, H))
    for layer in range(L):
        weight = model.module(model.spec.o_proj, layer).weight.detach().double()
        post = _post_norm(model, layer, saved[("pre", layer)])
        for h in range(H):
            o = post(_head_output(model, weight, saved[("z", layer)], h, "input_columns"))
            logits = decode(o) if projection == "frozen_scale" else W_U @ o
            logit[layer, h] = float(logits[token])
    return attention, logit
