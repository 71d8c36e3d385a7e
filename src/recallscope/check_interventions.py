"""The conformance checks of ``recallscope.check`` that run the model again.

Against the clean run of the check context: recallscope's eager attention kernel, an edited
pattern, interventions that must change nothing (an empty knockout, a clean patch, zero noise),
attention knockouts (the blocked probabilities, per-row knockouts in one batch), a left-padded batch
against each prompt alone, a forward stopped after the last needed block, and a recorded run
resumed from a middle block.
"""

from __future__ import annotations

import torch

from recallscope.check_context import CheckResult, _combine, _Context
from recallscope.core.attention import eager_attention
from recallscope.core.cache import forward, run_with_cache
from recallscope.core.hooks import site_hook
from recallscope.core.knockout import Knockout, block_attention
from recallscope.core.patching import add_noise, patch
from recallscope.core.resume import record_run, resume
from recallscope.core.tokens import PromptBatch
from recallscope.models.sites import Site


def _check_eager_kernel(ctx: _Context) -> CheckResult:
    """Recallscope's eager kernel (used for patterns) gives the model's logits."""
    with eager_attention(ctx.model):
        logits = forward(ctx.model, ctx.batch, logits="all")
    return ctx.result(
        "eager_kernel",
        logits,
        ctx.hf_logits,
        kind="kernel",
        detail=f"eager vs {ctx.model.attn_implementation}",
    )


def _check_pattern_edit(ctx: _Context) -> CheckResult:
    """Editing the pattern changes ``z`` (the probabilities we see are the ones the model uses)."""

    def attend_to_self(probs):
        return torch.eye(probs.shape[-2], probs.shape[-1], dtype=probs.dtype, device=probs.device).expand_as(
            probs
        )

    layer = ctx.last // 2
    site = Site(layer, "z")
    with site_hook(ctx.model, Site(layer, "pattern"), attend_to_self):
        edited = run_with_cache(ctx.model, ctx.batch, [site])[site]
    clean = ctx.cache[site]
    real = ctx.real_positions(clean.shape)
    change = float((edited - clean).abs()[real].max() / clean.abs()[real].max())
    detail = f"attending to self changes z by {change:.2g} (relative)"
    return CheckResult("pattern_edit", change > 1e-3, None, None, detail)


def _check_null_interventions(ctx: _Context) -> CheckResult:
    m, mid = ctx.model, ctx.last // 2
    clean = forward(m, ctx.batch, logits="all")
    site = Site(mid, "resid_post")
    nulls = {
        "empty knockout": block_attention(m, []),
        "knockout with no edges": block_attention(m, [Knockout(layers=[mid], src=[], dst=[-1])]),
        "patch clean into clean": patch(m, site, ctx.cache[site]),
        "zero noise": add_noise(m, torch.zeros(1, 1, m.d_model), torch.tensor([0]), torch.tensor([[-1]])),
    }
    results = []
    for name, context in nulls.items():
        with context:
            logits = forward(m, ctx.batch, logits="all")
        res = ctx.result("null_interventions", logits, clean)
        exact = bool(torch.equal(logits, clean))
        results.append(
            CheckResult(res.name, exact, res.error, 0.0, "" if exact else f"{name} changed logits")
        )
    detail = "empty knockout, patch clean→clean, zero noise: bit-identical"
    return _combine("null_interventions", results, detail)


def _check_knockout(ctx: _Context) -> CheckResult:
    """Blocked edges get probability exactly 0 (both modes) and change ``z``; other rows are unchanged."""
    m, mid = ctx.model, ctx.last // 2
    src = [-3, -2]
    ko = [Knockout(layers=[mid], src=src, dst=[-1], rows=[0])]
    sites = [Site(mid, "pattern"), Site(mid, "z")]
    with eager_attention(m):
        clean = run_with_cache(m, ctx.batch, sites[1:], positions=[-1], logits="all")
    problems, errors = [], []
    for mode in ("pre_softmax", "post_softmax_zero"):
        with block_attention(m, ko, mode=mode):
            cache = run_with_cache(m, ctx.batch, sites, positions=[-1], logits="all")
        if not bool((cache[sites[0]][0, :, -1, src] == 0).all()):
            problems.append(f"{mode}: blocked probability not 0")
        res = ctx.result("knockout", cache.logits[1:], clean.logits[1:], kind="kernel")
        errors.append(res.error)
        if not res.passed:
            problems.append(f"{mode}: unblocked row changed")
        if torch.equal(cache[sites[1]][0], clean[sites[1]][0]):
            problems.append(f"{mode}: knockout did not change z of the knocked-out row")
    detail = "; ".join(problems) or "blocked p == 0 in both modes; other rows unchanged"
    return CheckResult("knockout", not problems, max(errors), ctx.kernel, detail)


def _check_per_row_knockout(ctx: _Context) -> CheckResult:
    """Different knockouts per row in one batch == separate runs; SDPA mask == eager scores."""
    m, mid = ctx.model, ctx.last // 2
    rows = [Knockout(layers=[mid], src=[-2], rows=[0]), Knockout(layers=[0, mid], src=[-3, -4], rows=[1])]
    with block_attention(m, rows):
        together = forward(m, ctx.batch, logits="all")
    alone = []
    for row, ko in enumerate(rows):
        single = ctx.batch.select([row])
        with block_attention(m, [Knockout(layers=ko.layers, src=ko.src)]):
            alone.append(forward(m, single, logits="all")[0])
    batched = ctx.result("per_row_knockout", together, torch.stack(alone), kind="kernel")
    with eager_attention(m), block_attention(m, rows):
        eager = forward(m, ctx.batch, logits="all")
    kernels = ctx.result("per_row_knockout", eager, together, kind="kernel")
    detail = "per-row knockouts in one batch == one run per row; mask == eager"
    return _combine("per_row_knockout", [batched, kernels], detail)


def _check_batched(ctx: _Context) -> CheckResult:
    """Batched, left-padded rows equal the unpadded prompts run alone, at real positions."""
    m, results = ctx.model, []
    site = Site(ctx.last // 2, "resid_post")
    batched = run_with_cache(m, ctx.batch, [site], logits="all")
    for row in range(len(ctx.batch)):
        n = int(ctx.batch.attention_mask[row].sum())
        single = ctx.batch.select([row])
        ids, mask = single.input_ids[:, -n:], single.attention_mask[:, -n:]
        alone = run_with_cache(m, PromptBatch(ids, mask, single.prompts), [site], logits="all")
        for a, b in ((batched.logits[row, -n:], alone.logits[0]), (batched[site][row, -n:], alone[site][0])):
            results.append(ctx.result("batched_equals_single", a, b, kind="kernel"))
    return _combine(
        "batched_equals_single", results, "left-padded batch == each prompt alone (logits, resid)"
    )


def _check_stop_early(ctx: _Context) -> CheckResult:
    site = Site(ctx.last // 2, "resid_post")
    early = run_with_cache(ctx.model, ctx.batch, [site], positions=[-1])
    detail = "stopping after the last needed block changes nothing"
    return ctx.result("stop_early", early[site], ctx.cache[site][:, -1:], detail=detail)


def _check_resume(ctx: _Context) -> CheckResult:
    """A recorded run resumed from a middle block and position (reusing the keys and values of the
    positions before it) gives the recorded logits.
    """
    m = ctx.model
    n = int(ctx.batch.attention_mask[0].sum())
    ids = ctx.batch.input_ids[:1, -n:]
    state = record_run(m, ids, logits_to_keep=n)
    layer, pos = m.n_layers // 2, max(n - 2, 0)
    hidden = state.stream[:, layer, pos:]
    logits = resume(m, state, torch.tensor([0]), start_layer=layer, start_pos=pos, hidden=hidden)
    detail = f"record, then resume at block {layer} and position {pos} == the recorded logits"
    return ctx.result("resume", logits[0, -1], state.logits[0, -1], kind="kernel", detail=detail)
