"""How a block reads and writes the residual, for architecture discovery (``models.discover``).

:class:`_ResidualMixin` holds the methods of ``_Discovery`` that find the norms in front of the
sublayers (plain or gated), whether the MLP reads the block input (parallel) or the residual after
attention (sequential), the norms wrapping a sublayer's output (sandwich norms), which modules'
outputs are the updates and the constants the block mixes them into the residual with, and the one
kind of norm every norm must be. :class:`_NotTheUpdates` is the refusal discovery may recover from.
"""

from __future__ import annotations

import torch

from recallscope.errors import UnsupportedModelError
from recallscope.models.discover_modules import _is_norm, is_experts, is_linear, norm_eps, norm_kind
from recallscope.models.families._common import get_module


class _NotTheUpdates(UnsupportedModelError):
    """The block's output is not its input plus the updates tried (discovery may try others)."""


class _ResidualMixin:
    """``_Discovery``'s norms, residual updates and the constants that mix them."""

    # -- norms ------------------------------------------------------------------------------------
    def _norm_before(self, value: torch.Tensor | None) -> str | None:
        for p, m in self.block_modules():
            if _is_norm(m) and self.compare.close(self.block_call(p).output, value):
                return p
        return None

    def _input_norm(self, attn: str) -> str | None:
        attn_in = self.block_call(attn).input
        norm = self._norm_before(attn_in) or self._gated_norm(attn_in)
        if norm is None and not self.compare.close(attn_in, self.block0.input):
            raise self.error(f"the input of {self.prefix}{attn} is neither the block input nor a norm of it")
        return norm

    def _gated_norm(self, value: torch.Tensor | None) -> str | None:
        """A module whose output is ``value`` and that holds a norm of its own input whose output it
        multiplies by an input-dependent gate (AXK2's gated RMSNorm: ``norm(x) ⊙ σ(mlp(norm(x)))``),
        recorded in ``norm_gates``; None when there is none.
        """
        for path, _ in self.block_modules():
            outer = self.block_call(path)
            if not self.compare.close(outer.output, value):
                continue
            for inner, module in self.block_modules(path):
                call = self.block_call(inner)
                if inner != path and _is_norm(module) and self.compare.close(call.input, outer.input):
                    self.norm_gates[path] = inner
                    return path
        return None

    def _mlp_norm(self, mlp, out_proj, attn, o_proj, ln_1) -> tuple[bool, str | None]:
        """``(parallel, norm in front of the MLP)``."""
        reader = mlp or out_proj
        mlp_in = self.block_call(reader).input
        if mlp is None:  # flat MLP: its first projection's input
            first = [
                p
                for p, m in self.block_modules()
                if is_linear(m) and self.block_call(p).order > self.block_call(o_proj).order
            ]
            mlp_in = self.block_call(first[0]).input if first else mlp_in
        norm = self._norm_before(mlp_in) or self._gated_norm(mlp_in)
        if self.compare.close(self._mlp_residual(mlp, out_proj, norm, mlp_in), self.block0.input):
            return True, norm
        return False, norm

    def _mlp_residual(self, mlp, out_proj, norm, mlp_in=None) -> torch.Tensor | None:
        """The residual the MLP reads: its norm's input, else its own input (``mlp_in`` when given)."""
        if norm is not None:
            return self.block_call(norm).input
        return mlp_in if mlp_in is not None else self.block_call(mlp or out_proj).input

    def _post_norm(self, writer: str | None) -> str | None:
        out = self.block_call(writer).output if writer else None
        if out is None:
            return None
        for p, m in self.block_modules():
            if _is_norm(m) and self.compare.close(self.block_call(p).input, out):
                return p
        return None

    def _updates(self, attn, o_proj, mlp, out_proj, attn_post, mlp_post, mid, late=None):
        """Which modules' outputs are the attention and MLP updates, how the block mixes them into
        the residual, ``(α_a, β_a, α_m, β_m)`` with ``mid = α_a x + β_a a`` and ``out = α_m mid + β_m m``
        (``(1, c, 1, c)``: ``out = x + c · (a + m)``; other mixes only for sequential blocks, whose
        MLP's residual ``mid`` is given), and a ``[d_model]`` parameter of the attention module that
        the block adds to its update outside any linear map (or None). With ``late``, the module
        whose output is a third update added after the MLP's, the mix has its factor ``β_p`` last
        (``out = α_m mid + β_m m + β_p p``).
        """
        x, y = self.block0.input, self.block0.output
        a_paths = [attn_post] if attn_post else [attn, o_proj]
        m_paths = [mlp_post] if mlp_post else [p for p in (mlp, out_proj) if p]
        extra = ""
        if mlp and mlp != out_proj and self._module(out_proj) is not self._module(mlp):
            if not is_experts(self._module(out_proj)) and not self._same(
                self.block_call(mlp).output, self.block_call(out_proj).output
            ):  # the MLP adds something its neurons do not write (experts outside a bank, a residual)
                m_paths = [p for p in m_paths if p != mlp]
                extra = (
                    f" ({self.prefix}{mlp}'s output is not its output projection {out_proj}'s, so it is no "
                    "update its neurons account for)"
                )
        # a bias the block adds itself (GPT-NeoX-Japanese's last block): the attention module's own
        # [d_model] parameters, tried only when the updates alone do not add up
        biases = [None] + (
            [
                f"{attn}.{name}"
                for name, param in self._module(attn).named_parameters(recurse=False)
                if param.dim() == 1 and param.numel() == self.d_model
            ]
            if not attn_post
            else []
        )
        candidates = [(bias, a, m) for bias in biases for a in a_paths for m in m_paths]
        for mixed in (False, True):  # a plain sum of updates first, for every candidate
            for bias, a, m in candidates:
                a_out, m_out = self.block_call(a).output, self.block_call(m).output
                if bias is not None and a_out is not None:
                    owner, _, name = bias.rpartition(".")
                    a_out = a_out + self.weights.read(self._module(owner), name).to(a_out.device, a_out.dtype)
                lates = [] if late is None else [self.block_call(late).output]
                c = None if mixed else self.compare.scale(y - x, [a_out, m_out, *lates])
                mix = (
                    self._mixing(x, a_out, mid, m_out, y, *lates)
                    if mixed
                    else (None if c is None else (1.0, c, 1.0, c, *(c for _ in lates)))
                )
                if mix is not None:
                    a_update = None if a in (attn, attn_post) else a
                    m_update = None if m in (mlp, mlp_post) or (mlp is None and m == out_proj) else m
                    return a_update, m_update, mix, bias
        raise _NotTheUpdates(
            f"{self.name}: cannot discover its architecture: "
            "the block output is not its input plus the attention and MLP updates, nor constant "
            f"multiples of them (checked {', '.join(a_paths)} with {', '.join(m_paths)}){extra}: "
            "post-norm blocks or another residual scheme (input-dependent residual gates, "
            "hyper-connections) are not supported"
        )

    def _mixing(self, x, a, mid, m, y, late=None) -> tuple[float, ...] | None:
        """``(α_a, β_a, α_m, β_m)`` with ``mid == α_a x + β_a a`` and ``y == α_m mid + β_m m`` (Beam's
        depth-scaled residual adds), with ``β_p`` appended and ``+ β_p late`` in ``y`` when the block
        adds a third update ``late`` (Gemma 4's per-layer input); None when they do not fit (or
        ``mid`` is None: parallel blocks).
        """
        if mid is None:
            return None
        first = self.compare.fit(mid, x, a)
        second = self.compare.fit(y, mid, m, *([] if late is None else [late]))
        if first is None or second is None or min(first[0], second[0]) <= self.compare.tol:
            return None  # (a residual kept at a scale ≤ 0 is no residual: an update includes it)
        return (*first, *second)

    def _norm_kinds(self, paths: list[str]) -> tuple[str, bool, tuple[tuple[str, float], ...]]:
        """``(kind, offset_one, eps of the norms that do not declare theirs)``; all norms must be
        of one kind.
        """
        kinds, eps = {}, []
        for path in paths:
            inner = self.norm_gates.get(path.removeprefix(self.prefix))
            path = path if inner is None else self.prefix + inner  # a gated norm: the norm inside it
            module = get_module(self.model, path)
            found = norm_kind(module, self.d_model, self.weights, self.dtype)
            if found is None:
                raise self.error(f"{path} behaves like neither a LayerNorm nor an RMSNorm over d_model")
            kinds[path] = found[:2]
            if norm_eps(module) is None:
                eps.append((path.removeprefix(self.prefix), found[2]))
        if len(set(kinds.values())) > 1:
            listed = ", ".join(f"{p}: {k[0]}{' (1+w)' if k[1] else ''}" for p, k in kinds.items())
            raise self.error(f"its norms are of different kinds ({listed})")
        kind, offset = next(iter(kinds.values()))
        return kind, offset, tuple(eps)
