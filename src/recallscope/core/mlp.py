"""The MLP of a block as a function of its input residual, and its exact linearization.

Lv et al.'s "activation" analysis (``methods.md`` L5, §1.6 pitfall 2) asks how an MLP reacts to
the outputs of the heads that feed it. :func:`mlp_function` gives the MLP *with its norm* (and
Gemma-2's post-norm) as a plain function ``resid → mlp_out`` built from the native modules, so
it reproduces the model's ``mlp_out`` bit for bit; :func:`mlp_jvp` applies its Jacobian at the
actual input to any directions (forward-mode autodiff, no ``d × d`` Jacobian is built)::

    r = cache[mlp_input_site(model, 5)][:, -1]            # [B, d_model]
    m = mlp_function(model, 5)(r)                          # == cache[Site(5, "mlp_out")][:, -1]
    Jo = mlp_jvp(model, 5, r, heads)                       # heads [B, n, d_model] -> [B, n, d_model]

The MLP reads ``resid_mid`` in sequential blocks and ``resid_pre`` in parallel ones (GPT-J,
GPT-NeoX, Phi): :func:`mlp_input_site` says which.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import jvp, vmap

from recallscope.errors import ShapeError
from recallscope.models.model import Model
from recallscope.models.sites import Site

__all__ = ["mlp_input_site", "mlp_function", "mlp_jvp", "feeding_attention_layer"]


def mlp_input_site(model: Model, layer: int) -> Site:
    """The residual site MLP ``layer`` reads: ``resid_mid`` (sequential) or ``resid_pre`` (parallel)."""
    return Site(model.check_layer(layer), "resid_pre" if model.spec.parallel else "resid_mid")


def feeding_attention_layer(model: Model, layer: int) -> int | None:
    """The last attention layer whose output MLP ``layer`` reads (``layer``, or ``layer - 1`` in
    parallel blocks; None for the first MLP of a parallel model).
    """
    model.check_layer(layer)
    if not model.spec.parallel:
        return layer
    return layer - 1 if layer > 0 else None


def mlp_function(model: Model, layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``f(resid [..., d_model]) -> mlp_out [..., d_model]`` of block ``layer``, from the native modules.

    ``resid`` is the input of :func:`mlp_input_site`; the norm in front of the MLP, the MLP and
    Gemma-2's post-norm are applied as the model applies them (dropout is off in eval mode).
    """
    model.check_layer(layer)
    spec = model.spec.at(layer)
    norm = model.module(spec.mlp_norm, layer) if spec.mlp_norm else nn.Identity()
    outside = spec.mlp_post_norm is not None and not spec.mlp_post_norm_inside
    post = model.module(spec.mlp_post_norm, layer) if outside else None
    if spec.mlp is not None and spec.mlp_update is None:
        mlp = model.module(spec.mlp, layer)
    else:  # OPT's fc1 -> act -> fc2 live in the block; BLOOM's MLP module adds the residual itself
        fc_in, fc_out = model.module(spec.mlp_in, layer), model.module(spec.mlp_out_proj, layer)
        act = model.mlp_act(layer)

        def mlp(x):
            return fc_out(act(fc_in(x)))

    def f(resid: torch.Tensor) -> torch.Tensor:
        if spec.experts is not None:  # a mixture-of-experts block takes [batch, positions, d_model]
            return f_tokens(resid.reshape(-1, 1, resid.shape[-1])).reshape(resid.shape)
        return f_tokens(resid)

    stream = model.stream_scale(layer, "pre" if spec.parallel else "mid")  # the residual is D × the site
    scale = model.update_scale("mlp", layer)

    def f_tokens(resid: torch.Tensor) -> torch.Tensor:
        out = mlp(norm((resid if stream == 1.0 else resid * stream).to(model.dtype)))
        out = out[0] if isinstance(out, tuple) else out  # gpt-oss also returns its router scores
        out = out if post is None else post(out)
        return out if scale == 1.0 else out * scale

    return f


def mlp_jvp(model: Model, layer: int, resid: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Jacobian of :func:`mlp_function` at ``resid`` applied to each direction.

    Args:
        resid: ``[B, d_model]`` the MLP's actual input (one position per row).
        directions: ``[B, n, d_model]`` vectors ``v`` (e.g. head outputs).

    Returns:
        ``[B, n, d_model]``: ``J(resid_b) v_{b,i}``, the MLP's first-order response to adding
        ``v`` to its input.
    """
    if resid.dim() != 2 or directions.dim() != 3 or directions.shape[0] != resid.shape[0]:
        raise ShapeError(
            f"mlp_jvp needs resid [B, d_model] and directions [B, n, d_model]; got "
            f"{tuple(resid.shape)} and {tuple(directions.shape)}"
        )
    f = mlp_function(model, layer)
    resid = resid.to(model.device, model.dtype)
    directions = directions.to(model.device, model.dtype)

    def one(r: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return jvp(f, (r,), (v,))[1]

    with model.onloaded(model.block(layer)):
        if model.spec.at(layer).experts is None:
            try:
                with torch.no_grad():
                    return vmap(vmap(one, in_dims=(None, 0)), in_dims=(0, 0))(resid, directions)
            except RuntimeError as err:  # a custom autograd.Function (BLOOM's GELU) in the MLP
                if "autograd.Function" not in str(err):
                    raise
        # a router's data-dependent choice of experts cannot run under vmap, nor can a custom
        # autograd function under torch.func: one token and direction at a time, with autograd's
        # forward-mode product (the routing is piecewise constant, so the Jacobian at the actual
        # input keeps its experts)
        rows = [
            torch.stack([torch.autograd.functional.jvp(f, r, v)[1] for v in vs])
            for r, vs in zip(resid, directions, strict=True)
        ]
        return torch.stack(rows).detach()
