"""Attribution patching (AtP; Nanda 2023, Kramár et al. 2024): the first-order estimate of every node's
noising effect from one clean forward and one backward, and its check by real patching.

For a node ``n`` (a state at one position), a clean prompt and a corrupted copy of it::

    effect(n) = L(clean run with n ← n(corrupted)) − L(clean run)  ≈  (n(corrupted) − n(clean)) · ∂L/∂n

with the gradient taken on the clean run. Nodes (``NODES``): ``resid`` (block ``ℓ``'s output at a
position), ``mlp`` (its MLP update), ``head`` (head ``h``'s output ``z`` at a position, before
``W_O``), ``neuron`` (MLP neuron ``k``'s coefficient ``mlp_post``), and ``query`` / ``key`` (head
``h``'s query, or key-value head ``g``'s key, as the attention kernel reads them: after RoPE and any
q/k norm). With several corrupted copies (Gaussian noise, resampling), estimates and effects are means
over the copies.

Query and key nodes act only through the attention softmax, where a first-order term fails once the
softmax saturates. AtP*'s fix (``qk_fix``; Kramár et al. §3.1) recomputes the patched attention row
exactly and takes the first-order term only after it::

    query (h, i):  Σ_j (A'_ij − A_ij) · ∂L/∂A_ij,  A'_i = softmax(s_i + Δ_i),  Δ_ij = s(q'_i, k_j) − s_ij
    key   (g, j):  Σ_{h ∈ g} Σ_i (A'_i − A_i) · ∂L/∂A_i,  only column j's score changed

(``s`` the score with its scaling and soft-cap; masked entries stay 0; sink logits stay in the
normalizer). With ``rules="relp"`` the gradients are LRP coefficients (:mod:`recallscope.core.lrp`).

::

    grads = clean_gradients(model, ids, metric)                 # one forward, one backward
    corrupted = corrupted_states(model, bad)                    # one forward of the copies
    scores = estimates(grads, corrupted)                        # {"resid": [T, L], "head": [L, H, T], ...}
    exact = patched_effects(model, ids, corrupted, nodes, metric)  # one batch row per node and copy
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from recallscope.core.attention import kernel_qk_hook
from recallscope.core.cache import forward
from recallscope.core.corruption import Corrupted
from recallscope.core.hooks import site_hook
from recallscope.core.lrp import relp_rules
from recallscope.core.tokens import PromptBatch
from recallscope.models.model import Model
from recallscope.models.sites import Site

__all__ = [
    "NODES",
    "NODE_SITES",
    "KERNEL_NODES",
    "AXES",
    "node_of",
    "node_index",
    "node_hook",
    "Gradients",
    "States",
    "clean_gradients",
    "corrupted_states",
    "estimates",
    "graddrop",
    "patched_effects",
]

NODES = ("resid", "mlp", "head", "neuron", "query", "key")
NODE_SITES = {"resid": "resid_post", "mlp": "mlp_out", "head": "z", "neuron": "mlp_post"}
KERNEL_NODES = ("query", "key")
"""Nodes read from the attention kernel's inputs (:func:`~recallscope.core.attention.kernel_qk_hook`)."""

AXES = {
    "resid": ("position", "layer"),
    "mlp": ("position", "layer"),
    "head": ("layer", "index", "position"),
    "neuron": ("layer", "position", "index"),
    "query": ("layer", "index", "position"),
    "key": ("layer", "index", "position"),
}
"""The axes of each node type's score array (:func:`estimates`); ``index``: the head, the key-value
head or the neuron."""

Metric = Callable[[torch.Tensor], torch.Tensor]
"""``logits [R, V]`` of the last position → ``[R]`` metric values."""

Key = tuple[str, int]
"""``(node type, layer)``: one node type's activations in one block."""


@dataclass(frozen=True)
class Gradients:
    """The clean run's metric, and per ``(node type, layer)`` its activation and the metric's
    gradient, ``[T, …]``; with query or key nodes also per layer the attention pattern and its
    gradient ``[H, T, T]`` and the scores' ``(scaling, softcap)``.
    """

    metric: float
    acts: dict[Key, torch.Tensor]
    grads: dict[Key, torch.Tensor]
    patterns: dict[int, tuple[torch.Tensor, torch.Tensor]]
    scores: dict[int, tuple[float, float | None]]


@dataclass(frozen=True)
class States:
    """Every node of the corrupted rows, ``[S, T, …]`` per ``(node type, layer)``, and their
    last-position logits ``[S, V]``.
    """

    acts: dict[Key, torch.Tensor]
    logits: torch.Tensor


def _keys(model: Model, nodes: Sequence[str]) -> list[Key]:
    return [(n, layer) for n in nodes for layer in range(model.n_layers)]


def node_hook(model: Model, kind: str, layer: int, fn: Callable) -> contextlib.AbstractContextManager:
    """``fn(act [B, T, …])`` on node type ``kind``'s activation in block ``layer`` (a read, or a write
    if it returns a new one); queries ``[B, T, H, d]`` and keys ``[B, T, H_kv, d]`` as the kernel reads
    them.
    """
    if kind not in KERNEL_NODES:
        return site_hook(model, Site(layer, NODE_SITES[kind]), fn)
    which = KERNEL_NODES.index(kind)

    def on_kernel(query, key, scaling, softcap):
        pair = [query, key]
        new = fn(pair[which])
        if new is None:
            return None
        pair[which] = new
        return tuple(pair)

    return kernel_qk_hook(model, layer, on_kernel)


def clean_gradients(
    model: Model,
    prompt: torch.Tensor | PromptBatch,
    metric: Metric,
    nodes: Sequence[str] = NODES,
    *,
    dropped_layer: int | None = None,
    rules: str = "gradient",
) -> Gradients | list[Gradients]:
    """One forward and one backward of the clean prompt ``ids [T]`` (a :class:`Gradients`), or of
    every row of a left-padded ``PromptBatch`` at once (one per row, cut to its real tokens; the
    metric maps ``[B, V]`` logits to ``[B]`` and the rows do not interact).

    ``dropped_layer``: no gradient flows back through that block's attention and MLP updates
    (GradDrop's pass for that layer); its own nodes then get a zero gradient. ``rules="relp"``: LRP
    coefficients instead of gradients (:func:`recallscope.core.lrp.relp_rules`).
    """
    batched = isinstance(prompt, PromptBatch)
    inputs = prompt.model_inputs(model.device) if batched else {"input_ids": prompt[None].to(model.device)}
    pads = prompt.pad_lengths.tolist() if batched else [0]
    captured: dict = {}
    scores: dict[int, tuple[float, float | None]] = {}

    def start(act):  # the graph starts at the embeddings: weights may not require grad
        return act.detach().requires_grad_(True)

    def keep(key):
        def capture(act):  # written back, so the rest of the forward reads this tensor
            held = key[0] == "pattern" and not act.requires_grad  # held by RelP: a gradient above it
            captured[key] = act.detach().requires_grad_(True) if held else act.clone()
            return captured[key]

        return capture

    with torch.enable_grad(), contextlib.ExitStack() as stack:
        stack.enter_context(site_hook(model, Site(None, "embed"), start))
        if rules == "relp":
            stack.enter_context(relp_rules(model))
        if dropped_layer is not None:
            for name in ("attn_out", "mlp_out"):
                stack.enter_context(site_hook(model, Site(dropped_layer, name), torch.Tensor.detach))
        wanted = _capture(stack, model, nodes, keep, scores)
        logits = model.hf_model(**inputs, use_cache=False, logits_to_keep=1).logits
        values = metric(logits[:, -1].double())
        live = [k for k in wanted if captured[k].requires_grad]
        found = torch.autograd.grad(values.sum(), [captured[k] for k in live], allow_unused=True)
        grads = dict(zip(live, found, strict=True))
    out = []
    for row, pad in enumerate(pads):
        acts = {k: _cut(v, k, row, pad).detach() for k, v in captured.items()}
        g = {
            k: torch.zeros_like(acts[k]) if grads.get(k) is None else _cut(grads[k], k, row, pad)
            for k in wanted
        }
        patterns = {k[1]: (acts.pop(k), g.pop(k)) for k in wanted if k[0] == "pattern"}
        out.append(Gradients(float(values[row].detach()), acts, g, patterns, dict(scores)))
    return out if batched else out[0]


def _cut(tensor: torch.Tensor, key: Key, row: int, pad: int) -> torch.Tensor:
    """Row ``row``'s real tokens: ``[T, …]``, or ``[H, T, T]`` for a pattern."""
    return tensor[row, :, pad:, pad:] if key[0] == "pattern" else tensor[row, pad:]


def _capture(stack: contextlib.ExitStack, model: Model, nodes: Sequence[str], keep, scores: dict) -> list:
    """Enter the hooks that keep every node's activation (``keep(key)``), and with query or key nodes
    every layer's pattern, both sides of its scores and their ``(scaling, softcap)``; returns the
    keys to differentiate.
    """
    keys = _keys(model, nodes)
    for key in keys:
        stack.enter_context(node_hook(model, *key, keep(key)))
    if not any(n in KERNEL_NODES for n in nodes):
        return keys

    def read_scores(layer):
        def read(query, key, scaling, softcap):
            scores[layer] = (float(scaling), None if softcap is None else float(softcap))

        return read

    for layer in range(model.n_layers):
        stack.enter_context(site_hook(model, Site(layer, "pattern"), keep(("pattern", layer))))
        stack.enter_context(kernel_qk_hook(model, layer, read_scores(layer)))
        for kind in KERNEL_NODES:
            if kind not in nodes:  # the other side of the scores, read without a gradient
                stack.enter_context(node_hook(model, kind, layer, keep((kind, layer))))
    return keys + [("pattern", layer) for layer in range(model.n_layers)]


def graddrop(
    model: Model,
    ids: torch.Tensor,
    metric: Metric,
    corrupted: States,
    nodes: Sequence[str] = NODES,
    *,
    rules: str = "gradient",
) -> dict[str, torch.Tensor]:
    """AtP* GradDrop scores ``1/(L−1) Σ_ℓ |Δn · ∂L/∂n with no gradient through block ℓ's updates|``
    of every node (shapes as :func:`estimates`; ``L`` passes of one forward and one backward).

    A node whose direct and indirect effects cancel has a small AtP but a large GradDrop score,
    because dropping one path uncovers the other (Kramár et al. 2024, §3.3).
    """
    total: dict[str, torch.Tensor] = {}
    for layer in range(model.n_layers):
        grads = clean_gradients(model, ids, metric, nodes, dropped_layer=layer, rules=rules)
        for name, part in estimates(grads, corrupted).items():
            total[name] = total.get(name, 0) + part.abs()
    return {name: value / max(1, model.n_layers - 1) for name, value in total.items()}


@torch.no_grad()
def corrupted_states(model: Model, bad: Corrupted | PromptBatch, nodes: Sequence[str] = NODES) -> States:
    """Every node of the corrupted copies, ``[S, T, …]``, and their last-position logits, from one
    forward of the ``S`` rows; or of every row of a ``PromptBatch`` of corrupted prompts (padded).
    """
    acts: dict[Key, torch.Tensor] = {}

    def store(key):
        def save(act):
            acts[key] = act.detach().clone()

        return save

    with contextlib.ExitStack() as stack:
        if isinstance(bad, Corrupted):
            stack.enter_context(bad.applied(model))
        for key in _keys(model, nodes):
            stack.enter_context(node_hook(model, *key, store(key)))
        logits = forward(model, bad if isinstance(bad, PromptBatch) else bad.ids)
    return States(acts, logits)


def estimates(grads: Gradients, corrupted: States, *, qk_fix: bool = True) -> dict[str, torch.Tensor]:
    """AtP scores of every node (float64): ``resid``/``mlp [T, L]``, ``head [L, H, T]``, ``neuron
    [L, T, d_mlp]``, ``query [L, H, T]``, ``key [L, H_kv, T]`` (0 for the missing heads of a block
    with fewer); ``(mean corrupted − clean) · grad``,
    and for queries and keys with ``qk_fix`` the recomputed softmax (module docstring), averaged over
    the copies.
    """
    out: dict[str, list[torch.Tensor]] = {}
    for (kind, layer), grad in grads.grads.items():
        act, bad = grads.acts[(kind, layer)].double(), corrupted.acts[(kind, layer)].double()
        if kind in KERNEL_NODES and qk_fix:
            score = _softmax_effects(kind, layer, grads, bad)
        else:
            product = (bad.mean(0) - act) * grad.double()
            score = product if kind == "neuron" else product.sum(-1)
            score = score.T if kind in ("head", *KERNEL_NODES) else score  # [H, T]
        out.setdefault(kind, []).append(score)
    stacked = {name: torch.stack(_padded(parts)) for name, parts in out.items()}
    for name in ("resid", "mlp"):
        if name in stacked:
            stacked[name] = stacked[name].T  # [T, L]
    return stacked


def _padded(parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Layers with fewer key-value heads (MiMo-V2's sliding-window blocks) padded with zero scores."""
    rows = max(p.shape[0] for p in parts)
    if all(p.shape[0] == rows for p in parts):
        return parts
    return [torch.nn.functional.pad(p, (0, 0, 0, rows - p.shape[0])) for p in parts]


_MAX_SHIFT = 700.0
"""Score changes above this are clipped (``e^700`` is near float64's largest number)."""


def _softmax_effects(kind: str, layer: int, grads: Gradients, bad: torch.Tensor) -> torch.Tensor:
    """AtP* effects ``[H, T]`` (queries) or ``[H_kv, T]`` (keys) of one layer, mean over the copies
    ``bad [S, T, heads, d]``: the attention rows recomputed exactly, the rest to first order.
    """
    a, g = (t.double() for t in grads.patterns[layer])  # [H, T, T] (query × key)
    scaling, softcap = grads.scores[layer]
    q, k = grads.acts[("query", layer)].double(), grads.acts[("key", layer)].double()
    groups = q.shape[1] // k.shape[1]

    def score(q, k):  # [T, H, d], [T, H_kv, d] -> [H, T, T]
        raw = torch.einsum("ihd,jhd->hij", q, k.repeat_interleave(groups, dim=1)) * scaling
        return raw if softcap is None else softcap * torch.tanh(raw / softcap)

    clean, total = score(q, k), 0.0
    for copy in bad:
        shift = (score(copy, k) if kind == "query" else score(q, copy)) - clean
        shift = shift.clamp(max=_MAX_SHIFT)
        if kind == "query":  # row i's logits all move: renormalize, sinks' mass (1 − Σ_j A_ij) kept
            logits = torch.where(a > 0, a.log() + shift, -math.inf)
            sink = (1 - a.sum(-1)).clamp(min=0).log()
            patched = (logits - torch.logaddexp(logits.logsumexp(-1), sink)[..., None]).exp()
            total = total + ((patched - a) * g).sum(-1)  # [H, T]
        else:  # only column j moves: closed form of Σ_m (A'_im − A_im) G_im per (i, j)
            grown = a * torch.expm1(shift)
            mean_g = (a * g).sum(-1, keepdim=True)
            change = torch.where(a > 0, grown / (1 + grown) * (g - mean_g), 0)
            total = total + change.sum(1).reshape(k.shape[1], groups, -1).sum(1)  # [H_kv, T]
    return total / len(bad)


def _writer(nodes: Sequence[tuple[int, int | None]], values: torch.Tensor, rows: torch.Tensor):
    """Node edit: row ``rows[i]`` gets ``values[i]`` at position ``nodes[i][0]`` (index ``nodes[i][1]``)."""

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
    corrupted: States,
    nodes: Sequence[tuple[str, int, int, int | None]],
    metric: Metric,
    *,
    max_batch_rows: int = 64,
) -> torch.Tensor:
    """Exact noising effects ``[len(nodes)]`` of ``(kind, layer, position, index)`` nodes (index: the
    head, key-value head or neuron, None for ``resid`` and ``mlp``), each the mean over the corrupted
    copies of ``L(clean run with the node from copy s) − L(clean run)``; one batch row per node and copy.
    """
    clean_metric = float(metric(forward(model, ids[None]))[0])
    n_copies = len(corrupted.logits)
    jobs = [(i, s) for i in range(len(nodes)) for s in range(n_copies)]
    effects = torch.zeros(len(nodes), dtype=torch.float64)
    for start in range(0, len(jobs), max_batch_rows):
        part = jobs[start : start + max_batch_rows]
        by_key: dict[Key, list[int]] = {}
        for row, (i, _) in enumerate(part):
            by_key.setdefault((nodes[i][0], nodes[i][1]), []).append(row)
        with contextlib.ExitStack() as stack:
            for key, rows in by_key.items():
                where = [(nodes[part[r][0]][2], nodes[part[r][0]][3]) for r in rows]
                bad = corrupted.acts[key]
                values = torch.stack(
                    [
                        bad[part[r][1], p] if k is None else bad[part[r][1], p, k]
                        for r, (p, k) in zip(rows, where, strict=True)
                    ]
                )
                stack.enter_context(node_hook(model, *key, _writer(where, values, torch.tensor(rows))))
            values = metric(forward(model, ids[None].expand(len(part), -1))).cpu() - clean_metric
        for (i, _), value in zip(part, values, strict=True):
            effects[i] += value / n_copies
    return effects


def metric(name: str, target, counter=None) -> Metric:
    """The metric ``logits [R, V]`` → ``[R]`` float64: ``logit_diff`` (target minus ``counter``),
    ``logprob`` or ``prob`` of ``target``; ``target`` and ``counter`` are token ids, one for every
    row or ``[R]``. Computed in float64 whatever the logits' dtype (``logit_diff`` widens only the
    two columns it reads).
    """

    def pick(values: torch.Tensor, tokens) -> torch.Tensor:
        tokens = torch.as_tensor(tokens, device=values.device).reshape(-1).expand(len(values))
        return values.gather(1, tokens[:, None])[:, 0]

    if name == "logit_diff":  # two columns: widened after picking them
        return lambda logits: pick(logits, target).double() - pick(logits, counter).double()
    if name == "logprob":
        return lambda logits: pick(logits.double().log_softmax(-1), target)
    return lambda logits: pick(logits.double().softmax(-1), target)


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
