"""Answer steps, tracked tokens and source spans of one-to-many queries (Yan & Jia, ``methods.md`` §2).

A batch of one-to-many step prompts (:meth:`recallscope.data.OneToManySet.to_facts`) has spans
``subject``, ``relation`` and ``answer_1`` … ``answer_{s-1}`` (the answers already generated; a row
at step ``s`` has ``s - 1`` of them) and ``batch.tracked`` with the first token of **every** answer
``answer_1`` … ``answer_k`` (§2.6 pitfall 1). A plain factual batch is the case ``k = 1``: its only
answer is the target, at step 1.

Each tracked answer has a *role* in its row: ``previous`` (already generated), ``current`` (the
target of this step) or ``future`` (not generated yet); the subject's first token has role
``subject``::

    tracked = tracked_tokens(model, batch)     # names ("subject", "answer_1", "answer_2", "answer_3")
    tracked.ids                                # [B, 4] token ids
    tracked.roles[b]                           # e.g. ("subject", "previous", "current", "future")
    masks = span_masks(batch, ("subject", "answers", "last_token"))  # {"subject": [B, T], "answer_1": …}
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from recallscope.core.tokens import PromptBatch
from recallscope.core.vocab import decode_tokens
from recallscope.errors import RecallscopeError

__all__ = ["ROLES", "Tracked", "answer_span_names", "answer_steps", "tracked_tokens", "span_masks"]

ROLES = ("subject", "previous", "current", "future")
_ANSWER = re.compile(r"^answer_(\d+)$")


def _answer_names(names) -> list[str]:
    """``answer_j`` names among ``names``, ordered by ``j``."""
    found = [(int(m[1]), n) for n in names if (m := _ANSWER.match(n))]
    return [n for _, n in sorted(found)]


def answer_span_names(batch: PromptBatch) -> list[str]:
    """The ``answer_j`` spans of ``batch`` (previous answers), ordered by ``j``."""
    return _answer_names(batch.spans)


def answer_steps(batch: PromptBatch) -> torch.Tensor:
    """``[B]`` the answer step of every row: 1 + the number of previous-answer spans it has."""
    steps = torch.ones(len(batch), dtype=torch.long)
    for name in answer_span_names(batch):
        steps += (batch.spans[name][:, 0] >= 0).long()
    return steps


@dataclass(frozen=True)
class Tracked:
    """The tokens followed in every row of a batch.

    Attributes:
        names: ``("subject", "answer_1", …, "answer_k")`` (without ``subject`` when not asked).
        ids: ``[B, n]`` token ids (CPU).
        roles: ``[B][n]`` role of each tracked token in its row (:data:`ROLES`).
        steps: ``[B]`` answer step of each row.
        tokens: ``[B][n]`` the tokens as strings.
    """

    names: tuple[str, ...]
    ids: torch.Tensor
    roles: tuple[tuple[str, ...], ...]
    steps: torch.Tensor
    tokens: list[list[str]]

    @property
    def k(self) -> int:
        """Number of tracked answers."""
        return sum(1 for n in self.names if _ANSWER.match(n))


def tracked_tokens(model, batch: PromptBatch, *, subject: bool = True) -> Tracked:
    """The subject's first token and the first token of every answer, with roles and steps.

    Answers come from ``batch.tracked`` (``answer_1`` …); a batch without them tracks its target
    (``batch.target_ids``) as ``answer_1``, the current answer of step 1.

    Raises:
        RecallscopeError: no answers to track, or ``subject`` asked but a row has no subject span.
    """
    answers = _answer_names(batch.tracked)
    if answers:
        columns = [batch.tracked[n].long().cpu() for n in answers]
    elif batch.target_ids is not None:
        answers, columns = ["answer_1"], [batch.target_ids.long().cpu()]
    else:
        raise RecallscopeError(
            "nothing to track: the batch has neither tracked answers (one-to-many steps) nor targets"
        )
    names = list(answers)
    if subject:
        if "subject" not in batch.spans or (batch.spans["subject"][:, 0] < 0).any():
            raise RecallscopeError("tracking the subject needs a subject span in every row")
        start = batch.spans["subject"][:, 0]
        columns.insert(0, batch.input_ids[torch.arange(len(batch)), start].long())
        names.insert(0, "subject")
    ids = torch.stack(columns, dim=1)
    steps = answer_steps(batch)
    roles = tuple(tuple(_role(name, int(step)) for name in names) for step in steps)
    return Tracked(tuple(names), ids, roles, steps, decode_tokens(model, ids))


def _role(name: str, step: int) -> str:
    if name == "subject":
        return "subject"
    j = int(_ANSWER.match(name)[1])
    return "previous" if j < step else "current" if j == step else "future"


def span_masks(batch: PromptBatch, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Boolean ``[B, T]`` source masks of named spans, in the order given.

    Names: any span of the batch (``subject``, ``relation``, ``answer_2`` …), ``answers`` (expands
    to every ``answer_j`` span of the batch), ``last_token`` (position ``T - 1``), ``bos`` (each
    row's first real token). A row without a span has an all-False mask.
    """
    masks: dict[str, torch.Tensor] = {}
    for name in names:
        expanded = answer_span_names(batch) if name == "answers" else [name]
        for item in expanded:
            if item == "last_token":
                mask = torch.zeros(len(batch), batch.seq_len, dtype=torch.bool)
                mask[:, -1] = True
            elif item == "bos":
                mask = torch.zeros(len(batch), batch.seq_len, dtype=torch.bool)
                mask[torch.arange(len(batch)), batch.pad_lengths] = True
            elif item in batch.spans:
                mask = batch.span_mask(item)
            elif _ANSWER.match(item):
                mask = torch.zeros(len(batch), batch.seq_len, dtype=torch.bool)  # a later step's answer
            else:
                raise RecallscopeError(
                    f"unknown span {item!r}: use 'answers', 'last_token', 'bos' or a span of the batch "
                    f"({', '.join(batch.spans) or 'none'})"
                )
            masks[item] = mask
    return masks
