"""The run folder has one owner: one job, one process at a time, and nothing else written into.

:func:`claim` runs before the model loads. It makes sure ``--out`` can be written; refuses a
non-empty folder that is not a recallscope run (recallscope never writes into someone else's
files); refuses a run folder that holds another job (other facts or flags), unless ``overwrite``
asks to replace it (:data:`REPLACED`); and holds ``.recallscope.lock`` for the whole run, so that
a second process on the same folder is refused with who holds it. A lock held by a process that died is
free again (the operating system releases it), so a killed run resumes without any cleanup.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from recallscope.errors import RecallscopeError
from recallscope.runner.store import Store, parse_json, utc_now

try:
    import fcntl
except ImportError:  # pragma: no cover (Windows: no advisory locks; the folder checks still hold)
    fcntl = None

__all__ = ["claim", "LOCK", "IDENTITY", "RUN_FILES", "REPLACED"]

LOCK = ".recallscope.lock"
RUN_FILES = frozenset(
    {
        "manifest.json",
        "facts.parquet",
        "results",
        "chunks",
        "figures",
        "report.html",
        "scorecard.parquet",
        "known.json",
        "one_to_many.json",
        "corrupt",
        LOCK,
    }
)
"""What recallscope writes in a run folder."""

IDENTITY = {
    "model": "--model",
    "dataset": "--dataset",
    "methods": "--methods",
    "limit": "--limit",
    "known_only": "--known-only/--all-facts",
    "dtype": "--dtype",
    "seed": "--seed",
    "shots": "--shots",
    "configs": "--config",
}
"""The job fields that decide which facts are analysed and what is computed, with their flags. The
others (device, device map, executor, workers, batch size) say where and how fast, and may change
when a run is resumed.
"""


@contextmanager
def claim(job, store: Store, *, overwrite: bool = False) -> Iterator[None]:
    """Hold ``job.out`` for ``job`` while the block runs (see the module's docstring)."""
    folder = Path(job.out)
    if folder.is_dir():
        _refuse_foreign(folder, store)  # before anything is written there, even a lock
    _make_writable(folder)
    with _lock(folder):
        manifest = _owner(folder, job, store, overwrite)
        if manifest is None:
            store.write_manifest(_stub(job))
        yield


def _make_writable(folder: Path) -> None:
    """Create ``folder`` if needed and check that files can be written in it."""
    if folder.exists() and not folder.is_dir():
        raise RecallscopeError(f"--out {folder} is a file, not a folder: give a folder's path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".recallscope-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise RecallscopeError(
            f"--out {folder}: cannot write there ({err.strerror or err}); choose a folder you can write "
            "to, e.g. --out ~/recallscope-runs/NAME"
        ) from None


@contextmanager
def _lock(folder: Path) -> Iterator[None]:
    """Hold ``folder/.recallscope.lock`` (an advisory lock the OS drops when the process ends)."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(folder / LOCK, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise RecallscopeError(
                f"--out {folder} is in use: {holder}. Wait until that run ends, or give another --out"
            ) from None
        handle.seek(0)
        handle.truncate()
        command = " ".join(["recallscope", *sys.argv[1:]]) if sys.argv[1:] else "recallscope (Python)"
        handle.write(f"process {os.getpid()} on {socket.gethostname()} since {utc_now()} ({command})\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _owner(folder: Path, job, store: Store, overwrite: bool) -> dict[str, Any] | None:
    """The folder's manifest when it is a run of ``job`` (None: a new or restarted run folder);
    refuse anything else.
    """
    _refuse_foreign(folder, store)
    if not _entries(folder):
        return None
    if overwrite:
        _clear(folder)
        return None
    manifest = _parse(store.manifest_path)
    if not _ours(manifest):
        if store.manifest_path.exists():
            store.quarantine(store.manifest_path, "not valid JSON (cut short?)")
        return None
    changed = _differences(manifest.get("job", {}), job.to_dict())
    if changed:
        raise RecallscopeError(
            f"--out {folder} holds a run of another job ({'; '.join(changed)}). Give a new --out for this "
            "job, or add --overwrite to replace that run by this one in this folder"
        )
    return manifest


def _refuse_foreign(folder: Path, store: Store) -> None:
    """Refuse a non-empty ``folder`` that is not a recallscope run (this only reads)."""
    entries = _entries(folder)
    if not entries:
        return
    manifest = _parse(store.manifest_path)
    # a run cut short before it wrote a manifest, or whose manifest is damaged, holds only our files
    remains = not isinstance(manifest, dict) and set(entries) <= RUN_FILES and bool(set(entries) & _EVIDENCE)
    if not (_ours(manifest) or remains):
        shown = ", ".join(entries[:6]) + (", ..." if len(entries) > 6 else "")
        raise RecallscopeError(
            f"--out {folder} is not empty and is not a recallscope run folder (it holds {shown}); "
            "recallscope does not write into it: give a new or empty folder"
        )


def _ours(manifest: Any) -> bool:
    """Whether a parsed ``manifest.json`` is one recallscope wrote."""
    return isinstance(manifest, dict) and {"recallscope", "job"} <= set(manifest)


def _entries(folder: Path) -> list[str]:
    """The names in ``folder``, but for the lock and the write probe."""
    return sorted(
        p.name for p in folder.iterdir() if p.name != LOCK and not p.name.startswith(".recallscope-")
    )


_EVIDENCE = frozenset({"chunks", "facts.parquet", "known.json", "one_to_many.json"})
"""Files only a recallscope run writes: with them, a folder without a readable manifest is a run."""


def _parse(path: Path) -> Any:
    """The JSON value in ``path``; None when there is no such file (or :data:`BROKEN`)."""
    return parse_json(path) if path.exists() else None


def _differences(stored: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """``"--limit: 3 there, 8 now"`` for each identity field that differs."""

    def plain(value: Any) -> Any:
        return json.loads(json.dumps(value, default=list, sort_keys=True))

    return [
        f"{flag}: {_shown(stored.get(name))} there, {_shown(now.get(name))} now"
        for name, flag in IDENTITY.items()
        if plain(stored.get(name)) != plain(now.get(name))
    ]


def _shown(value: Any) -> str:
    text = json.dumps(value, default=list, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


REPLACED = ("manifest.json", "facts.parquet", "results", "figures", "report.html", "scorecard.parquet")
"""What ``--overwrite`` deletes: the old run's outputs. Its caches stay, since each entry is keyed by
the content it was computed from (chunks by method settings, model and fact content, verdicts by
fact content): a new job uses only what still applies, so growing a run does not redo its facts.
"""


def _clear(folder: Path) -> None:
    """Remove the old run's outputs from ``folder`` (``--overwrite``), and nothing else."""
    for name in REPLACED:
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _stub(job) -> dict[str, Any]:
    """The manifest of a run that has not selected its facts yet: it marks the folder as this job's."""
    from recallscope import __version__

    return {"recallscope": __version__, "job": job.to_dict(), "status": "preparing", "started": utc_now()}
