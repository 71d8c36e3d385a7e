"""One-to-many queries (Yan & Jia 2025, ``methods.md`` §2.1/§2.3): the model lists k answers.

For every subject of a one-to-many set (``load_facts("country_cities")``) the model generates a
k-item list greedily from a list template ("List three cities from France: 1."). We parse its
items, match them against the gold list, keep subjects whose k items are all correct and
distinct, and build one prompt per answer step (the 1MKR format): step s is the query followed by
the model's own verbatim generation up to the s-th answer, whose first token is the target. The
first token of **every** answer is tracked at every step, including answers not generated yet
(§2.6 pitfall 1)::

    lists = generate_lists(model, rs.load_facts("country_cities"), k=3)
    lists.report                              # kept / dropped and why
    batch = lists.step_batch(model, step=2)   # spans: subject, relation, answer_1; target: answer 2
    lists.tracked_ids(step=2)                 # [n, 3] first token of each of the three answers
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from recallscope.core.generate import generate_greedy
from recallscope.core.tokens import PromptBatch, answer_ids
from recallscope.data.facts import Fact, FactSet
from recallscope.errors import DatasetError

__all__ = ["ListGeneration", "OneToManyStep", "OneToManySet", "generate_lists", "parse_items", "match_item"]

_QUOTES = "\"'“”‘’«»"
_YEAR = re.compile(r"\s*\(\d{4}\)")


@dataclass(frozen=True)
class ListGeneration:
    """What the model generated for one subject, parsed and matched against the gold list.

    ``spans`` are character spans of the items in ``prompt + text``; ``matches`` holds the gold
    answer each item matched (None when it matched none).
    """

    fact: Fact
    text: str
    items: tuple[str, ...]
    spans: tuple[tuple[int, int], ...]
    matches: tuple[str | None, ...]
    tracked_ids: tuple[int, ...] = ()
    """First token of each item as the model produces it after the text before it (kept ones)."""

    @property
    def full_text(self) -> str:
        return self.fact.prompt + self.text

    def problem(self, k: int, correct: bool = True) -> str | None:
        """Why this generation cannot be used (None when its k items are distinct and, with
        ``correct``, all in the gold list).
        """
        if len(self.items) < k:
            return f"generated {len(self.items)} of {k} items"
        pairs = list(zip(self.items[:k], self.matches[:k], strict=True))
        wrong = [item for item, match in pairs if match is None]
        if correct and wrong:
            return f"not in the gold list: {wrong}"
        names = [match or _normalize(item) for item, match in pairs]
        if len(set(names)) < k:
            return "repeated answers"
        return None


@dataclass(frozen=True)
class OneToManyStep:
    """Answer step ``step`` (1-based) of one subject: the query with the previous answers."""

    fact: Fact
    step: int
    prompt: str
    target: str
    """The continuation scored at this step: the model's own s-th answer, verbatim."""
    answers: tuple[str, ...]
    """The gold names of all k answers the model gave (None for an item not in the gold list)."""
    items: tuple[str, ...]
    """The k answers as the model wrote them."""
    answer_spans: tuple[tuple[int, int], ...]
    """Character spans of the previous answers (``step - 1`` of them) in ``prompt``."""
    tracked_ids: tuple[int, ...]
    """First token of each of the k answers, as the model generated it."""


@dataclass
class OneToManySet:
    """Subjects whose k generated answers were all correct and distinct, as per-step prompts."""

    k: int
    generations: list[ListGeneration]
    kept: list[ListGeneration]
    report: dict = field(default_factory=dict)

    def steps(self, step: int) -> list[OneToManyStep]:
        """The prompts of answer step ``step`` (1 … k), one per kept subject."""
        if not 1 <= step <= self.k:
            raise DatasetError(f"step must be 1 … {self.k}, got {step}")
        return [_step(gen, step, self.k) for gen in self.kept]

    def step_batch(self, model, step: int) -> PromptBatch:
        """Left-padded batch of step ``step``: spans ``subject``, ``relation``, ``answer_1`` …, the
        model's s-th answer as target, and the first token of every answer in ``tracked``.
        """
        return self.to_facts([step]).to_batch(model)

    def to_records(self, model) -> list[dict]:
        """Every step of every kept subject as a 1MKR record (Yan & Jia's jsonl format, ``methods.md``
        §2.3): token spans are ``[start, end)`` indices into ``query_input_ids``.
        """
        records = []
        for step in range(1, self.k + 1):
            batch = self.step_batch(model, step)
            for row, item in enumerate(self.steps(step)):
                records.append(_record(batch, row, item, step))
        return records

    def to_facts(self, steps: Sequence[int] | None = None) -> FactSet:
        """Every answer step of every kept subject as a :class:`Fact`, ordered by step.

        Step facts have id ``"<fact_id>/step<s>"``, the step prompt, the model's s-th answer as
        ``target_text``, the previous answers as spans ``answer_1`` … and the first token of all k
        answers as ``tracked`` (attributes ``step``, ``k``, ``subject_fact_id``, ``list_answers``,
        ``gold_answers``), so ``to_facts().to_batch(model)`` is what the one-to-many analyses read.
        """
        steps = range(1, self.k + 1) if steps is None else steps
        facts = [_step_fact(item, self.k) for step in steps for item in self.steps(step)]
        provenance = {
            "source": "one_to_many",
            "n_loaded": len(facts),
            "steps": [{"step": "generate_lists", **self.report}],
        }
        name = self.kept[0].fact.relation if self.kept else "one_to_many"
        return FactSet(facts, name=name, provenance=provenance)

    def tracked_ids(self, step: int) -> torch.Tensor:
        """``[n, k]`` first tokens of the k answers for the prompts of ``step``."""
        return torch.tensor([s.tracked_ids for s in self.steps(step)], dtype=torch.long)


def generate_lists(
    model,
    facts: FactSet,
    *,
    k: int = 3,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    correct: bool = True,
    texts: dict[str, str] | None = None,
) -> OneToManySet:
    """Generate, parse and match a k-item list for every fact of a one-to-many set.

    Args:
        model: the model.
        facts: one-to-many facts (``load_facts("country_cities", k=k)``): the prompt is a list
            template ending in ``"1."`` and ``answers`` is the gold list.
        k: items required.
        batch_size: prompts per generation batch.
        max_new_tokens: generation length (default ``12 * k``).
        correct: keep only lists whose k items are all in the gold list (False: any k distinct
            items, e.g. to study what the model lists when it is wrong).
        texts: generations already made, by fact id (e.g. saved by an earlier run); only the
            other facts are generated.
    """
    max_new_tokens = max_new_tokens or 12 * k
    texts = dict(texts or {})
    todo = [i for i, fact in enumerate(facts) if fact.fact_id not in texts]
    for start in range(0, len(todo), batch_size):
        rows = todo[start : start + batch_size]
        batch = facts.to_batch(model, rows)
        new_tokens = generate_greedy(model, batch, max_new_tokens)
        decoded = model.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        texts.update({facts[i].fact_id: text for i, text in zip(rows, decoded, strict=True)})
    generations = [_parse(fact, texts[fact.fact_id], k) for fact in facts]
    kept, reasons = [], Counter()
    for gen in generations:
        problem = gen.problem(k, correct)
        if problem is None:
            kept.append(_with_tracked(model, gen, k))
        else:
            reasons[problem.split(":")[0]] += 1
    report = {
        "k": k,
        "criterion": "k distinct items in the gold list" if correct else "k distinct items",
        "subjects": len(generations),
        "kept": len(kept),
        "dropped": dict(reasons),
        "model": model.info.name,
    }
    return OneToManySet(k=k, generations=generations, kept=kept, report=report)


def _parse(fact: Fact, text: str, k: int) -> ListGeneration:
    items, spans = parse_items(fact.prompt, text, k)
    gold = list(fact.answers)
    aliases = fact.attributes.get("aliases", {})
    matches = tuple(match_item(item, gold, aliases) for item in items)
    return ListGeneration(fact, text, tuple(items), tuple(spans), matches)


def parse_items(prompt: str, text: str, k: int) -> tuple[list[str], list[tuple[int, int]]]:
    """Items of a numbered list continued by ``text`` after ``prompt`` (which ends in ``1.``).

    Returns the cleaned items and their character spans in ``prompt + text``. An item runs to the
    next number marker (``2.``), a newline or the end; quotes, trailing punctuation and a trailing
    ``(year)`` are not part of it.
    """
    full = prompt + text
    items, spans = [], []
    starts = [len(prompt)] + [m.end() for m in _markers(full, len(prompt), k)]
    for index, start in enumerate(starts[:k]):
        end = _item_end(full, start, index + 2)
        span = _clean_span(full, start, end)
        if span is None:
            break
        items.append(full[span[0] : span[1]])
        spans.append(span)
    return items, spans


def _markers(full: str, start: int, k: int) -> list[re.Match]:
    """The ``2.`` … ``k.`` markers after ``start``, in order (stops at the first missing one)."""
    found, position = [], start
    for number in range(2, k + 1):
        match = re.compile(rf"(?<![\w.]){number}\.").search(full, position)
        if match is None:
            break
        found.append(match)
        position = match.end()
    return found


def _item_end(full: str, start: int, next_number: int) -> int:
    match = re.compile(rf"(?<![\w.]){next_number}\.").search(full, start)
    end = match.start() if match else len(full)
    newline = full.find("\n", start)
    while newline == start or (0 <= newline < end and not full[start:newline].strip()):
        newline = full.find("\n", newline + 1)  # skip newlines before the item's text
    return min(end, newline) if newline >= 0 else end


def _clean_span(full: str, start: int, end: int) -> tuple[int, int] | None:
    """Trim whitespace, quotes, trailing separators and a trailing ``(year)`` from an item."""
    while start < end and (full[start].isspace() or full[start] in _QUOTES):
        start += 1
    year = _YEAR.search(full, start, end)  # "Titanic (1997) - a film by …" is "Titanic"
    if year:
        end = year.start()
    while end > start and (full[end - 1].isspace() or full[end - 1] in _QUOTES + ",;.-–"):
        end -= 1
    return (start, end) if end > start else None


def _normalize(text: str) -> str:
    text = unicodedata.normalize("NFKD", text.casefold())
    text = "".join(c for c in text if not unicodedata.combining(c))
    text = re.sub(r"[^\w\s]", " ", text)
    text = re.sub(r"\s+", " ", text).strip()
    return text.removeprefix("the ")


def match_item(item: str, gold: Sequence[str], aliases: dict | None = None) -> str | None:
    """The gold answer ``item`` names (case, accents, punctuation and a leading "the" ignored)."""
    wanted = _normalize(item)
    for answer in gold:
        names = [answer, *(aliases or {}).get(answer, [])]
        if any(_normalize(name) == wanted for name in names):
            return answer
    return None


def _with_tracked(model, gen: ListGeneration, k: int) -> ListGeneration:
    """Record the first token of each of the k answers: the target token of its answer step."""
    gen = replace(gen, items=gen.items[:k], spans=gen.spans[:k], matches=gen.matches[:k])
    first = []
    for step in range(1, k + 1):
        prompt, target = _step_texts(gen, step)
        first.append(answer_ids(model, prompt, target)[0])
    return replace(gen, tracked_ids=tuple(first))


def _step_texts(gen: ListGeneration, step: int) -> tuple[str, str]:
    """(prompt, target) of answer step ``step``: the text before the answer, and the answer."""
    start, end = gen.spans[step - 1]
    cut = len(gen.fact.prompt) if step == 1 else _step_cut(gen.full_text, start)
    return gen.full_text[:cut], gen.full_text[cut:end]


def _step(gen: ListGeneration, step: int, k: int) -> OneToManyStep:
    prompt, target = _step_texts(gen, step)
    return OneToManyStep(
        fact=gen.fact,
        step=step,
        prompt=prompt,
        target=target,
        answers=tuple(gen.matches[:k]),
        items=tuple(gen.items[:k]),
        answer_spans=tuple(gen.spans[: step - 1]),
        tracked_ids=gen.tracked_ids,
    )


def _step_fact(item: OneToManyStep, k: int) -> Fact:
    fact = item.fact
    extra = {
        "kind": "one_to_many_step",
        "subject_fact_id": fact.fact_id,
        "step": item.step,
        "k": k,
        "target_text": item.target,
        "list_answers": list(item.items),
        "gold_answers": list(item.answers),
        "spans": {f"answer_{j + 1}": span for j, span in enumerate(item.answer_spans)},
        "tracked": {f"answer_{j + 1}": int(t) for j, t in enumerate(item.tracked_ids)},
    }
    return replace(
        fact,
        fact_id=f"{fact.fact_id}/step{item.step}",
        prompt=item.prompt,
        answers=(item.items[item.step - 1],),
        attributes={**{a: v for a, v in fact.attributes.items() if a != "aliases"}, **extra},
    )


def _record(batch: PromptBatch, row: int, item: OneToManyStep, step: int) -> dict:
    pad = int(batch.pad_lengths[row])
    ids = batch.input_ids[row, pad:].tolist()

    def span(name: str) -> list[int]:
        start, end = batch.spans[name][row].tolist()
        return [start - pad, end - pad] if start >= 0 else [-1, -1]

    record = {
        "fact_id": item.fact.fact_id,
        "query": item.prompt,
        "query_input_ids": ids,
        "target_answer_idx": step - 1,
        "target_answer_name": item.answers[step - 1],
        "target_answer_tokens": list(batch.answer_ids[row]),
        "three_answers_label_list": list(item.answers),
        "three_answers_token_list": list(item.tracked_ids),
        "subject": item.fact.subject,
        "subject_start_end_idx": span("subject"),
        "relation_start_end_idx": span("relation"),
    }
    for j in range(1, step):
        record[f"prev_answer_{j}_start_end_idx"] = span(f"answer_{j}")
    return record


def _step_cut(full: str, item_start: int) -> int:
    """Where the step prompt ends: before the whitespace that precedes the item (kept in the target)."""
    cut = item_start
    while cut > 0 and full[cut - 1].isspace():
        cut -= 1
    return cut
