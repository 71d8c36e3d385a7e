"""LRP propagation rules as a modified backward pass (relevance patching, RelP; Jafari et al. 2025).

Inside :func:`relp_rules` the model's forward values are unchanged, but a backward pass gives the
LRP coefficients ``∂̃L/∂x`` instead of gradients, so that ``x · ∂̃L/∂x`` is the relevance of ``x``
(LRP-0 in gradient × input form) and ``Δx · ∂̃L/∂x`` is RelP's estimate of patching ``x``. The rules:

- **LN-rule** (Ali et al. 2022): every LayerNorm / RMSNorm holds its scale ``1/ρ`` at its value, so
  the norm is linear (affine) in its input;
- **AH-rule**: the attention probabilities are held, so attention is linear in its values;
- **identity rule** (AttnLRP): an elementwise activation ``c = φ(x)`` passes relevance through
  unchanged, its slope read as ``φ(x)/x`` (0 where ``x = 0``);
- **half rule**: a gated product ``c = φ(g)·u`` gives half of its relevance to each factor
  (slopes ``½·c/g`` for the gate, with the identity rule through ``φ``, and ``½·φ(g)`` for ``u``).

Linear maps keep their gradient (LRP-0). In a model without biases, for a metric linear in the
logits, relevance is conserved: ``Σ_t x_t · ∂̃L/∂x_t = L`` at every block boundary.

Models with a part the rules do not cover are refused (:func:`relp_unsupported`): mixture-of-experts
MLPs (router weights), gated norms, attention output gates, per-layer inputs (PLE), depth-scaled
residual adds and a norm between the activation and the down projection.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from recallscope.core.attention import edit_pattern
from recallscope.core.hooks import module_hook, site_hook
from recallscope.errors import UnsupportedModelError
from recallscope.models.model import Model
from recallscope.models.sites import Site
from recallscope.models.weights import NormParams

__all__ = ["relp_rules", "relp_unsupported"]


def relp_unsupported(model: Model) -> str | None:
    """Why the rules do not cover this model, or None when they do."""
    spec = model.spec
    for layer in range(model.n_layers):
        block = spec.at(layer)
        if block.experts is not None:
            return "mixture-of-experts MLPs (no rule for the router weights)"
        if block.norm_gates:
            return "gated norms (no rule for the norm's gate)"
        if block.mlp_in is None:
            return "a norm between the MLP's activation and its down projection"
    if spec.attn_output_gate:
        return "attention output gates (no rule for the gate)"
    if spec.ple_update is not None:
        return "per-layer inputs (PLE)"
    if spec.residual_mix:
        return "depth-scaled residual adds"
    return None


@contextlib.contextmanager
def relp_rules(model: Model) -> Iterator[None]:
    """Inside: backward passes give LRP coefficients (module docstring). Enter it before hooks that
    read gradients at the sites, so that they see the rules' graph.
    """
    reason = relp_unsupported(model)
    if reason:
        raise UnsupportedModelError(f"{model.spec.family}: RelP's propagation rules do not cover {reason}")
    with contextlib.ExitStack() as stack:
        for module, params in _norms(model):
            stack.enter_context(module_hook(module, _frozen_norm(params), "fwd"))
        for layer in range(model.n_layers):
            stack.enter_context(edit_pattern(model, layer, torch.Tensor.detach))
            held: dict[str, torch.Tensor] = {}
            stack.enter_context(site_hook(model, Site(layer, "mlp_pre"), lambda x, held=held: _hold(held, x)))
            rule = _activation_rule(model, layer, held)
            stack.enter_context(site_hook(model, Site(layer, "mlp_post"), rule))
        yield


def _norms(model: Model) -> Iterator[tuple[nn.Module, NormParams]]:
    """Every norm module of the model with its parameters (each module once)."""
    seen: set[int] = set()
    paths = [(model.spec.final_norm, None), (model.spec.embed_norm, None)]
    for layer in range(model.n_layers):
        block = model.spec.at(layer)
        paths += [(p, layer) for p in (block.ln_1, block.ln_2, block.attn_post_norm, block.mlp_post_norm)]
    for path, layer in paths:
        if path is None:
            continue
        module = model.module(path, layer)
        if id(module) not in seen:
            seen.add(id(module))
            yield module, model.norm_params(path, layer)


def _frozen_norm(params: NormParams):
    """Forward hook: the norm's output, with a backward that holds ``1/ρ`` (LN-rule)."""

    def hook(module, args, kwargs, output):
        x = args[0] if args else next(v for v in kwargs.values() if torch.is_tensor(v))
        if not torch.is_tensor(output) or not x.requires_grad:
            return None
        centred = params.centre(x)
        scale = 1.0 / params.rho(x.detach())
        gain = params.gain(x.dtype, x.device)
        slope = scale if gain is None else scale * gain
        return output.detach() + _linear(centred, slope).to(output.dtype)

    return hook


def _linear(x: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    """Zero-valued, with gradient ``slope`` (held) with respect to ``x``."""
    slope = slope.detach()
    return slope * x - (slope * x).detach()


def _hold(held: dict, x: torch.Tensor) -> None:
    held["x"] = x


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den != 0, num / torch.where(den != 0, den, 1), 0).detach()


def _activation_rule(model: Model, layer: int, held: dict):
    """``mlp_post`` site edit: the same coefficients, with the identity (and half) rule's backward."""
    act, gated = model.mlp_act(layer), model.is_gated(layer)

    def rule(post: torch.Tensor) -> torch.Tensor:
        x = held.pop("x").to(post.dtype)  # the activation's input (the gate of a gated MLP)
        if not post.requires_grad:
            return post
        if not gated:
            return post.detach() + _linear(x, _ratio(post, x))
        with torch.enable_grad():
            g = x.detach().requires_grad_(True)
            phi = act(g)
            (slope,) = torch.autograd.grad(phi.sum(), g)
        up = _ratio(post, phi)
        through_up = post - (slope * up).detach() * x  # gradient to u only: φ(g)
        return post.detach() + 0.5 * _linear(x, _ratio(post, x)) + 0.5 * (through_up - through_up.detach())

    return rule
