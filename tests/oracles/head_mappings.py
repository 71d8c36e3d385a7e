"""Naive head mappings, straight from ``methods.md`` G7: loops over layers, heads and facts, weights
sliced by hand from the HF modules, and each head's full ``[V, V]`` OV matrix on the tiny vocabulary.

Only the norms come from the model's own modules: HF's RMSNorms run in float32 even for float64
models, and the oracle must see what the head sees.
"""

from __future__ import annotations

import torch

import recallscope as rs


def _attention(model, layer: int):
    """``(attention module, name of its output projection)``, by hand per family."""
    hf, family = model.hf_model, model.spec.family
    if family == "gpt2":
        return hf.transformer.h[layer].attn, "c_proj"
    if family == "gpt_neox":
        return hf.gpt_neox.layers[layer].attention, "dense"
    if family == "gptj":
        return hf.transformer.h[layer].attn, "out_proj"
    if family == "opt":
        return hf.model.decoder.layers[layer].self_attn, "out_proj"
    if family == "phi":
        return hf.model.layers[layer].self_attn, "dense"
    return hf.model.layers[layer].self_attn, "o_proj"  # Llama, Mistral, Qwen, Gemma


def head_weights(model, layer: int, head: int, kv_head: int | None = None):
    """``(W_V [d, d_h], b_V [d_h] | None, W_O [d_h, d])`` of query head ``head``.

    ``kv_head`` defaults to ``head // (n_heads // n_kv_heads)`` (GQA: consecutive query heads share
    a key/value head).
    """
    d, dh = model.d_model, model.d_head
    attn, out_name = _attention(model, layer)
    v_proj = getattr(attn, "v_proj", None)  # this layer's own key/value head count (MiMo-V2: by layer)
    n_kv = model.n_kv_heads if v_proj is None else v_proj.out_features // dh
    kv = head // (model.n_heads // n_kv) if kv_head is None else kv_head
    family = model.spec.family
    if family == "gpt2":  # Conv1D [in, out]; c_attn columns [q | k | v], each [d]
        cols = slice(2 * d + kv * dh, 2 * d + (kv + 1) * dh)
        W_V, b_V = attn.c_attn.weight[:, cols], attn.c_attn.bias[cols]
        W_O = attn.c_proj.weight[head * dh : (head + 1) * dh, :]
        return W_V.detach(), b_V.detach(), W_O.detach()
    if family == "gpt_neox":  # Linear [out, in]; rows per head [q k v], each [d_h]
        rows = slice(kv * 3 * dh + 2 * dh, kv * 3 * dh + 3 * dh)
        W_V, b_V = attn.query_key_value.weight[rows].T, attn.query_key_value.bias[rows]
    else:
        rows = slice(kv * dh, (kv + 1) * dh)
        scale = getattr(attn, "v_scale", 1.0)  # MiMo-V2 multiplies the projected values by a constant
        W_V = attn.v_proj.weight[rows].T * scale
        b_V = None if attn.v_proj.bias is None else attn.v_proj.bias[rows] * scale
    W_O = getattr(attn, out_name).weight[:, head * dh : (head + 1) * dh].T
    return W_V.detach(), None if b_V is None else b_V.detach(), W_O.detach()


def token_embeddings(model, ids: torch.Tensor) -> torch.Tensor:
    """``[n, d]``: rows of ``E`` times the model's embedding scale (Gemma: sqrt(d))."""
    embed = model.module(model.spec.embed)
    scale = getattr(embed, "embed_scale", None)
    rows = embed.weight.detach()[ids]
    return rows if scale is None else rows * scale.to(rows.dtype)


def head_vectors(model, layer: int, head: int, x: torch.Tensor, norm: bool, kv_head=None) -> torch.Tensor:
    """``out_h = (norm(x) W_V + b_V) W_O`` for inputs ``x [n, d]`` → ``[n, d]``."""
    W_V, b_V, W_O = head_weights(model, layer, head, kv_head)
    if norm:
        x = model.module(model.spec.ln_1, layer)(x)
    v = x @ W_V
    if b_V is not None:
        v = v + b_V
    out = v @ W_O
    if model.spec.family == "gemma2":
        out = model.hf_model.model.layers[layer].post_attention_layernorm(out)
    return out


def _final_norm(model, x: torch.Tensor) -> torch.Tensor:
    """The final norm by hand, in float64."""
    norm = model.module(model.spec.final_norm)
    eps = getattr(norm, "eps", None) or norm.variance_epsilon
    if model.spec.family in ("gpt2", "gpt_neox", "gptj", "opt", "phi"):  # LayerNorm
        x = (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True, unbiased=False) + eps).sqrt()
        return x * norm.weight.detach() + norm.bias.detach()
    x = x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    gain = norm.weight.detach() + (1 if model.spec.family in ("gemma", "gemma2") else 0)
    return x * gain


def vocab_logits(model, vectors: torch.Tensor, how: str) -> torch.Tensor:
    """``[n, d]`` → ``[n, V]``: ``E·v`` (raw_embed), ``W_U·v`` (raw) or the model's head (logit_lens)."""
    if how == "raw_embed":
        return vectors @ model.module(model.spec.embed).weight.detach().T
    W_U = model.hf_model.lm_head.weight.detach()
    if how == "raw":
        return vectors @ W_U.T
    logits = _final_norm(model, vectors) @ W_U.T
    if model.hf_model.lm_head.bias is not None:
        logits = logits + model.hf_model.lm_head.bias.detach()
    cap = getattr(model.hf_model.config, "final_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap


def ov_matrix(model, layer: int, head: int, how: str, norm: bool, kv_head=None) -> torch.Tensor:
    """The explicit ``[V_in, V]`` matrix: row ``s`` = readout of ``out_h(embedding of token s)``."""
    every = token_embeddings(model, torch.arange(model.module(model.spec.embed).weight.shape[0]))
    return vocab_logits(model, head_vectors(model, layer, head, every, norm, kv_head), how)


def mapping_row(model, layer, head, subject_ids, config, kv_head=None) -> torch.Tensor:
    """``[V]`` readout of the head's OV map of the subject; rows of ``ov_matrix`` where that is exact."""
    how, norm = config.readout, config.input_norm
    affine = how != "logit_lens" and not norm and model.spec.family != "gemma2"
    if config.subject_tokens != "mean" or affine:
        rows = ov_matrix(model, layer, head, how, norm, kv_head)[subject_ids]  # [n_subject, V]
        pick = {"first": rows[0], "last": rows[-1], "mean": rows.mean(0)}
        return pick[config.subject_tokens]
    x = token_embeddings(model, subject_ids).mean(0)
    return vocab_logits(model, head_vectors(model, layer, head, x[None], norm, kv_head), how)[0]


def _rank(logits: torch.Tensor, target: int) -> int:
    return int((logits > logits[target]).sum())


def real_head_outputs(model, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Clean last-position logits ``[V]`` and per layer the heads' outputs ``[H, d]`` at the last position.

    ``o^h = z^h W_O^h`` with ``z`` read by a hook on the output projection's input; Gemma-2's
    post-norm is folded in with the scale of the full attention output (also hooked).
    """
    z, pre = {}, {}
    handles = []
    for layer in range(model.n_layers):
        attn, out_name = _attention(model, layer)
        handles.append(
            getattr(attn, out_name).register_forward_pre_hook(
                lambda mod, args, layer=layer: z.__setitem__(layer, args[0][0, -1])
            )
        )
        if model.spec.family == "gemma2":
            post = model.hf_model.model.layers[layer].post_attention_layernorm
            handles.append(
                post.register_forward_pre_hook(
                    lambda mod, args, layer=layer: pre.__setitem__(layer, args[0][0, -1])
                )
            )
    try:
        logits = rs.forward(model, ids[None])[0]
    finally:
        for handle in handles:
            handle.remove()
    outputs = []
    for layer in range(model.n_layers):
        heads = z[layer].reshape(model.n_heads, model.d_head)
        out = torch.stack([heads[h] @ head_weights(model, layer, h)[2] for h in range(model.n_heads)])
        if model.spec.family == "gemma2":
            norm = model.hf_model.model.layers[layer].post_attention_layernorm
            rho = (pre[layer].pow(2).mean() + norm.eps).sqrt()
            out = out * (1 + norm.weight.detach()) / rho
        outputs.append(out)
    return logits, outputs


def naive_head_mappings(model, ids: torch.Tensor, subject: tuple[int, int], config, gold: int | None = None):
    """G7 for one unpadded prompt ``ids [T]`` with subject ``[start, stop)``, by loops.

    Returns:
        ``dict(target, mapping_rank [L, H], top_ids [L, H, k], output_rank [L, H], output_logit [L, H])``.
    """
    logits, outputs = real_head_outputs(model, ids)
    target = int(logits.argmax()) if config.target == "top1" else gold
    subject_ids = ids[subject[0] : subject[1]]
    shape = (model.n_layers, model.n_heads)
    out = dict(
        target=target,
        mapping_rank=torch.zeros(shape, dtype=torch.long),
        top_ids=torch.zeros((*shape, config.top_k), dtype=torch.long),
        output_rank=torch.zeros(shape, dtype=torch.long),
        output_logit=torch.zeros(shape, dtype=torch.float64),
    )
    for layer in range(model.n_layers):
        real = vocab_logits(model, outputs[layer], config.readout)  # [H, V]
        for head in range(model.n_heads):
            row = mapping_row(model, layer, head, subject_ids, config)
            out["mapping_rank"][layer, head] = _rank(row, target)
            out["top_ids"][layer, head] = torch.argsort(row, descending=True)[: config.top_k]
            out["output_rank"][layer, head] = _rank(real[head], target)
            out["output_logit"][layer, head] = real[head, target]
    return out
