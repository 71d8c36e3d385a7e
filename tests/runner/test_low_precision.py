"""bfloat16 / float16 models: every method runs, stores float32+ numbers, and its readouts track float32.

The model computes in half precision; recallscope's projections, softmaxes and decompositions
accumulate in float32 (``core.vocab``, ``core.decompose``, ``core.subvalues``). The reference is the
same half-precision weights run in float32, so the only differences left are the model's own
half-precision activations: readouts (projections, decompositions, attributions) must correlate
with the float32 run almost perfectly. Intervention effects (knockout, patching deltas) are
differences of nearly equal numbers and are only checked to be finite: on a tiny random model they
sit near half precision's resolution.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from test_runner import FACTS, FAST

import recallscope as rs
from recallscope.methods import REGISTRY

pytestmark = pytest.mark.slow

READOUTS = {
    "logit_lens": "logprob",
    "extraction_rate": "attn_logit",
    "early_patching": "clean_score",
    "head_mappings": "output_logit",
    "logprob_attribution": "logprob_increase",
    "query_attribution": "score",
    "neuron_ablation": "logprob_drop",
    "early_decoding": "logit",
    "token_lens": "logit",
    "head_promotion": "logit",
    "argument_heads": "attention",
    "mlp_regression": "coef",
    "function_application": "cf_logit_new",
    "anti_overconfidence": "logit",
}
"""Per method, a readout column that must track the float32 run."""


MIN_CORRELATION = {torch.float16: 0.999, torch.bfloat16: 0.95}
"""bfloat16 keeps 8 mantissa bits: near-ties among selected components (query attribution scores the
components logprob attribution ranks first) can change which rows are scored."""


def _facts() -> rs.FactSet:
    return rs.FactSet(
        rs.Fact(fact_id=f["subject"], subject=f["subject"], prompt=f["prompt"], answers=[f["target"]])
        for f in FACTS
    )


def _frame(model, name):
    module = REGISTRY[name]
    config = module.Config.from_dict(FAST.get(name, {}))
    if hasattr(module, "prepare"):
        config = module.prepare(model, _facts(), config)
    result = module.run(model, _facts(), config)
    assert all(a.dtype not in (np.float16,) for a in result.arrays().values()), name
    return result.to_frame()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", ["llama_gqa", "gpt2"])
def test_every_method_in_half_precision_stores_float32_and_tracks_float32(family, dtype, tiny_models):
    half = tiny_models(family, dtype)
    wide = rs.load_model(copy.deepcopy(half.hf_model).float(), tokenizer=half.tokenizer, device="cpu")
    for name in REGISTRY:
        low, high = _frame(half, name), _frame(wide, name)
        floats = [c for c in low.columns if low[c].dtype.kind == "f"]
        assert all(low[c].dtype in (np.float32, np.float64) for c in floats), name
        assert len(low) == len(high), name
        for column in floats:  # finite wherever float32 is finite
            finite = np.isfinite(high[column].to_numpy(float))
            assert np.isfinite(low[column].to_numpy(float)[finite]).all(), (name, column)
        if name in READOUTS:
            x, y = low[READOUTS[name]].to_numpy(float), high[READOUTS[name]].to_numpy(float)
            keep = np.isfinite(x) & np.isfinite(y)
            assert np.corrcoef(x[keep], y[keep])[0, 1] > MIN_CORRELATION[dtype], (name, READOUTS[name])
