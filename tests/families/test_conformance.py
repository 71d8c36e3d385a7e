"""Every family passes the public conformance suite, in float64 and float32."""

from __future__ import annotations

import pytest
import torch

import recallscope as rs


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_check_model_passes(family, dtype, tiny_models):
    model = tiny_models(family, dtype)
    report = rs.check_model(model)
    assert report.passed, str(report)
    assert len(report.results) == len(rs.check.CHECKS)


def test_report_names_failures():
    report = rs.check.CheckReport("x", [rs.check.CheckResult("a", True), rs.check.CheckResult("b", False)])
    assert not report.passed and [r.name for r in report.failures] == ["b"]
    assert "1/2 checks passed" in str(report)
    with pytest.raises(AssertionError, match=r"\[FAIL\] b"):
        report.raise_for_failures()


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa", "gemma2", "gptj"])
def test_check_model_passes_in_bfloat16(name, tiny_models):
    report = rs.check_model(tiny_models(name, torch.bfloat16))
    assert report.passed, str(report)
