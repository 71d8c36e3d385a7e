"""Naive early patching, straight from ``methods.md`` G5: one unpadded forward per fact × ℓ0 × P × ℓ."""

from __future__ import annotations

import torch

import recallscope as rs
from recallscope.core.hooks import StopForward, stop_after


def block_inputs(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """``[T, d]`` input of every block in a clean run of the unpadded prompt ``ids [T]``."""
    states: list[torch.Tensor] = []

    def record(module, args, kwargs):
        states.append((args[0] if args else kwargs["hidden_states"])[0].clone())

    handles = [
        model.block(layer).register_forward_pre_hook(record, with_kwargs=True)
        for layer in range(model.n_layers)
    ]
    try:
        rs.forward(model, ids[None])
    finally:
        for handle in handles:
            handle.remove()
    return states


def attn_output(
    model, ids: torch.Tensor, layer: int, patch: dict[int, torch.Tensor] | None = None
) -> torch.Tensor:
    """``[d]`` MHSA output of block ``layer`` at the last position.

    ``patch``: position → the vector written there in the input of block ``layer`` (only).
    """
    patch = patch or {}
    seen: list[torch.Tensor] = []

    def write(module, args, kwargs):
        hidden = (args[0] if args else kwargs["hidden_states"]).clone()
        for position, value in patch.items():
            hidden[0, position] = value
        return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

    def read(act):
        seen.append(act[0, -1].clone())

    handle = model.block(layer).register_forward_pre_hook(write, with_kwargs=True)
    try:
        with rs.site_hook(model, rs.Site(layer, "attn_out"), read), stop_after(model, layer):
            rs.forward(model, ids[None])
    except StopForward:
        pass
    finally:
        handle.remove()
    return seen[0]


def project(model, vector: torch.Tensor, readout: str) -> torch.Tensor:
    """``[V]`` scores by explicit matmul: ``E·v``, ``W_U·v``, or the model's final norm and head."""
    if readout == "raw_embed":
        return model.W_E @ vector
    if readout == "raw":
        return model.W_U @ vector
    norm = model.norm_params(model.spec.final_norm)  # written out: HF RMSNorms compute in float32
    centred = vector - vector.mean() if norm.kind == "layer" else vector
    normed = centred / torch.sqrt((centred**2).mean() + norm.eps)
    gain = norm.gain(vector.dtype, vector.device)
    normed = normed if gain is None else normed * gain
    normed = normed if norm.bias is None else normed + norm.bias
    logits = model.W_U @ normed
    if model.b_U is not None:
        logits = logits + model.b_U
    cap = model.spec.final_logit_softcap
    return logits if cap is None else cap * torch.tanh(logits / cap)


def rank_and_score(scores: torch.Tensor, target: int) -> tuple[int, float, bool]:
    """Rank of ``target`` (tokens scored strictly higher), its score, and whether it is the unique top-1."""
    rank = int((scores > scores[target]).sum())
    return rank, float(scores[target]), rank == 0 and int((scores == scores[target]).sum()) == 1


def positions_of(n_tokens: int, subject: tuple[int, int], name: str) -> list[int]:
    """G5's position sets in an unpadded prompt of ``n_tokens`` tokens."""
    start, end = subject
    if name == "subject":
        return list(range(start, end))
    if name == "last":
        return [n_tokens - 1]
    return [t for t in range(n_tokens - 1) if not start <= t < end]


def naive_patched(
    model, ids, subject, target, states, source, name, layer, readout
) -> tuple[int, float, bool]:
    """Rank, score and extraction of ``target`` in block ``layer``'s MHSA output.

    The input of block ``layer`` at set ``name`` is replaced by ``states[source]``, the clean input of
    block ``source`` (:func:`block_inputs`).
    """
    patch = {t: states[source][t] for t in positions_of(len(ids), subject, name)}
    vector = attn_output(model, ids, layer, patch)
    return rank_and_score(project(model, vector, readout), target)
