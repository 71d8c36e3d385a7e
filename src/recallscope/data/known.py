"""The per-model "known" filter: keep the facts whose answer the model predicts.

Two criteria (``methods.md`` §4.3, §5.11):

- ``first_token`` (default, ROME/Geva): the model's top-1 next token equals the first token of one
  of the accepted answers (as tokenized right after the prompt);
- ``greedy_prefix``: greedy generation reproduces all tokens of one of the accepted answers.

Every kept fact is annotated with what the model predicted (``fact.attributes["prediction"]``:
its top-1 token id and string, and the probability and rank of the canonical answer's first
token), for methods that score the model's own top-1 token. The per-relation counts go into the
FactSet's provenance and are printed by ``recallscope datasets --known-by``.
"""

from __future__ import annotations

from typing import Any

import torch

from recallscope.core.cache import forward
from recallscope.core.generate import generate_greedy
from recallscope.core.tokens import answer_ids, encode_prompt
from recallscope.core.vocab import decode_tokens
from recallscope.data.facts import Fact, FactSet, annotate
from recallscope.errors import DatasetError

__all__ = ["known_by", "CRITERIA", "known_counts"]

CRITERIA = ("first_token", "greedy_prefix")


def known_by(model, facts: FactSet, criterion: str = "first_token", *, batch_size: int = 32) -> FactSet:
    """The facts ``model`` answers correctly under ``criterion``, annotated with its prediction.

    Args:
        model: a :class:`~recallscope.models.model.Model`.
        facts: the candidate facts (facts too long for the model's context are skipped first).
        criterion: ``"first_token"`` or ``"greedy_prefix"``.
        batch_size: prompts per forward pass.
    """
    if criterion not in CRITERIA:
        raise DatasetError(f"unknown known-filter criterion {criterion!r}; expected one of {CRITERIA}")
    facts = facts.fit_context(model)
    kept: list[Fact] = []
    for start in range(0, len(facts), batch_size):
        rows = range(start, min(start + batch_size, len(facts)))
        kept += _judge_batch(model, facts, rows, criterion)
    per_relation = {rel: {"known": 0, "total": n} for rel, n in facts.counts().items()}
    for fact in kept:
        per_relation[fact.relation]["known"] += 1
    step = {
        "step": "known_by",
        "model": model.info.name,
        "criterion": criterion,
        "known": len(kept),
        "total": len(facts),
        "per_relation": per_relation,
    }
    return facts.with_facts(kept, step)


def _judge_batch(model, facts: FactSet, rows: range, criterion: str) -> list[Fact]:
    batch = facts.to_batch(model, rows)
    logits = forward(model, batch).float()  # [B, d_vocab]
    log_probs = logits.log_softmax(-1)
    top1 = logits.argmax(-1)
    alias_tokens = [_alias_tokens(model, facts[i]) for i in rows]
    if criterion == "greedy_prefix":
        longest = max(len(t) for aliases in alias_tokens for t in aliases)
        generated = generate_greedy(model, batch, longest).tolist()
    kept = []
    for j, i in enumerate(rows):
        aliases = alias_tokens[j]
        if criterion == "first_token":
            known = int(top1[j]) in {t[0] for t in aliases}
        else:
            known = any(generated[j][: len(t)] == list(t) for t in aliases)
        if known:
            kept.append(
                annotate(facts[i], prediction=_prediction(model, logits[j], log_probs[j], aliases[0]))
            )
    return kept


def _alias_tokens(model, fact: Fact) -> list[tuple[int, ...]]:
    prompt_ids = encode_prompt(model, fact.prompt)[0]
    return [answer_ids(model, fact.prompt, fact.continuation(a), prompt_ids) for a in fact.answers]


def _prediction(
    model, logits: torch.Tensor, log_probs: torch.Tensor, answer: tuple[int, ...]
) -> dict[str, Any]:
    top1 = int(logits.argmax())
    target = answer[0]
    return {
        "model": model.info.name,
        "top1_id": top1,
        "top1": decode_tokens(model, torch.tensor(top1)),
        "target_id": target,
        "target_prob": float(log_probs[target].exp()),
        "target_rank": int((logits > logits[target]).sum()),
    }


def known_counts(facts: FactSet) -> dict[str, dict[str, int]] | None:
    """Per-relation ``{"known": n, "total": m}`` of the last known filter applied, if any."""
    for step in reversed(facts.provenance.get("steps", [])):
        if step.get("step") == "known_by":
            return step["per_relation"]
    return None
