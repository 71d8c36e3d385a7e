"""Patching: indexing semantics, and batched per-row cells equal one run per cell."""

from __future__ import annotations

import pytest
import torch

import recallscope as rs
from recallscope import Site

PROMPTS = ["The capital of France is", "The Eiffel Tower is in"]


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa", "gpt_neox", "opt"])
def test_patch_cells_batched_equals_one_run_per_cell(name, tiny_models):
    """Each row of a batch restores a different (position) cell from a clean run: a causal-tracing grid."""
    model = tiny_models(name)
    prompt = rs.tokenize(model, PROMPTS[:1])
    site = Site(1, "resid_post")
    clean = rs.run_with_cache(model, prompt, [site])[site][0]  # [T, d]
    n = prompt.seq_len
    grid = prompt.select([0] * n)
    rows, positions = torch.arange(n), torch.arange(n)
    corrupted = torch.randn(model.d_model, dtype=torch.float64)
    with rs.patch(model, site, corrupted):  # corrupt everything, then restore one cell per row
        with rs.patch_cells(model, Site(1, "mlp_out"), rows, positions, torch.zeros(n, model.d_model)):
            batched = rs.forward(model, grid)
    for p in range(n):
        with (
            rs.patch(model, site, corrupted),
            rs.patch(model, Site(1, "mlp_out"), torch.zeros(()), positions=[p]),
        ):
            single = rs.forward(model, prompt)
        assert torch.allclose(batched[p], single[0], atol=1e-12), p
    assert clean.shape == (n, model.d_model)


def test_patch_outer_indexing(tiny_models):
    model = tiny_models("llama_gqa")
    batch = rs.tokenize(model, PROMPTS)
    z = Site(1, "z")
    clean = rs.run_with_cache(model, batch, [z])[z]
    value = torch.randn(1, 2, 2, model.d_head, dtype=torch.float64)  # [rows, positions, heads, d_head]
    with rs.patch(model, z, value, rows=[1], positions=[-1, 0], heads=[0, 2]):
        patched = rs.run_with_cache(model, batch, [z])[z]
    expected = clean.clone()
    for i, p in enumerate([-1, 0]):
        for j, h in enumerate([0, 2]):
            expected[1, p, h] = value[0, i, j]
    assert torch.equal(patched, expected)


def test_patch_adds(tiny_models):
    model = tiny_models("gpt2")
    batch = rs.tokenize(model, PROMPTS)
    site = Site(0, "attn_out")
    clean = rs.run_with_cache(model, batch, [site])[site]
    delta = torch.randn(model.d_model, dtype=torch.float64)
    with rs.patch(model, site, delta, positions=[-1], mode="add"):
        added = rs.run_with_cache(model, batch, [site])[site]
    assert torch.equal(added[:, -1], clean[:, -1] + delta)
    assert torch.equal(added[:, :-1], clean[:, :-1])


def test_pattern_patch_with_heads(tiny_models):
    model = tiny_models("llama_gqa")
    batch = rs.tokenize(model, PROMPTS)
    site = Site(1, "pattern")
    uniform = torch.full((batch.seq_len,), 1.0 / batch.seq_len, dtype=torch.float64)
    with rs.patch(model, site, uniform, heads=[3], positions=[-1]):
        probs = rs.run_with_cache(model, batch, [site])[site]
    assert torch.equal(probs[:, 3, -1], uniform.expand(2, -1))


def test_patch_cells_errors(tiny_models):
    model = tiny_models("gpt2")
    with pytest.raises(rs.ShapeError, match=r"rows must be \[n\] and positions \[n\] or \[n, P\]"):
        rs.patch_cells(model, "1.resid_post", torch.tensor([0, 1]), torch.tensor([0]), torch.zeros(2, 32))
    with pytest.raises(rs.SiteError, match="patch_cells does not apply to pattern"):
        rs.patch_cells(model, "1.pattern", torch.tensor([0]), torch.tensor([0]), torch.zeros(1))
    with pytest.raises(rs.SiteError, match=r"index \[5\] out of range"):
        with rs.patch(model, "1.resid_post", torch.zeros(()), rows=[5]):
            rs.forward(model, torch.tensor([[1, 2]]))
