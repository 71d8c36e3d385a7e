"""What the conformance checks of ``recallscope.check`` share: their context and their results.

:class:`_Context` holds the inputs of every check (a small padded batch, one clean cached run of
every residual, attention and MLP site, the plain Hugging Face logits and hidden states) and
compares a result with its reference to the rounding of the dtype ("exact") or across kernels
("kernel"), at real (non-padding) positions; :class:`CheckResult` is one check's verdict and
:func:`_combine` merges several comparisons into one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from recallscope.core.cache import run_with_cache
from recallscope.core.decompose import resid_sites
from recallscope.core.tokens import PromptBatch, tokenize
from recallscope.models.model import Model
from recallscope.models.sites import Site

_TOLERANCES = {  # (exact, kernel) relative tolerances per dtype
    torch.float64: (1e-9, 1e-5),
    torch.float32: (1e-4, 3e-3),
    torch.bfloat16: (3e-2, 1e-1),
    torch.float16: (1e-2, 5e-2),
}


@dataclass(frozen=True)
class CheckResult:
    name: str
    passed: bool
    error: float | None = None
    tolerance: float | None = None
    detail: str = ""

    def __str__(self) -> str:
        mark = "PASS" if self.passed else "FAIL"
        err = "" if self.error is None else f"  max rel. error {self.error:.2e} (tol {self.tolerance:.0e})"
        return f"[{mark}] {self.name:<28}{err}{'  ' + self.detail if self.detail else ''}"


class _Context:
    """Shared inputs and one clean cached run of every residual/attention/MLP site."""

    def __init__(self, model: Model, prompts: tuple[str, ...]) -> None:
        self.model = model
        self.exact, self.kernel = _TOLERANCES.get(model.dtype, (1e-2, 5e-2))
        # HF computes Gemma-2's sandwich post-norms in float32: sums through them are kernel-exact
        post_norms = any(v.attn_post_norm or v.mlp_post_norm for v in model.spec.block_specs())
        self.post_norm = "kernel" if post_norms else "exact"
        self.batch = _make_batch(model, prompts)
        self.last = self.model.n_layers - 1
        sites = resid_sites(model)
        for layer in range(model.n_layers):
            sites += [Site(layer, n) for n in ("resid_pre", "resid_post", "z", "mlp_post")]
        self.cache = run_with_cache(model, self.batch, sites, logits="all")
        with torch.no_grad():
            out = model.hf_model(**self.batch.model_inputs(model.device), output_hidden_states=True)
        self.hf_logits, self.hidden_states = out.logits, out.hidden_states

    def result(
        self, name: str, a, b, *, kind: str = "exact", detail: str = "", terms: int = 1
    ) -> CheckResult:
        """Compare ``a`` with the reference ``b``; ``terms``: how many rounded terms ``a`` sums (the
        rounding of a sum grows like the square root of its length, which matters in half precision
        over many layers).
        """
        a, b = torch.as_tensor(a), torch.as_tensor(b)
        dtype = torch.promote_types(a.dtype, b.dtype)
        mask = self.real_positions(a.shape)
        diff = (a.to(dtype) - b.to(dtype).to(a.device)).abs()
        ref = b.to(dtype).abs()
        if mask is not None:
            diff, ref = diff[mask], ref[mask]
        tol = (self.exact if kind == "exact" else self.kernel) * max(1.0, (terms / 4) ** 0.5)
        if diff.isnan().any():
            where = "the reference" if ref.isnan().any() else "recallscope's result"
            return CheckResult(name, False, float("nan"), tol, f"NaN in {where} ({detail})")
        error = float(diff.max() / ref.max().clamp(min=1)) if diff.numel() else 0.0
        return CheckResult(name, error <= tol, error, tol, detail)

    def real_positions(self, shape) -> torch.Tensor | None:
        """Mask of non-padding positions for ``[B, T, ...]`` tensors (None otherwise)."""
        mask = self.batch.attention_mask.bool()
        if len(shape) >= 2 and tuple(shape[:2]) == tuple(mask.shape):
            return mask.to(self.model.device)
        return None


def _make_batch(model: Model, prompts: tuple[str, ...]) -> PromptBatch:
    if model.tokenizer is not None:
        return tokenize(model, prompts)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(model.d_vocab, 1000), (2, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # second row left-padded
    return PromptBatch(input_ids=ids, attention_mask=mask, prompts=("<ids>", "<ids>"))


def _combine(name: str, results: list[CheckResult], detail: str) -> CheckResult:
    """One result for several comparisons: passed if all passed; the worst error relative to its tolerance."""
    failed = [r for r in results if not r.passed]

    def badness(r: CheckResult) -> float:
        return float("inf") if r.error != r.error else (r.error or 0.0) / (r.tolerance or 1.0)  # NaN first

    worst = max(failed or results, key=badness)
    extra = worst.detail if failed and worst.detail and worst.detail != detail else ""
    return CheckResult(name, not failed, worst.error, worst.tolerance, f"{detail} {extra}".strip())
