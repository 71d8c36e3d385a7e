"""``load_model``: one entry point for the embedded model, hub ids, local folders, GGUF files
and already-built transformers models.

Loading never reaches the network when the model is on this machine: we first ask transformers
for local files only, and go online only if that fails and ``HF_HUB_OFFLINE`` is not set.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from recallscope.defaults import DEFAULT_MODEL
from recallscope.errors import ModelNotAvailableError
from recallscope.models.gguf import EMBEDDED_MODELS, cached_gguf_dir, embedded_gguf_path
from recallscope.models.model import BosPolicy, Model, ModelInfo

__all__ = ["load_model", "DEFAULT_MODEL", "resolve_dtype", "check_model_source"]

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float64": torch.float64,
    "fp64": torch.float64,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """``None`` → float32 (analyses default to full precision); names like ``"bf16"`` accepted."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def load_model(
    name_or_path: str | os.PathLike | nn.Module = DEFAULT_MODEL,
    *,
    tokenizer: Any = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    offload_folder: str | os.PathLike | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    bos: BosPolicy = "tokenizer",
    validate: bool = True,
) -> Model:
    """Load a causal LM and wrap it in a :class:`Model`.

    Its architecture spec is discovered from the module tree (``recallscope.models.discover``) and,
    with ``validate`` (the default), checked by :func:`recallscope.check_model` before it is
    returned: a model whose spec fails a check is refused with the check and modules named.

    Args:
        name_or_path: ``"smollm2-135m"`` (the embedded default), a Hugging Face hub id, a local
            model folder, a local ``.gguf`` file, or an already-built ``*ForCausalLM`` (then pass
            ``tokenizer`` too).
        tokenizer: tokenizer for an already-built model (loaded with the model otherwise).
        dtype: weights dtype; default float32.
        device: where to put the model; default ``"cuda"`` when available, else ``"cpu"``.
            Ignored when ``device_map`` is given.
        device_map: spread the model over devices with accelerate, for models larger than one
            device: ``"auto"``, ``"balanced"``, ``"sequential"`` or an explicit
            ``{module name: device}`` (devices ``0``, ``"cuda:1"``, ``"cpu"``, ``"disk"``). Every
            method works on such a model and gives the numbers of the undivided one.
        max_memory: with ``device_map``, the memory each device may hold, e.g.
            ``{0: "20GiB", "cpu": "60GiB"}``; what does not fit goes to disk.
        offload_folder: where weights offloaded to disk are kept (default: a folder in
            recallscope's cache).
        revision: hub branch, tag or commit.
        trust_remote_code: allow custom modeling code from the hub (off by default).
        attn_implementation: ``"sdpa"`` (default where supported) or ``"eager"``.
        bos: BOS policy, see :class:`Model`.
        validate: run the conformance checks first (off only to inspect a failing model, e.g.
            with ``check_model``).

    Raises:
        ModelNotAvailableError: the model is not on this machine and cannot be downloaded.
        UnsupportedModelError: the architecture is not supported.
    """
    torch_dtype = resolve_dtype(dtype)
    placement = _placement_kwargs(device_map, max_memory, offload_folder)
    if isinstance(name_or_path, nn.Module):
        hf_model = _dispatch(name_or_path, **placement) if placement else name_or_path
        model = Model(hf_model, tokenizer, info=ModelInfo(_model_label(name_or_path), "object"), bos=bos)
        return _validated(model if device is None or placement else _move(model, device), validate)
    name = os.fspath(name_or_path)
    kwargs = dict(
        dtype=torch_dtype,
        trust_remote_code=trust_remote_code,
        attn_implementation=attn_implementation,
        **placement,
    )
    if name in EMBEDDED_MODELS:
        folder, sha = cached_gguf_dir(embedded_gguf_path(name))
        info = ModelInfo(name, "embedded", file_sha256=sha)
        hf_model, tok = _from_pretrained(str(folder), name, local=True, **kwargs)
    elif name.endswith(".gguf"):
        check_model_source(name)
        path = Path(name)
        folder, sha = cached_gguf_dir(path)
        info = ModelInfo(name, "gguf", file_sha256=sha)
        hf_model, tok = _from_pretrained(str(folder), name, local=True, **kwargs)
    else:
        check_model_source(name)
        local = Path(name).is_dir()
        hf_model, tok = _from_pretrained(name, name, local=local, revision=revision, **kwargs)
        commit = getattr(hf_model.config, "_commit_hash", None)
        info = ModelInfo(name, "local" if local else "hub", revision=commit or revision)
    model = Model(hf_model, tokenizer or tok, info=info, bos=bos)
    if device_map is None:
        model = _move(model, device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return _validated(model, validate)


def check_model_source(name: str) -> None:
    """Refuse, before anything loads, a model name that is a path to nothing usable: a missing
    ``.gguf`` file, a missing folder, or a folder without ``config.json``. Hub ids (``org/name``)
    and embedded names pass (whether a hub id is available is known only when it loads).
    """
    if name in EMBEDDED_MODELS:
        return
    path = Path(name).expanduser()
    usage = (
        "--model takes 'smollm2-135m' (embedded), a Hugging Face id such as 'HuggingFaceTB/SmolLM2-135M', "
        "a local model folder (from save_pretrained or `hf download --local-dir`) or a .gguf file"
    )
    if name.endswith(".gguf"):
        if not path.is_file():
            raise ModelNotAvailableError(f"model {name!r}: no such GGUF file. {usage}")
        return
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotAvailableError(
                f"model {name!r}: the folder has no config.json, so it is not a saved model. {usage}"
            )
        return
    looks_like_path = (
        name.startswith(("/", "~", ".")) or name.endswith("/") or name.count("/") > 1 or "\\" in name
    )
    if looks_like_path:
        raise ModelNotAvailableError(f"model {name!r}: no such folder or file. {usage}")


def _validated(model: Model, validate: bool) -> Model:
    """Run the conformance checks before any method can run (once per model file and software
    versions: the verdict is cached when the weights are identified by a hash or a revision).
    """
    if not validate:
        return model
    from recallscope.check import validate as check
    from recallscope.models.gguf import cache_dir

    key = _validation_key(model)
    marker = None if key is None else cache_dir() / "checks" / f"{key}.ok"
    if marker is not None and marker.exists():
        return model
    check(model)
    if marker is not None:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    return model


def _validation_key(model: Model) -> str | None:
    info = model.info
    if info.file_sha256 is None and info.revision is None:
        return None
    prov = model.provenance()
    fields = [info.name, info.file_sha256, info.revision, prov["model_class"], prov["dtype"]]
    fields += [model.device.type, prov["attn_implementation"], json.dumps(prov["versions"], sort_keys=True)]
    return hashlib.sha256("\n".join(map(str, fields)).encode()).hexdigest()[:32]


def _placement_kwargs(device_map, max_memory, offload_folder) -> dict[str, Any]:
    """The accelerate arguments of a device map (empty without one)."""
    if device_map is None:
        if max_memory is not None or offload_folder is not None:
            raise ValueError("max_memory and offload_folder apply only with a device_map (e.g. 'auto')")
        return {}
    if isinstance(device_map, str) and device_map not in _DEVICE_MAPS:
        raise ValueError(
            f"unknown device_map {device_map!r}: expected one of {', '.join(_DEVICE_MAPS)} or a "
            "{module name: device} mapping"
        )
    if offload_folder is None:
        offload_folder = _scratch_offload_folder()
    kwargs = {"device_map": device_map, "offload_folder": str(offload_folder)}
    return kwargs if max_memory is None else {**kwargs, "max_memory": max_memory}


def _scratch_offload_folder() -> Path:
    """A fresh folder in recallscope's cache for weights offloaded to disk, removed at exit."""
    from recallscope.models.gguf import cache_dir

    root = cache_dir() / "offload"
    root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=root))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


_DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def _dispatch(hf_model: nn.Module, device_map, offload_folder: str, max_memory=None) -> nn.Module:
    """Spread an already-built model over devices (``device_map`` as for ``from_pretrained``)."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if isinstance(device_map, str):
        no_split = getattr(hf_model, "_no_split_modules", None) or []
        if device_map != "sequential":
            max_memory = get_balanced_memory(hf_model, max_memory, no_split_module_classes=no_split)
        device_map = infer_auto_device_map(hf_model, max_memory, no_split_module_classes=no_split)
    return dispatch_model(hf_model, device_map, offload_dir=offload_folder)


def _model_label(hf_model: nn.Module) -> str:
    return getattr(hf_model.config, "_name_or_path", "") or type(hf_model).__name__


def _move(model: Model, device: str | torch.device) -> Model:
    model.hf_model.to(device)
    return model


def _from_pretrained(source: str, name: str, *, local: bool, **kwargs: Any) -> tuple[nn.Module, Any]:
    """Load model and tokenizer, offline first; wrap "not found" into a clear error."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    tok_kwargs = {k: kwargs[k] for k in ("revision", "trust_remote_code") if k in kwargs}
    attempts = [True] if local or _offline() else [True, False]
    error: Exception | None = None
    for local_only in attempts:
        try:
            hf_model = AutoModelForCausalLM.from_pretrained(source, local_files_only=local_only, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only, **tok_kwargs)
            return hf_model, tokenizer
        except (OSError, ValueError) as err:  # transformers reports missing files as OSError
            if local:
                raise
            error = err
    raise ModelNotAvailableError(
        f"model {name!r} is not available on this machine"
        + ("" if _offline() else " and could not be downloaded")
        + f" ({str(error).splitlines()[0]}).\nTo use it offline: on a machine with internet run "
        f"`hf download {name}` (it fills the Hugging Face cache, ~/.cache/huggingface), then copy "
        "that cache here, or pass the path of a local model folder. recallscope's embedded model "
        "needs no download: load_model('smollm2-135m')."
    ) from None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
