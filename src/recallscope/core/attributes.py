"""Tokens in vocabulary space for Geva et al. 2023 (``methods.md`` G2–G7): readouts, clean top
tokens, subject reference tokens and the attributes rate.

- :func:`readout` projects vectors to the vocabulary in one of three ways, recorded in every result:
  ``logit_lens`` (default: the model's final norm and head, valid for tied and untied models),
  ``raw`` (``W_U·v``, no final norm) and ``raw_embed`` (``E·v`` with the input embedding, Geva et
  al.'s choice for GPT-2, whose embeddings are tied).
- :func:`clean_top_tokens`: the top ``top_k`` tokens, minus English stopwords (scikit-learn's list,
  shipped with the package) and tokens shorter than ``min_length`` characters once stripped, cut to
  the first ``keep`` survivors (Geva: 500 → 50).
- :func:`reference_mask`: the vocabulary tokens that occur in texts about the subject (its
  description, or the objects of other facts about it), filtered the same way.
- :func:`reference_texts`: per fact, its ``description``, or else the answers of the *other* facts
  about the same subject (``subject_objects`` gathers them over a whole dataset).
- :func:`attributes_rate`: ``100·|top ∩ references| / |top|`` on decoded strings (leading space
  included, so " Apple" ≠ "Apple").

Geva's code lowercases tokens before the stopword test on the prediction side only; the default
here lowercases on both sides (``TokenFilter(lowercase_references=False)`` is the code's behaviour).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch

from recallscope.core.vocab import VocabProjection, project_to_vocab
from recallscope.errors import RecallscopeError
from recallscope.models.model import Model

__all__ = [
    "Readout",
    "READOUTS",
    "STOPWORDS",  # noqa: F822 (served by the module __getattr__, loaded on first use)
    "TokenFilter",
    "readout",
    "extraction_events",
    "vocab_strings",
    "clean_token_mask",
    "subject_objects",
    "reference_texts",
    "texts_for",
    "with_subject_objects",
    "reference_masks",
    "reference_strings",
    "reference_mask",
    "clean_top_tokens",
    "attributes_rate",
]

Readout = Literal["logit_lens", "raw", "raw_embed"]
READOUTS = ("logit_lens", "raw", "raw_embed")


@functools.cache
def _stopwords() -> frozenset[str]:
    """scikit-learn's English stopword list (318 words), lower case; imported on first use (1 s)."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return frozenset(ENGLISH_STOP_WORDS)


def __getattr__(name: str):
    if name == "STOPWORDS":  # the list as a module constant, loaded lazily
        return _stopwords()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_STRINGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_MASKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""Per tokenizer: ``{(vocabulary size, min_length): clean-token mask}`` (:func:`clean_token_mask`)."""


@dataclass(frozen=True)
class TokenFilter:
    """How top tokens and reference tokens are cleaned (Geva: 500 → stopwords, length ≤ 2 → 50)."""

    top_k: int = 500
    keep: int = 50
    min_length: int = 3
    """Tokens whose stripped text is shorter than this are dropped (Geva: ``len(strip()) <= 2``)."""
    lowercase_references: bool = True
    """Lowercase reference tokens before the stopword test, as the prediction side does."""


def readout(
    model: Model, x: torch.Tensor, how: Readout, *, targets: torch.Tensor | None = None, k: int = 0
) -> VocabProjection:
    """Project ``x [*S, d_model]`` to the vocabulary with readout ``how`` (see module docstring)."""
    if how not in READOUTS:
        raise ValueError(f"unknown readout {how!r}; expected one of {READOUTS}")
    if how == "logit_lens":
        return project_to_vocab(model, x, "logit_lens", targets=targets, k=k)
    matrix = "embed" if how == "raw_embed" else "unembed"
    return project_to_vocab(model, x, "raw", matrix=matrix, targets=targets, k=k)


def extraction_events(projection: VocabProjection) -> torch.Tensor:
    """``[*S]`` bool: the target is the *unique* top-1 token (rank 0 and the runner-up scores lower).

    Needs a projection with ``targets`` (one per vector) and ``k ≥ 2``. Geva's extraction event; a
    tie (e.g. an all-zero update) never counts.
    """
    runner_up = projection.topk_logits[..., 1]
    return ((projection.target_ranks == 0) & (runner_up < projection.target_logits)).cpu()


def vocab_strings(model: Model) -> list[str]:
    """Every token id of the readout matrix decoded alone (``""`` past the tokenizer's vocabulary).

    Cached per tokenizer.
    """
    tokenizer = model.tokenizer
    size = max(model.d_vocab, model.W_E.shape[0])
    cached = _STRINGS.get(tokenizer)
    if cached is None or len(cached) < size:
        known = min(size, len(tokenizer))
        cached = tokenizer.batch_decode([[i] for i in range(known)]) + [""] * (size - known)
        _STRINGS[tokenizer] = cached
    return cached


def _is_clean(text: str, min_length: int, lowercase: bool) -> bool:
    word = text.strip()
    return len(word) >= min_length and (word.lower() if lowercase else word) not in _stopwords()


def clean_token_mask(model: Model, token_filter: TokenFilter) -> torch.Tensor:
    """``[d_vocab]`` bool: tokens that may count as top tokens (lowercased stopword test).

    Cached per tokenizer and filter (a Python pass over a 262k vocabulary takes a few tenths of a
    second); do not modify the returned tensor.
    """
    strings = vocab_strings(model)
    masks = _MASKS.setdefault(model.tokenizer, {})
    key = (len(strings), token_filter.min_length)
    if key not in masks:
        masks[key] = torch.tensor([_is_clean(s, token_filter.min_length, True) for s in strings])
    return masks[key]


def subject_objects(facts: Iterable) -> dict[str, tuple[str, ...]]:
    """Subject → the distinct answers of every fact about it, in dataset order."""
    objects: dict[str, dict[str, None]] = {}
    for fact in facts:
        objects.setdefault(fact.subject, {}).update(dict.fromkeys(fact.answers))
    return {subject: tuple(answers) for subject, answers in objects.items()}


def reference_texts(
    facts: Iterable, objects: Mapping[str, Sequence[str]] | None = None
) -> list[tuple[str, ...]]:
    """Texts about each fact's subject: its description, else the other facts' answers about it.

    Args:
        facts: :class:`~recallscope.data.facts.Fact` objects.
        objects: subject → answers over the whole dataset (:func:`subject_objects`); by default
            gathered from ``facts`` alone.

    Returns:
        One tuple of texts per fact; empty when there is nothing to compare with. A fact's own
        answers are never among its fallback texts (they would make the rate trivially high).
    """
    facts = list(facts)
    objects = subject_objects(facts) if objects is None else objects
    texts = []
    for fact in facts:
        if fact.description:
            texts.append((fact.description,))
            continue
        others = [a for a in objects.get(fact.subject, ()) if a not in fact.answers]
        texts.append(tuple(fact.continuation(a) for a in others))
    return texts


def texts_for(
    facts, objects: Mapping[str, Sequence[str]] | None, references: Sequence | None, method: str
) -> list[tuple[str, ...]]:
    """Per prompt, the reference texts a method uses: ``references`` if given, else the facts'.

    Args:
        facts: a :class:`~recallscope.data.facts.FactSet` or a
            :class:`~recallscope.core.tokens.PromptBatch` (which then needs ``references``).
        objects: dataset-wide subject → answers (``Config.subject_objects``).
        references: one text or sequence of texts per prompt, or None.
        method: the method's name, for error messages.
    """
    if references is None:
        if not hasattr(facts, "to_batch"):
            raise RecallscopeError(
                f"{method} on a PromptBatch needs references=: one sequence of texts about the subject "
                "per prompt (or pass a FactSet, whose descriptions / other answers are used)"
            )
        return reference_texts(facts, objects)
    texts = [(r,) if isinstance(r, str) else tuple(r) for r in references]
    if len(texts) != len(facts):
        raise RecallscopeError(
            f"references has {len(texts)} entries for {len(facts)} prompts; "
            "give one sequence of texts per prompt"
        )
    return texts


def with_subject_objects(config, facts):
    """``config`` with ``subject_objects`` filled over the whole dataset ``facts`` (a method's
    ``prepare``): the answers about every subject that has no description. Unchanged when already
    set or when ``facts`` is a batch.
    """
    if config.subject_objects is not None or not hasattr(facts, "to_batch"):
        return config
    bare = {fact.subject for fact in facts if not fact.description}
    objects = {s: a for s, a in subject_objects(facts).items() if s in bare}
    return replace(config, subject_objects=objects)


def reference_masks(model: Model, texts: Sequence[Sequence[str]], token_filter: TokenFilter) -> torch.Tensor:
    """``[B, d_vocab]`` bool: per prompt, the vocabulary tokens among its reference strings."""
    return torch.stack([reference_mask(model, reference_strings(model, t, token_filter)) for t in texts])


def reference_strings(model: Model, texts: Iterable[str], token_filter: TokenFilter) -> set[str]:
    """The distinct decoded tokens of ``texts`` (model's tokenizer) that pass the filter."""
    strings: set[str] = set()
    for text in texts:
        ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
        strings.update(model.tokenizer.batch_decode([[i] for i in ids]))
    return {s for s in strings if _is_clean(s, token_filter.min_length, token_filter.lowercase_references)}


def reference_mask(model: Model, references: set[str]) -> torch.Tensor:
    """``[d_vocab]`` bool: vocabulary tokens whose decoded string is one of ``references``."""
    return torch.tensor([s in references for s in vocab_strings(model)])


def clean_top_tokens(
    projection: VocabProjection, clean: torch.Tensor, keep: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``keep`` clean tokens among a projection's top-k.

    Args:
        projection: with ``topk_ids [*S, top_k]``.
        clean: ``[d_vocab]`` bool from :func:`clean_token_mask`.
        keep: how many survivors to keep.

    Returns:
        ``ids [*S, keep]`` (−1 where fewer survived) and ``count [*S]`` of survivors kept.
    """
    ids = projection.topk_ids
    survives = clean.to(ids.device)[ids]  # [*S, top_k]
    order = survives.long().cumsum(-1)  # 1-based rank among survivors
    selected = survives & (order <= keep)
    slot = torch.where(selected, order - 1, keep)  # unselected go to a spill column
    out = torch.full((*ids.shape[:-1], keep + 1), -1, dtype=ids.dtype, device=ids.device)
    out.scatter_(-1, slot, torch.where(selected, ids, -1))
    return out[..., :keep], selected.sum(-1)


def attributes_rate(top_ids: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """``100·|top ∩ references| / |top|`` per vector.

    Args:
        top_ids: ``[B, *S, keep]`` from :func:`clean_top_tokens` (−1 = empty slot).
        references: ``[B, d_vocab]`` bool per batch row; a row with no reference token gives NaN.

    Returns:
        ``[B, *S]`` float64 rates in percent (NaN without references or without top tokens).
    """
    batch = top_ids.shape[0]
    flat = top_ids.reshape(batch, -1)
    valid = flat >= 0
    hits = references.to(flat.device).gather(1, flat.clamp(min=0)) & valid
    shape = top_ids.shape[:-1]
    hits = hits.reshape(*shape, -1).sum(-1).double()
    count = valid.reshape(*shape, -1).sum(-1).double()
    rate = 100 * hits / count
    has_refs = references.any(-1).reshape(batch, *([1] * (len(shape) - 1)))
    return torch.where(has_refs & (count > 0), rate, torch.nan)
