"""Discovering an :class:`ArchSpec` from a model's module tree, its config and one traced forward.

No model class name is read. The module tree gives candidates (the token embedding and the
unembedding through transformers' public accessors, the ``ModuleList`` of blocks, linear maps by
their shapes, norms by their behaviour); one forward of a few tokens, with every module of the first
block recorded, says what each candidate does: which norm feeds the attention, which linear map
writes the attention update, whether the MLP reads the block input (parallel) or the residual after
attention (sequential), which projection feeds the activation (the gate), where a fused projection
keeps the values, which norms wrap a sublayer's output (sandwich norms), and which constants scale
the embedding, the updates and the logits. Every role is checked numerically, to the rounding of
the model's dtype; anything that does not fit raises :class:`UnsupportedModelError` naming the
module and the check. ``check_model`` then validates the spec as a whole.

::

    spec = discover_spec(hf_model)      # ArchSpec(source="discovered", ...)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from transformers.pytorch_utils import Conv1D

from recallscope.errors import UnsupportedModelError
from recallscope.models.experts import (
    bank_inputs,
    bank_of,
    expert_coefficients,
    expert_values,
    is_dense_dispatch,
    is_stacked,
)
from recallscope.models.families._common import get_module
from recallscope.models.kernels import (
    SOFTMAXES,
    InterfaceCall,
    first_interface_call,
    is_probabilities,
    probe_input,
)
from recallscope.models.offload import OffloadedWeights
from recallscope.models.spec import ArchSpec, Dims

__all__ = ["discover_spec", "norm_kind", "is_experts", "PROBE_IDS", "ACTIVATIONS"]

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": torch.nn.functional.silu,
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "relu": torch.nn.functional.relu,
    "relu2": lambda x: torch.nn.functional.relu(x).square(),
}
"""Activation functions an MLP may apply without a module of its own (LFM2's ``F.silu``)."""

PROBE_IDS = (3, 17, 5, 11, 7, 2, 13)
"""Token ids of the traced forward (taken modulo the vocabulary)."""

_SCALE = 1000.0
"""Factor a fused projection's output is scaled by to check that the kernel's values are linear in it."""

_TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


class _NotTheUpdates(UnsupportedModelError):
    """The block's output is not its input plus the updates tried (discovery may try others)."""


# -- module predicates -------------------------------------------------------------------------


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def is_experts(module: nn.Module) -> bool:
    """A mixture-of-experts bank wired to transformers' ``ExpertsInterface`` (3-D expert weights), one
    with 3-D fused gate-up and down weights that every token goes to (Llama 4), or one with 2-D gate,
    up and down weights stacked expert after expert (DBRX).
    """
    weight = getattr(module, "down_proj", None)
    if hasattr(module, "has_gate"):
        return isinstance(weight, torch.Tensor) and weight.dim() == 3
    # Llama 4's bank: every token to every expert; DBRX's: 2-D weights (models.experts)
    return is_dense_dispatch(module) or is_stacked(module)


def _is_norm(module: nn.Module) -> bool:
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return True
    params = list(module.parameters(recurse=False))
    own_only = all(not list(child.parameters()) for child in module.children())
    return "norm" in type(module).__name__.lower() and own_only and all(p.dim() == 1 for p in params)


def _out_features(module: nn.Module) -> int:
    return module.weight.shape[1] if isinstance(module, Conv1D) else module.weight.shape[0]


def _in_features(module: nn.Module) -> int:
    return module.weight.shape[0] if isinstance(module, Conv1D) else module.weight.shape[1]


# -- the traced forward --------------------------------------------------------------------------


@dataclass
class _Call:
    """First call of one module in the traced forward (float64 copies)."""

    order: int
    input: torch.Tensor | None
    output: torch.Tensor | None
    routing: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
    """``(expert index [S, k], router weights [S, k])`` an experts bank was called with."""


def _first_tensor(value) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


@dataclass
class _Trace:
    calls: dict[str, _Call] = field(default_factory=dict)
    """First call of each module."""
    later: list[tuple[str, _Call]] = field(default_factory=list)
    """Every further call of a module outside the blocks (a norm used twice, NanoChat)."""
    logits: torch.Tensor | None = None
    softmax_owner: str | None = None
    """Innermost module running when the first 4-D softmax of block 0 was taken (inline attention)."""
    softmax_value: torch.Tensor | None = None
    """The operand the first 4-D softmax output was multiplied with (the values), ``[B, H, K, d]``."""

    def get(self, name: str | None) -> _Call | None:
        return None if name is None else self.calls.get(name)


class _SoftmaxWatch(TorchFunctionMode):
    """Finds the module that takes the first ``[B, H, Q, K]`` softmax of block 0, and the values
    that softmax output is multiplied with.
    """

    def __init__(self, trace: _Trace, stack: list[str], block_prefix: str, n_heads: int, leaves=()) -> None:
        super().__init__()
        self.trace, self.stack, self.prefix, self.n_heads = trace, stack, block_prefix, n_heads
        self.leaves = set(leaves)
        """Modules that only wrap the softmax (``nn.Softmax``, CPM-Ant): their parent is the attention."""
        self.probs: torch.Tensor | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inside = [name for name in self.stack if name.startswith(self.prefix) and name not in self.leaves]
        if not inside or self.trace.softmax_value is not None:
            return out
        if (
            func in SOFTMAXES
            and isinstance(out, torch.Tensor)
            and self.probs is None
            and is_probabilities(out, self.n_heads)
        ):
            self.probs, self.trace.softmax_owner = out.reshape(-1, self.n_heads, *out.shape[-2:]), inside[-1]
        elif self.probs is not None and getattr(func, "__name__", "") in ("matmul", "bmm", "__matmul__"):
            first, second = args[0], args[1]
            if first.numel() == self.probs.numel() and torch.equal(
                first.reshape(-1).to(self.probs.dtype), self.probs.reshape(-1)
            ):  # probabilities @ values: [B, H_kv, K, d] (MQA broadcasts one head) or [B·H, K, d]
                batch = self.probs.shape[0]
                self.trace.softmax_value = second.detach().reshape(batch, -1, *second.shape[-2:]).double()
        return out


def _trace(model: nn.Module, blocks_path: str, block: int = 0) -> _Trace:
    """One forward of :data:`PROBE_IDS` recording every call of the modules outside the blocks, of
    each block, and of the modules inside block ``block`` (names relative to the model).
    """
    trace, stack, handles, open_calls, counter = _Trace(), [], [], [], [0]
    block_prefix = f"{blocks_path}.{block}"

    def record(name):
        def pre(module, args, kwargs):
            stack.append(name)
            first = _first_tensor(args) if args else _first_tensor(kwargs.get("hidden_states"))
            call = _Call(counter[0], _detached(first), None)
            if is_experts(module) and not hasattr(module, "has_gate"):  # checked against its weights
                _, index, weights = bank_inputs(module, args, kwargs)
                call.routing = (None if index is None else index.detach().clone(), _detached(weights))
            counter[0] += 1
            if name not in trace.calls:
                trace.calls[name] = call
            else:
                trace.later.append((name, call))
            open_calls.append(call)

        def post(module, args, kwargs, output):
            stack.pop()
            call = open_calls.pop()
            call.output = _detached(_first_tensor(output))

        return pre, post

    n_blocks = len(get_module(model, blocks_path))
    whole_blocks = {f"{blocks_path}.{i}" for i in range(n_blocks)}
    for name, module in model.named_modules():
        inside_blocks = name.startswith(blocks_path + ".")
        if name and (not inside_blocks or name in whole_blocks or name.startswith(block_prefix + ".")):
            pre, post = record(name)
            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(module.register_forward_hook(post, with_kwargs=True, always_call=True))
    ids = probe_input(model, PROBE_IDS)
    try:
        n_heads = int(getattr(_text_config(model), "num_attention_heads", 0) or 1)
        leaves = [name for name, m in model.named_modules() if isinstance(m, nn.Softmax | nn.Dropout)]
        with torch.no_grad(), _SoftmaxWatch(trace, stack, block_prefix, n_heads, leaves):
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    trace.logits = out.logits.detach().double()
    return trace


def _text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _detached(x: torch.Tensor | None) -> torch.Tensor | None:
    # a copy: modeling code may later add to the same tensor in place (Falcon's MLP output)
    return None if x is None or not x.is_floating_point() else x.detach().to(torch.float64, copy=True)


# -- numeric helpers -----------------------------------------------------------------------------


class _Compare:
    def __init__(self, dtype: torch.dtype) -> None:
        self.tol = _TOLERANCE.get(dtype, 3e-2)

    def close(self, a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
        if a is None or b is None:
            return False
        try:
            a, b = torch.broadcast_tensors(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]))
        except RuntimeError:
            return False
        return bool((a - b).abs().max() <= self.tol * max(1.0, float(b.abs().max())))

    def scale(self, target: torch.Tensor | None, parts: list[torch.Tensor | None]) -> float | None:
        """``c`` with ``target == c · Σ parts`` (to rounding), or None."""
        if target is None or any(p is None for p in parts):
            return None
        try:
            total = sum(p.reshape(target.shape) for p in parts)
        except RuntimeError:
            return None
        denominator = float((total * total).sum())
        if denominator == 0.0:
            return None
        c = float((target * total).sum()) / denominator
        c = 1.0 if abs(c - 1.0) <= self.tol / 10 else c  # a plain sum stays a plain sum
        return c if self.close(c * total, target) else None

    def fit(self, target, u, *vs) -> tuple[float, ...] | None:
        """``(α, β, …)`` with ``target == α u + Σ β_i v_i`` (to rounding; least squares; ``α`` near 1
        is 1), or None.
        """
        terms = (u, *vs)
        if target is None or any(t is None or t.numel() != target.numel() for t in terms):
            return None
        terms = [t.reshape(target.shape) for t in terms]  # OPT's MLP side is flat [B·T, d]
        columns = torch.stack([t.reshape(-1) for t in terms], 1)
        found = [float(c) for c in torch.linalg.lstsq(columns, target.reshape(-1, 1)).solution[:, 0]]
        found[0] = 1.0 if abs(found[0] - 1.0) <= self.tol / 10 else found[0]
        total = sum(c * t for c, t in zip(found, terms, strict=True))
        return tuple(found) if self.close(total, target) else None


# -- norms ---------------------------------------------------------------------------------------


_EPS_CANDIDATES = (1e-5, 1e-6, 1e-8, 1e-12, 1e-3, 1e-4, 1e-7, 0.0)


def norm_kind(
    module: nn.Module, d_model: int, weights: OffloadedWeights, dtype: torch.dtype
) -> tuple[str, bool, float] | None:
    """``(kind, offset_one, eps)`` of a norm module from its behaviour on random inputs: a LayerNorm
    or an RMSNorm, multiplying by ``w`` or ``1 + w``, with the ``eps`` it really adds (read from the
    module, or found on small inputs where it matters when the module does not say); None if it is
    neither kind of norm over ``d_model``.
    """
    weight, bias = weights.read(module, "weight"), weights.read(module, "bias")
    device = weight.device if weight is not None else "cpu"
    gain = None if weight is None else weight.double()
    shift = None if bias is None else bias.double()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, d_model, generator=generator, dtype=torch.float64) * 2 + 0.5
    compare = _Compare(torch.float32 if dtype == torch.float64 else dtype)  # HF norms may run in fp32
    declared = norm_eps(module)

    def formula(x, kind, offset, eps):
        centred = x - x.mean(-1, keepdim=True) if kind == "layer" else x
        y = centred / (centred.pow(2).mean(-1, keepdim=True) + eps).sqrt()
        y = y if gain is None else y * (1 + gain if offset else gain)
        return y if shift is None else y + shift

    out = _call(module, x, device, dtype)
    if out is None:
        return None
    found = [
        (kind, offset)
        for kind in ("rms", "layer")
        for offset in ((False, True) if gain is not None else (False,))
        if compare.close(out, formula(x, kind, offset, declared if declared is not None else 1e-6))
    ]
    if not found:
        return None
    kind, offset = found[0]
    small = x * 1e-3  # where eps matters
    out = _call(module, small, device, dtype)
    candidates = ([declared] if declared is not None else []) + list(_EPS_CANDIDATES)
    errors = [(float((out - formula(small, kind, offset, eps)).abs().max()), eps) for eps in candidates]
    return kind, offset, min(errors)[1] if declared is None else declared


def _call(module: nn.Module, x: torch.Tensor, device, dtype: torch.dtype) -> torch.Tensor | None:
    with torch.no_grad():
        try:
            return module(x.to(device, dtype)).double().cpu()
        except Exception:  # noqa: BLE001 - not a norm over this width
            return None


def norm_eps(module: nn.Module) -> float | None:
    """The epsilon a norm module declares (``eps``, ``variance_epsilon`` …), or None."""
    for name in ("eps", "variance_epsilon", "epsilon", "layer_norm_eps"):
        value = getattr(module, name, None)
        if isinstance(value, float | int) and not isinstance(value, bool):
            return float(value)
    return None


# -- discovery -----------------------------------------------------------------------------------


def discover_spec(model: nn.Module) -> ArchSpec:
    """Derive the :class:`ArchSpec` of a transformers ``*ForCausalLM`` (see the module docstring).

    Blocks built alike share block 0's spec. Blocks whose feed-forward, key/value heads or head
    width differ (the dense first layers of DeepSeek-style mixture-of-experts models, MiMo-V2's
    sliding-window layers with twice the key/value heads and sinks, Gemma 4's wider heads in its
    global layers) are discovered on their own and kept as ``variants``; the number of query heads
    and everything else must match block 0.

    Raises:
        UnsupportedModelError: a role could not be found or does not behave as it must; the
            message names the module and the check.
    """
    first = _Discovery(model)
    spec = first.spec()
    groups = _block_groups(get_module(model, spec.blocks))
    if len(groups) == 1:
        return _with_residual_mix(model, spec, first)
    variants = [(tuple(groups[0]), spec)]
    for group in groups[1:]:
        block = get_module(model, f"{spec.blocks}.{group[0]}")
        if spec.k_proj and not _has(block, spec.k_proj):
            raise first.error(
                f"block {group[0]} has no key projection ({spec.k_proj}) of its own, unlike block 0: it "
                "reuses the keys and values of an earlier block (cross-layer key/value sharing, "
                "Gemma 3n/4's num_kv_shared_layers), so its attention reads another block's residual"
            )
        other = _Discovery(model, block=group[0]).spec()
        differing = [
            f.name
            for f in dataclasses.fields(ArchSpec)
            if f.name not in MLP_FIELDS + KV_FIELDS + ("dims", "norm_eps")
            and getattr(other, f.name) != getattr(spec, f.name)
        ]
        if other.dims.n_heads != spec.dims.n_heads:  # one query-head count for every block (Model.n_heads)
            differing.append(f"n_heads {other.dims.n_heads} vs {spec.dims.n_heads}")
        if differing:
            raise first.error(
                f"block {group[0]} differs from block 0 beyond its feed-forward ({', '.join(differing)})"
            )
        variants.append((tuple(group), other))
    d_mlp = max(v.dims.d_mlp for _, v in variants)
    n_kv = max(v.dims.n_kv_heads for _, v in variants)
    d_head = max(v.dims.d_head for _, v in variants)
    dims = dataclasses.replace(spec.dims, d_mlp=d_mlp, n_kv_heads=n_kv, d_head=d_head)
    return _with_residual_mix(model, dataclasses.replace(spec, dims=dims, variants=tuple(variants)), first)


def _with_residual_mix(model: nn.Module, spec: ArchSpec, first: _Discovery) -> ArchSpec:
    """``spec`` with every block's residual mix (``ArchSpec.residual_mix``), fitted on one probe
    forward, when the blocks scale the residual or mix it by block (Beam); unchanged when every
    block adds ``residual_scale`` times its updates, or has parallel sublayers.
    """
    if spec.parallel:  # (their blocks must add plainly: _Discovery._updates)
        return spec
    blocks = get_module(model, spec.blocks)
    sites = {}
    for layer in range(len(blocks)):
        at, prefix = spec.at(layer), f"{spec.blocks}.{layer}."
        reads = at.ln_2 or at.mlp
        if reads is None:  # no module reads the MLP's residual: block 0 must add plainly
            betas = set(first.mix[1::2] + first.mix[4:])
            if set(first.mix[::2][:2]) != {1.0} or betas != {spec.residual_scale}:
                raise first.error("its blocks scale the residual, but nothing shows what the MLP reads")
            return spec
        late = () if at.ple_update is None else (prefix + at.ple_update,)
        sites[layer] = (prefix + at.attn_out, prefix + at.mlp_out, prefix + reads, *late)
    calls = _first_calls(
        model, [f"{spec.blocks}.{i}" for i in sites] + [p for t in sites.values() for p in t]
    )
    c, mixes = spec.residual_scale, []
    for layer, (a_path, m_path, mid_path, *late) in sites.items():
        block = calls.get(f"{spec.blocks}.{layer}")
        a, m, *late = (calls[p].output if p in calls else None for p in (a_path, m_path, *late))
        mid = calls[mid_path].input if mid_path in calls else None
        bias = spec.at(layer).attn_bias
        if bias is not None and a is not None:
            owner, _, name = bias.rpartition(".")
            holder = get_module(blocks[layer], owner) if owner else blocks[layer]
            a = a + first.weights.read(holder, name).double().to(a.device)
        mix = None if block is None else first._mixing(block.input, a, mid, m, block.output, *late)
        if mix is None:
            raise first.error(
                f"the output of block {layer} is not (constant multiples of) its input plus its attention "
                "and MLP updates: every block must add its updates to the residual as block 0 does"
            )
        beta = tuple(
            c if abs(b - c) <= first.compare.tol / 10 * max(1.0, abs(c)) else b for b in mix[1::2] + mix[4:]
        )
        mixes.append((mix[0], beta[0], mix[2], *beta[1:]))
    if all(mix[:4] == (1.0, c, 1.0, c) and set(mix[4:]) <= {c} for mix in mixes):
        return spec
    mixed = {
        "residual_scale": 1.0,
        "residual_mix": tuple(mix[:4] for mix in mixes),
        "ple_mix": tuple(mix[4] for mix in mixes if len(mix) > 4),
    }
    variants = tuple((layers, dataclasses.replace(v, **mixed)) for layers, v in spec.variants)
    return dataclasses.replace(spec, **mixed, variants=variants)


def _has(block: nn.Module, path: str) -> bool:
    try:
        get_module(block, path)
    except AttributeError:
        return False
    return True


def _first_calls(model: nn.Module, names: list[str]) -> dict[str, _Call]:
    """One forward of :data:`PROBE_IDS` recording the first call of each named module (float64)."""
    calls: dict[str, _Call] = {}

    def keep(name: str):
        def post(module, args, kwargs, output):
            if name not in calls:
                first = _first_tensor(args) if args else _first_tensor(kwargs.get("hidden_states"))
                calls[name] = _Call(len(calls), _detached(first), _detached(_first_tensor(output)))

        return post

    handles = [
        get_module(model, name).register_forward_hook(keep(name), with_kwargs=True) for name in set(names)
    ]
    ids = probe_input(model, PROBE_IDS)
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return calls


MLP_FIELDS = (
    "ln_1",
    "ln_2",
    "norm_gates",
    "mlp",
    "mlp_update",
    "mlp_in",
    "mlp_gate",
    "mlp_act",
    "mlp_activation",
    "gate_up",
    "mlp_out_proj",
    "experts",
    "shared_expert_down",
    "shared_expert_gate",
    "routed_scale",
    "gated_mlp",
    "flat_mlp",
    "mlp_post_norm",
    "attn_bias",
    "qk_norm",
    "notes",
)
"""Spec fields of the feed-forward, of the norms in front of the sublayers, of a bias added to the
attention update outside any linear map, and the (descriptive) qk-norm flag, which may differ between
blocks (``ArchSpec.variants``; Llama 4's layers without RoPE have no qk-norm)."""


KV_FIELDS = ("attention_sinks", "v_columns", "value_scale")
"""Spec fields of the key/value heads, which may differ between blocks with their number
(``ArchSpec.variants``; MiMo-V2's sliding-window layers have sinks and twice the key/value heads)."""


def _block_groups(blocks: nn.ModuleList) -> list[list[int]]:
    """Indices of blocks built alike (same module classes at the same paths, with parameters of the
    same shapes), block 0's group first.
    """
    groups: dict[tuple, list[int]] = {}
    for index, block in enumerate(blocks):
        signature = tuple(
            (name, type(module).__name__, _shapes(module)) for name, module in block.named_modules()
        )
        groups.setdefault(signature, []).append(index)
    return list(groups.values())


def _shapes(module: nn.Module) -> tuple:
    """``(name, shape)`` of a module's own parameters."""
    return tuple((name, tuple(p.shape)) for name, p in module.named_parameters(recurse=False))


class _Discovery:
    def __init__(self, model: nn.Module, block: int = 0) -> None:
        self.model = model
        self.block = block
        self.shared: dict = {}
        self.norm_gates: dict[str, str] = {}  # gated norm in front of a sublayer -> the norm inside it
        self.inner_post_norm: str | None = None
        self.weights = OffloadedWeights(model)
        self.name = type(model).__name__
        self.names = {id(m): n for n, m in model.named_modules()}
        self.embed = self._path_of(model.get_input_embeddings(), "input embedding")
        unembed = model.get_output_embeddings()
        if unembed is None or not is_linear(unembed):
            raise self.error("its output embedding is not a linear map (get_output_embeddings())")
        self.unembed = self._path_of(unembed, "output embedding")
        self.blocks = self._blocks()
        self.prefix = f"{self.blocks}.{block}."
        self.call = self._probe()
        if self.call is None and block and first_interface_call(model, PROBE_IDS) is not None:
            raise self.error(f"block {block} calls no attention kernel, though block 0 does")
        if self.call is None and "eager" not in str(model.config._attn_implementation):
            # inline attention code (no AttentionInterface) may call a fused kernel unless it runs
            # eagerly (Falcon before transformers 5.25): its probabilities are read from its softmax
            model.config._attn_implementation = "eager"
        try:
            self.trace = _trace(model, self.blocks, block)
        except UnsupportedModelError:
            raise
        except Exception as err:
            raise self.error(f"its forward failed ({type(err).__name__}: {err})") from err
        self._refuse_repeated_blocks()
        embedding = model.get_input_embeddings().weight
        self.d_model, self.dtype = embedding.shape[1], embedding.dtype
        self.compare = _Compare(self.dtype)
        self.first = self.trace.get(f"{self.blocks}.0")
        self.block0 = self.trace.get(f"{self.blocks}.{block}")
        if self.block0 is None or self.block0.output is None or self.first is None:
            raise self.error(f"its block {block} ({self.blocks}.{block}) did not run in a forward")
        if self.first.input.dim() > 3:
            raise self.error(
                "its blocks read several residual streams per position (input "
                f"{list(self.first.input.shape)}: hyper-connections, Gemma 3n's AltUp): one residual "
                "stream per position is needed"
            )
        if self.first.input.dim() >= 2 and self.first.input.shape[-2] != len(PROBE_IDS):
            raise self.error(
                f"its blocks run on {self.first.input.shape[-2]} positions for {len(PROBE_IDS)} input "
                "tokens (positions of its own prepended to the input, CPM-Ant's prompt tokens): residual "
                "positions must be the input's tokens"
            )
        if self.first.input.shape[-1] != self.d_model:
            raise self.error(
                f"its blocks are {self.first.input.shape[-1]} wide but the embedding is {self.d_model} "
                "(projected in and out, as OPT's project_in/project_out): the residual stream is not the "
                "embedding's space"
            )

    def _refuse_repeated_blocks(self) -> None:
        """A block that runs more than once in one forward applies its weights at several depths
        (HRM's nested cycles over two stacks): a layer index would not name one residual update.
        """
        runs: dict[str, int] = {}
        for name, _ in self.trace.later:
            parent, _, index = name.rpartition(".")
            if parent == self.blocks and index.isdigit():
                runs[name] = runs.get(name, 1) + 1
        if runs:
            name, count = next(iter(runs.items()))
            raise self.error(
                f"its block {name} runs {count} times in one forward: blocks applied repeatedly "
                "(recurrent depth) have no one residual update per layer"
            )

    def _probe(self) -> InterfaceCall | None:
        """This block's own first attention call (its sinks, its kernel's output); the blocks before
        it run eagerly in the probe.
        """
        within = get_module(self.model, f"{self.blocks}.{self.block}") if self.block else None
        return first_interface_call(self.model, PROBE_IDS, within)

    def error(self, what: str) -> UnsupportedModelError:
        return UnsupportedModelError(f"{self.name}: cannot discover its architecture: {what}")

    def _path_of(self, module: nn.Module | None, what: str) -> str:
        if module is None or id(module) not in self.names:
            raise self.error(f"no {what} module")
        return self.names[id(module)]

    # -- model level ------------------------------------------------------------------------------
    def _blocks(self) -> str:
        """The ``ModuleList`` holding the most parameters (the decoder blocks)."""
        lists = [
            (sum(p.numel() for p in m.parameters()), n)
            for n, m in self.model.named_modules()
            if isinstance(m, nn.ModuleList) and len(m) > 0
        ]
        if not lists:
            raise self.error("no ModuleList of blocks")
        return max(lists)[1]

    def block_call(self, path: str | None) -> _Call | None:
        return None if path is None else self.trace.get(self.prefix + path)

    def block_modules(self, within: str = "") -> list[tuple[str, nn.Module]]:
        """``(path relative to block 0, module)`` of every module of block 0 (under ``within``) that ran,
        in call order.
        """
        block = get_module(self.model, f"{self.blocks}.{self.block}")
        root = get_module(block, within) if within else block
        start = f"{within}." if within else ""
        found = []
        for name, module in root.named_modules():
            path = start + name if name else within
            call = self.block_call(path)
            if path and call is not None:
                found.append((call.order, path, module))
        return [(p, m) for _, p, m in sorted(found, key=lambda t: t[0])]

    def spec(self) -> ArchSpec:
        attn = self._attention()
        o_proj = self._o_proj(attn)
        try:
            return self._spec(attn, o_proj)
        except _NotTheUpdates as err:  # a third update after the MLP's (Gemma 4's per-layer input)?
            late = self._late_writer(attn, o_proj)
            if late is None:
                raise
            try:
                return self._spec(attn, o_proj, late)
            except _NotTheUpdates:
                raise err from None

    def _spec(self, attn: str, o_proj: str, late: str | None = None) -> ArchSpec:
        """The spec, with ``late`` (a linear map to ``d_model`` after the MLP's) the writer of a
        third update the block adds (``ArchSpec.ple_update``) when given.
        """
        moe, mlp, mlp_out_proj = self._mlp(attn, o_proj, late)
        ln_1 = self._input_norm(attn)
        parallel, ln_2 = self._mlp_norm(mlp, mlp_out_proj, attn, o_proj, ln_1)
        attn_post = self._post_norm(o_proj)
        mlp_post = self._post_norm(mlp or mlp_out_proj) or self.inner_post_norm
        ple = None if late is None else self._post_norm(late) or late
        mid = self._mlp_residual(mlp, mlp_out_proj, ln_2)
        attn_update, mlp_update, self.mix, attn_bias = self._updates(
            attn, o_proj, mlp, mlp_out_proj, attn_post, mlp_post, None if parallel else mid, ple
        )
        plain = self.mix[0] == self.mix[2] == 1.0 and len(set(self.mix[1::2] + self.mix[4:])) == 1
        residual_scale = self.mix[1] if plain else 1.0
        embed_norm, embed_scale, pos_embed, pos_table = self._embedding()
        final_norm, head_scale = self._final_norm()
        logit_scale, softcap = self._logits()
        logit_scale = logit_scale * head_scale
        kind = self._norm_kinds(
            [final_norm] + [self.prefix + p for p in (ln_1, ln_2, attn_post, mlp_post, ple) if p]
        )
        projections = self._qkv(attn, o_proj)
        mlp_parts = self._mlp_inputs(mlp, mlp_out_proj, moe)
        dims = self._dims(o_proj, projections, mlp_out_proj, moe)
        return ArchSpec(
            family=self.model.config.model_type,
            dims=dims,
            source="discovered",
            embed=self.embed,
            embed_norm=embed_norm,
            embed_scale=embed_scale,
            pos_embed=pos_embed,
            pos_table=pos_table,
            blocks=self.blocks,
            final_norm=final_norm,
            unembed=self.unembed,
            logit_scale=logit_scale,
            ln_1=ln_1,
            ln_2=ln_2,
            attn=attn,
            o_proj=o_proj,
            attn_update=attn_update,
            attn_bias=attn_bias,
            mlp=mlp,
            mlp_update=mlp_update,
            mlp_out_proj=mlp_out_proj,
            attn_post_norm=attn_post,
            mlp_post_norm=mlp_post,
            ple_update=ple,
            residual_scale=residual_scale,
            parallel=parallel,
            norm=kind[0],
            norm_offset_one=kind[1],
            norm_eps=kind[2],
            conv1d=isinstance(get_module(self.model, self.prefix + o_proj), Conv1D),
            flat_mlp=self._flat(mlp_out_proj),
            experts=moe,
            gated_mlp="mlp_gate" in mlp_parts or (moe is not None and bank_of(self._module(moe)).gated),
            qk_norm=self._qk_norm(attn),
            attention_interface=self.call is not None,
            attention_sinks=self.call is not None and self.call.sinks,
            norm_gates=tuple(self.norm_gates.items()),
            attn_output_gate=self._output_gate(attn, o_proj),
            final_logit_softcap=softcap,
            attn_logit_softcap=getattr(self.text_config, "attn_logit_softcapping", None),
            **projections,
            **mlp_parts,
        )

    @property
    def text_config(self):
        return _text_config(self.model)

    # -- attention --------------------------------------------------------------------------------
    def _attention(self) -> str:
        if self.call is not None:
            path, first = self.names.get(id(self.call.module), ""), self.prefix
            if not path.startswith(first):
                raise self.error(
                    f"the first attention call came from {path!r}, outside block {self.block}: block "
                    f"{self.block} runs no attention (hybrid models with convolution, state-space or "
                    "linear-attention layers are not supported)"
                )
            if self.call.calls > 1:
                raise self.error(
                    f"{path} calls the attention kernel {self.call.calls} times in one forward "
                    "(differential attention): one probability pattern per head is needed"
                )
            return path[len(first) :]  # the same module in every block (checked with the spec)
        owner = self.trace.softmax_owner
        if owner is None or not owner.startswith(self.prefix):
            raise self.error(
                "block 0 neither calls transformers' AttentionInterface nor takes a [B, H, Q, K] softmax "
                "(no attention: a state-space or recurrent block?)"
            )
        return owner[len(self.prefix) :]

    def _o_proj(self, attn: str) -> str:
        """The last linear map inside the attention module that writes ``d_model`` features."""
        writers = [
            p for p, m in self.block_modules(attn) if is_linear(m) and _out_features(m) == self.d_model
        ]
        if not writers:
            raise self.error(f"no output projection (a linear map to d_model) inside {self.prefix}{attn}")
        return writers[-1]

    def _output_gate(self, attn: str, o_proj: str) -> bool:
        """Is ``o_proj``'s input something other than what the attention kernel returned (a sigmoid
        gate or a norm on the heads' mix, as AFMoE and BitNet have)? Seen in the probed block.
        """
        if self.call is None or self.names.get(id(self.call.module)) != self.prefix + attn:
            return False
        z, mix = self.block_call(o_proj).input, self.call.output
        if z is None or z.numel() != mix.numel():
            raise self.error(
                f"{self.prefix}{o_proj} reads {z.shape[-1] if z is not None else 'no'} features per "
                f"position, not the {mix.shape[-2]}×{mix.shape[-1]} its attention kernel returns"
            )
        # to float32's precision: some models compute attention in float32 for float64 weights (Flint)
        loose = _Compare(torch.float32) if self.dtype == torch.float64 else self.compare
        return not self._is_kernel_output(z, loose)

    def _is_kernel_output(self, x: torch.Tensor | None, compare: _Compare) -> bool:
        """Is ``x`` what the probed attention kernel returned (its heads' mix, ``[B, Q, H, d_head]``)?"""
        mix = None if self.call is None else self.call.output
        if mix is None or x is None or x.numel() != mix.numel():
            return False
        return compare.close(x.reshape(mix.shape).double(), mix)

    def _qk_norm(self, attn: str) -> bool:
        """A norm inside the attention module other than one of the kernel's output (BitNet's sub-norm)."""
        return any(
            _is_norm(module) and not self._is_kernel_output(self.block_call(path).input, self.compare)
            for path, module in self.block_modules(attn)
        )

    def _qkv(self, attn: str, o_proj: str) -> dict:
        """Separate ``q/k/v`` projections by name, or one fused projection located by the values."""
        attn_in = self.block_call(attn).input
        readers = [
            (p, m)
            for p, m in self.block_modules(attn)
            if is_linear(m) and p != o_proj and self.compare.close(self.block_call(p).input, attn_in)
        ]
        if len(readers) >= 3:
            named = {}
            for letter, words in (
                ("q", ("q", "query", "wq")),
                ("k", ("k", "key", "wk")),
                ("v", ("v", "value", "wv")),
            ):
                for p, _ in readers:
                    leaf = p.rsplit(".", 1)[-1].lower().removesuffix("_proj")
                    if leaf in words:
                        named[f"{letter}_proj"] = p
            if len(named) == 3 or set(named) == {"k_proj", "v_proj"}:
                scale = self._value_scale(attn, named["v_proj"])
                if scale is None:  # not the kernel's values, nor a constant times them: read the kernel's
                    self.n_value_features = _out_features(self._module(named.pop("v_proj")))
                elif scale != 1.0:  # MiMo-V2's attention_value_scale
                    named["value_scale"] = scale
                return named  # no q site where queries share a projection with a gate (MiniCPM5-MoE)
        fused = [(p, m) for p, m in readers if _out_features(m) > self.d_model]
        if len(fused) == 1:
            path = fused[0][0]
            columns = self._v_columns(path)
            if columns is None or not self._scales_with(path, columns):
                # not where the kernel's values come from (latent attention's inputs), or not linearly
                # (DBRX's clip_qkv clamps them after the projection): the v site reads the kernel's
                self._kernel_value_features()
                return {}
            self.n_value_features = len(columns)
            layout = _fused_layout(
                columns, int(self.text_config.num_attention_heads), _out_features(fused[0][1])
            )
            return {"qkv_proj": path, "qkv_layout": layout, "v_columns": None if layout else columns}
        return {}  # no value projection we can read as a matrix (e.g. latent attention): W_V unavailable

    def _scales_with(self, path: str, columns: tuple[int, ...], scale: float = 1.0) -> bool:
        """Are the kernel's values still (``scale`` times) the ``columns`` of ``path``'s output when
        that output is :data:`_SCALE` times larger? Not where something after the projection is not
        linear in it (a clamp the probe's values stayed inside: DBRX's ``clip_qkv``). True where the
        kernel is not seen.
        """
        if self.call is None:
            return True
        handle = self._module(path).register_forward_hook(lambda module, args, out: out * _SCALE)
        try:
            call = self._probe()
        finally:
            handle.remove()
        if call is None:
            return False
        out = self.block_call(path).output[..., list(columns)] * _SCALE
        return self._are_values(out, call.value, scale)

    def _kernel_value_features(self) -> None:
        """Where the v site reads the kernel's values ``[B, H_kv, K, d]``: ``H_kv · d`` value features
        (not the config's head count, which a model may not use: DBRX keeps it in ``attn_config``).
        """
        if self.call is not None and self.call.value is not None:
            self.n_value_features = self.call.value.shape[1] * self.call.value.shape[-1]

    def _value_scale(self, attn: str, path: str) -> float | None:
        """The constant ``c`` with the kernel's values ``= c ×`` the output of ``path`` (1 unless the
        modeling code rescales them: MiMo-V2's ``attention_value_scale``), checked again with that
        output :data:`_SCALE` times larger (nothing after the projection clamps it); None when the
        values are no constant times the output (a norm, a clamp). 1 where the kernel is not seen.
        """
        if self.call is None:
            return 1.0
        out, values = self.block_call(path).output, self.call.value
        if out is None or out.numel() != values.numel():
            return None
        out = out.unflatten(-1, values.shape[1::2]).transpose(1, 2)
        fitted = float((out * values).sum() / (out * out).sum().clamp_min(1e-300))
        scale = 1.0 if self.compare.close(out, values) else _declared(self._module(attn), fitted)
        if not self.compare.close(out * scale, values):
            return None
        width = _out_features(self._module(path))
        return scale if self._scales_with(path, tuple(range(width)), scale) else None

    def _are_values(self, out: torch.Tensor | None, values: torch.Tensor, scale: float = 1.0) -> bool:
        """Is ``scale × out [B, T, H_kv·d]`` (head-major) the kernel's ``values [B, H_kv, K, d]``?"""
        if out is None or out.numel() != values.numel():
            return False
        return self.compare.close(out.unflatten(-1, values.shape[1::2]).transpose(1, 2) * scale, values)

    def _v_columns(self, path: str) -> tuple[int, ...] | None:
        """Columns of a fused projection's output holding the values, head-major ``[kv_head, d_head]``."""
        values = self.trace.softmax_value if self.call is None else self.call.value
        out = self.block_call(path).output
        if values is None or out is None:
            return None
        out = out[0]  # [T, out_features]
        values = values[0]  # [H_kv, T, d_head]
        columns = []
        for head in range(values.shape[0]):
            for i in range(values.shape[-1]):
                target = values[head, :, i]
                match = (
                    (out - target[:, None]).abs().max(0).values
                    <= self.compare.tol * max(1.0, float(target.abs().max()))
                ).nonzero()
                if len(match) < 1:
                    return None
                columns.append(int(match[0]))
        return tuple(columns)

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

    # -- norms ------------------------------------------------------------------------------------
    def _norm_before(self, value: torch.Tensor | None) -> str | None:
        for p, m in self.block_modules():
            if _is_norm(m) and self.compare.close(self.block_call(p).output, value):
                return p
        return None

    def _input_norm(self, attn: str) -> str | None:
        attn_in = self.block_call(attn).input
        norm = self._norm_before(attn_in) or self._gated_norm(attn_in)
        if norm is None and not self.compare.close(attn_in, self.block0.input):
            raise self.error(f"the input of {self.prefix}{attn} is neither the block input nor a norm of it")
        return norm

    def _gated_norm(self, value: torch.Tensor | None) -> str | None:
        """A module whose output is ``value`` and that holds a norm of its own input whose output it
        multiplies by an input-dependent gate (AXK2's gated RMSNorm: ``norm(x) ⊙ σ(mlp(norm(x)))``),
        recorded in ``norm_gates``; None when there is none.
        """
        for path, _ in self.block_modules():
            outer = self.block_call(path)
            if not self.compare.close(outer.output, value):
                continue
            for inner, module in self.block_modules(path):
                call = self.block_call(inner)
                if inner != path and _is_norm(module) and self.compare.close(call.input, outer.input):
                    self.norm_gates[path] = inner
                    return path
        return None

    def _mlp_norm(self, mlp, out_proj, attn, o_proj, ln_1) -> tuple[bool, str | None]:
        """``(parallel, norm in front of the MLP)``."""
        reader = mlp or out_proj
        mlp_in = self.block_call(reader).input
        if mlp is None:  # flat MLP: its first projection's input
            first = [
                p
                for p, m in self.block_modules()
                if is_linear(m) and self.block_call(p).order > self.block_call(o_proj).order
            ]
            mlp_in = self.block_call(first[0]).input if first else mlp_in
        norm = self._norm_before(mlp_in) or self._gated_norm(mlp_in)
        if self.compare.close(self._mlp_residual(mlp, out_proj, norm, mlp_in), self.block0.input):
            return True, norm
        return False, norm

    def _mlp_residual(self, mlp, out_proj, norm, mlp_in=None) -> torch.Tensor | None:
        """The residual the MLP reads: its norm's input, else its own input (``mlp_in`` when given)."""
        if norm is not None:
            return self.block_call(norm).input
        return mlp_in if mlp_in is not None else self.block_call(mlp or out_proj).input

    def _post_norm(self, writer: str | None) -> str | None:
        out = self.block_call(writer).output if writer else None
        if out is None:
            return None
        for p, m in self.block_modules():
            if _is_norm(m) and self.compare.close(self.block_call(p).input, out):
                return p
        return None

    def _updates(self, attn, o_proj, mlp, out_proj, attn_post, mlp_post, mid, late=None):
        """Which modules' outputs are the attention and MLP updates, how the block mixes them into
        the residual, ``(α_a, β_a, α_m, β_m)`` with ``mid = α_a x + β_a a`` and ``out = α_m mid + β_m m``
        (``(1, c, 1, c)``: ``out = x + c · (a + m)``; other mixes only for sequential blocks, whose
        MLP's residual ``mid`` is given), and a ``[d_model]`` parameter of the attention module that
        the block adds to its update outside any linear map (or None). With ``late``, the module
        whose output is a third update added after the MLP's, the mix has its factor ``β_p`` last
        (``out = α_m mid + β_m m + β_p p``).
        """
        x, y = self.block0.input, self.block0.output
        a_paths = [attn_post] if attn_post else [attn, o_proj]
        m_paths = [mlp_post] if mlp_post else [p for p in (mlp, out_proj) if p]
        extra = ""
        if mlp and mlp != out_proj and self._module(out_proj) is not self._module(mlp):
            if not is_experts(self._module(out_proj)) and not self._same(
                self.block_call(mlp).output, self.block_call(out_proj).output
            ):  # the MLP adds something its neurons do not write (experts outside a bank, a residual)
                m_paths = [p for p in m_paths if p != mlp]
                extra = (
                    f" ({self.prefix}{mlp}'s output is not its output projection {out_proj}'s, so it is no "
                    "update its neurons account for)"
                )
        # a bias the block adds itself (GPT-NeoX-Japanese's last block): the attention module's own
        # [d_model] parameters, tried only when the updates alone do not add up
        biases = [None] + (
            [
                f"{attn}.{name}"
                for name, param in self._module(attn).named_parameters(recurse=False)
                if param.dim() == 1 and param.numel() == self.d_model
            ]
            if not attn_post
            else []
        )
        candidates = [(bias, a, m) for bias in biases for a in a_paths for m in m_paths]
        for mixed in (False, True):  # a plain sum of updates first, for every candidate
            for bias, a, m in candidates:
                a_out, m_out = self.block_call(a).output, self.block_call(m).output
                if bias is not None and a_out is not None:
                    owner, _, name = bias.rpartition(".")
                    a_out = a_out + self.weights.read(self._module(owner), name).to(a_out.device, a_out.dtype)
                lates = [] if late is None else [self.block_call(late).output]
                c = None if mixed else self.compare.scale(y - x, [a_out, m_out, *lates])
                mix = (
                    self._mixing(x, a_out, mid, m_out, y, *lates)
                    if mixed
                    else (None if c is None else (1.0, c, 1.0, c, *(c for _ in lates)))
                )
                if mix is not None:
                    a_update = None if a in (attn, attn_post) else a
                    m_update = None if m in (mlp, mlp_post) or (mlp is None and m == out_proj) else m
                    return a_update, m_update, mix, bias
        raise _NotTheUpdates(
            f"{self.name}: cannot discover its architecture: "
            "the block output is not its input plus the attention and MLP updates, nor constant "
            f"multiples of them (checked {', '.join(a_paths)} with {', '.join(m_paths)}){extra}: "
            "post-norm blocks or another residual scheme (input-dependent residual gates, "
            "hyper-connections) are not supported"
        )

    def _mixing(self, x, a, mid, m, y, late=None) -> tuple[float, ...] | None:
        """``(α_a, β_a, α_m, β_m)`` with ``mid == α_a x + β_a a`` and ``y == α_m mid + β_m m`` (Beam's
        depth-scaled residual adds), with ``β_p`` appended and ``+ β_p late`` in ``y`` when the block
        adds a third update ``late`` (Gemma 4's per-layer input); None when they do not fit (or
        ``mid`` is None: parallel blocks).
        """
        if mid is None:
            return None
        first = self.compare.fit(mid, x, a)
        second = self.compare.fit(y, mid, m, *([] if late is None else [late]))
        if first is None or second is None or min(first[0], second[0]) <= self.compare.tol:
            return None  # (a residual kept at a scale ≤ 0 is no residual: an update includes it)
        return (*first, *second)

    def _norm_kinds(self, paths: list[str]) -> tuple[str, bool, tuple[tuple[str, float], ...]]:
        """``(kind, offset_one, eps of the norms that do not declare theirs)``; all norms must be
        of one kind.
        """
        kinds, eps = {}, []
        for path in paths:
            inner = self.norm_gates.get(path.removeprefix(self.prefix))
            path = path if inner is None else self.prefix + inner  # a gated norm: the norm inside it
            module = get_module(self.model, path)
            found = norm_kind(module, self.d_model, self.weights, self.dtype)
            if found is None:
                raise self.error(f"{path} behaves like neither a LayerNorm nor an RMSNorm over d_model")
            kinds[path] = found[:2]
            if norm_eps(module) is None:
                eps.append((path.removeprefix(self.prefix), found[2]))
        if len(set(kinds.values())) > 1:
            listed = ", ".join(f"{p}: {k[0]}{' (1+w)' if k[1] else ''}" for p, k in kinds.items())
            raise self.error(f"its norms are of different kinds ({listed})")
        kind, offset = next(iter(kinds.values()))
        return kind, offset, tuple(eps)

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


def _declared(module: nn.Module, fitted: float) -> float:
    """The float attribute of ``module`` within 1e-3 of ``fitted`` (the constant as the modeling code
    holds it, not as a low-precision probe measures it), else ``fitted``.
    """
    for value in vars(module).values():
        if isinstance(value, float) and abs(value - fitted) <= 1e-3 * abs(fitted):
            return value
    return fitted


def _fused_layout(columns: tuple[int, ...] | None, n_heads: int, width: int) -> str | None:
    """Name the layout of a fused q/k/v projection from where its values sit: ``split``
    (``[q | k | v]``), ``per_head`` (``[h: q k v]``), or None when it is neither.
    """
    if not columns:
        return None
    n_v = len(columns)
    split = tuple(range(width - n_v, width))
    if columns == split:
        return "split"
    if width == 3 * n_v and n_v % n_heads == 0:
        d_head = n_v // n_heads
        per_head = tuple(h * 3 * d_head + 2 * d_head + i for h in range(n_heads) for i in range(d_head))
        if columns == per_head:
            return "per_head"
    return None
