"""Function application: does a deep MLP write the answer? (Lv et al. 2024, L6; ``methods.md`` §1.2).

For every chosen MLP layer ``ℓ`` two components at the last position ``N`` are read into
vocabulary space with the final norm's scale frozen on the final residual of the same forward::

    logits(c) = W_U (γ ⊙ centre(c)) / ρ_N                   (no bias, no final soft-cap)

- ``mlp_out``: the whole MLP output ``m^ℓ_N``;
- ``remainder``: ``f = m^ℓ_N − X β̂`` (``− c`` with an intercept), the part of the MLP output that
  a per-example least-squares fit on the outputs of the heads that feed it does not explain
  (L5, :func:`recallscope.core.regression.remainders`). It is Lv et al.'s "function
  application" component: the MLP's contribution that is not a re-weighting of the heads.

For each component the frame gives the target's frozen-scale ``logit`` and its 1-based ``rank``
over the full vocabulary (ties count in the target's favour), its ``relation_rank`` among the
``n_candidates`` distinct first tokens of the relation's answers (``relation_answers``, each
tokenized after the fact's prompt as its target is) with the ``margin`` over their mean, and the
``cosine`` of the component with ``W_U[target]`` and the mean ``cosine_others`` with the other
candidates' unembeddings: is the MLP pushing *this* subject's answer, or any capital?

Counterfactual check (``counterfactual=True``): the same prompt with another subject of the
relation (``data.variants.counterfactual_facts``) runs in the same forward. With ``C`` the clean
answer and ``C'`` the counterfactual one, the component of the counterfactual run is decoded on
both: ``cf_logit_new`` (``C'``), ``cf_logit_old`` (``C``), ``follows`` = 1.0 when it prefers ``C'``,
and ``shift = (cf_new − cf_old) − (clean_new − clean_old)`` (positive: the component follows the
subject).

Dataset-wide summary: :func:`summary` on the concatenated frame of all chunks.

Fast by construction: one forward per chunk (clean and counterfactual prompts together) keeps the
head mixes ``z``, the MLP input and output at ``N`` of the layers needed; full-vocabulary logits
are built one layer at a time for the clean rows only (the ranks need them), the counterfactual
rows are read through two token covectors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
import pandas as pd
import torch

from recallscope.core.cache import forward_floats, run_with_cache
from recallscope.core.decoding import decode_tracked, work_dtype
from recallscope.core.regression import needed_sites, regressor_heads, remainders
from recallscope.core.subvalues import FrozenHead
from recallscope.core.tokens import PromptBatch, answer_ids
from recallscope.core.vocab import READOUT_TEMPS, frozen_scale_readout
from recallscope.data.facts import FactSet
from recallscope.data.variants import add_relation_context, counterfactual_facts
from recallscope.errors import RecallscopeError
from recallscope.methods.base import Cost, MethodConfig, MethodResult, result_provenance
from recallscope.methods.hints import DISTINCT, NON_EMPTY, NonNegative
from recallscope.methods.lv2024.summaries import COLUMNS
from recallscope.methods.lv2024.summaries import function_application_summary as summary
from recallscope.models.model import Model
from recallscope.models.sites import Site

__all__ = [
    "NAME",
    "DESCRIPTION",
    "CHUNK_SIZE",
    "COMPONENTS",
    "Config",
    "FunctionApplicationResult",
    "run",
    "cost",
    "summary",
]

NAME = "function_application"
DESCRIPTION = (
    "Decode each MLP output and its head-independent remainder at the last token: "
    "does it write this subject's answer? (Lv et al.)"
)
CHUNK_SIZE = 16
"""Facts per runner chunk (one forward each, counterfactual prompts included)."""
COMPONENTS = ("mlp_out", "remainder")
_METRICS = ["norm", "logit", "rank", "relation_rank", "n_candidates", "margin", "cosine", "cosine_others"]
_CF = ["cf_logit_new", "cf_logit_old", "follows", "shift"]


@dataclass(frozen=True, kw_only=True)
class Config(MethodConfig):
    """Function-application settings; the defaults (and preset ``lv``) are our reading of L6."""

    layers: Annotated[tuple[NonNegative, ...], NON_EMPTY, DISTINCT] | None = None
    """MLP layers (block indices) to analyse; None: every layer."""
    components: Annotated[tuple[Literal[COMPONENTS], ...], NON_EMPTY, DISTINCT] = COMPONENTS
    """``mlp_out`` (the whole MLP output) and/or ``remainder`` (what the fit on the heads leaves)."""
    regressors: Literal["feeding_layer", "earlier_layers"] = "feeding_layer"
    """Heads the remainder is fitted on (as in ``mlp_regression``): ``feeding_layer``, the heads of
    the attention layer the MLP reads (``ℓ``, or ``ℓ − 1`` in parallel blocks); ``earlier_layers``,
    every head of the layers up to that one."""
    intercept: bool = False
    """Fit a scalar offset per example besides the heads (as in ``mlp_regression``)."""
    space: Literal["raw", "normalized"] = "raw"
    """Regressors as written to the residual (``raw``) or as the MLP's norm sees them with its scale
    frozen at the actual input (``normalized``, ``γ ⊙ centre(o) / ρ``), as in ``mlp_regression``."""
    counterfactual: bool = True
    """Also run each fact's counterfactual prompt (another subject of the relation) and report how
    the component follows the new subject."""
    target: Literal["gold", "top1"] = "gold"
    """The answer scored: the first token of the fact's answer (``gold``) or the model's greedy token
    on the prompt (``top1``; then ``C'`` is the greedy token on the counterfactual prompt)."""

    PRESETS = {
        "lv": dict(
            layers=None,
            components=COMPONENTS,
            regressors="feeding_layer",
            intercept=False,
            space="raw",
            counterfactual=True,
            target="gold",
        )
    }


@dataclass(frozen=True)
class FunctionApplicationResult(MethodResult):
    """Decoded MLP components of every fact and layer (and their counterfactual readings)."""

    layers: list[int]
    components: list[str]
    values: dict[str, np.ndarray]
    """Column name → ``[F, layer, component]`` (the numeric frame columns)."""
    top_token: np.ndarray
    """``[F, layer, component]`` text of each component's top decoded token."""
    candidate_ids: list[np.ndarray]
    """Per fact: ``[n]`` candidate token ids, the target first."""
    candidate_logits: list[np.ndarray]
    """Per fact: ``[layer, component, n]`` logits of the candidates."""
    facts: pd.DataFrame
    """One row per fact: targets, counterfactual partner, ``final_scale``."""

    def to_frame(self) -> pd.DataFrame:
        """One row per fact × layer × component; columns :data:`COLUMNS`.

        ``rank`` and ``relation_rank`` are 1-based; the counterfactual columns are NaN without a
        counterfactual run (or partner).
        """
        F, L, C = len(self.fact_ids), len(self.layers), len(self.components)
        f, layer, comp = np.indices((F, L, C)).reshape(3, -1)
        columns: dict[str, np.ndarray] = {
            "fact_id": np.array(self.fact_ids, dtype=object)[f],
            "layer": np.asarray(self.layers, dtype=np.int64)[layer],
            "component": np.array(self.components, dtype=object)[comp],
        }
        for name in COLUMNS[3:]:
            columns[name] = (self.top_token if name == "top_token" else self.values[name]).reshape(-1)
        frame = pd.DataFrame(columns)
        for name in ("rank", "relation_rank", "n_candidates"):
            frame[name] = frame[name].astype(np.int64)
        return frame

    def tables(self) -> dict[str, pd.DataFrame]:
        """``facts``: one row per fact with ``fact_id``, ``target_id``, ``target_token``,
        ``counterfactual_id``, ``new_id``, ``new_token`` (``C'``), ``n_candidates`` and
        ``final_scale`` (``ρ_N``).
        """
        return {"facts": self.facts}

    def arrays(self) -> dict[str, np.ndarray]:
        """``"<fact_id>/candidate_ids"`` ``[n]`` and ``"<fact_id>/candidate_logits"``
        ``[layer, component, n]`` (the target is candidate 0).
        """
        return self.per_fact(candidate_ids=self.candidate_ids, candidate_logits=self.candidate_logits)

    def summary(self) -> pd.DataFrame:
        """:func:`summary` of this result's facts only."""
        return summary(self.to_frame())


def run(model: Model, facts: FactSet, config: Config | None = None) -> FunctionApplicationResult:
    """Decode the chosen MLP components at the last position of every fact (one forward).

    Args:
        model: the model.
        facts: a :class:`FactSet` (relation answers and counterfactual partners are fact
            attributes; :func:`~recallscope.data.variants.add_relation_context` is applied, on the
            facts themselves, when they are missing).
        config: the settings (default :class:`Config`).
    """
    config = config or Config()
    facts = _with_context(facts)
    layers = _layers(model, config)
    clean = list(facts)
    paired = (
        [i for i, f in enumerate(clean) if "counterfactual" in f.attributes] if config.counterfactual else []
    )
    lonely = [f for f in clean if config.counterfactual and "counterfactual" not in f.attributes]
    skipped = [
        (f.fact_id, "no counterfactual partner in the relation: counterfactual columns are NaN")
        for f in lonely
    ]
    partners = list(counterfactual_facts(facts.with_facts([clean[i] for i in paired], {}))) if paired else []
    batch = facts.with_facts([*clean, *partners], {"step": "function_application"}).to_batch(model)
    mlp_out, remainder, final, logits = _components(model, batch, layers, config)
    vectors = torch.stack([{"mlp_out": mlp_out, "remainder": remainder}[c] for c in config.components], 2)
    head = FrozenHead.from_final(model, final, bias=False)  # vectors [B, L, C, d]
    targets = _targets(batch, logits, config.target)
    F = len(clean)
    candidates = [_candidates(model, fact, int(targets[i])) for i, fact in enumerate(clean)]
    values, top, cand_logits = _decode_clean(model, head, vectors[:F], targets[:F], candidates)
    for name in _CF:
        values[name] = np.full((F, len(layers), len(config.components)), np.nan)
    if paired:
        rows = torch.tensor(paired)
        _counterfactual(values, head, vectors, rows, targets[rows], targets[F:], F)
    table = _facts_table(model, clean, partners, paired, targets, candidates, head.scale[:F])
    return FunctionApplicationResult(
        config=config,
        fact_ids=[f.fact_id for f in clean],
        layers=layers,
        components=list(config.components),
        values=values,
        top_token=top,
        candidate_ids=[np.asarray(c, dtype=np.int64) for c in candidates],
        candidate_logits=cand_logits,
        facts=table,
        provenance=_provenance(model, config),
        skipped=skipped,
    )


def cost(model: Model, batch: PromptBatch | FactSet, config: Config | None = None) -> Cost:
    """One forward of the clean (and counterfactual) prompts; memory: the forward's activations, the
    kept ``z`` / MLP vectors at ``N`` and one layer's full-vocabulary logits of the clean rows.
    """
    config = config or Config()
    n = len(batch)
    if isinstance(batch, FactSet):
        lengths = [len(model.tokenizer(f.prompt)["input_ids"]) for f in batch]
    else:
        lengths = [batch.seq_len - int(p) for p in batch.pad_lengths]
    copies = 2 if config.counterfactual else 1  # counterfactual prompts: about as long as the clean ones
    n_rows, lengths = n * copies, lengths * copies
    seq_len = max(lengths, default=0)
    n_layers = len(config.layers) if config.layers is not None else model.n_layers
    kept = n_rows * n_layers * (model.n_heads * model.d_head + 3 * model.d_model)
    forward = forward_floats(model, n_rows, seq_len)
    decode = READOUT_TEMPS * n * len(config.components) * model.d_vocab  # one layer's readings at a time
    work = float(sum(lengths) * model.n_layers)
    readouts = n_rows * n_layers * len(config.components)  # each component of each layer, all tokens
    peak = int((kept + max(forward, decode)) * max(model.dtype.itemsize, 4))
    return Cost(1, work, peak, vocab_rows=readouts)


# -- pieces of run ---------------------------------------------------------------------------------


def _with_context(facts: FactSet) -> FactSet:
    if not isinstance(facts, FactSet):
        raise RecallscopeError(
            f"function_application needs a FactSet, got {type(facts).__name__}: the relation's answers and "
            "the counterfactual partners are fact attributes; pass the facts, not a PromptBatch"
        )
    if not len(facts):
        raise RecallscopeError("function_application got no facts: pass a FactSet with at least one")
    if any("relation_answers" not in f.attributes for f in facts):
        facts = add_relation_context(facts)  # partners from the facts themselves (as counterfactual_facts)
    return facts


def _layers(model: Model, config: Config) -> list[int]:
    if config.layers is None:
        return list(range(model.n_layers))
    for layer in config.layers:
        if not 0 <= layer < model.n_layers:
            raise RecallscopeError(
                f"MLP layer {layer} is out of range: the model has layers 0–{model.n_layers - 1}; "
                f"pass layers within range (or None for all)"
            )
    return list(config.layers)


def _components(model: Model, batch: PromptBatch, layers: Sequence[int], config: Config):
    """``mlp_out [B, L, d]``, ``remainder [B, L, d]`` (float64), the final residual ``[B, d]`` and the
    clean logits ``[B, V]`` (``top1`` only, else None) at the last position, from one forward.
    """
    if config.regressors == "earlier_layers":
        most = max(len(regressor_heads(model, layer, config.regressors)) for layer in layers)
        if most >= model.d_model:
            raise RecallscopeError(
                f"regressors='earlier_layers' fits up to {most} heads on d_model={model.d_model} "
                "coordinates: the fit is exact and the remainder empty; use regressors='feeding_layer' "
                "or earlier layers"
            )
    final_site = Site(model.n_layers - 1, "resid_post")
    sites = [*needed_sites(model, layers, regressors=config.regressors), final_site]
    sites = list(dict.fromkeys(sites))
    logits = "last" if config.target == "top1" else None
    cache = run_with_cache(model, batch, sites, positions=[-1], logits=logits, dtype=work_dtype(model))
    acts = {site: cache[site][:, 0] for site in sites}
    fit = dict(regressors=config.regressors, intercept=config.intercept, space=config.space)
    pairs = [remainders(model, acts, layer, **fit) for layer in layers]  # L × ([B, d], [B, d])
    mlp_out = torch.stack([y for y, _ in pairs], 1)
    remainder = torch.stack([f for _, f in pairs], 1)
    return mlp_out, remainder, acts[final_site], cache.logits


def _targets(batch: PromptBatch, logits: torch.Tensor | None, target: str) -> torch.Tensor:
    if target == "top1":
        return logits.argmax(-1).cpu()
    return batch.target_ids.long().cpu()


def _candidates(model: Model, fact, target: int) -> list[int]:
    """The target, then the distinct first tokens of the relation's other answers (as after the prompt)."""
    out = [target]
    for answer in fact.attributes.get("relation_answers", ()):
        token = answer_ids(model, fact.prompt, fact.continuation(answer))[0]
        if token not in out:
            out.append(token)
    return out


def _decode_clean(model: Model, head: FrozenHead, vectors: torch.Tensor, targets, candidates):
    """Full-vocabulary readings of the clean rows, one layer at a time."""
    F, L, C, _ = vectors.shape
    n = max(len(c) for c in candidates)
    ids = torch.zeros(F, n, dtype=torch.long)
    mask = torch.zeros(F, n, dtype=torch.bool)
    for i, c in enumerate(candidates):
        ids[i, : len(c)], mask[i, : len(c)] = torch.tensor(c), True
    device = head.scale.device
    ids, mask = ids.to(device), mask.to(device)
    dtype = head.dtype
    W_U = model.W_U.to(device, dtype)
    unembed = W_U[ids]  # [F, n, d]
    unembed = unembed / unembed.norm(dim=-1, keepdim=True)
    sub = FrozenHead(model, head.scale[:F], None)
    others = mask.clone()
    others[:, 0] = False
    n_others = others.sum(-1)  # [F]
    values = {name: np.zeros((F, L, C)) for name in _METRICS}
    top = np.empty((F, L, C), dtype=object)
    cand = torch.zeros(F, L, C, n, dtype=torch.float64)
    for layer in range(L):
        v = vectors[:, layer].to(device, dtype)  # [F, C, d]
        full = sub.logits(v)  # [F, C, V]
        picked = full.gather(-1, ids[:, None].expand(F, C, n))  # [F, C, n]
        logit = picked[..., 0]
        rank = 1 + (full > logit[..., None]).sum(-1, dtype=torch.int32)  # no [F, C, V] int64 buffer
        beats = (picked > logit[..., None]) & mask[:, None]
        mean_others = (picked * others[:, None]).sum(-1) / n_others[:, None]
        cos = torch.einsum("fcd,fnd->fcn", v / v.norm(dim=-1, keepdim=True), unembed)
        cos_others = (cos * others[:, None]).sum(-1) / n_others[:, None]
        got = {
            "norm": v.norm(dim=-1),
            "logit": logit,
            "rank": rank,
            "relation_rank": 1 + beats.sum(-1),
            "n_candidates": mask.sum(-1)[:, None].expand(F, C),
            "margin": logit - mean_others,
            "cosine": cos[..., 0],
            "cosine_others": cos_others,
        }
        for name, value in got.items():
            values[name][:, layer] = value.double().cpu().numpy()
        best = full.argmax(-1).cpu()  # [F, C]
        top[:, layer] = np.vectorize(lambda t: model.tokenizer.decode([int(t)]), otypes=[object])(
            best.numpy()
        )
        cand[:, layer] = picked.double().cpu()
    cand_logits = [cand[i, ..., : len(c)].numpy() for i, c in enumerate(candidates)]
    return values, top, cand_logits


def _facts_table(model: Model, clean, partners, paired, targets, candidates, scale) -> pd.DataFrame:
    """One row per clean fact: its target, its counterfactual partner's answer ``C'`` and ``ρ_N``."""
    F = len(clean)
    decode = _decoder(model)
    table = pd.DataFrame(
        {
            "fact_id": [f.fact_id for f in clean],
            "target_id": targets[:F].numpy(),
            "target_token": [decode(t) for t in targets[:F]],
            "counterfactual_id": [None] * F,
            "new_id": np.full(F, -1, dtype=np.int64),
            "new_token": [None] * F,
            "n_candidates": [len(c) for c in candidates],
            "final_scale": scale.cpu().double().numpy(),
        }
    )
    for j, i in enumerate(paired):
        new = int(targets[F + j])
        table.loc[i, ["counterfactual_id", "new_id", "new_token"]] = [partners[j].fact_id, new, decode(new)]
    return table


def _decoder(model: Model):
    return lambda token: model.tokenizer.decode([int(token)])


def _counterfactual(values: dict, head: FrozenHead, vectors, rows, old, new, F: int) -> None:
    """Fill the counterfactual columns of clean ``rows`` (their partners are rows ``F:`` in order)."""
    pair = torch.stack([new, old], 1)  # [P, 2]: C', C
    clean = decode_tracked(FrozenHead(head.model, head.scale[rows], None), vectors[rows], pair)
    cf = decode_tracked(FrozenHead(head.model, head.scale[F:], None), vectors[F:], pair)  # [P, L, C, 2]
    clean, cf = clean.double().cpu().numpy(), cf.double().cpu().numpy()
    index = rows.numpy()
    values["cf_logit_new"][index] = cf[..., 0]
    values["cf_logit_old"][index] = cf[..., 1]
    values["follows"][index] = (cf[..., 0] > cf[..., 1]).astype(float)
    values["shift"][index] = (cf[..., 0] - cf[..., 1]) - (clean[..., 0] - clean[..., 1])


# -- dataset-wide summary --------------------------------------------------------------------------


def _provenance(model: Model, config: Config) -> dict:
    return result_provenance(
        model,
        config,
        projection="frozen_scale (final residual of the same forward; counterfactual rows their own)",
        readout=frozen_scale_readout(
            detail="full vocabulary for the clean rows (ranks), target tokens only for the "
            "counterfactual rows"
        ),
        components={
            "mlp_out": "the MLP update added to the residual (Gemma-2: after its post-norm)",
            "remainder": f"mlp_out minus its per-example least-squares fit on the {config.regressors} heads "
            f"({config.space} space, {'with' if config.intercept else 'no'} intercept); "
            "recallscope.core.regression.remainders",
        },
        target=f"{config.target}: "
        + ("first token of the fact's answer" if config.target == "gold" else "the model's greedy token"),
        candidates="distinct first tokens of the relation's answers (relation_answers), each tokenized "
        "after the fact's prompt with its leading space; the target is always one",
        ranks="1 + number of tokens (candidates) with a strictly larger logit",
        cosine="raw cosine between the component and the unembedding row W_U[t] (no final-norm gain)",
        counterfactual=(
            "the fact's prompt with its counterfactual subject, in the same forward; C' = its "
            f"{config.target} token, C = the clean one; shift = (cf[C'] − cf[C]) − (clean[C'] − clean[C])"
            if config.counterfactual
            else "off"
        ),
        layers="block index (MLP of the block)",
        positions="last",
        bos=model.bos,
    )
