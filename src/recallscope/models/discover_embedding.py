"""The ends of the model, for architecture discovery (``models.discover``).

:class:`_EmbeddingMixin` holds the methods of ``_Discovery`` that find what block 0 reads (the
embedding times a constant, a norm of it, plus learned positions or rows of a table of positions),
the final norm and the constant before the output embedding, the logits' scale or soft-cap, and the
model's dimensions (:class:`~recallscope.models.spec.Dims`).
"""

from __future__ import annotations

import torch

from recallscope.models.discover_modules import _Compare, _in_features, _is_norm, _out_features
from recallscope.models.experts import bank_of
from recallscope.models.families._common import get_module
from recallscope.models.spec import Dims


class _EmbeddingMixin:
    """``_Discovery``'s embedding, position embedding, final norm, logits and dims."""

    # -- embedding, final norm, logits ------------------------------------------------------------
    def _embedding(self) -> tuple[str | None, float, str | None, bool]:
        """``(embedding norm, embedding scale, position embedding, whether that is a table)``: block
        0's input is ``scale · embed (+ pos)`` or ``norm(embed)``; ``pos`` is a module's output or the
        first rows of a table the model holds (CTRL's sinusoids, a buffer indexed in its forward).
        """
        x0 = self.first.input
        embed = self.trace.get(self.embed).output
        outside = [
            (n, c)
            for n, c in self.trace.calls.items()
            if not n.startswith(self.blocks)
            and c.order < self.first.order
            and n != self.embed
            and c.output is not None
            and c.output.shape[-1] == self.d_model
            and not any(n.startswith(self.embed + ".") for _ in [0])
        ]
        for name, call in outside:
            module = get_module(self.model, name)
            if (
                _is_norm(module)
                and self.compare.close(call.input, embed)
                and self.compare.close(call.output, x0)
            ):
                return name, 1.0, None, False
        scale = self.compare.scale(x0, [embed])
        if scale is not None:
            return None, scale, None, False
        for name, call in outside:
            if self.compare.close(x0, embed + call.output):
                return None, 1.0, name, False
        table = self._position_table(x0, embed)
        if table is not None:
            return None, table[1], table[0], True
        raise self.error(
            f"the input of block 0 is not a multiple of the output of {self.embed} (plus position embeddings)"
        )

    def _position_table(self, x0: torch.Tensor, embed: torch.Tensor) -> tuple[str, float] | None:
        """``(path, scale)`` of a ``[n_positions, d_model]`` tensor of the model (not in the blocks) with
        ``x0 == scale · embed + table[:T]`` over the probe's ``T`` positions.
        """
        n_positions = x0.shape[-2]
        for name, tensor in [*self.model.named_buffers(), *self.model.named_parameters()]:
            if (
                name.startswith(self.blocks + ".")
                or tensor.dim() != 2
                or tensor.shape[-1] != self.d_model
                or tensor.shape[0] < n_positions
                or tensor is self.model.get_input_embeddings().weight
                or not tensor.is_floating_point()
            ):
                continue
            rows = tensor[:n_positions].detach().double().to(x0.device)
            scale = self.compare.scale(x0 - rows, [embed])
            if scale is not None:
                return name, scale
        return None

    def _final_norm(self) -> tuple[str, float]:
        last = self.trace.get(f"{self.blocks}.{len(get_module(self.model, self.blocks)) - 1}")
        head_in = self.trace.get(self.unembed).input
        reading = []  # norms of the last block's output
        for name, call in [*self.trace.calls.items(), *self.trace.later]:
            if name.startswith(self.blocks) or not _is_norm(get_module(self.model, name)):
                continue
            if last is None or call.order < last.order:
                continue
            if not self._same(call.input, last.output):  # a norm of something else (a head's own norm)
                continue
            reading.append(name)
            scale = self.compare.scale(head_in, [call.output])  # MiniCPM scales it before lm_head
            if scale is not None:
                return name, scale
        if reading:
            raise self.error(
                f"the output embedding {self.unembed} does not read the norm of the last block's output "
                f"({reading[0]}) times a constant: what sits between them (a dense → activation → norm "
                "prediction head, more blocks) makes the logits non-linear in the residual stream, so no "
                "logit lens or direct logit attribution would be exact"
            )
        raise self.error("no final norm (a norm between the last block and the output embedding)")

    def _logits(self) -> tuple[float, float | None]:
        """``(scale, soft-cap)``: the logits are ``scale ·`` the unembedding's output, or
        ``cap · tanh(out / cap)`` with the config's ``final_logit_softcapping``.
        """
        head_out = self.trace.get(self.unembed).output
        logits = self.trace.logits
        scale = self.compare.scale(logits, [head_out])
        if scale is not None:
            return scale, None
        cap = getattr(self.text_config, "final_logit_softcapping", None)
        capped = None if not cap else torch.tanh(head_out / cap) * cap
        if cap and (self.compare.close(logits, capped) or _Compare(torch.float32).close(logits, capped)):
            return 1.0, float(cap)  # (Beam soft-caps in float32 whatever the model's dtype)
        raise self.error(
            f"the logits are neither a multiple of the output of {self.unembed} nor its soft-capped value"
        )

    def _dims(self, o_proj, projections, out_proj, moe) -> Dims:
        config = self.text_config
        n_heads = int(config.num_attention_heads)
        o_in = _in_features(get_module(self.model, self.prefix + o_proj))
        if o_in % n_heads:
            raise self.error(
                f"{self.prefix}{o_proj} reads {o_in} features, not a multiple of {n_heads} heads"
            )
        d_head = o_in // n_heads
        n_kv = getattr(config, "num_key_value_heads", None) or n_heads
        if "v_proj" in projections:  # values are d_head wide; queries and keys may be wider (MiMo)
            n_kv = _out_features(get_module(self.model, self.prefix + projections["v_proj"])) // d_head
        elif getattr(self, "n_value_features", None):
            n_kv = self.n_value_features // d_head
        if moe is not None:
            d_mlp = bank_of(get_module(self.model, self.prefix + moe)).n_neurons
            if self.shared.get("shared_expert_down"):
                down = get_module(self.model, self.prefix + self.shared["shared_expert_down"])
                d_mlp += _in_features(down) + int(down.bias is not None)
        else:
            d_mlp = _in_features(get_module(self.model, self.prefix + out_proj))
        return Dims(
            n_layers=len(get_module(self.model, self.blocks)),
            n_heads=n_heads,
            n_kv_heads=int(n_kv),
            d_model=self.d_model,
            d_head=d_head,
            d_mlp=d_mlp,
            d_vocab=_out_features(get_module(self.model, self.unembed)),
        )
