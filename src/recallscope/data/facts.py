"""``Fact`` and ``FactSet``: factual queries, and the batches of tokens built from them.

A fact is a prompt the model continues, the subject it asks about and the accepted answers::

    fact = Fact.from_template("The [capital] of {subject} is", "France", ["Paris"], relation="capital")
    fact.prompt            # 'The capital of France is'
    fact.subject_span      # (15, 21): characters of "France" in the prompt
    fact.relation_span     # (4, 11):  characters of "capital" (the bracketed words of the template)
    fact.target            # ' Paris': the continuation scored by the analyses

A :class:`FactSet` is an immutable sequence of facts with its provenance (where the facts came
from, every filter applied, and the rows that were skipped and why)::

    facts = rs.load_facts("country_capital").known_by(model)
    batch = facts.to_batch(model)           # PromptBatch with "subject"/"relation" spans and targets
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, overload

import torch

from recallscope.errors import DatasetError

__all__ = ["Fact", "FactSet", "SkippedRow", "render_template", "annotate"]

_NO_SPACE_BEFORE_ANSWER = (" ", "\n", "\t", '"', "'", "(", "“", "‘")


@dataclass(frozen=True)
class SkippedRow:
    """A row of a dataset that was left out, and why."""

    source: str
    row: int
    """1-based line number (JSONL/CSV) or item number (JSON arrays)."""
    reason: str

    def __str__(self) -> str:
        return f"{self.source}, row {self.row}: {self.reason}"


@dataclass(frozen=True)
class Fact:
    """One factual query.

    Attributes:
        fact_id: unique identifier within a dataset.
        subject: the entity the query is about; it occurs in ``prompt``.
        prompt: the text the model continues.
        answers: accepted answers, canonical first, without leading space.
        relation: relation name (e.g. ``"country_capital"`` or a Wikidata id).
        subject_span: ``(start, end)`` characters of the subject in the prompt.
        relation_span: characters of the relation words, when known.
        template: the prompt with ``{subject}`` in place of the subject, when known.
        description: a few sentences about the subject (used by the attributes rate).
        attributes: anything else (e.g. CounterFact's ``target_new``, a model's top-1 token).
            Keys the batches read: ``spans`` (more named character spans, e.g. ``answer_1``),
            ``tracked`` (name → token id followed besides the target, e.g. every answer of a
            one-to-many list) and ``target_text`` (the exact continuation to score, when it is not
            the canonical answer after a space).
    """

    fact_id: str
    subject: str
    prompt: str
    answers: tuple[str, ...]
    relation: str = ""
    subject_span: tuple[int, int] | None = None
    relation_span: tuple[int, int] | None = None
    template: str | None = None
    description: str | None = None
    attributes: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        answers = (self.answers,) if isinstance(self.answers, str) else tuple(self.answers)
        object.__setattr__(self, "answers", answers)
        object.__setattr__(self, "attributes", MappingProxyType(dict(self.attributes)))
        if not self.subject or not self.subject.strip():
            raise DatasetError(f"fact {self.fact_id!r}: empty subject")
        if not self.prompt.strip():
            raise DatasetError(f"fact {self.fact_id!r}: empty prompt")
        if not answers or any(not isinstance(a, str) or not a.strip() for a in answers):
            raise DatasetError(f"fact {self.fact_id!r}: empty target (answers={list(answers)!r})")
        if self.subject_span is None:
            where = self.prompt.find(self.subject)
            if where < 0:
                raise DatasetError(
                    f"fact {self.fact_id!r}: subject {self.subject!r} does not occur in prompt "
                    f"{self.prompt!r} (it must appear exactly as written, case included)"
                )
            object.__setattr__(self, "subject_span", (where, where + len(self.subject)))
        start, end = self.subject_span
        if not 0 <= start < end <= len(self.prompt):
            raise DatasetError(f"fact {self.fact_id!r}: subject_span {self.subject_span} outside the prompt")

    @property
    def target(self) -> str:
        """The continuation the analyses score: the canonical answer with its leading space (or the
        ``target_text`` attribute, e.g. a one-to-many answer exactly as the model wrote it).
        """
        return self.attributes.get("target_text") or self.continuation(self.answers[0])

    def continuation(self, answer: str) -> str:
        """``answer`` as the text that follows the prompt (a space unless the prompt ends in one)."""
        return answer if self.prompt.endswith(_NO_SPACE_BEFORE_ANSWER) else " " + answer

    @classmethod
    def from_template(
        cls,
        template: str,
        subject: str,
        answers: Sequence[str] | str,
        *,
        mention: str | None = None,
        relation: str = "",
        fact_id: str | None = None,
        description: str | None = None,
        attributes: Mapping[str, Any] | None = None,
    ) -> Fact:
        """Render ``template`` (``{subject}`` placeholder, ``[relation words]``) for ``subject``.

        ``mention`` is how the subject is written in the sentence (``"the United States"``,
        ``"gold"``); it must contain ``subject`` (case aside), whose characters become the subject
        span.
        """
        mention = subject if mention is None else mention
        where = mention.casefold().find(subject.casefold())  # "gold" may mention the subject "Gold"
        if where < 0:
            raise DatasetError(f"mention {mention!r} does not contain subject {subject!r}")
        prompt, mention_span, relation_span = render_template(template, mention)
        start = mention_span[0] + where
        return cls(
            fact_id=fact_id or f"{relation or 'fact'}/{subject}",
            subject=subject,
            prompt=prompt,
            answers=tuple([answers] if isinstance(answers, str) else answers),
            relation=relation,
            subject_span=(start, start + len(subject)),
            relation_span=relation_span,
            template=template.replace("[", "").replace("]", ""),
            description=description,
            attributes=attributes or {},
        )


_TEMPLATE_TOKEN = re.compile(r"\{subject\}|\[|\]")


def render_template(template: str, mention: str) -> tuple[str, tuple[int, int], tuple[int, int] | None]:
    """Fill ``{subject}`` with ``mention`` and drop the ``[ ]`` relation markers.

    Returns the prompt (first letter capitalised, unless the first word is a camel-cased name such
    as "iPhone"), the mention's character span and the span covering the bracketed relation words
    (None without brackets).
    """
    if template.count("{subject}") != 1:
        raise DatasetError(f"template {template!r} must contain {{subject}} exactly once")
    out, pos, mention_span, brackets = [], 0, None, []
    length = 0
    for match in _TEMPLATE_TOKEN.finditer(template):
        piece = template[pos : match.start()]
        out.append(piece)
        length += len(piece)
        if match.group() == "{subject}":
            mention_span = (length, length + len(mention))
            out.append(mention)
            length += len(mention)
        else:
            brackets.append(length)
        pos = match.end()
    out.append(template[pos:])
    if len(brackets) % 2:
        raise DatasetError(f"template {template!r} has unbalanced [ ] relation markers")
    prompt = "".join(out)
    first_word = prompt.split(" ", 1)[0]
    if not any(c.isupper() for c in first_word[1:]):  # keep brand names such as "iPhone", "eBay"
        prompt = prompt[:1].upper() + prompt[1:]
    relation_span = (brackets[0], brackets[-1]) if brackets else None
    return prompt, mention_span, relation_span


class FactSet(Sequence[Fact]):
    """An immutable, ordered collection of facts with provenance.

    Attributes:
        name: what it was loaded from.
        provenance: source, counts and every filter applied (JSON-serialisable).
        skipped: rows left out while loading or filtering, with reasons.
    """

    def __init__(
        self,
        facts: Iterable[Fact],
        *,
        name: str = "facts",
        provenance: Mapping[str, Any] | None = None,
        skipped: Iterable[SkippedRow] = (),
    ) -> None:
        self._facts = tuple(facts)
        self.name = name
        self.provenance = dict(provenance or {"source": name, "n_loaded": len(self._facts)})
        self.provenance.setdefault("steps", [])
        self.skipped = tuple(skipped)
        ids = Counter(f.fact_id for f in self._facts)
        duplicates = [i for i, n in ids.items() if n > 1]
        if duplicates:
            raise DatasetError(f"{name}: duplicate fact_id(s) {duplicates[:5]}; fact ids must be unique")

    # -- sequence protocol ------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._facts)

    @overload
    def __getitem__(self, index: int) -> Fact: ...
    @overload
    def __getitem__(self, index: slice) -> FactSet: ...
    def __getitem__(self, index):
        if isinstance(index, slice):
            return self._derive(self._facts[index], {"step": "slice", "slice": str(index)})
        return self._facts[index]

    def __iter__(self) -> Iterator[Fact]:
        return iter(self._facts)

    def __repr__(self) -> str:
        return f"FactSet({self.name!r}, {len(self)} facts, {len(self.relations)} relations)"

    # -- derived sets -----------------------------------------------------------------------------
    def _derive(self, facts: Iterable[Fact], step: Mapping[str, Any], skipped=()) -> FactSet:
        facts = tuple(facts)
        provenance = {
            **self.provenance,
            "steps": [*self.provenance["steps"], {**step, "n_after": len(facts)}],
        }
        return FactSet(facts, name=self.name, provenance=provenance, skipped=(*self.skipped, *skipped))

    def filter(self, keep: Callable[[Fact], bool], *, description: str = "filter") -> FactSet:
        """Facts for which ``keep(fact)`` is true; ``description`` goes into the provenance."""
        return self._derive((f for f in self if keep(f)), {"step": description})

    def sample(self, n: int, seed: int = 0) -> FactSet:
        """``n`` facts drawn without replacement with a fixed seed (all of them if ``n >= len``)."""
        if n >= len(self):
            return self._derive(self._facts, {"step": "sample", "n": n, "seed": seed})
        picked = sorted(random.Random(seed).sample(range(len(self)), n))
        return self._derive((self._facts[i] for i in picked), {"step": "sample", "n": n, "seed": seed})

    def by_relation(self) -> dict[str, FactSet]:
        """One FactSet per relation, in order of first appearance."""
        groups: dict[str, list[Fact]] = {}
        for fact in self:
            groups.setdefault(fact.relation, []).append(fact)
        return {
            rel: self._derive(facts, {"step": "relation", "relation": rel}) for rel, facts in groups.items()
        }

    def with_facts(self, facts: Iterable[Fact], step: Mapping[str, Any], skipped=()) -> FactSet:
        """A new FactSet with ``facts``, recording ``step`` (and extra skipped rows) in provenance."""
        return self._derive(facts, step, skipped)

    @property
    def relations(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(f.relation for f in self))

    def counts(self) -> dict[str, int]:
        """Number of facts per relation."""
        return dict(Counter(f.relation for f in self))

    # -- to tokens ----------------------------------------------------------------------------------
    def to_batch(self, model, indices: Sequence[int] | None = None):
        """A left-padded :class:`~recallscope.core.tokens.PromptBatch` of (some of) the facts.

        Spans ``subject``, ``relation`` and those of each fact's ``spans`` attribute (``(-1, -1)``
        where unknown); targets are each fact's :attr:`Fact.target`; ``tracked`` holds the facts'
        ``tracked`` token ids (every fact of the batch must track the same names).
        """
        from recallscope.core.tokens import tokenize

        facts = [self._facts[i] for i in indices] if indices is not None else list(self._facts)
        spans = {"subject": [f.subject_span for f in facts], "relation": [f.relation_span for f in facts]}
        extra = dict.fromkeys(name for f in facts for name in f.attributes.get("spans", {}))
        for name in extra:
            spans[name] = [_tuple(f.attributes.get("spans", {}).get(name)) for f in facts]
        batch = tokenize(
            model,
            [f.prompt for f in facts],
            spans=spans,
            targets=[f.target for f in facts],
            fact_ids=[f.fact_id for f in facts],
        )
        tracked = {tuple(f.attributes.get("tracked", {})) for f in facts}
        if len(tracked) > 1:
            raise DatasetError(
                f"facts of one batch track different tokens ({sorted(tracked)}): batch them separately"
            )
        names = tracked.pop()
        if not names:
            return batch
        ids = {n: torch.tensor([int(f.attributes["tracked"][n]) for f in facts]) for n in names}
        return replace(batch, tracked=ids)

    def batches(self, model, batch_size: int) -> Iterator:
        """Consecutive :class:`PromptBatch` chunks of at most ``batch_size`` facts."""
        for start in range(0, len(self), batch_size):
            yield self.to_batch(model, range(start, min(start + batch_size, len(self))))

    def fit_context(self, model) -> FactSet:
        """Drop (and report) facts whose prompt plus answer is longer than the model's context."""
        from recallscope.core.tokens import encode_prompt

        limit = model.max_context
        if limit is None:
            return self
        kept, skipped = [], []
        for row, fact in enumerate(self, start=1):
            n_tokens = len(encode_prompt(model, fact.prompt + fact.target)[0])
            if n_tokens > limit:
                skipped.append(
                    SkippedRow(
                        self.name,
                        row,
                        f"{fact.fact_id}: prompt and answer take "
                        f"{n_tokens} tokens, more than the model's context ({limit})",
                    )
                )
            else:
                kept.append(fact)
        return self._derive(kept, {"step": "fit_context", "limit": limit}, skipped)

    def known_by(self, model, criterion: str = "first_token", *, batch_size: int = 32) -> FactSet:
        """The facts the model answers correctly; see :func:`recallscope.data.known.known_by`."""
        from recallscope.data.known import known_by

        return known_by(model, self, criterion=criterion, batch_size=batch_size)


def _tuple(span) -> tuple[int, int] | None:
    return None if span is None else (int(span[0]), int(span[1]))


def annotate(fact: Fact, **attributes: Any) -> Fact:
    """A copy of ``fact`` with extra attributes."""
    return replace(fact, attributes={**fact.attributes, **attributes})
