"""Naive attribution-patching references: one forward per node, metrics written out here.

A node is ``(kind, layer, position, index)``: ``resid`` (resid_post, index None), ``head`` (z, index
the head), ``neuron`` (mlp_post, index the neuron). :func:`set_node` runs the clean prompt with the
node's value replaced; the exact noising effect and the finite-difference derivative follow.
"""

from __future__ import annotations

import contextlib

import recallscope as rs
from recallscope import Site

SITE = {"resid": "resid_post", "mlp": "mlp_out", "head": "z", "neuron": "mlp_post"}


def node_value(cache, node):
    """The node's value in a cache of ``[B, T, …]`` sites, for every row."""
    kind, layer, position, index = node
    act = cache[Site(layer, SITE[kind])][:, position]
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
        stack.enter_context(rs.site_hook(model, Site(layer, SITE[kind]), edit))
        for site, held in (frozen or {}).items():
            stack.enter_context(rs.site_hook(model, site, lambda act, held=held: held.clone()))
        logits = rs.forward(model, ids[None])
    return float(logit_metric(logits, name, target, counter)[0])


def exact_effect(model, ids, values, node, name, target, counter=None):
    """Mean over the corrupted copies' node ``values [S, …]`` of L(clean with that value) − L(clean)."""
    clean = float(logit_metric(rs.forward(model, ids[None]), name, target, counter)[0])
    return sum(set_node(model, ids, node, v, name, target, counter) - clean for v in values) / len(values)
