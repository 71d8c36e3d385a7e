"""Attribute extraction by sublayer updates (Geva et al. 2023, ``methods.md`` G4 and G6).

At the last position ``N``, read every block's attention update ``a^ℓ_N`` and MLP update
``m^ℓ_N`` in vocabulary space (``readout``). The update of layer ℓ *extracts* the attribute ``a``
(the model's clean top-1 by default) when ``a`` is its top-1 token: no token scores higher (rank 0;
rank = number of tokens scored strictly higher) and none ties with it, so a zero update (every key
blocked, no output bias) extracts nothing. G6: ``subject_rank`` is the rank of ``a`` in the readout
of the last subject token's residual after block ℓ (``resid_post[ℓ]`` = Geva's
``hidden_states[ℓ+1]``), to compare with ``attn_rank`` where attention extracts.

Local attention counterfactuals (G4.5): the attention output of layer ℓ at ``N`` is recomputed from
that layer's cached values with a modified last attention row, and nothing propagates to other
layers: ``o_proj(concat_h Σ_j w^h_j v^{kv(h)}_j)`` (bias included), then Gemma-2's post-norm, exactly
as the model computes it. Query head ``h`` reads key/value head ``h // n_groups``. Each variant names
the key positions it *blocks* (:data:`COUNTERFACTUALS`): ``none`` is the real update;
``subject_last`` is the last subject token; ``non_subject`` blocks every prompt position outside the
subject, the last included; ``all_but_first`` keeps only the first real token (BOS where the
tokenizer adds one); ``all`` leaves zero weights (output = bias). Padding is never a key.

Modes: ``renormalize`` (default) zeroes the blocked probabilities and renormalizes the rest per head,
which equals masking the pre-softmax scores; a head with nothing left gets zero weights.
``resoftmax`` is the reference code's quirk: the post-softmax probabilities get −1e6 at blocked keys
and go through a softmax again (over every real key, including keys outside a sliding window),
which makes the surviving weights nearly uniform. In both modes a row with nothing blocked is the
original row, and one with every key blocked is all zeros.

Preset ``geva``: raw ``E·v`` readout (GPT-2's tied embeddings), model's top-1, ``resoftmax``.
Statistics over facts: :func:`summary` and :func:`layer_rates`, from :meth:`to_frame`.

Fast by construction: one forward per ``max_batch_rows`` facts caches everything; all layers and
variants are recomputed in a few tensor operations and projected in chunks. The naive loop (one
unpadded forward per fact, per-head loops) is in ``tests/oracles`` and gives the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

import numpy as np
import pandas as pd
import torch

from recallscope.core.attention_counterfactuals import (
    COUNTERFACTUALS,
    RESOFTMAX_BLOCKED,
    Capture,
    CounterfactualMode,
    blocked_keys,
    capture,
    counterfactual_outputs,
    counterfactual_weights,
)
from recallscope.core.attributes import Readout, extraction_events, readout
from recallscope.core.cache import forward_floats
from recallscope.core.decoding import choose_targets
from recallscope.core.dtypes import upcast
from recallscope.core.tokens import PromptBatch, as_batch
from recallscope.core.vocab import decode_tokens, readout_floats
from recallscope.data.facts import FactSet
from recallscope.errors import RecallscopeError
from recallscope.methods.base import Cost, MethodConfig, MethodResult, result_provenance
from recallscope.methods.geva2023.summaries import extraction_summary as summary
from recallscope.methods.hints import DISTINCT, Positive
from recallscope.models.model import Model

__all__ = [
    "NAME",
    "DESCRIPTION",
    "COUNTERFACTUALS",
    "Config",
    "Capture",
    "ExtractionRateResult",
    "run",
    "cost",
    "capture",
    "blocked_keys",
    "counterfactual_weights",
    "counterfactual_outputs",
    "summary",
    "layer_rates",
]

NAME = "extraction_rate"
DESCRIPTION = "Which attention / MLP updates at the last token make the attribute top-1 (Geva 2023)."
CHUNK_SIZE = 16


@dataclass(frozen=True, kw_only=True)
class Config(MethodConfig):
    """Extraction-rate settings; defaults are the clean variants, ``geva`` the code's behaviour."""

    readout: Readout = "logit_lens"
    """Vocabulary readout of updates: ``logit_lens``, ``raw`` (``W_U·v``) or ``raw_embed`` (``E·v``)."""
    target: Literal["top1", "gold"] = "top1"
    """Attribute token: the model's clean top-1 (Geva) or the gold answer's first token."""
    top_k_tokens: Positive = 10
    """Top tokens kept per update (arrays ``attn_top`` / ``mlp_top``)."""
    counterfactuals: Annotated[tuple[Literal[COUNTERFACTUALS], ...], DISTINCT] = COUNTERFACTUALS
    """Attention counterfactuals to compute (may be empty); see :data:`COUNTERFACTUALS`."""
    counterfactual_mode: CounterfactualMode = "renormalize"
    """``renormalize`` (= pre-softmax masking) or ``resoftmax`` (the reference code's quirk)."""
    max_batch_rows: Positive = 32
    """Facts per forward (memory bound)."""

    PRESETS = {
        "geva": dict(
            readout="raw_embed",
            target="top1",
            top_k_tokens=10,
            counterfactuals=COUNTERFACTUALS,
            counterfactual_mode="resoftmax",
        )
    }


@dataclass(frozen=True)
class ExtractionRateResult(MethodResult):
    """Ranks ``[fact, layer]`` of the attribute in each update, top tokens, and the counterfactuals."""

    target_ids: np.ndarray
    """``[fact]`` attribute token ids."""
    target_tokens: list[str]
    attn_rank: np.ndarray
    """``[fact, layer]`` rank of the attribute in the attention update's readout (0 = top-1)."""
    mlp_rank: np.ndarray
    attn_extracts: np.ndarray
    """``[fact, layer]`` bool: the attribute is the update's unique top-1 (attention; MLP alike)."""
    mlp_extracts: np.ndarray
    subject_rank: np.ndarray
    """``[fact, layer]`` rank in the readout of ``resid_post[layer]`` at the last subject token."""
    attn_logit: np.ndarray
    """``[fact, layer]`` readout score of the attribute (same for ``mlp_logit``, ``subject_logit``)."""
    mlp_logit: np.ndarray
    subject_logit: np.ndarray
    attn_top: np.ndarray
    """``[fact, layer, k]`` top token ids of the attention update (``mlp_top``, ``subject_top`` alike)."""
    mlp_top: np.ndarray
    subject_top: np.ndarray
    subject_at_start: list[bool]
    counterfactuals: list[str]
    cf_rank: np.ndarray
    """``[fact, variant, layer]`` rank of the attribute in the counterfactual update."""
    cf_extracts: np.ndarray
    cf_logit: np.ndarray
    cf_top1: np.ndarray
    """``[fact, variant, layer]`` top token id of the counterfactual update (−1 if tied: a zero update)."""
    top_strings: dict[int, str] = field(default_factory=dict)
    """Decoded strings of the token ids that appear as a top-1."""

    def _decode(self, ids: np.ndarray) -> np.ndarray:
        return np.array([self.top_strings.get(int(i), "") for i in ids.reshape(-1)], dtype=object)

    def to_frame(self) -> pd.DataFrame:
        """One row per fact × layer (``attn_extracts`` = attribute is the update's top-1)."""
        n_facts, n_layers = self.attn_rank.shape
        f, layer = (a.reshape(-1) for a in np.indices((n_facts, n_layers)))
        return pd.DataFrame(
            {
                "fact_id": np.array(self.fact_ids, dtype=object)[f],
                "layer": layer,
                "target": np.array(self.target_tokens, dtype=object)[f],
                "target_id": self.target_ids[f],
                "attn_rank": self.attn_rank.reshape(-1),
                "mlp_rank": self.mlp_rank.reshape(-1),
                "subject_rank": self.subject_rank.reshape(-1),
                "attn_extracts": self.attn_extracts.reshape(-1),
                "mlp_extracts": self.mlp_extracts.reshape(-1),
                "attn_logit": self.attn_logit.reshape(-1),
                "mlp_logit": self.mlp_logit.reshape(-1),
                "subject_logit": self.subject_logit.reshape(-1),
                "attn_top_token": self._decode(self.attn_top[..., 0]),
                "mlp_top_token": self._decode(self.mlp_top[..., 0]),
                "subject_at_start": np.array(self.subject_at_start)[f],
            }
        )

    def tables(self) -> dict[str, pd.DataFrame]:
        """``{"counterfactuals": one row per fact × layer × variant}`` (when any were computed)."""
        if not self.counterfactuals:
            return {}
        f, v, layer = (a.reshape(-1) for a in np.indices(self.cf_rank.shape))
        frame = pd.DataFrame(
            {
                "fact_id": np.array(self.fact_ids, dtype=object)[f],
                "layer": layer,
                "variant": np.array(self.counterfactuals, dtype=object)[v],
                "rank": self.cf_rank.reshape(-1),
                "extracts": self.cf_extracts.reshape(-1),
                "logit": self.cf_logit.reshape(-1),
                "top_token": self._decode(self.cf_top1),
            }
        )
        return {"counterfactuals": frame.sort_values(["fact_id", "layer"], kind="stable", ignore_index=True)}

    def summary(self) -> pd.DataFrame:
        """:func:`summary` of this result's facts."""
        return summary(self.to_frame())

    def arrays(self) -> dict[str, np.ndarray]:
        """Per fact ``attn_top`` / ``mlp_top`` / ``subject_top`` ``[layer, k]``, ``counterfactual_rank``."""
        named = {"attn_top": self.attn_top, "mlp_top": self.mlp_top, "subject_top": self.subject_top}
        if self.counterfactuals:
            named["counterfactual_rank"] = self.cf_rank
        return self.per_fact(**named)


# -- run -----------------------------------------------------------------------------------------


def run(model: Model, batch: PromptBatch | FactSet, config: Config | None = None) -> ExtractionRateResult:
    """Ranks of the attribute in every layer's updates (and counterfactuals) for every fact."""
    config = config or Config()
    batch = as_batch(model, batch)
    _check_subjects(batch)
    chunks = [
        _run_chunk(model, batch.select(range(i, min(i + config.max_batch_rows, len(batch)))), config)
        for i in range(0, len(batch), config.max_batch_rows)
    ]
    out = {key: np.concatenate([c[key] for c in chunks]) for key in chunks[0]}
    top_ids = np.unique(np.concatenate([out["attn_top"][..., 0].ravel(), out["mlp_top"][..., 0].ravel()]))
    top_ids = np.unique(np.concatenate([top_ids, out["cf_top1"].ravel()]))
    top_ids = top_ids[top_ids >= 0]
    subject = batch.spans["subject"]
    return ExtractionRateResult(
        config=config,
        fact_ids=list(batch.fact_ids or map(str, range(len(batch)))),
        target_tokens=decode_tokens(model, torch.as_tensor(out["target_ids"])),
        subject_at_start=(subject[:, 0] == batch.pad_lengths).tolist(),
        counterfactuals=list(config.counterfactuals),
        top_strings=dict(zip(top_ids.tolist(), decode_tokens(model, torch.as_tensor(top_ids)), strict=True)),
        provenance=_provenance(model, config),
        **out,
    )


def _check_subjects(batch: PromptBatch) -> None:
    if "subject" not in batch.spans or (batch.spans["subject"][:, 0] < 0).any():
        raise RecallscopeError(
            "extraction rate needs a subject span in every prompt (G6 reads the last subject token, "
            "and the counterfactuals block it): tokenize with spans={'subject': [...]} or pass a FactSet"
        )


def _run_chunk(model: Model, batch: PromptBatch, config: Config) -> dict[str, np.ndarray]:
    """Every array of the result for one chunk of facts (one forward)."""
    cap = capture(model, batch)
    targets = choose_targets(batch, upcast(cap.logits), config.target)
    vectors = [cap.attn_out, cap.mlp_out, cap.subject_resid]  # each [B, L, d_model]
    if config.counterfactuals:
        blocked = blocked_keys(batch, config.counterfactuals)
        real = batch.attention_mask.bool()
        weights = counterfactual_weights(cap.pattern, blocked, real, config.counterfactual_mode)
        vectors += list(counterfactual_outputs(model, cap, weights).unbind(1))
    stacked = torch.stack([x.to(cap.attn_out.dtype) for x in vectors], dim=1)  # [B, 3 + n, L, d_model]
    proj = readout(model, stacked, config.readout, targets=targets, k=max(2, config.top_k_tokens))
    rank, logit, top = (t.cpu() for t in (proj.target_ranks, proj.target_logits, proj.topk_ids))
    unique = (proj.topk_logits[..., 0] > proj.topk_logits[..., 1]).cpu()  # the top-1 is not tied
    extracts = extraction_events(proj).numpy()
    top1 = torch.where(unique, top[..., 0], -1)  # -1: no unique top token (e.g. a zero update)
    logit, top = logit.double(), top[..., : config.top_k_tokens]
    return {
        "target_ids": targets.numpy(),
        "attn_rank": rank[:, 0].numpy(),
        "mlp_rank": rank[:, 1].numpy(),
        "attn_extracts": extracts[:, 0],
        "mlp_extracts": extracts[:, 1],
        "cf_extracts": extracts[:, 3:],
        "subject_rank": rank[:, 2].numpy(),
        "attn_logit": logit[:, 0].numpy(),
        "mlp_logit": logit[:, 1].numpy(),
        "subject_logit": logit[:, 2].numpy(),
        "attn_top": top[:, 0].numpy(),
        "mlp_top": top[:, 1].numpy(),
        "subject_top": top[:, 2].numpy(),
        "cf_rank": rank[:, 3:].numpy(),
        "cf_logit": logit[:, 3:].numpy(),
        "cf_top1": top1[:, 3:].numpy(),
    }


def _provenance(model: Model, config: Config) -> dict:
    return result_provenance(
        model,
        config,
        readout=config.readout,
        target=config.target,
        extraction="the attribute is the update's unique top-1 (rank 0, no tie)",
        rank="number of tokens scored strictly higher than the attribute (0 = top-1)",
        layers="layer l = block l; subject_rank reads resid_post[l] (Geva's hidden_states[l+1])",
        positions="last = last prompt token; subject_last = last subject token; first = first real token",
        bos=model.bos,
        counterfactual_mode=config.counterfactual_mode,
        counterfactuals="local to each layer's last position (no propagation); names = blocked keys; "
        "padding is never a key; every key blocked -> zero weights (output = bias, then post-norm)",
        resoftmax=f"softmax over real keys of the probabilities with {RESOFTMAX_BLOCKED:g} at blocked keys",
    )


def cost(model: Model, batch: PromptBatch | FactSet, config: Config | None = None) -> Cost:
    """One forward per ``max_batch_rows`` facts; memory: one forward, the cache, one projection chunk."""
    config = config or Config()
    batch = as_batch(model, batch)
    rows, n_tokens, n_layers = min(len(batch), config.max_batch_rows), batch.seq_len, model.n_layers
    n_var = len(config.counterfactuals)
    floats = rows * n_layers * (3 * model.d_model + model.n_heads * n_tokens)  # cached updates, rows
    floats += rows * n_layers * n_tokens * model.n_kv_heads * model.d_head  # cached values
    floats += rows * n_layers * n_var * (model.n_heads * n_tokens + 2 * model.d_model)  # counterfactuals
    floats += max(forward_floats(model, rows, n_tokens), readout_floats(model, rows * n_layers * (3 + n_var)))
    forwards = -(-len(batch) // config.max_batch_rows)
    itemsize = max(model.dtype.itemsize, 4)
    readouts = len(batch) * n_layers * (3 + n_var)
    return Cost(forwards, float(len(batch) * n_tokens * n_layers), floats * itemsize, vocab_rows=readouts)


# -- statistics ----------------------------------------------------------------------------------


def layer_rates(frame: pd.DataFrame) -> pd.DataFrame:
    """Per-layer extraction rates (fraction of facts): ``layer``, ``attn_rate``, ``mlp_rate``, ``n``."""
    grouped = frame.groupby("layer")
    rates = grouped[["attn_extracts", "mlp_extracts"]].mean()
    rates = rates.rename(columns={"attn_extracts": "attn_rate", "mlp_extracts": "mlp_rate"})
    rates["n"] = grouped.size()
    return rates.reset_index()
