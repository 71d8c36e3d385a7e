"""Ray executor: facts per second of the local executor against Ray with 1 and 2 workers.

All runs do the same work items (the runner's chunks of the chosen methods, ``--batch-size`` facts
each) on the same known facts of the built-in ``mixed`` dataset, selected as ``recallscope run``
does. The local executor runs them in this process with ``--threads`` threads; each Ray executor
starts its workers on the Ray this script starts (each loads the model itself, as with
``recallscope run --executor ray``, and gets an equal share of the CPUs as threads), then runs the
items. Each executor runs ``--rounds`` times, in an order that rotates from round to round.

Printed per executor (medians over the rounds): the start-up time (workers started and holding the
model; none for local), the time of the items, facts per second of that phase (one fact counted
once per method), its speed ratio to local, the share of that time during which some task waited
for a CPU (``/proc/pressure/cpu``: other processes, or more threads than cores), and whether every
output equals the local executor's to the bit (else the largest difference: the thread count sets
the order of float reductions, so runs with other counts may differ in the last bits).

Run::

    python bench/ray_scaleout.py --facts 6 --batch-size 2 --rounds 3
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import tempfile
import time

import numpy as np
import pandas as pd
import ray
import torch
import transformers

import recallscope as rs
from hooks import cpu_pressure
from recallscope.methods import REGISTRY
from recallscope.runner import Job, prepare_job
from recallscope.runner.job import model_key
from recallscope.runner.ray_executor import RayExecutor
from recallscope.runner.run import LocalExecutor, work_items


def items_of(job, model, facts, configs):
    """The work items of every method of ``job``, in the runner's order."""
    items = []
    for name, config in configs.items():
        key = f"{config.stable_hash()}-{model_key(model)}"
        items += work_items(REGISTRY[name], facts, config, key, job, None)[0]
    return items


def timed_map(executor, items):
    """``(seconds, share of them some task waited for a CPU, {(method, chunk): output})``."""
    waited, start = cpu_pressure(), time.perf_counter()
    outputs = {(item.method, item.chunk): output for item, output, _ in executor.map(items)}
    seconds = time.perf_counter() - start
    return seconds, (cpu_pressure() - waited) / seconds, outputs


def largest_difference(outputs, expected) -> float:
    """The largest gap between the numbers of ``outputs`` and ``expected`` (tables and arrays); 0.0
    when they are equal to the bit. Every other column must be equal.
    """
    gap = 0.0
    for key, want in expected.items():
        got = outputs[key]
        pairs = [(got.frame, want.frame), *((got.tables[t], want.tables[t]) for t in want.tables)]
        pairs += [(got.arrays[n], a) for n, a in want.arrays.items()]
        for value, other in pairs:
            if isinstance(other, pd.DataFrame):
                numbers = list(other.select_dtypes("number").columns)
                pd.testing.assert_frame_equal(value.drop(columns=numbers), other.drop(columns=numbers))
                value, other = value[numbers].to_numpy(float), other[numbers].to_numpy(float)
            diff = np.abs(np.asarray(value, float) - np.asarray(other, float))
            gap = max(gap, float(np.nanmax(diff, initial=0.0)))
            if np.any(np.isnan(value) != np.isnan(other)):
                gap = float("inf")
    return gap


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--facts", type=int, default=32)
    parser.add_argument("--methods", nargs="+", default=["logit_lens", "attention_knockout"])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of the local run")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each executor, in rotating order")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # inherited by the Ray workers
    torch.set_num_threads(args.threads)
    ray.init(include_dashboard=False, log_to_driver=False)
    cpus = int(ray.cluster_resources()["CPU"])
    job = Job(
        out=tempfile.gettempdir(),  # nothing is written: the outputs stay in memory
        model=args.model,
        dataset="mixed",
        limit=args.facts,
        methods=tuple(args.methods),
        batch_size=args.batch_size,
        device="cpu",
    )
    model, facts, configs, _ = prepare_job(job, log=lambda _: None, write=False)
    items = items_of(job, model, facts, configs)
    print(
        f"recallscope {rs.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"ray {ray.__version__}, python {platform.python_version()}, {cpus} CPUs in Ray, local run "
        f"{torch.get_num_threads()} threads, model {args.model}, {len(facts)} known facts of 'mixed', "
        f"methods {', '.join(args.methods)}, {len(items)} work items of {args.batch_size} facts"
    )
    n_facts = len(facts) * len(args.methods)
    names = ["local", *args.workers]
    runs: dict = {name: [] for name in names}  # (start-up s, items s, CPU waited share) per round
    outputs: dict = {}
    for round_ in range(args.rounds):
        shift = round_ % len(names)  # rotate the order so that no executor always runs first
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            if name == "local":
                executor = LocalExecutor(model, facts)
            else:
                executor = RayExecutor(dataclasses.replace(job, executor="ray", workers=name), model, facts)
                executor.start()
            startup_s = time.perf_counter() - start
            seconds, stalled, outputs[name] = timed_map(executor, items)
            executor.close()
            runs[name].append((startup_s, seconds, stalled))
    ray.shutdown()
    print(
        f"\nmedians of {args.rounds} rounds; CPU waited: share of the items' time during which some task "
        "(of this benchmark or another process) waited for a CPU"
    )
    print(
        "\n| executor | start-up (s) | items (s) | facts/s | vs local | CPU waited | outputs vs local |"
        "\n|---|---:|---:|---:|---:|---:|---|"
    )
    local_s = statistics.median(r[1] for r in runs["local"])
    for name in names:
        startup_s, seconds, stalled = (statistics.median(r[i] for r in runs[name]) for i in range(3))
        label = "local" if name == "local" else f"ray, {name} worker{'s' * (name > 1)}"
        gap = largest_difference(outputs[name], outputs["local"])
        same = "—" if name == "local" else "identical" if gap == 0 else f"max abs diff {gap:.1e}"
        print(
            f"| {label} | {startup_s:.1f} | {seconds:.1f} | {n_facts / seconds:.2f} | "
            f"{local_s / seconds:.2f}× | {stalled:.0%} | {same} |"
        )


if __name__ == "__main__":
    main()
