"""``check_model``: the public conformance suite of an adapter (our ``check_estimator``).

It runs, on any loaded model, the parity and invariant checks that make recallscope's numbers
trustworthy, and names each failure::

    report = rs.check_model(model)
    print(report)                 # one line per check, with the largest error seen
    report.raise_for_failures()

Checks compare against the plain Hugging Face forward and against exact identities. Errors are
relative to the size of the reference (``max|a - b| / max(1, max|b|)``). "exact" checks compare
numbers computed in the same forward (tolerance: rounding of the dtype); "kernel" checks compare
different kernels or our re-implementation of a norm with HF's (looser; note that HF computes
RMSNorm in float32 even for float64 models).

The checks' shared context and results are in ``check_context``; the checks that run the model
again (kernels, knockouts, patching, batching, resuming) in ``check_interventions``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from recallscope.check_context import CheckResult, _combine, _Context
from recallscope.check_interventions import (
    _check_batched,
    _check_eager_kernel,
    _check_knockout,
    _check_null_interventions,
    _check_pattern_edit,
    _check_per_row_knockout,
    _check_resume,
    _check_stop_early,
)
from recallscope.core.attention import output_gate_hook
from recallscope.core.cache import run_with_cache
from recallscope.core.decompose import (
    head_outputs,
    head_source_outputs,
    neuron_outputs,
    resid_decomposition,
    resid_sites,
)
from recallscope.core.vocab import apply_final_norm, project_to_vocab
from recallscope.errors import UnsupportedModelError
from recallscope.models.model import Model
from recallscope.models.sites import Site

__all__ = ["CheckReport", "CheckResult", "check_model", "validate", "CHECKS"]

PROMPTS = ("The capital of France is", "The Eiffel Tower is located in the city of")


@dataclass
class CheckReport:
    model: str
    results: list[CheckResult] = field(default_factory=list)
    spec: str = ""
    """Where the architecture spec came from (``discovered``, or ``written`` over a discovered one)."""

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def failures(self) -> list[CheckResult]:
        return [r for r in self.results if not r.passed]

    def __str__(self) -> str:
        spec = f" (spec: {self.spec})" if self.spec else ""
        lines = [f"check-model {self.model}{spec}"] + [str(r) for r in self.results]
        n_fail = len(self.failures)
        lines.append(f"{len(self.results) - n_fail}/{len(self.results)} checks passed")
        return "\n".join(lines)

    def raise_for_failures(self) -> None:
        if not self.passed:
            raise AssertionError("\n".join(str(r) for r in self.failures))


# -- the checks ----------------------------------------------------------------------------------


def _check_logits_match_hf(ctx: _Context) -> CheckResult:
    """Hooks that only read (every site cached) leave the logits bit-identical."""
    return ctx.result("logits_match_hf", ctx.cache.logits, ctx.hf_logits, detail="cached run vs plain HF")


def _check_hidden_states(ctx: _Context) -> CheckResult:
    """resid_pre equals output_hidden_states; the last entry is the final-normed resid_post."""
    m = ctx.model
    # the model's residual is D × the resid_pre site (1 unless blocks scale it: spec.residual_mix)
    ours = torch.stack(
        [ctx.cache[Site(layer, "resid_pre")] * m.stream_scale(layer, "pre") for layer in range(m.n_layers)]
    )
    theirs = torch.stack(ctx.hidden_states[: m.n_layers])
    first = ctx.result("hidden_states", ours.transpose(0, 1), theirs.transpose(0, 1))
    normed = apply_final_norm(m, ctx.cache[Site(ctx.last, "resid_post")])
    final = ctx.result("hidden_states", normed, ctx.hidden_states[-1], kind="kernel")
    detail = "resid_pre[l] == hidden_states[l]; final_norm(resid_post[-1]) == hidden_states[-1]"
    return _combine("hidden_states", [first, final], detail)


def _check_block_sum(ctx: _Context) -> CheckResult:
    """resid_post = resid_pre + attn_out + mlp_out (+ ple_out): the update sites are what the block adds."""
    c, results = ctx.cache, []
    updates = _update_names(ctx.model)
    for layer in range(ctx.model.n_layers):
        total = c[Site(layer, "resid_pre")] + sum(c[Site(layer, name)] for name in updates)
        results.append(ctx.result("block_sum", total, c[Site(layer, "resid_post")]))
    return _combine("block_sum", results, f"resid_pre + {' + '.join(updates)} == resid_post")


def _update_names(model: Model) -> tuple[str, ...]:
    """The update sites of a block: ``attn_out``, ``mlp_out`` (and ``ple_out``, Gemma 4)."""
    return tuple(dict.fromkeys(s.name for s in resid_sites(model) if s.layer is not None))


def _check_resid_decomposition(ctx: _Context) -> CheckResult:
    decomposition = resid_decomposition(ctx.model, ctx.cache)
    return ctx.result(
        "resid_decomposition",
        decomposition.total(),
        ctx.cache[Site(ctx.last, "resid_post")],
        detail=f"embed + Σ {' + Σ '.join(_update_names(ctx.model))} == resid_post[-1]",
        terms=len(decomposition.labels),
    )


def _check_head_sum(ctx: _Context) -> CheckResult:
    results = []
    for layer in range(ctx.model.n_layers):
        total = head_outputs(ctx.model, layer, ctx.cache[Site(layer, "z")]).total()
        attn_out = ctx.cache[Site(layer, "attn_out")]
        results.append(ctx.result("head_sum", total, attn_out, kind=ctx.post_norm))
    return _combine("head_sum", results, "Σ_h z_h W_O^h + b_O == attn_out")


def _check_neuron_sum(ctx: _Context) -> CheckResult:
    m, results = ctx.model, []
    direction = m.W_U[0]
    for layer in range(m.n_layers):
        coeffs, mlp_out = ctx.cache[Site(layer, "mlp_post")], ctx.cache[Site(layer, "mlp_out")]
        full = neuron_outputs(m, layer, coeffs).total()
        results.append(ctx.result("neuron_sum", full, mlp_out, kind=ctx.post_norm))
        proj = neuron_outputs(m, layer, coeffs, onto=direction).total()
        expected = mlp_out.to(proj.dtype) @ direction.to(proj.dtype)
        results.append(ctx.result("neuron_sum", proj, expected, kind=ctx.post_norm))
    return _combine("neuron_sum", results, "Σ_k c_k w_k + b_out == mlp_out (full and projected)")


def _check_head_sources(ctx: _Context) -> CheckResult:
    """Σ_j α_{N,j} v_j W_O^h over sources and heads == attn_out at the last position (eager run)."""
    m, results = ctx.model, []
    for layer in sorted({0, ctx.last}):
        sites, gates = [Site(layer, "pattern"), Site(layer, "v"), Site(layer, "attn_out")], []
        with output_gate_hook(m, layer, gates.append):
            cache = run_with_cache(m, ctx.batch, sites)
        pattern = cache[sites[0]][:, :, -1:]  # [B, H, 1, T]
        gate = gates[-1][:, -1:] if gates else None  # [B, 1, H, d_head]
        total = head_source_outputs(m, layer, pattern, cache[sites[1]], gate).total()
        # inline attention may take its softmax in float32 in a float64 model (BLOOM): its tolerance
        kind = ctx.post_norm if pattern.dtype == m.dtype else "kernel"
        res = ctx.result("head_sources", total, cache[sites[2]][:, -1:], kind=kind)
        real = ctx.batch.attention_mask.bool().to(pattern.device)  # [B, T] real query positions
        row_sums = cache[sites[0]].sum(-1).transpose(1, 2)[real]  # [n_real, H]
        if m.spec.at(layer).attention_sinks:  # the sink takes the rest: sums in (0, 1]
            row_sums = torch.where((row_sums > 0) & (row_sums <= 1 + ctx.exact), 1.0, row_sums)
        sums = ctx.result("head_sources", row_sums, torch.ones_like(row_sums), kind=kind)
        results += [res, sums]
    sinks = any(spec.attention_sinks for spec in m.spec.block_specs())
    sums = "sum to at most 1 (attention sinks)" if sinks else "sum to 1"
    return _combine("head_sources", results, f"pattern rows {sums}; Σ_{{h,j}} α v W_O + b_O == attn_out[-1]")


def _check_final_norm(ctx: _Context) -> CheckResult:
    m = ctx.model
    x = ctx.cache[Site(ctx.last, "resid_post")]
    with torch.no_grad():  # the model's residual is D × the site (1 unless blocks scale it)
        theirs = m.module(m.spec.final_norm)(x * m.stream_scale(ctx.last, "post"))
    return ctx.result(
        "final_norm",
        apply_final_norm(m, x),
        theirs,
        kind="kernel",
        detail="our final norm == the model's module",
    )


def _check_logit_lens(ctx: _Context) -> CheckResult:
    x = ctx.cache[Site(ctx.last, "resid_post")]
    proj = project_to_vocab(ctx.model, x, "logit_lens", keep_logits=True)
    return ctx.result(
        "logit_lens_final",
        proj.logits,
        ctx.hf_logits,
        kind="kernel",
        detail="logit lens of resid_post[-1] == model logits",
    )


def _check_frozen_scale(ctx: _Context) -> CheckResult:
    """Frozen-scale projection is additive and, with bias, reproduces the (pre-softcap) logits."""
    m = ctx.model
    final = ctx.cache[Site(ctx.last, "resid_post")][:, -1]  # [B, d]
    parts = resid_decomposition(m, ctx.cache).parts[:, -1]  # [B, C, d]
    each = project_to_vocab(m, parts, "frozen_scale", scale_from=final[:, None], keep_logits=True)
    whole = project_to_vocab(m, final, "frozen_scale", scale_from=final, keep_logits=True)
    additive = ctx.result("frozen_scale_additive", each.logits.sum(1), whole.logits)
    with_bias = project_to_vocab(m, final, "frozen_scale", scale_from=final, bias=True, keep_logits=True)
    logits = ctx.hf_logits[:, -1]
    cap = m.spec.final_logit_softcap
    if cap is not None:
        with_bias_logits = torch.tanh(with_bias.logits / cap) * cap
    else:
        with_bias_logits = with_bias.logits
    exact = ctx.result("frozen_scale_additive", with_bias_logits, logits, kind="kernel")
    ok = additive.passed and exact.passed
    return CheckResult(
        "frozen_scale_additive",
        ok,
        additive.error,
        additive.tolerance,
        f"Σ project(c) == project(Σ c); + bias == logits (err {exact.error:.1e})",
    )


CHECKS: tuple[tuple[str, Callable[[_Context], CheckResult]], ...] = (
    ("logits_match_hf", _check_logits_match_hf),
    ("hidden_states", _check_hidden_states),
    ("block_sum", _check_block_sum),
    ("resid_decomposition", _check_resid_decomposition),
    ("head_sum", _check_head_sum),
    ("neuron_sum", _check_neuron_sum),
    ("head_sources", _check_head_sources),
    ("final_norm", _check_final_norm),
    ("logit_lens_final", _check_logit_lens),
    ("frozen_scale_additive", _check_frozen_scale),
    ("eager_kernel", _check_eager_kernel),
    ("pattern_edit", _check_pattern_edit),
    ("null_interventions", _check_null_interventions),
    ("knockout", _check_knockout),
    ("per_row_knockout", _check_per_row_knockout),
    ("batched_equals_single", _check_batched),
    ("stop_early", _check_stop_early),
    ("resume", _check_resume),
)


_MODULES = {  # the spec fields each check rests on, named in refusals
    "logits_match_hf": ("blocks",),
    "hidden_states": ("blocks", "final_norm"),
    "block_sum": ("attn_out", "mlp_out", "ple_update"),
    "resid_decomposition": ("embed_norm", "embed", "pos_embed"),
    "head_sum": ("o_proj", "attn_post_norm"),
    "neuron_sum": ("mlp_out_proj", "mlp_post_norm"),
    "head_sources": ("attn", "qkv_proj", "v_proj"),
    "final_norm": ("final_norm",),
    "logit_lens_final": ("final_norm", "unembed"),
    "frozen_scale_additive": ("final_norm", "unembed"),
    "eager_kernel": ("attn",),
    "pattern_edit": ("attn",),
    "null_interventions": ("attn",),
    "knockout": ("attn",),
    "per_row_knockout": ("attn",),
    "batched_equals_single": ("attn",),
    "stop_early": ("blocks",),
    "resume": ("blocks",),
}
_MODEL_LEVEL = ("blocks", "embed", "embed_norm", "pos_embed", "final_norm", "unembed")


def modules_of(model: Model, check: str) -> list[str]:
    """The modules (full paths, block 0 for block-level ones) a check rests on."""
    spec, names = model.spec, []
    for name in _MODULES.get(check, ()):
        path = getattr(spec, name)
        if path is not None:
            names.append(path if name in _MODEL_LEVEL else f"{spec.blocks}.0.{path}")
    return names


def validate(model: Model) -> CheckReport:
    """Run :func:`check_model` and refuse the model if any check fails, naming each failed check
    and the modules it rests on (``source`` of the spec says whether it was discovered).

    Raises:
        UnsupportedModelError: a check failed.
    """
    report = check_model(model)
    if report.passed:
        return report
    lines = [f"{r} [modules: {', '.join(modules_of(model, r.name)) or '-'}]" for r in report.failures]
    listed = "\n  ".join(lines)
    raise UnsupportedModelError(
        f"{type(model.hf_model).__name__} (model_type={model.spec.family!r}): its {model.spec.source} "
        f"architecture spec fails {len(lines)} of {len(report.results)} conformance checks, so "
        f"recallscope's numbers would be wrong:\n  {listed}\nRun `recallscope check-model` for the "
        "whole report; a hand-written override in recallscope/models/families/overrides.py can fix what "
        "discovery got wrong."
    )


def check_model(model: Model, *, prompts: tuple[str, ...] = PROMPTS) -> CheckReport:
    """Run every conformance check on ``model`` and report each one (never raises on failure).

    Use ``report.raise_for_failures()`` to turn failures into an error.
    """
    report = CheckReport(model.info.name, spec=model.spec.source)
    ctx = _Context(model, prompts)
    for name, check in CHECKS:
        try:
            result = check(ctx)
        except Exception as err:  # a crashing check is a failed check, reported by name
            result = CheckResult(name, False, detail=f"raised {type(err).__name__}: {err}")
        report.results.append(result)
    return report
