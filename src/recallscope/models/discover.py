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

``_Discovery`` takes its methods by topic from ``discover_attention``, ``discover_mlp``,
``discover_residual`` and ``discover_embedding``; the traced forward is in ``discover_trace``, the
module predicates, numeric comparison and norm identification in ``discover_modules``.

::

    spec = discover_spec(hf_model)      # ArchSpec(source="discovered", ...)
"""

from __future__ import annotations

import dataclasses

from torch import nn
from transformers.pytorch_utils import Conv1D

from recallscope.errors import UnsupportedModelError
from recallscope.models.discover_attention import _AttentionMixin
from recallscope.models.discover_embedding import _EmbeddingMixin
from recallscope.models.discover_mlp import _MlpMixin
from recallscope.models.discover_modules import (
    ACTIVATIONS,
    _Compare,
    is_experts,
    is_linear,
    norm_eps,
    norm_kind,
)
from recallscope.models.discover_residual import _NotTheUpdates, _ResidualMixin
from recallscope.models.discover_trace import PROBE_IDS, _Call, _first_calls, _text_config, _trace
from recallscope.models.experts import bank_of
from recallscope.models.families._common import get_module
from recallscope.models.kernels import InterfaceCall, first_interface_call
from recallscope.models.offload import OffloadedWeights
from recallscope.models.spec import ArchSpec

__all__ = ["discover_spec", "norm_kind", "is_experts", "PROBE_IDS", "ACTIVATIONS", "norm_eps"]


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


class _Discovery(_AttentionMixin, _MlpMixin, _ResidualMixin, _EmbeddingMixin):
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
