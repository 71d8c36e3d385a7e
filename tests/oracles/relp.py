"""Naive RelP reference for a Llama model without biases: the model written out by hand from its
weights, then linearized at the clean run as LRP's rules say (RMSNorm scales and attention
probabilities held, SiLU ⊙ up split half and half with the identity rule through SiLU); the LRP
coefficient of block ``ℓ``'s output is the plain gradient of that linear model.

The attention probabilities come from transformers' own eager attention (``output_attentions``),
so no RoPE is needed: given them, block outputs are a function of the values alone.
"""

from __future__ import annotations

import torch


def _rms(x, weight, eps):
    return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt() * weight


def relp_coefficients(hf, ids, direction):
    """``[L, T, d_model]`` LRP coefficients of every block output for the metric ``direction · logits``
    at the last position, and the hand-written model's logits ``[V]`` there (to check it is the model).
    """
    cfg = hf.config
    eps, n_heads, n_kv = cfg.rms_norm_eps, cfg.num_attention_heads, cfg.num_key_value_heads
    d_head = cfg.hidden_size // n_heads
    hf.config._attn_implementation = "eager"
    with torch.no_grad():
        patterns = hf(ids[None], output_attentions=True, use_cache=False).attentions  # L × [1, H, T, T]
    x = hf.model.embed_tokens(ids).double().detach()
    outputs, clean = [], []
    for lin in (False, True):  # the clean forward first, then the linearized one at its values
        h = x
        for layer, block in enumerate(hf.model.layers):
            at = clean[layer] if lin else None

            def norm(v, module, key, at=at, lin=lin):
                if not lin:
                    return _rms(v, module.weight, eps), v
                held = at[key]  # the clean input: its scale is held
                return v / (held.pow(2).mean(-1, keepdim=True) + eps).sqrt() * module.weight, v

            n1, raw1 = norm(h, block.input_layernorm, "n1")
            attn = block.self_attn
            v = (n1 @ attn.v_proj.weight.T).view(len(ids), n_kv, d_head).repeat_interleave(n_heads // n_kv, 1)
            z = torch.einsum("hij,jhd->ihd", patterns[layer][0].double(), v).reshape(len(ids), -1)
            h = h + z @ attn.o_proj.weight.T
            n2, raw2 = norm(h, block.post_attention_layernorm, "n2")
            mlp = block.mlp
            g, u = n2 @ mlp.gate_proj.weight.T, n2 @ mlp.up_proj.weight.T
            if lin:
                g0, u0 = at["g"], at["u"]
                act0 = torch.nn.functional.silu(g0)
                c = 0.5 * (act0 * u0 / g0) * g + 0.5 * act0 * u
            else:
                c = torch.nn.functional.silu(g) * u
                clean.append({"n1": raw1.detach(), "n2": raw2.detach(), "g": g.detach(), "u": u.detach()})
            h = h + c @ mlp.down_proj.weight.T
            if lin:
                h.retain_grad()
                outputs.append(h)
        if not lin:
            final = h.detach()
            logits = _rms(final, hf.model.norm.weight, eps) @ hf.lm_head.weight.T
            x = x.requires_grad_(True)
    scale = (final.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    metric = (h / scale * hf.model.norm.weight @ hf.lm_head.weight.T)[-1] @ direction
    metric.backward()
    return torch.stack([o.grad for o in outputs]), logits[-1].detach()
