"""Attribution patching (AtP; Nanda 2023, Kramár et al. 2024): the first-order estimate of every node's
noising effect from one clean forward and one backward, and its check by real patching.

For a node ``n`` (a state at one position), a clean prompt and a corrupted copy of it::

    effect(n) = L(clean run with n ← n(corrupted)) − L(clean run)  ≈  (n(corrupted) − n(clean)) · ∂L/∂n

with the gradient taken on the clean run. Nodes (``NODES``): ``resid`` (block ``ℓ``'s output at a
position), ``head`` (head ``h``'s output ``z`` at a position, before ``W_O``) and ``neuron`` (MLP
neuron ``k``'s coefficient ``mlp_post`` at a position). With several corrupted copies (Gaussian
noise, resampling), estimates and effects are means over the copies.

::

    grads = clean_gradients(model, ids, metric)                 # one forward, one backward
    corrupted = corrupted_states(model, bad)                    # one forward of the copies
    scores = estimates(grads, corrupted)                        # {"resid": [T, L], "head": [L, H, T], ...}
    exact = patched_effects(model, ids, corrupted, nodes, metric)  # one batch row per node and copy
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from recallscope.core.cache import Cache, forward, run_with_cache
from recallscope.core.corruption import Corrupted
from recallscope.core.hooks import site_hook
from recallscope.core.tokens import PromptBatch
from recallscope.models.model import Model
from recallscope.models.sites import Site

__all__ = [
    "NODES",
    "NODE_SITES",
    "AXES",
    "node_of",
    "node_index",
    "Gradients",
    "clean_gradients",
    "corrupted_states",
    "estimates",
    "graddrop",
    "patched_effects",
]

NODES = ("resid", "mlp", "head", "neuron")
NODE_SITES = {"resid": "resid_post", "mlp": "mlp_out", "head": "z", "neuron": "mlp_post"}

AXES = {
    "resid": ("position", "layer"),
    "mlp": ("position", "layer"),
    "head": ("layer", "index", "position"),
    "neuron": ("layer", "position", "index"),
}
"""The axes of each node type's score array (:func:`estimates`); ``index``: the head or the neuron."""

Metric = Callable[[torch.Tensor], torch.Tensor]
"""``logits [R, V]`` of the last position → ``[R]`` metric values."""


@dataclass(frozen=True)
class Gradients:
    """The clean run's metric, and per site its activation and the metric's gradient, ``[T, …]``."""

    metric: float
    acts: dict[Site, torch.Tensor]
    grads: dict[Site, torch.Tensor]


def _sites(model: Model, nodes: Sequence[str]) -> list[Site]:
    return [Site(layer, NODE_SITES[n]) for n in nodes for layer in range(model.n_layers)]


def clean_gradients(
    model: Model,
    prompt: torch.Tensor | PromptBatch,
    metric: Metric,
    nodes: Sequence[str] = NODES,
    *,
    dropped_layer: int | None = None,
) -> Gradients | list[Gradients]:
    """One forward and one backward of the clean prompt ``ids [T]`` (a :class:`Gradients`), or of
    every row of a left-padded ``PromptBatch`` at once (one per row, cut to its real tokens; the
    metric maps ``[B, V]`` logits to ``[B]`` and the rows do not interact).

    ``dropped_layer``: no gradient flows back through that block's attention and MLP updates
    (GradDrop's pass for that layer); its own nodes then get a zero gradient.
    """
    batched = isinstance(prompt, PromptBatch)
    inputs = prompt.model_inputs(model.device) if batched else {"input_ids": prompt[None].to(model.device)}
    pads = prompt.pad_lengths.tolist() if batched else [0]
    sites = _sites(model, nodes)
    captured: dict[Site, torch.Tensor] = {}

    def start(act):  # the graph starts at the embeddings: weights may not require grad
        return act.detach().requires_grad_(True)

    def keep(site):
        def capture(act):
            captured[site] = act.clone()  # written back, so the rest of the forward reads this tensor
            return captured[site]

        return capture

    with torch.enable_grad(), contextlib.ExitStack() as stack:
        stack.enter_context(site_hook(model, Site(None, "embed"), start))
        if dropped_layer is not None:
            for name in ("attn_out", "mlp_out"):
                stack.enter_context(site_hook(model, Site(dropped_layer, name), torch.Tensor.detach))
        for site in sites:
            stack.enter_context(site_hook(model, site, keep(site)))
        logits = model.hf_model(**inputs, use_cache=False, logits_to_keep=1).logits
        values = metric(logits[:, -1].double())
        live = [s for s in sites if captured[s].requires_grad]
        found = torch.autograd.grad(values.sum(), [captured[s] for s in live], allow_unused=True)
        grads = dict(zip(live, found, strict=True))
    out = []
    for row, pad in enumerate(pads):
        acts = {s: captured[s][row, pad:].detach() for s in sites}
        g = {s: torch.zeros_like(acts[s]) if grads.get(s) is None else grads[s][row, pad:] for s in sites}
        out.append(Gradients(float(values[row].detach()), acts, g))
    return out if batched else out[0]


def graddrop(
    model: Model,
    ids: torch.Tensor,
    metric: Metric,
    corrupted: dict[Site, torch.Tensor],
    nodes: Sequence[str] = NODES,
) -> dict[str, torch.Tensor]:
    """AtP* GradDrop scores ``1/(L−1) Σ_ℓ |Δn · ∂L/∂n with no gradient through block ℓ's updates|``
    of every node (shapes as :func:`estimates`; ``L`` passes of one forward and one backward).

    A node whose direct and indirect effects cancel has a small AtP but a large GradDrop score,
    because dropping one path uncovers the other (Kramár et al. 2024, §3.3).
    """
    total: dict[str, torch.Tensor] = {}
    for layer in range(model.n_layers):
        grads = clean_gradients(model, ids, metric, nodes, dropped_layer=layer)
        for name, part in estimates(grads, corrupted).items():
            total[name] = total.get(name, 0) + part.abs()
    return {name: value / max(1, model.n_layers - 1) for name, value in total.items()}


def corrupted_states(model: Model, bad: Corrupted | PromptBatch, nodes: Sequence[str] = NODES) -> Cache:
    """Every node site of the corrupted copies, ``[S, T, …]``, and their last-position logits
    (``.logits [S, V]``), from one forward of the ``S`` rows; or of every row of a ``PromptBatch`` of
    corrupted prompts (padded).
    """
    if isinstance(bad, PromptBatch):
        return run_with_cache(model, bad, _sites(model, nodes), logits="last")
    with bad.applied(model):
        return run_with_cache(model, bad.ids, _sites(model, nodes), logits="last")


def estimates(grads: Gradients, corrupted: dict[Site, torch.Tensor]) -> dict[str, torch.Tensor]:
    """AtP scores ``(mean corrupted − clean) · grad`` of every node: ``resid [T, L]``, ``head [L, H, T]``,
    ``neuron [L, T, d_mlp]`` (float64).
    """
    out: dict[str, list[torch.Tensor]] = {}
    for site, act in grads.acts.items():
        delta = corrupted[site].double().mean(0) - act.double()
        product = delta * grads.grads[site].double()
        if site.name in ("resid_post", "mlp_out"):
            out.setdefault("resid" if site.name == "resid_post" else "mlp", []).append(product.sum(-1))  # [T]
        elif site.name == "z":
            out.setdefault("head", []).append(product.sum(-1).T)  # [H, T]
        else:
            out.setdefault("neuron", []).append(product)  # [T, d_mlp]
    stacked = {name: torch.stack(parts) for name, parts in out.items()}
    for name in ("resid", "mlp"):
        if name in stacked:
            stacked[name] = stacked[name].T  # [T, L]
    return stacked


def _writer(nodes: Sequence[tuple[int, int | None]], values: torch.Tensor, rows: torch.Tensor):
    """Site edit: row ``rows[i]`` gets ``values[i]`` at position ``nodes[i][0]`` (index ``nodes[i][1]``)."""

    def edit(act):
        act = act.clone()
        for row, (position, index), value in zip(rows.tolist(), nodes, values, strict=True):
            if index is None:
                act[row, position] = value.to(act.dtype)
            else:
                act[row, position, index] = value.to(act.dtype)
        return act

    return edit


@torch.no_grad()
def patched_effects(
    model: Model,
    ids: torch.Tensor,
    corrupted: dict[Site, torch.Tensor],
    nodes: Sequence[tuple[str, int, int, int | None]],
    metric: Metric,
    *,
    max_batch_rows: int = 64,
) -> torch.Tensor:
    """Exact noising effects ``[len(nodes)]`` of ``(kind, layer, position, index)`` nodes (index: the
    head or the neuron, None for ``resid``), each the mean over the corrupted copies of
    ``L(clean run with the node from copy s) − L(clean run)``; one batch row per node and copy.
    """
    clean_metric = float(metric(forward(model, ids[None]).double())[0])
    n_copies = next(iter(corrupted.values())).shape[0]
    jobs = [(i, s) for i in range(len(nodes)) for s in range(n_copies)]
    effects = torch.zeros(len(nodes), dtype=torch.float64)
    for start in range(0, len(jobs), max_batch_rows):
        part = jobs[start : start + max_batch_rows]
        by_site: dict[Site, list[int]] = {}
        for row, (i, _) in enumerate(part):
            kind, layer = nodes[i][0], nodes[i][1]
            by_site.setdefault(Site(layer, NODE_SITES[kind]), []).append(row)
        with contextlib.ExitStack() as stack:
            for site, rows in by_site.items():
                where = [(nodes[part[r][0]][2], nodes[part[r][0]][3]) for r in rows]
                values = torch.stack(
                    [
                        corrupted[site][part[r][1], p] if k is None else corrupted[site][part[r][1], p, k]
                        for r, (p, k) in zip(rows, where, strict=True)
                    ]
                )
                stack.enter_context(site_hook(model, site, _writer(where, values, torch.tensor(rows))))
            logits = forward(model, ids[None].expand(len(part), -1)).double()
        values = metric(logits).cpu() - clean_metric
        for (i, _), value in zip(part, values, strict=True):
            effects[i] += value / n_copies
    return effects


def metric(name: str, target, counter=None) -> Metric:
    """The metric ``logits [R, V]`` (float64) → ``[R]``: ``logit_diff`` (target minus ``counter``),
    ``logprob`` or ``prob`` of ``target``; ``target`` and ``counter`` are token ids, one for every
    row or ``[R]``.
    """

    def pick(values: torch.Tensor, tokens) -> torch.Tensor:
        tokens = torch.as_tensor(tokens, device=values.device).reshape(-1).expand(len(values))
        return values.gather(1, tokens[:, None])[:, 0]

    if name == "logit_diff":
        return lambda logits: pick(logits, target) - pick(logits, counter)
    if name == "logprob":
        return lambda logits: pick(logits.log_softmax(-1), target)
    return lambda logits: pick(logits.softmax(-1), target)


def node_of(kind: str, where) -> tuple:
    """``(layer, position, index)`` of the entry ``where`` (one index, or index array, per axis) of a
    ``kind`` score array; ``index`` is None for block outputs and MLP updates.
    """
    named = dict(zip(AXES[kind], where, strict=True))
    return named["layer"], named["position"], named.get("index")


def node_index(kind: str, layer, position, index=None) -> tuple:
    """The entry of a ``kind`` score array that holds the node ``(layer, position, index)``."""
    named = {"layer": layer, "position": position, "index": index}
    return tuple(named[axis] for axis in AXES[kind])
