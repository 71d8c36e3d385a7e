"""Naive attribution-patching references: one forward per node, metrics written out here.

A node is ``(kind, layer, position, index)``: ``resid`` (resid_post, index None), ``head`` (z, index
the head), ``neuron`` (mlp_post, index the neuron), ``query`` / ``key`` (the attention kernel's query of
head ``index`` / key of key-value head ``index``). :func:`set_node` runs the clean prompt with the
node's value replaced; the exact noising effect and the finite-difference derivative follow.
:func:`softmax_effect` is AtP*'s query/key term from a really patched attention pattern.
"""

from __future__ import annotations

import contextlib

import torch

import recallscope as rs
from recallscope import Site
from recallscope.core.attention import kernel_qk_hook

SITE = {"resid": "resid_post", "mlp": "mlp_out", "head": "z", "neuron": "mlp_post"}


def node_value(cache, node):
    """The node's value in a cache of ``[B, T, …]`` sites, for every row."""
    kind, layer, position, index = node
    act = cache[Site(layer, SITE[kind])][:, position]
    return act if index is None else act[:, index]


def _hook(model, kind, layer, fn):
    """``fn(act [B, T, …])`` on the node type's activation (queries and keys: kernel layout moved to
    ``[B, T, heads, d]``)."""
    if kind not in ("query", "key"):
        return rs.site_hook(model, Site(layer, SITE[kind]), fn)
    which = ("query", "key").index(kind)

    def on_kernel(q, k, scaling, softcap):
        pair = [q, k]
        new = fn(pair[which])
        if new is not None:
            pair[which] = new
            return tuple(pair)
        return None

    return kernel_qk_hook(model, layer, on_kernel)


def read_node(model, ids, node):
    """The node's value ``[B, …]`` in a forward of ``ids [B, T]``."""
    kind, layer, position, index = node
    seen = []
    with _hook(model, kind, layer, lambda act: seen.append(act.detach().clone())):
        rs.forward(model, ids)
    act = seen[0][:, position]
    return act if index is None else act[:, index]


def logit_metric(logits, name, target, counter=None):
    """``[R]`` metric of last-position logits ``[R, V]`` (float64)."""
    logits = logits.double()
    if name == "logit_diff":
        return logits[:, target] - logits[:, counter]
    shifted = logits - logits.max(-1, keepdim=True).values
    logprob = shifted[:, target] - shifted.exp().sum(-1).log()
    return logprob if name == "logprob" else logprob.exp()


def set_node(model, ids, node, value, name, target, counter=None, frozen=None):
    """The metric of the clean prompt ``ids [T]`` run with ``node`` set to ``value`` (and, after it,
    every site of ``frozen`` held at the given value)."""
    kind, layer, position, index = node

    def edit(act):
        act = act.clone()
        if index is None:
            act[0, position] = value
        else:
            act[0, position, index] = value
        return act

    with contextlib.ExitStack() as stack:
        stack.enter_context(_hook(model, kind, layer, edit))
        for site, held in (frozen or {}).items():
            stack.enter_context(rs.site_hook(model, site, lambda act, held=held: held.clone()))
        logits = rs.forward(model, ids[None])
    return float(logit_metric(logits, name, target, counter)[0])


def exact_effect(model, ids, values, node, name, target, counter=None):
    """Mean over the corrupted copies' node ``values [S, …]`` of L(clean with that value) − L(clean)."""
    clean = float(logit_metric(rs.forward(model, ids[None]), name, target, counter)[0])
    return sum(set_node(model, ids, node, v, name, target, counter) - clean for v in values) / len(values)


def read_pattern(model, ids, layer, edit=None):
    """Layer ``layer``'s attention probabilities ``[H, T, T]`` in a forward of ``ids [T]``, with the
    node edit ``edit = (node, value)`` applied, and the metric's gradient with respect to them when
    no edit is given (``metric``: logits ``[1, V]`` → ``[1]``)."""
    seen = []
    with contextlib.ExitStack() as stack:
        if edit is not None:
            (kind, lay, position, index), value = edit

            def put(act):
                act = act.clone()
                act[0, position, index] = value
                return act

            stack.enter_context(_hook(model, kind, lay, put))
        stack.enter_context(rs.site_hook(model, Site(layer, "pattern"), lambda p: seen.append(p.detach()[0])))
        rs.forward(model, ids[None])
    return seen[0]


def pattern_gradient(model, ids, layer, name, target, counter=None):
    """``∂L/∂A [H, T, T]`` of layer ``layer``'s attention pattern on the clean run."""
    held = {}

    def leaf(p):
        held["p"] = p.detach().clone().requires_grad_(True)
        return held["p"]

    with torch.enable_grad(), rs.site_hook(model, Site(layer, "pattern"), leaf):
        logits = model.hf_model(ids[None], use_cache=False).logits[:, -1]
        (grad,) = torch.autograd.grad(logit_metric(logits, name, target, counter).sum(), held["p"])
    return grad[0].double()


def softmax_effect(model, ids, node, values, name, target, counter=None):
    """AtP*'s term for a query or key node: mean over ``values`` of ``Σ (A' − A) · ∂L/∂A`` with ``A'`` the
    layer's pattern in a forward with the node really set to the value (one forward each)."""
    layer = node[1]
    clean = read_pattern(model, ids, layer).double()
    grad = pattern_gradient(model, ids, layer, name, target, counter)
    total = 0.0
    for value in values:
        patched = read_pattern(model, ids, layer, (node, value)).double()
        total += float(((patched - clean) * grad).sum())
    return total / len(values)
