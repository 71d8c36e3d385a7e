"""Greedy generation for batches of prompts (the "known" filter, one-to-many lists).

A thin wrapper over transformers' ``generate`` with left-padded batches, greedy decoding and no
sampling settings inherited from the model's generation config.
"""

from __future__ import annotations

import torch

from recallscope.core.tokens import PromptBatch
from recallscope.models.model import Model

__all__ = ["generate_greedy"]


def generate_greedy(model: Model, batch: PromptBatch, max_new_tokens: int) -> torch.Tensor:
    """Greedy continuation ``[B, max_new_tokens]`` of every prompt of ``batch`` (padded with the
    pad id after an end-of-sequence token).
    """
    from transformers import GenerationConfig

    tok = model.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad,
        eos_token_id=tok.eos_token_id,
    )
    inputs = batch.model_inputs(model.device)
    with torch.no_grad():
        out = model.hf_model.generate(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], generation_config=config
        )
    new = out[:, batch.seq_len :].cpu()
    if new.shape[1] < max_new_tokens:  # every row stopped early
        fill = torch.full((new.shape[0], max_new_tokens - new.shape[1]), pad, dtype=new.dtype)
        new = torch.cat([new, fill], dim=1)
    return new
