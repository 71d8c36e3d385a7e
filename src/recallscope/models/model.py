"""``Model``: a native Hugging Face causal LM, its tokenizer and its architecture spec.

The wrapper adds no modules and converts no weights: ``model.hf_model`` is the transformers model
itself, and every primitive in ``recallscope.core`` works through PyTorch hooks on its modules.
Weights are exposed in one canonical layout whatever the family (``methods.md`` §0.3)::

    W_U [d_vocab, d_model]   W_E [d_vocab, d_model]
    W_O(layer) [n_heads, d_head, d_model]     W_out(layer) [d_mlp, d_model]
    W_in(layer), W_gate(layer) [d_model, d_mlp]
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
from recallscope.models.discover import ACTIVATIONS, norm_eps
from recallscope.models.experts import expert_values
from recallscope.models.families import get_module, spec_for
from recallscope.models.offload import OffloadedWeights, accelerate_hooks
from recallscope.models.spec import ArchSpec

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


@dataclass(frozen=True)
class NormParams:
    """Parameters of one LayerNorm / RMSNorm, enough to apply it with a frozen scale."""

    kind: Literal["layer", "rms", "identity"]
    """``identity``: no norm (the sublayer reads the residual itself)."""
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float
    offset_one: bool = False
    """Gemma: the norm multiplies by ``1 + weight``."""

    def centre(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` minus its mean over the last axis for a LayerNorm, else ``x``."""
        return x - x.mean(-1, keepdim=True) if self.kind == "layer" else x

    def rho(self, x: torch.Tensor) -> torch.Tensor:
        """The scale ``ρ [..., 1]`` the norm divides ``x [..., d]`` by (1 for the identity)."""
        if self.kind == "identity":
            return torch.ones_like(x[..., :1])
        return (self.centre(x).pow(2).mean(-1, keepdim=True) + self.eps).sqrt()

    def gain(self, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor | None:
        """Multiplicative gain ``γ`` in ``dtype`` (``1 + w`` for Gemma), or None for no weight."""
        if self.weight is None:
            return None
        weight = self.weight.to(device=device, dtype=dtype)
        return 1.0 + weight if self.offset_one else weight


class Model:
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

    # -- weights in canonical layout ------------------------------------------------------------
    @property
    def W_U(self) -> torch.Tensor:
        """Unembedding ``[d_vocab, d_model]``, times the model's constant logit scale (Cohere, Granite)."""
        weight = self.tensor(self.module(self.spec.unembed), "weight")
        return weight if self.spec.logit_scale == 1.0 else weight * self.spec.logit_scale

    @property
    def b_U(self) -> torch.Tensor | None:
        """Unembedding bias ``[d_vocab]`` (GPT-J, Phi) or None, times the logit scale."""
        bias = self.tensor(self.module(self.spec.unembed), "bias")
        return bias if bias is None or self.spec.logit_scale == 1.0 else bias * self.spec.logit_scale

    @property
    def W_E(self) -> torch.Tensor:
        """Token embedding matrix ``[d_vocab_in, d_model]`` (without Gemma's scale)."""
        return self.tensor(self.module(self.spec.embed), "weight")

    def W_O(self, layer: int) -> torch.Tensor:
        """Attention output weights ``[n_heads, d_head, d_model]``; head h owns ``W_O[h]`` (a block with
        narrower heads is padded with zero rows).
        """
        weight = self.tensor(self.module(self.spec.o_proj, layer), "weight")
        weight = weight if self.spec.conv1d else weight.T  # [n_heads * d_head, d_model]
        return _padded(weight.reshape(self.n_heads, -1, self.d_model), self.d_head, dim=1)

    def b_O(self, layer: int) -> torch.Tensor | None:
        """The attention update's bias ``[d_model]``: ``o_proj``'s bias plus any bias the block adds
        outside it (``attn_bias``), or None.
        """
        bias = self.tensor(self.module(self.spec.o_proj, layer), "bias")
        extra = self.attn_bias(layer)
        if extra is None:
            return bias
        return extra if bias is None else bias + extra.to(bias.device, bias.dtype)

    def attn_bias(self, layer: int) -> torch.Tensor | None:
        """The ``[d_model]`` bias block ``layer`` adds to its attention update outside any linear map
        (``ArchSpec.attn_bias``), or None.
        """
        path = self.spec.at(layer).attn_bias
        if path is None:
            return None
        owner, _, name = path.rpartition(".")
        return self.tensor(self.module(owner, layer) if owner else self.block(layer), name)

    def W_V(self, layer: int) -> torch.Tensor:
        """Value weights ``[n_kv_heads, d_model, d_head]``: ``v^{kv} = x W_V[kv] + b_V[kv]``.

        ``x`` is the output of the block's pre-attention norm. Read from ``v_proj`` or from the
        value part of a fused projection (GPT-2's ``[q | k | v]``, NeoX's per-head ``[q k v]``).
        """
        weight = self.tensor(self._v_module(layer), "weight")
        weight = weight if self.spec.conv1d else weight.T  # [d_model, out_features]
        return self._value_part(weight, layer).permute(1, 0, 2)

    def b_V(self, layer: int) -> torch.Tensor | None:
        """Value bias ``[n_kv_heads, d_head]``, or None."""
        bias = self.tensor(self._v_module(layer), "bias")
        return None if bias is None else self._value_part(bias, layer)

    def _v_module(self, layer: int) -> nn.Module:
        path = self.spec.qkv_proj or self.spec.v_proj
        if path is None:
            raise SiteError(
                f"{self.spec.family} has no value projection that is a matrix of the residual (e.g. "
                "latent attention): the value weights W_V are not available"
            )
        return self.module(path, layer)

    def _value_part(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """``[..., out_features]`` of the value (or fused qkv) projection → ``[..., n_kv_heads, d_head]``,
        times the attention's ``value_scale``.
        """
        columns, scale = self.value_columns(x.shape[-1], layer), self.spec.at(layer).value_scale
        part = x[..., columns].unflatten(-1, (self.n_kv_heads_at(layer), self.d_head_at(layer)))
        return _padded(part if scale == 1.0 else part * scale, self.d_head, dim=-1)

    def value_columns(self, width: int, layer: int) -> torch.Tensor:
        """Indices of the value features, ``[kv_head, d_head]`` order, in the ``width`` outputs of
        block ``layer``'s value (or fused q/k/v) projection.
        """
        spec, n_kv, d_head = self.spec.at(layer), self.n_kv_heads_at(layer), self.d_head_at(layer)
        if spec.qkv_proj is None:
            return torch.arange(width)
        if spec.v_columns is not None:
            return torch.tensor(spec.v_columns)
        if spec.qkv_layout == "split":  # [q | k | v]
            return torch.arange(width - n_kv * d_head, width)
        if spec.qkv_layout == "per_head":  # per head: [q k v]
            return (
                torch.arange(self.n_heads)[:, None] * 3 * d_head + 2 * d_head + torch.arange(d_head)
            ).flatten()
        raise SiteError(f"{spec.family}: unknown layout of the fused q/k/v projection")

    def W_out(self, layer: int) -> torch.Tensor:
        """MLP output weights ``[d_mlp, d_model]``; neuron k writes ``W_out[k]``.

        For a mixture-of-experts block: every expert's neurons and bias unit, then the shared
        expert's (``models.experts``). Layers with fewer neurons than ``d_mlp`` (dense layers among
        mixture-of-experts ones) are padded with zero rows.
        """
        spec = self.spec.at(layer)
        if spec.experts is not None:
            values = self._moe_values(spec, layer)
        else:
            weight = self.tensor(self.module(spec.mlp_out_proj, layer), "weight")
            values = weight if spec.conv1d else weight.T
        return _padded(values, self.d_mlp, dim=0)

    def b_out(self, layer: int) -> torch.Tensor | None:
        """MLP output bias ``[d_model]`` (None for mixture-of-experts blocks: their biases are
        bias units whose coefficient is the router weight).
        """
        spec = self.spec.at(layer)
        if spec.experts is not None:
            return None
        return self.tensor(self.module(spec.mlp_out_proj, layer), "bias")

    def _moe_values(self, spec: ArchSpec, layer: int) -> torch.Tensor:
        parts = [expert_values(self.module(spec.experts, layer), self.tensor)]
        if spec.shared_expert_down is not None:
            down = self.module(spec.shared_expert_down, layer)
            parts.append(self.tensor(down, "weight").T)
            bias = self.tensor(down, "bias")
            if bias is not None:
                parts.append(bias[None])
        return torch.cat([p.to(parts[0].device, parts[0].dtype) for p in parts])

    def _dense(self, layer: int, what: str) -> ArchSpec:
        """Block ``layer``'s spec, refusing mixture-of-experts blocks (``what`` is per expert there)."""
        spec = self.spec.at(layer)
        if spec.experts is not None:
            raise SiteError(
                f"{spec.family} has a mixture-of-experts MLP in block {layer}: {what} is per expert, not "
                "one matrix (its neurons' coefficients, mlp_post, and output weights, W_out, are available)"
            )
        if spec.mlp_in is None:
            raise SiteError(
                f"{spec.family}: the input side of block {layer}'s MLP was not identified ({what}); its "
                "neuron coefficients, mlp_post, and output weights, W_out, are available"
            )
        return spec

    def W_in(self, layer: int) -> torch.Tensor:
        """MLP input weights ``[d_model, d_mlp]`` (``up_proj`` if gated): ``x W_in + b_in``."""
        spec = self._dense(layer, "W_in")
        weight = self._gate_up_part(spec, self._mlp_weight(spec.mlp_in, layer), "up")
        return _padded(weight, self.d_mlp, dim=1)

    def b_in(self, layer: int) -> torch.Tensor | None:
        spec = self._dense(layer, "b_in")
        bias = self.tensor(self.module(spec.mlp_in, layer), "bias")
        return None if bias is None else _padded(self._gate_up_part(spec, bias, "up"), self.d_mlp, dim=0)

    def W_gate(self, layer: int) -> torch.Tensor:
        """Gated MLPs' gate weights ``[d_model, d_mlp]``: ``c = act(x W_gate + b_gate) ⊙ (x W_in + b_in)``."""
        spec = self._gated(layer)
        weight = self._gate_up_part(spec, self._mlp_weight(spec.mlp_gate, layer), "gate")
        return _padded(weight, self.d_mlp, dim=1)

    def b_gate(self, layer: int) -> torch.Tensor | None:
        spec = self._gated(layer)
        bias = self.tensor(self.module(spec.mlp_gate, layer), "bias")
        return None if bias is None else _padded(self._gate_up_part(spec, bias, "gate"), self.d_mlp, dim=0)

    @staticmethod
    def _gate_up_part(spec: ArchSpec, x: torch.Tensor, part: str) -> torch.Tensor:
        """The gate or up half of a fused gate-up projection's ``[..., 2 d_mlp]`` (else ``x``)."""
        if spec.gate_up is None:
            return x
        first = "gate" if spec.gate_up == "gate_first" else "up"
        half = x.shape[-1] // 2
        return x[..., :half] if part == first else x[..., half:]

    def mlp_act(self, layer: int) -> nn.Module:
        """The MLP's activation function (applied to ``mlp_pre``), as the native module holds it."""
        spec = self._dense(layer, "the activation")
        if spec.mlp_act is not None:
            return self.module(spec.mlp_act, layer)
        if spec.mlp_activation is not None:
            return _Activation(ACTIVATIONS[spec.mlp_activation])
        raise SiteError(
            f"{spec.family}: the activation of block {layer}'s MLP was not identified (its down projection "
            "does not read act(gate) ⊙ up or act(up) directly)"
        )

    def is_gated(self, layer: int) -> bool:
        """Block ``layer``'s MLP multiplies an activated gate with an up projection."""
        return self.spec.at(layer).mlp_gate is not None

    def _gated(self, layer: int) -> ArchSpec:
        spec = self._dense(layer, "the gate projection")
        if spec.mlp_gate is None:
            raise SiteError(f"{spec.family} has no gated MLP in block {layer} (no gate projection)")
        return spec

    def _mlp_weight(self, path: str, layer: int) -> torch.Tensor:
        weight = self.tensor(self.module(path, layer), "weight")
        return weight if self.spec.conv1d else weight.T

    def norm_params(self, path: str | None, layer: int | None = None) -> NormParams:
        """Parameters of the norm at ``path`` (``self.spec.final_norm`` for the final norm); a
        ``path`` of None (a sublayer that reads the residual itself) gives the identity, a gated norm
        (``spec.norm_gates``) the norm inside it (its gate: :meth:`norm_gate`). A norm of the residual
        applies to the ``resid_*`` sites (its ``eps`` over ``D²``, :meth:`stream_scale`).
        """
        if path is None:
            return NormParams(kind="identity", weight=None, bias=None, eps=0.0)
        stream = self._norm_stream(path, layer)
        if layer is not None:  # a gated norm (spec.norm_gates): the norm inside it
            path = dict(self.spec.at(layer).norm_gates).get(path, path)
        norm = self.module(path, layer)
        eps = norm_eps(norm)
        eps = dict(self.spec.norm_eps).get(path) if eps is None else eps
        return NormParams(
            kind=self.spec.norm,
            weight=self.tensor(norm, "weight"),
            bias=self.tensor(norm, "bias"),
            eps=float(eps if eps is not None else 1e-6) / stream**2,  # on the sites' units
            offset_one=self.spec.norm_offset_one,
        )

    def _norm_stream(self, path: str, layer: int | None) -> float:
        """``D`` of the residual the norm at ``path`` reads (1 for norms of anything else)."""
        if not self.spec.residual_mix:
            return 1.0
        if layer is None:
            return self._stream["post"][-1] if path == self.spec.final_norm else 1.0
        spec = self.spec.at(layer)
        if path == spec.ln_1 or (path == spec.ln_2 and spec.parallel):
            return self.stream_scale(layer, "pre")
        return self.stream_scale(layer, "mid") if path == spec.ln_2 else 1.0

    @torch.no_grad()
    def norm_gate(self, path: str | None, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        """The gate ``g [..., d_model]`` the gated norm at ``path`` of block ``layer`` multiplies its
        norm's output by for inputs ``x [..., d_model]`` (``spec.norm_gates``): the module's output
        over the inner norm's, both run natively (0 where the norm's output is 0), in at least
        float32. None for a norm without a gate.
        """
        inner = dict(self.spec.at(layer).norm_gates).get(path) if path else None
        if inner is None:
            return None
        dtype = torch.promote_types(x.dtype, torch.float32)
        x = x.to(self.dtype)
        out = self.module(path, layer)(x).to(dtype)
        normed = self.module(inner, layer)(x).to(dtype)
        return torch.where(normed != 0, out / torch.where(normed != 0, normed, 1), 0)

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


def _padded(x: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """``x`` with zeros appended along ``dim`` up to ``size`` (layers with fewer neurons)."""
    missing = size - x.shape[dim]
    if missing <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


class _Activation(nn.Module):
    """A functional activation as a module (for MLPs that apply it without one)."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


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
