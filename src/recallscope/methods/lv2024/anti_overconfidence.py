"""Anti-overconfidence in the final layer and a label-free mitigation (Lv et al. 2024, L7; ``methods.md`` §1).

**Direct attribution.** Every component ``c`` of the final layer (or of the last ``layers_from_end``
layers) at the last position ``N`` (the paper's ``end``) is read with the final norm's scale frozen on
the final residual of the same forward::

    logit_c = W_U[t] · (γ ⊙ centre(c)) / ρ_N          iw_c = logit_c − mean_v W_U[v] · (γ ⊙ centre(c)) / ρ_N

for the target token ``t`` (the gold answer's first token, or the clean top-1). ``iw`` is the
component's part of Lv et al.'s metric ``ℓ[t] − mean_v ℓ[v]`` (L2); the vocabulary mean of a
frozen-scale linear readout is the readout of the mean unembedding row, so nothing is decoded over
the whole vocabulary. Components: every head ``o^{ℓ,h} = z^{ℓ,h} W_O^{ℓ,h}`` (Gemma-2's attention
post-norm folded in at its actual scale), the attention output bias ``b_O`` (``attn_bias``, when the
model has one), the MLP output ``m^ℓ`` and the ``top_neurons`` neurons ``c_k w_k`` with the largest
``|mean contribution|`` over all facts. Heads + ``attn_bias`` + MLP of a layer sum to its update
(attention + MLP). No bias and no final soft-cap are applied.

**Mitigation fitted on a training split.** Facts are split by a seeded hash of their ``base_id``
(few-shot variants of one fact share it, so they stay on one side) into train and held-out
(:func:`split_facts`). Candidates are the components whose mean logit contribution over the
*train* facts is negative: every such head, the MLP, and the ``top_neurons`` most negative neurons,
most negative first, at most ``max_candidates``. Each candidate × scale in ``scales`` is applied in a
real forward that multiplies the component's output by the scale (a head: its ``z`` slice, so
Gemma-2's post-norm sees the change; the MLP: ``mlp_out``; a neuron: its ``mlp_post`` coefficient)
at every position (``positions="all"``) or at the last one. Train facts are scored by the mean
log-probability of the target; the best cell is the mitigation when it beats the clean model
(scale 1), otherwise the mitigation is ``none``. It is label-free at inference: one component and
one scale for every input. It is evaluated before and after on the held-out split (and on train,
marked): probability, log-probability, top-1 correctness and confidence per fact; accuracy, mean
probability, ECE and Brier score of the target probability per split; the held-out gains with
paired bootstrap intervals; and the perplexity of generic prose (:func:`recallscope.data.builtin.
generic_text`) before and after, with the mitigation at every position.

**Fast by construction.** Facts are grouped by token length (no padding) and recorded once per
group (:func:`recallscope.core.resume.record_run`), keeping ``z``, ``mlp_post``, ``mlp_out`` of the
candidate layers at ``N`` and the input of the first candidate layer. The candidate × scale grid and
the held-out evaluation resume only the last ``layers_from_end`` blocks, from position 0
(``positions="all"``) or only at ``N`` (``"last"``), one row per fact × cell
(:func:`recallscope.core.resume.resume`, exact). With the final layer alone, ``"all"`` and ``"last"``
give the same prompt predictions (a change at an earlier position of the last block never reaches
``N``), so both resume at ``N`` only; they differ for ``layers_from_end > 1`` and for the
perplexity, where every position is predicted. Only the target's covector is decoded.

The paper's experiment notebook is missing from the code snapshot, so the choice of component,
the scale grid and the fitting metric are reconstructions [inf] (``methods.md`` L7).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
import pandas as pd
import torch

from recallscope.core.cache import forward, forward_floats
from recallscope.core.component_attribution import (
    Component,
    component_columns,
    direct_attribution,
    negative_components,
)
from recallscope.core.component_scaling import (
    RecordedChunk,
    check_scales,
    fit_scale_grid,
    prediction_scores,
    resumed_logits,
    scale_components,
    scaled_scores,
    slim_run_state,
)
from recallscope.core.decoding import choose_targets, work_dtype
from recallscope.core.decompose import post_norm_note
from recallscope.core.dtypes import upcast
from recallscope.core.hooks import site_hook
from recallscope.core.resume import equal_length_rows, record_run
from recallscope.core.splits import calibration_metrics, split_facts
from recallscope.core.tokens import PromptBatch, as_batch, encode_prompt
from recallscope.core.vocab import frozen_scale_readout, readout_chunk
from recallscope.data.builtin import generic_text
from recallscope.data.facts import FactSet
from recallscope.errors import RecallscopeError
from recallscope.methods.base import Cost, MethodConfig, MethodResult, result_provenance
from recallscope.methods.hints import DISTINCT, NON_EMPTY, AtLeast, Between, NonNegative, Positive
from recallscope.methods.lv2024.summaries import anti_overconfidence_summary as summary
from recallscope.models.model import Model
from recallscope.models.sites import Site
from recallscope.stats import bootstrap_ci, paired_bootstrap_ci

__all__ = [
    "NAME",
    "DESCRIPTION",
    "CHUNK_SIZE",
    "Config",
    "Component",
    "AntiOverconfidenceResult",
    "needs_all_facts",
    "run",
    "cost",
    "split_facts",
    "summary",
]

NAME = "anti_overconfidence"
DESCRIPTION = (
    "Final-layer components that lower the answer, and a label-free down-weighting of one of them "
    "fitted on a train split (Lv et al.)."
)
CHUNK_SIZE = 256
"""Unused by the runner (the method needs every fact at once, :func:`needs_all_facts`)."""

# moved to recallscope.core.component_scaling; the old private names stay for the tests
_scaled, _resumed_logits, _scores = scale_components, resumed_logits, prediction_scores


@dataclass(frozen=True, kw_only=True)
class Config(MethodConfig):
    """Attribution, split, fit and evaluation settings of the anti-overconfidence analysis.

    Preset ``lv``: the paper's setting as far as ``methods.md`` L7 reconstructs it (the component
    zeroed or down-weighted at ``end``); the released code has no notebook for it, so there is no
    ``lv_code``.
    """

    target: Literal["gold", "top1"] = "gold"
    """Token attributed and scored: the gold answer's first token or the clean top-1."""
    layers_from_end: Positive = 1
    """Candidate layers: the last ``k`` blocks (1 = the final layer only)."""
    top_neurons: NonNegative = 10
    """Neurons per layer kept in the frame (largest ``|mean logit|`` over all facts), and the number
    of most negative train neurons per layer offered as candidates."""
    train_fraction: Annotated[float, Between(0, 1, low_open=True, high_open=True)] = 0.5
    """Share of the split groups (``base_id``) that go to the training split."""
    seed: NonNegative = 0
    """Seed of the split hash and of the bootstrap."""
    split_by: Literal["base_id", "fact_id"] = "base_id"
    """Split unit: ``base_id`` keeps few-shot variants of one fact together; ``fact_id`` splits facts.
    (A :class:`PromptBatch` carries no ``base_id``: its fact ids are used.)"""
    max_candidates: Positive = 8
    """At most this many candidates (most negative train mean first)."""
    scales: Annotated[tuple[Annotated[float, AtLeast(0)], ...], NON_EMPTY, DISTINCT] = (0.0, 0.25, 0.5, 0.75)
    """Multipliers tried for each candidate's output (0 removes it; 1 is the clean model)."""
    positions: Literal["all", "last"] = "all"
    """Where the mitigation scales the component: every position or the last (``end``) only."""
    bins: Positive = 10
    """Equal-width confidence bins of the ECE."""
    bootstrap: Positive = 2000
    """Paired bootstrap resamples of the held-out gains' 95% intervals."""
    batch_size: Positive = 16
    """Facts per recorded forward; a resumed grid call holds at most ``batch_size × len(scales)`` rows."""
    perplexity: bool = True
    """Measure the perplexity of the built-in generic text before and after."""
    ppl_window: Annotated[int, AtLeast(2)] = 512
    """Tokens per perplexity window (at most the model's context)."""

    PRESETS = {
        "lv": dict(
            target="gold",
            layers_from_end=1,
            top_neurons=10,
            max_candidates=8,
            scales=(0.0, 0.25, 0.5, 0.75),
            positions="last",
        ),
    }

    def __post_init__(self) -> None:
        object.__setattr__(self, "train_fraction", float(self.train_fraction))
        object.__setattr__(self, "scales", check_scales(self.scales))  # one store hash for 0 and 0.0


def needs_all_facts(config: Config | None = None) -> bool:
    """Always true: the mitigation is fitted on a train split and evaluated on the held-out facts."""
    return True


@dataclass(frozen=True)
class AntiOverconfidenceResult(MethodResult):
    """Direct attributions of the final-layer components, the fitted mitigation and its evaluation."""

    split: list[str]
    """``[F]`` ``train`` or ``heldout``."""
    components: list[Component]
    logit: np.ndarray
    """``[F, component]`` contribution to the target's logit."""
    iw: np.ndarray
    """``[F, component]`` contribution to the target's logit minus the vocabulary mean."""
    facts: pd.DataFrame
    fit: pd.DataFrame
    mitigation: pd.DataFrame
    perplexity: pd.DataFrame

    def to_frame(self) -> pd.DataFrame:
        """One row per fact × component.

        Columns ``fact_id``, ``split``, ``component`` (``head 3``, ``attn_bias``, ``mlp``,
        ``neuron 1234``), ``kind``, ``layer``, ``index`` (-1 for attn_bias and mlp), ``logit``, ``iw``.
        """
        F, C = self.logit.shape
        f = np.repeat(np.arange(F), C)
        c = np.tile(np.arange(C), F)
        return pd.DataFrame(
            {
                "fact_id": np.array(self.fact_ids, dtype=object)[f],
                "split": np.array(self.split, dtype=object)[f],
                "component": np.array([x.label for x in self.components], dtype=object)[c],
                "kind": np.array([x.kind for x in self.components], dtype=object)[c],
                "layer": np.array([x.layer for x in self.components], dtype=np.int64)[c],
                "index": np.array([x.index for x in self.components], dtype=np.int64)[c],
                "logit": self.logit.reshape(-1),
                "iw": self.iw.reshape(-1),
            }
        )

    def tables(self) -> dict[str, pd.DataFrame]:
        """``facts`` (per fact), ``fit`` (train grid), ``mitigation`` (one row) and ``perplexity``."""
        return {
            "facts": self.facts,
            "fit": self.fit,
            "mitigation": self.mitigation,
            "perplexity": self.perplexity,
        }

    def arrays(self) -> dict[str, np.ndarray]:
        """``"<fact_id>/logit"`` and ``"<fact_id>/iw"`` → ``[component]`` in frame order."""
        return self.per_fact(logit=self.logit, iw=self.iw)

    def summary(self) -> pd.DataFrame:
        """:func:`summary` of this result."""
        return summary(self.to_frame(), self.tables())


# -- run --------------------------------------------------------------------------------------------


def run(model: Model, facts: FactSet | PromptBatch, config: Config | None = None) -> AntiOverconfidenceResult:
    """Attribute, fit the mitigation on the train split and evaluate it, over every fact at once."""
    config = config or Config()
    batch = as_batch(model, facts)
    if not len(batch):
        raise RecallscopeError("anti_overconfidence got no facts: pass a FactSet with at least 4 facts")
    fact_ids = list(batch.fact_ids or map(str, range(len(batch))))
    train = split_facts(_split_keys(facts, fact_ids, config.split_by), config.train_fraction, config.seed)
    start_layer = model.n_layers - min(config.layers_from_end, model.n_layers)
    chunks, parts, before = [], [], []
    for rows in map(np.asarray, equal_length_rows(batch, config.batch_size)):
        chunk, attribution, scores = _record(model, batch, rows, start_layer, config)
        chunks.append(chunk)
        parts.append(attribution)
        before.append(scores)
    order = np.argsort(np.concatenate([c.rows for c in chunks]), kind="stable")
    attribution = {k: np.concatenate([p[k] for p in parts])[order] for k in parts[0]}
    before = {k: np.concatenate([s[k] for s in before])[order] for k in before[0]}
    candidates = negative_components(model, attribution, train, start_layer, config)
    components, logit, iw = component_columns(model, attribution, start_layer, candidates, config)
    fit, choice = fit_scale_grid(model, chunks, train, before, candidates, start_layer, config)
    after = scaled_scores(model, chunks, choice, start_layer, config) if choice else dict(before)
    last = [i for i, c in enumerate(components) if c.layer == model.n_layers - 1 and c.kind != "neuron"]
    final_logit = logit[:, last].sum(1)
    perplexity = _perplexity(model, choice, config) if config.perplexity else _empty_perplexity()
    facts_table = _facts_table(fact_ids, train, final_logit, logit[:, last], iw[:, last], before, after)
    return AntiOverconfidenceResult(
        config=config,
        fact_ids=fact_ids,
        split=["train" if t else "heldout" for t in train],
        components=components,
        logit=logit,
        iw=iw,
        facts=facts_table,
        fit=fit,
        mitigation=_mitigation_table(facts_table, fit, choice, candidates, perplexity, config),
        perplexity=perplexity,
        provenance=_provenance(model, config, candidates, choice, len(fact_ids), int(train.sum())),
    )


def cost(model: Model, batch: PromptBatch | FactSet, config: Config | None = None) -> Cost:
    """Recorded forwards of the facts, the resumed grid and evaluation, and two perplexity passes."""
    config = config or Config()
    batch = as_batch(model, batch)
    lengths = batch.attention_mask.sum(-1).tolist()
    n_records = sum(math.ceil(lengths.count(n) / config.batch_size) for n in set(lengths))
    k = min(config.layers_from_end, model.n_layers)
    every = config.positions == "all" and k > 1  # else only N is resumed (see _record)
    resumed = float(sum(lengths)) if every else float(len(lengths))
    n_train = config.train_fraction * len(batch)
    cells = config.max_candidates * len(config.scales)
    grid_calls = math.ceil(n_train * cells / (config.batch_size * len(config.scales)))
    text = 2 * len(encode_prompt(model, generic_text())[0]) if config.perplexity else 0  # before, after
    work = float(sum(lengths) * model.n_layers) + (n_train / max(len(batch), 1) * cells + 1) * resumed * k
    work += text * model.n_layers
    rows = config.batch_size * len(config.scales)
    kept = len(batch) * batch.seq_len * (1 + 2 * k * model.n_kv_heads * model.d_head / model.d_model)
    peak = kept * model.d_model + rows * model.d_vocab + rows * batch.seq_len * 6 * model.d_model
    if config.perplexity:  # a window's logits at every position, read a chunk at a time
        window = min(text // 2, config.ppl_window, model.max_context or config.ppl_window)
        peak = max(
            peak, forward_floats(model, 1, window, logits=window) + 2 * readout_chunk(model) * model.d_vocab
        )
    peak *= 4
    forwards = n_records + grid_calls + n_records + (2 if config.perplexity else 0)
    readouts = text + n_train * cells + 2 * len(batch)  # perplexity tokens, grid rows, fit and evaluation
    return Cost(forwards, work, int(peak * max(model.dtype.itemsize, 4) / 4), vocab_rows=float(readouts))


def _split_keys(facts, fact_ids: list[str], split_by: str) -> list[str]:
    if split_by == "base_id" and isinstance(facts, FactSet):
        return [str(f.attributes.get("base_id", f.fact_id)) for f in facts]
    return fact_ids


# -- recording and attribution -------------------------------------------------------------------


def _record(model: Model, batch: PromptBatch, rows: np.ndarray, start_layer: int, config: Config):
    """Record one chunk; return the chunk, its attributions and its clean scores."""
    length = int(batch.attention_mask[rows[0]].sum())
    ids = batch.input_ids[torch.as_tensor(rows)][:, batch.seq_len - length :]  # unpadded [R, T]
    saved: dict = {}

    def keep(key):
        def save(act):
            saved[key] = act[:, -1].detach().to(work_dtype(model))

        return save

    layers = range(start_layer, model.n_layers)
    with contextlib.ExitStack() as stack:
        for layer in layers:
            for name in ("z", "mlp_out", "mlp_post"):
                stack.enter_context(site_hook(model, Site(layer, name), keep((name, layer))))
        state = record_run(model, ids)
    logits = upcast(state.logits[:, -1])  # [R, V]
    targets = choose_targets(batch.select(rows), logits, config.target)
    final = state.stream[:, -1, -1].to(work_dtype(model))  # [R, d]
    attribution = direct_attribution(model, saved, layers, final, targets)
    # Only the last position's prediction is scored. A component scaled at earlier positions of the
    # final block reaches only those positions' outputs, so with one candidate layer "all" resumes
    # like "last" (exactly the same computation at N); with more layers it must rerun every position.
    start_pos = 0 if config.positions == "all" and start_layer < model.n_layers - 1 else length - 1
    slim = slim_run_state(state, start_layer, start_pos)
    hidden = state.stream[:, start_layer, start_pos:].clone()
    return RecordedChunk(rows, slim, hidden, targets), attribution, prediction_scores(logits, targets)


def _perplexity(model: Model, choice, config: Config) -> pd.DataFrame:
    """Per window of the generic text: tokens scored and mean negative log-likelihood before and after
    (the mitigation at every position).
    """
    if model.tokenizer is None:
        return _empty_perplexity()
    ids = torch.tensor(encode_prompt(model, generic_text())[0])
    size = min(config.ppl_window, model.max_context or config.ppl_window)
    rows = []
    for w, start in enumerate(range(0, len(ids), size)):
        window = ids[start : start + size]
        if len(window) < 2:
            continue
        nll = []
        for cells in ([None], [choice]) if choice else ([None],):
            with scale_components(model, cells):  # one pass's logits held at a time
                nll.append(_nll(model, forward(model, window[None], logits="all")[0, :-1], window[1:]))
        nll = nll * (3 - len(nll))  # no mitigation: after = before
        rows.append(dict(window=w, n_tokens=len(window) - 1, nll_before=nll[0], nll_after=nll[1]))
    return pd.DataFrame(rows, columns=_PPL_COLUMNS)


def _nll(model: Model, logits: torch.Tensor, targets: torch.Tensor) -> float:
    """``Σ −log p(target)`` of ``logits [T, V]``, a readout chunk of positions at a time (no second
    ``[T, V]`` buffer).
    """
    step, targets = readout_chunk(model), targets.to(logits.device)
    return sum(
        float(-upcast(logits[i : i + step]).log_softmax(-1).gather(-1, targets[i : i + step, None]).sum())
        for i in range(0, len(logits), step)
    )


_PPL_COLUMNS = ["window", "n_tokens", "nll_before", "nll_after"]


def _empty_perplexity() -> pd.DataFrame:
    return pd.DataFrame(
        {c: pd.Series([], dtype=np.int64 if c in ("window", "n_tokens") else float) for c in _PPL_COLUMNS}
    )


# -- tables ---------------------------------------------------------------------------------------


_SCORES = ("prob", "log_prob", "correct", "confidence")


def _facts_table(fact_ids, train, final_logit, last_logit, last_iw, before, after) -> pd.DataFrame:
    table = pd.DataFrame(
        {
            "fact_id": fact_ids,
            "split": np.where(train, "train", "heldout"),
            "final_layer_logit": final_logit,
            "final_layer_iw": last_iw.sum(1),
            "lowers": (final_logit < 0).astype(float),
        }
    )
    for name in _SCORES:
        table[f"{name}_before"] = before[name]
        table[f"{name}_after"] = after[name]
    return table


def _mitigation_table(facts, fit, choice, candidates, perplexity, config) -> pd.DataFrame:
    held, train = facts[facts.split == "heldout"], facts[facts.split == "train"]
    component, scale = choice if choice else (None, 1.0)
    row = {
        "component": component.label if component else "none",
        "kind": component.kind if component else "none",
        "layer": component.layer if component else -1,
        "index": component.index if component else -1,
        "scale": scale,
        "positions": config.positions,
        "n_candidates": len(candidates),
        "n_train": len(train),
        "n_heldout": len(held),
        "train_log_prob_before": float(train.log_prob_before.mean()),
        "train_log_prob_after": float(train.log_prob_after.mean()),
        "train_gain": float(train.log_prob_after.mean() - train.log_prob_before.mean()),
    }
    for when in ("before", "after"):
        row.update(calibration_metrics(held, when, config.bins))
    boot = dict(n_boot=config.bootstrap, seed=config.seed)
    for name, column in (("accuracy", "correct"), ("mean_prob", "prob"), ("log_prob", "log_prob")):
        gain, low, high = paired_bootstrap_ci(held[f"{column}_before"], held[f"{column}_after"], **boot)
        row.update({f"{name}_gain": gain, f"{name}_gain_low": low, f"{name}_gain_high": high})
    for when in ("before", "after"):
        tokens = perplexity.n_tokens.sum()
        row[f"perplexity_{when}"] = (
            float(np.exp(perplexity[f"nll_{when}"].sum() / tokens)) if tokens else np.nan
        )
    low, high = bootstrap_ci(facts.lowers, **boot)
    row.update(lowers_fraction=float(facts.lowers.mean()), lowers_low=low, lowers_high=high)
    return pd.DataFrame([row])


def _provenance(model: Model, config: Config, candidates, choice, n_facts: int, n_train: int) -> dict:
    post = post_norm_note(model)
    return result_provenance(
        model,
        config,
        projection="frozen_scale (final residual of the same forward)",
        readout=frozen_scale_readout(covector="W_U[t] ·", detail="target covector only"),
        iw="logit − mean over the vocabulary (readout of the mean unembedding row); Lv et al. L2",
        components=f"last {config.layers_from_end} block(s): heads o_h = z_h W_O[h] (input columns){post}; "
        "attn_bias = b_O (when present); mlp = mlp_out; top neurons c_k w_k by |mean logit| over all facts",
        targets="gold answer's first token" if config.target == "gold" else "clean top-1 token",
        split=f"{config.split_by} ranked by sha256('{config.seed}:<key>'); first round(train_fraction × "
        f"n_keys) = train (train_fraction={config.train_fraction}); {n_train} of {n_facts} facts train",
        candidates="train-mean logit < 0: heads, mlp, and the "
        f"{config.top_neurons} most negative neurons per layer; most negative first, at most "
        f"{config.max_candidates}: " + ", ".join(f"{c.layer}.{c.label} ({m:.4g})" for c, m in candidates),
        intervention=f"output × scale for scales {list(config.scales)} (head: z slice; mlp: mlp_out; "
        f"neuron: mlp_post coefficient) at positions={config.positions}; real forward, the candidate "
        "layers resumed from the recorded input (exact)",
        fitting_metric="mean log-probability of the target over the train facts; the best cell must beat "
        "scale 1 (the clean model), else the mitigation is none",
        mitigation="none" if choice is None else f"{choice[0].layer}.{choice[0].label} × {choice[1]}",
        evaluation=f"held-out split; ECE with {config.bins} equal-width bins of top-1 confidence; Brier = "
        f"mean (1 − p_target)²; gains after − before with paired bootstrap 95% intervals "
        f"({config.bootstrap} resamples, seed {config.seed}); lowers_fraction over all facts",
        perplexity=f"built-in generic_text, windows of ≤ {config.ppl_window} tokens (and the model's "
        "context), mitigation at every position"
        if config.perplexity
        else "not measured",
        layers="block index",
        positions="last (prediction position) for attribution",
        bos=model.bos,
    )
