"""Direct attribution of the last blocks' components to a target token at the last position (Lv et
al. 2024, ``methods.md`` L7).

Every component ``c`` of the blocks ``start_layer … L-1`` at the last position ``N`` is read with
the final norm's scale frozen on the final residual of the same forward::

    logit_c = W_U[t] · (γ ⊙ centre(c)) / ρ_N          iw_c = logit_c − mean_v W_U[v] · (γ ⊙ centre(c)) / ρ_N

``iw`` is the component's part of Lv et al.'s metric ``ℓ[t] − mean_v ℓ[v]``; the vocabulary mean of a
frozen-scale linear readout is the readout of the mean unembedding row, so nothing is decoded over
the whole vocabulary. A :class:`Component` is a head ``o^{ℓ,h} = z^{ℓ,h} W_O^{ℓ,h}`` (Gemma-2's
attention post-norm folded in), the attention output bias (``attn_bias``), the MLP output or one
neuron ``c_k w_k``:

- :func:`direct_attribution`: per layer the ``(logit, iw)`` of every head, ``attn_bias``, MLP and
  neuron, from the saved ``z``, ``mlp_out`` and ``mlp_post`` at ``N``;
- :func:`component_columns`: the components of a frame (heads, attn_bias, mlp, the strongest neurons
  and the candidate neurons) and their values per fact;
- :func:`negative_components`: the components whose mean logit over chosen facts is negative, most
  negative first (the candidates of a down-weighting).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from recallscope.core.decompose import head_outputs, neuron_outputs
from recallscope.core.subvalues import FrozenHead
from recallscope.models.model import Model

__all__ = ["Component", "direct_attribution", "component_columns", "negative_components"]


@dataclass(frozen=True)
class Component:
    """A final-layer component: ``kind`` ∈ head, attn_bias, mlp, neuron; ``index`` the head or neuron
    (-1 for attn_bias and mlp).
    """

    kind: str
    layer: int
    index: int = -1

    @property
    def label(self) -> str:
        return f"{self.kind} {self.index}" if self.kind in ("head", "neuron") else self.kind


def direct_attribution(
    model: Model, saved: dict, layers: range, final: torch.Tensor, targets: torch.Tensor
) -> dict:
    """Per layer: head, attn_bias, MLP and neuron contributions to the target (``logit``) and to
    target − vocabulary mean (``iw``), as numpy ``[R, k, …]``.
    """
    head = FrozenHead.from_final(model, final, bias=False)
    u = head.token_covectors(targets[:, None])[:, 0]  # [R, d]
    mean_row = torch.full((model.d_vocab,), 1.0 / model.d_vocab, dtype=head.dtype, device=u.device)
    w = u - head.covectors(mean_row)[None] / head.scale[:, None]  # iw covectors [R, d]
    R, ar = len(final), torch.arange(len(final))
    out: dict[str, list] = {k: [] for k in ("head", "attn_bias", "mlp", "neuron")}
    for layer in layers:
        heads = head_outputs(model, layer, saved[("z", layer)][:, None])
        parts = heads.parts[:, 0]  # [R, H, d]
        out["head"].append(torch.stack([parts @ u[..., None], parts @ w[..., None]], -1)[:, :, 0])
        rest = torch.zeros_like(u)  # [R, d]: b_O, post-normed for Gemma-2
        if model.b_O(layer) is not None:
            rest = rest + torch.as_tensor(heads.rest, dtype=u.dtype, device=u.device).reshape(-1, u.shape[-1])
        out["attn_bias"].append(torch.stack([(rest * u).sum(-1), (rest * w).sum(-1)], -1))
        mlp = saved[("mlp_out", layer)].to(u.dtype)
        out["mlp"].append(torch.stack([(mlp * u).sum(-1), (mlp * w).sum(-1)], -1))
        coeffs = saved[("mlp_post", layer)][:, None]  # [R, 1, d_mlp]
        projected = neuron_outputs(model, layer, coeffs, onto=torch.cat([u, w])).parts[:, 0]  # [R, d_mlp, 2R]
        out["neuron"].append(torch.stack([projected[ar, :, ar], projected[ar, :, R + ar]], -1))
    # [R, k, (H | d_mlp)?, 2]: last axis = (logit, iw)
    return {k: torch.stack(v, 1).cpu().double().numpy() for k, v in out.items()}


def component_columns(model: Model, attribution: dict, start_layer: int, candidates, config):
    """The frame's components (heads, attn_bias, mlp, top neurons per layer, then candidate neurons not
    among them) and their ``[F, C]`` values.

    ``attribution``: :func:`direct_attribution` of every fact; ``config.top_neurons``: neurons per layer
    with the largest ``|mean logit|``. Returns ``(components, logit [F, C], iw [F, C])``.
    """
    components, columns = [], []
    neuron = attribution["neuron"]  # [F, k, d_mlp, 2]
    for i, layer in enumerate(range(start_layer, model.n_layers)):
        for h in range(model.n_heads):
            components.append(Component("head", layer, h))
            columns.append(attribution["head"][:, i, h])
        if model.b_O(layer) is not None:
            components.append(Component("attn_bias", layer))
            columns.append(attribution["attn_bias"][:, i])
        components.append(Component("mlp", layer))
        columns.append(attribution["mlp"][:, i])
        strength = np.abs(neuron[:, i, :, 0].mean(0))
        top = [int(k) for k in np.argsort(-strength, kind="stable")[: config.top_neurons]]
        top += [
            c.index for c, _ in candidates if c.kind == "neuron" and c.layer == layer and c.index not in top
        ]
        for k in top:
            components.append(Component("neuron", layer, k))
            columns.append(neuron[:, i, k])
    values = np.stack(columns, 1)  # [F, C, 2]
    return components, values[..., 0], values[..., 1]


def negative_components(
    model: Model, attribution: dict, train: np.ndarray, start_layer: int, config
) -> list[tuple[Component, float]]:
    """``(component, train mean logit)`` of the negative components, most negative first, capped.

    Means are over the rows where ``train`` is True; every negative head and MLP, and per layer the
    ``config.top_neurons`` most negative neurons, are pooled; at most ``config.max_candidates`` are kept.
    """
    pool = []
    for i, layer in enumerate(range(start_layer, model.n_layers)):
        heads = attribution["head"][train, i, :, 0].mean(0)
        pool += [(Component("head", layer, h), float(m)) for h, m in enumerate(heads) if m < 0]
        mlp = float(attribution["mlp"][train, i, 0].mean())
        pool += [(Component("mlp", layer), mlp)] if mlp < 0 else []
        neurons = attribution["neuron"][train, i, :, 0].mean(0)
        for k in np.argsort(neurons, kind="stable")[: config.top_neurons]:
            if neurons[k] < 0:
                pool.append((Component("neuron", layer, int(k)), float(neurons[k])))
    order = sorted(range(len(pool)), key=lambda j: (pool[j][1], j))
    return [pool[j] for j in order[: config.max_candidates]]
