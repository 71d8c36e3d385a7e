"""Locating the attention of a block, for architecture discovery (``models.discover``).

:class:`_AttentionMixin` holds the methods of ``_Discovery`` that find the attention module (the
caller of transformers' attention interface, or the owner of the first ``[B, H, Q, K]`` softmax),
its output projection, a gate or norm on the heads' mix, a qk-norm, and the value projection (a
separate ``v_proj`` with the constant the kernel's values are scaled by, or the value columns and
layout of a fused q/k/v projection), each checked against the values the attention kernel received.
"""

from __future__ import annotations

import torch
from torch import nn

from recallscope.models.discover_modules import _Compare, _is_norm, _out_features, is_linear

_SCALE = 1000.0
"""Factor a fused projection's output is scaled by to check that the kernel's values are linear in it."""


class _AttentionMixin:
    """``_Discovery``'s attention: module, output projection, gate, qk-norm, q/k/v."""

    # -- attention --------------------------------------------------------------------------------
    def _attention(self) -> str:
        if self.call is not None:
            path, first = self.names.get(id(self.call.module), ""), self.prefix
            if not path.startswith(first):
                raise self.error(
                    f"the first attention call came from {path!r}, outside block {self.block}: block "
                    f"{self.block} runs no attention (hybrid models with convolution, state-space or "
                    "linear-attention layers are not supported)"
                )
            if self.call.calls > 1:
                raise self.error(
                    f"{path} calls the attention kernel {self.call.calls} times in one forward "
                    "(differential attention): one probability pattern per head is needed"
                )
            return path[len(first) :]  # the same module in every block (checked with the spec)
        owner = self.trace.softmax_owner
        if owner is None or not owner.startswith(self.prefix):
            raise self.error(
                "block 0 neither calls transformers' AttentionInterface nor takes a [B, H, Q, K] softmax "
                "(no attention: a state-space or recurrent block?)"
            )
        return owner[len(self.prefix) :]

    def _o_proj(self, attn: str) -> str:
        """The last linear map inside the attention module that writes ``d_model`` features."""
        writers = [
            p for p, m in self.block_modules(attn) if is_linear(m) and _out_features(m) == self.d_model
        ]
        if not writers:
            raise self.error(f"no output projection (a linear map to d_model) inside {self.prefix}{attn}")
        return writers[-1]

    def _output_gate(self, attn: str, o_proj: str) -> bool:
        """Is ``o_proj``'s input something other than what the attention kernel returned (a sigmoid
        gate or a norm on the heads' mix, as AFMoE and BitNet have)? Seen in the probed block.
        """
        if self.call is None or self.names.get(id(self.call.module)) != self.prefix + attn:
            return False
        z, mix = self.block_call(o_proj).input, self.call.output
        if z is None or z.numel() != mix.numel():
            raise self.error(
                f"{self.prefix}{o_proj} reads {z.shape[-1] if z is not None else 'no'} features per "
                f"position, not the {mix.shape[-2]}×{mix.shape[-1]} its attention kernel returns"
            )
        # to float32's precision: some models compute attention in float32 for float64 weights (Flint)
        loose = _Compare(torch.float32) if self.dtype == torch.float64 else self.compare
        return not self._is_kernel_output(z, loose)

    def _is_kernel_output(self, x: torch.Tensor | None, compare: _Compare) -> bool:
        """Is ``x`` what the probed attention kernel returned (its heads' mix, ``[B, Q, H, d_head]``)?"""
        mix = None if self.call is None else self.call.output
        if mix is None or x is None or x.numel() != mix.numel():
            return False
        return compare.close(x.reshape(mix.shape).double(), mix)

    def _qk_norm(self, attn: str) -> bool:
        """A norm inside the attention module other than one of the kernel's output (BitNet's sub-norm)."""
        return any(
            _is_norm(module) and not self._is_kernel_output(self.block_call(path).input, self.compare)
            for path, module in self.block_modules(attn)
        )

    def _qkv(self, attn: str, o_proj: str) -> dict:
        """Separate ``q/k/v`` projections by name, or one fused projection located by the values."""
        attn_in = self.block_call(attn).input
        readers = [
            (p, m)
            for p, m in self.block_modules(attn)
            if is_linear(m) and p != o_proj and self.compare.close(self.block_call(p).input, attn_in)
        ]
        if len(readers) >= 3:
            named = {}
            for letter, words in (
                ("q", ("q", "query", "wq")),
                ("k", ("k", "key", "wk")),
                ("v", ("v", "value", "wv")),
            ):
                for p, _ in readers:
                    leaf = p.rsplit(".", 1)[-1].lower().removesuffix("_proj")
                    if leaf in words:
                        named[f"{letter}_proj"] = p
            if len(named) == 3 or set(named) == {"k_proj", "v_proj"}:
                scale = self._value_scale(attn, named["v_proj"])
                if scale is None:  # not the kernel's values, nor a constant times them: read the kernel's
                    self.n_value_features = _out_features(self._module(named.pop("v_proj")))
                elif scale != 1.0:  # MiMo-V2's attention_value_scale
                    named["value_scale"] = scale
                return named  # no q site where queries share a projection with a gate (MiniCPM5-MoE)
        fused = [(p, m) for p, m in readers if _out_features(m) > self.d_model]
        if len(fused) == 1:
            path = fused[0][0]
            columns = self._v_columns(path)
            if columns is None or not self._scales_with(path, columns):
                # not where the kernel's values come from (latent attention's inputs), or not linearly
                # (DBRX's clip_qkv clamps them after the projection): the v site reads the kernel's
                self._kernel_value_features()
                return {}
            self.n_value_features = len(columns)
            layout = _fused_layout(
                columns, int(self.text_config.num_attention_heads), _out_features(fused[0][1])
            )
            return {"qkv_proj": path, "qkv_layout": layout, "v_columns": None if layout else columns}
        return {}  # no value projection we can read as a matrix (e.g. latent attention): W_V unavailable

    def _scales_with(self, path: str, columns: tuple[int, ...], scale: float = 1.0) -> bool:
        """Are the kernel's values still (``scale`` times) the ``columns`` of ``path``'s output when
        that output is :data:`_SCALE` times larger? Not where something after the projection is not
        linear in it (a clamp the probe's values stayed inside: DBRX's ``clip_qkv``). True where the
        kernel is not seen.
        """
        if self.call is None:
            return True
        handle = self._module(path).register_forward_hook(lambda module, args, out: out * _SCALE)
        try:
            call = self._probe()
        finally:
            handle.remove()
        if call is None:
            return False
        out = self.block_call(path).output[..., list(columns)] * _SCALE
        return self._are_values(out, call.value, scale)

    def _kernel_value_features(self) -> None:
        """Where the v site reads the kernel's values ``[B, H_kv, K, d]``: ``H_kv · d`` value features
        (not the config's head count, which a model may not use: DBRX keeps it in ``attn_config``).
        """
        if self.call is not None and self.call.value is not None:
            self.n_value_features = self.call.value.shape[1] * self.call.value.shape[-1]

    def _value_scale(self, attn: str, path: str) -> float | None:
        """The constant ``c`` with the kernel's values ``= c ×`` the output of ``path`` (1 unless the
        modeling code rescales them: MiMo-V2's ``attention_value_scale``), checked again with that
        output :data:`_SCALE` times larger (nothing after the projection clamps it); None when the
        values are no constant times the output (a norm, a clamp). 1 where the kernel is not seen.
        """
        if self.call is None:
            return 1.0
        out, values = self.block_call(path).output, self.call.value
        if out is None or out.numel() != values.numel():
            return None
        out = out.unflatten(-1, values.shape[1::2]).transpose(1, 2)
        fitted = float((out * values).sum() / (out * out).sum().clamp_min(1e-300))
        scale = 1.0 if self.compare.close(out, values) else _declared(self._module(attn), fitted)
        if not self.compare.close(out * scale, values):
            return None
        width = _out_features(self._module(path))
        return scale if self._scales_with(path, tuple(range(width)), scale) else None

    def _are_values(self, out: torch.Tensor | None, values: torch.Tensor, scale: float = 1.0) -> bool:
        """Is ``scale × out [B, T, H_kv·d]`` (head-major) the kernel's ``values [B, H_kv, K, d]``?"""
        if out is None or out.numel() != values.numel():
            return False
        return self.compare.close(out.unflatten(-1, values.shape[1::2]).transpose(1, 2) * scale, values)

    def _v_columns(self, path: str) -> tuple[int, ...] | None:
        """Columns of a fused projection's output holding the values, head-major ``[kv_head, d_head]``."""
        values = self.trace.softmax_value if self.call is None else self.call.value
        out = self.block_call(path).output
        if values is None or out is None:
            return None
        out = out[0]  # [T, out_features]
        values = values[0]  # [H_kv, T, d_head]
        columns = []
        for head in range(values.shape[0]):
            for i in range(values.shape[-1]):
                target = values[head, :, i]
                match = (
                    (out - target[:, None]).abs().max(0).values
                    <= self.compare.tol * max(1.0, float(target.abs().max()))
                ).nonzero()
                if len(match) < 1:
                    return None
                columns.append(int(match[0]))
        return tuple(columns)


def _declared(module: nn.Module, fitted: float) -> float:
    """The float attribute of ``module`` within 1e-3 of ``fitted`` (the constant as the modeling code
    holds it, not as a low-precision probe measures it), else ``fitted``.
    """
    for value in vars(module).values():
        if isinstance(value, float) and abs(value - fitted) <= 1e-3 * abs(fitted):
            return value
    return fitted


def _fused_layout(columns: tuple[int, ...] | None, n_heads: int, width: int) -> str | None:
    """Name the layout of a fused q/k/v projection from where its values sit: ``split``
    (``[q | k | v]``), ``per_head`` (``[h: q k v]``), or None when it is neither.
    """
    if not columns:
        return None
    n_v = len(columns)
    split = tuple(range(width - n_v, width))
    if columns == split:
        return "split"
    if width == 3 * n_v and n_v % n_heads == 0:
        d_head = n_v // n_heads
        per_head = tuple(h * 3 * d_head + 2 * d_head + i for h in range(n_heads) for i in range(d_head))
        if columns == per_head:
            return "per_head"
    return None
