"""Extraction after patching early representations (Geva et al. 2023, ``methods.md`` G5).

Does the attention at the last position need *enriched* representations to extract the attribute?
For every block ``ℓ``, source layer ``ℓ0`` and position set ``P`` (``subject``; ``non_subject`` =
the real positions before the last that are not in the subject, BOS included; ``last``), the input of
block ``ℓ`` (``resid_pre[ℓ]`` = ``x^ℓ`` = HF ``hidden_states[ℓ]``) is replaced at ``P`` by the same
prompt's ``resid_pre[ℓ0]`` at ``P``, and the MHSA output of block ``ℓ`` at the last position
(``attn_out[ℓ]``) is projected to the vocabulary. It *extracts* the target ``a`` (the model's clean
top-1 token, or the gold answer's first) when ``a`` is its unique top-1 token: rank 0 (rank = number of
tokens scored strictly higher) and no tie, as in G4 (``extraction_rate``). The unpatched MHSA output
gives the reference ("clean") event at the same layer. Only the measured block sees the
patch: nothing propagates to later layers.

Summary (:func:`summary`): per ``(ℓ0, P)`` the extraction rate = the fraction of facts with an event at
any *valid* layer ``ℓ > ℓ0`` (max over layers, then mean over facts), next to the unpatched rate over
the same layers. Layers ``ℓ ≤ ℓ0`` are computed too (``ℓ = ℓ0`` is a null patch) but flagged
``valid=False``.

Source layers: Geva's ``(0, 1, 5, 10, 20)`` were chosen for GPT-2 XL's 48 blocks. By default they are
scaled to the model's depth, ``round(x·L/48)`` (Python rounding, half to even), deduplicated and
sorted: the identity on 48 blocks, ``(0, 1, 3, 6, 12)`` on GPT-J's 28, ``(0, 1, 2, 5)`` on 12. The
resolved list is recorded in the result. Readout ``logit_lens`` by default (the model's final norm and
head); preset ``geva`` projects with the input embedding and no norm (``raw_embed``) and scores the
model's top-1 token, as the reference code does; its source layers are the scaled ones (exactly the
code's on a 48-block model; pass ``source_layers`` to choose others).

Fast by construction: block ``ℓ``'s MHSA output depends only on block ``ℓ``'s input, so one batch row
per (fact, ``ℓ0``, ``P``) measures every layer in one forward. At each block a pre-hook writes the
cached clean ``resid_pre[ℓ0]`` at the row's positions ``P``, the MHSA output at the last position is
read, and the block's output is replaced by the clean ``resid_post[ℓ]`` so the next block again
starts from the clean state. A chunk of facts costs one clean forward plus
``ceil(rows / max_batch_rows)`` patched ones. The naive loop (one forward per fact × ``ℓ0`` × ``P`` ×
``ℓ``) is in ``tests/oracles`` and gives the same numbers.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
import pandas as pd
import torch

from recallscope.core import attributes as attr
from recallscope.core.cache import Cache, forward_floats, run_with_cache
from recallscope.core.decoding import choose_targets
from recallscope.core.dtypes import upcast
from recallscope.core.hooks import site_hook
from recallscope.core.tokens import PromptBatch, as_batch
from recallscope.core.vocab import decode_tokens, readout_floats
from recallscope.data.facts import FactSet
from recallscope.errors import RecallscopeError
from recallscope.methods.base import Cost, MethodConfig, MethodResult, result_provenance
from recallscope.methods.geva2023.summaries import early_patching_summary as summary
from recallscope.methods.hints import DISTINCT, NON_EMPTY, NonNegative, Positive
from recallscope.models.model import Model
from recallscope.models.sites import Site

__all__ = [
    "NAME",
    "DESCRIPTION",
    "Config",
    "EarlyPatchingResult",
    "run",
    "cost",
    "summary",
    "default_source_layers",
    "resolve_source_layers",
    "POSITION_SETS",
    "GEVA_SOURCE_LAYERS",
]

NAME = "early_patching"
DESCRIPTION = (
    "Patch early states into each block's input: does its attention still extract the answer? (Geva 2023)"
)
CHUNK_SIZE = 8
POSITION_SETS = ("subject", "non_subject", "last")
GEVA_SOURCE_LAYERS = (0, 1, 5, 10, 20)
"""Geva et al.'s source layers for GPT-2 XL."""
GEVA_DEPTH = 48
"""GPT-2 XL's number of blocks, the depth :data:`GEVA_SOURCE_LAYERS` refer to."""


@dataclass(frozen=True, kw_only=True)
class Config(MethodConfig):
    """Early-patching settings; ``geva`` is the reference code's readout and target."""

    source_layers: Annotated[tuple[NonNegative, ...], NON_EMPTY] | None = None
    """Layers ``ℓ0`` whose input states (``resid_pre[ℓ0]``; 0 = embeddings) are patched in. None:
    Geva's ``(0, 1, 5, 10, 20)`` scaled to the model's depth (:func:`default_source_layers`)."""
    positions: Annotated[tuple[Literal[POSITION_SETS], ...], NON_EMPTY, DISTINCT] = POSITION_SETS
    """Position sets patched: subject, non_subject, last."""
    readout: attr.Readout = "logit_lens"
    """How the MHSA output is projected: ``logit_lens``, ``raw`` (``W_U·v``) or ``raw_embed`` (``E·v``)."""
    target: Literal["top1", "gold"] = "top1"
    """Token ``a`` to extract: the model's clean top-1 (Geva) or the gold answer's first token."""
    max_batch_rows: Positive = 128
    """Patched rows per forward (memory bound)."""

    PRESETS = {"geva": dict(readout="raw_embed", target="top1", source_layers=None, positions=POSITION_SETS)}


def default_source_layers(n_layers: int) -> tuple[int, ...]:
    """Geva's ``(0, 1, 5, 10, 20)`` for 48 blocks scaled to ``n_layers``: ``round(x·L/48)``, deduplicated."""
    return tuple(sorted({round(x * n_layers / GEVA_DEPTH) for x in GEVA_SOURCE_LAYERS}))


def resolve_source_layers(model: Model, config: Config) -> tuple[int, ...]:
    """The sorted, distinct source layers ``config`` asks for on ``model`` (checked against its depth)."""
    if config.source_layers is None:
        return default_source_layers(model.n_layers)
    layers = tuple(sorted(set(config.source_layers)))
    if layers[-1] >= model.n_layers:
        raise RecallscopeError(
            f"source layer {layers[-1]} does not exist: this model has {model.n_layers} blocks, so "
            f"0 ≤ ℓ0 < {model.n_layers}; leave source_layers=None to scale Geva's layers to this depth"
        )
    return layers


@dataclass(frozen=True)
class EarlyPatchingResult(MethodResult):
    """Rank and score of the target in each patched MHSA output, ``[fact, source, positions, layer]``."""

    source_layers: list[int]
    positions: list[str]
    rank: np.ndarray
    """``[fact, source, positions, layer]`` rank of the target (0 = top) in the patched MHSA output."""
    score: np.ndarray
    """``[fact, source, positions, layer]`` readout score (logit) of the target, float64."""
    extracts: np.ndarray
    """``[fact, source, positions, layer]`` bool: the target is the unique top-1 (rank 0, no tie)."""
    clean_rank: np.ndarray
    """``[fact, layer]`` rank in the unpatched MHSA output."""
    clean_score: np.ndarray
    """``[fact, layer]``"""
    clean_extracts: np.ndarray
    """``[fact, layer]``"""
    target_tokens: list[str]

    @property
    def valid(self) -> np.ndarray:
        """``[source, layer]`` bool: ``layer > source_layer`` (an earlier state is patched in)."""
        n_layers = self.rank.shape[-1]
        return np.arange(n_layers)[None, :] > np.array(self.source_layers)[:, None]

    def to_frame(self) -> pd.DataFrame:
        """One row per fact × source layer × position set × layer."""
        f, s, p, layer = (a.reshape(-1) for a in np.indices(self.rank.shape))
        return pd.DataFrame(
            {
                "fact_id": np.array(self.fact_ids, dtype=object)[f],
                "source_layer": np.array(self.source_layers, dtype=int)[s],
                "positions": np.array(self.positions, dtype=object)[p],
                "layer": layer,
                "attn_rank": self.rank.reshape(-1),
                "attn_score": self.score.reshape(-1),
                "extracts": self.extracts.reshape(-1),
                "clean_rank": self.clean_rank[f, layer],
                "clean_score": self.clean_score[f, layer],
                "clean_extracts": self.clean_extracts[f, layer],
                "valid": self.valid[s, layer],
                "target": np.array(self.target_tokens, dtype=object)[f],
            }
        )

    def summary(self) -> pd.DataFrame:
        """:func:`summary` of :meth:`to_frame`."""
        return summary(self.to_frame())

    def tables(self) -> dict[str, pd.DataFrame]:
        """No extra tables (rates over many chunks come from :func:`summary` of the whole frame)."""
        return {}

    def arrays(self) -> dict[str, np.ndarray]:
        """Per fact ``rank``, ``score``, ``extracts`` ``[source, positions, layer]`` and ``clean_rank``."""
        return self.per_fact(
            rank=self.rank, score=self.score, extracts=self.extracts, clean_rank=self.clean_rank
        )


def run(model: Model, batch: PromptBatch | FactSet, config: Config | None = None) -> EarlyPatchingResult:
    """Patch every (source layer, position set) into every block's input, for every fact of ``batch``."""
    config = config or Config()
    batch = as_batch(model, batch)
    sources = resolve_source_layers(model, config)
    sets = _position_sets(batch, config.positions)  # [B, P, T]
    clean = _clean_run(model, batch, sources)
    targets = choose_targets(batch, upcast(clean.logits), config.target)
    attn = clean.stack([Site(layer, "attn_out") for layer in range(model.n_layers)])[:, :, -1]  # [B, L, d]
    clean_rank, clean_score, clean_extracts = _measure(model, attn, targets, config.readout)
    rank, score, extracts = _patched(model, batch, clean, sources, sets, targets, config)
    shape = (len(batch), len(sources), len(config.positions), model.n_layers)
    return EarlyPatchingResult(
        config=config,
        fact_ids=list(batch.fact_ids or map(str, range(len(batch)))),
        source_layers=list(sources),
        positions=list(config.positions),
        rank=rank.reshape(shape).numpy(),
        score=score.reshape(shape).numpy(),
        extracts=extracts.reshape(shape).numpy(),
        clean_rank=clean_rank.numpy(),
        clean_score=clean_score.numpy(),
        clean_extracts=clean_extracts.numpy(),
        target_tokens=decode_tokens(model, targets),
        provenance=_provenance(model, config, sources),
    )


def _position_sets(batch: PromptBatch, names: tuple[str, ...]) -> torch.Tensor:
    """``[B, P, T]`` bool: the positions of each named set in each (left-padded) row."""
    real = batch.attention_mask.bool()
    before_last = real.clone()
    before_last[:, -1] = False
    needs_subject = {"subject", "non_subject"} & set(names)
    subject = batch.span_mask("subject") if "subject" in batch.spans else torch.zeros_like(real)
    if needs_subject and (subject.sum(-1) == 0).any():
        raise RecallscopeError(
            f"early patching of {sorted(needs_subject)} needs a subject span in every prompt; "
            "give spans={'subject': ...} when tokenizing, or use positions=('last',)"
        )
    last = torch.zeros_like(real)
    last[:, -1] = True
    named = {"subject": subject & real, "non_subject": before_last & ~subject, "last": last}
    return torch.stack([named[n] for n in names], 1)


def _clean_run(model: Model, batch: PromptBatch, sources: tuple[int, ...]) -> Cache:
    """Clean cache: ``resid_pre`` at the source layers, ``resid_post`` and ``attn_out`` at every layer.

    All positions (``[B, T, d_model]`` each), plus the last-position logits.
    """
    sites = [Site(layer, "resid_pre") for layer in sources]
    sites += [Site(layer, name) for layer in range(model.n_layers) for name in ("resid_post", "attn_out")]
    return run_with_cache(model, batch, sites, logits="last")


def _rows(batch: PromptBatch, n_sources: int, sets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every patched row, fact-major, then source, then position set.

    Returns:
        ``fact [R]`` row of the batch, ``source [R]`` index into the source layers, ``mask [R, T]``
        the positions patched.
    """
    n_sets = sets.shape[1]
    fact = torch.arange(len(batch)).repeat_interleave(n_sources * n_sets)
    source = torch.arange(n_sources).repeat_interleave(n_sets).repeat(len(batch))
    mask = sets[:, None].expand(-1, n_sources, -1, -1).reshape(-1, batch.seq_len)
    return fact, source, mask


def _measure(model: Model, vectors: torch.Tensor, targets: torch.Tensor, how: attr.Readout) -> tuple:
    """Read ``vectors [n, L, d_model]`` out for the targets ``[n]``.

    Returns:
        ``rank [n, L]``, float64 ``score [n, L]`` (the target's readout logit) and bool
        ``extracts [n, L]`` (unique top-1), on the CPU.
    """
    proj = attr.readout(model, vectors, how, targets=targets, k=2)
    return proj.target_ranks.cpu(), proj.target_logits.double().cpu(), attr.extraction_events(proj)


def _patched(model, batch, clean, sources, sets, targets, config) -> tuple[torch.Tensor, ...]:
    """``rank``, ``score`` and ``extracts`` ``[R, L]`` of each row's target in its patched MHSA outputs."""
    fact, source, mask = _rows(batch, len(sources), sets)
    states = [clean[Site(layer, "resid_pre")].to(model.device) for layer in sources]
    pre = torch.stack(states, 1)  # [B, S, T, d_model]
    parts = []
    for begin in range(0, len(fact), config.max_batch_rows):
        part = slice(begin, begin + config.max_batch_rows)
        rows = fact[part].to(pre.device)
        value = pre[rows, source[part].to(pre.device)]  # [r, T, d]
        attn = _patched_attn(model, batch.select(fact[part]), clean, rows, value, mask[part])  # [r, L, d]
        parts.append(_measure(model, attn, targets[fact[part]], config.readout))
    return tuple(torch.cat(column) for column in zip(*parts, strict=True))


def _patched_attn(
    model: Model, sub: PromptBatch, clean: Cache, rows: torch.Tensor, value: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """``[r, L, d_model]`` MHSA outputs at the last position, each block's input patched on its own.

    Args:
        sub: the batch rows (one per patched row).
        clean: the clean cache of the whole batch.
        rows: ``[r]`` index of each row's fact in the clean cache.
        value: ``[r, T, d_model]`` the states written at the patched positions.
        mask: ``[r, T]`` bool, the patched positions.
    """
    keep = mask[:, :, None]

    def patch_input(act: torch.Tensor) -> torch.Tensor:
        return torch.where(keep.to(act.device), value.to(act.device), act)

    def restore(layer: int):
        post = clean[Site(layer, "resid_post")]  # [B, T, d]
        return lambda act: post[rows.to(post.device)]

    last = model.n_layers - 1
    sites = [Site(layer, "attn_out") for layer in range(model.n_layers)]
    with contextlib.ExitStack() as stack:
        for layer in range(model.n_layers):
            stack.enter_context(site_hook(model, Site(layer, "resid_pre"), patch_input))
            if layer < last:  # the forward stops after the last block
                stack.enter_context(site_hook(model, Site(layer, "resid_post"), restore(layer)))
        cache = run_with_cache(model, sub, sites, positions=[-1])
    return cache.stack(sites)[:, :, 0]


def _provenance(model: Model, config: Config, sources: tuple[int, ...]) -> dict:
    rule = "given" if config.source_layers is not None else f"round(x*L/48) of {GEVA_SOURCE_LAYERS}, deduped"
    return result_provenance(
        model,
        config,
        readout=config.readout,
        target=config.target,
        event="extracts: the target is the unique top-1 (rank 0, no tie) of readout(attn_out[l]) at the "
        "last position",
        rank="number of tokens scored strictly higher than the target (0 = top-1)",
        layers="l = block l (0-based); the input of block l (resid_pre[l] = HF hidden_states[l]) is patched",
        source="resid_pre[l0] of the same prompt at the same positions (l0 = 0: embeddings)",
        source_layers=list(sources),
        source_layers_rule=rule,
        positions="subject; non_subject = real positions before the last not in the subject; last",
        bos=model.bos,
        propagation="none: every block's output is restored to the clean run's",
        valid="layer > source_layer; other layers are computed but left out of the summary rates",
    )


def cost(model: Model, batch: PromptBatch | FactSet, config: Config | None = None) -> Cost:
    """Forwards: one clean plus ``ceil(rows / max_batch_rows)``; memory: clean cache + one patched forward."""
    config = config or Config()
    batch = as_batch(model, batch)
    n_sources = len(resolve_source_layers(model, config))
    rows = len(batch) * n_sources * len(config.positions)
    forwards = 1 + -(-rows // config.max_batch_rows)
    width = min(rows, config.max_batch_rows)
    n_tokens, d_model, n_layers = batch.seq_len, model.d_model, model.n_layers
    cache = len(batch) * n_tokens * d_model * (n_sources + 2 * n_layers)
    activations = forward_floats(model, width, n_tokens)
    floats = cache + width * n_tokens * d_model + width * n_layers * d_model
    floats += max(
        activations, readout_floats(model, width * n_layers)
    )  # a patched forward, then its readouts
    work = float((rows + len(batch)) * n_tokens * n_layers)
    return Cost(forwards, work, floats * model.dtype.itemsize, vocab_rows=rows * n_layers)
