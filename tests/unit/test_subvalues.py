"""Core identities of ``recallscope.core.subvalues`` on every tiny family (float64, padded batch)."""

from __future__ import annotations

import torch

import recallscope as rs
from recallscope.core.attention import output_gate_hook
from recallscope.core.subvalues import (
    FrozenHead,
    attn_subvalues,
    direction_ranges,
    ffn_subvalues,
    increase_bounds,
    rank1_increase,
    select_candidates,
    vector_increase,
)
from recallscope.models.sites import Site

LAYER = 1


def _cache(model, batch):
    names = ("resid_pre", "attn_out", "mlp_out", "mlp_post", "v", "pattern")
    sites = [Site(LAYER, name) for name in names] + [Site(model.n_layers - 1, "resid_post")]
    gates = []  # a gated attention output's factor (none without a gate)
    with output_gate_hook(model, LAYER, gates.append):
        cache = rs.run_with_cache(model, batch, sites, logits="last")
    last = {s.name: cache[s][:, -1].double() for s in sites if s.name not in ("v", "pattern")}
    last["v"] = cache[Site(LAYER, "v")].double()
    last["pattern"] = cache[Site(LAYER, "pattern")][:, :, -1].double()  # [B, H, T]
    last["gate"] = gates[-1][:, -1].double() if gates else None  # [B, H, d_head]
    return last, cache.logits.double()


def _tolerance(model) -> dict:
    # Gemma-2's HF norms compute in float32 even for float64 weights
    return dict(rtol=1e-6, atol=1e-6) if model.spec.attn_post_norm else dict(rtol=1e-9, atol=1e-10)


def test_subvalues_sum_to_sublayer_outputs(setup):
    model, batch = setup
    last, _ = _cache(model, batch)
    attn = attn_subvalues(model, LAYER, last["pattern"], last["v"], last["gate"])
    ffn = ffn_subvalues(model, LAYER, last["mlp_post"])
    assert attn.coeffs.shape == (len(batch), model.n_heads * model.d_head, batch.seq_len)
    assert ffn.coeffs.shape == (len(batch), model.d_mlp, 1)
    torch.testing.assert_close(attn.total(), last["attn_out"], **_tolerance(model))
    torch.testing.assert_close(ffn.total(), last["mlp_out"], **_tolerance(model))
    pads = ~batch.attention_mask.bool()
    assert not attn.coeffs.transpose(1, 2)[pads].any()  # padding contributes nothing


def test_frozen_head_gives_the_model_logits(setup):
    model, batch = setup
    last, logits = _cache(model, batch)
    head = FrozenHead.from_final(model, last["resid_post"], bias=True)
    ours = head.logits(last["resid_post"])
    cap = getattr(model.hf_model.config, "final_logit_softcapping", None)
    if cap:  # bs never soft-caps; the model does afterwards
        ours = cap * torch.tanh(ours / cap)
    torch.testing.assert_close(ours, logits, rtol=1e-6, atol=1e-6)  # HF RMSNorm round-trips via fp32
    unbiased = FrozenHead.from_final(model, last["resid_post"], bias=False).logits(last["resid_post"])
    constant = 0 if head.bias is None else head.bias
    torch.testing.assert_close(unbiased + constant, head.logits(last["resid_post"]))


def test_rank1_equals_vector_increase_and_bounds_hold(setup):
    model, batch = setup
    last, logits = _cache(model, batch)
    head = FrozenHead.from_final(model, last["resid_post"], bias=True)
    targets = logits.argmax(-1)
    cases = (
        (ffn_subvalues(model, LAYER, last["mlp_post"]), last["resid_pre"] + last["attn_out"], "ffn"),
        (attn_subvalues(model, LAYER, last["pattern"], last["v"], last["gate"]), last["resid_pre"], "attn"),
    )
    for sub, base, kind in cases:
        B, K, R = sub.coeffs.shape
        deltas = (sub.coeffs[..., None] * sub.values[None, :, None]).flatten(1, 2)  # [B, K*R, d]
        before, after = vector_increase(head, base, deltas, targets)
        base_logits = head.logits(base)
        u = sub.coeffs / head.scale[:, None, None]
        exact = rank1_increase(base_logits, u, head.directions(sub.values), targets)
        torch.testing.assert_close(exact, (after - before[:, None]).view(B, K, R), rtol=1e-9, atol=1e-13)

        ranges = direction_ranges(model, kind, LAYER, sub.values)
        bounds = increase_bounds(head, base_logits, sub.coeffs, sub.values, targets, ranges)
        slack = 1e-12
        assert (bounds["lower"] <= exact + slack).all() and (exact <= bounds["upper"] + slack).all()
        direct = u * head.directions(sub.values)[:, targets].T[:, :, None]
        torch.testing.assert_close(bounds["logit"], direct, rtol=1e-9, atol=1e-13)

        n = 7
        chosen = select_candidates(bounds["upper"].flatten(1), bounds["lower"].flatten(1), n)
        flat = exact.flatten(1)
        for row in range(B):
            for end in (flat[row].topk(n).indices, (-flat[row]).topk(n).indices):
                assert chosen[row, end].all()


def test_direction_ranges_equal_brute_force(setup):
    model, _ = setup
    values = ffn_subvalues(model, 0, torch.zeros(1, model.d_mlp, dtype=torch.float64)).values
    head = FrozenHead(model, torch.ones(1, dtype=torch.float64), None)
    directions = []
    for k in range(values.shape[0]):  # W_U (γ ⊙ centre(w_k)), written out
        params = model.norm_params(model.spec.final_norm)
        w = values[k] - values[k].mean() if params.kind == "layer" else values[k]
        gain = params.gain(torch.float64, "cpu")
        directions.append(model.W_U.double() @ (w if gain is None else gain * w))
    brute = torch.stack(directions)
    torch.testing.assert_close(head.directions(values), brute, rtol=1e-10, atol=1e-12)
    expected = brute.amax(-1) - brute.amin(-1)
    torch.testing.assert_close(
        direction_ranges(model, "ffn_test", 0, values), expected, rtol=1e-10, atol=1e-12
    )


def _rank1_oracle(base, u, D, targets):
    """Float64 ``log p(t | base + u·D) − log p(t | base)`` by materialising every shifted logit row."""
    base, u, D = base.double(), u.double(), D.double()
    shifted = base[:, None, None, :] + u[..., None] * D[None, :, None, :]  # [B, K, R, V]
    index = targets[:, None, None, None].expand(*shifted.shape[:3], 1)
    after = shifted.gather(-1, index)[..., 0] - shifted.logsumexp(-1)
    before = base.gather(-1, targets[:, None]) - base.logsumexp(-1, keepdim=True)
    return after - before[:, :, None]


def test_rank1_matches_float64_for_every_chunk_shape():
    """Single-direction and single-row chunks included: the float32 kernel stays within 2e-5 and a
    subvalue's score does not depend on which other subvalues share its chunk."""
    gen = torch.Generator().manual_seed(0)
    B, K, R, V = 3, 9, 2, 5000
    base = torch.randn(B, V, generator=gen) * 4
    D = torch.randn(K, V, generator=gen) * 2
    u = torch.randn(B, K, R, generator=gen)
    targets = torch.randint(0, V, (B,), generator=gen)
    oracle = _rank1_oracle(base, u, D, targets)
    full = rank1_increase(base, u, D, targets)
    for chunk_elems in (1, V, B * R * V, B * R * V * 4, 1 << 30):  # 1 and 4 directions per chunk, one chunk
        out = rank1_increase(base, u, D, targets, chunk_elems=chunk_elems)
        assert (out.double() - oracle).abs().max() <= 2e-5
        assert torch.equal(out, full)
    for rows, keep in ((slice(0, 1), [4]), (slice(1, 3), [7, 2])):  # single row, single direction, subsets
        out = rank1_increase(base[rows], u[rows][:, keep], D[keep], targets[rows])
        assert torch.equal(out, full[rows][:, keep])
