"""Tiny random-weight models of every supported family, built from configs (no downloads).

``tiny_model("llama_gqa")`` returns a float64 :class:`recallscope.Model` whose biases and norm
weights are random (many are zero- or one-initialized by default, which would hide bugs), with a
small trained tokenizer. Every model is asserted to be tiny, so a misspelled config key cannot
silently build a full-size model.
"""

from __future__ import annotations

import functools
import math
import string

import torch
import transformers as T
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

import recallscope as rs

VOCAB = 320
CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "The Eiffel Tower is located in the city of Paris in France.",
    "Miles Davis plays the trumpet. The Colosseum is in Rome.",
    "The official language of Japan is Japanese, and its currency is the yen.",
    "Apple was founded by Steve Jobs. Microsoft is headquartered in Redmond.",
]

_COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4)
_LLAMALIKE = dict(_COMMON, intermediate_size=64, head_dim=8)
# routed experts: four of 32 neurons each, two per token
_MIXTRAL_LIKE = dict(
    _LLAMALIKE, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, intermediate_size=32
)
FAMILIES = {
    # name: (config class, kwargs)
    "gpt2": (
        T.GPT2Config,
        dict(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=3,
            n_head=4,
            n_positions=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        ),
    ),
    "llama_mha": (T.LlamaConfig, dict(_LLAMALIKE, num_key_value_heads=4)),
    "llama_gqa": (T.LlamaConfig, dict(_LLAMALIKE, num_key_value_heads=2, attention_bias=True, mlp_bias=True)),
    "llama_mqa": (T.LlamaConfig, dict(_LLAMALIKE, num_key_value_heads=1, tie_word_embeddings=True)),
    "mistral": (T.MistralConfig, dict(_LLAMALIKE, num_key_value_heads=2, sliding_window=4)),
    "qwen2": (T.Qwen2Config, dict(_LLAMALIKE, num_key_value_heads=2)),
    "qwen3": (T.Qwen3Config, dict(_LLAMALIKE, num_key_value_heads=2)),
    "gemma": (T.GemmaConfig, dict(_LLAMALIKE, num_key_value_heads=1)),
    "gemma2": (
        T.Gemma2Config,
        dict(
            _LLAMALIKE,
            num_key_value_heads=2,
            sliding_window=4,
            final_logit_softcapping=3.0,
            attn_logit_softcapping=5.0,
            query_pre_attn_scalar=8,
        ),
    ),
    "gpt_neox": (T.GPTNeoXConfig, dict(_COMMON, intermediate_size=64)),
    "gpt_neox_sequential": (
        T.GPTNeoXConfig,
        dict(_COMMON, intermediate_size=64, use_parallel_residual=False),
    ),
    "gptj": (
        T.GPTJConfig,
        dict(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, rotary_dim=4, n_positions=64),
    ),
    "opt": (
        T.OPTConfig,
        dict(
            _COMMON,
            ffn_dim=64,
            word_embed_proj_dim=32,
            max_position_embeddings=64,
            dropout=0.0,
            pad_token_id=1,
        ),
    ),
    "phi": (T.PhiConfig, dict(_COMMON, intermediate_size=64)),
    # discovered architectures (no hand-written spec): sandwich norms, fused projections, post-norms,
    # mixtures of experts, ALiBi, parallel MQA blocks, learned positions with inline attention
    "gemma3_text": (
        T.Gemma3TextConfig,
        dict(_LLAMALIKE, num_key_value_heads=2, sliding_window=4, query_pre_attn_scalar=8),
    ),
    "phi3": (T.Phi3Config, dict(_LLAMALIKE, num_key_value_heads=2, pad_token_id=0)),
    "olmo2": (T.Olmo2Config, dict(_LLAMALIKE, num_key_value_heads=2, pad_token_id=0)),
    "mixtral": (T.MixtralConfig, _MIXTRAL_LIKE),
    "qwen3_moe": (
        T.Qwen3MoeConfig,
        dict(
            _LLAMALIKE, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32
        ),
    ),
    "gpt_oss": (
        T.GptOssConfig,
        dict(
            _MIXTRAL_LIKE,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            pad_token_id=0,
        ),
    ),
    # sigmoid-gated attention output (a per-position factor before o_proj), sandwich norms, routed
    # (sigmoid router) and shared experts
    "afmoe": (
        T.AfmoeConfig,
        dict(
            _LLAMALIKE,
            num_key_value_heads=2,
            num_dense_layers=0,
            num_experts=4,
            num_experts_per_tok=2,
            num_shared_experts=1,
            moe_intermediate_size=16,
            route_scale=1.5,
            sliding_window=4,
            global_attn_every_n_layers=2,
        ),
    ),
    # an experts bank outside transformers' ExpertsInterface (every token to every expert, the router
    # weight on its input), a dense block, a block without RoPE, chunked attention
    "llama4_text": (
        T.Llama4TextConfig,
        dict(
            _LLAMALIKE,
            num_key_value_heads=2,
            intermediate_size=16,
            intermediate_size_mlp=64,
            num_local_experts=4,
            num_experts_per_tok=1,
            moe_layers=[1, 2],
            no_rope_layers=[1, 0, 1],
            layer_types=["chunked_attention", "full_attention", "chunked_attention"],
            attention_chunk_size=64,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
    # key/value heads that differ by block (the sliding-window blocks have twice as many, and sinks),
    # queries and keys wider than the values, values rescaled after their projection, routed experts
    # with a sigmoid router
    "mimo_v2_flash": (
        T.MiMoV2FlashConfig,
        dict(
            _LLAMALIKE,
            num_key_value_heads=1,
            head_dim=12,
            v_head_dim=8,
            layer_types=["full_attention", "sliding_attention", "sliding_attention"],
            mlp_layer_types=["sparse", "sparse", "sparse"],
            sliding_window=4,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            pad_token_id=0,
        ),
    ),
    # Llama with AXK2's gated RMSNorm in front of both sublayers (norm(x) ⊙ σ(mlp(norm(x)))): no model
    # in transformers has a gated input norm and value projections that are a matrix of the residual
    "llama_gated_norms": (T.LlamaConfig, dict(_LLAMALIKE, num_key_value_heads=2, attention_bias=True)),
    # Gemma 4: a global layer with wider heads (and its own head count per layer in the config),
    # values normalized in the attention (read where the kernel receives them), sandwich norms, and
    # a scalar each block multiplies its output by (random here, as in its checkpoints)
    "gemma4_unified_text": (
        T.Gemma4UnifiedTextConfig,
        dict(
            _LLAMALIKE,
            num_key_value_heads=2,
            global_head_dim=16,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            sliding_window=4,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
    # Gemma 4 as its small checkpoints (E2B, E4B): a third update per block after the MLP, from the
    # token's per-layer embedding (PLE) gated by the residual, besides everything gemma4_unified_text has
    "gemma4_text": (
        T.Gemma4TextConfig,
        dict(
            _LLAMALIKE,
            num_key_value_heads=2,
            global_head_dim=16,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            sliding_window=4,
            hidden_size_per_layer_input=8,
            vocab_size_per_layer_input=VOCAB,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
    # Llama whose blocks scale the residual as Beam's do (see _scale_residual_), all in float64
    "llama_scaled_residual": (T.LlamaConfig, dict(_LLAMALIKE, num_key_value_heads=2, attention_bias=True)),
    "bloom": (T.BloomConfig, dict(vocab_size=VOCAB, hidden_size=32, n_layer=3, n_head=4)),
    "falcon": (
        T.FalconConfig,
        dict(_COMMON, multi_query=True, parallel_attn=True, new_decoder_architecture=False, bias=True),
    ),
    "gpt_neo": (
        T.GPTNeoConfig,
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            num_layers=3,
            num_heads=4,
            attention_types=[[["global", "local"], 1], [["global"], 1]],
            window_size=4,
            max_position_embeddings=64,
            intermediate_size=64,
        ),
    ),
}
if hasattr(T, "BeamConfig"):  # (newer transformers only)
    # depth-scaled residual adds (mid = a·x + b·attn, out = a'·mid + b'·mlp, constants by block),
    # sandwich norms, SwiGLU and the final soft-cap in float32 (so no float64 mlp_pre: conformance
    # and site tests only; llama_scaled_residual runs the methods' oracles on such blocks)
    FAMILIES["beam"] = (
        T.BeamConfig,
        dict(
            _LLAMALIKE,
            num_key_value_heads=2,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            mlp_layer_types=["dense", "dense", "dense"],
            sliding_window=4,
        ),
    )

_FLOAT32_SOFTMAX = ("gemma2", "gemma3_text", "bloom", "gpt_oss")
FLOAT32_INSIDE = (
    "gptj",
    "bloom",
    "falcon",
    "gpt_neo",
    "mixtral",
    "qwen3_moe",
    "gpt_oss",
    "afmoe",
    "llama4_text",
    "mimo_v2_flash",
    "beam",
)
"""Families that compute part of their forward in float32 even for float64 weights (GPT-J's and
GPT-Neo's attention scores, BLOOM's softmax, Falcon's rotations, the routers of mixtures of experts):
left padding moves their numbers by ~1e-9 (a router's float32 weights by one rounding step), so
oracle tests that compare a padded batch with unpadded prompts at 1e-9 run their rows one at a time
or say their tolerance."""
"""Families whose modeling code takes its softmax in float32 (or supports only eager attention)."""
FAMILY_NAMES = tuple(FAMILIES)
DISCOVERED = (
    "gemma3_text",
    "phi3",
    "olmo2",
    "mixtral",
    "qwen3_moe",
    "gpt_oss",
    "bloom",
    "falcon",
    "gpt_neo",
    "afmoe",
    "mimo_v2_flash",
    "llama_gated_norms",
)
"""Families whose architecture recallscope only discovers (no spec was ever written for them): every
method's oracle tests run on them too."""


@functools.cache
def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2-style byte-level BPE (leading-space tokens ``Ġ``), no BOS."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 2,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>")


@functools.cache
def sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    """SentencePiece-style BPE (``▁`` word starts) that prepends ``<s>`` like Llama-2."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    alphabet = (
        string.ascii_letters + string.digits + string.punctuation + "éèêëáàâäãíìóòôöõúùûüñçøåæœßÉÅÖŌō–’"
    )
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 4,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=list(alphabet),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every bias and norm weight a random non-trivial value (in place)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            is_norm = "norm" in name or "ln_" in name or "layernorm" in name.lower()
            if name.endswith("bias") or is_norm:
                noise = torch.randn(param.shape, generator=generator, dtype=torch.float64)
                base = 1.0 if is_norm and name.endswith("weight") else 0.0
                param.copy_((base + 0.3 * noise).to(param.dtype))


def tiny_hf_model(name: str, dtype: torch.dtype = torch.float64, seed: int = 0, **overrides):
    config_cls, kwargs = FAMILIES[name]
    config = config_cls(**{**kwargs, **overrides})
    if hasattr(config, "_experts_implementation"):
        config._experts_implementation = "eager"  # transformers' grouped kernels have no float64 version
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(config).to(dtype).eval()
    if name == "gptj":  # GPT-J's unembedding bias is zero-initialized: make it count
        model.lm_head.bias.data.normal_(0, 0.3)
    randomize_(model, seed)
    if name == "llama_gated_norms":
        _gate_norms_(model, seed)
    if name == "llama_scaled_residual":
        _scale_residual_(model)
    generator = torch.Generator().manual_seed(seed)
    for buffer_name, buffer in model.named_buffers():  # Gemma 4's output scalars: 1 at init
        if buffer_name.endswith("layer_scalar"):
            buffer.fill_(0.5 + float(torch.rand((), generator=generator, dtype=torch.float64)))
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params < 1_000_000, f"{name} is not tiny: {n_params} parameters"
    return model


def _gate_norms_(model: torch.nn.Module, seed: int) -> None:
    """Put AXK2's gated RMSNorm (random norm gain and gate) in front of every block's sublayers."""
    from transformers.models.axk2.modeling_axk2 import AXK2GatedRMSNorm

    config = model.config
    gated = T.AXK2Config(hidden_size=config.hidden_size, rms_norm_eps=config.rms_norm_eps, gated_norm_rank=8)
    generator = torch.Generator().manual_seed(seed + 1)
    dtype = model.lm_head.weight.dtype
    for block in model.model.layers:
        for name in ("input_layernorm", "post_attention_layernorm"):
            norm = AXK2GatedRMSNorm(gated).to(dtype)
            with torch.no_grad():
                for param in norm.parameters():
                    noise = torch.randn(param.shape, generator=generator, dtype=torch.float64)
                    base = 1.0 if param.dim() == 1 else 0.0  # the norm's gain; the gate's weights
                    param.copy_((base + 0.3 * noise).to(dtype))
            setattr(block, name, norm)


def residual_coefficients(n_layers: int) -> list[tuple[float, float, float, float]]:
    """Beam's depth-scaled adds, ``(α_a, β_a, α_m, β_m)`` per block: add ``n = 2, 3, …`` keeps
    ``sqrt((n-1)/n)`` of the residual and adds ``1/sqrt(n)`` of the sublayer's output."""
    adds = [(math.sqrt((n - 1) / n), 1 / math.sqrt(n)) for n in range(2, 2 * n_layers + 2)]
    return [(*adds[2 * i], *adds[2 * i + 1]) for i in range(n_layers)]


def _scale_residual_(model: torch.nn.Module) -> None:
    """Make every Llama block add as Beam's do: ``mid = α_a x + β_a attn``, ``out = α_m mid + β_m mlp``."""
    for block, (alpha_a, beta_a, alpha_m, beta_m) in zip(
        model.model.layers, residual_coefficients(len(model.model.layers)), strict=True
    ):

        def forward(hidden_states, *, _block=block, _mix=(alpha_a, beta_a, alpha_m, beta_m), **kwargs):
            attn, _ = _block.self_attn(hidden_states=_block.input_layernorm(hidden_states), **kwargs)
            mid = _mix[0] * hidden_states + _mix[1] * attn
            return _mix[2] * mid + _mix[3] * _block.mlp(_block.post_attention_layernorm(mid))

        block.forward = forward
    model.beam_like_residual = True  # read by the oracles (tests/oracles/early_decoding.py)


def tiny_model(name: str, dtype: torch.dtype = torch.float64, seed: int = 0, tokenizer=None, **overrides):
    hf_model = tiny_hf_model(name, dtype, seed, **overrides)
    if name in _FLOAT32_SOFTMAX and dtype == torch.float64:
        # their modeling code runs the softmax in float32 even for float64 models: float64's mask value
        # becomes -inf and padded rows turn into NaN. recallscope's eager kernel keeps float64 and its
        # masks stay finite in float32 (BLOOM's inline attention uses only the masks); the float32
        # tests cover the models' own kernels.
        from recallscope.core.attention import EAGER_IMPLEMENTATION

        hf_model.config._attn_implementation = EAGER_IMPLEMENTATION
    return rs.load_model(hf_model, tokenizer=tokenizer or byte_level_tokenizer(), device="cpu")


ONE_TO_MANY = [
    # (prompt up to the answer step, subject, previous answers, first-token texts of the 3 answers)
    ("List three cities from France: 1.", "France", [], " Paris"),
    ("List three cities from Italy: 1. Rome, 2.", "Italy", ["Rome"], " Paris"),
    ("List three cities from France: 1. Paris, 2. Rome, 3.", "France", ["Paris", "Rome"], " Miles"),
    ("The capital of Japan is", "Japan", [], " the"),
]
"""Prompts of a mixed-step one-to-many batch (steps 1, 2, 3 and a plain step-1 fact)."""


def one_to_many_batch(model, rows=None):
    """A left-padded batch shaped like one-to-many steps: spans ``subject``, ``relation``,
    ``answer_1``/``answer_2`` where a row has them, a target, and ``tracked`` answer_1…answer_3.
    """
    import dataclasses

    rows = ONE_TO_MANY if rows is None else rows
    prompts = [r[0] for r in rows]
    spans = {"subject": [r[1] for r in rows], "relation": [None for _ in rows]}
    for j in range(max(len(r[2]) for r in rows)):
        spans[f"answer_{j + 1}"] = [
            (p.index(r[2][j], p.index("1.")), p.index(r[2][j], p.index("1.")) + len(r[2][j]))
            if j < len(r[2])
            else None
            for p, r in zip(prompts, rows, strict=True)
        ]
    batch = rs.tokenize(
        model,
        prompts,
        spans=spans,
        targets=[r[3] for r in rows],
        fact_ids=[f"f{i}" for i in range(len(rows))],
    )
    ids = [
        model.tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in (" Paris", " Rome", " Miles")
    ]
    tracked = {f"answer_{j + 1}": torch.full((len(rows),), ids[j]) for j in range(3)}
    return dataclasses.replace(batch, tracked=tracked)


CAPITALS = [
    ("France", "Paris"),
    ("Italy", "Rome"),
    ("Japan", "Tokyo"),
    ("Spain", "Madrid"),
    ("Egypt", "Cairo"),
    ("Germany", "Berlin"),
    ("Chile", "Santiago"),
    ("Peru", "Lima"),
    ("Kenya", "Nairobi"),
    ("Cuba", "Havana"),
]
"""(nation, capital) pairs of the tiny facts (:func:`capital_facts`, :func:`swap_facts`)."""


def swap_facts(model, seed: int = 0, *, partnered: bool = True):
    """``"The capital of {subject} is"`` facts of every pair of :data:`CAPITALS` (ids: the nations)
    with their subject-swap partners under ``model``'s tokenizer; only those that have one, unless
    ``partnered`` is false."""
    from recallscope.data.variants import add_swap_partners

    facts = rs.FactSet(
        [
            rs.Fact.from_template("The capital of {subject} is", s, [a], relation="capital", fact_id=s)
            for s, a in CAPITALS
        ]
    )
    swapped = add_swap_partners(model, facts, seed=seed)
    if not partnered:
        return swapped
    return swapped.with_facts([f for f in swapped if "subject_swap" in f.attributes], {"step": "partnered"})


def capital_facts(shots: int = 0, n: int = 5):
    """A FactSet of ``n`` capital facts in two templates, with counterfactual partners and, with
    ``shots``, one-shot variants (``recallscope.data.variants``), like ``lv_capitals``."""
    from recallscope.data.variants import add_relation_context, shot_variants

    templates = ("The [capital] of {subject} is", "As we all know, the [capital] of {subject} is")
    facts = rs.FactSet(
        [
            rs.Fact.from_template(
                templates[i % 2],
                nation,
                [capital],
                relation="country_capital",
                fact_id=f"capital/{nation}",
                attributes={"shot_template": "The capital of {subject} is"},
            )
            for i, (nation, capital) in enumerate(CAPITALS[:n])
        ],
        name="tiny_capitals",
    )
    pool = list(facts)
    if shots:
        facts = shot_variants(facts, (0, shots), pool=pool)
    return add_relation_context(facts, pool=pool)
