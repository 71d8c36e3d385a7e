"""Train / held-out splits of facts, and calibration metrics of a split (Lv et al. 2024, ``methods.md``
L7: a mitigation fitted on one split and evaluated on the other).

- :func:`split_facts`: a split by a seeded hash of a key per fact (``base_id`` keeps few-shot variants
  of one fact on one side), independent of the facts' order;
- :func:`calibration_metrics`: accuracy, mean probability and log-probability of the target, expected
  calibration error of the top-1 confidence and Brier score, from a table of per-fact scores::

    train = split_facts(keys, train_fraction=0.5, seed=0)          # [F] bool
    calibration_metrics(table[~train], "before", bins=10)          # {"accuracy_before": …, …}
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import pandas as pd

from recallscope.errors import RecallscopeError
from recallscope.stats import expected_calibration_error

__all__ = ["split_facts", "calibration_metrics"]


def split_facts(keys: Sequence[str], train_fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """``[F]`` booleans: True for the train split.

    The distinct ``keys`` (``base_id`` or ``fact_id``) are ordered by ``sha256(f"{seed}:{key}")``; the
    first ``round(train_fraction × n_keys)`` (half up, at least 1, at most ``n_keys − 1``) go to train.
    Facts sharing a key stay on one side; the split of a key depends only on the seed and the key
    set, not on the order of the facts.

    Raises:
        RecallscopeError: fewer than 2 distinct keys, or fewer than 2 facts on a side.
    """
    unique = sorted(set(keys))
    if len(unique) < 2:
        raise RecallscopeError(
            f"anti_overconfidence needs facts to split into train and held-out, got {len(keys)} fact(s) "
            f"with {len(unique)} distinct split key(s); pass at least 4 facts of 4 different base facts"
        )
    ranked = sorted(unique, key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).hexdigest())
    n_train = min(max(int(train_fraction * len(unique) + 0.5), 1), len(unique) - 1)
    train_keys = set(ranked[:n_train])
    train = np.array([k in train_keys for k in keys], dtype=bool)
    n_fit, n_held = int(train.sum()), int((~train).sum())
    if n_fit < 2 or n_held < 2:
        raise RecallscopeError(
            f"anti_overconfidence split {len(keys)} facts into {n_fit} train and {n_held} held-out; each "
            "split needs at least 2 facts: pass more facts, or move train_fraction toward 0.5"
        )
    return train


def calibration_metrics(part: pd.DataFrame, when: str, bins: int) -> dict[str, float]:
    """``accuracy_<when>``, ``mean_prob_<when>``, ``mean_log_prob_<when>``, ``ece_<when>`` (``bins``
    equal-width bins of the top-1 confidence) and ``brier_<when>`` (mean ``(1 − p_target)²``) from the
    columns ``confidence_<when>``, ``correct_<when>``, ``prob_<when>``, ``log_prob_<when>`` of ``part``.
    """
    conf, correct, prob = part[f"confidence_{when}"], part[f"correct_{when}"], part[f"prob_{when}"]
    return {
        f"accuracy_{when}": float(correct.mean()),
        f"mean_prob_{when}": float(prob.mean()),
        f"mean_log_prob_{when}": float(part[f"log_prob_{when}"].mean()),
        f"ece_{when}": expected_calibration_error(conf, correct, bins),
        f"brier_{when}": float(((1.0 - prob) ** 2).mean()),
    }
