"""Prompts to tokens: ``PromptBatch``, spans, targets, BOS handling and left padding.

Batches are **left-padded**, so the last prompt token of every row sits at position ``T - 1`` and
right-relative positions (``-1`` = last token) mean the same thing in every row. Position ids are
computed from the attention mask, so a padded row gives the same numbers as the unpadded prompt,
also for models with learned absolute positions (GPT-2, OPT).

Spans are located with the tokenizer's character offsets: a token belongs to a span when its
characters, leading whitespace stripped, overlap the span's characters. This works for byte-level
BPE (``Ġ`` / leading spaces, GPT-2, Llama-3, SmolLM2) and SentencePiece (``▁``, Llama-2, Gemma)::

    batch = tokenize(model, ["The capital of France is"], spans={"subject": ["France"]}, targets=[" Paris"])
    batch.spans["subject"]      # tensor([[3, 4]])  token positions [start, end)
    batch.target_ids            # tensor([7042])    first token of " Paris"
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from recallscope.errors import RecallscopeError, SpanError
from recallscope.models.model import Model

__all__ = ["PromptBatch", "as_batch", "tokenize", "find_token_span", "encode_prompt", "answer_ids"]

SpanSpec = str | tuple[int, int] | None


@dataclass(frozen=True)
class PromptBatch:
    """A left-padded batch of prompts with named token spans and targets.

    Attributes:
        input_ids: ``[B, T]`` token ids.
        attention_mask: ``[B, T]``, 1 for real tokens, 0 for padding (on the left).
        prompts: the prompt strings.
        spans: name → ``[B, 2]`` ``(start, end)`` token positions (end exclusive) in the padded
            batch; ``(-1, -1)`` where a row has no such span.
        target_ids: ``[B]`` first token of each target, or None.
        answer_ids: all tokens of each target (ragged), or None.
        fact_ids: optional identifiers carried along for results.
        n_prefix: special tokens (BOS) prepended to each prompt.
        tracked: name → ``[B]`` token ids that analyses follow besides the target (e.g. the first
            token of every answer of a one-to-many list).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompts: tuple[str, ...]
    spans: Mapping[str, torch.Tensor] = field(default_factory=dict)
    target_ids: torch.Tensor | None = None
    answer_ids: tuple[tuple[int, ...], ...] | None = None
    fact_ids: tuple[str, ...] | None = None
    n_prefix: int = 0
    tracked: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    @property
    def position_ids(self) -> torch.Tensor:
        """``[B, T]`` positions counted from each row's first real token (pads get 0)."""
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    @property
    def pad_lengths(self) -> torch.Tensor:
        """``[B]`` number of left-padding tokens per row."""
        return self.seq_len - self.attention_mask.sum(-1)

    def span_mask(self, name: str) -> torch.Tensor:
        """``[B, T]`` boolean mask of the positions of span ``name``."""
        bounds = self.spans[name]
        positions = torch.arange(self.seq_len)
        return (positions >= bounds[:, :1]) & (positions < bounds[:, 1:])

    def span_positions(self, name: str, row: int) -> list[int]:
        start, end = (int(v) for v in self.spans[name][row])
        return list(range(start, end))

    def select(self, rows: Sequence[int] | torch.Tensor) -> PromptBatch:
        """The batch restricted to (or repeated along) ``rows``, in that order."""
        index = torch.as_tensor(rows, dtype=torch.long)
        pick = lambda seq: None if seq is None else tuple(seq[i] for i in index.tolist())  # noqa: E731
        return replace(
            self,
            input_ids=self.input_ids[index],
            attention_mask=self.attention_mask[index],
            prompts=pick(self.prompts),
            spans={k: v[index] for k, v in self.spans.items()},
            target_ids=None if self.target_ids is None else self.target_ids[index],
            answer_ids=pick(self.answer_ids),
            fact_ids=pick(self.fact_ids),
            tracked={k: v[index] for k, v in self.tracked.items()},
        )

    def model_inputs(self, device: torch.device | str) -> dict[str, torch.Tensor]:
        """Keyword arguments for the HF forward."""
        return {
            "input_ids": self.input_ids.to(device),
            "attention_mask": self.attention_mask.to(device),
            "position_ids": self.position_ids.to(device),
        }


def encode_prompt(model: Model, text: str) -> tuple[list[int], list[tuple[int, int]], int]:
    """Token ids, character offsets and number of prefix special tokens of one prompt.

    Applies the model's BOS policy: ``"tokenizer"`` keeps the special tokens the tokenizer adds at
    the start by default (none for GPT-2 and SmolLM2, ``<s>`` for Llama-2, ``</s>`` for OPT),
    ``"never"`` adds none, ``"always"`` makes sure ``bos_token`` comes first.
    """
    tok = model.tokenizer
    if tok is None:
        raise SpanError("this model has no tokenizer: pass token ids, or load it with one")
    add_special = model.bos == "tokenizer"
    enc = tok(
        text,
        add_special_tokens=add_special,
        return_offsets_mapping=tok.is_fast,
        return_special_tokens_mask=True,
    )
    ids, special = list(enc["input_ids"]), list(enc["special_tokens_mask"])
    offsets = list(enc["offset_mapping"]) if tok.is_fast else _offsets_by_decoding(tok, ids, special)
    while special and special[-1] and len(special) > 1 and not all(special):  # drop trailing EOS
        ids, offsets, special = ids[:-1], offsets[:-1], special[:-1]
    n_prefix = next((i for i, s in enumerate(special) if not s), len(special))
    if model.bos == "always" and not (ids and ids[0] == tok.bos_token_id):
        if tok.bos_token_id is None:
            raise SpanError("bos='always' but the tokenizer has no bos_token")
        ids, offsets, n_prefix = [tok.bos_token_id, *ids], [(0, 0), *offsets], n_prefix + 1
    return ids, [tuple(o) for o in offsets], n_prefix


def _offsets_by_decoding(tok: Any, ids: list[int], special: list[int]) -> list[tuple[int, int]]:
    """Character offsets for slow tokenizers, from the lengths of decoded prefixes."""
    offsets, previous = [], 0
    for i, is_special in enumerate(special):
        if is_special:
            offsets.append((0, 0))
            continue
        kept = [t for t, s in zip(ids[: i + 1], special[: i + 1], strict=True) if not s]
        text = tok.decode(kept, clean_up_tokenization_spaces=False)
        offsets.append((previous, len(text)))
        previous = len(text)
    return offsets


def find_token_span(
    text: str, offsets: Sequence[tuple[int, int]], char_span: tuple[int, int]
) -> tuple[int, int]:
    """Token positions ``[start, end)`` covering ``text[char_span[0]:char_span[1]]``.

    A token is in the span when its characters, minus leading whitespace, overlap the span.
    """
    begin, end = char_span
    hits = []
    for i, (start, stop) in enumerate(offsets):
        if stop <= start:  # special token
            continue
        piece = text[start:stop]
        start += len(piece) - len(piece.lstrip())
        if start < end and stop > begin and start < stop:
            hits.append(i)
    if not hits:
        raise SpanError(f"no token covers characters {begin}:{end} ({text[begin:end]!r}) of {text!r}")
    return hits[0], hits[-1] + 1


def _char_span(prompt: str, span: SpanSpec, name: str) -> tuple[int, int] | None:
    if span is None:
        return None
    if isinstance(span, tuple):
        return span
    where = prompt.find(span) if span else -1
    if where < 0:
        raise SpanError(
            f"{name} {span!r} does not occur in prompt {prompt!r}; the {name} must be written in "
            "the prompt exactly as given (case and spacing included)"
        )
    return where, where + len(span)


def answer_ids(
    model: Model, prompt: str, target: str, prompt_ids: list[int] | None = None
) -> tuple[int, ...]:
    """Tokens of ``target`` (e.g. ``" Paris"``) as the model would produce them right after ``prompt``."""
    prompt_ids = encode_prompt(model, prompt)[0] if prompt_ids is None else prompt_ids
    full, _, _ = encode_prompt(model, prompt + target)
    if full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
        return tuple(full[len(prompt_ids) :])
    alone = model.tokenizer(target, add_special_tokens=False)["input_ids"]
    if not alone:
        raise SpanError(f"target {target!r} has no tokens")
    return tuple(alone)


def tokenize(
    model: Model,
    prompts: Sequence[str],
    *,
    spans: Mapping[str, Sequence[SpanSpec]] | None = None,
    targets: Sequence[str] | None = None,
    fact_ids: Sequence[str] | None = None,
) -> PromptBatch:
    """Tokenize and left-pad ``prompts``.

    Args:
        model: supplies the tokenizer and BOS policy.
        prompts: the prompt strings (the text the model continues).
        spans: name → one entry per prompt: a substring of the prompt (first occurrence), a
            ``(char_start, char_end)`` pair, or None.
        targets: the expected continuation of each prompt, with its leading space (``" Paris"``).
        fact_ids: identifiers carried along.

    Raises:
        SpanError: a span is not in its prompt, or covers no token.
    """
    prompts = list(prompts)
    if not prompts:
        raise RecallscopeError("tokenize needs at least one prompt")
    _check_lengths(len(prompts), spans=spans, targets=targets, fact_ids=fact_ids)
    encoded = [encode_prompt(model, p) for p in prompts]
    width = max(len(ids) for ids, _, _ in encoded)
    pad_id = _pad_id(model)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, (ids, _, _) in enumerate(encoded):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention_mask[row, width - len(ids) :] = 1
    span_tensors = {}
    for name, per_prompt in (spans or {}).items():
        bounds = torch.full((len(prompts), 2), -1, dtype=torch.long)
        for row, (prompt, span, (ids, offsets, _)) in enumerate(
            zip(prompts, per_prompt, encoded, strict=True)
        ):
            char_span = _char_span(prompt, span, name)
            if char_span is not None:
                start, end = find_token_span(prompt, offsets, char_span)
                bounds[row] = torch.tensor([start, end]) + (width - len(ids))
        span_tensors[name] = bounds
    answers = None
    if targets is not None:
        answers = tuple(
            answer_ids(model, p, t, e[0]) for p, e, t in zip(prompts, encoded, targets, strict=True)
        )
    return PromptBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        prompts=tuple(prompts),
        spans=span_tensors,
        target_ids=None if answers is None else torch.tensor([a[0] for a in answers]),
        answer_ids=answers,
        fact_ids=None if fact_ids is None else tuple(fact_ids),
        n_prefix=encoded[0][2],
    )


def _check_lengths(n: int, *, spans, targets, fact_ids) -> None:
    given = {f"spans[{name!r}]": v for name, v in (spans or {}).items()}
    given.update(targets=targets, fact_ids=fact_ids)
    for name, values in given.items():
        if values is not None and len(values) != n:
            raise SpanError(f"{name} has {len(values)} entries for {n} prompts; give one per prompt")


def _pad_id(model: Model) -> int:
    tok = model.tokenizer
    for candidate in (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def as_batch(model, facts_or_batch, *, method: str | None = None) -> PromptBatch:
    """A :class:`PromptBatch` from a batch or from anything with ``to_batch(model)`` (a ``FactSet``).

    With ``method`` (the caller's name) an empty batch is refused with an error naming it.
    """
    batch = facts_or_batch if isinstance(facts_or_batch, PromptBatch) else facts_or_batch.to_batch(model)
    if method is not None and not len(batch):
        raise RecallscopeError(f"{method} got no facts: pass a batch or FactSet with at least one")
    return batch
