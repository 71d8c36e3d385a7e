"""Site hooks: read or rewrite an activation of the native HF forward, by site name.

Everything else in ``core`` is built on :func:`site_hook`::

    def double(act):                      # act: canonical shape of the site, e.g. [B, T, d_model]
        return 2 * act
    with site_hook(model, Site(3, "mlp_out"), double):
        logits = model.hf_model(input_ids).logits

A site hook calls ``fn`` with the site's activation in its canonical shape (see
:mod:`recallscope.models.sites`). If ``fn`` returns None the forward goes on unchanged (a read);
if it returns a tensor, that tensor replaces the activation (a write). Hooks are context managers
and are always removed on exit, also after an exception. The module layouts behind a site (GPT-2's
fused ``c_attn``, NeoX's per-head q/k/v interleave, OPT's flattened MLP, tuple outputs) are
handled here and nowhere else, and so are devices: under an accelerate device map ``fn`` always
sees the activation on the model's input device (``model.device``), and a tensor it returns is
moved to the device the layer runs on, so methods never meet tensors of two devices.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from recallscope.errors import SiteError
from recallscope.models.model import Model
from recallscope.models.sites import Site

__all__ = ["site_hook", "module_hook", "stop_after", "StopForward", "SiteFn"]

SiteFn = Callable[[torch.Tensor], "torch.Tensor | None"]


class StopForward(Exception):
    """Raised by :func:`stop_after` to cut a forward pass short."""


@contextlib.contextmanager
def module_hook(module: nn.Module, fn: Callable, kind: str, *, prepend: bool = False) -> Iterator[None]:
    """Register a forward (``kind="fwd"``) or forward-pre (``"pre"``) hook with kwargs (first of the
    module's hooks with ``prepend``); remove on exit.
    """
    register = module.register_forward_pre_hook if kind == "pre" else module.register_forward_hook
    handle = register(fn, with_kwargs=True, prepend=prepend)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def stop_after(model: Model, layer: int) -> Iterator[None]:
    """Raise :class:`StopForward` once block ``layer`` has run (register it after readers)."""

    def stop(module, args, kwargs, output):
        raise StopForward

    with module_hook(model.block(layer), stop, "fwd"):
        yield


def site_hook(model: Model, site: Site, fn: SiteFn) -> contextlib.AbstractContextManager:
    """Context manager that calls ``fn`` on ``site``'s activation (canonical shape) each forward.

    ``pattern`` is served by :func:`recallscope.core.attention.pattern_hook`, which this delegates to.
    """
    if site.name == "pattern":
        from recallscope.core.attention import pattern_hook

        return pattern_hook(model, model.check_layer(site.layer), fn)
    if site.layer is not None:
        model.check_layer(site.layer)
    if site.name == "resid_mid":
        return _resid_mid_hook(model, site.layer, fn)
    if site.name == "v" and model.spec.v_proj is None and model.spec.qkv_proj is None:
        from recallscope.core.attention import kernel_value_hook

        return kernel_value_hook(model, site.layer, fn)
    if site.layer is not None and model.spec.at(site.layer).experts is not None and site.name in _NEURONS:
        if site.name == "mlp_pre":
            raise SiteError(
                f"{model.spec.family} has a mixture-of-experts MLP in block {site.layer}: mlp_pre is per "
                "expert; use mlp_post (every expert's neuron coefficients, router weight included)"
            )
        from recallscope.core.moe import moe_post_hook

        return moe_post_hook(model, site.layer, fn)
    if site.name == "pos_embed" and model.spec.pos_table:
        return _pos_table_hook(model, fn)
    module, kind, view = _locate(model, site)
    if site.name == "embed" and model.spec.embed_norm is not None:
        return _after_embedding(model, module, view, fn)
    return _hook_with_view(model, site.layer, module, kind, view, fn)


@contextlib.contextmanager
def _after_embedding(model: Model, norm: nn.Module, view: _View, fn: SiteFn) -> Iterator[None]:
    """The ``embed`` site at the embedding norm: only its call on the token embedding's output, the
    first after the embedding module ran (NanoChat's one norm module also normalizes the final
    residual, later in the same forward).
    """
    armed = [False]

    def arm(mod, args, kwargs, output):
        armed[0] = True

    def first_after_embedding() -> bool:
        fire, armed[0] = armed[0], False
        return fire

    with module_hook(model.module(model.spec.embed), arm, "fwd"):
        with _hook_with_view(model, None, norm, "fwd", view, fn, when=first_after_embedding):
            yield


@contextlib.contextmanager
def _pos_table_hook(model: Model, fn: SiteFn) -> Iterator[None]:
    """``pos_embed`` of a model that adds rows of a position table without a module (CTRL): block 0's
    input minus the ``embed`` site of the same forward; a write replaces that difference.
    """
    spec = model.spec
    embed = model.module(spec.embed)
    embed_site = _scaled(spec.embed_scale / model.stream_scale(0, "pre"))  # (in the resid sites' units)
    saved: list = [None]

    def capture(mod, args, kwargs, output):
        # a copy: the model may scale the embedding in place afterwards (CTRL)
        saved[0] = embed_site.get(_output_tensor(output)).clone()
        handles.pop().remove()

    handles: list = []

    def capture_last(mod, args, kwargs):
        # registered at each call, so it runs after every other forward hook of the embedding: a
        # written embed site is what is seen
        handles.append(embed.register_forward_hook(capture, with_kwargs=True))

    def get(raw):
        return raw - saved[0].to(raw.device, raw.dtype)

    def put(raw, new):
        return raw + (new - get(raw))

    def embedding_ran() -> bool:  # a forward from inputs_embeds (resume) has no embed site
        return saved[0] is not None

    def forget(mod, args, kwargs):  # after the site's own pre-hook: each forward its own embedding
        saved[0] = None

    block = model.block(0)
    try:
        with module_hook(embed, capture_last, "pre"):
            with _hook_with_view(model, None, block, "pre", _View(get, put), fn, when=embedding_ran):
                with module_hook(block, forget, "pre"):
                    yield
    finally:
        for handle in handles:
            handle.remove()


# -- locating sites ------------------------------------------------------------------------------


class _View:
    """How a module's tensor maps to the canonical site tensor and back."""

    def __init__(self, get: Callable, put: Callable | None = None) -> None:
        self.get = get
        self.put = put or (lambda raw, new: new.reshape(raw.shape))


_IDENTITY = _View(lambda raw: raw, lambda raw, new: new.expand(raw.shape))


def _scaled(scale: float, bias: torch.Tensor | None = None) -> _View:
    """The site is ``scale × (output + bias)``: Granite's embedding and residual multipliers, a
    residual that blocks scale (``Model.stream_scale``), a bias the block adds outside the module
    (``attn_bias``). Writing back what was read is bit-exact: elements written with the value read
    keep the module's own.
    """
    if scale == 1.0 and bias is None:
        return _IDENTITY

    def get(raw):
        return (raw if bias is None else raw + bias.to(raw.device, raw.dtype)) * scale

    def put(raw, new):
        new = new.expand(raw.shape)
        back = new / scale if bias is None else new / scale - bias.to(new.device, new.dtype)
        return torch.where(new == get(raw), raw, back)

    return _View(get, put)


def _columns_view(columns: torch.Tensor, n_heads: int) -> _View:
    """Heads ``[..., n_heads, d_head]`` read from chosen ``columns`` of a projection's output."""

    def get(raw):
        return raw[..., columns.to(raw.device)].unflatten(-1, (n_heads, -1))

    def put(raw, new):
        raw = raw.clone()
        raw[..., columns.to(raw.device)] = new.flatten(-2).to(raw.dtype)
        return raw

    return _View(get, put)


def _half_view(first: bool) -> _View:
    """One half of a fused gate-up projection's output (the gate)."""

    def get(raw):
        half = raw.shape[-1] // 2
        return raw[..., :half] if first else raw[..., half:]

    def put(raw, new):
        half = raw.shape[-1] // 2
        raw = raw.clone()
        raw[..., slice(None, half) if first else slice(half, None)] = new
        return raw

    return _View(get, put)


def _heads_view(n_heads: int, scale: float = 1.0) -> _View:
    """Heads ``[..., n_heads, d]`` of a projection's output, times ``scale`` (``value_scale``)."""
    scaled = _scaled(scale)

    def get(raw):
        return scaled.get(raw).unflatten(-1, (n_heads, -1))

    def put(raw, new):
        return scaled.put(raw, new.expand(*raw.shape[:-1], n_heads, raw.shape[-1] // n_heads).flatten(-2))

    return _View(get, put)


def _padded_heads(view: _View, width: int, full: int) -> _View:
    """``view``'s heads ``[..., h, width]`` padded with zero features to ``full`` when read and cut back
    when written (a block whose heads are narrower than the model's ``d_head``: Gemma 4).
    """
    if width >= full:
        return view

    def get(raw):
        return torch.nn.functional.pad(view.get(raw), (0, full - width))

    return _View(get, lambda raw, new: view.put(raw, new[..., :width]))


def _fused_view(model: Model, layer: int, which: int) -> _View:
    """q/k/v (``which`` = 0/1/2) from block ``layer``'s fused projection output ``[B, T, 3 * d]``."""
    n_heads, n_kv, d_head = model.n_heads, model.n_kv_heads_at(layer), model.d_head_at(layer)
    if model.spec.qkv_layout == "split":  # [q | k | v]: q has H heads, k and v H_kv each
        widths = (n_heads * d_head, n_kv * d_head, n_kv * d_head)
        start = sum(widths[:which])
        cols = slice(start, start + widths[which])
        heads = n_heads if which == 0 else n_kv

        def get(raw):
            return raw[..., cols].unflatten(-1, (heads, d_head))

        def put(raw, new):
            raw = raw.clone()
            raw[..., cols] = new.flatten(-2)
            return raw
    else:  # per head: [h0: q k v | h1: q k v | ...]
        cols = slice(which * d_head, (which + 1) * d_head)

        def get(raw):
            return raw.unflatten(-1, (n_heads, 3 * d_head))[..., cols]

        def put(raw, new):
            raw = raw.unflatten(-1, (n_heads, 3 * d_head)).clone()
            raw[..., cols] = new
            return raw.flatten(-2)

    return _View(get, put)


_NEURONS = ("mlp_pre", "mlp_post")


def padded_view(view: _View, size: int, width: int) -> _View:
    """``view`` with its last axis (``size`` neurons) padded with zeros to ``width`` when read and cut
    back to ``size`` when written (a layer with fewer neurons than the model's ``d_mlp``).
    """
    if size >= width:
        return view

    def get(raw):
        act = view.get(raw)
        return torch.cat([act, act.new_zeros(*act.shape[:-1], width - size)], dim=-1)

    return _View(get, lambda raw, new: view.put(raw, new[..., :size]))


def _locate(model: Model, site: Site) -> tuple[nn.Module, str, _View]:
    """``(module, "pre" | "fwd", view)`` for every site served by one plain hook."""
    layer, name = site.layer, site.name
    spec = model.spec if layer is None else model.spec.at(layer)
    stream = model.stream_scale(0, "pre")  # (1 unless blocks scale the residual: Model.stream_scale)
    if name == "embed":  # what enters block 0 besides position embeddings
        return model.module(spec.embed_norm or spec.embed), "fwd", _scaled(spec.embed_scale / stream)
    if name == "pos_embed":
        if spec.pos_embed is None:
            raise SiteError(f"{spec.family} has no learned position embedding (pos_embed site)")
        return model.module(spec.pos_embed), "fwd", _scaled(1 / stream)
    if name in ("resid_pre", "resid_post"):
        where = name.removeprefix("resid_")
        return (
            model.block(layer),
            ("pre" if where == "pre" else "fwd"),
            _scaled(1 / model.stream_scale(layer, where)),
        )
    gate = _IDENTITY if spec.gate_up is None else _half_view(spec.gate_up == "gate_first")
    paths = {
        "attn_out": (
            spec.attn_out,
            "fwd",
            _scaled(model.update_scale("attn", layer), model.attn_bias(layer)),
        ),
        "mlp_out": (spec.mlp_out, "fwd", _scaled(model.update_scale("mlp", layer))),
        "ple_out": (spec.ple_update, "fwd", _scaled(model.update_scale("ple", layer))),
        "z": (spec.o_proj, "pre", None),
        "mlp_pre": (spec.mlp_pre, "fwd", gate),
        "mlp_post": (spec.mlp_out_proj, "pre", _IDENTITY),
    }
    if name == "ple_out" and spec.ple_update is None:
        raise SiteError(
            f"{spec.family} adds no third update after the MLP (per-layer inputs): no ple_out site"
        )
    if name == "mlp_pre" and spec.mlp_pre is None:
        raise SiteError(
            f"{spec.family}: the input side of block {layer}'s MLP was not identified: no mlp_pre site"
        )
    if name in paths:
        path, kind, view = paths[name]
        if name in _NEURONS:
            view = padded_view(view, spec.dims.d_mlp, model.d_mlp)
        if view is None:  # z: the heads of o_proj's input
            view = _padded_heads(_heads_view(model.n_heads), spec.dims.d_head, model.d_head)
        return model.module(path, layer), kind, view
    module, kind, view = _projection(model, spec, layer, name)
    return module, kind, _padded_heads(view, spec.dims.d_head, model.d_head) if name == "v" else view


def _projection(model: Model, spec, layer: int, name: str) -> tuple[nn.Module, str, _View]:
    """The ``q``, ``k`` or ``v`` site of block ``layer`` (whose spec is ``spec``)."""
    which = "qkv".index(name)
    if spec.qkv_proj is not None and spec.qkv_layout is None:
        if name != "v" or spec.v_columns is None:
            raise SiteError(
                f"{spec.family}: the layout of its fused q/k/v projection is unknown: no {name!r} site"
            )
        return (
            model.module(spec.qkv_proj, layer),
            "fwd",
            _columns_view(torch.tensor(spec.v_columns), model.n_kv_heads_at(layer)),
        )
    if spec.qkv_proj is not None:
        return model.module(spec.qkv_proj, layer), "fwd", _fused_view(model, layer, which)
    proj = (spec.q_proj, spec.k_proj, spec.v_proj)[which]
    if proj is None:
        raise SiteError(
            f"{spec.family} has no separate {name} projection (latent attention?): no {name!r} site"
        )
    if name == "q":
        return model.module(proj, layer), "fwd", _heads_view(model.n_heads)
    scale = spec.value_scale if name == "v" else 1.0
    return model.module(proj, layer), "fwd", _heads_view(model.n_kv_heads_at(layer), scale)


# -- generic hook plumbing -------------------------------------------------------------------------


def _input_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _replace_input(args: tuple, kwargs: dict, new: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (new, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": new}


def _output_tensor(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace_output(output: Any, new: torch.Tensor) -> Any:
    return (new, *output[1:]) if isinstance(output, tuple) else new


@contextlib.contextmanager
def _hook_with_view(
    model: Model,
    layer: int | None,
    module: nn.Module,
    kind: str,
    view: _View,
    fn: SiteFn,
    when: Callable[[], bool] | None = None,
) -> Iterator[None]:
    """``fn`` on the view of ``module``'s input or output at each call (each call ``when`` allows)."""
    home = model.device  # fn sees every layer's activation here, whatever device runs the layer
    with contextlib.ExitStack() as stack:
        shape = _track_batch_shape(model, layer, stack)

        def apply(raw: torch.Tensor) -> torch.Tensor | None:
            flat = raw.dim() == 2  # OPT runs its MLP on [B*T, ...]
            raw = raw.unflatten(0, shape[0]) if flat else raw
            act = view.get(raw).to(home)
            # a module's output may be changed in place after the hook (Falcon adds the attention
            # output to its MLP output): fn gets its own copy
            new = fn(act.clone() if kind == "fwd" and act.data_ptr() == raw.data_ptr() else act)
            if new is None:
                return None
            new = view.put(raw, new.to(raw.device, raw.dtype))
            return new.flatten(0, 1) if flat else new

        if kind == "pre":

            def pre(mod, args, kwargs):
                if when is not None and not when():
                    return None
                new = apply(_input_tensor(args, kwargs))
                return None if new is None else _replace_input(args, kwargs, new)

            stack.enter_context(module_hook(module, pre, "pre"))
        else:

            def fwd(mod, args, kwargs, output):
                if when is not None and not when():
                    return None
                new = apply(_output_tensor(output))
                return None if new is None else _replace_output(output, new)

            stack.enter_context(module_hook(module, fwd, "fwd"))
        yield


def _track_batch_shape(model: Model, layer: int | None, stack: contextlib.ExitStack) -> list:
    """For flattened-MLP models, record each forward's ``(B, T)`` from the block's input."""
    shape: list = [None]
    if layer is not None and model.spec.at(layer).flat_mlp:

        def record(mod, args, kwargs):
            shape[0] = tuple(_input_tensor(args, kwargs).shape[:2])

        stack.enter_context(module_hook(model.block(layer), record, "pre"))
    return shape


@contextlib.contextmanager
def _resid_mid_hook(model: Model, layer: int, fn: SiteFn) -> Iterator[None]:
    """``resid_mid``: read at the MLP norm's input; write by rewriting ``attn_out``.

    Writing ``r'`` is done as ``attn_out' = r' - resid_pre``, so the block's own residual add
    yields ``r'`` (up to one rounding).
    """
    if model.spec.parallel:
        raise SiteError(
            f"resid_mid does not exist in {model.spec.family}: its blocks are parallel "
            "(attention and MLP both read resid_pre); use resid_pre, attn_out or mlp_out"
        )
    resid_pre: list[torch.Tensor | None] = [None]

    def remember(act):
        resid_pre[0] = act

    def rewrite_attn(attn):
        mid = resid_pre[0] + attn
        new = fn(mid)
        return None if new is None else new.to(mid.device, mid.dtype) - resid_pre[0]

    with contextlib.ExitStack() as stack:
        stack.enter_context(site_hook(model, Site(layer, "resid_pre"), remember))
        stack.enter_context(site_hook(model, Site(layer, "attn_out"), rewrite_attn))
        yield
