"""Per-head promotion / suppression (Yan & Jia Y5): per-head logits equal the naive per-head loop,
heads sum to the decoded attention update, the released code's slicing is reproduced, and the
dataset-wide rates equal a hand loop."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

import recallscope as rs
from oracles.early_decoding import per_row_results, tracked_ids, unpadded
from oracles.head_promotion import naive_head_logits
from recallscope.methods import early_decoding as ed
from recallscope.methods import head_promotion as hp
from tiny import DISCOVERED, ONE_TO_MANY, one_to_many_batch

TOL = dict(rtol=1e-9, atol=1e-10)
FAMILIES = [
    "gpt2",
    "llama_gqa",
    "gemma2",
    "gpt_neox",
    "gptj",
    "opt",
    "phi",
    "qwen3",
    "llama_mqa",
    *DISCOVERED,
]


@pytest.mark.parametrize("family", FAMILIES)
def test_equals_naive_per_head_oracle(tiny_models, family):
    model = tiny_models(family)
    for result, f, batch, row in per_row_results(hp.run, model, hp.Config()):
        expected, _ = naive_head_logits(model, unpadded(batch, row), tracked_ids(batch, row))
        np.testing.assert_allclose(result.logit[f], expected, **TOL)
        assert result.logit.shape[1:] == (model.n_layers, model.n_heads, 4)


@pytest.mark.parametrize("family", ["llama_gqa", "gemma2", "gpt2", "gpt_neox"])
def test_reference_code_slicing_equals_naive_oracle(tiny_models, family):
    model = tiny_models(family)
    for result, f, batch, row in per_row_results(hp.run, model, hp.Config.preset("yan_jia_code")):
        expected, _ = naive_head_logits(
            model, unpadded(batch, row), tracked_ids(batch, row), slicing="reference_code"
        )
        np.testing.assert_allclose(result.logit[f], expected, **TOL)


@pytest.mark.parametrize(
    "family", ["gpt2", "llama_gqa", "gemma2", "gpt_neox", "gptj", "opt", "phi", *DISCOVERED]
)
def test_heads_plus_bias_sum_to_the_decoded_attention_update(tiny_models, family):
    model = tiny_models(family)
    heads = per_row_results(hp.run, model, hp.Config())
    updates = per_row_results(ed.run, model, ed.Config(sites=("attn",)))
    # Gemma-2's HF post-norm runs in float32 even for float64 models; the folded heads are float64
    tol = dict(rtol=1e-6, atol=1e-7) if model.spec.attn_post_norm else TOL
    for (result, f, batch, row), (early, g, _, _) in zip(heads, updates, strict=True):
        _, bias = naive_head_logits(model, unpadded(batch, row), tracked_ids(batch, row))
        np.testing.assert_allclose(result.logit[f].sum(1) + bias, early.logit[g, 0], **tol)


def test_reference_code_is_the_released_view_and_differs(tiny_models):
    """The released code: ``(z_h[:, None] * o_proj.weight.view(H, d_h, d)[h]).sum(0)``."""
    model = tiny_models("llama_gqa")
    batch = one_to_many_batch(model)
    cache = rs.run_with_cache(model, batch, [rs.Site(1, "z")], positions=[-1])
    z = cache[rs.Site(1, "z")][:, 0].double()  # [B, H, d_h]
    weight = model.hf_model.model.layers[1].self_attn.o_proj.weight.detach().double()  # [d, H·d_h]
    viewed = weight.view(model.n_heads, model.d_head, model.d_model)
    by_hand = (z[..., None] * viewed[None]).sum(2)  # [B, H, d]
    got = hp.head_vectors(model, 1, z, "reference_code")
    np.testing.assert_allclose(got.numpy(), by_hand.numpy(), **TOL)
    correct = hp.head_vectors(model, 1, z, "input_columns")
    assert not np.allclose(got.numpy(), correct.numpy(), atol=1e-3)
    per_head = np.stack([(z[:, h] @ weight[:, h * 8 : (h + 1) * 8].T).numpy() for h in range(4)], 1)
    np.testing.assert_allclose(correct.numpy(), per_head, **TOL)
    default, code = hp.run(model, batch), hp.run(model, batch, hp.Config.preset("yan_jia_code"))
    assert not np.allclose(default.logit, code.logit, atol=1e-3)


@pytest.mark.parametrize("family", ["llama_gqa", "gemma2"])
def test_padded_batch_equals_one_by_one(tiny_models, family):
    model = tiny_models(family)
    together = hp.run(model, one_to_many_batch(model))
    for f, spec in enumerate(ONE_TO_MANY):
        alone = hp.run(model, one_to_many_batch(model, rows=[spec]))
        np.testing.assert_allclose(alone.logit[0], together.logit[f], **TOL)


def _hand_rates(frame: pd.DataFrame, k: float) -> dict:
    """Plain loops: thresholds per (step, layer), then per (step, layer, head) the fractions."""
    out = {}
    for (step, layer), group in frame.groupby(["step", "layer"]):
        values = list(group.logit)
        mu = sum(values) / len(values)
        sigma = (sum((v - mu) ** 2 for v in values) / len(values)) ** 0.5
        for head in sorted(set(group["head"])):
            rows = group[group["head"] == head]
            facts = sorted(set(rows.fact_id))
            promote = suppress = 0
            roles: dict = {}
            for fact in facts:
                mine = rows[rows.fact_id == fact]
                up = [v > mu + k * sigma for v in mine.logit]
                down = [v < mu - k * sigma for v in mine.logit]
                promote, suppress = promote + any(up), suppress + any(down)
                for role in set(mine.role):
                    pick = [r == role for r in mine.role]
                    hits = roles.setdefault(role, [0, 0, 0])
                    hits[0] += any(u for u, p in zip(up, pick, strict=True) if p)
                    hits[1] += any(d for d, p in zip(down, pick, strict=True) if p)
                    hits[2] += 1
            entry = {"promotion_rate": promote / len(facts), "suppression_rate": suppress / len(facts)}
            entry.update(n_examples=len(facts), mean=mu, std=sigma)
            for role in ("subject", "previous", "current", "future"):
                hits = roles.get(role)
                entry[f"promotes_{role}"] = hits[0] / hits[2] if hits else float("nan")
                entry[f"suppresses_{role}"] = hits[1] / hits[2] if hits else float("nan")
            out[(step, layer, head)] = entry
    return out


def _synthetic_frame(seed: int = 0) -> pd.DataFrame:
    """Two steps, 2 layers, 3 heads, 5 examples per step with 4 tracked tokens (roles by step)."""
    rng = np.random.default_rng(seed)
    roles = {1: ["subject", "current", "future", "future"], 2: ["subject", "previous", "current", "future"]}
    rows = []
    for step, fact, layer, head in itertools.product((1, 2), range(5), range(2), range(3)):
        for t, role in enumerate(roles[step]):
            value = rng.normal() + (3.0 if (head == 0 and role == "previous") else 0.0)
            rows.append(
                dict(
                    fact_id=f"x{fact}/step{step}",
                    step=step,
                    layer=layer,
                    head=head,
                    tracked="subject" if t == 0 else f"answer_{t}",
                    role=role,
                    token=f"t{t}",
                    logit=-value if role == "previous" else value,
                )
            )
    return pd.DataFrame(rows)


@pytest.mark.parametrize("k", [1.0, 0.5])
def test_rates_equal_a_hand_loop(k):
    frame = _synthetic_frame()
    got = hp.summary(frame, k=k)
    expected = _hand_rates(frame, k)
    assert len(got) == len(expected) == 2 * 2 * 3
    for record in got.to_dict("records"):
        want = expected[(record["step"], record["layer"], record["head"])]
        for name, value in want.items():
            if isinstance(value, float) and np.isnan(value):
                assert np.isnan(record[name]), name
            else:
                assert record[name] == pytest.approx(value, rel=1e-12, abs=1e-12), name
    assert (got[got["head"] == 0].query("step == 2").suppresses_previous == 1.0).all()
    limits = hp.thresholds(frame)
    assert list(limits.columns) == ["step", "layer", "mean", "std"] and len(limits) == 4


def test_result_frame_rates_and_provenance(tiny_models):
    model = tiny_models("llama_gqa")
    result = hp.run(model, one_to_many_batch(model), hp.Config.preset("yan_jia"))
    L, H = model.n_layers, model.n_heads
    frame = result.to_frame()
    assert list(frame.columns) == ["fact_id", "step", "layer", "head", "tracked", "role", "token", "logit"]
    assert len(frame) == 4 * L * H * 4
    pick = frame[
        (frame.fact_id == "f2") & (frame.layer == 1) & (frame["head"] == 3) & (frame.tracked == "answer_2")
    ]
    assert pick.logit.item() == result.logit[2, 1, 3, 2] and pick.role.item() == "previous"
    assert result.arrays()["f0/logit"].shape == (L, H, 4) and result.tables() == {}
    rates = result.summary()
    assert len(rates) == 3 * L * H  # steps 1, 2, 3
    assert rates.set_index(["step", "layer", "head"]).n_examples.loc[(1, 0, 0)] == 2
    pd.testing.assert_frame_equal(rates, hp.summary(frame, k=1.0))
    conventions = result.provenance["conventions"]
    assert "input-column" in conventions["heads"] and conventions["projection"].startswith("frozen_scale")
    assert (
        "output rows"
        in hp.run(model, one_to_many_batch(model), hp.Config.preset("yan_jia_code")).provenance[
            "conventions"
        ]["heads"]
    )
    assert hp.cost(model, one_to_many_batch(model)).forwards == 1


def test_config_errors():
    with pytest.raises(rs.RecallscopeError, match="wo_slicing must be one of"):
        hp.Config(wo_slicing="output_rows")
    with pytest.raises(rs.RecallscopeError, match="k must be a number ≥ 0"):
        hp.Config(k=-1)
    with pytest.raises(rs.RecallscopeError, match="missing \\['head'\\]"):
        hp.summary(pd.DataFrame(columns=["fact_id", "step", "layer", "role", "logit"]))
    assert hp.Config.preset("yan_jia_code").wo_slicing == "reference_code"
    assert hp.Config(k=1).stable_hash() == hp.Config(k=1.0).stable_hash()
