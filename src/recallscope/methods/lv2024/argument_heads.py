"""Argument-passing heads: which heads move the subject to the last position (Lv et al. 2024, L3 + L4).

Two measurements per fact and attention head ``(ℓ, h)`` (``methods.md`` §1.2), giving ``[layers × heads]``
maps:

**L4, attention × subject projection** (one forward per chunk of facts). At the last position ``N``:

- ``attention``: the head's attention from ``N`` to the subject, summed over the subject's tokens
  (``attend_to="span"``) or to its first token only (``"first"``, the paper's ``pos_N``);
- ``subject_logit``: the head's output ``o^{ℓ,h}_N = z^{ℓ,h}_N W_O^{ℓ,h}``
  (:func:`~recallscope.core.decompose.head_vectors`, Gemma-2's post-norm folded in) read on
  the subject's first token: the frozen-scale logit ``W_U (γ ⊙ centre(o)) / ρ_N`` of that token
  (``projection="frozen_scale"``, ``ρ_N`` the final norm's scale on the same forward's final residual,
  no bias, no soft-cap) or the raw ``⟨o, W_U[tok]⟩`` (``"raw"``, the paper's scatter).

An argument passer attends to the subject and writes its unembedding direction: over the facts,
``attention`` and ``subject_logit`` correlate positively (:func:`summary` gives Pearson's ``r``).

**L3, path patching to the logits.** Sender = each head (and each MLP), receiver = the final logits,
metric ``iw`` = target logit − mean logit (:func:`~recallscope.methods.base.logit_minus_mean`). The
paper's forward C runs the clean prompt with *every* head's ``q``, ``k``, ``v`` frozen to their clean
values and the sender's output at ``N`` only replaced by its counterfactual value; MLPs run freely
unless ``freeze_mlps``. With ``q/k/v`` frozen no head output changes anywhere, and since only
position ``N`` is touched, nothing but the residual stream at ``N`` changes, through the later MLPs
and the final norm. So this module:

1. records the clean run once (:func:`~recallscope.core.resume.record_run`, facts grouped by prompt
   length because a recorded run has no padding);
2. for each layer ``ℓ`` resumes it at block ``ℓ``, position ``N`` only
   (:func:`~recallscope.core.resume.resume`), with one row per fact × sender of layer ``ℓ``;
3. sets the sender head's ``z`` at ``N`` (or, for an MLP sender, ``mlp_out`` at ``N``) to the
   counterfactual value;
4. holds ``attn_out`` at ``N`` of every later layer (and of layer ``ℓ`` for MLP senders) to its
   clean value. This is exactly freezing ``q/k/v``: frozen ``q/k/v`` give the clean attention
   output, the only thing attention adds to the stream at ``N``;
5. with ``freeze_mlps`` also holds ``mlp_out`` at ``N`` of every later layer (for a head sender, the
   MLP of its own layer too, which in a sequential block reads the head's output);
6. reads ``iw`` on the resumed logits (the model's own final norm, soft-cap included).

Counterfactual values: ``patching="per_example"`` uses each fact's own counterfactual prompt
(:func:`~recallscope.data.variants.counterfactual_facts`: the same prompt with another subject of the
relation); ``"mean"`` (the reference code) uses the mean, over *all* counterfactual prompts given to
:func:`run`, of the sender's value at ``N``; then :func:`needs_all_facts` is true and the runner
passes the whole dataset, which is batched here by ``batch_size``.

Per fact and sender: ``clean`` and ``patched`` ``iw``, ``delta = patched − clean`` and
``delta_pct = 100·delta/clean`` (§1.6 pitfall 6: a % change is unstable when ``clean`` is small, so
both are kept). Strongly negative = the sender carries task information to the logits.
:func:`summary` summarizes per head over the dataset, :func:`argument_passers` flags the heads that
both move the subject and matter.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import torch

from recallscope.core.cache import forward_floats
from recallscope.core.decoding import choose_targets, logit_minus_mean
from recallscope.core.decompose import post_norm_note
from recallscope.core.head_readouts import subject_readouts
from recallscope.core.hooks import site_hook
from recallscope.core.path_patching import (
    SenderValues,
    last_position_keeper,
    row_chunks,
    sender_edits,
    sender_values,
)
from recallscope.core.resume import equal_length_rows, record_run, resume
from recallscope.core.tokens import PromptBatch
from recallscope.data.facts import FactSet
from recallscope.data.variants import add_relation_context, counterfactual_facts
from recallscope.errors import RecallscopeError
from recallscope.methods.base import Cost, MethodConfig, MethodResult, result_provenance
from recallscope.methods.hints import Positive
from recallscope.methods.lv2024.summaries import argument_passers, scores
from recallscope.methods.lv2024.summaries import scores as summary
from recallscope.models.model import Model
from recallscope.models.sites import Site

__all__ = [
    "NAME",
    "DESCRIPTION",
    "CHUNK_SIZE",
    "Config",
    "ArgumentHeadsResult",
    "run",
    "cost",
    "needs_all_facts",
    "summary",
    "argument_passers",
]

NAME = "argument_heads"
DESCRIPTION = (
    "Heads that move the subject to the last token: attention × subject logit and path patching "
    "of every head to the logits (Lv et al.)."
)
CHUNK_SIZE = 16
"""Facts per runner chunk (per-example patching; mean patching takes the whole dataset)."""


@dataclass(frozen=True, kw_only=True)
class Config(MethodConfig):
    """Argument-head settings.

    Preset ``lv``: the paper as ``methods.md`` §1 describes it (attention to the subject's first
    token, raw projection, per-example counterfactuals); ``lv_code``: the reference code's mean
    patching with the same readouts.
    """

    path_patching: bool = True
    """Run L3 path patching (the expensive part); False leaves ``clean`` … ``delta_pct`` NaN."""
    mlps: bool = True
    """Also patch every MLP as a sender (table ``mlp``)."""
    freeze_mlps: bool = False
    """Hold the later MLP outputs at their clean values too (only the direct path to the logits)."""
    patching: Literal["per_example", "mean"] = "per_example"
    """Counterfactual value of a sender: each fact's own counterfactual prompt, or the mean over all
    counterfactual prompts given to :func:`run` (the reference code)."""
    attend_to: Literal["span", "first"] = "span"
    """``attention``: summed over the subject's tokens, or to its first token only (the paper)."""
    projection: Literal["frozen_scale", "raw"] = "frozen_scale"
    """``subject_logit``: frozen-scale logit of the subject's first token, or raw ``⟨o, W_U[tok]⟩``."""
    target: Literal["gold", "top1"] = "gold"
    """Token of the ``iw`` metric: the gold answer's first token or the model's clean top-1."""
    batch_size: Positive = 16
    """Facts per forward (and per recorded run)."""

    PRESETS = {
        "lv": dict(patching="per_example", attend_to="first", projection="raw", freeze_mlps=False),
        "lv_code": dict(patching="mean", attend_to="first", projection="raw", freeze_mlps=False),
    }


def needs_all_facts(config: Config) -> bool:
    """Mean patching averages over every counterfactual prompt: the runner passes the whole dataset."""
    return config.path_patching and config.patching == "mean"


@dataclass(frozen=True)
class ArgumentHeadsResult(MethodResult):
    """Attention, subject logits and path-patching effects of every head for every fact."""

    attention: np.ndarray
    """``[F, layer, head]`` attention from the last position to the subject."""
    subject_logit: np.ndarray
    """``[F, layer, head]`` head output read on the subject's first token."""
    subject_token: np.ndarray
    """``[F]`` the subject's first token id."""
    clean: np.ndarray
    """``[F]`` clean ``iw`` (NaN without path patching)."""
    patched: np.ndarray
    """``[F, layer, head]`` ``iw`` with the head patched (NaN without path patching)."""
    mlp_patched: np.ndarray
    """``[F, layer]`` ``iw`` with the MLP patched (NaN without path patching or MLP senders)."""
    target: np.ndarray
    """``[F]`` the metric's token id (-1 without path patching)."""

    def to_frame(self) -> pd.DataFrame:
        """One row per fact × layer × head.

        Columns ``fact_id``, ``layer``, ``head``, ``attention``, ``subject_logit``, ``clean``,
        ``patched``, ``delta``, ``delta_pct`` (the last four NaN without path patching).
        """
        n_facts, n_layers, n_heads = self.attention.shape
        f, layer, head = (a.reshape(-1) for a in np.indices((n_facts, n_layers, n_heads)))
        clean = np.broadcast_to(self.clean[:, None, None], self.patched.shape)
        frame = pd.DataFrame(
            {
                "fact_id": np.array(self.fact_ids, dtype=object)[f],
                "layer": layer,
                "head": head,
                "attention": self.attention.reshape(-1),
                "subject_logit": self.subject_logit.reshape(-1),
            }
        )
        return pd.concat([frame, _effects(clean.reshape(-1), self.patched.reshape(-1))], axis=1)

    def tables(self) -> dict[str, pd.DataFrame]:
        """``mlp``: one row per fact × layer with ``clean``, ``patched``, ``delta``, ``delta_pct`` of
        the MLP sender (only with path patching and ``mlps``).
        """
        if not (self.config.path_patching and self.config.mlps):
            return {}
        n_facts, n_layers = self.mlp_patched.shape
        f, layer = (a.reshape(-1) for a in np.indices((n_facts, n_layers)))
        frame = pd.DataFrame({"fact_id": np.array(self.fact_ids, dtype=object)[f], "layer": layer})
        clean = np.broadcast_to(self.clean[:, None], self.mlp_patched.shape).reshape(-1)
        return {"mlp": pd.concat([frame, _effects(clean, self.mlp_patched.reshape(-1))], axis=1)}

    def arrays(self) -> dict[str, np.ndarray]:
        """Per fact ``attention`` and ``subject_logit`` ``[layer, head]``; with path patching
        ``delta`` ``[layer, head]`` and, with MLP senders, ``mlp_delta`` ``[layer]``.
        """
        named = {"attention": self.attention, "subject_logit": self.subject_logit}
        if self.config.path_patching:
            named["delta"] = self.patched - self.clean[:, None, None]
            if self.config.mlps:
                named["mlp_delta"] = self.mlp_patched - self.clean[:, None]
        return self.per_fact(**named)

    def summary(self) -> pd.DataFrame:
        """:func:`summary` of this result's facts only."""
        return scores(self.to_frame())


def _effects(clean: np.ndarray, patched: np.ndarray) -> pd.DataFrame:
    delta = patched - clean
    with np.errstate(divide="ignore", invalid="ignore"):
        pct = 100.0 * delta / clean
    return pd.DataFrame({"clean": clean, "patched": patched, "delta": delta, "delta_pct": pct})


# -- run ------------------------------------------------------------------------------------------


def run(model: Model, facts: FactSet | PromptBatch, config: Config | None = None) -> ArgumentHeadsResult:
    """Attention × subject projection of every head, and (by default) path patching of every head
    and MLP to the logits, for every fact.

    Args:
        model: the model.
        facts: a :class:`FactSet` (facts without a counterfactual partner get one from the facts
            themselves; those that still have none are skipped), or a :class:`PromptBatch` when
            ``path_patching=False``.
        config: settings (default :class:`Config`).

    Raises:
        RecallscopeError: path patching on a bare batch, or no fact left to analyse.
    """
    config = config or Config()
    facts, skipped = _usable(facts, config)
    batch = facts.to_batch(model) if isinstance(facts, FactSet) else facts
    keep = [i for i in range(len(batch)) if int(batch.spans["subject"][i, 0]) >= 0]
    skipped += [
        (_fact_id(batch, i), "no subject span in the prompt") for i in range(len(batch)) if i not in keep
    ]
    if not keep:
        raise RecallscopeError(
            "argument_heads has no fact with a subject span to analyse: pass facts with subjects"
        )
    if len(keep) < len(batch):
        batch = batch.select(keep)
        facts = (
            facts.with_facts([facts[i] for i in keep], {"step": "subject"})
            if isinstance(facts, FactSet)
            else None
        )
    attention, subject_logit, tokens = _readouts(model, batch, config)
    n_facts, n_layers, n_heads = len(batch), model.n_layers, model.n_heads
    clean, target = np.full(n_facts, np.nan), np.full(n_facts, -1, dtype=np.int64)
    patched = np.full((n_facts, n_layers, n_heads), np.nan)
    mlp_patched = np.full((n_facts, n_layers), np.nan)
    if config.path_patching:
        values = sender_values(model, counterfactual_facts(facts), config)
        clean, target, patched, mlp_patched = _path_patching(model, batch, values, config)
    return ArgumentHeadsResult(
        config=config,
        fact_ids=[_fact_id(batch, i) for i in range(n_facts)],
        attention=attention,
        subject_logit=subject_logit,
        subject_token=tokens,
        clean=clean,
        patched=patched,
        mlp_patched=mlp_patched,
        target=target,
        provenance=_provenance(model, config),
        skipped=skipped,
    )


def _fact_id(batch: PromptBatch, row: int) -> str:
    return batch.fact_ids[row] if batch.fact_ids else str(row)


def _usable(facts: FactSet | PromptBatch, config: Config) -> tuple[FactSet | PromptBatch, list]:
    """The facts that can be analysed (with a counterfactual partner when path patching) and the skipped."""
    if not len(facts):
        raise RecallscopeError("argument_heads got no facts: pass a FactSet with at least one fact")
    if not config.path_patching:
        return facts, []
    if isinstance(facts, PromptBatch):
        raise RecallscopeError(
            "argument_heads path patching needs counterfactual prompts, which a PromptBatch does not "
            "carry: pass a FactSet (facts of one relation with different subjects and answers), or "
            "set path_patching=False for the attention × subject projection only"
        )
    if any("counterfactual" not in f.attributes for f in facts):
        facts = add_relation_context(facts)
    skipped = [
        (f.fact_id, "no counterfactual partner (no other subject of the relation with another answer)")
        for f in facts
        if "counterfactual" not in f.attributes
    ]
    kept = [f for f in facts if "counterfactual" in f.attributes]
    if not kept:
        raise RecallscopeError(
            "argument_heads path patching found no counterfactual partner for any fact: add facts of "
            "the same relation with other subjects and answers (or add_relation_context with a pool)"
        )
    return facts.with_facts(kept, {"step": "counterfactual partner"}) if skipped else facts, skipped


def _readouts(model: Model, batch: PromptBatch, config: Config) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """L4 per chunk of ``batch_size`` facts: ``attention``, ``subject_logit`` ``[F, L, H]`` and the
    subject's first token ``[F]`` (one eager forward per chunk).
    """
    attention, logits = [], []
    starts = batch.spans["subject"][:, 0].long()
    tokens = batch.input_ids[torch.arange(len(batch)), starts]
    for rows in row_chunks(len(batch), config.batch_size):
        part = batch.select(rows)
        a, s = subject_readouts(model, part, tokens[rows.start : rows.stop], config)
        attention.append(a)
        logits.append(s)
    return np.concatenate(attention), np.concatenate(logits), tokens.numpy()


# -- L3: path patching ------------------------------------------------------------------------------


def _path_patching(model: Model, batch: PromptBatch, values: SenderValues, config: Config):
    """``clean [F]``, ``target [F]``, ``patched [F, L, H]``, ``mlp_patched [F, L]`` of every fact.

    Facts are grouped by prompt length (a recorded run is unpadded), ``batch_size`` per recorded run.
    """
    n_facts, n_layers, n_heads = len(batch), model.n_layers, model.n_heads
    clean, target = np.full(n_facts, np.nan), np.full(n_facts, -1, dtype=np.int64)
    patched = np.full((n_facts, n_layers, n_heads), np.nan)
    mlp_patched = np.full((n_facts, n_layers), np.nan)
    for group in equal_length_rows(batch, config.batch_size):
        length = batch.seq_len - int(batch.pad_lengths[group[0]])
        ids = batch.input_ids[group, batch.seq_len - length :]
        gold = batch.target_ids[group] if batch.target_ids is not None else None
        out = _patch_group(model, ids, gold, values.rows(group), config)
        clean[group], target[group], patched[group], mlp_patched[group] = out
    return clean, target, patched, mlp_patched


def _patch_group(
    model: Model, ids: torch.Tensor, gold: torch.Tensor | None, values: SenderValues, config: Config
):
    """Path patching of the ``G`` unpadded prompts ``ids [G, T]``: one recorded run, one resume per layer."""
    n_groups, n_layers, n_heads = len(ids), model.n_layers, model.n_heads
    held: dict[Site, torch.Tensor] = {}  # clean attn_out / mlp_out at N, [G, d]
    with contextlib.ExitStack() as stack:
        for layer in range(n_layers):
            for name in ("attn_out", "mlp_out"):
                stack.enter_context(
                    site_hook(model, Site(layer, name), last_position_keeper(held, Site(layer, name)))
                )
        state = record_run(model, ids)
    logits = state.logits[:, -1]
    targets = choose_targets(_TargetRows(gold), logits, config.target)
    clean = logit_minus_mean(logits, targets).double()
    n_send = n_heads + int(config.mlps)
    rows = torch.arange(n_groups).repeat_interleave(n_send)  # recorded row each resumed row continues
    patched = torch.empty(n_groups, n_layers, n_send, dtype=torch.float64)
    for layer in range(n_layers):
        with contextlib.ExitStack() as stack:
            for site, fn in sender_edits(model, layer, held, values, n_groups, config):
                stack.enter_context(site_hook(model, site, fn))
            out = resume(
                model,
                state,
                rows,
                start_layer=layer,
                start_pos=state.seq_len - 1,
                hidden=state.stream[rows.to(state.stream.device), layer, -1:],
            )
        metric = logit_minus_mean(out[:, -1], targets.repeat_interleave(n_send)).double().cpu()
        patched[:, layer] = metric.view(n_groups, n_send)
    patched, clean = patched.numpy(), clean.cpu().numpy()
    mlp = patched[:, :, n_heads] if config.mlps else np.full((n_groups, n_layers), np.nan)
    return clean, targets.numpy(), patched[:, :, :n_heads], mlp


@dataclass(frozen=True)
class _TargetRows:
    """The only field of a batch :func:`choose_targets` reads."""

    target_ids: torch.Tensor | None


# -- cost -----------------------------------------------------------------------------------------


def cost(model: Model, batch: PromptBatch | FactSet, config: Config | None = None) -> Cost:
    """Forwards and work of :func:`run` on ``batch``.

    L4: one forward per ``batch_size`` facts. L3: as many for the counterfactual prompts, one
    recorded run per prompt length and ``batch_size`` facts, and per recorded run one resume per
    layer of ``facts × senders`` rows at one position (``Σ_ℓ (L − ℓ)`` blocks each).
    """
    config = config or Config()
    batch = batch.to_batch(model) if isinstance(batch, FactSet) else batch
    n_layers, n_facts = model.n_layers, len(batch)
    real = batch.seq_len - batch.pad_lengths
    tokens = float(real.sum())
    chunks = -(-n_facts // config.batch_size)
    itemsize = max(model.dtype.itemsize, 4)
    group = min(n_facts, config.batch_size)
    forward = forward_floats(model, group, batch.seq_len)
    kept = n_facts * n_layers * model.n_heads * 2
    if not config.path_patching:
        return Cost(chunks, tokens * n_layers, (forward + kept) * itemsize)
    lengths = {int(n): int((real == n).sum()) for n in real.unique()}
    records = sum(-(-count // config.batch_size) for count in lengths.values())
    senders = model.n_heads + int(config.mlps)
    resumed = n_facts * senders * n_layers * (n_layers + 1) / 2
    stream = min(n_facts, config.batch_size) * batch.seq_len * (n_layers + 1) * model.d_model
    kv = 2 * min(n_facts, config.batch_size) * batch.seq_len * n_layers * model.n_kv_heads * model.d_head
    values = n_facts * n_layers * (model.n_heads * model.d_head + model.d_model)
    # a resume: the group's rows × senders at one position, each with its copy of the recorded keys/values
    rows = group * senders
    resume = forward_floats(model, rows, 1) + rows * kv // group
    return Cost(
        2 * chunks + records * (1 + n_layers),
        3 * tokens * n_layers + resumed,
        (max(forward, resume) + stream + kv + values + kept) * itemsize,
        vocab_rows=float(n_facts * senders * n_layers),  # each resumed row's last-position logits
    )


# -- dataset-wide summary -------------------------------------------------------------------------


def _provenance(model: Model, config: Config) -> dict:
    projection = {
        "frozen_scale": "frozen_scale: W_U (γ ⊙ centre(o_h)) / ρ_N of the subject's first token "
        "(final residual of the same forward); no bias, no soft-cap",
        "raw": "raw: ⟨o_h, W_U[subject first token]⟩ (no norm, no bias)",
    }[config.projection]
    patching = {
        "per_example": "each fact's own counterfactual prompt (another subject of the relation)",
        "mean": "mean over all counterfactual prompts given to run (reference code)",
    }[config.patching]
    post = post_norm_note(model)
    return result_provenance(
        model,
        config,
        attention="pattern row of the last position summed over the subject's tokens"
        if config.attend_to == "span"
        else "pattern row of the last position at the subject's first token",
        head_output=f"o_h = z_h W_O[h·d_h:(h+1)·d_h] at the last position{post}; "
        f"kv_head = {model.kv_head_rule()}",
        projection=projection,
        path_patching="off"
        if not config.path_patching
        else (
            "sender = each head's z (and each MLP's mlp_out) at the last position only, set to its "
            f"counterfactual value ({patching}); q/k/v of every head frozen to clean values, realised as "
            "attn_out at the last position of every later layer held clean (resume from the recorded clean "
            "run at block ℓ, last position); "
            + ("later MLP outputs held clean (freeze_mlps)" if config.freeze_mlps else "MLPs recomputed")
            + "; receiver = final logits (model's final norm and soft-cap)"
        ),
        metric="iw = logit[target] − mean logit (Lv L2); delta = patched − clean; "
        "delta_pct = 100·delta/clean",
        target=f"{config.target} (gold = first token of the answer; top1 = clean argmax)",
        layers="block index",
        positions="last",
        bos=model.bos,
    )
