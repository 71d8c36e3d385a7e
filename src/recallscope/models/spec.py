"""``ArchSpec``: everything a primitive needs to know about an architecture, as data.

One spec per family (``families/*.py``) maps the native Hugging Face module tree onto the notation
of ``methods.md`` §0.3. Paths are dotted attribute paths: model-level paths start at the
``*ForCausalLM`` module, block-level paths start at one decoder block. Primitives read these fields
and never branch on model class names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["ArchSpec", "Dims"]


@dataclass(frozen=True, kw_only=True)
class Dims:
    """Sizes of the model, with TransformerLens names."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    """Key/value heads; in a spec with ``variants``, the most any block has (blocks may differ:
    ``ArchSpec.at(layer).dims``)."""
    d_model: int
    d_head: int
    """Width of each head's values (``z``); in a spec with ``variants``, the widest any block has
    (narrower blocks are padded with features that are zero: ``ArchSpec.at(layer).dims``)."""
    d_mlp: int
    d_vocab: int


@dataclass(frozen=True, kw_only=True)
class ArchSpec:
    """Module paths and structural flags of one architecture family."""

    family: str
    """Family name, e.g. ``"llama"``; recorded in provenance."""
    dims: Dims
    source: Literal["discovered", "written"] = "written"
    """``discovered`` from the module tree and a traced forward (``models.discover``), or
    ``written`` by hand in ``models/families`` (possibly over a discovered spec)."""

    # -- model-level paths ------------------------------------------------------------------
    embed: str
    """Token embedding module (its output is ``x^0`` minus positional embeddings)."""
    blocks: str
    """``ModuleList`` of decoder blocks."""
    final_norm: str
    unembed: str
    """``lm_head``; a ``Linear`` whose weight is ``W_U [V, d]`` (bias = ``b_U``, GPT-J/Phi)."""
    pos_embed: str | None = None
    """Position embedding module added to the token embedding (GPT-2, OPT, GPT-Neo), or the table of
    position vectors the model indexes itself when ``pos_table`` is set."""
    pos_table: bool = False
    """``pos_embed`` names a ``[n_positions, d_model]`` buffer or parameter whose rows the model adds to
    the (scaled) token embedding without a module (CTRL's sinusoids); the ``pos_embed`` site is then
    block 0's input minus the ``embed`` site of the same forward."""
    embed_norm: str | None = None
    """Norm applied to the token embedding before block 0 (BLOOM); the ``embed`` site is its output
    at its first call after the embedding module (it may also be ``final_norm``, NanoChat)."""
    embed_scale: float = 1.0
    """Constant the model multiplies the embedding module's output by (Granite's
    ``embedding_multiplier``); the ``embed`` site includes it."""
    logit_scale: float = 1.0
    """Constant the model multiplies the unembedding's output by (Cohere's ``logit_scale``,
    Granite's ``1 / logits_scaling``); folded into ``Model.W_U`` and ``Model.b_U``."""

    # -- block-level paths ------------------------------------------------------------------
    ln_1: str | None
    """Norm in front of attention (and, for shared-norm parallel blocks, of the MLP); None when
    the attention reads the residual itself (OLMo-2)."""
    attn: str
    """Attention module (the one that calls the attention kernel); output ``[0]`` is ``a^ℓ``
    unless ``attn_update`` or ``attn_post_norm`` is set."""
    o_proj: str
    """Output projection ``W_O``; its input is ``z`` (heads concatenated, head-major)."""
    mlp_in: str | None
    """Input projection of the MLP (``up``/``fc_in``/``c_fc``); None when discovery could not tell
    the MLP's input side (a norm between activation and down projection, BitNet)."""
    mlp_out_proj: str
    """Output projection ``W_out``; its input holds the neuron coefficients ``c_k``."""
    norm_gates: tuple[tuple[str, str], ...] = ()
    """``(path, norm)`` of each norm in front of a sublayer that multiplies its output by an
    input-dependent gate (AXK2's gated RMSNorm: ``y = norm(x) ⊙ σ(mlp(norm(x)))``): ``path``
    (``ln_1`` or ``ln_2``) is the module the sublayer reads, ``norm`` the LayerNorm or RMSNorm inside
    it, whose parameters ``Model.norm_params(path)`` gives. Linearizations of the norm freeze the gate
    ``g = y / norm(x)`` (per position and feature) at its value, as they freeze the norm's scale
    (``Model.norm_gate``)."""
    ln_2: str | None = None
    """Norm in front of the MLP (the same path as ``ln_1`` when parallel blocks share it); None when
    the MLP reads the residual itself."""
    mlp: str | None = None
    """MLP module whose output is ``m^ℓ``; None when the MLP lives in the block (OPT)."""
    mlp_gate: str | None = None
    """Gate projection of gated MLPs (its output is ``mlp_pre``)."""
    attn_update: str | None = None
    """Module whose output is the attention update when the attention module's own output is not
    (BLOOM adds the residual inside its attention module: the update is ``dense``'s output)."""
    mlp_update: str | None = None
    """Same for the MLP (BLOOM's MLP adds the residual too)."""
    attn_bias: str | None = None
    """``module.parameter`` path of a ``[d_model]`` bias that the block adds to the attention update
    outside any linear map (GPT-NeoX-Japanese's last block returns its ``attention.dense_bias`` next
    to the output, and the block adds it): the ``attn_out`` site and ``Model.b_O`` include it."""
    mlp_act: str | None = None
    """The MLP's activation module (its input is ``mlp_pre``)."""
    mlp_activation: str | None = None
    """Name of the activation function (``models.discover.ACTIVATIONS``) of an MLP that applies it
    without a module."""
    gate_up: Literal["gate_first", "up_first"] | None = None
    """``mlp_in`` and ``mlp_gate`` are one fused projection whose output is ``[gate | up]``
    (``gate_first``) or ``[up | gate]``."""
    experts: str | None = None
    """Mixture-of-experts bank (transformers' ``ExpertsInterface``); its neurons are indexed
    ``expert · d_expert + neuron`` and their coefficients include the router weight
    (``models.experts``)."""
    routed_scale: float = 1.0
    """Constant the block multiplies its routed experts' sum by, outside the bank (MiniMax-M3's
    ``routed_scaling_factor``); part of every routed neuron's coefficient."""
    shared_expert_down: str | None = None
    """Down projection of the shared expert that a mixture-of-experts block adds for every token."""
    shared_expert_gate: str | None = None
    """Linear map to one logit whose sigmoid scales the shared expert (Qwen2-MoE)."""
    v_columns: tuple[int, ...] | None = None
    """Columns of a fused q/k/v projection's output holding the values, ``[kv_head, d_head]``
    order (found by matching the values the attention kernel received)."""
    value_scale: float = 1.0
    """Constant the attention multiplies ``v_proj``'s output by before the kernel (MiMo-V2's
    ``attention_value_scale``): the ``v`` site, ``Model.W_V`` and ``Model.b_V`` include it."""
    attention_sinks: bool = False
    """Each head has a learned sink logit in its softmax (gpt-oss): probabilities sum to less than 1."""
    attn_output_gate: bool = False
    """``o_proj`` reads the heads' mix ``Σ_j α_j v_j`` times a per-position factor, not the mix itself:
    a sigmoid gate (AFMoE, MiniCPM5-MoE, Qwen3-Next) or a norm (BitNet's sub-norm). The ``z`` site
    is ``o_proj``'s input; decompositions below it read the factor with
    :func:`recallscope.core.attention.output_gate_hook`. Found by comparing ``o_proj``'s input
    with the attention kernel's output."""
    residual_scale: float = 1.0
    """Constant the model multiplies each sublayer update by before adding it (Granite's
    ``residual_multiplier``); the ``attn_out``/``mlp_out`` sites include it."""
    residual_mix: tuple[tuple[float, float, float, float], ...] = ()
    """Per block ``(α_a, β_a, α_m, β_m)`` when blocks also scale the residual they add to (Beam's
    depth-scaled adds): ``mid = α_a x + β_a a`` and ``out = α_m mid + β_m m`` for the block input
    ``x``, the attention and MLP modules' outputs ``a`` and ``m``. Sites are then in units of a
    residual stream that only adds (``Model.stream_scale``); empty when every block adds
    ``residual_scale`` times its updates."""
    ple_update: str | None = None
    """Module whose output is a third update the block adds to the residual after the MLP's
    (Gemma 3n/4's per-layer inputs, PLE: ``norm(W_proj (act(W_gate r) ⊙ e_ℓ))`` of the residual
    ``r`` after the MLP and the token's per-layer embedding ``e_ℓ``): the ``ple_out`` site, a
    component of its own in residual decompositions; None for the usual two updates."""
    ple_mix: tuple[float, ...] = ()
    """Per block the factor ``β_p`` of the third update (``out = α_m mid + β_m m + β_p p``) when
    ``residual_mix`` is set; empty otherwise (the factor is ``residual_scale``)."""
    attn_post_norm: str | None = None
    """Gemma-2 sandwich norm applied to the attention output before the residual add."""
    mlp_post_norm: str | None = None
    """Gemma-2 sandwich norm applied to the MLP output before the residual add."""
    q_proj: str | None = None
    k_proj: str | None = None
    v_proj: str | None = None
    qkv_proj: str | None = None
    """Fused q/k/v projection (GPT-2 ``c_attn``, GPT-NeoX ``query_key_value``)."""
    qkv_layout: Literal["split", "per_head"] | None = None
    """``split``: ``[q | k | v]`` (GPT-2); ``per_head``: ``[h0: q k v | h1: q k v | …]`` (NeoX)."""
    attention_interface: bool = True
    """The attention modules call transformers' ``AttentionInterface`` (probabilities come from
    recallscope's eager kernel); False for inline attention code (BLOOM, MPT, GPT-Neo), whose
    softmax output is tapped instead. Found by a probe forward (``models.kernels``), not declared."""

    # -- structural flags -------------------------------------------------------------------
    parallel: bool = False
    """``x^{ℓ+1} = x^ℓ + Attn(LN(x^ℓ)) + MLP(LN'(x^ℓ))`` (GPT-J, GPT-NeoX, Phi)."""
    norm: Literal["layer", "rms"] = "rms"
    norm_eps: tuple[tuple[str, float], ...] = ()
    """``(path, eps)`` of norms whose module does not declare its epsilon (found by discovery)."""
    norm_offset_one: bool = False
    """RMSNorm multiplies by ``1 + w`` (Gemma)."""
    conv1d: bool = False
    """Weights use GPT-2's ``Conv1D`` ``[in, out]`` layout instead of ``Linear``'s ``[out, in]``."""
    flat_mlp: bool = False
    """MLP tensors are flattened to ``[B*T, …]`` (OPT)."""
    final_logit_softcap: float | None = None
    """Gemma-2: ``logits = c · tanh(logits / c)``."""
    attn_logit_softcap: float | None = None
    """Gemma-2: attention scores are soft-capped (needs eager attention, handled there)."""
    qk_norm: bool = False
    """Qwen3: RMSNorm on queries and keys inside attention (handled by the native module)."""
    gated_mlp: bool = False
    notes: tuple[str, ...] = field(default=())
    """Human-readable notes on conventions, shown by ``check-model``."""
    variants: tuple[tuple[tuple[int, ...], ArchSpec], ...] = ()
    """When blocks' feed-forwards or key/value heads differ (the dense first layers of a
    mixture-of-experts model, MiMo-V2's sliding-window layers): ``(layers, spec)`` for every group of
    blocks built alike, block 0's first, each ``spec`` with that group's feed-forward fields, neuron
    count, key/value heads and sinks. ``dims.d_mlp`` and ``dims.n_kv_heads`` here are the largest
    counts; smaller layers are padded with neurons that write zero. Empty when every block is built
    alike."""

    def at(self, layer: int) -> ArchSpec:
        """The spec that describes block ``layer`` (itself, or the variant holding it)."""
        for layers, spec in self.variants:
            if layer in layers:
                return spec
        return self

    def block_specs(self) -> tuple[ArchSpec, ...]:
        """One spec per group of blocks built alike (itself when every block is)."""
        return tuple(spec for _, spec in self.variants) or (self,)

    def d_head_at(self, layer: int) -> int:
        """Width of block ``layer``'s heads before padding."""
        return self.at(layer).dims.d_head

    def n_kv_heads_at(self, layer: int) -> int:
        """Key/value heads of block ``layer``."""
        return self.at(layer).dims.n_kv_heads

    def d_mlp_at(self, layer: int) -> int:
        """Neurons of block ``layer``'s feed-forward before padding."""
        return self.at(layer).dims.d_mlp

    def describe(self) -> str:
        """Every field that is set, one per line (``check-model`` prints it)."""
        lines = [f"spec ({self.source}): {self.family}"]
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if item.name in ("family", "source") or value in (None, False, (), 1.0):
                continue
            if item.name == "v_columns":
                value = f"{len(value)} columns"
            if item.name == "variants":
                value = "; ".join(
                    f"layers {list(layers)}: mlp={v.mlp}, experts={v.experts}, n_kv_heads="
                    f"{v.dims.n_kv_heads}, d_head={v.dims.d_head}, attention_sinks={v.attention_sinks}"
                    for layers, v in value
                )
            lines.append(f"  {item.name} = {value}")
        return "\n".join(lines)

    @property
    def attn_out(self) -> str:
        """Block-level module whose output (``[0]``) is the attention update of the residual
        (times ``residual_scale``).
        """
        return self.attn_post_norm or self.attn_update or self.attn

    @property
    def mlp_out(self) -> str:
        """Block-level module whose output is the MLP update of the residual (times ``residual_scale``)."""
        return self.mlp_post_norm or self.mlp_update or self.mlp or self.mlp_out_proj

    @property
    def mlp_post_norm_inside(self) -> bool:
        """The MLP's post-norm is a submodule of the MLP module: the block normalizes its experts'
        sum itself (AXK1), so calling the MLP module already applies it.
        """
        return self.mlp is not None and (self.mlp_post_norm or "").startswith(f"{self.mlp}.")

    @property
    def mlp_pre(self) -> str | None:
        """Block-level module whose output is the input of the MLP activation."""
        return self.mlp_gate or self.mlp_in

    @property
    def mlp_norm(self) -> str | None:
        """Norm whose output feeds the MLP (None: the MLP reads the residual itself)."""
        return self.ln_2
