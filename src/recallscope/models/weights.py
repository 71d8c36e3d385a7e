"""A model's weights in the canonical layout, and the parameters of its norms.

:class:`_CanonicalWeights` holds the methods of :class:`~recallscope.models.model.Model` that read the
native modules' weights into one layout whatever the family (``W_U``, ``W_E``, ``W_O``, ``W_V``,
``W_out``, ``W_in``, ``W_gate`` and their biases, the value columns of a fused q/k/v projection, the
MLP's activation) and the norms' parameters (:class:`NormParams`, with the gate of a gated norm);
blocks with fewer heads or neurons are padded with zeros (:func:`_padded`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from recallscope.errors import SiteError
from recallscope.models.discover_modules import ACTIVATIONS, norm_eps
from recallscope.models.experts import expert_values
from recallscope.models.spec import ArchSpec

__all__ = ["NormParams"]


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


class _CanonicalWeights:
    """:class:`~recallscope.models.model.Model`'s weights in canonical layout and its norms' parameters."""

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
