"""The coverage matrix: which model types of the installed transformers recallscope supports.

For every model type in transformers' causal-LM mapping, :func:`classify` either excludes it with
the reason (encoder-only, encoder-decoder, state-space / recurrent / hybrid, needs images or
audio), or builds a tiny random model from its config class (dimensions shrunk, norms and biases
random and non-trivial), loads it through architecture discovery and runs every conformance check
of :func:`recallscope.check_model` in float64. A type is *supported* when all checks pass, and
*failing* otherwise, with the failing check or discovery step named::

    rows = coverage_matrix()                     # every type; a few minutes on 2 CPU cores
    print(summary(rows))                         # "104 of 112 decoder-only attention types pass (92.8%)"
    Path("docs/models.md").write_text(render_markdown(rows))

``recallscope models --matrix --write docs/models.md`` does the same from the command line. The
tiny models are built by ``recallscope.coverage_tiny``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import transformers

from recallscope.core.attention import EAGER_IMPLEMENTATION
from recallscope.coverage_tiny import (
    _COMPLETIONS,
    MAX_PARAMETERS,
    N_LAYERS,
    TINY,
    _get,
    randomize_,
    tiny_config,
    tiny_model,
)
from recallscope.errors import UnsupportedModelError

__all__ = [
    "Row",
    "coverage_matrix",
    "classify",
    "tiny_config",
    "tiny_model",
    "summary",
    "render_markdown",
    "TINY",
    "N_LAYERS",
    "MAX_PARAMETERS",
    "randomize_",
]

Status = Literal["supported", "excluded", "failing"]

ENCODER_ONLY = "encoder-only"
ENCODER_DECODER = "encoder-decoder"
RECURRENT = "state-space / recurrent / hybrid"
MULTIMODAL = "needs images or audio"

_KNOWN = {  # exclusions the rules below cannot see, with the reason
    "bert-generation": (ENCODER_ONLY, "BERT encoder blocks used as a decoder"),
    "xlnet": (ENCODER_ONLY, "permutation language model with two attention streams"),
    "trocr": (ENCODER_DECODER, "the text decoder of an image encoder-decoder (cross-attention)"),
    "fuyu": (MULTIMODAL, "image patches are part of its input"),
    "blt": (ENCODER_DECODER, "a byte-level local encoder and decoder cross-attend to a global transformer"),
    "gemma4_assistant": (
        ENCODER_DECODER,
        "a draft model that attends to its target model's key/value states",
    ),
    "gemma4_unified_assistant": (
        ENCODER_DECODER,
        "a draft model that attends to its target model's key/value states",
    ),
    # LFM2's default configs put attention in every layer (or declare no layer types); its
    # checkpoints interleave gated short convolutions with attention, which recallscope refuses
    "lfm2": (RECURRENT, "its checkpoints interleave gated short convolutions with attention layers"),
    "lfm2_moe": (RECURRENT, "its checkpoints interleave gated short convolutions with attention layers"),
}


_LAYER_TYPE_KEYS = ("layer_types", "layers_block_type", "block_types", "layer_block_types")


def _is_attention_layer(kind: str) -> bool:
    """Softmax attention of some kind (full, sliding, chunked, sparse-indexed, compressed), as
    opposed to linear attention, state-space, convolution or recurrent layers.
    """
    kind = kind.lower()
    if "linear" in kind or "hybrid" in kind or "mamba" in kind:
        return False
    return "attention" in kind or kind in ("global", "local", "sliding", "full", "attn")


@dataclass(frozen=True)
class Row:
    """One model type's verdict."""

    model_type: str
    model_class: str
    status: Status
    reason: str
    """Exclusion category and why, the failing checks, or the features a supported type exercises."""
    dtype: str = ""
    spec: str = ""
    """``discovered`` or ``written`` (over a discovered spec)."""


# -- classification --------------------------------------------------------------------------------


def _excluded(model_type: str) -> tuple[str, str] | None:
    """``(category, why)`` for types excluded before building, else None."""
    from transformers.models.auto import modeling_auto as auto
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type in _KNOWN:
        return _KNOWN[model_type]
    if model_type in auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        return ENCODER_DECODER, "its causal-LM class is the decoder half of a sequence-to-sequence model"
    if model_type in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return ENCODER_ONLY, "a masked-LM encoder whose causal-LM head runs it with a causal mask"
    config_class = CONFIG_MAPPING[model_type]
    if getattr(config_class, "is_encoder_decoder", False) is True:
        return ENCODER_DECODER, "its config is an encoder-decoder (the causal-LM class is the decoder)"
    media = [k for k in (getattr(config_class, "sub_configs", None) or {}) if "vision" in k or "audio" in k]
    if media:
        return MULTIMODAL, f"its config has {', '.join(media)}"
    class_name = auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    if "ConditionalGeneration" in class_name:
        return MULTIMODAL, f"{class_name} generates from images or audio"
    return None


def _default_config(model_type: str) -> transformers.PretrainedConfig:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return CONFIG_MAPPING[model_type]()


def _per_layer(config) -> bool:
    """Do the layers carry their own attention sizes (reading them globally is refused)?"""
    for key in ("num_attention_heads", "head_dim"):
        try:
            getattr(config, key, None)
        except Exception as err:  # noqa: BLE001 - transformers' per-layer attribute error
            return "PerLayer" in type(err).__name__
    return False


def _declared_hybrid(config) -> str | None:
    """A config that declares non-attention layers (Mamba, linear attention, convolutions)."""
    for key in _LAYER_TYPE_KEYS:
        kinds = getattr(config, key, None)
        if isinstance(kinds, list | tuple) and kinds and all(isinstance(k, str) for k in kinds):
            other = sorted({k for k in kinds if not _is_attention_layer(k)})
            if other:
                return f"config.{key} has {', '.join(other)} layers"
    attention_layers = getattr(config, "full_attn_idxs", None)  # LFM2: indices of the attention layers
    n_layers = getattr(config, "num_hidden_layers", None)
    if isinstance(attention_layers, list | tuple) and n_layers and len(set(attention_layers)) < n_layers:
        return "config.full_attn_idxs leaves layers without attention (convolutions)"
    return None


def classify(model_type: str) -> Row:
    """The verdict on one model type (never raises)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    class_name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, "?")
    excluded = _excluded(model_type)
    if excluded is not None:
        return Row(model_type, class_name, "excluded", f"{excluded[0]}: {excluded[1]}")
    try:
        default = _default_config(model_type)
        hybrid = _declared_hybrid(default)  # before cutting the layers
        tiny_config(model_type)
    except Exception as err:  # noqa: BLE001 - a config class that cannot be built is a failing type
        return Row(model_type, class_name, "failing", f"tiny config: {_first_line(err)}")
    if hybrid is not None:
        return Row(model_type, class_name, "excluded", f"{RECURRENT}: {hybrid}")
    # float64 first; then float64 with masks that stay finite in float32 (modeling code that runs its
    # softmax in float32 turns float64's mask minimum into -inf: NaN on padded rows); then float32
    attempts = ((torch.float64, None), (torch.float64, EAGER_IMPLEMENTATION), (torch.float32, None))
    rows = []
    for dtype, kernel in attempts:
        rows.append(_check(model_type, class_name, dtype, kernel))
        broken = any(text in rows[-1].reason for text in ("NaN in the reference", "forward failed"))
        if rows[-1].status != "failing" or not broken:
            break
    row = rows[-1]
    if len(rows) == 2:
        row = _with_note(row, "float64 masks kept finite (its softmax runs in float32)")
    elif len(rows) == 3:
        why = "gives NaN" if "NaN in the reference" in rows[0].reason else "fails"
        row = _with_note(row, f"float32 (its own float64 forward {why})")
    if model_type in _COMPLETIONS:
        row = _with_note(row, _COMPLETIONS[model_type][0])
    return row


def _with_note(row: Row, note: str) -> Row:
    return Row(row.model_type, row.model_class, row.status, f"{row.reason}; {note}", row.dtype, row.spec)


def _check(model_type: str, class_name: str, dtype: torch.dtype, kernel: str | None = None) -> Row:
    from recallscope.check import check_model
    from recallscope.models.model import Model

    name = str(dtype).removeprefix("torch.")
    try:
        hf_model = tiny_model(model_type, dtype)
    except Exception as err:  # noqa: BLE001
        return Row(model_type, class_name, "failing", f"tiny model: {_first_line(err)}", name)
    if kernel is not None:
        hf_model.config._attn_implementation = kernel
    try:
        model = Model(hf_model)
    except UnsupportedModelError as err:
        message = str(err)
        if "no attention" in message:
            return Row(
                model_type, class_name, "excluded", f"{RECURRENT}: no attention in its first block", name
            )
        if "recurrent depth" in message:
            why = "its blocks run repeatedly in one forward (recurrent depth)"
            return Row(model_type, class_name, "excluded", f"{RECURRENT}: {why}", name)
        return Row(model_type, class_name, "failing", f"discovery: {_after_colon(message)}", name)
    except Exception as err:  # noqa: BLE001 - modeling code failing on the probe input
        return Row(model_type, class_name, "failing", f"discovery: {_first_line(err)}", name)
    try:
        report = check_model(model)
    except Exception as err:  # noqa: BLE001
        return Row(
            model_type, class_name, "failing", f"check_model: {_first_line(err)}", name, model.spec.source
        )
    if not report.passed:
        failed = "; ".join(f"{r.name} ({r.detail})" if r.detail else r.name for r in report.failures)
        return Row(model_type, class_name, "failing", f"checks failed: {failed}", name, model.spec.source)
    return Row(model_type, class_name, "supported", _features(model), name, model.spec.source)


def _positions(model) -> str:
    spec, config = model.spec, model.hf_model.config
    if spec.pos_embed:
        return "a table of positions" if spec.pos_table else "learned positions"
    if any("rotary" in type(m).__name__.lower() for m in model.hf_model.modules()):
        return "RoPE"
    return "ALiBi" if getattr(config, "alibi", True) else "no positions"


def _kernel_values(model) -> bool:
    """The ``v`` site is read where the kernel receives the values (no linear map of the residual
    gives them: latent attention, a rescaled or clamped projection).
    """
    return model.spec.v_proj is None and model.spec.qkv_proj is None


def _latent(model) -> bool:
    return bool(_get(model.hf_model.config, "kv_lora_rank"))


_FEATURES = (  # (label, test on the model), in the order the table lists them
    ("GQA", lambda m: any(1 < s.dims.n_kv_heads < s.dims.n_heads for s in m.spec.block_specs())),
    ("MQA", lambda m: any(s.dims.n_kv_heads == 1 < s.dims.n_heads for s in m.spec.block_specs())),
    ("mixture of experts", lambda m: any(v.experts for v in m.spec.block_specs())),
    (
        "with dense layers",
        lambda m: (
            any(v.experts for v in m.spec.block_specs()) and any(not v.experts for v in m.spec.block_specs())
        ),
    ),
    ("shared experts", lambda m: any(v.shared_expert_down for v in m.spec.block_specs())),
    ("parallel blocks", lambda m: m.spec.parallel),
    ("sandwich norms", lambda m: m.spec.ln_1 is not None and (m.spec.attn_post_norm or m.spec.mlp_post_norm)),
    ("post-norms", lambda m: m.spec.ln_1 is None and (m.spec.attn_post_norm or m.spec.mlp_post_norm)),
    ("inline attention", lambda m: not m.spec.attention_interface),
    ("latent attention", lambda m: _kernel_values(m) and _latent(m)),
    ("values read in the kernel", lambda m: _kernel_values(m) and not _latent(m)),
    ("fused q/k/v", lambda m: m.spec.qkv_proj is not None),
    ("fused gate-up", lambda m: m.spec.gate_up is not None),
    ("qk-norm", lambda m: m.spec.qk_norm),
    ("gated attention output", lambda m: m.spec.attn_output_gate),
    ("sliding window", lambda m: bool(getattr(m.hf_model.config, "sliding_window", None))),
    ("attention sinks", lambda m: any(spec.attention_sinks for spec in m.spec.block_specs())),
    ("gated norms", lambda m: any(s.norm_gates for s in m.spec.block_specs())),
    ("rescaled values", lambda m: any(s.value_scale != 1.0 for s in m.spec.block_specs())),
    ("head width by block", lambda m: len({s.dims.d_head for s in m.spec.block_specs()}) > 1),
    ("key/value heads by block", lambda m: len({s.dims.n_kv_heads for s in m.spec.block_specs()}) > 1),
    ("soft-capping", lambda m: m.spec.final_logit_softcap or m.spec.attn_logit_softcap),
    ("embedding norm", lambda m: m.spec.embed_norm is not None),
    ("scaled residual/logits", lambda m: m.spec.residual_scale != 1.0 or m.spec.logit_scale != 1.0),
    ("residual scaled by block", lambda m: bool(m.spec.residual_mix)),
    ("per-layer inputs", lambda m: m.spec.ple_update is not None),
    ("(1+w) norms", lambda m: m.spec.norm_offset_one),
)


def _features(model) -> str:
    """What a supported type exercises (for the table)."""
    found = [label for label, test in _FEATURES if test(model)]
    norm = "LayerNorm" if model.spec.norm == "layer" else "RMSNorm"
    return ", ".join([*found, _positions(model), norm])


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def _after_colon(message: str) -> str:
    """The part of a discovery error after ``cannot discover its architecture:``."""
    marker = "cannot discover its architecture: "
    text = message.split(marker, 1)[-1] if marker in message else message
    return " ".join(text.split())[:400]


def coverage_matrix(
    types: Iterable[str] | None = None, *, progress: Callable[[str], None] | None = None
) -> list[Row]:
    """:func:`classify` every model type of the causal-LM mapping (or ``types``), in name order."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if types is None else types)
    rows = []
    with _quiet():
        for name in names:
            if progress is not None:
                progress(name)
            rows.append(classify(name))
    return rows


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence transformers' config and initialization warnings while building tiny models."""
    logger = logging.getLogger("transformers")
    level = logger.level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            logger.setLevel(level)


# -- reporting -------------------------------------------------------------------------------------


def counts(rows: list[Row]) -> dict[str, int]:
    """``supported``, ``failing``, ``attention`` (their sum: the decoder-only attention types),
    ``excluded`` and ``total``.
    """
    supported = sum(r.status == "supported" for r in rows)
    failing = sum(r.status == "failing" for r in rows)
    return {
        "supported": supported,
        "failing": failing,
        "attention": supported + failing,
        "excluded": len(rows) - supported - failing,
        "total": len(rows),
    }


def summary(rows: list[Row]) -> str:
    c = counts(rows)
    share = math.floor(1000 * c["supported"] / max(1, c["attention"])) / 10  # never rounded up to a bar
    return (
        f"{c['supported']} of {c['attention']} decoder-only attention model types pass ({share:.1f}%); "
        f"{c['excluded']} of {c['total']} types in the causal-LM mapping are excluded"
    )


def render_markdown(rows: list[Row]) -> str:
    """``docs/models.md``: the summary, then one table per status."""
    c = counts(rows)
    lines = [
        "# Supported models",
        "",
        "<!-- generated by `recallscope models --matrix --write docs/models.md`; do not edit -->",
        "",
        f"Generated with transformers {transformers.__version__} and torch {_torch_version()}.",
        "",
        f"**{summary(rows)}.**",
        "",
        "Every model type in transformers' causal-LM mapping is listed. For each one the command builds a",
        "tiny random model from its config class (two layers, width 64, random norms and biases), loads it",
        "through architecture discovery and runs every conformance check of `recallscope check-model` in",
        "float64: a type is *supported* when all pass. *Excluded* types are not decoder-only attention",
        "models; *failing* ones are, and the table says which discovery step or check failed.",
        "",
        "counts: " + " ".join(f"{k}={c[k]}" for k in ("supported", "failing", "excluded", "total")),
        "",
    ]
    for status, title, column in (
        ("supported", "Supported", "what its tiny model exercises"),
        ("failing", "Failing", "why"),
        ("excluded", "Excluded", "why"),
    ):
        chosen = [r for r in rows if r.status == status]
        lines += [f"## {title} ({len(chosen)})", "", f"| model type | class | {column} |", "|---|---|---|"]
        for r in chosen:
            reason = r.reason.replace("|", "\\|")
            lines.append(f"| `{r.model_type}` | `{r.model_class}` | {reason} |")
        lines.append("")
    return "\n".join(lines)


def _torch_version() -> str:
    return torch.__version__.split("+")[0]
