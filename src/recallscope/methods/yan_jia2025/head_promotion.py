"""Per-head promotion and suppression of the answers (Yan & Jia 2025, Y5; ``methods.md`` §2.2).

For every layer ``ℓ`` and head ``h`` the head's output at the last position ``N``::

    o^{ℓ,h}_N = z^{ℓ,h}_N W_O^{ℓ,h}        z^{ℓ,h}_N = Σ_j α^{ℓ,h}_{N,j} v^{ℓ,kv(h)}_j      [d_model]

(``W_O^{ℓ,h}`` = the rows ``h·d_h … (h+1)·d_h`` of ``W_O [H·d_h, d]``, i.e. the *input-column* block
of the HF ``o_proj`` weight; Gemma-2's attention post-norm is folded in at its actual scale, see
:func:`~recallscope.core.decompose.head_outputs`) is decoded with the final norm's scale frozen on
the final residual, like early decoding (:mod:`~recallscope.methods.yan_jia2025.early_decoding`), for the
tracked
tokens: the subject's first token and the first token of every answer. Summed over heads, plus the
logits of ``b_O``, this is the decoded attention update.

Rates (:func:`summary`) are dataset-wide: per answer step and layer, ``μ`` and ``σ`` are the mean and
the (population, ``np.std``) standard deviation of all tracked-token logits over all heads and
examples (:func:`thresholds`). A head *promotes* in an example when any tracked logit exceeds
``μ + kσ`` and *suppresses* when any falls below ``μ − kσ`` (both can hold); its promotion and
suppression rates are the fractions of examples. Per-role rates (``promotes_current``,
``suppresses_previous``, …) ask the suite's question: do heads suppress the answers already
generated? Call :func:`summary` on the concatenated frame of all chunks (the stored table);
:meth:`HeadPromotionResult.summary` uses only the facts of one result.

Compatibility option ``wo_slicing="reference_code"``: the released code multiplies ``z_h`` by
``o_proj.weight.view(H, d_h, d)``, a memory reinterpretation of the ``[d_out, H·d_h]`` weight that
slices *output* rows instead of the head's input columns (§2.6 pitfall 3). It reproduces the
released figures' per-head numbers, not the heads' true outputs; heads then no longer sum to the
attention update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
import pandas as pd
import torch

from recallscope.core.cache import forward_floats
from recallscope.core.decoding import TrackedInfo, decode_tracked, last_position_cache, tracked_frame
from recallscope.core.decompose import SLICINGS, head_vectors, post_norm_note
from recallscope.core.steps import tracked_tokens
from recallscope.core.subvalues import FrozenHead
from recallscope.core.tokens import PromptBatch, as_batch
from recallscope.core.vocab import frozen_scale_readout
from recallscope.data.facts import FactSet
from recallscope.methods.base import Cost, MethodConfig, MethodResult, result_provenance
from recallscope.methods.hints import AtLeast
from recallscope.methods.yan_jia2025.summaries import rates, thresholds
from recallscope.methods.yan_jia2025.summaries import rates as summary
from recallscope.models.model import Model
from recallscope.models.sites import Site

__all__ = [
    "NAME",
    "DESCRIPTION",
    "CHUNK_SIZE",
    "SLICINGS",
    "Config",
    "HeadPromotionResult",
    "run",
    "cost",
    "head_vectors",
    "thresholds",
    "summary",
]

NAME = "head_promotion"
DESCRIPTION = (
    "Decode each attention head at the last token: which heads promote or suppress answers (Yan & Jia)."
)
CHUNK_SIZE = 16
"""Facts per runner chunk (one forward each)."""


@dataclass(frozen=True, kw_only=True)
class Config(MethodConfig):
    """Per-head decoding settings.

    Preset ``yan_jia`` is the paper's method with the correct ``W_O`` slice; ``yan_jia_code``
    reproduces the released code's slicing.
    """

    k: Annotated[float, AtLeast(0)] = 1.0
    """Threshold width: promotion above ``μ + kσ``, suppression below ``μ − kσ`` (the paper: 1)."""
    wo_slicing: Literal["input_columns", "reference_code"] = "input_columns"
    """``input_columns``: head ``h`` owns ``W_O[h·d_h:(h+1)·d_h]`` (its true output);
    ``reference_code``: the released code's ``o_proj.weight.view(H, d_h, d)`` (compatibility only)."""
    subject: bool = True
    """Also track the first token of the subject (the paper does)."""

    PRESETS = {
        "yan_jia": dict(k=1.0, wo_slicing="input_columns", subject=True),
        "yan_jia_code": dict(k=1.0, wo_slicing="reference_code", subject=True),
    }

    def __post_init__(self) -> None:
        object.__setattr__(self, "k", float(self.k))  # k=1 and k=1.0 are one config (one store hash)


@dataclass(frozen=True)
class HeadPromotionResult(MethodResult):
    """Frozen-scale logits of the tracked tokens for every fact, layer and head."""

    tracked: TrackedInfo
    logit: np.ndarray
    """``[F, layer, head, tracked]`` logits of the tracked tokens."""
    final_scale: np.ndarray
    """``[F]`` ``ρ_N`` of the final norm on the final residual at the last position."""

    def to_frame(self) -> pd.DataFrame:
        """One row per fact × layer × head × tracked token.

        Columns ``fact_id``, ``step``, ``layer``, ``head``, ``tracked``, ``role``, ``token``, ``logit``.
        """
        _, n_layers, n_heads, _ = self.logit.shape
        return tracked_frame(
            self.fact_ids, self.tracked, self.logit, {"layer": range(n_layers), "head": range(n_heads)}
        )

    def tables(self) -> dict[str, pd.DataFrame]:
        """No extra tables (rates need every chunk: call :func:`summary` on the stored frame)."""
        return {}

    def arrays(self) -> dict[str, np.ndarray]:
        """``"<fact_id>/logit"`` → ``[layer, head, tracked]``."""
        return self.per_fact(logit=self.logit)

    def summary(self, k: float | None = None) -> pd.DataFrame:
        """:func:`summary` of this result's facts only (default ``k``: the config's)."""
        return rates(self.to_frame(), self.config.k if k is None else k)


def run(model: Model, batch: PromptBatch | FactSet, config: Config | None = None) -> HeadPromotionResult:
    """Decode every head's output at the last position for every fact of ``batch`` (one forward)."""
    config = config or Config()
    batch = as_batch(model, batch, method=NAME)
    tracked = tracked_tokens(model, batch, subject=config.subject)
    sites = [Site(layer, "z") for layer in range(model.n_layers)]
    cache, final = last_position_cache(model, batch, sites)  # z: [B, H, d_head]
    head = FrozenHead.from_final(model, final, bias=False)
    logits = [
        decode_tracked(head, head_vectors(model, s.layer, cache[s], config.wo_slicing), tracked.ids)
        for s in sites
    ]  # L × [B, H, n]
    return HeadPromotionResult(
        config=config,
        fact_ids=list(batch.fact_ids or map(str, range(len(batch)))),
        tracked=TrackedInfo.from_tracked(tracked),
        logit=torch.stack(logits, 1).cpu().numpy(),
        final_scale=head.scale.cpu().numpy(),
        provenance=_provenance(model, config),
    )


def cost(model: Model, batch: PromptBatch | FactSet, config: Config | None = None) -> Cost:
    """One forward; memory: the forward's activations, ``z`` at ``N`` and one layer's head outputs."""
    batch = as_batch(model, batch)
    kept = len(batch) * (model.n_layers * model.n_heads * model.d_head + (model.n_heads + 1) * model.d_model)
    forward = forward_floats(model, len(batch), batch.seq_len)
    work = float(len(batch) * batch.seq_len * model.n_layers)
    return Cost(1, work, (kept + forward) * max(model.dtype.itemsize, 4))


# -- dataset-wide thresholds and rates ----------------------------------------------------------------


def _provenance(model: Model, config: Config) -> dict:
    slicing = {
        "input_columns": "o_h = z_h W_O[h·d_h:(h+1)·d_h] (input-column block of o_proj.weight)",
        "reference_code": "o_h = z_h · o_proj.weight.view(H, d_h, d)[h] (released code; slices output rows)",
    }[config.wo_slicing]
    return result_provenance(
        model,
        config,
        projection="frozen_scale (final residual of the same forward)",
        readout=frozen_scale_readout("o_h", detail="tracked tokens only"),
        heads=slicing + post_norm_note(model) + f"; kv_head = {model.kv_head_rule()}",
        thresholds=f"per step × layer over all heads and examples: mean ± {config.k}·std (population std); "
        "computed by rates() on the concatenated frame",
        layers="block index",
        positions="last",
        bos=model.bos,
    )
