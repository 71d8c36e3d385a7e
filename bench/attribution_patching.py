"""Attribution patching against the exact patching grid of the same nodes, in one run.

On the embedded model (or ``--model``), for facts the model knows with a subject-swap partner:

- AtP: :func:`recallscope.methods.attribution_patching.run` with ``verify=0`` (one clean forward and
  backward and one forward of the partner per fact), every block output, MLP update, head, MLP
  neuron, query and key at every position (queries and keys with AtP*'s recomputed softmax, and to
  first order for comparison);
- RelP: the same with ``estimator="relp"`` (LRP coefficients instead of gradients);
- exact: the same nodes patched for real (noising: the partner's value into the clean run, one batch
  row per node, :func:`recallscope.core.atp.patched_effects`): every block output, MLP update, head,
  query and key; MLP neurons on a random sample of ``--neuron-sample`` per fact, the time for all of
  them extrapolated from the sample's mean (``--neuron-sample 0``: every neuron, slow).

Prints seconds per fact, the speed-up over the exact grid, Spearman ρ and Pearson r of each estimate
against the exact effects per node type and peak memory. Run::

    python bench/attribution_patching.py --facts 4 --neuron-sample 2000
"""

from __future__ import annotations

import argparse
import platform
import resource
import time

import numpy as np
import pandas as pd
import torch
import transformers

import recallscope as rs
from recallscope.core import atp
from recallscope.core.corruption import swapped
from recallscope.data.variants import add_swap_partners, swap_inputs
from recallscope.methods import attribution_patching as ap


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def facts_with_partners(model, n: int, seed: int) -> rs.FactSet:
    dataset = rs.load_facts("mixed").fit_context(model)
    known = dataset.known_by(model).sample(4 * n, seed=seed)
    swapped = add_swap_partners(model, known, pool=list(dataset), seed=seed)
    return swapped.with_facts([f for f in swapped if "subject_swap" in f.attributes][:n], {"step": "bench"})


def all_nodes(result, f: int, kinds) -> list[tuple]:
    nodes = []
    for kind in kinds:
        for where in np.ndindex(getattr(result, kind)[f].shape):
            nodes.append((kind, *atp.node_of(kind, where)))
    return nodes


def score(result, f: int, node) -> float:
    kind, layer, position, index = node
    return float(getattr(result, kind)[f][atp.node_index(kind, layer, position, index)])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=rs.DEFAULT_MODEL)
    parser.add_argument("--facts", type=int, default=4)
    parser.add_argument("--neuron-sample", type=int, default=2000)
    parser.add_argument("--rows", type=int, default=128, help="exact-patching rows per forward")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model = rs.load_model(args.model)
    facts = facts_with_partners(model, args.facts, args.seed)
    print(f"{model.info.name}: {model.n_layers} layers, {model.n_heads} heads, d_mlp {model.d_mlp}, "
          f"{len(facts)} facts; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")  # fmt: skip
    configs = {
        "atp": ap.Config(verify=0),
        "relp": ap.Config(verify=0, estimator="relp"),
        "atp_first_order": ap.Config(verify=0, qk_fix=False, nodes=("query", "key")),
    }
    results, seconds, grown = {}, {}, {}
    for name, config in configs.items():
        before = peak_rss_mb()
        start = time.perf_counter()
        results[name] = ap.run(model, facts, config)
        seconds[name] = (time.perf_counter() - start) / len(facts)
        grown[name] = peak_rss_mb() - before
    result = results["atp"]
    rng = np.random.default_rng(args.seed)
    rows, exact_s, n_nodes = [], 0.0, 0
    for f, fact in enumerate(facts):
        batch = rs.tokenize(
            model, [fact.prompt], spans={"subject": [fact.subject_span]}, targets=[fact.target]
        )
        ids, target = batch.input_ids[0], int(batch.target_ids[0])
        partner_id, partner, counter = swap_inputs(model, fact)
        span = tuple(int(v) for v in batch.spans["subject"][0])
        bad = swapped(ids, span, partner, counter=counter, partner=partner_id)
        states = atp.corrupted_states(model, bad)
        metric = atp.metric("logit_diff", target, counter)
        dense = all_nodes(result, f, ("resid", "mlp", "head", "query", "key"))
        neurons = all_nodes(result, f, ("neuron",))
        picked = rng.choice(
            len(neurons), min(args.neuron_sample or len(neurons), len(neurons)), replace=False
        )
        sample = [neurons[i] for i in sorted(picked)]
        for group, scale in ((dense, 1.0), (sample, len(neurons) / len(sample))):
            start = time.perf_counter()
            effects = atp.patched_effects(model, ids, states, group, metric, max_batch_rows=args.rows)
            exact_s += (time.perf_counter() - start) * scale
            for n, e in zip(group, effects, strict=True):
                first = score(results["atp_first_order"], f, n) if n[0] in ("query", "key") else np.nan
                rows.append((f, n[0], float(e), score(result, f, n), score(results["relp"], f, n), first))
        n_nodes += len(dense) + len(neurons)
    exact_s /= len(facts)
    table = pd.DataFrame(rows, columns=["fact", "node", "exact", "atp", "relp", "atp_first_order"])
    per_fact = n_nodes // len(facts)
    sampled = args.neuron_sample or "all"
    print(f"exact grid (neurons extrapolated from {sampled} per fact): {exact_s:.1f} s per fact")
    for name in configs:
        print(f"{name}: {seconds[name]:.2f} s per fact ({per_fact} nodes for atp and relp), "
              f"peak +{grown[name]:.0f} MB, speed-up {exact_s / seconds[name]:.0f}x")  # fmt: skip
    for node, part in table.groupby("node", sort=False):
        for name in ("atp", "relp", "atp_first_order"):
            if part[name].isna().all():
                continue
            ranks = part[[name, "exact"]].rank()
            error, rho = (part[name] - part["exact"]).abs(), ranks[name].corr(ranks["exact"])
            print(f"  {node:7s} {name:16s} n={len(part):7d}  Spearman {rho:.3f}  "
                  f"Pearson {part[name].corr(part['exact']):.3f}  max |error| {error.max():.3g}  "
                  f"mean |exact| {part['exact'].abs().mean():.3g}")  # fmt: skip
    print(f"peak RSS {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
