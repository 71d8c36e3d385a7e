"""Attribution patching: the estimate is the clean run's directional derivative (finite differences),
is exact where the metric is linear in the node, and its built-in verification equals naive patching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import recallscope as rs
from oracles.attribution_patching import SITE, exact_effect, logit_metric, node_value, set_node
from recallscope import Site
from recallscope.data.variants import swap_inputs
from recallscope.methods import attribution_patching as ap
from tiny import swap_facts, tiny_model


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
    if kind == "head":
        return result.head[f][layer, index, position]
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
        ]
    return nodes


@pytest.mark.parametrize(
    ("name", "eps", "rel", "tol"),
    # RMSNorm computes in float32 even in a float64 model: a larger step there, and a looser match
    [
        ("gpt2", 1e-4, 1e-6, 1e-11),
        ("gpt_neox", 1e-4, 1e-6, 1e-11),
        ("llama_gqa", 1e-2, 1e-2, 1e-6),
        ("gemma2", 1e-2, 1e-2, 1e-6),
    ],
)
def test_estimate_is_the_finite_difference_derivative(name, eps, rel, tol, tiny_models):
    """atp(n) = Δn · ∂L/∂n: equal to the central difference of L along the clean→corrupted direction."""
    model = tiny_models(name)
    facts = _facts(model, 1)
    result = ap.run(model, facts, ap.Config(verify=0))
    ids, partner, target, counter = _inputs(model, facts[0])
    rng = np.random.default_rng(0)
    for node in _some_nodes(model, len(ids), rng):
        site = Site(node[1], SITE[node[0]])
        clean = node_value(rs.run_with_cache(model, ids[None], [site]), node)[0]
        bad = node_value(rs.run_with_cache(model, partner[None], [site]), node)[0]
        up = set_node(model, ids, node, clean + eps * (bad - clean), "logit_diff", target, counter)
        down = set_node(model, ids, node, clean - eps * (bad - clean), "logit_diff", target, counter)
        assert _score(result, 0, node) == pytest.approx((up - down) / (2 * eps), rel=rel, abs=tol), node


def test_graddrop_is_the_finite_difference_with_each_block_held(tiny_models):
    """GradDrop = 1/(L−1) Σ_ℓ |derivative along Δn with block ℓ's attention and MLP updates held at
    their clean values|, each derivative a central difference."""
    model = tiny_models("gpt2")
    facts = _facts(model, 1)
    result = ap.run(model, facts, ap.Config(verify=0, graddrop=True))
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
        site = Site(node[1], SITE[node[0]])
        clean = node_value(rs.run_with_cache(model, ids[None], [site]), node)[0]
        step = eps * (node_value(rs.run_with_cache(model, partner[None], [site]), node)[0] - clean)
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
    assert verified.groupby("node").size().to_dict() == sizes
    sample = pd_sample(verified, 40)
    for row in sample.itertuples():
        node = (row.node, row.layer, row.position, None if row.index < 0 else row.index)
        site = Site(row.layer, SITE[row.node])
        values = node_value(rs.run_with_cache(model, partner[None], [site]), node)
        assert row.exact == pytest.approx(
            exact_effect(model, ids, values, node, "logit_diff", target, counter), abs=1e-12
        )
        assert row.atp == pytest.approx(_score(result, 0, node), abs=0)
    summary = result.summary().set_index("node")
    assert set(summary.index) == {"resid", "mlp", "head", "neuron"} and (summary["n_facts"] == 1).all()


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
        for name in ("resid", "mlp", "head", "neuron"):
            np.testing.assert_allclose(
                getattr(together, name)[f], getattr(alone, name)[0], rtol=1e-9, atol=1e-15
            )
        assert together.clean_metric[f] == pytest.approx(alone.clean_metric[0], abs=1e-12)
    exact = together.verified.groupby("fact_id")["exact"].apply(list)
    assert len(exact) == 4 and all(len(v) == 12 for v in exact)


def test_tables_errors_and_skips(tiny_models):
    model = tiny_models("gpt2")
    facts = _facts(model, 1)
    result = ap.run(model, facts, ap.Config(verify=2, top_neurons=5))
    tables = result.tables()
    assert len(tables["neurons"]) == 5 and tables["neurons"]["atp"].abs().is_monotonic_decreasing
    assert tables["facts"]["partner"].iloc[0] == facts[0].attributes["subject_swap"]["fact_id"]
    frame = result.to_frame()
    assert set(frame["node"]) == {"resid", "mlp", "head"} and frame["exact"].notna().sum() == 6
    assert set(result.arrays()) == {f"{facts[0].fact_id}/{n}" for n in ("resid", "mlp", "head", "neuron")}
    with pytest.raises(rs.RecallscopeError, match="corruption='subject_swap'"):
        ap.Config(corruption="gaussian")
    batch = rs.tokenize(
        model, ["The capital of France is"], spans={"subject": ["France"]}, targets=[" Paris"]
    )
    skipped = ap.run(model, batch, ap.Config())
    assert skipped.fact_ids == [] and "no subject_swap partner" in skipped.skipped[0][1]
    assert logit_metric(torch.zeros(1, 4), "prob", 0)[0] == pytest.approx(0.25)
