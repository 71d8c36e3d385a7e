"""The coverage matrix: every model type of the installed transformers, built tiny and checked."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from recallscope import coverage
from recallscope.cli import main

ROOT = Path(__file__).parents[2]
REQUIRED = (
    # named by the issue that introduced discovery
    "gemma3_text phi3 olmo2 smollm3 granite mixtral qwen2_moe qwen3_moe gpt_oss starcoder2 falcon bloom "
    "gpt_neo gpt_bigcode codegen stablelm cohere mpt "
    # the families recallscope supported before discovery
    "gpt2 llama mistral qwen2 qwen3 gemma gemma2 gpt_neox gptj opt phi"
).split()
PASS_RATE = 0.90  # a floor that only rises


@pytest.fixture(scope="module")
def rows():
    return coverage.coverage_matrix()


@pytest.mark.slow
def test_every_model_type_is_classified(rows):
    assert [r.model_type for r in rows] == sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    for row in rows:
        assert row.status in ("supported", "failing", "excluded") and row.reason, row
        if row.status == "excluded":
            assert row.reason.split(":")[0] in (
                coverage.ENCODER_ONLY,
                coverage.ENCODER_DECODER,
                coverage.RECURRENT,
                coverage.MULTIMODAL,
            ), row
        if row.status == "supported":
            assert row.dtype in ("float64", "float32") and row.spec in ("discovered", "written"), row


@pytest.mark.slow
def test_the_named_types_are_supported(rows):
    by_type = {r.model_type: r for r in rows}
    failing = {t: by_type[t].reason for t in REQUIRED if by_type[t].status != "supported"}
    assert not failing, failing


@pytest.mark.slow
def test_enough_decoder_only_attention_types_pass(rows):
    counts = coverage.counts(rows)
    share = counts["supported"] / counts["attention"]
    failing = [f"{r.model_type}: {r.reason[:120]}" for r in rows if r.status == "failing"]
    assert share >= PASS_RATE, f"{share:.0%} pass; failing:\n" + "\n".join(failing)


@pytest.mark.slow
def test_docs_and_readme_state_what_the_command_prints(rows):
    """docs/models.md is the command's output for the transformers it names; the README quotes it."""
    text = (ROOT / "docs" / "models.md").read_text()
    generated_with = re.search(r"Generated with transformers (\S+) and", text).group(1)
    summary = re.search(
        r"\*\*(\d+ of \d+ decoder-only attention model types pass \([\d.]+%\)); ", text
    ).group(1)
    assert summary in (ROOT / "README.md").read_text(), "README and docs/models.md disagree"
    if generated_with != transformers.__version__:
        pytest.skip(
            f"docs/models.md was generated with transformers {generated_with}, this is "
            f"{transformers.__version__}: regenerate it (recallscope models --matrix --write docs/models.md)"
        )
    assert coverage.render_markdown(rows) == text


@pytest.mark.parametrize(
    ("model_type", "category"),
    [
        ("bart", coverage.ENCODER_DECODER),
        ("bert", coverage.ENCODER_ONLY),
        ("gemma3", coverage.MULTIMODAL),
        ("mamba", coverage.RECURRENT),
        ("jamba", coverage.RECURRENT),
    ],
)
def test_non_decoder_only_attention_types_are_excluded_with_the_reason(model_type, category):
    row = coverage.classify(model_type)
    assert row.status == "excluded" and row.reason.startswith(category), row


def test_a_supported_type_says_what_its_tiny_model_exercises():
    row = coverage.classify("qwen2_moe")
    assert row.status == "supported" and row.dtype == "float64"
    assert "mixture of experts" in row.reason and "shared experts" in row.reason


def test_tiny_models_are_tiny_and_not_trivially_initialized():
    hf = coverage.tiny_model("llama")
    assert sum(p.numel() for p in hf.parameters()) < coverage.MAX_PARAMETERS
    assert hf.config.num_hidden_layers == coverage.N_LAYERS
    norm = hf.model.layers[0].input_layernorm.weight
    assert not bool((norm == 1).all())  # random gains: a spec that ignored them would fail its checks


def test_models_command(capsys, tmp_path):
    out_file = tmp_path / "models.md"
    with pytest.raises(SystemExit) as done:
        main(["models", "--matrix", "--only", "llama,bert", "--write", str(out_file)])
    out = capsys.readouterr().out
    assert done.value.code in (0, None), out
    assert re.search(r"llama\s+supported", out) and re.search(r"bert\s+excluded", out)
    assert "1 of 1 decoder-only attention model types pass (100.0%)" in out
    text = out_file.read_text()
    assert (
        "| `llama` | `LlamaForCausalLM` |" in text
        and "counts: supported=1 failing=0 excluded=1 total=2" in text
    )
    with pytest.raises(SystemExit) as done:
        main(["models", "--matrix", "--only", "no_such_type"])
    assert (
        done.value.code == 2
        and "not in transformers' causal-LM mapping: no_such_type" in capsys.readouterr().err
    )


def test_model_types_listing(capsys):
    with pytest.raises(SystemExit):
        main(["models"])
    out = capsys.readouterr().out
    assert f"{len(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)} model types" in out


def test_the_share_is_never_rounded_up_to_a_bar():
    rows = [coverage.Row(f"t{i}", "C", "supported" if i < 1799 else "failing", "") for i in range(1999)]
    assert "1799 of 1999 decoder-only attention model types pass (89.9%)" in coverage.summary(rows)
