"""The scorecard: the four papers' headline claims as testable propositions, judged on one run.

Each :class:`Claim` reduces the stored tables to **one effect per fact** (:mod:`.claims`), already
measured against its null or baseline (a random set of neurons or heads, a shuffled or uniform layer,
zero), so that the claim says the mean effect lies on one side of 0. One rule judges every claim
(:func:`judge`):

- **holds**: the 95% percentile bootstrap interval of the mean over facts (2,000 resamples of the
  facts, seed 0) lies entirely on the claimed side of 0;
- **does not hold**: it lies entirely on the other side;
- **inconclusive**: it contains 0, or fewer than :data:`MIN_FACTS` facts have an effect, or the
  data hold no event to judge (:class:`NoEvidence`, e.g. no layer extracts the attribute at all);
- **not run**: the method that measures it is not in the run; **not applicable**: the run's data
  cannot test it (e.g. suppression of earlier answers without one-to-many facts).

A two-sided claim (``side = 0``: which of two parts is larger) holds when the interval excludes 0,
and its ``finding`` says which side. A verdict is never "holds" when the interval contains 0.

::

    card = scorecard(Store(run_dir))      # one row per claim
    card[["paper", "statement", "verdict", "effect", "ci_low", "ci_high", "n_facts"]]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from recallscope.stats import bootstrap_ci

__all__ = ["Claim", "NotApplicable", "NoEvidence", "MIN_FACTS", "VERDICTS", "RULE", "judge", "scorecard"]

MIN_FACTS = 5
"""Fewer facts with an effect than this: inconclusive, whatever the interval."""

VERDICTS = ("holds", "does not hold", "inconclusive", "not run", "not applicable")

RULE = (
    "holds: the 95% bootstrap interval of the mean effect over facts lies entirely on the claimed side "
    f"of 0; does not hold: entirely on the other side; inconclusive: it contains 0 or under {MIN_FACTS} "
    "facts"
)


class NotApplicable(Exception):  # noqa: N818 (a verdict, not an error)
    """Raised by a measure when the run's data cannot test its claim; the message says why."""

    verdict = "not applicable"


class NoEvidence(NotApplicable):
    """Raised by a measure whose data can test the claim but hold nothing to judge (no event at all):
    inconclusive, with the message as the reason.
    """

    verdict = "inconclusive"


@dataclass(frozen=True)
class Claim:
    """One paper claim as a proposition about a per-fact effect."""

    key: str
    paper: str
    statement: str
    effect: str
    """What the per-fact number is, with its null folded in (the claim: its mean is > 0 or < 0)."""
    null: str
    """The comparison the effect rests on."""
    method: str
    """The method whose section holds the evidence."""
    measure: Callable[..., pd.Series]
    """``measure(store) → [facts]`` effect per fact (index: fact id); empty when the method did not run."""
    side: int = 1
    """+1: the claim is effect > 0; −1: effect < 0; 0: two-sided (which part is larger)."""
    sides: tuple[str, str] = ("", "")
    """Two-sided claims: the finding when the effect is below / above 0."""


def judge(values, side: int, *, min_facts: int = MIN_FACTS, seed: int = 0) -> dict:
    """Verdict, mean, interval and fact count of per-fact ``values`` for a claim on ``side`` of 0."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return {
            "verdict": "inconclusive",
            "effect": np.nan,
            "ci_low": np.nan,
            "ci_high": np.nan,
            "n_facts": 0,
        }
    low, high = bootstrap_ci(x, seed=seed)
    out = {"effect": float(x.mean()), "ci_low": low, "ci_high": high, "n_facts": int(x.size)}
    above, below = low > 0, high < 0
    if x.size < min_facts or not (above or below):
        verdict = "inconclusive"
    elif side == 0:
        verdict = "holds"
    else:
        verdict = "holds" if (above if side > 0 else below) else "does not hold"
    return {"verdict": verdict, **out}


_EMPTY = {"effect": np.nan, "ci_low": np.nan, "ci_high": np.nan, "n_facts": 0}


def _finding(claim: Claim, row: dict) -> str:
    if claim.side != 0 or row["verdict"] != "holds":
        return ""
    return claim.sides[1] if row["effect"] > 0 else claim.sides[0]


def scorecard(store, claims: tuple[Claim, ...] | None = None) -> pd.DataFrame:
    """One row per claim (default: :data:`recallscope.report.claims.CLAIMS`, and Yan & Jia's claims
    per answer step when the facts have several, :func:`~recallscope.report.claims.step_claims`):
    ``paper, key, statement, verdict, finding, effect, ci_low, ci_high, n_facts, effect_definition,
    null, side, rule, method, reason`` (``reason``: why not run / not applicable).
    """
    if claims is None:
        from recallscope.report.claims import CLAIMS, step_claims

        split = [c.key for c in CLAIMS].index("yan_jia.suppress") + 1  # per-step rows after the pooled ones
        claims = (*CLAIMS[:split], *step_claims(store), *CLAIMS[split:])
    rows = []
    for claim in claims:
        base = {
            "paper": claim.paper, "key": claim.key, "statement": claim.statement,
            "effect_definition": claim.effect, "null": claim.null, "side": claim.side, "rule": RULE,
            "method": claim.method, "reason": "",
        }  # fmt: skip
        empty = {**_EMPTY, "finding": ""}
        if claim.method not in store.methods():
            rows.append({**base, **empty, "verdict": "not run", "reason": f"{claim.method} was not run"})
            continue
        try:
            values = claim.measure(store)
        except NotApplicable as why:
            rows.append({**base, **empty, "verdict": why.verdict, "reason": str(why)})
            continue
        except (KeyError, ValueError) as err:  # a table of an older or partial run: say so, go on
            reason = f"the stored table lacks what the measure reads ({type(err).__name__}: {err})"
            rows.append({**base, **empty, "verdict": "inconclusive", "reason": reason})
            continue
        row = {**base, **judge(values.to_numpy(), claim.side)}
        rows.append({**row, "finding": _finding(claim, row)})
    columns = [
        "paper", "key", "statement", "verdict", "finding", "effect", "ci_low", "ci_high", "n_facts",
        "effect_definition", "null", "side", "rule", "method", "reason",
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=columns)
