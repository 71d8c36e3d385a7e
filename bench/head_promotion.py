"""Per-head promotion / suppression (Yan & Jia Y5): recallscope's batched method against the paper's loop.

Same step prompts as ``bench/early_decoding.py`` (the model's own three-city lists). The naive loop is
the paper's: for every step prompt, batch size 1, one forward of the unpadded prompt capturing each
layer's ``o_proj`` input ``z``, then per layer and head ``z_h`` times its ``W_O`` block and a decoding
over the whole vocabulary with the frozen final-norm scale in the model's dtype
(``tests/oracles/head_promotion``). recallscope runs one forward per chunk of ``CHUNK_SIZE`` prompts
and decodes only the tracked tokens. Printed: facts (step prompts) per second of both, the ratio,
the largest logit difference, peak memory, and the heads that most often suppress previous answers
(dataset-wide thresholds ``μ ± σ`` per step and layer).

Run::

    python bench/head_promotion.py --subjects 40 --prompts 24
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import recallscope as rs
from early_decoding import header, in_chunks, peak_rss_mb, print_speed, step_batch, timed
from recallscope.methods import head_promotion as hp

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from oracles.early_decoding import tracked_ids, unpadded  # noqa: E402
from oracles.head_promotion import naive_head_logits  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--subjects", type=int, default=40, help="country facts to generate lists for")
    parser.add_argument("--prompts", type=int, default=24, help="step prompts analysed")
    parser.add_argument("--naive-prompts", type=int, default=None, help="prompts for the naive loop")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    model = rs.load_model(args.model, device="cpu")
    batch, n_steps, n_subjects = step_batch(model, args.subjects, args.prompts)
    config = hp.Config.preset("yan_jia")
    print(header(args, model, batch, n_steps, n_subjects))
    before = peak_rss_mb()
    hp.run(model, batch.select([0]), config)  # warm-up
    fast_s, (logit, parts) = timed(lambda: in_chunks(hp.run, model, batch, config, hp.CHUNK_SIZE))
    fast_mb = peak_rss_mb() - before
    n_naive = min(args.naive_prompts or len(batch), len(batch))
    naive = lambda b: naive_head_logits(model, unpadded(batch, b), tracked_ids(batch, b), dtype=model.dtype)[
        0
    ]  # noqa: E731
    naive_s, expected = timed(lambda: np.stack([naive(b) for b in range(n_naive)]))
    diff = float(np.abs(logit[:n_naive] - expected).max())
    print(f"{hp.cost(model, batch, config)}")
    label = "naive loop (forward per prompt, per head full-vocab)"
    print_speed(len(batch), fast_s, fast_mb, n_naive, naive_s, diff, label)
    rates = hp.summary(pd.concat([p.to_frame() for p in parts], ignore_index=True), k=config.k)
    later = rates[rates.step > 1].sort_values("suppresses_previous", ascending=False).head(8)
    columns = ["step", "layer", "head", "promotion_rate", "suppression_rate", "suppresses_previous"]
    print("heads that most often suppress a previous answer (steps 2–3):")
    columns += ["promotes_current", "n_examples"]
    print("| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|")
    for row in later[columns].itertuples(index=False):
        print("| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in row) + " |")


if __name__ == "__main__":
    main()
