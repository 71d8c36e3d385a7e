"""Derived prompts for Lv et al.'s analyses (``methods.md`` L1): few-shot variants and counterfactuals.

- :func:`with_shots` prepends ``n`` demonstrations of the same relation to every prompt
  (``"The capital of Spain is Madrid. The capital of France is"``; L1 step 4). The few-shot fact keeps
  the query's template and records the demonstrations as ``shot_prefix``, so its subject can still be
  swapped.
- :func:`add_relation_context` gives every fact a **counterfactual partner**: another fact of the
  same relation with a different subject and answer, chosen with a seeded generator from a pool (the
  whole loaded dataset in ``recallscope run``, so the choice does not depend on sampling or chunks),
  and the distinct answers of its relation in that pool. The partner's subject is rendered into the
  fact's own template (with the partner's mention, "the Netherlands"), keeping any demonstrations:
  the counterfactual prompt differs from the clean one in the subject only (L1 step 5).
- :func:`counterfactual_facts` turns those attributes into facts ready to batch.
- :func:`add_swap_partners` gives every fact a **subject-swap partner** for symmetric token
  replacement (Zhang & Nanda 2024): like the counterfactual partner, but the swapped prompt must keep
  every token outside the subject and the subject's token count, so clean and corrupted runs align
  position by position.

Attributes written (read by the Lv methods): ``shots``, ``shot_prefix``, ``demonstrations``,
``base_id``, ``mention``; ``counterfactual`` = ``{fact_id, subject, prompt, subject_span, answers}``
and ``relation_answers`` (tuple of canonical answers); ``subject_swap`` = the same keys as
``counterfactual`` (read by causal tracing's ``subject_swap`` corruption).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace

import torch

from recallscope.data.facts import Fact, FactSet, SkippedRow, annotate, render_template
from recallscope.errors import DatasetError

__all__ = [
    "with_shots",
    "shot_variants",
    "add_relation_context",
    "counterfactual_facts",
    "add_swap_partners",
    "swap_fact",
    "swap_inputs",
    "render_subject",
]


def _mention(fact: Fact) -> str:
    return fact.attributes.get("mention") or fact.subject


def render_subject(fact: Fact, subject: str, mention: str | None = None) -> tuple[str, tuple[int, int]]:
    """``fact``'s prompt with ``subject`` (written as ``mention``) in place of its own subject.

    Uses the fact's template when it has one (plus its ``shot_prefix``); otherwise the subject's
    characters in the prompt are replaced. Returns the prompt and the new subject's character span.
    """
    mention = subject if mention is None else mention
    if fact.template is not None:
        prefix = fact.attributes.get("shot_prefix", "")
        body, span, _ = render_template(fact.template, mention)
        where = mention.casefold().find(subject.casefold())
        if where < 0:
            raise DatasetError(f"mention {mention!r} does not contain subject {subject!r}")
        start = len(prefix) + span[0] + where
        return prefix + body, (start, start + len(subject))
    start, end = fact.subject_span
    return fact.prompt[:start] + subject + fact.prompt[end:], (start, start + len(subject))


def _candidates(fact: Fact, pool: Sequence[Fact]) -> list[Fact]:
    """Pool facts of the same relation with another subject and another canonical answer (one per subject)."""
    seen: dict[str, Fact] = {}
    for other in pool:
        if (
            other.relation == fact.relation
            and other.subject != fact.subject
            and other.answers[0] != fact.answers[0]
            and "shot_prefix" not in other.attributes
        ):
            seen.setdefault(other.subject, other)
    return [seen[s] for s in sorted(seen)]


def _rng(fact: Fact, seed: int, salt: str) -> random.Random:
    return random.Random(f"{seed}:{salt}:{fact.attributes.get('base_id', fact.fact_id)}")


def with_shots(facts: FactSet, n: int = 1, *, pool: Sequence[Fact] | None = None, seed: int = 0) -> FactSet:
    """Every fact with ``n`` demonstrations of its relation in front (``n = 0``: ``facts`` unchanged).

    A demonstration is another pool fact of the same relation (other subject, other answer), written
    in the fact's own template, or in the ``shot_template`` attribute when the fact has one (Lv et
    al.'s capital task uses ``"The capital of {subject} is"`` after any prefix), followed by its
    answer and ``". "``. Facts without enough partners are skipped and reported. Few-shot facts get
    the id ``<fact_id>/<n>shot``.
    """
    if n < 0:
        raise DatasetError(f"shots must be 0 or more demonstrations, got {n}")
    if n == 0:
        return facts
    pool = list(facts if pool is None else pool)
    out, skipped = [], []
    for fact in facts:
        candidates = _candidates(fact, pool)
        if len(candidates) < n:
            skipped.append(f"{fact.fact_id}: only {len(candidates)} other facts of {fact.relation!r}")
            continue
        demos = _rng(fact, seed, "shots").sample(candidates, n)
        prefix = "".join(_demonstration(fact, demo) for demo in demos)
        out.append(_prefixed(fact, prefix, n, [d.fact_id for d in demos]))
    rows = [SkippedRow(facts.name, 0, reason) for reason in skipped]
    return facts.with_facts(out, {"step": "with_shots", "shots": n, "seed": seed}, rows)


def _demonstration(fact: Fact, demo: Fact) -> str:
    template = fact.attributes.get("shot_template") or fact.template
    if template is None:
        text = demo.prompt
    else:
        text = render_template(template, _mention(demo))[0]
    answer = demo.continuation(demo.answers[0]) if template is None else " " + demo.answers[0]
    return f"{text}{answer}. "


def _prefixed(fact: Fact, prefix: str, n: int, demos: list[str]) -> Fact:
    shift = len(prefix)

    def moved(span):
        return None if span is None else (span[0] + shift, span[1] + shift)

    spans = {k: moved(v) for k, v in fact.attributes.get("spans", {}).items()}
    attributes = {
        **fact.attributes,
        "shots": n,
        "shot_prefix": prefix,
        "demonstrations": demos,
        "base_id": fact.attributes.get("base_id", fact.fact_id),
    }
    if spans:
        attributes["spans"] = spans
    return replace(
        fact,
        fact_id=f"{fact.fact_id}/{n}shot",
        prompt=prefix + fact.prompt,
        subject_span=moved(fact.subject_span),
        relation_span=moved(fact.relation_span),
        attributes=attributes,
    )


def shot_variants(facts: FactSet, shots: Sequence[int], *, pool=None, seed: int = 0) -> FactSet:
    """The facts in every requested variant, fact by fact (``shots=(0, 1)``: zero-shot then one-shot)."""
    variants = [with_shots(facts, n, pool=pool, seed=seed) for n in sorted(set(shots))]
    by_base: dict[str, list[Fact]] = {}
    for variant in variants:
        for fact in variant:
            by_base.setdefault(fact.attributes.get("base_id", fact.fact_id), []).append(fact)
    ordered = [f for fact in facts for f in by_base.get(fact.fact_id, [])]
    skipped = [row for v in variants for row in v.skipped if row not in facts.skipped]
    return facts.with_facts(ordered, {"step": "shot_variants", "shots": sorted(set(shots))}, skipped)


def add_relation_context(facts: FactSet, *, pool: Sequence[Fact] | None = None, seed: int = 0) -> FactSet:
    """Every fact with a ``counterfactual`` partner and its relation's ``relation_answers``.

    Args:
        pool: where partners and answers come from (default: ``facts``); pass the whole loaded
            dataset so a sample's facts find partners.
        seed: seed of the partner choice (per fact, so it does not depend on the other facts).

    A fact whose relation has no other subject with another answer gets no ``counterfactual``.
    """
    pool = list(facts if pool is None else pool)
    answers: dict[str, list[str]] = {}
    for fact in [*pool, *facts]:
        bucket = answers.setdefault(fact.relation, [])
        if fact.answers[0] not in bucket:
            bucket.append(fact.answers[0])
    out = []
    for fact in facts:
        extra = {"relation_answers": tuple(answers[fact.relation])}
        candidates = _candidates(fact, pool)
        if candidates:
            partner = _rng(fact, seed, "counterfactual").choice(candidates)
            prompt, span = render_subject(fact, partner.subject, _mention(partner))
            extra["counterfactual"] = {
                "fact_id": partner.fact_id,
                "subject": partner.subject,
                "prompt": prompt,
                "subject_span": span,
                "answers": tuple(partner.answers),
            }
        out.append(annotate(fact, **extra))
    return facts.with_facts(out, {"step": "relation_context", "seed": seed})


def counterfactual_facts(facts: FactSet) -> FactSet:
    """The counterfactual prompt of every fact, as facts (id ``<fact_id>/counterfactual``).

    Facts without a ``counterfactual`` attribute get one from :func:`add_relation_context` first
    (partners from ``facts`` themselves); a fact that still has none raises a :class:`DatasetError`.
    """
    if any("counterfactual" not in f.attributes for f in facts):
        facts = add_relation_context(facts)
    missing = [f.fact_id for f in facts if "counterfactual" not in f.attributes]
    if missing:
        raise DatasetError(
            f"no counterfactual subject for {missing[:3]}: their relation has no other subject with another "
            "answer among the facts; add facts of the same relation or pass a pool to add_relation_context"
        )
    out = []
    for fact in facts:
        cf = fact.attributes["counterfactual"]
        out.append(
            Fact(
                fact_id=f"{fact.fact_id}/counterfactual",
                subject=cf["subject"],
                prompt=cf["prompt"],
                answers=tuple(cf["answers"]),
                relation=fact.relation,
                subject_span=tuple(cf["subject_span"]),
                attributes={"clean_id": fact.fact_id},
            )
        )
    return facts.with_facts(out, {"step": "counterfactual_facts"})


def add_swap_partners(model, facts: FactSet, *, pool: Sequence[Fact] | None = None, seed: int = 0) -> FactSet:
    """Every fact with a ``subject_swap`` partner when its relation has one (symmetric token replacement).

    A partner is a pool fact of the same relation with another subject and another canonical answer
    (as for ``counterfactual``) whose subject, written into the fact's own prompt, gives the same
    tokens as the clean prompt everywhere but in the subject, and as many subject tokens. Candidates
    are tried in a seeded order of the fact's own (so the choice does not depend on the other facts);
    a fact without any keeps no partner.

    Args:
        model: supplies the tokenizer (token counts are the model's).
        pool: where partners come from (default: ``facts``); ``recallscope run`` passes the whole
            loaded dataset.
        seed: seed of the candidate order.
    """
    from recallscope.core.tokens import encode_prompt, find_token_span

    def tokens(prompt: str, span) -> tuple[list[int], tuple[int, int]]:
        ids, offsets, _ = encode_prompt(model, prompt)
        return ids, find_token_span(prompt, offsets, tuple(span))

    pool = list(facts if pool is None else pool)
    out = []
    for fact in facts:
        if fact.subject_span is None:
            out.append(fact)
            continue
        ids, (start, end) = tokens(fact.prompt, fact.subject_span)
        candidates = _candidates(fact, pool)
        _rng(fact, seed, "subject_swap").shuffle(candidates)
        for partner in candidates:
            prompt, span = render_subject(fact, partner.subject, _mention(partner))
            other, other_span = tokens(prompt, span)
            if other_span == (start, end) and other[:start] == ids[:start] and other[end:] == ids[end:]:
                swap = {
                    "fact_id": partner.fact_id,
                    "subject": partner.subject,
                    "prompt": prompt,
                    "subject_span": span,
                    "answers": tuple(partner.answers),
                }
                fact = annotate(fact, subject_swap=swap)
                break
        out.append(fact)
    return facts.with_facts(out, {"step": "swap_partners", "seed": seed})


def swap_fact(fact: Fact) -> Fact | None:
    """The subject-swapped prompt of ``fact`` as a fact (id: the partner's), or None without a partner."""
    swap = fact.attributes.get("subject_swap")
    if swap is None:
        return None
    return Fact(
        fact_id=swap["fact_id"],
        subject=swap["subject"],
        prompt=swap["prompt"],
        answers=tuple(swap["answers"]),
        relation=fact.relation,
        subject_span=tuple(swap["subject_span"]),
    )


def swap_inputs(model, fact: Fact) -> tuple[str, torch.Tensor, int] | None:
    """``(partner id, the swapped prompt's token ids [T], the partner answer's first token)`` of
    ``fact``'s subject swap, or None without a partner.
    """
    from recallscope.core.tokens import tokenize

    other = swap_fact(fact)
    if other is None:
        return None
    batch = tokenize(model, [other.prompt], targets=[other.target])
    return other.fact_id, batch.input_ids[0], int(batch.target_ids[0])
