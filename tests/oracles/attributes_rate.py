"""Naive attributes rate, straight from ``methods.md`` G2: one unpadded prompt, Python sets of strings."""

from __future__ import annotations

import torch

import recallscope as rs
from recallscope.core.attributes import STOPWORDS


def _passes(text: str, min_length: int, lowercase: bool) -> bool:
    word = text.strip()
    return len(word) > min_length - 1 and (word.lower() if lowercase else word) not in STOPWORDS


def references(model, texts, min_length: int, lowercase: bool) -> set[str]:
    """Decode each token of each text, dedupe, drop stopwords and short tokens."""
    tok = model.tokenizer
    strings = {tok.decode([i]) for text in texts for i in tok(text, add_special_tokens=False)["input_ids"]}
    return {s for s in strings if _passes(s, min_length, lowercase)}


def logits(model, h: torch.Tensor, readout: str) -> torch.Tensor:
    """Vocabulary scores of one vector ``h [d_model]``."""
    if readout == "raw_embed":
        return model.W_E @ h
    if readout == "raw":
        return model.W_U @ h
    return rs.project_to_vocab(model, h[None], "logit_lens", keep_logits=True).logits[0]


def rate(model, h, refs: set[str], readout: str, top_k: int, keep: int, min_length: int) -> float:
    """``100·|top-keep clean tokens ∩ refs| / |top-keep clean tokens|`` (NaN when undefined)."""
    order = torch.argsort(logits(model, h, readout), descending=True)[:top_k].tolist()
    strings = [model.tokenizer.decode([i]) if i < len(model.tokenizer) else "" for i in order]
    top = [s for s in strings if _passes(s, min_length, True)][:keep]
    if not refs or not top:
        return float("nan")
    return 100 * sum(s in refs for s in top) / len(top)


def states(model, ids: torch.Tensor, position: int) -> list[torch.Tensor]:
    """``resid_pre`` of every block, then the final residual, at ``position`` of an unpadded prompt."""
    sites = [rs.Site(layer, "resid_pre") for layer in range(model.n_layers)]
    sites.append(rs.Site(model.n_layers - 1, "resid_post"))
    cache = rs.run_with_cache(model, ids[None], sites)
    return [cache[s][0, position] for s in sites]
