"""Vocabulary projection: the three modes against hand-written formulas, float64 on tiny models.

Families cover the final heads that differ: GPT-2 (LayerNorm with bias), Llama with GQA (RMSNorm),
Gemma-2 (``1 + w`` RMSNorm and a final logit soft-cap) and GPT-J (unembedding bias).
"""

from __future__ import annotations

import pytest
import torch

import recallscope as rs
from recallscope import Site
from recallscope.core.vocab import apply_final_norm, final_norm_scale, frozen_scale_readout

FAMILIES = ["gpt2", "llama_gqa", "gemma2", "gptj"]
PROMPTS = ["The capital of France is", "The Eiffel Tower is in"]
TOL = dict(rtol=0, atol=1e-12)


@pytest.fixture(params=FAMILIES)
def model(request, tiny_models):
    return tiny_models(request.param)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _head(model, x):
    """The model's final head written out: norm, ``W_U``, ``b_U``, soft-cap."""
    params = model.norm_params(model.spec.final_norm)
    if params.kind == "layer":
        x = x - x.mean(-1, keepdim=True)
        x = x / (x.pow(2).mean(-1, keepdim=True) + params.eps).sqrt()
    else:
        x = x / (x.pow(2).mean(-1, keepdim=True) + params.eps).sqrt()
    x = x * (1 + params.weight if params.offset_one else params.weight)
    if params.bias is not None:
        x = x + params.bias
    logits = x @ model.W_U.T
    if model.b_U is not None:
        logits = logits + model.b_U
    cap = model.spec.final_logit_softcap
    return logits if cap is None else cap * torch.tanh(logits / cap)


# -- the modes -------------------------------------------------------------------------------------


def test_logit_lens_of_final_residual_is_the_models_logits(model):
    batch = rs.tokenize(model, PROMPTS)
    last = Site(model.n_layers - 1, "resid_post")
    cache = rs.run_with_cache(model, batch, [last], logits="all")
    resid = cache[last]
    assert resid.dtype == torch.float64
    proj = rs.project_to_vocab(model, resid, "logit_lens", keep_logits=True)
    real = batch.attention_mask.bool()
    assert proj.logits.shape == cache.logits.shape == (2, batch.seq_len, model.d_vocab)
    # HF's RMSNorm (Llama, Gemma-2) normalizes in float32 even in a float64 model: float32 tolerance
    kind = model.norm_params(model.spec.final_norm).kind
    tol = TOL if kind == "layer" else dict(rtol=0, atol=1e-6)
    torch.testing.assert_close(proj.logits[real], cache.logits[real], **tol)
    # and exactly (float64) the head written out by hand
    torch.testing.assert_close(proj.logits, _head(model, resid), **TOL)


def test_logit_lens_equals_head_on_random_vectors(model):
    x = _randn(3, 5, model.d_model)
    proj = rs.project_to_vocab(model, x, "logit_lens", keep_logits=True)
    assert proj.mode == "logit_lens" and proj.logits.dtype == torch.float64
    torch.testing.assert_close(proj.logits, _head(model, x), **TOL)
    torch.testing.assert_close(proj.log_normalizer, proj.logits.logsumexp(-1), **TOL)


def test_raw_is_a_plain_matrix_product(model):
    x = _randn(4, model.d_model)
    raw = rs.project_to_vocab(model, x, "raw", keep_logits=True)
    torch.testing.assert_close(raw.logits, x @ model.W_U.T, **TOL)
    embed = rs.project_to_vocab(model, x, "raw", matrix="embed", keep_logits=True)
    torch.testing.assert_close(embed.logits, x @ model.W_E.T, **TOL)
    with_bias = rs.project_to_vocab(model, x, "raw", bias=True, keep_logits=True)
    expected = x @ model.W_U.T + (0 if model.b_U is None else model.b_U)
    torch.testing.assert_close(with_bias.logits, expected, **TOL)
    assert (model.b_U is not None) == (model.spec.family == "gptj")
    if model.b_U is not None:
        assert not torch.allclose(with_bias.logits, raw.logits)


def test_embed_matrix_differs_from_unembed_when_untied(tiny_models):
    model = tiny_models("llama_gqa")  # untied embeddings
    x = _randn(2, model.d_model)
    raw = rs.project_to_vocab(model, x, "raw", keep_logits=True).logits
    embed = rs.project_to_vocab(model, x, "raw", matrix="embed", keep_logits=True).logits
    assert not torch.allclose(raw, embed)


def test_frozen_scale_is_additive(model):
    ref = _randn(2, model.d_model, seed=1) * 3
    parts = [_randn(2, model.d_model, seed=s) for s in range(2, 6)]
    total = torch.stack(parts).sum(0)
    kw = dict(scale_from=ref, keep_logits=True)
    whole = rs.project_to_vocab(model, total, "frozen_scale", **kw).logits
    summed = sum(rs.project_to_vocab(model, p, "frozen_scale", **kw).logits for p in parts)
    torch.testing.assert_close(whole, summed, **TOL)
    # the bias terms are one constant, W_U·β + b_U, the same for every input
    params = model.norm_params(model.spec.final_norm)
    constant = torch.zeros(model.d_vocab, dtype=torch.float64)
    if params.bias is not None:
        constant = constant + model.W_U @ params.bias
    if model.b_U is not None:
        constant = constant + model.b_U
    with_bias = rs.project_to_vocab(model, total, "frozen_scale", bias=True, **kw).logits
    torch.testing.assert_close(with_bias - whole, constant.expand_as(whole), **TOL)
    # zero in, zero out (without bias): the projection is linear
    zero = rs.project_to_vocab(model, torch.zeros_like(total), "frozen_scale", **kw).logits
    assert torch.equal(zero, torch.zeros_like(zero))


def test_frozen_scale_uses_the_reference_scale(model):
    x, ref = _randn(3, model.d_model, seed=1), _randn(3, model.d_model, seed=2)
    frozen = rs.project_to_vocab(model, x, "frozen_scale", scale_from=ref, keep_logits=True).logits
    params = model.norm_params(model.spec.final_norm)
    centred = x - x.mean(-1, keepdim=True) if params.kind == "layer" else x
    gain = 1 + params.weight if params.offset_one else params.weight
    expected = (centred / final_norm_scale(model, ref) * gain) @ model.W_U.T
    torch.testing.assert_close(frozen, expected, **TOL)
    # scaling x scales the projection; scaling the reference divides it by the reference's scale
    twice = rs.project_to_vocab(model, 2 * x, "frozen_scale", scale_from=ref, keep_logits=True).logits
    torch.testing.assert_close(twice, 2 * frozen, **TOL)
    bigger = rs.project_to_vocab(model, x, "frozen_scale", scale_from=4 * ref, keep_logits=True).logits
    ratio = final_norm_scale(model, ref) / final_norm_scale(model, 4 * ref)  # ≈ 1/4 (ε aside)
    torch.testing.assert_close(bigger, frozen * ratio, **TOL)
    assert ((ratio - 0.25).abs() < 1e-3).all()


def test_frozen_scale_broadcasts_the_reference(model):
    parts = _randn(2, 3, model.d_model, seed=3)  # [B, n_parts, d]
    ref = _randn(2, 1, model.d_model, seed=4)
    together = rs.project_to_vocab(model, parts, "frozen_scale", scale_from=ref, keep_logits=True).logits
    for i in range(3):
        alone = rs.project_to_vocab(
            model, parts[:, i], "frozen_scale", scale_from=ref[:, 0], keep_logits=True
        )
        torch.testing.assert_close(together[:, i], alone.logits, **TOL)


def test_frozen_scale_on_itself_is_the_logit_lens(model):
    x = _randn(2, 3, model.d_model, seed=5)
    frozen = rs.project_to_vocab(model, x, "frozen_scale", scale_from=x, bias=True, keep_logits=True).logits
    lens = rs.project_to_vocab(model, x, "logit_lens", keep_logits=True).logits
    cap = model.spec.final_logit_softcap
    if cap is None:
        torch.testing.assert_close(frozen, lens, **TOL)
    else:  # Gemma-2: frozen_scale skips the soft-cap (it would break additivity)
        assert model.spec.family == "gemma2"
        assert not torch.allclose(frozen, lens)
        torch.testing.assert_close(cap * torch.tanh(frozen / cap), lens, **TOL)


def test_final_norm_helpers(model):
    x = _randn(3, model.d_model, seed=6) + 0.5
    params = model.norm_params(model.spec.final_norm)
    centred = x - x.mean(-1, keepdim=True) if params.kind == "layer" else x
    rho = (centred.pow(2).mean(-1, keepdim=True) + params.eps).sqrt()
    torch.testing.assert_close(final_norm_scale(model, x), rho, **TOL)
    normed = apply_final_norm(model, x)
    if params.kind == "layer":  # HF's LayerNorm runs in float64: compare with the module itself
        with torch.no_grad():
            torch.testing.assert_close(normed, model.module(model.spec.final_norm)(x), **TOL)
    torch.testing.assert_close(apply_final_norm(model, x, scale=rho), normed, **TOL)
    if params.bias is not None:
        no_bias = apply_final_norm(model, x, scale=rho, bias=False)
        torch.testing.assert_close(normed - no_bias, params.bias.expand_as(normed), **TOL)


def test_computation_dtype_is_float32_at_least(tiny_models):
    model = tiny_models("llama_gqa")
    x = _randn(2, model.d_model)
    exact = rs.project_to_vocab(model, x, "logit_lens", keep_logits=True).logits
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        proj = rs.project_to_vocab(model, x.to(dtype), "logit_lens", keep_logits=True)
        assert proj.logits.dtype == torch.float32 and proj.log_normalizer.dtype == torch.float32
    # float32 in, float32 out: close to float64 at float32 precision
    torch.testing.assert_close(proj.logits.double(), exact, rtol=0, atol=1e-5)


# -- reductions: targets, ranks, top-k ---------------------------------------------------------------


@pytest.mark.parametrize("mode", ["raw", "logit_lens", "frozen_scale"])
def test_target_reductions_match_full_logits(model, mode):
    x = _randn(3, 4, model.d_model, seed=7)
    targets = torch.tensor([5, 17, 300])
    kw = dict(scale_from=x[:, -1:]) if mode == "frozen_scale" else {}
    proj = rs.project_to_vocab(model, x, mode, targets=targets, k=5, keep_logits=True, **kw)
    logits = proj.logits
    assert logits.shape == (3, 4, model.d_vocab)
    picked = logits.gather(-1, targets[:, None, None].expand(3, 4, 1))[..., 0]
    assert proj.target_logits.shape == proj.target_logprobs.shape == proj.target_ranks.shape == (3, 4)
    torch.testing.assert_close(proj.target_logits, picked, **TOL)
    logprobs = torch.log_softmax(logits, -1).gather(-1, targets[:, None, None].expand(3, 4, 1))[..., 0]
    torch.testing.assert_close(proj.target_logprobs, logprobs, **TOL)
    torch.testing.assert_close(proj.target_probs, logprobs.exp(), **TOL)
    assert torch.equal(proj.target_ranks, (logits > picked[..., None]).sum(-1))
    values, ids = torch.topk(logits, 5, dim=-1)
    assert torch.equal(proj.topk_ids, ids)
    torch.testing.assert_close(proj.topk_logits, values, **TOL)
    assert proj.topk_ids.shape == (3, 4, 5)


def test_rank_zero_for_the_argmax(model):
    x = _randn(4, model.d_model, seed=8)
    top = rs.project_to_vocab(model, x, "logit_lens", k=1)
    argmax = top.topk_ids[:, 0]
    ranked = rs.project_to_vocab(model, x, "logit_lens", targets=argmax)
    assert ranked.target_ranks.tolist() == [0, 0, 0, 0]
    torch.testing.assert_close(ranked.target_logits, top.topk_logits[:, 0], **TOL)
    worst = rs.project_to_vocab(model, x, "logit_lens", keep_logits=True).logits.argmin(-1)
    assert (
        rs.project_to_vocab(model, x, "logit_lens", targets=worst).target_ranks.tolist()
        == [model.d_vocab - 1] * 4
    )


def test_ties_count_only_strictly_larger_logits(tiny_models):
    model = tiny_models("llama_gqa")  # no unembedding bias: a zero vector gives all-zero raw logits
    proj = rs.project_to_vocab(
        model, torch.zeros(2, model.d_model, dtype=torch.float64), "raw", targets=torch.tensor([0, 319])
    )
    assert proj.target_ranks.tolist() == [0, 0]
    expected = -torch.log(torch.tensor(float(model.d_vocab), dtype=torch.float64))
    torch.testing.assert_close(proj.target_logprobs, expected.expand(2), **TOL)


def test_several_targets_per_row(model):
    x = _randn(2, 3, model.d_model, seed=9)
    targets = torch.tensor([[1, 2, 3], [10, 20, 30]])
    proj = rs.project_to_vocab(model, x, "logit_lens", targets=targets, keep_logits=True)
    assert proj.target_logits.shape == proj.target_ranks.shape == (2, 3, 3)
    logprobs = torch.log_softmax(proj.logits, -1)
    for b in range(2):
        for j in range(3):
            t = int(targets[b, j])
            torch.testing.assert_close(proj.target_logprobs[b, :, j], logprobs[b, :, t], **TOL)
            assert torch.equal(
                proj.target_ranks[b, :, j], (proj.logits[b] > proj.logits[b, :, t, None]).sum(-1)
            )
    # one column of a [B, n] request equals the [B] request for that column
    single = rs.project_to_vocab(model, x, "logit_lens", targets=targets[:, 1])
    torch.testing.assert_close(single.target_logprobs, proj.target_logprobs[..., 1], **TOL)


def test_single_column_targets_keep_their_axis(tiny_models):
    model = tiny_models("gpt2")
    x = _randn(2, 3, model.d_model)
    proj = rs.project_to_vocab(model, x, "raw", targets=torch.tensor([[4], [5]]))
    assert proj.target_logprobs.shape == (2, 3, 1)


def test_results_do_not_depend_on_chunk_size(model):
    x = _randn(2, 3, model.d_model, seed=10)
    targets = torch.tensor([[3, 9], [0, 319]])
    kw = dict(scale_from=x, bias=True, targets=targets, k=4, keep_logits=True)
    one = rs.project_to_vocab(model, x, "frozen_scale", chunk_size=1, **kw)
    many = rs.project_to_vocab(model, x, "frozen_scale", chunk_size=1000, **kw)
    odd = rs.project_to_vocab(model, x, "frozen_scale", chunk_size=4, **kw)
    for other in (many, odd):
        for name in ("logits", "log_normalizer", "target_logits", "target_logprobs", "topk_logits"):
            torch.testing.assert_close(getattr(one, name), getattr(other, name), **TOL)
        assert torch.equal(one.target_ranks, other.target_ranks)
        assert torch.equal(one.topk_ids, other.topk_ids)


def test_only_requested_reductions_are_kept(model):
    x = _randn(2, model.d_model)
    proj = rs.project_to_vocab(model, x)
    assert proj.mode == "logit_lens" and proj.log_normalizer.shape == (2,)
    assert proj.logits is None and proj.target_logits is None and proj.target_probs is None
    assert proj.target_ranks is None and proj.topk_ids is None and proj.topk_logits is None


# -- errors ----------------------------------------------------------------------------------------


def test_wrong_last_dimension(tiny_models):
    model = tiny_models("gpt2")
    with pytest.raises(rs.ShapeError, match=r"x must end in d_model=32, got shape \(2, 31\)"):
        rs.project_to_vocab(model, _randn(2, 31))


def test_targets_with_wrong_batch_size(tiny_models):
    model = tiny_models("gpt2")
    x = _randn(2, 3, model.d_model)
    message = r"targets must be \[B\] or \[B, n\] with B=2 \(the first axis of x\), got \(3,\)"
    with pytest.raises(rs.ShapeError, match=message):
        rs.project_to_vocab(model, x, targets=torch.tensor([1, 2, 3]))
    with pytest.raises(rs.ShapeError, match=r"got \(\)"):
        rs.project_to_vocab(model, x, targets=torch.tensor(1))
    with pytest.raises(rs.ShapeError, match=r"got \(2, 1, 1\)"):
        rs.project_to_vocab(model, x, targets=torch.ones(2, 1, 1, dtype=torch.long))


def test_targets_for_a_single_vector(tiny_models):
    model = tiny_models("gpt2")
    with pytest.raises(rs.ShapeError, match=r"targets need a batch axis: x must be \[B, ..., d_model\]"):
        rs.project_to_vocab(model, _randn(model.d_model), targets=torch.tensor([1]))


def test_frozen_scale_needs_scale_from(tiny_models):
    model = tiny_models("gpt2")
    with pytest.raises(ValueError, match=r"mode='frozen_scale' needs scale_from= \(the reference residual\)"):
        rs.project_to_vocab(model, _randn(2, model.d_model), "frozen_scale")


def test_unknown_mode(tiny_models):
    model = tiny_models("gpt2")
    with pytest.raises(ValueError, match=r"unknown projection mode 'tuned_lens'; expected one of \('raw', "):
        rs.project_to_vocab(model, _randn(2, model.d_model), "tuned_lens")


def test_shape_error_is_a_recallscope_error():
    assert issubclass(rs.ShapeError, rs.RecallscopeError)


# -- decode_tokens ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4,), (2, 3), (2, 2, 2), (1, 1, 3)])
def test_decode_tokens_nested_like_ids(tiny_models, shape):
    model = tiny_models("gpt2")
    ids = torch.arange(40, 40 + torch.Size(shape).numel()).reshape(shape)
    decoded = rs.decode_tokens(model, ids)
    tok = model.tokenizer

    def expected(t):
        return tok.decode([int(t)]) if t.dim() == 0 else [expected(s) for s in t]

    assert decoded == expected(ids)
    assert rs.decode_tokens(model, ids.tolist()) == decoded  # lists work as well


def test_decode_tokens_of_top_k(tiny_models):
    model = tiny_models("gpt2")
    batch = rs.tokenize(model, PROMPTS, targets=[" Paris", " Paris"])
    proj = rs.project_to_vocab(model, _randn(2, 3, model.d_model), "logit_lens", k=2)
    words = rs.decode_tokens(model, proj.topk_ids)
    assert len(words) == 2 and all(len(w) == 3 and all(len(p) == 2 for p in w) for w in words)
    assert rs.decode_tokens(model, batch.target_ids) == [" Paris", " Paris"]
    assert rs.decode_tokens(model, torch.empty(0, dtype=torch.long)) == []


def test_decode_tokens_empty_trailing_axis(tiny_models):
    model = tiny_models("gpt2")
    assert rs.decode_tokens(model, torch.empty(2, 0, dtype=torch.long)) == [[], []]


def test_frozen_scale_readout_states_what_the_methods_recorded():
    """The provenance text of the frozen-scale readout, as the methods stated it before it was shared."""
    assert (
        frozen_scale_readout("o_h", detail="tracked tokens only")
        == "W_U (γ ⊙ centre(o_h)) / ρ_N; no bias, no final soft-cap; tracked tokens only"
    )
    assert (
        frozen_scale_readout(covector="W_U[t] ·", detail="target covector only")
        == "W_U[t] · (γ ⊙ centre(c)) / ρ_N; no bias, no final soft-cap; target covector only"
    )
    for bias, term in ((False, ""), (True, " + W_U β + b_U")):
        assert (
            frozen_scale_readout(bias=bias, detail="tracked tokens only")
            == f"W_U (γ ⊙ centre(c)) / ρ_N{term}; tracked tokens only; no final soft-cap"
        )
        assert (
            frozen_scale_readout("v", bias=bias, scale="ρ", detail="ρ = final norm scale")
            == f"W_U (γ ⊙ centre(v)) / ρ{term}; ρ = final norm scale; no final soft-cap"
        )
