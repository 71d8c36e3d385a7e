"""Causal tracing: the batched, prefix-reusing implementation equals ROME's naive loop exactly."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

import recallscope as rs
from oracles.causal_tracing import SITE, naive_cell, naive_patch, naive_trace, window_layers
from recallscope.core.corruption import gaussian
from recallscope.data.facts import annotate
from recallscope.data.variants import add_swap_partners
from recallscope.methods import causal_tracing as ct
from tiny import CAPITALS, DISCOVERED, swap_facts

PROMPT = "The Eiffel Tower is in Paris"


def _batch(model, prompt=PROMPT, subject="Eiffel Tower"):
    return rs.tokenize(model, [prompt], spans={"subject": [subject]}, targets=[" Paris"], fact_ids=["f"])


@pytest.mark.parametrize(
    "name", ["gpt2", "llama_gqa", "gemma2", "gptj", "opt", "gpt_neox", "mistral", "phi", *DISCOVERED]
)
@pytest.mark.parametrize("reuse", [True, False], ids=["reuse", "rerun"])
def test_fast_equals_naive_loop(name, reuse, tiny_models):
    model = tiny_models(name)
    batch = _batch(model)
    config = ct.Config(samples=3, window=2, noise=0.5, reuse=reuse, max_batch_rows=40)
    trace = ct.run(model, batch, config).traces[0]
    scores, low, high = naive_trace(
        model,
        batch.input_ids[0],
        trace.span,
        trace.target_ids[0],
        kinds=config.kinds,
        samples=3,
        noise=0.5,
        window=2,
    )
    for kind in config.kinds:
        np.testing.assert_allclose(trace.scores[kind], scores[kind], rtol=0, atol=1e-12)
    assert trace.low == pytest.approx(low, abs=1e-12) and trace.high == pytest.approx(high, abs=1e-12)


@pytest.mark.parametrize("forward_cost", [0, 50, 10**6])
def test_grouping_does_not_change_scores(forward_cost, tiny_models):
    model = tiny_models("llama_gqa")
    batch = _batch(model)
    base = ct.run(model, batch, ct.Config(samples=2, window=3, noise=0.3)).traces[0]
    other = ct.run(model, batch, ct.Config(samples=2, window=3, noise=0.3, forward_cost=forward_cost)).traces[
        0
    ]
    for kind in base.scores:
        np.testing.assert_allclose(other.scores[kind], base.scores[kind], rtol=0, atol=1e-12)


def test_answer_logprob_metric_equals_naive(tiny_models):
    model = tiny_models("gpt2")
    batch = rs.tokenize(model, [PROMPT], spans={"subject": ["Eiffel"]}, targets=[" Paris in France"])
    answer = list(batch.answer_ids[0])
    assert len(answer) > 1
    config = ct.Config(
        samples=2, window=2, noise=0.4, target="gold", metric="answer_logprob", kinds=("hidden", "mlp")
    )
    trace = ct.run(model, batch, config).traces[0]
    ids = batch.input_ids[0]
    for kind, t, layer in [
        ("hidden", trace.span[0], 0),
        ("mlp", len(ids) - 1, 2),
        ("hidden", len(ids) - 2, 1),
    ]:
        layers = window_layers(kind, layer, 2, model.n_layers)
        expected, _ = naive_cell(
            model, ids, trace.span, answer, samples=2, noise=0.4, position=t, restore=layers, site=SITE[kind]
        )
        assert trace.scores[kind][t, layer] == pytest.approx(expected, abs=1e-10)
    assert trace.target_ids == answer and trace.high <= 0 and trace.low < trace.high


def test_zero_noise_restorations_equal_the_clean_probability(tiny_models):
    model = tiny_models("gpt_neox")
    trace = ct.run(model, _batch(model), ct.Config(samples=2, window=2, noise=0.0)).traces[0]
    assert trace.low == pytest.approx(trace.high, abs=1e-14)
    for scores in trace.scores.values():
        np.testing.assert_allclose(scores, trace.high, rtol=0, atol=1e-13)


def test_restoring_the_only_corrupted_state_recovers_the_clean_run(tiny_models):
    """Corrupt only the last token: restoring its hidden state at any layer restores everything."""
    model = tiny_models("qwen3")
    batch = _batch(model, "The Eiffel Tower is in Paris", "Paris")
    trace = ct.run(model, batch, ct.Config(samples=3, window=2, noise=1.0, kinds=("hidden",))).traces[0]
    assert trace.span[1] == len(trace.tokens)
    np.testing.assert_allclose(trace.scores["hidden"][-1], trace.high, rtol=0, atol=1e-12)
    np.testing.assert_allclose(trace.scores["hidden"][:-1], trace.low, rtol=0, atol=1e-14)


def test_noise_level_is_three_std_of_the_span_embeddings(tiny_models):
    model = tiny_models("llama_gqa")
    batch = rs.tokenize(
        model, ["The capital of France is", "Miles Davis plays"], spans={"subject": ["France", "Miles Davis"]}
    )
    embeds = rs.run_with_cache(model, batch, ["embed"])["embed"]
    expected = 3 * float(embeds[batch.span_mask("subject")].std())
    assert ct.noise_level(model, batch) == pytest.approx(expected, rel=1e-12)
    result = ct.run(model, batch, ct.Config(samples=1, kinds=("hidden",)))
    assert result.noise == {"subject": pytest.approx(expected, rel=1e-12)}
    assert result.provenance["conventions"]["noise_rule"].startswith("3.0 x std")


def test_result_tables(tiny_models):
    model = tiny_models("gpt2")
    result = ct.run(model, _batch(model), ct.Config(samples=2, window=2, noise=0.3))
    trace = result.traces[0]
    frame = result.to_frame()
    n_pos, n_layers = len(trace.tokens), model.n_layers
    assert len(frame) == 3 * n_pos * n_layers
    assert set(frame.columns) >= {
        "fact_id",
        "kind",
        "position",
        "layer",
        "token",
        "bucket",
        "score",
        "indirect_effect",
    }
    assert trace.buckets()[trace.span[0]] == "first subject" and trace.buckets()[-1] == "last token"
    assert set(result.arrays()) == {"f/hidden", "f/mlp", "f/attn"}
    runs = result.tables()["runs"]
    assert len(runs) == 1 and runs["clean_prob"].iloc[0] == pytest.approx(trace.high)
    assert runs["corrupted_prob"].iloc[0] == pytest.approx(trace.low) and runs["corrupted_kl"].iloc[0] > 0
    average = result.summary()
    assert set(average["bucket"]) <= set(ct.BUCKETS)
    conventions = result.provenance["conventions"]
    assert conventions["window"] == 2 and conventions["target"] == "top1" and conventions["metric"] == "prob"
    assert result.provenance["model"]["family"] == "gpt2"


def test_presets_and_errors():
    assert ct.Config.preset("rome").kinds == ("hidden", "mlp", "attn")
    yan_jia = ct.Config.preset("yan_jia", spans=("answer_1",))
    assert (
        yan_jia.kinds == ("mlp", "attn")
        and yan_jia.spans == ("answer_1",)
        and yan_jia.preset_name == "yan_jia"
        and ct.Config.preset("yan_jia").spans == ("subject", "answers")
    )
    with pytest.raises(rs.RecallscopeError, match="no preset 'romee'"):
        ct.Config.preset("romee")
    with pytest.raises(rs.RecallscopeError, match="no field 'sample'; did you mean 'samples'"):
        ct.Config.from_dict({"sample": 3})
    with pytest.raises(rs.RecallscopeError, match="kinds must be a non-empty tuple"):
        ct.Config(kinds=("mlp", "head"))
    with pytest.raises(rs.RecallscopeError, match="set target='gold'"):
        ct.Config(metric="answer_logprob")
    assert list(ct.window(0, 10, 30)) == list(range(0, 5)) and list(ct.window(20, 10, 30)) == list(
        range(15, 25)
    )


def test_missing_span_is_reported(tiny_models):
    model = tiny_models("gpt2")
    batch = rs.tokenize(
        model, ["The capital of France is", "Hello there"], spans={"subject": ["France", None]}
    )
    result = ct.run(model, batch, ct.Config(samples=1, kinds=("hidden",), noise=0.1))
    assert len(result.traces) == 1 and result.skipped == [("1", "no subject or answers span")]
    with pytest.raises(rs.RecallscopeError, match="none of the spans \\['answer_1'\\]"):
        ct.run(model, batch, ct.Config(spans=("answer_1",)))


def test_reused_states_are_not_modified(tiny_models):
    """The clean cache and recorded run are read-only inputs of every resumed forward."""
    model = tiny_models("llama_gqa")
    batch = _batch(model)
    first = ct.run(model, batch, ct.Config(samples=2, window=2, noise=0.3)).traces[0]
    second = ct.run(model, batch, ct.Config(samples=2, window=2, noise=0.3)).traces[0]
    for kind in first.scores:
        assert np.array_equal(first.scores[kind], second.scores[kind])
    assert torch.equal(rs.forward(model, batch), rs.forward(model, batch))


def test_runs_on_a_factset(tiny_models):
    model = tiny_models("gpt2")
    facts = rs.FactSet(
        [rs.Fact.from_template("The [capital] of {subject} is", "France", ["Paris"], fact_id="c")]
    )
    result = rs.methods.causal_tracing.run(model, facts, ct.Config(samples=1, kinds=("hidden",), noise=0.2))
    assert [t.fact_id for t in result.traces] == ["c"] and result.traces[0].tokens[
        result.traces[0].span[0]
    ].strip() == "France"


@pytest.mark.parametrize("name", ["llama_gqa", "gpt2"])
def test_one_to_many_traces_each_previous_answer_separately(name, tiny_models):
    """Yan & Jia's noise_prev_ans: each previous answer span is traced on its own, equal to the naive loop."""
    from tiny import one_to_many_batch

    model = tiny_models(name)
    batch = one_to_many_batch(model)
    config = ct.Config(samples=2, window=2, kinds=("mlp", "attn"), target="gold", max_batch_rows=64)
    config = ct.prepare(model, batch, config)
    levels = dict(config.noise_levels)
    answers = batch.span_mask("answer_1") | batch.span_mask("answer_2")
    embeds = rs.run_with_cache(model, batch, ["embed"])["embed"]
    assert levels["answers"] == pytest.approx(3 * float(embeds[answers].std()), rel=1e-12)
    assert levels["subject"] == pytest.approx(3 * float(embeds[batch.span_mask("subject")].std()), rel=1e-12)
    result = ct.run(model, batch, config)
    spans = [(t.fact_id, t.span_name, t.step) for t in result.traces]
    assert spans == [
        ("f0", "subject", 1),
        ("f1", "subject", 2),
        ("f1", "answer_1", 2),
        ("f2", "subject", 3),
        ("f2", "answer_1", 3),
        ("f2", "answer_2", 3),
        ("f3", "subject", 1),
    ]
    trace = result.traces[4]  # step 3, the first answer corrupted
    pad = int(batch.pad_lengths[2])
    assert trace.noise == levels["answers"] and trace.buckets()[trace.span[1] - 1] == "last answer_1"
    scores, low, high = naive_trace(
        model,
        batch.input_ids[2, pad:],
        trace.span,
        int(batch.target_ids[2]),
        kinds=config.kinds,
        samples=2,
        noise=levels["answers"],
        window=2,
    )
    for kind in config.kinds:
        np.testing.assert_allclose(trace.scores[kind], scores[kind], rtol=0, atol=1e-12)
    frame = result.to_frame()
    assert set(frame["span"]) == {"subject", "answer_1", "answer_2"} and set(frame["step"]) == {1, 2, 3}
    assert "f2/answer_2/mlp" in result.arrays() and "f2/mlp" in result.arrays()
    average = result.summary()
    assert {"last answer_2", "last token"} <= set(average.loc[average["span"] == "answer_2", "bucket"])


# -- corruptions, directions and metrics (Zhang & Nanda 2024) ------------------------------------------


def _corrupt_rows(model, fact, trace, config):
    """The corrupted rows and noise, rebuilt from the spec (RandomState draws, partner prompt)."""
    ids = rs.tokenize(model, [fact.prompt]).input_ids[0]
    b, e = trace.span
    if trace.corruption == "gaussian":
        noise = torch.from_numpy(
            config.noise * np.random.RandomState(config.seed).randn(config.samples, e - b, model.d_model)
        )
        return ids.expand(config.samples, -1), noise, None
    if trace.corruption == "resample":
        vocab = sorted(
            {i for s, _ in CAPITALS for i in model.tokenizer(s, add_special_tokens=False)["input_ids"]}
        )
        drawn = np.random.RandomState(config.seed).randint(0, len(vocab), size=(config.samples, e - b))
        rows = ids.expand(config.samples, -1).clone()
        rows[:, b:e] = torch.tensor(np.asarray(vocab)[drawn])
        return rows, None, None
    swap = fact.attributes["subject_swap"]
    partner = rs.tokenize(model, [swap["prompt"]], targets=[" " + swap["answers"][0]])
    return partner.input_ids, None, int(partner.target_ids[0])


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_every_corruption_and_direction_equals_the_naive_loop(name, tiny_models):
    """Every cell of every (corruption, direction) grid, positions before the span included (a null
    patch there gives the target run's metrics), equals one naive forward per cell, for every metric."""
    model = tiny_models(name)
    facts = swap_facts(model)
    fact = facts[0]
    config = ct.Config(
        samples=2, window=2, noise=0.5, corruptions=("gaussian", "subject_swap", "resample"),
        directions=("denoising", "noising"), max_batch_rows=24,
    )  # fmt: skip
    one = facts.with_facts([fact], {"step": "one"})
    every = swap_facts(model, partnered=False)
    result = ct.run(model, one, ct.prepare(model, one, config, dataset=every))  # every subject's tokens
    assert {(t.corruption, t.direction) for t in result.traces} == {
        (c, d) for c in config.corruptions for d in config.directions
    }
    clean_ids = rs.tokenize(model, [fact.prompt]).input_ids[0]
    for trace in result.traces:
        rows, noise, counter = _corrupt_rows(model, fact, trace, result.config)
        assert (counter is not None) == (trace.corruption == "subject_swap")
        common = dict(
            direction=trace.direction,
            target=trace.target_ids[0],
            counter=counter,
            noise=noise,
            span=trace.span,
        )
        for kind in config.kinds:
            for t in range(len(clean_ids)):
                for layer in range(model.n_layers):
                    layers = window_layers(kind, layer, 2, model.n_layers)
                    expected = naive_patch(
                        model, clean_ids, rows, restore=layers, site=SITE[kind], position=t, **common
                    )
                    for metric, value in expected.items():
                        got = trace.metrics[kind][metric][t, layer]
                        assert got == pytest.approx(value, abs=1e-10, nan_ok=True), (
                            trace.corruption,
                            trace.direction,
                            kind,
                            t,
                            layer,
                            metric,
                        )
        assert trace.partner == (fact.attributes["subject_swap"]["fact_id"] if counter is not None else None)


def test_swapping_in_the_same_subject_equals_the_clean_run(tiny_models):
    model = tiny_models("llama_gqa")
    fact = swap_facts(model)[0]
    own = dict(fact_id=fact.fact_id, subject=fact.subject, prompt=fact.prompt, answers=fact.answers)
    own["subject_span"] = fact.subject_span
    same = rs.FactSet([annotate(fact, subject_swap=own)])
    config = ct.Config(
        window=2,
        corruptions=("subject_swap",),
        directions=("denoising", "noising"),
        metric="logit_diff",
        target="gold",
    )
    for trace in ct.run(model, same, config).traces:
        assert trace.low == pytest.approx(trace.high, abs=1e-12) and trace.high == pytest.approx(
            0.0, abs=1e-12
        )
        assert trace.clean["kl"] == pytest.approx(0.0, abs=1e-12) and trace.corrupted["kl"] == pytest.approx(
            0.0, abs=1e-12
        )
        for kind in config.kinds:
            np.testing.assert_allclose(trace.metrics[kind]["prob"], trace.clean["prob"], rtol=0, atol=1e-12)


@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_zero_noise_in_either_direction_equals_the_clean_run(direction, tiny_models):
    model = tiny_models("gpt_neox")
    trace = ct.run(
        model, _batch(model), ct.Config(samples=2, window=2, noise=0.0, directions=(direction,))
    ).traces[0]
    assert trace.low == pytest.approx(trace.high, abs=1e-14)
    for kind in trace.metrics:
        np.testing.assert_allclose(trace.metrics[kind]["kl"], 0.0, rtol=0, atol=1e-12)
        np.testing.assert_allclose(trace.scores[kind], trace.high, rtol=0, atol=1e-13)


def test_swap_partners_align_and_do_not_depend_on_the_sample(tiny_models):
    model = tiny_models("gpt2")
    swapped = swap_facts(model, seed=3, partnered=False)
    facts = swapped.with_facts([replace(f, attributes={}) for f in swapped], {"step": "plain"})
    partnered = [f for f in swapped if "subject_swap" in f.attributes]
    assert partnered
    for fact in partnered:
        swap = fact.attributes["subject_swap"]
        ids = model.tokenizer(fact.prompt)["input_ids"]
        other = model.tokenizer(swap["prompt"])["input_ids"]
        assert (
            len(ids) == len(other)
            and swap["subject"] != fact.subject
            and swap["answers"][0] != fact.answers[0]
        )
        differ = [i for i, (a, b) in enumerate(zip(ids, other, strict=True)) if a != b]
        batch = rs.tokenize(model, [fact.prompt], spans={"subject": [fact.subject_span]})
        start, end = (int(v) for v in batch.spans["subject"][0])
        assert all(start <= i < end for i in differ)
        alone = add_swap_partners(model, facts.with_facts([fact], {"step": "one"}), pool=list(facts), seed=3)
        assert alone[0].attributes["subject_swap"] == swap
    lonely = rs.FactSet([facts[0]])
    assert "subject_swap" not in add_swap_partners(model, lonely)[0].attributes


def test_subject_swap_without_partners_skips_the_facts(tiny_models):
    model = tiny_models("gpt2")
    result = ct.run(
        model, _batch(model), ct.Config(window=2, corruptions=("gaussian", "subject_swap"), noise=0.1)
    )
    assert (
        result.traces == []
        and result.skipped[0][0] == "f"
        and "no subject_swap partner" in result.skipped[0][1]
    )


def test_metric_columns_and_normalized_score(tiny_models):
    model = tiny_models("gpt2")
    facts = swap_facts(model)
    config = ct.Config(
        window=2, samples=2, corruptions=("gaussian", "subject_swap"), directions=("denoising", "noising")
    )
    result = ct.run(model, facts.with_facts([facts[0]], {"step": "one"}), config)
    frame = result.to_frame()
    assert {"corruption", "direction", "normalized", "prob", "logprob", "logit_diff", "kl", "partner"} <= set(
        frame
    )
    assert set(zip(frame["corruption"], frame["direction"], strict=True)) == {
        (c, d) for c in config.corruptions for d in config.directions
    }
    rows = frame.iloc[::7]
    np.testing.assert_allclose(
        rows["normalized"], (rows["score"] - rows["low"]) / (rows["high"] - rows["low"])
    )
    noising = frame[frame["direction"] == "noising"]
    np.testing.assert_allclose(noising["indirect_effect"], noising["high"] - noising["score"])
    assert frame.loc[frame["corruption"] == "gaussian", "logit_diff"].isna().all()
    assert frame.loc[frame["corruption"] == "subject_swap", "logit_diff"].notna().all()
    keys = set(result.arrays())
    assert f"{facts[0].fact_id}/mlp" in keys and f"{facts[0].fact_id}/subject_swap/noising/mlp" in keys
    summary = result.summary()
    assert {"corruption", "direction", "normalized"} <= set(summary)


def test_logit_diff_needs_a_subject_swap():
    with pytest.raises(rs.RecallscopeError, match="corruptions=\\('subject_swap',\\)"):
        ct.Config(metric="logit_diff")
    preset = ct.Config.preset("zhang_nanda")
    assert preset.corruptions == ("subject_swap",) and preset.metric == "logit_diff"
    with pytest.raises(rs.RecallscopeError, match="corruptions"):
        ct.Config(corruptions=("gaussian", "gaussian"))


def test_noise_level_is_the_recipe_on_the_whole_dataset(tiny_models, tmp_path):
    """ν = 3 × std of the embedding entries of every subject of the loaded dataset, each tokenized
    alone, whatever the sample (--limit, --seed)."""
    from recallscope.runner import Job, prepare_job

    model = tiny_models("gpt2")
    levels = set()
    for limit, seed in [(2, 0), (5, 7)]:
        job = Job(
            out=tmp_path / f"{limit}",
            dataset="mixed",
            limit=limit,
            seed=seed,
            known_only=False,
            methods=("causal_tracing",),
        )
        _, facts, configs, _ = prepare_job(job, model, write=False, log=lambda _: None)
        assert len(facts) == limit
        levels.add(dict(configs["causal_tracing"].noise_levels)["subject"])
    dataset = rs.load_facts("mixed").fit_context(model)
    ids = [i for f in dataset for i in model.tokenizer(f.subject, add_special_tokens=False)["input_ids"]]
    entries = model.W_E.double()[torch.tensor(ids)]
    mean = entries.mean()
    by_hand = 3 * float(((entries - mean) ** 2).sum() / (entries.numel() - 1)) ** 0.5
    assert len(levels) == 1 and levels.pop() == pytest.approx(by_hand, rel=1e-12)


def test_default_samples_follow_the_device_and_are_rome_s_first_draws(tiny_models, monkeypatch):
    model = tiny_models("gpt2")
    batch = _batch(model)
    fast = ct.run(model, batch, ct.Config(kinds=("hidden",), noise=0.3))
    assert fast.config.samples == ct.SAMPLES["cpu"] == 3
    assert fast.provenance["conventions"]["samples_rule"] == "samples=None: 3 on a CPU, 10 (ROME) on a GPU"
    assert ct.prepare(model, batch, ct.Config()).samples == 3 and ct.Config.preset("rome").samples == 10
    explicit = ct.run(model, batch, ct.Config(kinds=("hidden",), noise=0.3, samples=3))
    assert np.array_equal(fast.traces[0].scores["hidden"], explicit.traces[0].scores["hidden"])
    draws = [gaussian(batch.input_ids[0], (1, 3), noise=0.3, samples=n, seed=1, model=model) for n in (3, 10)]
    assert torch.equal(draws[0].noise, draws[1].noise[:3])  # ROME's first three noise draws
    monkeypatch.setattr(type(model), "device", property(lambda self: torch.device("cuda")))
    assert (
        ct.cost(model, batch, ct.Config()).forwards == ct.cost(model, batch, ct.Config(samples=10)).forwards
    )


def test_the_report_states_the_samples_and_how_to_get_rome_s(tmp_path):
    from recallscope.methods.general.report import _tracing_settings

    fast = _tracing_settings({"samples": 3, "window": 10, "corruptions": ["gaussian"], "metric": "prob"})
    assert fast.startswith(
        "Settings: 3 corrupted copies per fact, window 10, corruptions gaussian, metric prob."
    )
    assert 'preset = "rome"' in fast
    assert "preset" not in _tracing_settings({"samples": 10, "window": 10, "corruptions": ["gaussian"]})
    assert "preset" not in _tracing_settings({"samples": 1, "window": 5, "corruptions": ["subject_swap"]})
