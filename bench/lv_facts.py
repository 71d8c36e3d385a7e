"""Known ``lv_capitals`` facts with counterfactual partners: the input of the Lv et al. benches."""

from __future__ import annotations

import recallscope as rs
from recallscope.data.variants import add_relation_context


def known_lv_facts(model, n: int, *, scan: int | None = None):
    """The first ``n`` ``lv_capitals`` prompts ``model`` knows, each with a counterfactual partner
    drawn from all 225 prompts.

    ``scan``: test only the first ``scan`` prompts with the known filter (quicker on a CPU); all of
    them by default.
    """
    pool = rs.load_facts("lv_capitals")
    tested = pool if scan is None else pool[:scan]
    return add_relation_context(tested.known_by(model)[:n], pool=list(pool))
