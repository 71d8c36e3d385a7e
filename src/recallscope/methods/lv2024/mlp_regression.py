"""The MLP as "activation": regress its output on the heads that feed it (Lv et al. 2024, L5;
``methods.md`` §1.2 L5 and §1.6 pitfalls 1–2).

Shared helper for the function-application analysis (L6)::

    remainders(model, cache_or_acts, layer, *, regressors="feeding_layer", intercept=False,
               space="raw") -> (mlp_out [B, d_model], remainder [B, d_model])   # float64

``cache_or_acts`` is a :class:`~recallscope.core.tokens.PromptBatch` / :class:`FactSet` (one forward
is run) or the last-position activations ``{Site: [B, ...]}`` of :func:`needed_sites` (e.g. from
:func:`last_position_acts`).

For an MLP ``ℓ`` at the last position ``N``, with ``y = m^ℓ_N`` (site ``mlp_out``) and the regressor
heads' outputs ``o^{ℓ',h}_N = z^{ℓ',h}_N W_O^{ℓ',h}`` (input-column block of ``W_O``; Gemma-2's
attention post-norm folded in at its actual scale)::

    y = Σ_{(ℓ',h)} β_{ℓ',h} o^{ℓ',h} (+ c) + f        (least squares, float64)

``β > 0``: the MLP re-emits (amplifies) the head; ``β < 0``: it erases it; ``1 + β`` is the head's
effective weight after the MLP (its own direct write plus what the MLP adds back). ``f`` is the
head-independent remainder (the "function application" component of L6). R² says how much of
``y`` the heads explain; a coefficient of a poor fit means little.

Choices (the paper's regression could not be read, ``methods.md`` §1.6 pitfall 1):

- ``regressors="feeding_layer"``: the heads of the attention layer the MLP reads
  (:func:`~recallscope.core.mlp.feeding_attention_layer`: the same block, or the previous one in
  parallel blocks, where MLP 0 has none and gives NaN); ``"earlier_layers"``: every head of that
  layer and all layers before it.
- ``pooled``: one ``β`` per head shared by all facts (the runner then passes every fact at once);
  otherwise one fit per fact.
- ``intercept``: a scalar per fact (per-coordinate offset when pooled); see
  :func:`~recallscope.core.regression.least_squares` for the R² conventions.
- ``space="normalized"``: the regressors are the heads as the MLP's norm sees them, the norm
  linearized at the actual MLP input, ``γ ⊙ centre(o) / ρ(r)`` (``centre`` for LayerNorm only;
  ``ρ`` the norm's scale on the MLP input ``r``, no bias); ``y`` stays ``m^ℓ``. ``β`` then has other
  units and ``1 + β`` is not defined (NaN).

The exact linearized alternative (pitfall 2): with ``J`` the Jacobian of ``MLP∘norm`` at the actual
input (:func:`~recallscope.core.mlp.mlp_jvp`), per head ``linear_coef = ⟨J o, o⟩ / ‖o‖²`` (comparable to
``β``) and ``linear_norm = ‖J o‖``; per layer the first-order total ``Σ_h J o_h``, its norm and its
cosine with ``y``.

Interpretation check (L5 item 4): the 1-based rank of the subject's first token and of the gold
target's first token under the logit lens (the model's own final norm, :func:`project_to_vocab`
mode ``logit_lens``) of the residual before the MLP (``resid_post − mlp_out``) and after it
(``resid_post``; both less ``ple_out`` in blocks that add a per-layer input after the MLP, Gemma 4).

Fast by construction: one forward per ``batch_size`` facts keeps ``z`` of the needed layers, the
MLP input, ``mlp_out`` and ``resid_post`` at ``N`` only; fits, JVPs and ranks run on those.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
import pandas as pd
import torch

from recallscope.core import regression
from recallscope.core.cache import forward_floats
from recallscope.core.decompose import post_norm_note
from recallscope.core.mlp import mlp_input_site
from recallscope.core.mlp_effects import linearized_effects, logit_lens_ranks
from recallscope.core.regression import (
    last_position_acts,
    layer_inputs,
    needed_sites,
    regressor_heads,
    regressor_matrix,
    remainder_fit,
)
from recallscope.core.tokens import PromptBatch, as_batch
from recallscope.core.vocab import readout_floats
from recallscope.data.facts import FactSet
from recallscope.errors import RecallscopeError
from recallscope.methods.base import Cost, MethodConfig, MethodResult, result_provenance
from recallscope.methods.hints import DISTINCT, NON_EMPTY, NonNegative, Positive
from recallscope.methods.lv2024.summaries import coefficients
from recallscope.methods.lv2024.summaries import coefficients as summary
from recallscope.models.model import Model
from recallscope.models.sites import Site

__all__ = [
    "NAME",
    "DESCRIPTION",
    "CHUNK_SIZE",
    "Config",
    "MlpRegressionResult",
    "run",
    "cost",
    "needs_all_facts",
    "remainders",
    "regressor_heads",
    "needed_sites",
    "last_position_acts",
    "summary",
]

NAME = "mlp_regression"
DESCRIPTION = (
    "Regress each MLP's output on the heads feeding it: which heads it amplifies or erases (Lv et al.)."
)
CHUNK_SIZE = 32
"""Facts per runner chunk (per-example fits); ``batch_size`` facts per forward inside ``run``."""


@dataclass(frozen=True, kw_only=True)
class Config(MethodConfig):
    """Regression settings; the defaults (and preset ``lv``) are our reading of Lv et al.'s L5."""

    layers: Annotated[tuple[NonNegative, ...], NON_EMPTY, DISTINCT] | None = None
    """MLP layers (block indices) to analyse; None = every MLP."""
    regressors: Literal["feeding_layer", "earlier_layers"] = "feeding_layer"
    """``feeding_layer``: the heads of the attention layer the MLP reads (the same block; the previous
    one in parallel blocks); ``earlier_layers``: all heads of that layer and every earlier one."""
    pooled: bool = False
    """One coefficient per head shared by all facts (the runner then passes every fact at once)."""
    intercept: bool = False
    """Add a constant regressor: a scalar per fact, or a per-coordinate offset when pooled."""
    space: Literal["raw", "normalized"] = "raw"
    """``raw``: regress on the head outputs; ``normalized``: on the heads as the MLP's norm sees them,
    ``γ ⊙ centre(o) / ρ`` with ``ρ`` frozen on the actual MLP input (no bias)."""
    linearized: bool = True
    """Also compute the exact linearized alternative ``J·o_h`` (Jacobian of the MLP and its norm)."""
    batch_size: Positive = 16
    """Facts per forward inside ``run``."""

    PRESETS = {
        "lv": dict(
            layers=None,
            regressors="feeding_layer",
            pooled=False,
            intercept=False,
            space="raw",
            linearized=True,
        )
    }


def needs_all_facts(config: Config) -> bool:
    """A pooled fit needs every fact in one call."""
    return config.pooled


def remainders(
    model: Model,
    cache_or_acts: PromptBatch | FactSet | Mapping[Site, torch.Tensor],
    layer: int,
    *,
    regressors: str = "feeding_layer",
    intercept: bool = False,
    space: str = "raw",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mlp_out [B, d], remainder [B, d]) at the last position of MLP `layer`, per-example fit
    (:func:`recallscope.core.regression.remainders`; a fact set is tokenized first).
    """
    acts = as_batch(model, cache_or_acts) if isinstance(cache_or_acts, FactSet) else cache_or_acts
    return regression.remainders(model, acts, layer, regressors=regressors, intercept=intercept, space=space)


# -- the method ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MlpRegressionResult(MethodResult):
    """Per-head coefficients, fit quality, the linearized alternative and rank checks per fact and MLP."""

    layers: list[int]
    source_layer: np.ndarray
    """``[layer, n_max]`` source layer of each regressor (-1 pads layers with fewer)."""
    head: np.ndarray
    """``[layer, n_max]`` head of each regressor (-1 pads)."""
    coef: np.ndarray
    """``[F, layer, n_max]`` ``β`` (NaN pads)."""
    head_norm: np.ndarray
    """``[F, layer, n_max]`` ``‖o‖`` of the raw head output."""
    linear_coef: np.ndarray
    """``[F, layer, n_max]`` ``⟨J o, o⟩ / ‖o‖²`` (NaN without ``linearized``)."""
    linear_norm: np.ndarray
    """``[F, layer, n_max]`` ``‖J o‖``."""
    fit: dict[str, np.ndarray]
    """Per-fact, per-layer ``[F, layer]`` arrays of the ``fit`` table."""
    remainder: np.ndarray
    """``[F, layer, d_model]`` the remainders ``f``."""

    def to_frame(self) -> pd.DataFrame:
        """One row per fact × layer × regressor head.

        Columns ``fact_id``, ``layer``, ``source_layer``, ``head``, ``coef``, ``effective_weight``
        (``1 + coef``; NaN in normalized space), ``head_norm``, ``linear_coef``, ``linear_norm``.
        """
        F, n_layers, n_max = self.coef.shape
        valid = self.head >= 0  # [layer, n_max]
        li, ki = np.nonzero(valid)
        fi = np.repeat(np.arange(F), len(li))
        li_all, ki_all = np.tile(li, F), np.tile(ki, F)
        coef = self.coef[fi, li_all, ki_all]
        raw = self.config.space == "raw"
        return pd.DataFrame(
            {
                "fact_id": np.asarray(self.fact_ids, dtype=object)[fi],
                "layer": np.asarray(self.layers, dtype=np.int64)[li_all],
                "source_layer": self.source_layer[li_all, ki_all].astype(np.int64),
                "head": self.head[li_all, ki_all].astype(np.int64),
                "coef": coef,
                "effective_weight": 1.0 + coef if raw else np.full_like(coef, np.nan),
                "head_norm": self.head_norm[fi, li_all, ki_all],
                "linear_coef": self.linear_coef[fi, li_all, ki_all],
                "linear_norm": self.linear_norm[fi, li_all, ki_all],
            }
        )

    def tables(self) -> dict[str, pd.DataFrame]:
        """``fit``: one row per fact × layer.

        Columns ``fact_id``, ``layer``, ``r2``, ``r2_adjusted``, ``y_norm``, ``fitted_norm``,
        ``remainder_norm``, ``n_regressors``, with ``intercept`` ``intercept`` (scalar per fact; NaN
        when pooled) and ``intercept_norm``, then ``linear_total_norm``, ``linear_total_cos`` and the
        1-based logit-lens ranks ``subject_rank_before``, ``subject_rank_after``,
        ``target_rank_before``, ``target_rank_after``. NaN fit columns for an MLP without regressors.
        """
        F, n_layers = len(self.fact_ids), len(self.layers)
        frame = pd.DataFrame(
            {
                "fact_id": np.repeat(np.asarray(self.fact_ids, dtype=object), n_layers),
                "layer": np.tile(np.asarray(self.layers, dtype=np.int64), F),
            }
        )
        for name, values in self.fit.items():
            frame[name] = values.reshape(-1)
        return {"fit": frame}

    def arrays(self) -> dict[str, np.ndarray]:
        """``"<fact_id>/coef"``, ``"<fact_id>/linear_coef"`` ``[layer, n_max]`` (NaN pads) and
        ``"<fact_id>/remainder"`` ``[layer, d_model]``.
        """
        return self.per_fact(coef=self.coef, linear_coef=self.linear_coef, remainder=self.remainder)

    def summary(self) -> pd.DataFrame:
        """:func:`summary` of this result's facts."""
        return coefficients(self.to_frame(), self.tables()["fit"])


def run(model: Model, facts: PromptBatch | FactSet, config: Config | None = None) -> MlpRegressionResult:
    """Fit every chosen MLP's output on its regressor heads for every fact (``batch_size`` per forward)."""
    config = config or Config()
    if not len(facts):
        raise RecallscopeError("mlp_regression got no facts: pass a batch or FactSet with at least one")
    layers = _layers(model, config)
    heads = {layer: regressor_heads(model, layer, config.regressors) for layer in layers}
    _check_sizes(model, config, heads, len(facts))
    sites = needed_sites(model, layers, regressors=config.regressors, ranks=True)
    acts, fact_ids, tokens = _collect(model, facts, sites, config.batch_size)
    F, n_max, d = len(fact_ids), max(len(h) for h in heads.values()), model.d_model
    shape = (F, len(layers), n_max)
    out = {k: np.full(shape, np.nan) for k in ("coef", "head_norm", "linear_coef", "linear_norm")}
    fit_names = ["r2", "r2_adjusted", "y_norm", "fitted_norm", "remainder_norm", "n_regressors"]
    fit_names += ["intercept", "intercept_norm"] if config.intercept else []
    fit_names += ["linear_total_norm", "linear_total_cos"]
    fit = {name: np.full((F, len(layers)), np.nan) for name in fit_names}
    remainder = np.zeros((F, len(layers), d))
    for i, layer in enumerate(layers):
        n = len(heads[layer])
        y, raw, resid = layer_inputs(model, acts, layer, heads[layer])
        X = regressor_matrix(model, acts, layer, raw, config.space)
        rest, result = remainder_fit(y, X, intercept=config.intercept, pooled=config.pooled)
        remainder[:, i] = rest.numpy()
        fit["y_norm"][:, i] = y.norm(dim=-1).numpy()
        fit["n_regressors"][:, i] = n
        if result is not None:
            out["coef"][:, i, :n] = result.coef.numpy()
            fit["r2"][:, i] = result.r2.numpy()
            equations = d * (F if config.pooled else 1)
            fit["r2_adjusted"][:, i] = _adjusted(result.r2.numpy(), n, equations, config)
            fit["fitted_norm"][:, i] = result.fitted.norm(dim=-1).numpy()
            fit["remainder_norm"][:, i] = rest.norm(dim=-1).numpy()
            if config.intercept:
                _intercepts(fit, i, result.intercept, config.pooled, d)
        out["head_norm"][:, i, :n] = raw.norm(dim=-1).numpy()
        if config.linearized and n:
            linearized_effects(model, layer, resid, raw, y, config.batch_size, out, fit, i)
    fit.update(logit_lens_ranks(model, acts, layers, tokens))
    source = np.full((len(layers), n_max), -1, dtype=np.int64)
    head = np.full((len(layers), n_max), -1, dtype=np.int64)
    for i, layer in enumerate(layers):
        for k, (s, h) in enumerate(heads[layer]):
            source[i, k], head[i, k] = s, h
    return MlpRegressionResult(
        config=config,
        fact_ids=fact_ids,
        layers=layers,
        source_layer=source,
        head=head,
        fit=fit,
        remainder=remainder,
        provenance=_provenance(model, config, [layer for layer in layers if not heads[layer]]),
        **out,
    )


def cost(model: Model, batch: PromptBatch | FactSet, config: Config | None = None) -> Cost:
    """One forward per ``batch_size`` facts; memory: one forward's activations, the kept last-position
    vectors of every fact, and one layer's regressors and JVPs.
    """
    config = config or Config()
    batch = as_batch(model, batch)
    B, d = len(batch), model.d_model
    layers = list(range(model.n_layers)) if config.layers is None else list(config.layers)
    n_max = max((len(regressor_heads(model, layer, config.regressors)) for layer in layers), default=0)
    rows = min(B, config.batch_size)
    forward = forward_floats(model, rows, batch.seq_len) * max(model.dtype.itemsize, 4)
    kept = B * (model.n_layers * model.n_heads * model.d_head + 3 * len(layers) * d) * 8
    per_layer = B * n_max * d * 8 * (3 if config.linearized else 1)
    if config.linearized:  # measured: the batched JVP through the MLP holds about one weight's copy
        per_layer += d * model.d_mlp * max(model.dtype.itemsize, 4)
    ranks = readout_floats(model, 2 * B * len(layers)) * max(model.dtype.itemsize, 4)
    work = float(len(batch) * batch.seq_len * (max(layers) + 1))
    if config.linearized:  # one MLP pass per fact, head and layer (the JVP's tangent), in block units
        d_mlp = model.d_mlp * (3 if model.spec.gated_mlp else 2)
        work += B * n_max * len(layers) * d_mlp / (4 * d + d_mlp)
    readouts = 2 * B * len(layers)  # logit-lens ranks before and after each MLP
    return Cost(
        math.ceil(B / config.batch_size), work, kept + max(forward, per_layer, ranks), vocab_rows=readouts
    )


# -- internals ----------------------------------------------------------------------------------------


def _layers(model: Model, config: Config) -> list[int]:
    if config.layers is None:
        return list(range(model.n_layers))
    return [model.check_layer(layer) for layer in config.layers]


def _check_sizes(model: Model, config: Config, heads: dict, n_facts: int) -> None:
    """Per-example fits need fewer regressors than coordinates (pooled: than coordinates × facts)."""
    rows = model.d_model * (n_facts if config.pooled else 1)
    for layer, chosen in heads.items():
        n = len(chosen) + int(config.intercept)
        if n >= rows:
            raise RecallscopeError(
                f"MLP {layer} has {n} regressors but a {'pooled' if config.pooled else 'per-example'} fit "
                f"has only {rows} equations (d_model={model.d_model}): the fit is not determined; use "
                "regressors='feeding_layer', fewer layers, or pooled=True"
            )


def _collect(model: Model, facts, sites, batch_size: int):
    """Last-position activations of every fact (one forward per ``batch_size``), fact ids, and the
    ``[F, 2]`` tracked tokens (subject's first token, gold target; -1 where unknown).
    """
    parts, fact_ids, tokens = [], [], []
    for start in range(0, len(facts), batch_size):
        rows = range(start, min(start + batch_size, len(facts)))
        batch = facts.select(rows) if isinstance(facts, PromptBatch) else facts.to_batch(model, rows)
        parts.append(last_position_acts(model, batch, sites))
        fact_ids += list(batch.fact_ids or map(str, rows))
        tokens.append(_tracked(batch))
    acts = {site: torch.cat([p[site] for p in parts]) for site in sites}
    return acts, fact_ids, torch.cat(tokens)


def _tracked(batch: PromptBatch) -> torch.Tensor:
    """``[B, 2]``: the subject's first token and the gold target's first token (-1 where unknown)."""
    out = torch.full((len(batch), 2), -1, dtype=torch.long)
    if "subject" in batch.spans:
        start = batch.spans["subject"][:, 0].long()
        known = start >= 0
        out[known, 0] = batch.input_ids[known, start[known]]
    if batch.target_ids is not None:
        out[:, 1] = batch.target_ids.long()
    return out


def _adjusted(r2: np.ndarray, n: int, m: int, config: Config) -> np.ndarray:
    """R² adjusted for ``n`` regressors over ``m`` equations: ``1 − (1 − R²)(m − c)/(m − n − c)``,
    ``c`` = 1 with an intercept. Random regressors give about 0 (the raw R² of ``n`` random
    regressors is about ``n / m``).
    """
    c = int(config.intercept)
    return 1 - (1 - r2) * (m - c) / (m - n - c)


def _intercepts(fit: dict, i: int, intercept: torch.Tensor, pooled: bool, d: int) -> None:
    if pooled:  # a per-coordinate offset vector [d], shared by every fact
        fit["intercept_norm"][:, i] = float(intercept.norm())
    else:  # a scalar per fact added to every coordinate
        fit["intercept"][:, i] = intercept.numpy()
        fit["intercept_norm"][:, i] = intercept.abs().numpy() * math.sqrt(d)


def _provenance(model: Model, config: Config, without: list[int]) -> dict:
    fit = "pooled: one β per head over all facts" if config.pooled else "per example: one β per head per fact"
    intercept = (
        ("per-coordinate offset shared by facts" if config.pooled else "scalar per fact")
        if config.intercept
        else "none"
    )
    regressors = {
        "feeding_layer": "heads of feeding_attention_layer(ℓ) (ℓ; ℓ−1 in parallel blocks)",
        "earlier_layers": "all heads of layers ≤ feeding_attention_layer(ℓ)",
    }[config.regressors]
    space = {
        "raw": "raw head outputs o_h",
        "normalized": "γ ⊙ centre(o_h) / ρ(MLP input) of the MLP's norm (frozen scale, no bias; a gated "
        "norm's gate frozen too); effective_weight undefined (NaN)",
    }[config.space]
    post = post_norm_note(model)
    return result_provenance(
        model,
        config,
        target="y = mlp_out at the last position (Gemma-2: after the MLP post-norm)",
        heads="o_h = z_h W_O[h·d_h:(h+1)·d_h] (input-column block of o_proj.weight)" + post,
        regressors=regressors,
        layers_without_regressors=without,
        regression=f"least squares in float64; {fit}; intercept: {intercept}; R² uncentred without an "
        "intercept, centred with one (over coordinates per fact; over facts when pooled)",
        space=space,
        effective_weight="1 + β",
        linearized="J·o_h with J the Jacobian of norm→MLP(→post-norm) at the actual MLP input "
        f"({mlp_input_site(model, 0).name}); linear_coef = ⟨J o, o⟩/‖o‖²"
        if config.linearized
        else "off",
        ranks="logit_lens (the model's own final norm, b_U, soft-cap) of resid_post − mlp_out (before) "
        "and resid_post (after)"
        + (" less ple_out, the per-layer input added after the MLP," if model.spec.ple_update else "")
        + "; 1-based; subject's first token and the gold target's first token",
        layers="block index",
        positions="last",
        bos=model.bos,
    )
