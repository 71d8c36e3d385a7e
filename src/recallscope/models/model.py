"""``Model``: a native Hugging Face causal LM, its tokenizer and its architecture spec.

The wrapper adds no modules and converts no weights: ``model.hf_model`` is the transformers model
itself, and every primitive in ``recallscope.core`` works through PyTorch hooks on its modules.
Weights are exposed in one canonical layout whatever the family (``methods.md`` §0.3)::

    W_U [d_vocab, d_model]   W_E [d_vocab, d_model]
    W_O(layer) [n_heads, d_head, d_model]     W_out(layer) [d_mlp, d_model]
    W_in(layer), W_gate(layer) [d_model, d_mlp]

Those weights and the norms' parameters are read by the methods ``Model`` takes from
``models.weights``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import platform
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn

from recallscope.errors import SiteError
from recallscope.models.families import get_module, spec_for
from recallscope.models.offload import OffloadedWeights, accelerate_hooks
from recallscope.models.spec import ArchSpec
from recallscope.models.weights import NormParams, _CanonicalWeights

__all__ = ["Model", "ModelInfo", "NormParams", "BosPolicy"]

BosPolicy = Literal["tokenizer", "never", "always"]


@dataclass(frozen=True)
class ModelInfo:
    """Provenance of a loaded model, recorded in every result."""

    name: str
    """What the user asked for (``"smollm2-135m"``, a hub id, a path)."""
    source: str
    """``embedded``, ``hub``, ``local``, ``gguf`` or ``object``."""
    revision: str | None = None
    """Hub commit hash, when known."""
    file_sha256: str | None = None
    """SHA-256 of the weights file (GGUF sources)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Model(_CanonicalWeights):
    """A transformers causal LM with its tokenizer and :class:`ArchSpec`.

    Args:
        hf_model: a ``*ForCausalLM`` from transformers; it is put in eval mode.
        tokenizer: its tokenizer (may be None for models used only with token ids).
        info: provenance of the weights.
        bos: how prompts start: ``"tokenizer"`` (whatever the tokenizer adds by default),
            ``"never"`` or ``"always"`` (prepend ``tokenizer.bos_token`` if it does not).
    """

    def __init__(
        self,
        hf_model: nn.Module,
        tokenizer: Any = None,
        *,
        info: ModelInfo | None = None,
        bos: BosPolicy = "tokenizer",
    ) -> None:
        self.hf_model = hf_model.eval()
        self.tokenizer = tokenizer
        self.spec: ArchSpec = spec_for(hf_model)
        self.info = info or ModelInfo(name=type(hf_model).__name__, source="object")
        if bos not in ("tokenizer", "never", "always"):
            raise ValueError(f"bos must be 'tokenizer', 'never' or 'always', got {bos!r}")
        self.bos: BosPolicy = bos
        dims = self.spec.dims
        self.n_layers, self.n_heads, self.n_kv_heads = dims.n_layers, dims.n_heads, dims.n_kv_heads
        self.d_model, self.d_head, self.d_mlp, self.d_vocab = (
            dims.d_model,
            dims.d_head,
            dims.d_mlp,
            dims.d_vocab,
        )

    def __reduce__(self):
        """Pickle as config, weights and tokenizer (e.g. to send a model object to Ray workers).

        The transformers module itself may not pickle (hooks transformers installs to capture
        outputs hold context variables); the copy is rebuilt from its config and state dict.
        """
        if self.device_map is not None:
            raise TypeError(
                "a model spread over devices with a device map cannot be pickled (its weights sit "
                "in accelerate's offload store): load it by name in each process instead"
            )
        state = {k: v.detach().cpu() for k, v in self.hf_model.state_dict().items()}
        hf = (type(self.hf_model), self.hf_model.config, state, str(self.device))
        return _rebuild, (hf, self.tokenizer, self.info, self.bos)

    def __repr__(self) -> str:
        return (
            f"Model({self.info.name!r}, family={self.spec.family!r}, n_layers={self.n_layers}, "
            f"n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, d_model={self.d_model}, "
            f"d_mlp={self.d_mlp}, d_vocab={self.d_vocab}, dtype={self.dtype})"
        )

    # -- properties ---------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.module(self.spec.unembed).weight.dtype

    @property
    def device(self) -> torch.device:
        """Device of the input embedding (where token ids must go).

        With an accelerate device map that offloads the embedding, this is the device it runs on.
        """
        return self._weights.device_of(get_module(self.hf_model, self.spec.embed))

    @property
    def device_map(self) -> dict[str, str] | None:
        """Where accelerate placed each module (``{"model.layers.3": "cuda:0" | "cpu" | "disk"}``),
        or None for a model on one device.
        """
        placed = getattr(self.hf_model, "hf_device_map", None)
        return None if not placed else {k: str(v) for k, v in placed.items()}

    @property
    def attn_implementation(self) -> str:
        return self.hf_model.config._attn_implementation

    @property
    def max_context(self) -> int | None:
        """Longest input the model accepts (positions), when its config says."""
        config = self.hf_model.config
        for key in ("max_position_embeddings", "n_positions", "n_ctx"):
            value = getattr(config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    @property
    def n_groups(self) -> int:
        """Query heads per key/value head, when every block has as many key/value heads (else
        :class:`SiteError`: use :meth:`n_groups_at`).
        """
        counts = {self.n_kv_heads_at(layer) for layer in range(self.n_layers)}
        if len(counts) > 1:
            raise SiteError(
                f"{self.spec.family}: blocks have {sorted(counts)} key/value heads, so query heads per "
                "key/value head differ by block: use n_groups_at(layer)"
            )
        return self.n_heads // counts.pop()

    def n_kv_heads_at(self, layer: int) -> int:
        """Key/value heads of block ``layer`` (``n_kv_heads`` is the most any block has)."""
        return self.spec.n_kv_heads_at(self.check_layer(layer))

    def d_head_at(self, layer: int) -> int:
        """Width of block ``layer``'s heads (``d_head`` is the widest; narrower blocks' ``z``, ``v``,
        ``W_O`` and ``W_V`` are padded with features that are zero).
        """
        return self.spec.d_head_at(self.check_layer(layer))

    def n_groups_at(self, layer: int) -> int:
        """Query heads per key/value head in block ``layer``: query head h reads ``h // n_groups_at``."""
        return self.n_heads // self.n_kv_heads_at(layer)

    @functools.cached_property
    def _stream(self) -> dict[str, list[float]]:
        """Per block, the residual's scale ``D`` at its input (``pre``), at its MLP's input (``mid``)
        and at its output (``post``), and the factors of its updates (``attn``, ``mlp``, ``ple``).
        """
        c = self.spec.residual_scale
        mixes = self.spec.residual_mix or ((1.0, c, 1.0, c),) * self.n_layers
        final = math.prod(alpha for mix in mixes for alpha in mix[::2])  # the sites end on the real residual
        ples = self.spec.ple_mix or (c,) * self.n_layers
        out: dict[str, list[float]] = {key: [] for key in ("pre", "mid", "post", "attn", "mlp", "ple")}
        scale = 1.0 / final
        for (alpha_a, beta_a, alpha_m, beta_m), beta_p in zip(mixes, ples, strict=True):
            out["pre"].append(scale)
            scale *= alpha_a
            out["mid"].append(scale)
            out["attn"].append(beta_a / scale)
            scale = 1.0 if len(out["post"]) == self.n_layers - 1 else scale * alpha_m
            out["post"].append(scale)
            out["mlp"].append(beta_m / scale)
            out["ple"].append(beta_p / scale)
        return out

    def stream_scale(self, layer: int, where: Literal["pre", "mid", "post"]) -> float:
        """``D``: the model's residual at block ``layer``'s input (``pre``), its MLP's input (``mid``)
        or its output (``post``) is ``D`` times the ``resid_pre``/``resid_mid``/``resid_post`` site.
        1 unless blocks scale the residual they add to (``spec.residual_mix``): the sites are then
        the residual of a model that only adds, in units of the last block's output (``D = 1``
        there: the final residual is the model's own; the embeddings and every update are what they
        contribute to it), and a norm reading a site has its ``eps`` over ``D²``.
        """
        return self._stream[where][self.check_layer(layer)]

    def update_scale(self, sublayer: Literal["attn", "mlp", "ple"], layer: int) -> float:
        """The ``attn_out``/``mlp_out``/``ple_out`` site is this times the update module's output:
        ``residual_scale`` (Granite), or ``β / D`` with ``spec.residual_mix``.
        """
        return self._stream[sublayer][self.check_layer(layer)]

    def kv_head_rule(self, head: str = "head") -> str:
        """How query head ``head`` finds its key/value head, for provenance: ``"head // 2"``, or with
        the count of each group of blocks when they differ.
        """
        by_groups: dict[int, list[int]] = {}
        for layer in range(self.n_layers):
            by_groups.setdefault(self.n_groups_at(layer), []).append(layer)
        if len(by_groups) == 1:
            return f"{head} // {next(iter(by_groups))}"
        where = "; ".join(f"{g} in blocks {layers}" for g, layers in by_groups.items())
        return f"{head} // n_groups ({where})"

    def per_query_head(self, v: torch.Tensor, layer: int, dim: int = -2) -> torch.Tensor:
        """Key/value-head tensor ``v [..., H_kv, ...]`` of block ``layer`` → one entry per query head
        ``[..., n_heads, ...]`` along ``dim`` (query head h reads key/value head ``h // n_groups_at``).
        A ``v`` padded to ``n_kv_heads`` is cut to the block's own count first.
        """
        n_kv = self.n_kv_heads_at(layer)
        return v.narrow(dim, 0, n_kv).repeat_interleave(self.n_heads // n_kv, dim=dim)

    def provenance(self) -> dict[str, Any]:
        """Everything needed to say which model and software produced a number."""
        import transformers

        from recallscope import __version__

        return {
            **self.info.to_dict(),
            "family": self.spec.family,
            "model_class": type(self.hf_model).__name__,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "device_map": _placement(self.device_map),
            "attn_implementation": self.attn_implementation,
            "bos": self.bos,
            "layer_indexing": "0-based blocks; resid_pre[l] is the input of block l",
            "dims": {
                "n_layers": self.n_layers,
                "d_model": self.d_model,
                "n_heads": self.n_heads,
                "n_kv_heads": self.n_kv_heads,
                "d_head": self.d_head,
                "d_mlp": self.d_mlp,
                "d_vocab": self.d_vocab,
            },  # fmt: skip
            "versions": {
                "recallscope": __version__,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "python": platform.python_version(),
            },
        }

    # -- modules ------------------------------------------------------------------------------
    def module(self, path: str, layer: int | None = None) -> nn.Module:
        """The module at a model-level ``path``, or at a block-level ``path`` of ``layer``."""
        if layer is None:
            return get_module(self.hf_model, path)
        return get_module(self.block(layer), path)

    def block(self, layer: int) -> nn.Module:
        self.check_layer(layer)
        return get_module(self.hf_model, self.spec.blocks)[layer]

    def check_layer(self, layer: int) -> int:
        """Return ``layer`` if it is a valid block index, else raise :class:`SiteError`."""
        if not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise SiteError(
                f"layer {layer!r} does not exist: expected 0 ≤ layer < {self.n_layers} "
                f"(this model has {self.n_layers} blocks; negative indices are not accepted)"
            )
        return layer

    # -- offloaded weights (accelerate device maps) ---------------------------------------------
    def tensor(self, module: nn.Module, name: str) -> torch.Tensor | None:
        """``module.<name>`` (a parameter or buffer) detached, or None if it has none.

        Under an accelerate device map that offloads ``module`` to the CPU or disk, the parameter
        sits on the meta device between forwards; its value is then read from accelerate's
        offload store and put on the device the module runs on, as its own forward would.
        """
        return self._weights.read(module, name)

    @functools.cached_property
    def _weights(self) -> OffloadedWeights:
        return OffloadedWeights(self.hf_model)

    @contextlib.contextmanager
    def onloaded(self, module: nn.Module) -> Iterator[None]:
        """Keep the offloaded weights of ``module`` (and its submodules) in place while inside.

        For code that calls native modules where accelerate's loading hooks cannot run, such as
        inside ``torch.func`` transforms. Without a device map this does nothing.
        """
        hooks = [
            (sub, h)
            for sub in module.modules()
            for h in accelerate_hooks(sub)
            if getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None
        ]
        for sub, hook in hooks:
            hook.pre_forward(sub)  # loads the weights onto the execution device
            hook.offload = False  # calls inside only move inputs
        try:
            yield
        finally:
            for sub, hook in hooks:
                hook.offload = True
                hook.post_forward(sub, None)  # back to the meta device


def _rebuild(hf: tuple, tokenizer: Any, info: ModelInfo, bos: BosPolicy) -> Model:
    """The :class:`Model` that :meth:`Model.__reduce__` pickled: same class, config and weights."""
    cls, config, state, device = hf
    dtype = next(iter(state.values())).dtype
    hf_model = cls(config).to(dtype)
    hf_model.load_state_dict(state)  # copies into the built parameters: tied weights stay tied
    target = torch.device(device)
    if target.type == "cuda" and not torch.cuda.is_available():
        target = torch.device("cpu")
    return Model(hf_model.to(target), tokenizer, info=info, bos=bos)


def _placement(device_map: dict[str, str] | None) -> dict[str, int] | None:
    """Blocks and other modules per device, e.g. ``{"cpu": 14, "disk": 20}`` (None: one device)."""
    if device_map is None:
        return None
    counts: dict[str, int] = {}
    for device in device_map.values():
        counts[device] = counts.get(device, 0) + 1
    return counts
