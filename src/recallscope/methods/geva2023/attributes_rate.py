"""Attributes rate: how much the hidden states "know" about the subject (Geva et al. 2023, G2).

At every layer and at five positions (``subject_last``, ``subject_first``, ``after_subject`` = the
first token after the subject, ``last``, ``first``), project the residual stream to the vocabulary,
keep the top ``top_k`` tokens, drop English stopwords and short tokens, keep the first ``keep``
survivors, and count how many are *reference tokens* of the subject: tokens of its description (or,
without one, of the answers of the dataset's other facts about it). The rate is
``100·|top ∩ references| / |top|``. The baseline projects the mean of the subject's token embeddings
the same way.

Conventions (recorded in every result): layer ``l`` is the *input* of block ``l`` (``resid_pre``;
Geva's plots label it ``l+1``); layer ``L`` is the final residual (before the final norm). Readout
``logit_lens`` by default (the model's final norm and head); preset ``geva`` uses ``E·h`` without
norm (``raw_embed``) and the code's case-sensitive stopword test on reference tokens. Facts whose
subject has no reference text keep their rows with NaN rates (``has_references`` False); the paper
excluded them.

One forward per chunk: the states at the five positions of every layer are cached and projected in
chunks. The naive per-fact, per-layer oracle is in ``tests/oracles``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
import pandas as pd
import torch

from recallscope.core import attributes as attr
from recallscope.core.cache import forward_floats, run_with_cache
from recallscope.core.tokens import PromptBatch, as_batch
from recallscope.core.vocab import decode_tokens, readout_floats
from recallscope.data.facts import FactSet
from recallscope.errors import RecallscopeError
from recallscope.methods.base import Cost, MethodConfig, MethodResult, result_provenance
from recallscope.methods.hints import NON_EMPTY, NonNegative, Positive
from recallscope.models.model import Model
from recallscope.models.sites import Site
from recallscope.stats import mean_ci

__all__ = ["NAME", "DESCRIPTION", "Config", "AttributesRateResult", "run", "prepare", "cost", "POSITIONS"]

NAME = "attributes_rate"
DESCRIPTION = "Subject enrichment: share of subject-related tokens in each layer's top tokens (Geva 2023)."
CHUNK_SIZE = 16
POSITIONS = ("subject_last", "subject_first", "after_subject", "last", "first")
SHOWN_TOKENS = 10
"""Clean top tokens per (fact, position, layer) kept in the ``top_tokens`` table."""


@dataclass(frozen=True, kw_only=True)
class Config(MethodConfig):
    """Attributes-rate settings; ``geva`` reproduces the reference code's choices."""

    positions: Annotated[tuple[Literal[POSITIONS], ...], NON_EMPTY] = POSITIONS
    readout: attr.Readout = "logit_lens"
    top_k: Positive = 500
    """Top tokens of each projection considered before cleaning."""
    keep: Positive = 50
    """Clean tokens kept (the first survivors of the top ``top_k``)."""
    min_length: NonNegative = 3
    """Tokens shorter than this once stripped are dropped (Geva: length ≤ 2)."""
    lowercase_references: bool = True
    """Lowercase reference tokens for the stopword test too (Geva's code does not)."""
    subject_objects: Mapping[str, tuple[str, ...]] | None = None
    """Subject → answers of every fact about it, over the whole dataset (filled by :func:`prepare`
    for subjects without a description; their reference texts are the *other* facts' answers)."""

    PRESETS = {
        "geva": dict(readout="raw_embed", top_k=500, keep=50, min_length=3, lowercase_references=False)
    }

    def __post_init__(self) -> None:
        if self.keep > self.top_k:
            raise RecallscopeError(f"need keep ≤ top_k, got keep={self.keep}, top_k={self.top_k}")

    @property
    def token_filter(self) -> attr.TokenFilter:
        return attr.TokenFilter(self.top_k, self.keep, self.min_length, self.lowercase_references)


@dataclass(frozen=True)
class AttributesRateResult(MethodResult):
    """``rate [fact, position, layer]`` (layer ``L`` = final residual) and the embedding baseline."""

    positions: list[str]
    rate: np.ndarray
    """``[fact, position, layer]`` percent, NaN without references."""
    n_top: np.ndarray
    """``[fact, position, layer]`` clean tokens kept (≤ keep)."""
    top_ids: np.ndarray
    """``[fact, position, layer, keep]`` clean top token ids, −1 = none."""
    baseline: np.ndarray
    """``[fact]`` rate of the mean subject-token embedding."""
    n_references: list[int]
    tokens: list[list[str]]
    """``[fact][position]`` the token at each position."""
    token_index: np.ndarray
    """``[fact, position]`` index of the position within the prompt."""
    top_tokens: list
    """``[fact][position][layer]`` the first :data:`SHOWN_TOKENS` clean tokens."""

    def to_frame(self) -> pd.DataFrame:
        """One row per fact × position × layer."""
        f, p, layer = (a.reshape(-1) for a in np.indices(self.rate.shape))
        refs = np.array(self.n_references)[f]
        return pd.DataFrame(
            {
                "fact_id": np.array(self.fact_ids, dtype=object)[f],
                "position": np.array(self.positions, dtype=object)[p],
                "token_index": self.token_index[f, p],
                "token": [self.tokens[i][j] for i, j in zip(f, p, strict=True)],
                "layer": layer,
                "attributes_rate": self.rate.reshape(-1),
                "n_top": self.n_top.reshape(-1),
                "baseline_rate": self.baseline[f],
                "n_references": refs,
                "has_references": refs > 0,
            }
        )

    def tables(self) -> dict[str, pd.DataFrame]:
        """``{"top_tokens": fact × position × layer rows with the first clean tokens (a list)}``."""
        n_facts, n_pos, n_layers = self.rate.shape
        f, p, layer = (a.reshape(-1) for a in np.indices(self.rate.shape))
        return {
            "top_tokens": pd.DataFrame(
                {
                    "fact_id": np.array(self.fact_ids, dtype=object)[f],
                    "position": np.array(self.positions, dtype=object)[p],
                    "layer": layer,
                    "tokens": [self.top_tokens[i][j][k] for i, j, k in zip(f, p, layer, strict=True)],
                }
            )
        }

    def summary(self) -> pd.DataFrame:
        """Per position × layer, the attributes rate and its baseline: means over facts with
        95% normal-approximation bands (``*_ci``) and ``n``.
        """
        return mean_ci(self.to_frame(), ["position", "layer"], ["attributes_rate", "baseline_rate"])

    def arrays(self) -> dict[str, np.ndarray]:
        """Per fact ``rate [position, layer]`` and ``top_ids [position, layer, keep]``."""
        return self.per_fact(rate=self.rate, top_ids=self.top_ids)


def prepare(
    model: Model, facts: FactSet | PromptBatch, config: Config, dataset: FactSet | None = None
) -> Config:
    """Collect, over the facts of the run, the answers about subjects that have no description
    (``dataset``, the whole loaded dataset, is not read).
    """
    return attr.with_subject_objects(config, facts)


def run(
    model: Model,
    facts: FactSet | PromptBatch,
    config: Config | None = None,
    *,
    references: Sequence[Sequence[str]] | None = None,
) -> AttributesRateResult:
    """Attributes rate of every configured position at every layer for every fact.

    Args:
        model: the model.
        facts: a :class:`FactSet` (reference texts from its facts) or a :class:`PromptBatch` with a
            ``subject`` span, then with ``references``.
        config: settings (default :class:`Config`).
        references: per prompt, texts about its subject (overrides the facts' descriptions).
    """
    config = config or Config()
    texts = attr.texts_for(facts, config.subject_objects, references, NAME)
    batch = as_batch(model, facts)
    refs = attr.reference_masks(model, texts, config.token_filter)  # [B, V]
    clean = attr.clean_token_mask(model, config.token_filter)
    positions = _positions(batch, config.positions)  # [B, P]
    states = _states(model, batch, positions)  # [B, P, L + 1, d]
    top, n_top = _top(model, states, clean, config)
    baseline_top, _ = _top(model, _subject_embedding(model, batch)[:, None], clean, config)  # [B, 1, keep]
    pads = batch.pad_lengths
    shown = top[..., :SHOWN_TOKENS]
    return AttributesRateResult(
        config=config,
        fact_ids=list(batch.fact_ids or map(str, range(len(batch)))),
        positions=list(config.positions),
        rate=attr.attributes_rate(top, refs).cpu().numpy(),
        n_top=n_top.cpu().numpy(),
        top_ids=top.cpu().numpy(),
        baseline=attr.attributes_rate(baseline_top, refs)[:, 0].cpu().numpy(),
        n_references=refs.sum(-1).tolist(),
        tokens=decode_tokens(model, batch.input_ids.gather(1, positions)),
        token_index=(positions - pads[:, None]).cpu().numpy(),
        top_tokens=[[[_strings(model, ids) for ids in row] for row in fact] for fact in shown.tolist()],
        provenance=result_provenance(
            model,
            config,
            readout=config.readout,
            layers="l = input of block l (resid_pre); l = L is the final residual before the final norm",
            positions="subject_last, subject_first, after_subject = first token after the subject, last, "
            "first = first prompt token (the BOS when the tokenizer adds one)",
            references="fact description, else the answers of the dataset's other facts about the subject",
            stopwords="scikit-learn ENGLISH_STOP_WORDS",
            filter=(
                f"top {config.top_k} -> drop stopwords and tokens shorter than {config.min_length} "
                f"-> first {config.keep}"
            ),
            baseline="mean of the subject's token embeddings (as in the prompt), same readout",
            bos=model.bos,
        ),
    )


def _positions(batch: PromptBatch, names: Sequence[str]) -> torch.Tensor:
    """``[B, P]`` absolute positions in the padded batch."""
    if "subject" not in batch.spans or (batch.spans["subject"][:, 0] < 0).any():
        raise RecallscopeError("attributes_rate needs a subject span in every prompt")
    start, stop = batch.spans["subject"].unbind(1)
    last = torch.full_like(start, batch.seq_len - 1)
    named = {
        "subject_last": stop - 1,
        "subject_first": start,
        "after_subject": torch.minimum(stop, last),
        "last": last,
        "first": batch.pad_lengths.to(start.dtype),
    }
    return torch.stack([named[n] for n in names], 1).long()


def _states(model: Model, batch: PromptBatch, positions: torch.Tensor) -> torch.Tensor:
    """``[B, P, L + 1, d_model]``: ``resid_pre`` of every block, then the final residual."""
    sites = [Site(layer, "resid_pre") for layer in range(model.n_layers)]
    sites.append(Site(model.n_layers - 1, "resid_post"))
    cache = run_with_cache(model, batch, sites, positions=positions)
    return cache.stack(sites, dim=2)  # [B, P, L + 1, d]


def _subject_embedding(model: Model, batch: PromptBatch) -> torch.Tensor:
    """``[B, d_model]`` mean of the token embeddings over each subject span."""
    embed = run_with_cache(model, batch, [Site(None, "embed")])[Site(None, "embed")]  # [B, T, d]
    mask = batch.span_mask("subject").to(embed.device, embed.dtype)[..., None]
    return (embed * mask).sum(1) / mask.sum(1)


def _top(model: Model, states: torch.Tensor, clean: torch.Tensor, config: Config):
    """Clean top token ids ``[*S, keep]`` and their count ``[*S]`` for vectors ``[*S, d]``."""
    projection = attr.readout(model, states, config.readout, k=min(config.top_k, model.d_vocab))
    return attr.clean_top_tokens(projection, clean, config.keep)


def _strings(model: Model, ids: list[int]) -> list[str]:
    vocab = attr.vocab_strings(model)
    return [vocab[i] for i in ids if i >= 0]


def cost(model: Model, batch: PromptBatch | FactSet, config: Config | None = None) -> Cost:
    """One forward (plus an embedding-only pass) and the projections of the kept states."""
    config = config or Config()
    batch = as_batch(model, batch)
    n_vectors = len(batch) * (len(config.positions) * (model.n_layers + 1) + 1)
    floats = n_vectors * (model.d_model + 2 * config.top_k)  # then the forward, or (after it) the readouts
    readouts = readout_floats(model, n_vectors)
    floats += max(forward_floats(model, len(batch), batch.seq_len), readouts)
    work = float(len(batch) * batch.seq_len * model.n_layers)
    return Cost(1, work, floats * model.dtype.itemsize, vocab_rows=n_vectors)
