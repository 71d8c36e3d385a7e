"""Any GGUF file transformers can read loads like the embedded model: dequantized once, cached, exact."""

from __future__ import annotations

import pytest
import torch

import recallscope as rs
from gguf_writer import write_llama_gguf
from recallscope.cli import main
from tiny import byte_level_tokenizer, tiny_hf_model


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    hf = tiny_hf_model("llama_mha", dtype=torch.float32)
    path = write_llama_gguf(hf, byte_level_tokenizer(), tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")
    return hf, path


def test_a_gguf_file_gives_the_logits_of_the_in_memory_model(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("RECALLSCOPE_CACHE_DIR", str(tmp_path / "cache"))
    hf, path = tiny_gguf
    model = rs.load_model(str(path), device="cpu")
    assert model.info.source == "gguf" and len(model.info.file_sha256) == 64
    assert model.spec.source == "discovered" and model.n_layers == hf.config.num_hidden_layers
    batch = rs.tokenize(model, ["The capital of France is", "Miles Davis plays the"])
    assert (
        batch.input_ids.tolist()
        == rs.tokenize(
            rs.load_model(hf, tokenizer=byte_level_tokenizer()),
            [
                "The capital of France is",
                "Miles Davis plays the",
            ],
        ).input_ids.tolist()
    )
    with torch.no_grad():
        expected = hf(**batch.model_inputs("cpu")).logits
    assert torch.equal(rs.forward(model, batch, logits="all"), expected)
    cached = list((tmp_path / "cache" / "gguf").glob("*/recallscope-cache.json"))
    assert len(cached) == 1  # dequantized once, kept as safetensors
    again = rs.load_model(str(path), device="cpu")
    assert torch.equal(rs.forward(again, batch, logits="all"), expected)
    assert len(list((tmp_path / "cache" / "gguf").glob("*/recallscope-cache.json"))) == 1


def test_check_model_command_on_a_gguf_file(tiny_gguf, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RECALLSCOPE_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(SystemExit) as done:
        main(["check-model", str(tiny_gguf[1]), "--device", "cpu"])
    out = capsys.readouterr().out
    assert done.value.code == 0, out
    assert f"check-model {tiny_gguf[1]} (spec: discovered)" in out


def test_run_on_a_gguf_file(tiny_gguf, tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("RECALLSCOPE_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "run"
    argv = ["run", "--model", str(tiny_gguf[1]), "--all-facts", "--limit", "2", "--methods", "logit_lens"]
    with pytest.raises(SystemExit) as done:
        main([*argv, "--device", "cpu", "--no-report", "--out", str(out)])
    assert done.value.code in (0, None)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["model"]["source"] == "gguf"
    assert (out / "results" / "logit_lens.parquet").is_file()
