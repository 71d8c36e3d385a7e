"""``load_facts``: built-in names and user files (JSONL, CSV, ROME known-facts, CounterFact).

File formats (one fact per row):

**JSONL** (one JSON object per line) and **CSV** (header row) share these columns:

=============== ========== ==================================================================
column          required   meaning
=============== ========== ==================================================================
``subject``     yes        the entity asked about; must occur in the prompt
``prompt``      one of     the text the model continues ("The capital of France is")
``template``    one of     the prompt with ``{}`` or ``{subject}`` where the subject goes
``target``      one of     the expected answer ("Paris"; a leading space is allowed)
``answers``     one of     all accepted answers: a JSON list, or ``|``-separated in CSV
``fact_id``     no         unique id (default: ``<file stem>/<row>``)
``relation``    no         relation name or id
``description`` no         a few sentences about the subject
(any other)     no         kept in ``Fact.attributes``
=============== ========== ==================================================================

**ROME known facts** (``known_1000.json``: a JSON array of objects with ``known_id, subject,
attribute, template, prompt, relation_id``) and **CounterFact** (a JSON array of objects with
``case_id`` and ``requested_rewrite: {prompt, subject, relation_id, target_true, target_new}``) are
recognised automatically.

Bad rows (missing fields, subject not in the prompt, empty target, invalid JSON) are reported with
their row numbers in ``FactSet.skipped`` and in a warning, and left out; nothing is silently
fixed. A file without a single valid row is an error.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from recallscope.data.builtin import TemplateChoice, builtin_names, load_builtin
from recallscope.data.facts import Fact, FactSet, SkippedRow
from recallscope.errors import DatasetError

__all__ = ["load_facts", "check_source", "FORMATS"]

log = logging.getLogger("recallscope")
FORMATS = ("jsonl", "csv", "known_facts", "counterfact")
_KNOWN_COLUMNS = {"subject", "prompt", "template", "target", "answers", "fact_id", "relation", "description"}


def load_facts(
    name_or_path: str | os.PathLike,
    *,
    model=None,
    templates: TemplateChoice = "rotate",
    format: str | None = None,
    k: int = 3,
) -> FactSet:
    """Load facts from a built-in dataset name or a file.

    Args:
        name_or_path: a built-in name (``"mixed"``, ``"country_capital"``, ``"lv_capitals"``, …) or
            the path of a ``.jsonl``, ``.csv`` or ``.json`` file (module docstring).
        model: when given, facts whose prompt and answer do not fit the model's context are
            skipped (and reported).
        templates: built-in relations only: which template each fact uses.
        format: force a file format (``jsonl``, ``csv``, ``known_facts``, ``counterfact``).
        k: built-in one-to-many sets only: how many items the prompt asks for.

    Raises:
        DatasetError: unknown name, missing file, unknown format, or no valid row.
    """
    name = os.fspath(name_or_path)
    if name in builtin_names():
        facts = load_builtin(name, templates=templates, k=k)
    else:
        facts = _load_file(Path(name), format)
    if model is not None:
        facts = facts.fit_context(model)
    for row in facts.skipped:
        log.warning("skipped %s", row)
    if not len(facts):
        reasons = "; ".join(str(s) for s in facts.skipped[:5])
        raise DatasetError(
            f"{name}: no valid fact left ({len(facts.skipped)} rows skipped)"
            + (f": {reasons}" if reasons else "")
        )
    return facts


def _missing(name) -> DatasetError:
    return DatasetError(
        f"{name}: no such file, and not a built-in dataset name ({', '.join(builtin_names())})"
    )


def check_source(name_or_path: str | os.PathLike) -> None:
    """Raise :class:`DatasetError` unless ``name_or_path`` is a built-in dataset name or an existing
    file (checked before a model loads).
    """
    name = os.fspath(name_or_path)
    if name in builtin_names():
        return
    if not Path(name).is_file():
        raise _missing(name)
    if Path(name).stat().st_size == 0:
        raise DatasetError(f"{name}: the file is empty")


def _load_file(path: Path, format: str | None) -> FactSet:
    if not path.is_file():
        raise _missing(path)
    format = format or _detect(path)
    if format not in FORMATS:
        raise DatasetError(f"{path}: unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    reader = {"jsonl": _jsonl_rows, "csv": _csv_rows, "known_facts": _json_rows, "counterfact": _json_rows}
    builder = (
        _counterfact_fact
        if format == "counterfact"
        else (_known_fact if format == "known_facts" else _plain_fact)
    )
    facts, skipped = [], []
    for row_number, row in reader[format](path):
        try:
            if isinstance(row, Exception):
                raise row
            facts.append(builder(row, f"{path.stem}/{row_number}"))
        except (DatasetError, KeyError, TypeError, ValueError, AttributeError) as err:
            skipped.append(SkippedRow(path.name, row_number, _reason(err)))
    provenance = {
        "source": str(path),
        "format": format,
        "sha256": _sha256(path),
        "n_rows": len(facts) + len(skipped),
        "n_loaded": len(facts),
        "n_skipped": len(skipped),
    }
    if not facts:
        if not skipped:
            raise DatasetError(f"{path}: the file has no rows (is it empty?)")
        listed = "; ".join(str(s) for s in skipped[:5])
        raise DatasetError(f"{path}: no valid row ({len(skipped)} rows, all skipped): {listed}")
    return FactSet(facts, name=path.stem, provenance=provenance, skipped=skipped)


def _reason(err: Exception) -> str:
    if isinstance(err, KeyError):
        return f"missing field {err.args[0]!r}"
    return str(err)


def _detect(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix in (".csv", ".tsv"):
        return "csv"
    if suffix == ".json":
        head = _text(path.read_bytes()[:4096])
        if '"requested_rewrite"' in head:
            return "counterfact"
        if '"known_id"' in head or '"attribute"' in head:
            return "known_facts"
        return "jsonl" if head.lstrip().startswith("{") else "known_facts"
    raise DatasetError(f"{path}: cannot tell the format from the suffix {suffix!r}; pass format=")


# -- readers: yield (row number, dict | exception) -------------------------------------------------


def _text(raw: bytes) -> str:
    """Bytes as text: UTF-8, with or without a byte-order mark; bytes that are not UTF-8 are kept as
    lone surrogates, so that the rows holding them are reported (:func:`_not_utf8`) and the rest load.
    """
    return raw.decode("utf-8-sig", errors="surrogateescape")


def _not_utf8(text: str) -> DatasetError | None:
    bad = next((c for c in text if "\udc80" <= c <= "\udcff"), None)
    if bad is None:
        return None
    return DatasetError(
        f"not UTF-8 text (byte 0x{ord(bad) - 0xDC00:02x}): save the file as UTF-8 (e.g. `iconv -f latin1 -t "
        "utf-8`)"
    )


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    lines = _text(path.read_bytes()).replace("\r\n", "\n").split("\n")  # not splitlines: U+2028 is data
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if error := _not_utf8(line):
            yield number, error
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            yield number, DatasetError(f"invalid JSON ({err.msg})")
            continue
        yield number, row if isinstance(row, dict) else DatasetError("a row must be a JSON object")


def _csv_rows(path: Path) -> Iterator[tuple[int, Any]]:
    handle = io.StringIO(_text(path.read_bytes()), newline="")
    dialect = csv.excel_tab if path.suffix.lower() == ".tsv" else csv.excel
    reader = csv.DictReader(handle, dialect=dialect)
    for row in reader:
        row = {k: v for k, v in row.items() if k is not None and v not in (None, "")}
        if error := _not_utf8("".join(str(v) for v in (*row.keys(), *row.values()))):
            yield reader.line_num, error
            continue
        if "answers" in row:
            row["answers"] = [a for a in row["answers"].split("|")]
        yield reader.line_num, row


def _json_rows(path: Path) -> Iterator[tuple[int, Any]]:
    text = _text(path.read_bytes())
    if error := _not_utf8(text):
        raise DatasetError(f"{path}: {error}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}: invalid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON array of records")
    for number, row in enumerate(data, start=1):
        yield number, row if isinstance(row, dict) else DatasetError("a record must be a JSON object")


# -- builders: row → Fact ----------------------------------------------------------------------------


def _answers(row: dict) -> tuple[str, ...]:
    if "answers" in row:
        answers = row["answers"]
        if isinstance(answers, str) or not isinstance(answers, list):
            raise DatasetError("answers must be a list of strings")
    elif "target" in row:
        answers = [row["target"]]
    else:
        raise DatasetError("missing field 'target' (or 'answers')")
    cleaned = []
    for answer in answers:
        if not isinstance(answer, str) or not answer.strip():
            raise DatasetError(f"empty target in answers {answers!r}")
        cleaned.append(answer.lstrip(" "))  # " Paris" (ROME style) and "Paris" mean the same
    return tuple(cleaned)


def _prompt(row: dict, subject: str) -> tuple[str, str | None]:
    if "prompt" in row:
        return str(row["prompt"]), row.get("template")
    if "template" in row:
        template = str(row["template"]).replace("{subject}", "{}")
        if template.count("{}") != 1:
            raise DatasetError(f"template {row['template']!r} needs exactly one {{}} or {{subject}}")
        return template.replace("{}", subject), template.replace("{}", "{subject}")
    raise DatasetError("missing field 'prompt' (or 'template')")


def _plain_fact(row: dict, default_id: str) -> Fact:
    subject = row["subject"]
    if not isinstance(subject, str):
        raise DatasetError("subject must be a string")
    prompt, template = _prompt(row, subject)
    extra = {k: v for k, v in row.items() if k not in _KNOWN_COLUMNS}
    return Fact(
        fact_id=str(row.get("fact_id", default_id)),
        subject=subject,
        prompt=prompt,
        answers=_answers(row),
        relation=str(row.get("relation", "")),
        template=template,
        description=row.get("description"),
        attributes=extra,
    )


def _known_fact(row: dict, default_id: str) -> Fact:
    """ROME ``known_1000.json`` record."""
    template = row.get("template", "").replace("{}", "{subject}") or None
    return Fact(
        fact_id=f"known_{row['known_id']}",
        subject=row["subject"],
        prompt=row["prompt"],
        answers=_answers({"target": row["attribute"]}),
        relation=str(row.get("relation_id", "")),
        template=template,
        attributes={k: v for k, v in row.items() if k == "prediction"},
    )


def _counterfact_fact(row: dict, default_id: str) -> Fact:
    """CounterFact record: the true fact, with the counterfactual target kept as an attribute."""
    rewrite = row["requested_rewrite"]
    subject, template = rewrite["subject"], rewrite["prompt"]
    if template.count("{}") != 1:
        raise DatasetError(f"requested_rewrite.prompt {template!r} needs exactly one {{}}")
    extras = ("paraphrase_prompts", "neighborhood_prompts", "attribute_prompts", "generation_prompts")
    return Fact(
        fact_id=f"cf_{row['case_id']}",
        subject=subject,
        prompt=template.format(subject),
        answers=_answers({"target": rewrite["target_true"]["str"]}),
        relation=str(rewrite.get("relation_id", "")),
        template=template.replace("{}", "{subject}"),
        attributes={"target_new": rewrite["target_new"]["str"], **{k: row[k] for k in extras if k in row}},
    )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
