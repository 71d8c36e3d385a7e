"""Corrupted runs for activation patching: what replaces the clean input of one prompt.

Three corruptions of a token span ``[b, e)`` (``methods.md`` §5.7; Zhang & Nanda 2024):

- ``gaussian`` (ROME): ``S`` copies of the prompt whose span embeddings get ``ν·ε``, ``ε ~ N(0, I)``
  from ``numpy.random.RandomState(seed)`` with shape ``[S, e − b, d_model]``; ``ν`` is
  :func:`embedding_noise_level` of a population of texts (ROME: every subject of the dataset);
- ``subject_swap`` (symmetric token replacement): one copy with the subject of another fact of the
  same relation, as many tokens and every other token unchanged
  (:func:`~recallscope.data.variants.add_swap_partners`); its answer is the counterfactual answer;
- ``resample``: ``S`` copies whose span tokens are drawn uniformly (same generator) from a
  vocabulary, the distinct tokens of a population of texts (:func:`span_vocabulary`).

A :class:`Corrupted` holds the rows and, for ``gaussian``, the noise to add while they run::

    bad = gaussian(ids, (2, 5), noise=0.1, samples=10, seed=1, model=model)
    with bad.applied(model):
        state = record_run(model, bad.ids)
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from recallscope.core.cache import run_with_cache
from recallscope.core.patching import add_noise
from recallscope.core.steps import span_masks
from recallscope.errors import RecallscopeError
from recallscope.models.model import Model
from recallscope.models.sites import Site

__all__ = [
    "CORRUPTIONS",
    "Corrupted",
    "standalone_ids",
    "embedding_noise_level",
    "span_vocabulary",
    "prompt_noise_level",
    "prompt_vocabulary",
    "Calibration",
    "calibrate",
    "calibration_fields",
    "gaussian",
    "resample",
    "swapped",
    "SAMPLES",
    "default_samples",
]

CORRUPTIONS = ("gaussian", "subject_swap", "resample")

_ROWS = 256
"""Texts per embedding forward in :func:`embedding_noise_level`."""


SAMPLES = {"cpu": 3, "accelerator": 10}
"""Corrupted copies per prompt when a config leaves ``samples`` unset (:func:`default_samples`)."""


def default_samples(model: Model) -> int:
    """ROME's 10 noise draws on a GPU (or another accelerator); on a CPU its first 3, so that a
    first look takes minutes (the draws are seeded, so 3 copies are the first 3 of the 10).
    """
    return SAMPLES["cpu" if model.device.type == "cpu" else "accelerator"]


@dataclass(frozen=True)
class Corrupted:
    """The corrupted copies of one prompt.

    Attributes:
        ids: ``[S, T]`` token ids of each corrupted row (the prompt's length and positions).
        noise: ``[S, e − b, d_model]`` added to the span's token embeddings while the rows run, or None.
        span: ``(b, e)`` the corrupted positions.
        counter: the counterfactual answer's first token (``subject_swap``), or None.
        partner: the fact whose subject was swapped in, or None.
    """

    ids: torch.Tensor
    noise: torch.Tensor | None
    span: tuple[int, int]
    counter: int | None = None
    partner: str | None = None

    @property
    def samples(self) -> int:
        return self.ids.shape[0]

    def applied(self, model: Model) -> contextlib.AbstractContextManager:
        """Context in which a forward of ``ids`` is the corrupted run (adds the noise, if any)."""
        if self.noise is None:
            return contextlib.nullcontext()
        rows = torch.arange(self.samples)
        positions = torch.arange(*self.span).expand(self.samples, -1)
        return add_noise(model, self.noise, rows, positions)


def standalone_ids(model: Model, texts: Sequence[str]) -> list[list[int]]:
    """Each text tokenized on its own, without special tokens (ROME's ``make_inputs`` of a subject)."""
    if model.tokenizer is None:
        raise RecallscopeError("this model has no tokenizer: give the noise level (noise=...) instead")
    return [list(model.tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]


def embedding_noise_level(model: Model, texts: Sequence[str], factor: float = 3.0) -> float:
    """``factor ×`` the standard deviation of the token-embedding entries (the ``embed`` site) of
    every token of every text, each text tokenized alone; a text given twice counts twice
    (ROME's ``collect_embedding_std`` over the dataset's subjects, times its factor 3).
    """
    rows = [ids for ids in standalone_ids(model, texts) if ids]
    if not rows:
        raise RecallscopeError("no tokens to calibrate the noise on: give the noise level (noise=...)")
    site = Site(None, "embed")
    parts = []
    for start in range(0, len(rows), _ROWS):
        block = rows[start : start + _ROWS]
        width = max(map(len, block))
        ids = torch.zeros(len(block), width, dtype=torch.long)
        mask = torch.zeros(len(block), width, dtype=torch.bool)
        for i, row in enumerate(block):
            ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), True
        embeds = run_with_cache(model, ids.to(model.device), [site])[site]  # [B, T, d]
        parts.append(embeds[mask.to(embeds.device)].double().cpu())
    return factor * float(torch.cat(parts).std())


def span_vocabulary(model: Model, texts: Sequence[str]) -> tuple[int, ...]:
    """The distinct token ids of the texts, each tokenized alone, in increasing order."""
    vocab = sorted({i for ids in standalone_ids(model, texts) for i in ids})
    if not vocab:
        raise RecallscopeError("no tokens to resample from: the texts are empty")
    return tuple(vocab)


def gaussian(
    ids: torch.Tensor, span: tuple[int, int], *, noise: float, samples: int, seed: int, model: Model
) -> Corrupted:
    """``samples`` copies of ``ids [T]`` with ``noise · ε`` on the span's embeddings (ROME's draw)."""
    vectors = np.random.RandomState(seed).randn(samples, span[1] - span[0], model.d_model)
    added = torch.from_numpy(noise * vectors).to(model.device, model.dtype)
    return Corrupted(ids.expand(samples, -1), added, span)


def resample(
    ids: torch.Tensor, span: tuple[int, int], *, vocab: Sequence[int], samples: int, seed: int
) -> Corrupted:
    """``samples`` copies of ``ids [T]`` whose span tokens are drawn uniformly from ``vocab``."""
    drawn = np.random.RandomState(seed).randint(0, len(vocab), size=(samples, span[1] - span[0]))
    rows = ids.expand(samples, -1).clone()
    rows[:, span[0] : span[1]] = torch.as_tensor(np.asarray(vocab)[drawn], dtype=ids.dtype)
    return Corrupted(rows, None, span)


def swapped(
    ids: torch.Tensor, span: tuple[int, int], partner_ids: torch.Tensor, *, counter: int, partner: str
) -> Corrupted:
    """The partner's prompt ``partner_ids [T]``, which must equal ``ids`` outside ``span``."""
    outside = torch.ones(len(ids), dtype=torch.bool)
    outside[span[0] : span[1]] = False
    if partner_ids.shape != ids.shape or not torch.equal(partner_ids[outside], ids[outside]):
        raise RecallscopeError(
            f"subject-swap partner {partner!r} does not align with the prompt: it must have as many "
            "tokens and differ only in the subject (see recallscope.data.variants.add_swap_partners)"
        )
    return Corrupted(partner_ids[None].to(ids.device), None, span, counter, partner)


def prompt_noise_level(model: Model, batch, span: str = "subject", factor: float = 3.0) -> float:
    """``factor ×`` the standard deviation of the token-embedding entries of ``span`` as it stands in
    the prompts of ``batch`` (``"answers"``: of every previous-answer span): the calibration on token
    ids alone (texts use :func:`embedding_noise_level`).
    """
    site = Site(None, "embed")
    embeds = run_with_cache(model, batch, [site])[site]  # [B, T, d]
    masks = span_masks(batch, [span]).values()
    mask = torch.stack(list(masks)).any(0).to(embeds.device) if masks else None
    if mask is None or not mask.any():
        raise RecallscopeError(f"no {span!r} span in the batch: cannot calibrate the noise")
    return factor * float(embeds[mask].double().std())


def prompt_vocabulary(batch, span: str) -> tuple[int, ...]:
    """The distinct token ids of ``span`` as it stands in the prompts of ``batch``."""
    masks = list(span_masks(batch, [span]).values())
    if not masks:
        raise RecallscopeError(f"no {span!r} span in the batch: cannot resample it")
    return tuple(sorted(set(batch.input_ids[torch.stack(masks).any(0)].tolist())))


@dataclass(frozen=True)
class Calibration:
    """Per span group (``subject``, ``answers``): the noise level and the resampling vocabulary."""

    levels: tuple[tuple[str, float], ...]
    vocab: tuple[tuple[str, tuple[int, ...]], ...]
    where: str
    """What they were computed on, in words (recorded in results)."""


def calibrate(model: Model, pool, groups: Sequence[str], factor: float = 3.0) -> Calibration:
    """Noise levels and vocabularies of ``groups`` over ``pool``: facts (every subject, or every
    answer, each tokenized alone, as ROME) or a prompt batch (its spans as they stand).
    """
    if hasattr(pool, "to_batch"):
        texts = {g: _population(pool, g) for g in groups}
        levels = tuple((g, embedding_noise_level(model, texts[g], factor)) for g in groups)
        vocab = tuple((g, span_vocabulary(model, texts[g])) for g in groups)
        name = getattr(pool, "name", "")
        return Calibration(
            levels, vocab, f"every subject (answer) of {name!r} ({len(pool)} facts), each tokenized alone"
        )
    levels = tuple((g, prompt_noise_level(model, pool, g, factor)) for g in groups)
    vocab = tuple((g, prompt_vocabulary(pool, g)) for g in groups)
    return Calibration(levels, vocab, f"the spans as they stand in the {len(pool)} prompts given")


def _population(facts, group: str) -> list[str]:
    """Every fact's subject (``subject``), or every answer of every fact (``answers``)."""
    if group == "subject":
        return [f.subject for f in facts]
    return [answer for f in facts for answer in f.answers]


def calibration_fields(model: Model, pool, groups: Sequence[str], config) -> dict:
    """The config fields a corrupting method fixes once, before chunking (``noise_levels``,
    ``resample_vocab``, ``noise_calibrated_on``), from ``config``'s ``corruptions`` (or ``corruption``),
    ``noise`` and ``noise_factor``; empty when nothing needs calibrating.
    """
    used = getattr(config, "corruptions", None) or (config.corruption,)
    wants_noise = "gaussian" in used and config.noise is None
    wants_vocab = "resample" in used
    if not (wants_noise or wants_vocab):
        return {}
    found = calibrate(model, pool, groups, config.noise_factor)
    return {
        "noise_levels": found.levels if wants_noise else (),
        "resample_vocab": found.vocab if wants_vocab else (),
        "noise_calibrated_on": found.where,
    }
