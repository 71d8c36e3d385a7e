"""MLP "activation" regression (Lv et al. L5): the batched method equals the naive per-prompt oracle for
every option, fits decompose ``y`` exactly, padding and batching do not matter, and the shared
``core.mlp`` pieces (``mlp_function``, ``mlp_jvp``) are exact."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import recallscope as rs
from oracles.early_decoding import unpadded
from oracles.mlp_regression import naive_mlp_regression
from recallscope.core.mlp import mlp_function, mlp_input_site, mlp_jvp
from recallscope.methods import mlp_regression as mr
from tiny import DISCOVERED, FAMILY_NAMES, FLOAT32_INSIDE, capital_facts

TOL = dict(rtol=1e-9, atol=1e-10)
FAMILIES = ["gpt2", "llama_gqa", "gemma2", "gpt_neox", "gptj", "opt", "phi", "qwen3", "mistral", *DISCOVERED]
CONFIGS = {
    "lv": mr.Config.preset("lv"),
    "intercept_normalized": mr.Config(intercept=True, space="normalized", batch_size=2),
    "pooled_earlier": mr.Config(pooled=True, regressors="earlier_layers", batch_size=3),
    "pooled_intercept_normalized": mr.Config(pooled=True, intercept=True, space="normalized", layers=(2, 0)),
}
FIT_COLUMNS = ["r2", "r2_adjusted", "fitted_norm", "remainder_norm", "y_norm"]
FIT_COLUMNS += ["linear_total_norm", "linear_total_cos"]
RANKS = [f"{t}_rank_{w}" for t in ("subject", "target") for w in ("before", "after")]


def _linear_tol(model) -> dict:
    """Tolerance of the linearized columns: forward-mode JVP against a reverse-mode Jacobian.

    HF's RMSNorms (and Gemma-2's post-norms) compute in float32 even for float64 weights, so the two
    autodiff modes agree to float32 rounding there; LayerNorm models stay float64 throughout.
    """
    return dict(rtol=1e-5, atol=1e-6) if model.spec.norm == "rms" else TOL


def _facts_and_batch(model):
    facts = capital_facts()
    return facts, facts.to_batch(model)


def _tokens(batch, row: int) -> tuple[int, int]:
    """The subject's first token and the target's first token of ``row``, read off the batch by hand."""
    return int(batch.input_ids[row, batch.spans["subject"][row, 0]]), int(batch.target_ids[row])


def _run(model, config):
    """The method on the padded batch (GPT-J: one unpadded fact per forward; it computes attention
    scores in float32 even for float64 weights, so left padding moves its results by ~1e-9)."""
    facts, batch = _facts_and_batch(model)
    if model.spec.family in FLOAT32_INSIDE:
        return mr.run(model, facts, mr.Config.from_dict({**config.to_dict(), "batch_size": 1})), batch
    return mr.run(model, batch, config), batch


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("family", FAMILIES)
def test_equals_naive_oracle(tiny_models, family, name):
    model, config = tiny_models(family), CONFIGS[name]
    result, batch = _run(model, config)
    prompts = [unpadded(batch, row) for row in range(len(batch))]
    expected = naive_mlp_regression(model, prompts, [_tokens(batch, r) for r in range(len(batch))], config)
    for key in ("coef", "head_norm"):
        np.testing.assert_allclose(getattr(result, key), expected[key], **TOL, err_msg=key)
    for key in ("linear_coef", "linear_norm"):
        np.testing.assert_allclose(getattr(result, key), expected[key], **_linear_tol(model), err_msg=key)
    np.testing.assert_allclose(result.remainder, expected["remainder"], **TOL)
    for key in FIT_COLUMNS:
        tol = _linear_tol(model) if key.startswith("linear") else TOL
        np.testing.assert_allclose(result.fit[key], expected[key], **tol, err_msg=key)
    for key in RANKS:
        np.testing.assert_array_equal(result.fit[key], expected[key], err_msg=key)
    if config.intercept and not config.pooled:
        np.testing.assert_allclose(result.fit["intercept"], expected["intercept"], **TOL)


@pytest.mark.parametrize("family", ["llama_gqa", "gpt2", "gemma2", "gpt_neox"])
def test_fitted_plus_remainder_is_the_mlp_output(tiny_models, family):
    """``Σ β o (+ c) + f == mlp_out`` with the head outputs and ``mlp_out`` read from a plain cache."""
    model = tiny_models(family)
    _, batch = _facts_and_batch(model)
    for config in (mr.Config(), mr.Config(intercept=True), mr.Config(pooled=True)):
        result = mr.run(model, batch, config)
        sites = [rs.Site(layer, name) for layer in range(model.n_layers) for name in ("z", "mlp_out")]
        cache = rs.run_with_cache(model, batch, sites, positions=[-1])
        for i, layer in enumerate(result.layers):
            source = layer - 1 if model.spec.parallel else layer  # the attention layer the MLP reads
            if source < 0:
                continue
            y = cache[rs.Site(layer, "mlp_out")][:, 0].double()
            o = rs.head_outputs(model, source, cache[rs.Site(source, "z")].double()).parts[:, 0]  # [B, H, d]
            fitted = torch.einsum("bhd,bh->bd", o, torch.as_tensor(result.coef[:, i]))
            if config.intercept:  # a scalar per fact
                fitted = fitted + torch.as_tensor(result.fit["intercept"][:, i])[:, None]
            np.testing.assert_allclose(fitted.numpy() + result.remainder[:, i], y.numpy(), **TOL)
            norms = np.linalg.norm(y.numpy() - result.remainder[:, i], axis=-1)
            np.testing.assert_allclose(result.fit["fitted_norm"][:, i], norms, **TOL)


@pytest.mark.parametrize("family", ["llama_gqa", "opt", "phi"])
def test_r2_is_one_when_the_mlp_output_is_a_combination_of_heads(tiny_models, family, monkeypatch):
    """Replace ``mlp_out`` by ``Σ β_h o_h`` (+ c): the fit recovers ``β`` and R² = 1."""
    model = tiny_models(family)
    beta = torch.tensor([0.5, -1.25, 2.0, 0.0], dtype=torch.float64)
    real = mr.last_position_acts

    def combined(model, batch, sites):
        acts = real(model, batch, sites)
        for site in [s for s in sites if s.name == "mlp_out"]:
            feeding = site.layer - 1 if model.spec.parallel else site.layer
            if feeding >= 0:
                o = rs.head_outputs(model, feeding, acts[rs.Site(feeding, "z")][:, None]).parts[:, 0]
                acts[site] = torch.einsum("bhd,h->bd", o, beta) + 0.3
        return acts

    monkeypatch.setattr(mr, "last_position_acts", combined)
    _, batch = _facts_and_batch(model)
    result = mr.run(model, batch, mr.Config(intercept=True, linearized=False))
    fitted = ~np.isnan(result.fit["r2"][0])
    np.testing.assert_allclose(result.fit["r2"][:, fitted], 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(
        result.coef[:, fitted], np.broadcast_to(beta.numpy(), result.coef[:, fitted].shape), atol=1e-10
    )
    np.testing.assert_allclose(result.fit["intercept"][:, fitted], 0.3, atol=1e-10)
    assert np.abs(result.remainder[:, fitted]).max() < 1e-10


@pytest.mark.parametrize("family", ["llama_gqa", "gemma2", "gpt2", "phi"])
def test_padding_and_batching_do_not_matter(tiny_models, family):
    model = tiny_models(family)
    facts, batch = _facts_and_batch(model)
    together = mr.run(model, batch, mr.Config(batch_size=5))
    chunked = mr.run(model, facts, mr.Config(batch_size=2))  # other padding per forward
    for f in range(len(facts)):
        alone = mr.run(model, facts[f : f + 1])
        for key in ("coef", "linear_coef", "remainder"):
            np.testing.assert_allclose(getattr(alone, key)[0], getattr(together, key)[f], **TOL, err_msg=key)
            np.testing.assert_allclose(
                getattr(chunked, key)[f], getattr(together, key)[f], **TOL, err_msg=key
            )
        for key in ("r2", *RANKS):
            np.testing.assert_allclose(alone.fit[key][0], together.fit[key][f], **TOL, err_msg=key)
    pooled = [mr.run(model, src, mr.Config(pooled=True, batch_size=b)) for src, b in ((batch, 5), (facts, 2))]
    np.testing.assert_allclose(pooled[0].coef, pooled[1].coef, **TOL)


@pytest.mark.parametrize("family", ["llama_gqa", "gptj", "gemma2", "opt"])
def test_remainders_helper(tiny_models, family):
    model = tiny_models(family)
    facts, batch = _facts_and_batch(model)
    for config in (mr.Config(), mr.Config(intercept=True, space="normalized", regressors="earlier_layers")):
        result = mr.run(model, facts, config)
        for i, layer in enumerate(result.layers):
            kw = dict(regressors=config.regressors, intercept=config.intercept, space=config.space)
            y, rest = mr.remainders(model, facts, layer, **kw)
            np.testing.assert_allclose(rest.numpy(), result.remainder[:, i], rtol=1e-9, atol=1e-9)
            sites = mr.needed_sites(model, [layer], regressors=config.regressors)
            acts = mr.last_position_acts(model, batch, sites)
            y2, rest2 = mr.remainders(model, acts, layer, **kw)
            np.testing.assert_allclose(rest2.numpy(), rest.numpy(), rtol=1e-9, atol=1e-9)
            cache = rs.run_with_cache(model, batch, [rs.Site(layer, "mlp_out")], positions=[-1])
            assert torch.equal(y2, cache[rs.Site(layer, "mlp_out")][:, 0].double())
    with pytest.raises(rs.RecallscopeError, match="lack site"):
        mr.remainders(model, {}, 1)


def test_parallel_first_mlp_has_no_regressors(tiny_models):
    model = tiny_models("gptj")
    facts, _ = _facts_and_batch(model)
    result = mr.run(model, facts, mr.Config(batch_size=1))
    assert np.isnan(result.fit["r2"][:, 0]).all() and (result.fit["n_regressors"][:, 0] == 0).all()
    assert 0 not in set(result.to_frame().layer) and result.provenance["conventions"][
        "layers_without_regressors"
    ] == [0]
    y, rest = mr.remainders(model, facts, 0)
    assert torch.equal(y, rest)
    np.testing.assert_allclose(result.remainder[:, 0], y.numpy(), **TOL)
    assert set(result.to_frame().source_layer) == {0, 1}


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_mlp_function_is_bit_exact(tiny_models, family):
    model = tiny_models(family)
    _, batch = _facts_and_batch(model)
    for layer in range(model.n_layers):
        site = mlp_input_site(model, layer)
        cache = rs.run_with_cache(model, batch, [site, rs.Site(layer, "mlp_out")])
        assert torch.equal(mlp_function(model, layer)(cache[site]), cache[rs.Site(layer, "mlp_out")])


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_mlp_jvp_equals_the_jacobian(tiny_models, family):
    model = tiny_models(family)
    _, batch = _facts_and_batch(model)
    layer = 1
    resid = rs.run_with_cache(model, batch, [mlp_input_site(model, layer)], positions=[-1])[
        mlp_input_site(model, layer)
    ][:, 0]
    directions = torch.randn(
        len(resid), 3, model.d_model, generator=torch.Generator().manual_seed(0)
    ).double()
    got = mlp_jvp(model, layer, resid, directions)
    f = mlp_function(model, layer)
    for b in range(len(resid)):
        J = torch.autograd.functional.jacobian(f, resid[b])  # [d, d]
        np.testing.assert_allclose(got[b].numpy(), (directions[b] @ J.T).numpy(), **_linear_tol(model))


def test_frame_tables_arrays_and_provenance(tiny_models):
    model = tiny_models("llama_gqa")
    facts, batch = _facts_and_batch(model)
    result = mr.run(model, facts, mr.Config.preset("lv", layers=(1, 2)))
    L, H, F = 2, model.n_heads, len(facts)
    frame = result.to_frame()
    assert list(frame.columns) == [
        "fact_id",
        "layer",
        "source_layer",
        "head",
        "coef",
        "effective_weight",
        "head_norm",
        "linear_coef",
        "linear_norm",
    ]
    assert len(frame) == F * L * H
    pick = frame[(frame.fact_id == "capital/Italy") & (frame.layer == 2) & (frame["head"] == 3)]
    f = result.fact_ids.index("capital/Italy")
    assert (
        pick.coef.item() == result.coef[f, 1, 3] and pick.effective_weight.item() == 1 + result.coef[f, 1, 3]
    )
    fit = result.tables()["fit"]
    assert list(fit.columns[:7]) == [
        "fact_id",
        "layer",
        "r2",
        "r2_adjusted",
        "y_norm",
        "fitted_norm",
        "remainder_norm",
    ]
    assert set(RANKS) <= set(fit.columns) and "intercept" not in fit and len(fit) == F * L
    assert ((fit[RANKS] >= 1) & (fit[RANKS] <= model.d_vocab)).all().all()
    arrays = result.arrays()
    assert arrays["capital/Italy/coef"].shape == (L, H) and arrays["capital/Italy/remainder"].shape == (
        L,
        model.d_model,
    )
    conventions = result.provenance["conventions"]
    assert "per example" in conventions["regression"] and conventions["ranks"].startswith("logit_lens")
    assert mr.cost(model, batch, mr.Config(batch_size=2)).forwards == 3
    assert not mr.needs_all_facts(mr.Config()) and mr.needs_all_facts(mr.Config(pooled=True))
    normalized = mr.run(model, batch, mr.Config(space="normalized", intercept=True))
    assert normalized.to_frame().effective_weight.isna().all() and "intercept" in normalized.tables()["fit"]


def test_coefficients_summary_equals_a_hand_loop(tiny_models):
    model = tiny_models("gpt2")
    facts = capital_facts()
    parts = [mr.run(model, facts[:3]), mr.run(model, facts[3:])]  # two runner chunks
    frame = pd.concat([p.to_frame() for p in parts], ignore_index=True)
    fit = pd.concat([p.tables()["fit"] for p in parts], ignore_index=True)
    summary = mr.summary(frame, fit)
    assert len(summary) == model.n_layers * model.n_heads
    for row in summary.to_dict("records"):
        rows = frame[(frame.layer == row["layer"]) & (frame["head"] == row["head"])]
        coef = list(rows.coef)
        mean = sum(coef) / len(coef)
        sem = (sum((c - mean) ** 2 for c in coef) / (len(coef) - 1)) ** 0.5 / len(coef) ** 0.5
        assert row["coef"] == pytest.approx(mean, rel=1e-12)
        assert row["coef_ci"] == pytest.approx(1.96 * sem, rel=1e-9)
        assert row["frac_positive"] == sum(c > 0 for c in coef) / len(coef)
        assert row["linear_coef"] == pytest.approx(rows.linear_coef.mean(), rel=1e-12)
        assert row["r2"] == pytest.approx(fit[fit.layer == row["layer"]].r2.mean(), rel=1e-12)
        adjusted = fit[fit.layer == row["layer"]].r2_adjusted.mean()
        assert row["r2_adjusted"] == pytest.approx(adjusted, rel=1e-12)
        n, d = model.n_heads, model.d_model  # 1 - (1 - R²) d / (d - n) without an intercept
        one = fit[fit.layer == row["layer"]].iloc[0]
        assert one.r2_adjusted == pytest.approx(1 - (1 - one.r2) * d / (d - n), rel=1e-12)
        assert row["n"] == len(coef) == len(facts)
    assert "r2" not in mr.summary(frame)


def test_config_errors(tiny_models):
    with pytest.raises(rs.RecallscopeError, match="regressors must be one of"):
        mr.Config(regressors="all")
    with pytest.raises(rs.RecallscopeError, match="space must be one of"):
        mr.Config(space="ln2")
    with pytest.raises(rs.RecallscopeError, match="layers must be None"):
        mr.Config(layers=(1, 1))
    with pytest.raises(rs.RecallscopeError, match="batch_size must be"):
        mr.Config(batch_size=0)
    with pytest.raises(rs.RecallscopeError, match="pooled must be True or False"):
        mr.Config(pooled="yes")
    with pytest.raises(rs.RecallscopeError, match="does not exist"):
        mr.run(tiny_models("gpt2"), capital_facts(), mr.Config(layers=(7,)))
    with pytest.raises(rs.RecallscopeError, match="missing"):
        mr.summary(pd.DataFrame(columns=["fact_id", "layer"]))
    model = tiny_models("gpt2")
    heads = {0: [(0, h) for h in range(model.d_model)]}
    with pytest.raises(rs.RecallscopeError, match="not determined"):
        mr._check_sizes(model, mr.Config(), heads, 5)
    mr._check_sizes(model, mr.Config(pooled=True), heads, 5)
    assert mr.Config.preset("lv").regressors == "feeding_layer"


def test_ranks_before_and_after_the_mlp_leave_a_later_update_out(tiny_models):
    """Gemma 4 adds a per-layer input after the MLP: "after" is resid_mid + mlp_out, not resid_post."""
    model = tiny_models("gemma4_text")
    _, batch = _facts_and_batch(model)
    result = mr.run(model, batch, mr.Config())
    sites = [rs.Site(layer, name) for layer in result.layers for name in ("resid_mid", "mlp_out")]
    cache = rs.run_with_cache(model, batch, sites, positions=[-1])
    targets = batch.target_ids.clamp(min=0)
    for i, layer in enumerate(result.layers):
        mid, mlp = (cache[rs.Site(layer, name)][:, 0] for name in ("resid_mid", "mlp_out"))
        for when, x in (("before", mid), ("after", mid + mlp)):
            proj = rs.project_to_vocab(model, x, "logit_lens", targets=targets)
            expected = proj.target_ranks.numpy() + 1
            np.testing.assert_array_equal(result.fit[f"target_rank_{when}"][:, i], expected)
