"""``ArchSpec``: everything a primitive needs to know about an architecture, as data.

One spec per family (``families/*.py``) maps the native Hugging Face module tree onto the notation
of ``methods.md`` §0.3. Paths are dotted attribute paths: model-level paths start at the
``*ForCausalLM`` module, block-level paths start at one decoder block. Primitives read these fields
and never branch on model class names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["ArchSpec", "Dims"]


@dataclass(frozen=True, kw_only=True)
class Dims:
    """Sizes of the model, with TransformerLens names."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    d_vocab: int

    @property
    def n_groups(self) -> int:
        """Query heads per key/value head (1 for MHA, ``n_heads`` for MQA)."""
        return self.n_heads // self.n_kv_heads


@dataclass(frozen=True, kw_only=True)
class ArchSpec:
    """Module paths and structural flags of one architecture family."""

    family: str
    """Family name, e.g. ``"llama"``; recorded in provenance."""
    dims: Dims

    # -- model-level paths ------------------------------------------------------------------
    embed: str
    """Token embedding module (its output is ``x^0`` minus positional embeddings)."""
    blocks: str
    """``ModuleList`` of decoder blocks."""
    final_norm: str
    unembed: str
    """``lm_head``; a ``Linear`` whose weight is ``W_U [V, d]`` (bias = ``b_U``, GPT-J/Phi)."""
    pos_embed: str | None = None
    """Learned absolute position embedding (GPT-2, OPT)."""

    # -- block-level paths ------------------------------------------------------------------
    ln_1: str
    """Norm in front of attention (and, for shared-norm parallel blocks, of the MLP)."""
    attn: str
    """Attention module; output ``[0]`` is ``a^ℓ`` unless ``attn_post_norm`` is set."""
    o_proj: str
    """Output projection ``W_O``; its input is ``z`` (heads concatenated, head-major)."""
    mlp_in: str
    """Input projection of the MLP (``up``/``fc_in``/``c_fc``)."""
    mlp_out_proj: str
    """Output projection ``W_out``; its input holds the neuron coefficients ``c_k``."""
    ln_2: str | None = None
    """Norm in front of the MLP; None when parallel blocks share ``ln_1``."""
    mlp: str | None = None
    """MLP module whose output is ``m^ℓ``; None when the MLP lives in the block (OPT)."""
    mlp_gate: str | None = None
    """Gate projection of gated MLPs (its output is ``mlp_pre``)."""
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
    probs_module: str | None = None
    """Module that receives the attention probabilities (GPT-J's ``attn_dropout``); None means
    probabilities are reached through transformers' ``AttentionInterface``."""

    # -- structural flags -------------------------------------------------------------------
    parallel: bool = False
    """``x^{ℓ+1} = x^ℓ + Attn(LN(x^ℓ)) + MLP(LN'(x^ℓ))`` (GPT-J, GPT-NeoX, Phi)."""
    norm: Literal["layer", "rms"] = "rms"
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

    @property
    def attn_out(self) -> str:
        """Block-level module whose output (``[0]``) is the attention update of the residual."""
        return self.attn_post_norm or self.attn

    @property
    def mlp_out(self) -> str:
        """Block-level module whose output is the MLP update of the residual."""
        return self.mlp_post_norm or self.mlp or self.mlp_out_proj

    @property
    def mlp_pre(self) -> str:
        """Block-level module whose output is the input of the MLP activation."""
        return self.mlp_gate or self.mlp_in

    @property
    def mlp_norm(self) -> str:
        """Norm whose output feeds the MLP."""
        return self.ln_2 or self.ln_1
