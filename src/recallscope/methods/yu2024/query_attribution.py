"""Query attribution: what activates the top value neurons and units (Yu & Ananiadou, ``methods.md`` Y&A-6).

A subvalue is *activated* by its coefficient, which is (close to) an inner product of a key with the
normalized residual. The residual is a sum of earlier components, so the inner product splits over
them. Per fact, with value rows (the top FFN neurons and attention units by log-probability
increase ``Imp``, Y&A-4/5 from :mod:`~recallscope.methods.yu2024.logprob_attribution`):

(a) ``ffn_value``: for each of the top ``n_value_neurons`` FFN neurons ``(ℓ, k)``, the components
    of the residual its MLP reads at the last position ``N``: ``embed`` (``x^0``, with learned
    positions) then ``A^0, F^0, …, A^{ℓ-1}, F^{ℓ-1}, A^ℓ`` (parallel blocks read ``x^ℓ``: no
    ``A^ℓ``). Component ``c`` gets ``share_c = (c·key) / Σ_c' (c'·key)``, and ``share_c · Imp(ℓ, k)``
    is summed over the neurons into a score per component (``2L + 1`` labels ``embed``,
    ``0.attn_out``, ``0.mlp_out``, …).
(b) ``attn_unit``: the same for the top ``n_value_units`` attention units ``(ℓ, h, n, j)``, with the
    key ``W_V^ℓ[kv(h)][:, n] ⊙ γ_1`` (block ℓ's pre-attention norm gain) and the components
    ``embed_j, A^0_j, …, F^{ℓ-1}_j`` at the unit's **source** position ``j``.
(c) query FFN neurons: every earlier FFN subvalue at ``j`` (layer ``i < ℓ``, neuron ``k``) scores
    ``(c^i_{k,j} w^i_k · key) / (x^ℓ_j · key) · Imp(unit)``, summed over the top units; the top
    ``n_query_neurons`` per fact are listed, flagged when they are also among the fact's top
    ``n_query_neurons`` value neurons ("query-and-value" vs "query-only"). These shares do not
    sum to 1: the denominator is the whole residual (embedding, attention, biases included).
(d) for the top ``n_show`` query neurons: the top tokens of the neuron's value vector ``w_k`` after
    the OV map of the head whose unit contributed most to its score (``W_O^h W_V^h ln_1(w_k)``,
    :func:`~recallscope.core.decompose.ov_outputs`), next to the top tokens of ``w_k``.

FFN keys (``ffn_key``; §3.6 pitfall 1): ``linearized`` (default) is the gradient of ``c_k`` with
respect to the MLP's input residual at the actual input with the norm's scale frozen,
``(γ_2/ρ_2) ⊙ ∇_x̃ c_k`` with ``∇ = act'(g·x̃+b_g)(u·x̃+b_u) g + act(g·x̃+b_g) u`` (gated) or
``act'(κ·x̃+b) κ`` (plain), using the model's own activation function; ``input_row`` is ``κ ⊙ γ_2``
(``up_proj`` row for gated MLPs), ``gate_row`` the gate row ``⊙ γ_2``, ``value`` the output vector
``w_k ⊙ γ_2`` (what the Llama notebook does), ``as_coded`` = ``value`` for gated MLPs and
``input_row`` otherwise (the ``yu`` preset). For plain MLPs ``linearized`` and ``input_row`` give the
same shares (the gradient is a multiple of the row). Pre-activations are recomputed from the
residual with the norm in at least float32 (HF's RMSNorm rounds through float32 even in float64).

LayerNorm models subtract the mean before normalizing, so with ``centre=True`` (default) every
inner product uses the centred key (``c · centre(key) = centre(c) · key``); ``centre=False`` is the
paper's plain inner product (§3.6 pitfall 2). Gemma-2's components are its post-normed outputs
(``attn_out`` / ``mlp_out``) and its FFN subvalues fold the post-norm in with its actual scale.
Shares can explode when the denominator nearly cancels: a neuron or unit with
``|Σ c·key| < guard · Σ |c·key|`` is skipped and counted (``n_unstable``).

The core, :func:`query_scores`, takes the value rows as tables, so any ranking can be analysed;
:func:`run` gets them from :mod:`~recallscope.methods.yu2024.logprob_attribution`. Fast by construction:
one forward per ``max_batch_rows`` facts caches every component at every position, then each
analysis is a few gathers and matmuls over all facts' rows at once (the kernels are in
:mod:`recallscope.core.query_keys`). The naive loops over neurons, units and components (one
unpadded prompt at a time) are in ``tests/oracles`` and give the same numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Annotated, Literal

import numpy as np
import pandas as pd
import torch

from recallscope.core.dtypes import compute_dtype
from recallscope.core.query_keys import (
    NEURON_COLUMNS,
    UNIT_COLUMNS,
    attn_unit_scores,
    check_rows,
    chunk_rows,
    component_cache,
    ffn_value_scores,
    ov_tokens,
    query_neuron_scores,
    ranked_scores,
    with_fact_ids,
)
from recallscope.core.tokens import PromptBatch, as_batch
from recallscope.core.vocab import decode_tokens, readout_floats
from recallscope.data.facts import FactSet
from recallscope.errors import RecallscopeError
from recallscope.methods.base import Cost, Given, MethodConfig, MethodResult, result_provenance
from recallscope.methods.hints import Between, NonNegative, Positive
from recallscope.models.model import Model
from recallscope.stats import mean_ci

__all__ = [
    "NAME",
    "DESCRIPTION",
    "Config",
    "QueryAttributionResult",
    "run",
    "cost",
    "requires",
    "query_scores",
    "component_labels",
    "FFN_KEYS",
    "ANALYSES",
]

NAME = "query_attribution"
LOGPROB = "logprob_attribution"
DESCRIPTION = "Layers and FFN neurons that activate the top value neurons and units (Yu & Ananiadou)."
CHUNK_SIZE = 16
FFN_KEYS = ("linearized", "input_row", "gate_row", "value", "as_coded")
ANALYSES = ("ffn_value", "attn_unit")


@dataclass(frozen=True, kw_only=True)
class Config(MethodConfig):
    """Query-attribution settings; ``yu`` is the reference notebooks' behaviour."""

    target: Literal["top1", "gold"] = "top1"
    """Token the value rows are scored on (passed to ``logprob_attribution``): the model's top-1 (paper)."""
    bias: bool = True
    """Frozen head with ``W_U β + b_U`` when scoring the value rows (``yu``: False, the paper drops it)."""
    n_value_neurons: NonNegative = 30
    """Top FFN value neurons per fact whose query layers are found (a)."""
    n_value_units: NonNegative = 30
    """Top attention value units per fact whose query layers and query neurons are found (b, c)."""
    n_query_neurons: NonNegative = 300
    """Query FFN neurons kept per fact (c); also how many top value neurons they are compared with."""
    n_show: NonNegative = 10
    """Top query neurons whose value vector is decoded through the head's OV map (d)."""
    n_tokens: Positive = 10
    """Tokens listed per decoded vector."""
    ffn_key: Literal["linearized", "input_row", "gate_row", "value", "as_coded"] = "linearized"
    """FFN neuron key: the frozen-norm gradient of ``c_k`` (default), a weight row, or ``as_coded``."""
    centre: bool = True
    """LayerNorm models: inner products with the centred key (the norm subtracts the mean)."""
    guard: Annotated[float, Between(0, 1, high_open=True)] = 1e-3
    """Skip a row when ``|Σ c·key| < guard · Σ |c·key|`` (its shares would explode)."""
    max_batch_rows: Positive = 16
    """Facts per cached forward (memory bound; passed to ``logprob_attribution`` too)."""

    PRESETS = {"yu": dict(ffn_key="as_coded", centre=False, bias=False, target="top1")}


@dataclass(frozen=True)
class QueryAttributionResult(MethodResult):
    """Per-component query scores ``[fact, component]`` and the ranked query FFN neurons per fact."""

    components: list[str]
    """``2L + 1`` labels: ``embed``, ``0.attn_out``, ``0.mlp_out``, …, ``{L-1}.mlp_out``."""
    ffn_value_scores: np.ndarray
    """``[fact, 2L + 1]`` (a): Σ over the top value neurons of ``share_c · Imp``."""
    attn_unit_scores: np.ndarray
    """``[fact, 2L + 1]`` (b): Σ over the top attention units of ``share_c · Imp``."""
    query_score: np.ndarray
    """``[fact, L, d_mlp]`` (c): Σ over the top units of each earlier FFN subvalue's share × Imp."""
    n_value_neurons: np.ndarray
    """``[fact]`` value neurons analysed (unstable ones included)."""
    n_value_units: np.ndarray
    """``[fact]`` value units analysed (unstable ones included)."""
    n_unstable: np.ndarray
    """``[fact, 3]`` rows skipped by the guard in (a), (b) and (c)."""
    query_neurons: pd.DataFrame
    """The top query neurons: ``fact_id, rank, layer, neuron, score, also_value_neuron, head_layer,
    head, ov_top_tokens, value_top_tokens`` (the last four for the top ``n_show``; ``-1`` / None else)."""
    value_neurons: pd.DataFrame
    """The value rows used in (a): ``fact_id, layer, neuron, imp``."""
    value_units: pd.DataFrame
    """The value rows used in (b, c): ``fact_id, layer, head, dim, src_pos, imp`` (``src_pos`` from
    the start of the prompt)."""
    target_ids: np.ndarray | None = None
    """``[fact]`` the token the value rows were scored on (when known)."""
    target_tokens: list[str] | None = None

    def to_frame(self) -> pd.DataFrame:
        """One row per fact × analysis (``ffn_value``, ``attn_unit``) × component."""
        scores = np.stack([self.ffn_value_scores, self.attn_unit_scores], 1)  # [F, 2, C]
        f, a, c = (x.reshape(-1) for x in np.indices(scores.shape))
        layer, sublayer = _component_parts(len(self.components))
        return pd.DataFrame(
            {
                "fact_id": np.array(self.fact_ids, dtype=object)[f],
                "analysis": np.array(ANALYSES, dtype=object)[a],
                "component": np.array(self.components, dtype=object)[c],
                "component_layer": layer[c],
                "sublayer": sublayer[c],
                "score": scores.reshape(-1),
                "n_unstable": self.n_unstable[f, a],
            }
        )

    def tables(self) -> dict[str, pd.DataFrame]:
        """``query_neurons`` (ranked, decoded for the top ones) and a per-fact ``summary`` of counts."""
        also = self.query_neurons.groupby("fact_id", sort=False)["also_value_neuron"]
        n_both = also.sum().reindex(self.fact_ids, fill_value=0).to_numpy()
        n_query = also.size().reindex(self.fact_ids, fill_value=0).to_numpy()
        summary = pd.DataFrame(
            {
                "fact_id": self.fact_ids,
                "n_query_neurons": n_query,
                "n_query_and_value": n_both,
                "n_query_only": n_query - n_both,
                "n_value_neurons": self.n_value_neurons,
                "n_value_units": self.n_value_units,
                "n_unstable_ffn_value": self.n_unstable[:, 0],
                "n_unstable_attn_unit": self.n_unstable[:, 1],
                "n_unstable_query": self.n_unstable[:, 2],
            }
        )
        return {"query_neurons": self.query_neurons, "summary": summary}

    def summary(self) -> pd.DataFrame:
        """Per analysis × component, the query score: means over facts with
        95% normal-approximation bands (``*_ci``) and ``n``.
        """
        return mean_ci(self.to_frame(), ["analysis", "component", "component_layer", "sublayer"], ["score"])

    def arrays(self) -> dict[str, np.ndarray]:
        """Per fact ``ffn_value_scores``, ``attn_unit_scores`` ``[2L+1]``, ``query_score`` ``[L, d_mlp]``."""
        named = {}
        for i, fact in enumerate(self.fact_ids):
            named[f"{fact}/ffn_value_scores"] = self.ffn_value_scores[i]
            named[f"{fact}/attn_unit_scores"] = self.attn_unit_scores[i]
            named[f"{fact}/query_score"] = self.query_score[i]
        return named


def component_labels(n_layers: int) -> list[str]:
    """``["embed", "0.attn_out", "0.mlp_out", …, f"{n_layers-1}.mlp_out"]`` (``2L + 1`` labels)."""
    return ["embed"] + [f"{i}.{s}" for i in range(n_layers) for s in ("attn_out", "mlp_out")]


def _component_parts(n_components: int) -> tuple[np.ndarray, np.ndarray]:
    """Block (``-1`` for the embedding) and sublayer (``embed`` / ``attn`` / ``mlp``) of each component."""
    index = np.arange(n_components)
    layer = np.where(index == 0, -1, (index - 1) // 2)
    sublayer = np.where(index == 0, "embed", np.where(index % 2 == 1, "attn", "mlp")).astype(object)
    return layer, sublayer


# -- run: value rows from logprob_attribution ---------------------------------------------------------


def run(
    model: Model,
    batch: PromptBatch | FactSet,
    config: Config | None = None,
    given: dict[str, Given] | None = None,
) -> QueryAttributionResult:
    """Score the value rows with ``logprob_attribution``, then find their query layers and neurons.

    ``given``: the required ``logprob_attribution`` (:func:`requires`) as the runner hands it over;
    computed here when absent.
    """
    config = config or Config()
    _check_two_updates(model)
    batch = as_batch(model, batch)
    values = Given.obtain(LOGPROB, requires(config)[LOGPROB], model, batch, given)
    row_of = {fact: i for i, fact in enumerate(batch.fact_ids or map(str, range(len(batch))))}
    rows = [row_of[fact] for fact in values.fact_ids]
    kept = batch.select(rows)
    neurons, units, known = value_rows(values, kept, config)
    result = query_scores(model, kept, neurons, units, config, known_value=known)
    target_ids = np.concatenate([values.array(fact, "target_id") for fact in values.fact_ids])
    return replace(
        result,
        fact_ids=list(values.fact_ids),
        target_ids=target_ids,
        target_tokens=decode_tokens(model, torch.as_tensor(target_ids)),
        skipped=[tuple(s) for s in values.skipped],
    )


def requires(config: Config) -> dict[str, dict]:
    """``logprob_attribution``: neurons and attention units on the same target and head, ranked
    exactly as deep as the value rows and query neurons go.
    """
    n_top = max(config.n_value_neurons, config.n_value_units, config.n_query_neurons, 1)
    return {
        LOGPROB: dict(
            levels=("neuron", "attn_unit"),
            n_top=n_top,
            target=config.target,
            bias=config.bias,
            max_batch_rows=config.max_batch_rows,
        )
    }


def value_rows(
    values: Given, batch: PromptBatch, config: Config
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The value rows of a ``logprob_attribution`` result whose facts are the rows of ``batch``.

    Returns:
        ``neurons`` (``fact_row, layer, neuron, imp``: the top ``n_value_neurons``), ``units``
        (``fact_row, layer, head, dim, src, imp``: the top ``n_value_units``, ``src`` absolute in the
        padded batch) and ``known`` (the top ``n_query_neurons`` value neurons, compared with the
        query neurons).
    """
    tables = values.tables
    row_of = {fact: i for i, fact in enumerate(values.fact_ids)}
    top = tables["neurons"][tables["neurons"]["end"] == "top"].sort_values(["fact_id", "rank"], kind="stable")
    top = top.assign(fact_row=top["fact_id"].map(row_of), imp=top["logprob_increase"])
    units = tables["attn_units"][tables["attn_units"]["end"] == "top"]
    units = units.sort_values(["fact_id", "rank"], kind="stable")
    pads = batch.pad_lengths.numpy()
    units = units.assign(fact_row=units["fact_id"].map(row_of), imp=units["logprob_increase"])
    units = units.assign(src=units["src_pos"].to_numpy() + pads[units["fact_row"].to_numpy()])
    neurons = top[top["rank"] <= config.n_value_neurons]
    known = top[top["rank"] <= config.n_query_neurons]
    units = units[units["rank"] <= config.n_value_units]
    return (
        neurons[list(NEURON_COLUMNS)].reset_index(drop=True),
        units[list(UNIT_COLUMNS)].reset_index(drop=True),
        known[["fact_row", "layer", "neuron"]].reset_index(drop=True),
    )


# -- the core ---------------------------------------------------------------------------------------------


def query_scores(
    model: Model,
    batch: PromptBatch,
    value_neurons: pd.DataFrame,
    value_units: pd.DataFrame,
    config: Config | None = None,
    *,
    known_value: pd.DataFrame | None = None,
) -> QueryAttributionResult:
    """Query layers (a, b), query neurons (c) and their OV tokens (d) for given value rows.

    Args:
        batch: the facts (left-padded).
        value_neurons: FFN value neurons, columns ``fact_row, layer, neuron, imp`` (every row is
            used; ``fact_row`` indexes ``batch``).
        value_units: attention value units, columns ``fact_row, layer, head, dim, src, imp`` with
            ``src`` the source position in the padded batch.
        known_value: ``fact_row, layer, neuron`` of the fact's value neurons the query neurons are
            compared with (default: ``value_neurons``).
    """
    config = config or Config()
    _check_two_updates(model)
    known_value = value_neurons if known_value is None else known_value
    check_rows(model, batch, value_neurons, NEURON_COLUMNS, "value_neurons")
    check_rows(model, batch, value_units, UNIT_COLUMNS, "value_units")
    parts = []
    for start in range(0, len(batch), config.max_batch_rows):
        rows = range(start, min(len(batch), start + config.max_batch_rows))
        neurons, units = chunk_rows(value_neurons, rows), chunk_rows(value_units, rows)
        parts.append(_chunk(model, batch.select(list(rows)), neurons, units, config))
    merged = {k: torch.cat([p[k] for p in parts]).cpu() for k in parts[0] if k != "shown"}
    shown = [s for p in parts for s in p["shown"]]
    fact_ids = list(batch.fact_ids or map(str, range(len(batch))))
    pads = batch.pad_lengths.numpy()
    return QueryAttributionResult(
        config=config,
        fact_ids=fact_ids,
        components=component_labels(model.n_layers),
        ffn_value_scores=merged["ffn_value"].numpy(),
        attn_unit_scores=merged["attn_unit"].numpy(),
        query_score=merged["query"].numpy(),
        n_value_neurons=np.bincount(value_neurons["fact_row"].to_numpy(int), minlength=len(batch)),
        n_value_units=np.bincount(value_units["fact_row"].to_numpy(int), minlength=len(batch)),
        n_unstable=merged["unstable"].numpy(),
        query_neurons=_query_table(model, fact_ids, merged, shown, known_value, config),
        value_neurons=with_fact_ids(value_neurons, fact_ids),
        value_units=with_fact_ids(value_units, fact_ids, pads),
        provenance=_provenance(model, config),
    )


def _check_two_updates(model: Model) -> None:
    """The components are the embedding and two updates per block: refuse blocks that add a third."""
    if model.spec.ple_update is not None:
        raise RecallscopeError(
            f"query_attribution splits the residual into the embedding and each block's attention and "
            f"MLP updates, but {model.spec.family}'s blocks add a third update after the MLP (per-layer "
            "inputs, ple_out): its shares would leave that part out. Run the other methods on this model."
        )


def _chunk(model: Model, batch: PromptBatch, neurons: pd.DataFrame, units: pd.DataFrame, config: Config):
    """Everything for one chunk of facts: one cached forward, then (a), (b), (c) for all rows at once."""
    acts = component_cache(model, batch, neurons, units)
    out = {"unstable": torch.zeros(len(batch), 3, dtype=torch.long)}
    out["ffn_value"], out["unstable"][:, 0] = ffn_value_scores(
        model, acts, neurons, config.ffn_key, config.centre, config.guard
    )
    out["attn_unit"], out["unstable"][:, 1], keys = attn_unit_scores(
        model, acts, units, config.centre, config.guard
    )
    query, best, out["unstable"][:, 2] = query_neuron_scores(model, acts, units, keys, config.guard)
    out["query"], out["best"] = query, best
    out["shown"] = ov_tokens(model, acts, units, query, best, config.n_show, config.n_tokens)
    return out


def _query_table(model, fact_ids, merged, shown, known: pd.DataFrame, config: Config) -> pd.DataFrame:
    """The ranked query neurons of every fact (decoded for the top ``n_show``)."""
    frames = []
    known_set = set(known[["fact_row", "layer", "neuron"]].itertuples(index=False, name=None))
    for b, (flat, scores) in enumerate(ranked_scores(merged["query"], config.n_query_neurons)):
        layer, neuron = (flat // model.d_mlp).numpy(), (flat % model.d_mlp).numpy()
        pairs = [(int(i), int(k)) for i, k in zip(layer, neuron, strict=True)]
        extra = [shown[b].get(pair, {}) for pair in pairs]
        frames.append(
            pd.DataFrame(
                {
                    "fact_id": fact_ids[b],
                    "rank": np.arange(1, len(flat) + 1),
                    "layer": layer,
                    "neuron": neuron,
                    "score": scores.numpy(),
                    "also_value_neuron": [(b, *pair) in known_set for pair in pairs],
                    "head_layer": [e.get("head_layer", -1) for e in extra],
                    "head": [e.get("head", -1) for e in extra],
                    "ov_top_tokens": [e.get("ov_top_tokens") for e in extra],
                    "value_top_tokens": [e.get("value_top_tokens") for e in extra],
                }
            )
        )
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _provenance(model: Model, config: Config) -> dict:
    gated = any(spec.norm_gates for spec in model.spec.block_specs())
    gates = "; a gated norm's gate (at the key's position) frozen at its value" if gated else ""
    gated = model.spec.gated_mlp
    key = config.ffn_key if config.ffn_key != "as_coded" else ("value" if gated else "input_row")
    return result_provenance(
        model,
        config,
        value_rows="logprob_attribution top rows (log-prob increase, frozen-scale head) unless given",
        ffn_key=key,
        ffn_key_rule={
            "linearized": "(γ_2/ρ_2) ⊙ ∇_x̃ c_k at the actual input, norm scale frozen",
            "input_row": "MLP input row (up_proj for gated) ⊙ γ_2",
            "gate_row": "gate_proj row ⊙ γ_2",
            "value": "output vector w_k ⊙ γ_2 (the Llama notebook)",
        }[key],
        centre=bool(config.centre and model.spec.norm == "layer"),
        guard=f"skip a row when |Σ c·key| < {config.guard} · Σ|c·key| (or Σ c·key = 0)",
        ffn_components="at the last position: embed (x^0), A^0, F^0, …, F^{l-1}, A^l (parallel: no A^l)",
        unit_components="at the unit's source position j: embed_j, A^0_j, …, F^{l-1}_j",
        unit_key="W_V^l[kv(h)][:, n] ⊙ γ_1 (block l's pre-attention norm gain)" + gates,
        query_denominator="x^l_j · key (the true residual at the source position)",
        query_neuron_value="c^i_{k,j} w^i_k (Gemma-2: post-norm folded with its actual scale)",
        ov_map="W_O^h (W_V^h ln_1(w_k) + b_V^h) (+ Gemma-2 post-norm), decoded with W_U (γ_f ⊙ centre(·))",
        also_value_neuron=f"among the fact's top {config.n_query_neurons} value neurons",
        target=config.target,
        bias=config.bias,
        layers="0-based blocks; component 'l.attn_out' / 'l.mlp_out' is block l's update",
        positions="last position N = -1 (left padding); src_pos counted from the prompt start",
        bos=model.bos,
    )


def cost(model: Model, batch: PromptBatch | FactSet, config: Config | None = None, given=None) -> Cost:
    """One cached forward per ``max_batch_rows`` facts, plus the required ``logprob_attribution``
    unless ``given`` (the runner computes it once for every method that requires it).

    Memory: the cache keeps ``resid_pre``, ``attn_out``, ``mlp_out`` and ``mlp_post`` of every layer
    at every position, plus the stacked residuals and components, for ``max_batch_rows`` facts.
    """
    config = config or Config()
    batch = as_batch(model, batch)
    n, T, L, d = len(batch), batch.seq_len, model.n_layers, model.d_model
    rows = min(n, config.max_batch_rows)
    floats = rows * T * (L * (4 * d + model.d_mlp) + (2 * L + 1) * d) + 2 * rows * L * model.d_mlp
    width = compute_dtype(model.dtype).itemsize
    readouts = 2 * n * config.n_show  # the shown query neurons' value and OV-mapped vectors
    floats += readout_floats(model, 2 * rows * config.n_show)  # decoded, cache held
    own = Cost(math.ceil(n / config.max_batch_rows), float(n * T * L), floats * width, vocab_rows=readouts)
    return own + Given.cost(requires(config), model, batch, given)
