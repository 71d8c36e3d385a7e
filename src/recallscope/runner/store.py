"""The result store: one folder per run, written so that a kill at any moment loses nothing.

Layout of ``DIR`` (the output contract, documented in the README and ``docs/outputs.md``)::

    manifest.json                 provenance, job, methods and configs, facts, skipped, timings
    facts.parquet                 the facts analysed (fact_id, relation, subject, prompt, target …)
    results/<method>.parquet      tidy rows of every fact, in dataset order
    results/<method>.<table>.parquet   extra tidy tables (e.g. ``logit_lens.topk``)
    results/<method>.safetensors  named arrays, keyed ``"<fact_id>/<name>"``
    chunks/<method>-<key>/        finished work units: ``<first>-<hash>.parquet`` (+ tables, arrays),
                                  ``<first>-<hash>.json``, written last, which marks the chunk as done
    figures/, report.html         written by :mod:`recallscope.report`

Every file is written to a temporary name and renamed (atomic on POSIX), so a reader sees either
the old or the new file. A chunk counts as done only once its ``.json`` exists; its key hashes the
method, the config (with dataset-wide calibrations such as the noise level) and the model, so a
re-run with other settings never mixes results. The record lists each file of the chunk with its
size and SHA-256, checked before the chunk is used: a chunk whose files are missing, cut short or
altered, or whose record is not valid JSON, is reported by path, moved aside to ``corrupt/`` and
its facts are computed again. So are a ``known.json`` or ``one_to_many.json`` that does not parse.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from recallscope.errors import RecallscopeError

__all__ = ["Store", "atomic_write", "utc_now", "parse_json", "BROKEN", "file_digest"]


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` then rename ``tmp`` to ``path``: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_json(path: Path, value: Any) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(value, indent=2, default=_jsonable) + "\n"))


def _jsonable(value: Any) -> Any:
    torch = sys.modules.get("torch")  # (a tensor exists only once torch is imported)
    if isinstance(value, np.generic) or (torch is not None and isinstance(value, torch.Tensor)):
        return value.tolist() if hasattr(value, "tolist") else value.item()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    return repr(value)


def _write_parquet(path: Path, frame: pd.DataFrame) -> None:
    atomic_write(path, lambda p: frame.to_parquet(p, index=False))


def _write_arrays(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    tensors = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    atomic_write(path, lambda p: save_file(tensors, str(p)))


def file_digest(path: Path) -> list:
    """``[bytes, sha256]`` of a file, as chunk records list them."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return [path.stat().st_size, digest.hexdigest()]


def utc_now() -> str:
    """The time now, UTC, ISO 8601 to the second (what the manifest and records say)."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


class Store:
    """Read and write the files of one run folder.

    ``log``: where the store reports a damaged file it moved aside (default: standard error);
    ``repairs`` lists them (``{"path", "why", "moved_to"}``), and the runner keeps them in the
    manifest. ``read_only`` (``recallscope plan``): a damaged file is reported and left out, but
    never moved.
    """

    def __init__(
        self, root: str | os.PathLike, log: Callable[[str], None] | None = None, *, read_only: bool = False
    ) -> None:
        self.root = Path(root)
        self.log = log or _stderr
        self.read_only = read_only
        self.repairs: list[dict[str, str]] = []
        self._checked: dict[Path, tuple] = {}

    # -- paths ---------------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def results_path(self, method: str, table: str | None = None, suffix: str = "parquet") -> Path:
        name = method if table is None else f"{method}.{table}"
        return self.root / "results" / f"{name}.{suffix}"

    def chunk_dir(self, method: str, key: str) -> Path:
        return self.root / "chunks" / f"{method}-{key}"

    # -- manifest and facts --------------------------------------------------------------------------
    def read_manifest(self) -> dict[str, Any]:
        """The manifest (``{}`` when there is none); one that does not parse is an error naming it."""
        if not self.manifest_path.exists():
            return {}
        value = parse_json(self.manifest_path)
        if not isinstance(value, dict):
            raise RecallscopeError(
                f"{self.manifest_path} is not a recallscope manifest (not valid JSON, or cut short); "
                "re-run `recallscope run` with the same flags to rebuild it from the stored chunks"
            )
        return value

    def write_manifest(self, manifest: Mapping[str, Any]) -> None:
        _write_json(self.manifest_path, manifest)

    def write_facts(self, frame: pd.DataFrame) -> None:
        _write_parquet(self.root / "facts.parquet", frame)

    def read_facts(self) -> pd.DataFrame:
        return pd.read_parquet(self.root / "facts.parquet")

    def read_json(self, name: str) -> Any:
        """The JSON file ``name`` of the folder, or None when absent; one that does not parse (a
        cache such as ``known.json``) is moved aside and reported, and None returned: it is rebuilt.
        """
        path = self.root / name
        if not path.exists():
            return None
        value = parse_json(path)
        if value is BROKEN:
            self.quarantine(path, "not valid JSON (cut short?)")
            return None
        return value

    def write_json(self, name: str, value: Any) -> None:
        _write_json(self.root / name, value)

    def quarantine(self, path: Path, why: str, *, with_files: Iterable[Path] = ()) -> Path:
        """Move the damaged file ``path`` (and ``with_files``, the rest of its chunk) aside to
        ``corrupt/`` beside it, and say so; return where ``path`` went (a read-only store only says so).
        """
        folder = path.parent / "corrupt"
        if self.read_only:
            self.log(
                f"recallscope: {path} is damaged ({why}); a run will move it aside and do its work again"
            )
            return path
        folder.mkdir(parents=True, exist_ok=True)
        stamp = dt.datetime.now().strftime("%Y%m%dT%H%M%S%f")
        moved = {p: folder / f"{p.name}.{stamp}" for p in dict.fromkeys([path, *with_files]) if p.exists()}
        for source, target in moved.items():
            os.replace(source, target)
        self.repairs.append({"path": str(path), "why": why, "moved_to": str(moved.get(path, folder))})
        self.log(f"recallscope: {path} is damaged ({why}); moved to {folder}/, its work is done again")
        return moved.get(path, folder)

    # -- chunks --------------------------------------------------------------------------------------
    def write_chunk(
        self,
        method: str,
        key: str,
        name: str,
        frame: pd.DataFrame,
        tables: Mapping[str, pd.DataFrame],
        arrays: Mapping[str, np.ndarray],
        record: Mapping[str, Any],
        handover: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Write chunk ``name``; its ``record`` (fact ids, skipped facts, time …) goes last.

        ``handover``: arrays that methods reusing this result read (``<name>.handover.safetensors``,
        never combined into ``results/``).
        """
        folder = self.chunk_dir(method, key)
        paths = [folder / f"{name}.parquet", *(folder / f"{name}.{t}.parquet" for t in tables)]
        _write_parquet(paths[0], frame)
        for path, table in zip(paths[1:], tables.values(), strict=True):
            _write_parquet(path, table)
        paths.append(folder / f"{name}.safetensors")
        _write_arrays(paths[-1], arrays)
        if handover:
            paths.append(folder / f"{name}.handover.safetensors")
            _write_arrays(paths[-1], handover)
        files = {p.name: file_digest(p) for p in paths}
        _write_json(
            folder / f"{name}.json", {**record, "name": name, "tables": sorted(tables), "files": files}
        )

    def chunk_records(self, method: str, key: str) -> list[dict[str, Any]]:
        """Records of the finished, intact chunks of ``method`` under ``key``, in chunk order (a
        damaged one is moved aside: :meth:`quarantine`).
        """
        folder = self.chunk_dir(method, key)
        records = []
        for path in sorted(folder.glob("*.json")):
            record = parse_json(path)
            why = (
                "not valid JSON (cut short?)" if not isinstance(record, dict) else self._damage(path, record)
            )
            if why is None:
                records.append(record)
            else:
                self.quarantine(path, why, with_files=folder.glob(f"{path.name[: -len('.json')]}.*"))
        return records

    def _damage(self, path: Path, record: Mapping[str, Any]) -> str | None:
        """What is wrong with the files of the chunk recorded at ``path`` (None: nothing). Checksums
        are computed again only when a file of the chunk changed (time or size) since the last check.
        """
        stem = path.name[: -len(".json")]
        seen = tuple(
            (p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(path.parent.glob(f"{stem}.*"))
        )
        if self._checked.get(path) == seen:
            return None
        files = record.get("files")
        if files is None:  # a record of recallscope 0.1 lists no files: they must at least open
            why = _unreadable(path.parent, record)
        else:
            why = next((w for name, e in files.items() if (w := _mismatch(path.parent / name, e))), None)
        if why is None:
            self._checked[path] = seen
        return why

    def valid_records(self, method: str, key: str, facts: Mapping[str, str]) -> list[dict[str, Any]]:
        """Finished chunk records, each with ``valid``: its facts still in ``facts`` unchanged.

        ``facts`` maps the current fact ids to their content digests; a fact whose prompt or answers
        changed since its chunk was written (same id, other digest) is not valid, and is redone.
        """
        records = []
        for record in self.chunk_records(method, key):
            digests = record.get("digests", {})
            ids = [*record["fact_ids"], *(fact_id for fact_id, _ in record["skipped"])]
            valid = {i for i in ids if i in facts and digests.get(i) == facts[i]}
            if valid:
                records.append({**record, "valid": valid})
        return records

    def done_facts(self, method: str, key: str, facts: Mapping[str, str]) -> set[str]:
        """Ids of the facts in ``facts`` already analysed (or skipped with a reason)."""
        return set().union(*(r["valid"] for r in self.valid_records(method, key, facts)))

    def combine(self, method: str, key: str, facts: Mapping[str, str]) -> dict[str, int]:
        """Merge the chunks into ``results/<method>.*``: the rows of ``facts``, in their order.

        Rows of facts no longer in ``facts`` (an earlier run with other facts) or changed since are
        left out; handover arrays stay in ``chunks/``.
        """
        rows = self.read_rows(method, key, facts, facts, handover=False)
        rank = {fact_id: i for i, fact_id in enumerate(facts)}
        sizes = {}
        for table, frame in [(None, rows["frame"]), *sorted(rows["tables"].items())]:
            frame = _sorted_by_fact(frame, rank)
            _write_parquet(self.results_path(method, table), frame)
            sizes[table or "rows"] = len(frame)
        arrays = rows["arrays"]
        ordered = sorted(arrays, key=lambda k: (rank[k.rsplit("/", 1)[0]], k))
        _write_arrays(self.results_path(method, suffix="safetensors"), {k: arrays[k] for k in ordered})
        return sizes

    def read_rows(
        self, method: str, key: str, facts: Mapping[str, str], wanted: Iterable[str], *, handover: bool = True
    ) -> dict[str, Any]:
        """The stored rows of the facts ``wanted`` (still valid under the digests ``facts``) in the
        chunks of ``method`` under ``key``: ``fact_ids``, ``frame``, ``tables`` (by name),
        ``arrays`` (with the chunks' handover arrays unless ``handover`` is false) and ``skipped``.
        """
        wanted = set(wanted)
        folder = self.chunk_dir(method, key)
        frames: list[pd.DataFrame] = []
        tables: dict[str, list[pd.DataFrame]] = {}
        found: dict[str, Any] = {"fact_ids": [], "arrays": {}, "skipped": []}
        for r in self.valid_records(method, key, facts):
            ids = r["valid"] & wanted
            if not ids:
                continue
            frames.append(_only(pd.read_parquet(folder / f"{r['name']}.parquet"), ids))
            for table in r["tables"]:
                tables.setdefault(table, []).append(
                    _only(pd.read_parquet(folder / f"{r['name']}.{table}.parquet"), ids)
                )
            for suffix in ("safetensors", "handover.safetensors")[: 2 if handover else 1]:
                path = folder / f"{r['name']}.{suffix}"
                named = load_file(str(path)) if path.exists() else {}
                found["arrays"].update({k: v for k, v in named.items() if k.rsplit("/", 1)[0] in ids})
            found["fact_ids"] += [f for f in r["fact_ids"] if f in ids]
            found["skipped"] += [s for s in r["skipped"] if s[0] in ids]
        join = lambda parts: pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()  # noqa: E731
        return {**found, "frame": join(frames), "tables": {t: join(parts) for t, parts in tables.items()}}

    # -- reading results -----------------------------------------------------------------------------
    def methods(self) -> list[str]:
        """Methods with combined results, in manifest order."""
        listed = list(self.read_manifest().get("methods", {}))
        return [m for m in listed if self.results_path(m).exists()]

    def read_table(self, method: str, table: str | None = None) -> pd.DataFrame:
        path = self.results_path(method, table)
        return pd.read_parquet(path) if path.exists() else pd.DataFrame()

    def read_arrays(self, method: str, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        arrays = load_file(str(self.results_path(method, suffix="safetensors")))
        return arrays if keys is None else {k: arrays[k] for k in keys}


def _mismatch(path: Path, expected: list) -> str | None:
    """Why the chunk file ``path`` is not the one its record lists (``[bytes, sha256]``), if it is not."""
    if not path.exists():
        return f"{path.name} is missing"
    if file_digest(path) != list(expected):
        return f"{path.name} does not match the size and checksum its record lists"
    return None


def _unreadable(folder: Path, record: Mapping[str, Any]) -> str | None:
    """What keeps the files of an old ``record`` (which lists no checksums) from opening, if anything."""
    names = [
        f"{record['name']}.parquet",
        *(f"{record['name']}.{t}.parquet" for t in record.get("tables", ())),
    ]
    try:
        for name in names:
            pq.read_metadata(folder / name)
        with safe_open(str(folder / f"{record['name']}.safetensors"), "np"):
            pass
    except Exception as err:  # noqa: BLE001 (pyarrow, safetensors and the OS each raise their own)
        return f"a file does not open: {type(err).__name__}: {err}"
    return None


BROKEN = object()
"""What :func:`parse_json` returns for a file that is not valid JSON."""


def parse_json(path: Path) -> Any:
    """The JSON value in the file ``path``, or :data:`BROKEN` when it does not parse."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return BROKEN


def _only(frame: pd.DataFrame, fact_ids: set[str]) -> pd.DataFrame:
    return frame[frame["fact_id"].isin(fact_ids)] if "fact_id" in frame else frame


def _sorted_by_fact(frame: pd.DataFrame, rank: Mapping[str, int]) -> pd.DataFrame:
    if frame.empty or "fact_id" not in frame:
        return frame
    order = frame["fact_id"].map(rank).to_numpy()
    return frame.iloc[np.argsort(order, kind="stable")].reset_index(drop=True)
