"""Early decoding of every layer's attention and MLP update (Yan & Jia 2025, Y1; ``methods.md`` §2.2).

For every layer ``ℓ`` the attention update ``a^ℓ_N`` (site ``attn_out``) and the MLP update
``m^ℓ_N`` (site ``mlp_out``) at the last position ``N`` are read into vocabulary space with the
final norm's scale frozen on the final residual of the same forward::

    logits(c) = W_U (γ ⊙ centre(c) / ρ_N)        ρ_N = the final norm's scale on x^L_N

(``centre`` is LayerNorm's mean subtraction, the identity for RMSNorm), and only the logits of the
tracked tokens are kept: the first token of the subject and of **every** answer ``answer_1`` …
``answer_k`` of the one-to-many list, including answers not generated yet (§2.6 pitfall 1), each
with its role in the row (``subject``, ``previous``, ``current``, ``future``;
:func:`~recallscope.core.steps.tracked_tokens`). A plain factual batch tracks its target as
``answer_1`` (step 1, role ``current``).

This decodes the *sublayer updates* (direct logit attribution per sublayer), not the residual
stream. The decoding is linear, so the embeddings' logits plus every update's logits equal the
frozen-head logits of the final residual. ``attn_out`` / ``mlp_out`` are what each block adds to the
residual stream: for parallel blocks (GPT-J, GPT-NeoX, Phi) both read the block input; for Gemma-2
they are the outputs of the sandwich post-norms.

The frozen head's constant ``W_U β + b_U`` (final LayerNorm bias, unembedding bias) belongs to no
component and is left out (``bias=False``, as in the paper, whose Llama/Mistral heads have none);
``bias=True`` adds it to every decoded vector, which breaks the additivity above.

Fast by construction: one forward per chunk of facts keeps only the ``2·L`` update vectors and the
final residual at ``N``; the tracked tokens are decoded through per-row covectors
(:meth:`~recallscope.core.subvalues.FrozenHead.token_covectors`), never the full vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
import pandas as pd
import torch

from recallscope.core.cache import forward_floats
from recallscope.core.decoding import TrackedInfo, decode_tracked, last_position_cache, tracked_frame
from recallscope.core.steps import tracked_tokens
from recallscope.core.subvalues import FrozenHead
from recallscope.core.tokens import PromptBatch, as_batch
from recallscope.core.vocab import frozen_scale_readout
from recallscope.data.facts import FactSet
from recallscope.methods.base import Cost, MethodConfig, MethodResult, result_provenance
from recallscope.methods.hints import DISTINCT, NON_EMPTY
from recallscope.models.model import Model
from recallscope.models.sites import Site
from recallscope.stats import mean_ci

__all__ = [
    "NAME",
    "DESCRIPTION",
    "CHUNK_SIZE",
    "SITES",
    "Config",
    "EarlyDecodingResult",
    "run",
    "cost",
]

NAME = "early_decoding"
DESCRIPTION = (
    "Decode each layer's attention and MLP update at the last token into the answers' logits (Yan & Jia)."
)
CHUNK_SIZE = 16
"""Facts per runner chunk (one forward each)."""
SITES = {"attn": "attn_out", "mlp": "mlp_out"}
"""Config site names and the model sites they read."""


@dataclass(frozen=True, kw_only=True)
class Config(MethodConfig):
    """Early-decoding settings; the defaults (and preset ``yan_jia``) are the paper's Y1."""

    sites: Annotated[tuple[Literal["attn", "mlp"], ...], NON_EMPTY, DISTINCT] = ("attn", "mlp")
    """Sublayer updates decoded at every layer: ``attn`` (``attn_out``) and/or ``mlp`` (``mlp_out``)."""
    subject: bool = True
    """Also track the first token of the subject (the paper does)."""
    bias: bool = False
    """Add the frozen head's constant ``W_U β + b_U`` to every decoded update (not part of any
    component; the paper's models have none). Off keeps the logits additive over components."""

    PRESETS = {"yan_jia": dict(sites=("attn", "mlp"), subject=True, bias=False)}


@dataclass(frozen=True)
class EarlyDecodingResult(MethodResult):
    """Frozen-scale logits of the tracked tokens for every fact, site and layer."""

    sites: list[str]
    tracked: TrackedInfo
    logit: np.ndarray
    """``[F, site, layer, tracked]`` logits of the tracked tokens."""
    final_scale: np.ndarray
    """``[F]`` ``ρ_N`` of the final norm on the final residual at the last position."""

    def to_frame(self) -> pd.DataFrame:
        """One row per fact × site × layer × tracked token.

        Columns ``fact_id``, ``step``, ``site``, ``layer``, ``tracked``, ``role``, ``token``, ``logit``.
        """
        axes = {"site": self.sites, "layer": range(self.logit.shape[2])}
        return tracked_frame(self.fact_ids, self.tracked, self.logit, axes)

    def tables(self) -> dict[str, pd.DataFrame]:
        """No extra tables."""
        return {}

    def arrays(self) -> dict[str, np.ndarray]:
        """``"<fact_id>/logit"`` → ``[site, layer, tracked]``."""
        return self.per_fact(logit=self.logit)

    def summary(self) -> pd.DataFrame:
        """Mean logit over facts by step, site, layer, tracked token and role.

        With a 95% normal-approximation band ``logit_ci`` and the count ``n``.
        """
        return mean_ci(self.to_frame(), ["step", "site", "layer", "tracked", "role"], ["logit"])


def run(model: Model, batch: PromptBatch | FactSet, config: Config | None = None) -> EarlyDecodingResult:
    """Decode every layer's attention / MLP update at the last position for every fact of ``batch``."""
    config = config or Config()
    batch = as_batch(model, batch, method=NAME)
    tracked = tracked_tokens(model, batch, subject=config.subject)
    sites = [Site(layer, SITES[name]) for name in config.sites for layer in range(model.n_layers)]
    cache, final = last_position_cache(model, batch, sites)
    updates = torch.stack([cache[s] for s in sites], 1).unflatten(1, (len(config.sites), model.n_layers))
    head = FrozenHead.from_final(model, final, bias=config.bias)
    logits = decode_tracked(head, updates, tracked.ids)  # [B, site, layer, n]
    return EarlyDecodingResult(
        config=config,
        fact_ids=list(batch.fact_ids or map(str, range(len(batch)))),
        sites=list(config.sites),
        tracked=TrackedInfo.from_tracked(tracked),
        logit=logits.cpu().numpy(),
        final_scale=head.scale.cpu().numpy(),
        provenance=_provenance(model, config),
    )


def cost(model: Model, batch: PromptBatch | FactSet, config: Config | None = None) -> Cost:
    """One forward; memory: the forward's activations plus the kept update vectors at ``N``."""
    config = config or Config()
    batch = as_batch(model, batch)
    kept = len(batch) * (len(config.sites) * model.n_layers + 1) * model.d_model
    forward = forward_floats(model, len(batch), batch.seq_len)
    work = float(len(batch) * batch.seq_len * model.n_layers)
    return Cost(1, work, (kept + forward) * max(model.dtype.itemsize, 4))


def _provenance(model: Model, config: Config) -> dict:
    return result_provenance(
        model,
        config,
        projection="frozen_scale (final residual of the same forward)",
        readout=frozen_scale_readout(bias=config.bias, detail="tracked tokens only"),
        sites={name: SITES[name] for name in config.sites},
        tracked="subject first token (if subject) + first token of every answer (all k); plain facts: "
        "the target as answer_1",
        layers="block index",
        positions="last",
        bos=model.bos,
    )
