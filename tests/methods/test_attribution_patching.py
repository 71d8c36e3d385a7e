"""Attribution patching: the estimate is the clean run's directional derivative (finite differences),
is exact where the metric is linear in the node, AtP*'s query/key term is the really patched pattern's
change times the pattern's gradient, RelP's coefficients conserve relevance and equal a hand-linearized
model's gradient, and the built-in verification equals naive patching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import recallscope as rs
from oracles.attribution_patching import (
    SITE,
    exact_effect,
    logit_metric,
    node_value,
    read_node,
    set_node,
    softmax_effect,
)
from oracles.relp import relp_coefficients
from recallscope import Site
from recallscope.core import atp
from recallscope.core.lrp import relp_unsupported
from recallscope.data.variants import swap_inputs
from recallscope.methods import attribution_patching as ap
from tiny import FAMILY_NAMES, swap_facts, tiny_model


def _facts(model, n=2):
    facts = swap_facts(model)
    return facts.with_facts(list(facts)[:n], {"step": "test"})


def _inputs(model, fact):
    """Clean ids, the partner's ids, the gold and the counterfactual tokens, by the public API."""
    clean = rs.tokenize(model, [fact.prompt], targets=[fact.target])
    _, partner, counter = swap_inputs(model, fact)
    return clean.input_ids[0], partner, int(clean.target_ids[0]), counter


def _score(result, f, node):
    kind, layer, position, index = node
    if kind in ("resid", "mlp"):
        return getattr(result, kind)[f][position, layer]
    if kind in ("head", "query", "key"):
        return getattr(result, kind)[f][layer, index, position]
    return result.neuron[f][layer, position, index]


def _some_nodes(model, n_tokens, rng, k=6):
    nodes = []
    for _ in range(k):
        layer, position = int(rng.integers(model.n_layers)), int(rng.integers(n_tokens))
        nodes += [
            ("resid", layer, position, None),
            ("mlp", layer, position, None),
            ("head", layer, position, int(rng.integers(model.n_heads))),
            ("neuron", layer, position, int(rng.integers(model.d_mlp))),
            ("query", layer, position, int(rng.integers(model.n_heads))),
            ("key", layer, position, int(rng.integers(model.n_kv_heads))),
        ]
    return nodes


@pytest.mark.parametrize(
    ("name", "eps", "rel", "tol"),
    # RMSNorm computes in float32 even in a float64 model: a larger step there, and a looser match
    [
        ("gpt2", 1e-4, 1e-6, 1e-11),
        ("gpt_neox", 1e-4, 1e-6, 1e-11),
        ("llama_gqa", 1e-2, 1e-2, 1e-6),
        ("gemma2", 1e-2, 1e-2, 5e-6),
    ],
)
def test_estimate_is_the_finite_difference_derivative(name, eps, rel, tol, tiny_models):
    """atp(n) = Δn · ∂L/∂n: equal to the central difference of L along the clean→corrupted direction
    (queries and keys too, without AtP*'s softmax recomputation)."""
    model = tiny_models(name)
    facts = _facts(model, 1)
    result = ap.run(model, facts, ap.Config(verify=0, qk_fix=False))
    ids, partner, target, counter = _inputs(model, facts[0])
    rng = np.random.default_rng(0)
    for node in _some_nodes(model, len(ids), rng):
        clean, bad = read_node(model, ids[None], node)[0], read_node(model, partner[None], node)[0]
        up = set_node(model, ids, node, clean + eps * (bad - clean), "logit_diff", target, counter)
        down = set_node(model, ids, node, clean - eps * (bad - clean), "logit_diff", target, counter)
        assert _score(result, 0, node) == pytest.approx((up - down) / (2 * eps), rel=rel, abs=tol), node


def test_graddrop_is_the_finite_difference_with_each_block_held(tiny_models):
    """GradDrop = 1/(L−1) Σ_ℓ |derivative along Δn with block ℓ's attention and MLP updates held at
    their clean values|, each derivative a central difference."""
    model = tiny_models("gpt2")
    facts = _facts(model, 1)
    result = ap.run(model, facts, ap.Config(verify=0, graddrop=True, qk_fix=False))
    ids, partner, target, counter = _inputs(model, facts[0])
    frame = result.to_frame().set_index(["node", "layer", "index", "position"])
    held = [
        {
            s: v
            for s, v in rs.run_with_cache(model, ids[None], [Site(b, "attn_out"), Site(b, "mlp_out")]).items()
        }
        for b in range(model.n_layers)
    ]
    eps = 1e-4
    for node in _some_nodes(model, len(ids), np.random.default_rng(1), k=3):
        clean = read_node(model, ids[None], node)[0]
        step = eps * (read_node(model, partner[None], node)[0] - clean)
        total = 0.0
        for frozen in held:
            up = set_node(model, ids, node, clean + step, "logit_diff", target, counter, frozen)
            down = set_node(model, ids, node, clean - step, "logit_diff", target, counter, frozen)
            total += abs(up - down) / (2 * eps)
        expected = total / (model.n_layers - 1)
        if node[0] == "neuron":
            got = result.graddrop[0]["neuron"][node[1], node[2], node[3]]
        else:
            got = frame.loc[(node[0], node[1], -1 if node[3] is None else node[3], node[2]), "graddrop"]
        assert got == pytest.approx(expected, rel=1e-6, abs=1e-11), node
    assert f"{facts[0].fact_id}/head_graddrop" in result.arrays()


def test_verification_equals_naive_patching_of_every_node(tiny_models):
    """verify=None: every node patched for real; each exact effect equals one naive forward per node."""
    model = tiny_models("llama_gqa")
    facts = _facts(model, 1)
    result = ap.run(model, facts, ap.Config(verify=None, max_batch_rows=37))
    ids, partner, target, counter = _inputs(model, facts[0])
    verified = result.verified
    sizes = {"resid": model.n_layers * len(ids), "mlp": model.n_layers * len(ids)}
    sizes["head"] = model.n_layers * model.n_heads * len(ids)
    sizes["neuron"] = model.n_layers * model.d_mlp * len(ids)
    sizes["query"] = sizes["head"]
    sizes["key"] = model.n_layers * model.n_kv_heads * len(ids)
    assert verified.groupby("node").size().to_dict() == sizes
    sample = pd_sample(verified, 40)
    for row in sample.itertuples():
        node = (row.node, row.layer, row.position, None if row.index < 0 else row.index)
        values = read_node(model, partner[None], node)
        assert row.exact == pytest.approx(
            exact_effect(model, ids, values, node, "logit_diff", target, counter), abs=1e-12
        )
        assert row.atp == pytest.approx(_score(result, 0, node), abs=0)
    summary = result.summary().set_index("node")
    assert set(summary.index) == set(ap.SCORED) and (summary["n_facts"] == 1).all()


def pd_sample(frame, n):
    """Every node type's first rows and a seeded sample of the rest (deterministic)."""
    head = frame.groupby("node").head(3)
    rest = frame.drop(head.index).sample(n=min(n, len(frame) - len(head)), random_state=0)
    return frame.loc[sorted({*head.index, *rest.index})]


def test_estimate_is_exact_where_the_metric_is_linear_in_the_node():
    """Without a final norm, the last block's MLP neurons and output reach the logits linearly: AtP is
    the exact noising effect there (the first-order term is the whole effect)."""
    model = tiny_model("gpt2", dtype=torch.float64)
    model.hf_model.transformer.ln_f = torch.nn.Identity()
    facts = _facts(model, 2)
    result = ap.run(model, facts, ap.Config(verify=None))
    last = result.verified[
        (result.verified["layer"] == model.n_layers - 1) & (result.verified["node"] != "head")
    ]
    assert len(last) > 0 and last["exact"].abs().max() > 1e-6
    np.testing.assert_allclose(last["atp"], last["exact"], rtol=0, atol=1e-10)
    earlier = result.verified[result.verified["layer"] < model.n_layers - 1]
    assert (earlier["atp"] - earlier["exact"]).abs().max() > 1e-8  # not exact through nonlinear blocks


def test_gaussian_copies_are_averaged(tiny_models):
    model = tiny_models("gpt2")
    batch = rs.tokenize(
        model,
        ["The Eiffel Tower is in Paris"],
        spans={"subject": ["Eiffel Tower"]},
        targets=[" France"],
        fact_ids=["f"],
    )
    config = ap.Config(
        corruption="gaussian", metric="logprob", noise=0.4, samples=3, verify=4, nodes=("resid", "neuron")
    )
    result = ap.run(model, batch, config)
    ids = batch.input_ids[0]
    b, e = (int(v) for v in batch.spans["subject"][0])
    noise = torch.from_numpy(0.4 * np.random.RandomState(1).randn(3, e - b, model.d_model))
    for row in result.verified.itertuples():
        node = (row.node, row.layer, row.position, None if row.index < 0 else row.index)
        site = Site(row.layer, SITE[row.node])
        with rs.add_noise(model, noise, torch.arange(3), torch.arange(b, e).expand(3, -1)):
            values = node_value(rs.run_with_cache(model, ids[None].expand(3, -1), [site]), node)
        target = int(batch.target_ids[0])
        assert row.exact == pytest.approx(
            exact_effect(model, ids, values, node, "logprob", target), abs=1e-12
        )
    assert set(result.verified["node"]) == {"resid", "neuron"} and len(result.verified) == 8


def test_facts_alone_equal_facts_together(tiny_models):
    """One forward and backward for several left-padded facts (and their partners) = one per fact."""
    model = tiny_models("llama_gqa")
    facts = _facts(model, 4)
    lengths = {len(rs.tokenize(model, [f.prompt]).input_ids[0]) for f in facts}
    together = ap.run(model, facts, ap.Config(verify=3, batch_size=3))
    assert len(lengths) > 1 and together.fact_ids == [f.fact_id for f in facts]
    for f, fact in enumerate(facts):
        alone = ap.run(model, facts.with_facts([fact], {"step": "one"}), ap.Config(verify=3, batch_size=1))
        for name in ap.SCORED:
            np.testing.assert_allclose(
                getattr(together, name)[f], getattr(alone, name)[0], rtol=1e-9, atol=1e-15
            )
        assert together.clean_metric[f] == pytest.approx(alone.clean_metric[0], abs=1e-12)
    exact = together.verified.groupby("fact_id")["exact"].apply(list)
    assert len(exact) == 4 and all(len(v) == 18 for v in exact)


def test_tables_errors_and_skips(tiny_models):
    model = tiny_models("gpt2")
    facts = _facts(model, 1)
    result = ap.run(model, facts, ap.Config(verify=2, top_neurons=5))
    tables = result.tables()
    assert len(tables["neurons"]) == 5 and tables["neurons"]["atp"].abs().is_monotonic_decreasing
    assert tables["facts"]["partner"].iloc[0] == facts[0].attributes["subject_swap"]["fact_id"]
    frame = result.to_frame()
    assert (
        set(frame["node"]) == {"resid", "mlp", "head", "query", "key"} and frame["exact"].notna().sum() == 10
    )
    assert set(result.arrays()) == {f"{facts[0].fact_id}/{n}" for n in ap.SCORED}
    with pytest.raises(rs.RecallscopeError, match="corruption='subject_swap'"):
        ap.Config(corruption="gaussian")
    batch = rs.tokenize(
        model, ["The capital of France is"], spans={"subject": ["France"]}, targets=[" Paris"]
    )
    skipped = ap.run(model, batch, ap.Config())
    assert skipped.fact_ids == [] and "no subject_swap partner" in skipped.skipped[0][1]
    assert logit_metric(torch.zeros(1, 4), "prob", 0)[0] == pytest.approx(0.25)


@pytest.mark.parametrize("name", ["llama_gqa", "gemma2", "qwen3"])
def test_atp_star_query_key_is_the_patched_pattern_change(name, tiny_models):
    """AtP* (qk_fix): a query or key node's score is Σ (A' − A) · ∂L/∂A with A' the layer's attention
    pattern in a forward with the node really patched (GQA key heads, soft-capped scores, q/k norms)."""
    model = tiny_models(name)
    facts = _facts(model, 1)
    result = ap.run(model, facts, ap.Config(verify=0, nodes=("query", "key")))
    ids, partner, target, counter = _inputs(model, facts[0])
    rng = np.random.default_rng(2)
    nodes = [n for n in _some_nodes(model, len(ids), rng, k=4) if n[0] in ("query", "key")]
    for node in nodes:
        values = read_node(model, partner[None], node)
        expected = softmax_effect(model, ids, node, values, "logit_diff", target, counter)
        assert _score(result, 0, node) == pytest.approx(expected, rel=1e-7, abs=1e-12), node


def test_atp_star_is_exact_where_the_metric_is_linear_in_the_pattern():
    """In the last block of a GPT-2 whose final norm and last MLP write nothing nonlinear, the metric is
    linear in that block's attention probabilities: AtP*'s query and key scores equal the exact
    patching effects, while the first-order (qk_fix=False) ones do not (its queries and keys are scaled
    up so that the softmax saturates, where AtP fails)."""
    model = tiny_model("gpt2", dtype=torch.float64)
    hf = model.hf_model.transformer
    hf.ln_f = torch.nn.Identity()
    d = model.d_model
    with torch.no_grad():
        torch.nn.init.zeros_(hf.h[-1].mlp.c_proj.weight)
        hf.h[-1].attn.c_attn.weight[:, : 2 * d] *= 30
    facts = _facts(model, 2)
    last = model.n_layers - 1
    for qk_fix, exact in ((True, True), (False, False)):
        result = ap.run(model, facts, ap.Config(verify=None, nodes=("query", "key"), qk_fix=qk_fix))
        rows = result.verified[result.verified["layer"] == last]
        assert len(rows) > 0 and rows["exact"].abs().max() > 1e-6
        gap = (rows["atp"] - rows["exact"]).abs().max()
        assert gap < 1e-10 if exact else gap > 1e-8


def _relp_gradients(model, fact, nodes=("resid",), rules="relp"):
    ids, _, target, counter = _inputs(model, fact)
    metric = atp.metric("logit_diff", target, counter)
    return atp.clean_gradients(model, ids, metric, nodes, rules=rules)


def _zero_biases(model):
    with torch.no_grad():
        for name, param in model.hf_model.named_parameters():
            if name.endswith("bias"):
                param.zero_()
    return model


@pytest.mark.parametrize("name", ["llama_mha", "mistral", "qwen3", "gemma", "gpt2"])
def test_relp_conserves_relevance_at_every_block(name):
    """Without biases and with a metric linear in the logits, LRP's rules conserve relevance:
    Σ_t x_t · ∂̃L/∂x_t = L for every block output x (LayerNorm and RMSNorm, gated and plain MLPs, GQA,
    q/k norms); plain gradients do not."""
    model = _zero_biases(tiny_model(name, dtype=torch.float64))
    fact = _facts(model, 1)[0]
    for rules, conserved in (("relp", True), ("gradient", False)):
        grads = _relp_gradients(model, fact, rules=rules)
        totals = [
            float((grads.acts[("resid", layer)].double() * grads.grads[("resid", layer)]).sum())
            for layer in range(model.n_layers)
        ]
        gap = max(abs(t - grads.metric) for t in totals)
        assert gap < 1e-6 * max(1.0, abs(grads.metric)) if conserved else gap > 1e-4, (rules, totals)


def test_relp_equals_the_hand_linearized_model():
    """RelP's coefficient of every block output equals the gradient of the Llama written out by hand
    and linearized at the clean run (norm scales and attention held, SiLU ⊙ up split half/half)."""
    model = tiny_model("llama_mha", dtype=torch.float64)
    fact = _facts(model, 1)[0]
    ids, _, target, counter = _inputs(model, fact)
    grads = _relp_gradients(model, fact, nodes=("resid",))
    direction = torch.zeros(model.hf_model.config.vocab_size, dtype=torch.float64)
    direction[target], direction[counter] = 1.0, -1.0
    fresh = tiny_model("llama_mha", dtype=torch.float64).hf_model
    expected, logits = relp_coefficients(fresh, ids, direction)
    # Llama's RMSNorm takes its mean square in float32: agreement to float32 precision
    np.testing.assert_allclose(logits, rs.forward(model, ids[None])[0], rtol=1e-6, atol=1e-7)
    got = torch.stack([grads.grads[("resid", layer)] for layer in range(model.n_layers)])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


def test_relp_runs_verifies_and_is_recorded(tiny_models):
    model = tiny_models("llama_gqa")
    facts = _facts(model, 1)
    result = ap.run(model, facts, ap.Config(estimator="relp", verify=3))
    assert set(result.verified["node"]) == set(ap.SCORED)
    assert "LRP coefficient" in result.provenance["conventions"]["estimate"]
    plain = ap.run(model, facts, ap.Config(verify=3))
    assert not np.allclose(result.mlp[0], plain.mlp[0])
    assert ap.Config.preset("relp").estimator == "relp"


def test_unsupported_parts_are_refused_or_recorded(tiny_models):
    """RelP refuses a mixture-of-experts model before any work; query and key nodes are dropped (and
    recorded) for inline attention code."""
    facts = _facts(tiny_models("mixtral"), 1)
    with pytest.raises(rs.RecallscopeError, match="router weights"):
        ap.run(tiny_models("mixtral"), facts, ap.Config(estimator="relp"))
    model = tiny_models("bloom")
    facts = _facts(model, 1)
    result = ap.run(model, facts, ap.Config(verify=2))
    assert result.config.skipped_nodes == ("query", "key")
    assert "inline" in result.provenance["conventions"]["skipped_nodes"] and result.query[0].size == 0
    with pytest.raises(rs.RecallscopeError, match="computes attention inline"):
        ap.run(model, facts, ap.Config(nodes=("query",)))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_family(family, tiny_models):
    """On every family: AtP*'s query and key scores equal the really patched pattern's change (the
    top node of each), or are dropped for inline attention; RelP conserves relevance once biases are
    zeroed (a final logit soft-cap is not linear: skipped there), or is refused by name."""
    model = tiny_models(family)
    facts = _facts(model, 1)
    result = ap.run(model, facts, ap.Config(verify=1, nodes=("head", "query", "key")))
    ids, partner, target, counter = _inputs(model, facts[0])
    if not model.spec.attention_interface:
        assert result.config.skipped_nodes == ("query", "key") and set(result.verified["node"]) == {"head"}
    for row in result.verified[result.verified["node"] != "head"].itertuples():
        node = (row.node, row.layer, row.position, row.index)
        values = read_node(model, partner[None], node)
        expected = softmax_effect(model, ids, node, values, "logit_diff", target, counter)
        assert row.atp == pytest.approx(expected, rel=1e-6, abs=1e-10), node
    reason = relp_unsupported(model)
    if reason:
        with pytest.raises(rs.RecallscopeError, match="propagation rules do not cover"):
            ap.run(model, facts, ap.Config(estimator="relp"))
        return
    if model.spec.final_logit_softcap is None:
        fresh = _zero_biases(tiny_model(family, dtype=torch.float64))
        grads = _relp_gradients(fresh, facts[0])
        for layer in range(model.n_layers):
            total = float((grads.acts[("resid", layer)].double() * grads.grads[("resid", layer)]).sum())
            assert total == pytest.approx(grads.metric, rel=1e-6, abs=1e-9), layer
