"""What each head does at the last position with the subject (Lv et al. 2024, ``methods.md`` L4):
how much it attends to the subject, and how much its output writes the subject's first token.

:func:`subject_readouts` runs one eager forward of a batch and returns, per row, layer and head,

- ``attention``: the last position's attention to the subject, summed over the subject's tokens
  (``attend_to="span"``) or to its first token only (``"first"``);
- ``logit``: the head's output ``o^{ℓ,h}_N = z^{ℓ,h}_N W_O^{ℓ,h}``
  (:func:`~recallscope.core.decompose.head_vectors`) read on a token: the frozen-scale logit
  ``W_U (γ ⊙ centre(o)) / ρ_N`` (``projection="frozen_scale"``, no bias, no soft-cap) or the raw
  ``⟨o, W_U[tok]⟩`` (``"raw"``)::

    attention, logit = subject_readouts(model, batch, first_subject_tokens, config)   # [B, L, H] each
"""

from __future__ import annotations

import torch

from recallscope.core.cache import run_with_cache
from recallscope.core.decoding import work_dtype
from recallscope.core.decompose import head_vectors
from recallscope.core.subvalues import FrozenHead
from recallscope.core.tokens import PromptBatch
from recallscope.models.model import Model
from recallscope.models.sites import Site

__all__ = ["subject_readouts"]


def subject_readouts(model: Model, batch: PromptBatch, tokens: torch.Tensor, config):
    """``attention`` and ``logit`` ``[B, L, H]`` (float64 numpy) of every head at the last position;
    ``tokens [B]`` the token each head output is read on; ``config`` gives ``attend_to`` and ``projection``.
    """
    layers = range(model.n_layers)
    final = Site(model.n_layers - 1, "resid_post")
    sites = [*(Site(layer, "z") for layer in layers), *(Site(layer, "pattern") for layer in layers), final]
    cache = run_with_cache(model, batch, sites, positions=[-1], dtype=work_dtype(model))
    if config.attend_to == "span":
        keys = batch.span_mask("subject")
    else:
        keys = torch.arange(batch.seq_len) == batch.spans["subject"][:, :1]  # [B, T] the first token
    keys = keys.to(model.device, cache[final].dtype)
    attention = torch.stack(
        [torch.einsum("bht,bt->bh", cache[Site(layer, "pattern")][:, :, 0], keys) for layer in layers], 1
    )  # [B, L, H]
    if config.projection == "frozen_scale":
        u = FrozenHead.from_final(model, cache[final][:, 0], bias=False).token_covectors(tokens[:, None])[
            :, 0
        ]
    else:
        u = model.W_U[tokens.to(model.W_U.device)].to(model.device, cache[final].dtype)  # [B, d]
    logit = torch.stack(
        [
            torch.einsum(
                "bhd,bd->bh", head_vectors(model, layer, cache[Site(layer, "z")][:, 0]), u.to(model.device)
            )
            for layer in layers
        ],
        1,
    )  # [B, L, H]
    return attention.cpu().double().numpy(), logit.cpu().double().numpy()
