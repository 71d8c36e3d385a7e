"""Naive extraction rate, straight from ``methods.md`` G4/G6: one unpadded forward per fact, plain module
hooks, per-layer / per-variant / per-head loops and explicit readout matmuls."""

from __future__ import annotations

import contextlib

import torch

import recallscope as rs
from recallscope.core.attention import pattern_hook
from recallscope.models.sites import Site


def blocked_positions(n_tokens: int, subject: tuple[int, int], name: str) -> set[int]:
    """Key positions a counterfactual blocks in an unpadded prompt of ``n_tokens`` tokens."""
    start, end = subject
    every = set(range(n_tokens))
    subj, subj_last, last, first = set(range(start, end)), {end - 1}, {n_tokens - 1}, {0}
    table = {
        "none": set(),
        "subject": subj,
        "last": last,
        "subject_last": subj_last,
        "subject_last+last": subj_last | last,
        "non_subject": every - subj,
        "non_subject_ex_last": every - subj - last,
        "all_but_first": every - first,
        "all_but_last": every - last,
        "all_but_subject_last": every - subj_last,
        "all_but_subject_last+last": every - subj_last - last,
        "all": every,
    }
    return table[name]


def modified_row(row: torch.Tensor, blocked: set[int], mode: str) -> torch.Tensor:
    """One head's last attention row ``[T]`` with ``blocked`` keys removed."""
    if not blocked:
        return row
    if len(blocked) == len(row):
        return torch.zeros_like(row)
    index = torch.tensor(sorted(blocked))
    if mode == "renormalize":
        kept = row.clone()
        kept[index] = 0.0
        total = kept.sum()
        return kept / total if total > 0 else torch.zeros_like(row)
    scores = row.clone()
    scores[index] = -1e6  # the reference code's quirk: softmax of probabilities
    return scores.softmax(-1)


def naive_scores(model, x: torch.Tensor, how: str) -> torch.Tensor:
    """Readout scores ``[V]`` of one vector ``x [d]``, by explicit matmul."""
    if how == "raw_embed":
        return model.W_E @ x
    if how == "raw":
        return model.W_U @ x
    norm = model.module(model.spec.final_norm)
    eps = getattr(norm, "eps", getattr(norm, "variance_epsilon", None))
    if model.spec.norm == "layer":
        h = (x - x.mean()) / torch.sqrt(((x - x.mean()) ** 2).mean() + eps)
    else:
        h = x / torch.sqrt((x**2).mean() + eps)
    weight = norm.weight.detach()
    h = h * (1 + weight if model.spec.norm_offset_one else weight)
    if getattr(norm, "bias", None) is not None:
        h = h + norm.bias.detach()
    logits = model.W_U @ h + (0 if model.b_U is None else model.b_U)
    cap = model.spec.final_logit_softcap
    return logits if cap is None else cap * torch.tanh(logits / cap)


def _out(output):
    return output[0] if isinstance(output, tuple) else output


def naive_capture(model, ids: torch.Tensor, subject_last: int) -> dict:
    """Per layer: attention module output, MLP output (last position), block output at the last subject
    token, last attention row ``[H, T]`` and values ``[T, H_kv, d_head]``; plus the last logits."""
    spec, d = model.spec, model.d_model
    got: dict = {k: {} for k in ("attn", "mlp", "subject", "probs", "v", "z")}

    def grab(kind, layer, fn):
        def hook(module, args, output):  # a copy: Falcon adds to its MLP output in place
            got[kind][layer] = fn(_out(output).detach()).clone()

        return hook

    handles = []
    with contextlib.ExitStack() as stack:
        for layer in range(model.n_layers):
            attn, mlp = model.module(spec.attn_out, layer), model.module(spec.mlp_out, layer)
            handles.append(attn.register_forward_hook(grab("attn", layer, lambda o: o.reshape(-1, d)[-1])))
            handles.append(mlp.register_forward_hook(grab("mlp", layer, lambda o: o.reshape(-1, d)[-1])))
            handles.append(
                model.block(layer).register_forward_hook(grab("subject", layer, lambda o: o[0, subject_last]))
            )
            stack.enter_context(
                pattern_hook(model, layer, _saver(got["probs"], layer, lambda p: p[0, :, -1]))
            )
            stack.enter_context(
                rs.site_hook(model, Site(layer, "v"), _saver(got["v"], layer, lambda v: v[0]))
            )
            stack.enter_context(
                rs.site_hook(model, Site(layer, "z"), _saver(got["z"], layer, lambda z: z[0, -1]))
            )
        try:
            with torch.no_grad():
                got["logits"] = model.hf_model(ids[None].to(model.device)).logits[0, -1]
        finally:
            for handle in handles:
                handle.remove()
    return got


def _saver(store, layer, fn):
    def save(act):
        store[layer] = fn(act.detach()).clone()

    return save


def naive_counterfactual(
    model, layer: int, probs: torch.Tensor, v: torch.Tensor, blocked, mode, z: torch.Tensor
) -> torch.Tensor:
    """Layer ``layer``'s attention output ``[d]`` at the last position with a modified row; a gated
    output keeps the clean gate ``g = z / mix`` (``z [H, d_head]`` at the last position)."""
    n_heads, group = model.n_heads, model.n_heads // v.shape[1]  # v [T, H_kv, d_head] of this layer
    mixed = []
    for h in range(n_heads):
        kv = h // group  # GQA: query head h reads key/value head h // group
        weights = modified_row(probs[h], blocked, mode)
        mix = sum(weights[j] * v[j, kv] for j in range(v.shape[0]))
        if model.spec.attn_output_gate:
            clean = sum(probs[h, j] * v[j, kv] for j in range(v.shape[0]))
            mix = mix * torch.where(clean != 0, z[h] / torch.where(clean != 0, clean, 1), 0)
        mixed.append(mix)
    z = torch.cat(mixed)[None]  # [1, H * d_head]
    with torch.no_grad():
        out = model.module(model.spec.o_proj, layer)(z)
        if model.spec.attn_post_norm is not None:
            out = model.module(model.spec.attn_post_norm, layer)(out)
    return out[0]


def rank_of(scores: torch.Tensor, target: int) -> tuple[int, bool, float]:
    """Rank (tokens strictly higher), unique top-1 flag, and the target's score."""
    value = scores[target]
    return int((scores > value).sum()), bool((scores >= value).sum() == 1), float(value)


def naive_fact(
    model, ids, subject, *, target=None, readout="logit_lens", variants=(), mode="renormalize", k=10
):
    """Everything G4/G6 computes for one unpadded prompt ``ids [T]`` with subject ``(start, end)``."""
    got = naive_capture(model, ids, subject[1] - 1)
    target = int(got["logits"].argmax()) if target is None else target
    out = {"target": target, "cf": {}}
    for layer in range(model.n_layers):
        for kind in ("attn", "mlp", "subject"):
            scores = naive_scores(model, got[kind][layer].double(), readout)
            out[(kind, layer)] = (*rank_of(scores, target), scores.topk(k).indices.tolist())
        for name in variants:
            blocked = blocked_positions(len(ids), subject, name)
            vec = naive_counterfactual(
                model, layer, got["probs"][layer], got["v"][layer], blocked, mode, got["z"][layer]
            )
            scores = naive_scores(model, vec.double(), readout)
            top1 = int(scores.argmax()) if (scores == scores.max()).sum() == 1 else -1  # tied: none
            out["cf"][(name, layer)] = (*rank_of(scores, target), top1)
    return out
