"""Cost of a device map: the embedded model in memory vs with blocks offloaded to disk.

Each placement runs in its own child process (so peak memory is its own): load the model, then
time ``--repeats`` forwards of a batch of prompts and one method (logit lens and attention knockout
on ``--facts`` facts), and report forwards per second, the method's time, the process's peak
resident memory and the weights per device. The parent checks that every placement gives the
same method results as the in-memory model and prints the ratios against it.

Run::

    python bench/device_map.py --facts 4 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

PLACEMENTS = {
    "in memory": {},
    "auto, cpu=400MB (8 blocks on disk)": {"device_map": "auto", "max_memory": {"cpu": "400MB"}},
    "auto, cpu=300MB (20 blocks on disk)": {"device_map": "auto", "max_memory": {"cpu": "300MB"}},
}
METHODS = ("logit_lens", "attention_knockout")


def child(placement: str, n_facts: int, repeats: int) -> dict:
    import torch

    import recallscope as rs
    from recallscope.methods import REGISTRY
    from recallscope.runner.plan import _weights_by_device

    start = time.perf_counter()
    model = rs.load_model("smollm2-135m", **PLACEMENTS[placement])
    load_s = time.perf_counter() - start
    facts = rs.load_facts("mixed").sample(n_facts, seed=0)
    batch = facts.to_batch(model)
    with torch.inference_mode():
        rs.forward(model, batch)  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            rs.forward(model, batch)
        forward_s = (time.perf_counter() - start) / repeats
    seconds, frames = {}, {}
    for name in METHODS:
        module = REGISTRY[name]
        start = time.perf_counter()
        result = module.run(model, facts, module.Config())
        seconds[name] = time.perf_counter() - start
        frames[name] = result.to_frame().select_dtypes("number").to_numpy(float).tolist()
    return {
        "load_s": load_s,
        "forwards_per_s": 1 / forward_s,
        "batch": list(batch.input_ids.shape),
        "method_s": seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "weights_mb": {k: v / 2**20 for k, v in _weights_by_device(model).items()},
        "frames": frames,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.facts, args.repeats)))
        return
    runs = {}
    for placement in PLACEMENTS:
        command = [sys.executable, __file__, "--child", placement, "--facts", str(args.facts)]
        done = subprocess.run([*command, "--repeats", str(args.repeats)], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{placement} failed:\n{done.stderr}")
        runs[placement] = json.loads(done.stdout.strip().splitlines()[-1])
    base = runs["in memory"]
    print(
        f"embedded SmolLM2-135M, float32, {args.facts} facts, batch {base['batch']}, {args.repeats} forwards"
    )
    print(
        f"{'placement':<38} {'weights (MB)':<24} {'load s':>7} {'fwd/s':>7} {'x mem':>6} "
        + " ".join(f"{m + ' s':>20}" for m in METHODS)
        + f" {'peak RSS MB':>12} {'same results':>13}"
    )
    for placement, run in runs.items():
        weights = ", ".join(f"{d} {mb:.0f}" for d, mb in run["weights_mb"].items())
        same = all(
            np.array_equal(np.array(run["frames"][m]), np.array(base["frames"][m]), equal_nan=True)
            for m in METHODS
        )
        ratio = base["forwards_per_s"] / run["forwards_per_s"]
        times = " ".join(
            f"{run['method_s'][m]:>10.2f} ({run['method_s'][m] / base['method_s'][m]:.2f}x)" for m in METHODS
        )
        print(
            f"{placement:<38} {weights:<24} {run['load_s']:>7.1f} {run['forwards_per_s']:>7.2f} "
            f"{ratio:>5.2f}x {times} {run['peak_rss_mb']:>12.0f} {str(same):>13}"
        )


if __name__ == "__main__":
    main()
