"""Locating the MLP of a block, for architecture discovery (``models.discover``).

:class:`_MlpMixin` holds the methods of ``_Discovery`` that find the feed-forward: the MLP module and
its output projection (a linear map to ``d_model`` after the attention, or an experts bank), a shared
expert and its gate beside the routed experts, the check of a bank outside transformers'
``ExpertsInterface`` against its weights, and the input projections (separate or one fused gate-up
map) with the activation between them.
"""

from __future__ import annotations

import torch
from torch import nn

from recallscope.models.discover_modules import (
    ACTIVATIONS,
    _in_features,
    _is_norm,
    _out_features,
    is_experts,
    is_linear,
)
from recallscope.models.experts import bank_of, expert_coefficients, expert_values
from recallscope.models.families._common import get_module


class _MlpMixin:
    """``_Discovery``'s feed-forward: MLP module, experts, shared expert, inputs, activation."""

    # -- MLP --------------------------------------------------------------------------------------
    def _mlp(self, attn: str, o_proj: str, late: str | None = None) -> tuple[str | None, str | None, str]:
        """``(experts, mlp module, output projection)``; the MLP is the block child that runs after
        the attention and writes ``d_model`` features (a linear map, or an experts bank), the last
        one before ``late`` (the writer of a third update, :meth:`_late_writer`) when given.
        """
        block = get_module(self.model, f"{self.blocks}.{self.block}")
        expert_path = self.experts_path()
        if expert_path is not None:
            top = expert_path.split(".")[0]
            self.shared = self._shared_expert(top, expert_path)
            return expert_path, top, expert_path
        writers = self._writers(attn, o_proj)
        if late is not None:
            writers = writers[: writers.index(late)]
        if not writers:
            raise self.error("no MLP output projection (a linear map to d_model after the attention)")
        out_proj = writers[-1]
        top = out_proj.split(".")[0]
        child = getattr(block, top)
        mlp = top if child is not get_module(block, out_proj) and not _is_norm(child) else None
        if mlp is not None:
            return None, mlp, out_proj
        return None, None, out_proj

    def _writers(self, attn: str, o_proj: str) -> list[str]:
        """Linear maps to ``d_model`` that run after the attention (outside it), in call order."""
        attn_order = self.block_call(attn).order
        return [
            p
            for p, m in self.block_modules()
            if is_linear(m)
            and _out_features(m) == self.d_model
            and not p.startswith(attn + ".")
            and self.block_call(p).order > attn_order
            and p != o_proj
        ]

    def _late_writer(self, attn: str, o_proj: str) -> str | None:
        """The last linear map to ``d_model`` when an earlier one (the MLP's) runs after the attention
        too and it is no part of the MLP's module: the writer of a candidate third update (Gemma 4's
        per-layer input projection), else None.
        """
        writers = self._writers(attn, o_proj)
        if len(writers) < 2 or self.experts_path() is not None:
            return None
        last, before = writers[-1], writers[-2]
        return last if last.split(".")[0] != before.split(".")[0] else None

    def experts_path(self) -> str | None:
        return next((p for p, m in self.block_modules() if is_experts(m)), None)

    def _shared_expert(self, mlp: str, bank: str) -> dict:
        """``shared_expert_down`` and ``shared_expert_gate`` of a mixture-of-experts block whose
        output is the routed experts' sum plus a shared expert (scaled by ``σ(x g)`` if gated).
        """
        out = self.block_call(mlp).output
        routed = self._routed(bank, out)
        plain = self._routed_fit(out, routed, 0.0)
        if plain is not None:
            return plain
        inside = [(p, m) for p, m in self.block_modules(mlp) if not p.startswith(bank)]
        block_in = self.block_call(mlp).input
        downs = [  # maps to d_model that read neuron values, not the block's input
            p
            for p, m in inside
            if is_linear(m)
            and _out_features(m) == self.d_model
            and not self._same(self.block_call(p).input, block_in)
        ]
        gates = [p for p, m in inside if is_linear(m) and _out_features(m) == 1]
        for down in downs:
            owner = down.rsplit(".", 1)[0]
            shared = self.block_call(owner).output if owner != mlp else self.block_call(down).output
            if shared is None or shared.numel() != out.numel():
                continue
            shared = shared.reshape(out.shape)
            fit = self._routed_fit(out, routed, shared)
            if fit is not None:
                return {"shared_expert_down": down, **fit}
            for gate in gates:
                factor = torch.sigmoid(self.block_call(gate).output).reshape(*out.shape[:-1], 1)
                fit = self._routed_fit(out, routed, factor * shared)
                if fit is not None:
                    return {"shared_expert_down": down, "shared_expert_gate": gate, **fit}
        for norm, module in inside:  # a norm inside the block, around the experts' sum (AXK1)
            call = self.block_call(norm)
            if not (_is_norm(module) and self._same(call.output, out)):
                continue
            total = call.input.reshape(out.shape)
            found = [{}] if self.compare.close(total, routed) else []
            found += [x for x in (self._shared_inputs(mlp, bank, down, total) for down in downs) if x]
            if found:
                self.inner_post_norm = norm
                return found[0]
        raise self.error(
            f"the output of {self.prefix}{mlp} is neither (a constant times) its experts' sum nor that plus "
            "a (sigmoid-gated) shared expert (nor a norm of either)"
        )

    def _routed_fit(self, out: torch.Tensor, routed: torch.Tensor, rest) -> dict | None:
        """``{}`` if ``out == routed + rest``, ``{"routed_scale": c}`` if ``out == c · routed + rest``
        with a constant ``c`` (MiniMax-M3 scales its experts' sum outside the bank), else None.
        """
        if self.compare.close(out, routed + rest):
            return {}
        c = self.compare.scale(out - rest, [routed])
        if c is None:
            return None
        return {} if c == 1.0 else {"routed_scale": c}

    def _routed(self, bank: str, out: torch.Tensor | None) -> torch.Tensor:
        """The routed experts' sum as the block adds it, ``[..., d]`` like ``out``: the bank's output,
        summed over the experts for a bank that every token goes to; a bank outside the
        ``ExpertsInterface`` is checked against its weights.
        """
        routed = self.block_call(bank).output
        module = self._module(bank)
        layout = bank_of(module)
        if routed is not None and layout.dispatch == "all":
            try:
                routed = routed.unflatten(0, (layout.n_experts, -1)).sum(0)
            except RuntimeError:
                routed = None
        if routed is not None and not hasattr(module, "has_gate"):
            self._check_bank(bank, module, routed)
        if routed is None or out is None or routed.numel() != out.numel():
            raise self.error(f"cannot read the output of the experts bank {self.prefix}{bank}")
        return routed.reshape(out.shape)

    def _check_bank(self, path: str, bank: nn.Module, routed: torch.Tensor) -> None:
        """A bank outside the ``ExpertsInterface`` (Llama 4's, every token to every expert; DBRX's,
        2-D stacked weights) computes, from its input, routing and weights, the neurons
        ``models.experts`` reads: its experts' sum ``routed [..., d]`` is ``Σ_k c_k W_out[k]``.
        """

        def read(module, name):
            value = self.weights.read(module, name)
            return None if value is None else value.to(torch.float64)

        call = self.block_call(path)
        layout = bank_of(bank)
        kind = "stacked 2-D [gate, up, down]" if layout.stacked else "fused [gate | up]"
        try:
            coeffs = expert_coefficients(bank, read, call.input, *call.routing)
            again = coeffs @ expert_values(bank, read)
        except Exception as err:  # noqa: BLE001 - a layout that does not apply
            raise self.error(
                f"the experts bank {self.prefix}{path} is not read as {kind} experts "
                f"({type(err).__name__}: {err})"
            ) from err
        if again.numel() != routed.numel() or not self.compare.close(again, routed.reshape(again.shape)):
            raise self.error(
                f"the experts bank {self.prefix}{path} is outside transformers' ExpertsInterface and its "
                f"output is not act(gate) ⊙ up of its {kind} weights, times its down weights, per expert"
            )

    def _shared_inputs(self, mlp: str, bank: str, down: str, total: torch.Tensor) -> dict | None:
        """``{"shared_expert_down": down}`` if ``total`` is the experts' sum plus that shared expert."""
        routed = self._routed(bank, total)
        owner = down.rsplit(".", 1)[0]
        shared = self.block_call(owner if owner != mlp else down).output
        if shared is not None and shared.numel() == total.numel():
            if self.compare.close(total, routed + shared.reshape(total.shape)):
                return {"shared_expert_down": down}
        return None

    def _module(self, path: str) -> nn.Module:
        """The module at a path relative to the traced block."""
        return get_module(self.model, self.prefix + path)

    def _same(self, a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
        """Equal values, whatever the leading (token) axes."""
        if a is None or b is None or a.numel() != b.numel():
            return False
        return self.compare.close(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]))

    def _mlp_inputs(self, mlp: str | None, out_proj: str, moe: str | None) -> dict:
        """``mlp_in``/``mlp_gate`` (separate or one fused gate-up map) and the activation module."""
        if moe is not None:
            return {"mlp_in": moe, **self.shared}
        down = self.block_call(out_proj)
        scope = mlp or ""
        modules = self.block_modules(scope) if scope else self.block_modules()
        mlp_input = self.block_call(mlp).input if mlp else None
        d_mlp = _in_features(get_module(self.model, self.prefix + out_proj))
        readers = [
            (p, m)
            for p, m in modules
            if is_linear(m)
            and p != out_proj
            and _in_features(m) == self.d_model
            and (mlp_input is None or self.compare.close(self.block_call(p).input, mlp_input))
            and self.block_call(p).order < down.order
            and _out_features(m) in (d_mlp, 2 * d_mlp)
        ]
        if mlp is None:  # flat MLP: the projection read by the down projection's chain, just before it
            readers = readers[-1:]
        acts = [
            (p, m)
            for p, m in modules
            if not list(m.parameters()) and self.block_call(p).order < down.order and p != scope
        ]
        if len(readers) == 1 and _out_features(readers[0][1]) == d_mlp:
            act = self._activation(acts, down.input, self.block_call(readers[0][0]).output, None)
            if act is not None:
                return {"mlp_in": readers[0][0], **act}
        elif len(readers) == 1:  # fused gate-up
            path = readers[0][0]
            out = self.block_call(path).output
            halves = {
                "gate_first": (out[..., :d_mlp], out[..., d_mlp:]),
                "up_first": (out[..., d_mlp:], out[..., :d_mlp]),
            }
            for layout, (gate, up) in halves.items():
                act = self._activation(acts, down.input, gate, up)
                if act is not None:
                    return {"mlp_in": path, "mlp_gate": path, "gate_up": layout, **act}
        elif len(readers) == 2:
            for gate, up in (readers, readers[::-1]):
                g, u = self.block_call(gate[0]).output, self.block_call(up[0]).output
                act = self._activation(acts, down.input, g, u)
                if act is not None:
                    return {"mlp_in": up[0], "mlp_gate": gate[0], **act}
        names = ", ".join(p for p, _ in readers) or "none"
        if mlp is not None:  # neurons are still the down projection's input: W_in, mlp_pre unavailable
            note = f"the input side of {mlp} ({names}) is not act(gate) ⊙ up: no W_in, W_gate or mlp_pre"
            return {"mlp_in": None, "notes": (note,)}
        raise self.error(
            f"cannot identify the MLP input projections and activation before {self.prefix}{out_proj} "
            f"(projections from d_model found: {names})"
        )

    def _activation(self, acts, coeffs, pre, up) -> dict | None:
        """``{"mlp_act": module path}`` or ``{"mlp_activation": function name}`` of the ``f`` with
        ``coeffs == f(pre) (⊙ up)``, checked on the traced values; None if none fits.
        """

        def fits(value):
            return self.compare.close(coeffs, value if up is None else value * up)

        for path, _ in acts:
            call = self.block_call(path)
            if self.compare.close(call.input, pre) and fits(call.output):
                return {"mlp_act": path}
        for name, fn in ACTIVATIONS.items():
            if fits(fn(pre)):
                return {"mlp_activation": name}
        return None

    def _flat(self, out_proj: str) -> bool:
        call = self.block_call(out_proj)
        return call.input is not None and call.input.dim() == 2
