"""Attribution patching (AtP; Nanda 2023, Kramár et al. 2024), checked by real patching.

For every fact, a clean prompt and a corrupted copy (``subject_swap``, ``gaussian`` or ``resample``,
as in causal tracing, :mod:`recallscope.core.corruption`), one forward and one backward of the clean
prompt give the first-order estimate of every node's noising effect (:mod:`recallscope.core.atp`)::

    atp(n) = (n(corrupted) − n(clean)) · ∂L/∂n(clean)   ≈   L(clean | n ← n(corrupted)) − L(clean)

over block outputs (``resid``) and MLP updates (``mlp``) per position and layer, attention heads per
position (``head``, the head's ``z`` before ``W_O``), MLP neurons per position (``neuron``), and the
queries and keys the attention kernel reads (``query`` per head, ``key`` per key-value head), scored
with AtP*'s recomputed softmax (``qk_fix``). ``estimator="relp"`` replaces the gradients with LRP
coefficients (relevance patching, :mod:`recallscope.core.lrp`); GradDrop exposes cancellation.
``L`` is the logit difference between the answer and the swapped-in subject's answer (``logit_diff``,
Zhang & Nanda's choice), the answer's log-probability or its probability. With several corrupted
copies, estimates and effects are means over the copies.

Verification is built in: per fact and node type the ``verify`` nodes with the largest ``|atp|`` are
patched for real (one batch row per node and copy), and the result records the exact effects, their
Spearman correlation with the estimates and the largest error. ``verify=None`` patches every node.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Annotated, Literal

import numpy as np
import pandas as pd

from recallscope.core import atp
from recallscope.core import corruption as corrupt
from recallscope.core.cache import forward, forward_floats
from recallscope.core.lrp import relp_unsupported
from recallscope.core.tokens import PromptBatch, as_batch
from recallscope.core.vocab import decode_tokens
from recallscope.data.facts import FactSet
from recallscope.data.variants import swap_fact, swap_inputs
from recallscope.errors import RecallscopeError
from recallscope.methods.base import Cost, MethodConfig, MethodResult, result_provenance
from recallscope.methods.general.summaries import verification_summary as summary
from recallscope.methods.hints import DISTINCT, NON_EMPTY, AtLeast, Between, NonNegative, Positive
from recallscope.models.model import Model

__all__ = ["NAME", "DESCRIPTION", "Config", "AttributionPatchingResult", "run", "prepare", "cost", "summary"]

NAME = "attribution_patching"
DESCRIPTION = (
    "First-order (AtP) effects of every block output, head and MLP neuron from one backward, "
    "checked against real patching of the top nodes."
)
CHUNK_SIZE = 4
"""Facts per runner chunk (one forward and one backward each, plus the verification rows)."""

Node = Literal["resid", "mlp", "head", "neuron", "query", "key"]
SCORED = ("resid", "mlp", "head", "neuron", "query", "key")
"""Every node type, in the order of the result's fields."""


@dataclass(frozen=True, kw_only=True)
class Config(MethodConfig):
    """Attribution-patching settings; defaults follow Zhang & Nanda (subject swap, logit difference)."""

    corruption: Literal["subject_swap", "gaussian", "resample"] = "subject_swap"
    metric: Literal["logit_diff", "logprob", "prob"] = "logit_diff"
    nodes: Annotated[tuple[Node, ...], NON_EMPTY, DISTINCT] = SCORED
    estimator: Literal["atp", "relp"] = "atp"
    """``atp``: gradients; ``relp``: LRP coefficients (relevance patching, Jafari et al. 2025)."""
    qk_fix: bool = True
    """Query and key nodes through the recomputed attention softmax (AtP*); False: first order."""
    verify: NonNegative | None = 20
    """Nodes per fact and node type re-measured by real patching (largest ``|atp|``); None: all."""
    skipped_nodes: tuple[str, ...] = ()
    """Set by :func:`prepare`: requested node types this model cannot give (queries and keys of
    inline attention code)."""
    graddrop: bool = False
    """Also the AtP* GradDrop score of every node (``L`` more forward and backward passes per fact)."""
    top_neurons: Positive = 100
    """Neuron nodes listed per fact in the ``neurons`` table (largest ``|atp|``)."""
    target: Literal["gold", "top1"] = "gold"
    samples: Positive = 10
    """Corrupted copies for ``gaussian`` and ``resample``."""
    noise: Annotated[float, AtLeast(0)] | None = None
    noise_factor: Annotated[float, AtLeast(0)] = 3.0
    noise_levels: tuple[tuple[str, Annotated[float, AtLeast(0)]], ...] = ()
    """Set by :func:`prepare`: ``("subject", ν)``, as causal tracing calibrates it."""
    noise_calibrated_on: str | None = None
    resample_vocab: tuple[tuple[str, tuple[NonNegative, ...]], ...] = ()
    seed: Annotated[int, Between(0, 2**32 - 1)] = 1
    batch_size: Positive = 8
    """Facts per clean forward and backward (and per forward of their swapped partners)."""
    max_batch_rows: Positive = 64
    """Verification rows per forward."""

    PRESETS = {
        "zhang_nanda": dict(corruption="subject_swap", metric="logit_diff", target="gold"),
        "rome_noise": dict(corruption="gaussian", metric="prob", target="top1", samples=10),
        "atp_star": dict(qk_fix=True, graddrop=True),
        "relp": dict(estimator="relp"),
    }

    def __post_init__(self) -> None:
        if self.metric == "logit_diff" and self.corruption != "subject_swap":
            raise RecallscopeError(
                "metric='logit_diff' compares the answer with the swapped-in subject's answer: use "
                "corruption='subject_swap', or metric='logprob' / 'prob'"
            )


@dataclass(frozen=True)
class AttributionPatchingResult(MethodResult):
    """Per-fact AtP scores of every node, with the exact effects of the verified ones."""

    tokens: list[list[str]]
    """``[F][T]`` prompt tokens."""
    resid: list[np.ndarray]
    """``[F]`` of ``[T, L]`` AtP of block ``ℓ``'s output at each position."""
    mlp: list[np.ndarray]
    """``[F]`` of ``[T, L]`` AtP of block ``ℓ``'s MLP update at each position."""
    head: list[np.ndarray]
    """``[F]`` of ``[L, H, T]`` AtP of each head's output at each position."""
    neuron: list[np.ndarray]
    """``[F]`` of ``[L, T, d_mlp]`` AtP of each neuron at each position."""
    query: list[np.ndarray]
    """``[F]`` of ``[L, H, T]`` AtP(*) of each head's query at each position."""
    key: list[np.ndarray]
    """``[F]`` of ``[L, H_kv, T]`` AtP(*) of each key-value head's key at each position."""
    verified: pd.DataFrame
    """Rows fact_id, node, layer, position, index, atp, exact: the nodes patched for real."""
    clean_metric: list[float]
    corrupted_metric: list[float]
    partner: list[str | None]
    graddrop: list[dict[str, np.ndarray]]
    """``[F]`` of node type → GradDrop scores (shapes as the AtP arrays); empty without ``graddrop``."""

    def to_frame(self) -> pd.DataFrame:
        """One row per fact × block output / MLP update / head / query / key × position (neurons:
        :meth:`tables`).
        """
        frames = []
        for f in range(len(self.fact_ids)):
            for name in ("resid", "mlp", "head", "query", "key"):
                scores = getattr(self, name)[f]
                if scores.size:
                    frames.append(self._nodes(f, name, np.indices(scores.shape).reshape(scores.ndim, -1)))
        frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        return self._with_exact(frame)

    def _nodes(self, f: int, node: str, where: np.ndarray) -> pd.DataFrame:
        """Rows of the ``node`` entries of fact ``f`` at the index arrays ``where`` (one per axis)."""
        layer, position, index = atp.node_of(node, where)
        gd = self.graddrop[f].get(node)
        return pd.DataFrame(
            {
                "fact_id": self.fact_ids[f],
                "node": node,
                "layer": layer,
                "index": np.full(len(layer), -1) if index is None else index,
                "position": position,
                "token": np.asarray(self.tokens[f], dtype=object)[position],
                "atp": getattr(self, node)[f][tuple(where)],
                "graddrop": np.nan if gd is None else gd[tuple(where)],
            }
        )

    def _with_exact(self, frame: pd.DataFrame) -> pd.DataFrame:
        if frame.empty:
            return frame
        exact = self.verified[["fact_id", "node", "layer", "index", "position", "exact"]]
        return frame.merge(exact, on=["fact_id", "node", "layer", "index", "position"], how="left")

    def tables(self) -> dict[str, pd.DataFrame]:
        """``neurons``: per fact the ``top_neurons`` largest ``|atp|`` (layer, position, neuron);
        ``verification``: the verified nodes; ``facts``: clean and corrupted metric, partner.
        """
        frames = []
        for f in range(len(self.fact_ids)):
            scores = self.neuron[f]
            if scores.size:
                flat = np.argsort(-np.abs(scores), axis=None, kind="stable")[: self.config.top_neurons]
                frames.append(self._nodes(f, "neuron", np.stack(np.unravel_index(flat, scores.shape))))
        neurons = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        facts = pd.DataFrame(
            {
                "fact_id": self.fact_ids,
                "clean_metric": self.clean_metric,
                "corrupted_metric": self.corrupted_metric,
                "partner": self.partner,
            }
        )
        return {"neurons": self._with_exact(neurons), "verification": self.verified, "facts": facts}

    def arrays(self) -> dict[str, np.ndarray]:
        """Per fact AtP scores ``<fact>/<node>``: ``resid`` and ``mlp [T, L]``, ``head`` and ``query
        [L, H, T]``, ``key [L, H_kv, T]``, ``neuron [L, T, d_mlp]``; with ``graddrop``,
        ``<fact>/<node>_graddrop`` likewise.
        """
        out = {}
        for f, fact in enumerate(self.fact_ids):
            for name in SCORED:
                if getattr(self, name)[f].size:
                    out[f"{fact}/{name}"] = getattr(self, name)[f].astype(np.float32)
            out.update({f"{fact}/{k}_graddrop": v.astype(np.float32) for k, v in self.graddrop[f].items()})
        return out

    def summary(self) -> pd.DataFrame:
        """Per node type: Spearman ρ of AtP vs exact over the verified nodes, largest error, n."""
        return summary(self.verified)


def prepare(
    model: Model, facts: PromptBatch | FactSet, config: Config, dataset: FactSet | None = None
) -> Config:
    """Fix ν and the resampling vocabulary on the whole loaded ``dataset`` (as causal tracing); drop
    query and key nodes where the attention code is inline (recorded); refuse RelP where its rules do
    not cover the model.
    """
    reason = relp_unsupported(model) if config.estimator == "relp" else None
    if reason:
        raise RecallscopeError(
            f"estimator='relp': the propagation rules do not cover {model.spec.family}'s {reason}; use "
            "estimator='atp'"
        )
    pool = facts if dataset is None else dataset
    unreachable = () if model.spec.attention_interface else atp.KERNEL_NODES
    skipped = tuple(n for n in config.nodes if n in unreachable)
    nodes = tuple(n for n in config.nodes if n not in unreachable)
    if not nodes:
        raise RecallscopeError(
            f"{model.spec.family} computes attention inline: its queries and keys cannot be patched; "
            "ask for other nodes (resid, mlp, head, neuron)"
        )
    fields = corrupt.calibration_fields(model, pool, ["subject"], config)
    return replace(config, nodes=nodes, skipped_nodes=config.skipped_nodes + skipped, **fields)


def cost(model: Model, batch: PromptBatch | FactSet, config: Config | None = None) -> Cost:
    """Forward passes (a backward counted as two), token-block work and peak memory of :func:`run`."""
    config = config or Config()
    batch = as_batch(model, batch)
    copies = 1 if config.corruption == "subject_swap" else config.samples
    tokens = batch.seq_len
    per_node = {"resid": 1, "mlp": 1, "head": model.n_heads, "neuron": model.d_mlp}
    per_node |= {"query": model.n_heads, "key": model.n_kv_heads}
    every = {n: model.n_layers * tokens * per_node[n] for n in config.nodes}
    rows = copies * sum(
        every.values() if config.verify is None else [min(config.verify, v) for v in every.values()]
    )
    passes = 3 * (1 + (model.n_layers if config.graddrop else 0))  # a backward counted as two forwards
    per_fact = passes + 1 + -(-rows // config.max_batch_rows)  # + the corrupted run
    work = (passes + copies + rows) * tokens * model.n_layers
    graph = tokens * model.n_layers * (4 * model.d_model + 2 * model.d_mlp) * (2 + copies)
    width = min(rows, config.max_batch_rows)  # one batch of patched rows, logits widened for the metric
    patched = forward_floats(model, width, tokens) + width * model.d_vocab * (
        0 if config.metric == "logit_diff" else 4
    )
    floats = max(graph, patched)
    return Cost(per_fact * len(batch), float(work * len(batch)), floats * model.dtype.itemsize)


def run(
    model: Model, batch: PromptBatch | FactSet, config: Config | None = None
) -> AttributionPatchingResult:
    """AtP of every node for every fact, and real patching of the top ones (module docstring).

    ``subject_swap`` reads each fact's partner: pass a :class:`FactSet` whose facts have one
    (``recallscope run`` adds them).
    """
    config = config or Config()
    facts = batch if isinstance(batch, FactSet) else None
    batch = as_batch(model, batch, method=NAME)
    if "subject" not in batch.spans:
        raise RecallscopeError("attribution_patching corrupts the subject: give facts with a subject span")
    if not config.noise_calibrated_on:
        config = prepare(model, facts if facts is not None else batch, config)
    keys = ("fact_ids", "tokens", *SCORED, "clean", "bad", "partner", "graddrop")
    out: dict[str, list] = {k: [] for k in keys}
    verified, skipped, todo = [], [], []
    for row in range(len(batch)):
        reason = _check(model, batch, facts, row, config)
        if reason:
            skipped.append((batch.fact_ids[row] if batch.fact_ids else str(row), reason))
        else:
            todo.append(row)
    for start in range(0, len(todo), config.batch_size):
        for fact in _attribute(model, batch, facts, todo[start : start + config.batch_size], config):
            verified.append(fact.pop("verified"))
            for key in keys:
                out[key].append(fact[key])
    columns = ["fact_id", "node", "layer", "index", "position", "atp", "exact"]
    table = pd.concat(verified, ignore_index=True) if verified else pd.DataFrame(columns=columns)
    return AttributionPatchingResult(
        tokens=out["tokens"], **{name: out[name] for name in SCORED}, verified=table,
        clean_metric=out["clean"], corrupted_metric=out["bad"], partner=out["partner"],
        graddrop=out["graddrop"], config=config,
        fact_ids=out["fact_ids"], provenance=_provenance(model, config), skipped=skipped,
    )  # fmt: skip


def _attribute(model: Model, batch: PromptBatch, facts, rows: list[int], config: Config):
    """Per fact of ``rows``: its AtP scores, GradDrop scores, verified nodes and metrics. One forward
    and one backward for all the rows (and, for a subject swap, one forward of their partners).
    """
    part = batch.select(rows)
    ids = [part.input_ids[i, int(pad) :] for i, pad in enumerate(part.pad_lengths)]
    bad = [_corrupted(model, batch, facts, row, ids[i], config) for i, row in enumerate(rows)]
    targets = [_target(model, batch, row, ids[i], config) for i, row in enumerate(rows)]
    counters = [b.counter for b in bad] if config.corruption == "subject_swap" else None
    rules = "relp" if config.estimator == "relp" else "gradient"
    grads = atp.clean_gradients(
        model, part, atp.metric(config.metric, targets, counters), config.nodes, rules=rules
    )
    if config.corruption == "subject_swap":  # the partners, padded as their facts: one forward
        swapped = part.input_ids.clone()
        for i, pad in enumerate(part.pad_lengths.tolist()):
            swapped[i, pad:] = bad[i].ids[0]
        cache = atp.corrupted_states(model, replace(part, input_ids=swapped), config.nodes)
        pads = part.pad_lengths.tolist()
        states = [
            atp.States({k: v[i : i + 1, pad:] for k, v in cache.acts.items()}, cache.logits[i : i + 1])
            for i, pad in enumerate(pads)
        ]
    else:
        states = [atp.corrupted_states(model, b, config.nodes) for b in bad]
    for i, row in enumerate(rows):
        metric = atp.metric(config.metric, targets[i], bad[i].counter)
        scores = {k: v.numpy() for k, v in atp.estimates(grads[i], states[i], qk_fix=config.qk_fix).items()}
        dropped = (
            atp.graddrop(model, ids[i], metric, states[i], config.nodes, rules=rules)
            if config.graddrop
            else {}
        )
        nodes = _to_verify(model, scores, config.verify)
        exact = atp.patched_effects(
            model, ids[i], states[i], nodes, metric, max_batch_rows=config.max_batch_rows
        )
        bad_metric = float(metric(states[i].logits.double()).mean())
        fact_id = batch.fact_ids[row] if batch.fact_ids else str(row)
        yield {
            "fact_ids": fact_id, "tokens": decode_tokens(model, ids[i]),
            **{name: _node(scores, name) for name in SCORED},
            "clean": grads[i].metric, "bad": bad_metric, "partner": bad[i].partner,
            "graddrop": {k: v.numpy() for k, v in dropped.items()},
            "verified": _verified(fact_id, nodes, scores, exact.numpy()),
        }  # fmt: skip


def _node(scores: dict[str, np.ndarray], name: str) -> np.ndarray:
    return scores.get(name, np.zeros(0))


def _check(model, batch: PromptBatch, facts, row: int, config: Config) -> str | None:
    if int(batch.spans["subject"][row, 0]) < 0:
        return "no subject span"
    if config.target == "gold" and batch.target_ids is None:
        return "no gold answer (target='gold')"
    if config.corruption == "subject_swap" and (facts is None or swap_fact(facts[row]) is None):
        return "no subject_swap partner (same relation, another answer, as many subject tokens)"
    return None


def _corrupted(model, batch: PromptBatch, facts, row: int, ids, config: Config) -> corrupt.Corrupted:
    pad = int(batch.pad_lengths[row])
    span = tuple(int(v) - pad for v in batch.spans["subject"][row])
    if config.corruption == "subject_swap":
        partner, partner_ids, counter = swap_inputs(model, facts[row])
        return corrupt.swapped(ids, span, partner_ids.to(ids.device), counter=counter, partner=partner)
    if config.corruption == "resample":
        vocab = dict(config.resample_vocab)["subject"]
        return corrupt.resample(ids, span, vocab=vocab, samples=config.samples, seed=config.seed)
    noise = config.noise if config.noise is not None else dict(config.noise_levels)["subject"]
    return corrupt.gaussian(ids, span, noise=noise, samples=config.samples, seed=config.seed, model=model)


def _target(model, batch: PromptBatch, row: int, ids, config: Config) -> int:
    if config.target == "gold":
        return int(batch.target_ids[row])
    return int(forward(model, ids[None])[0].argmax())


def _to_verify(model: Model, scores: dict[str, np.ndarray], k: int | None) -> list[tuple]:
    """``(node, layer, position, index)`` of the ``k`` largest ``|atp|`` per node type (all: None);
    never a key-value head a block does not have (its score is a zero of padding).
    """
    nodes = []
    for name, values in scores.items():
        order = np.argsort(-np.abs(values), axis=None, kind="stable")
        picked = 0
        for flat in order:
            layer, position, index = atp.node_of(name, np.unravel_index(flat, values.shape))
            if name == "key" and index >= model.n_kv_heads_at(int(layer)):
                continue
            if k is not None and picked == k:
                break
            nodes.append((name, int(layer), int(position), None if index is None else int(index)))
            picked += 1
    return nodes


def _verified(fact_id: str, nodes, scores: dict[str, np.ndarray], exact: np.ndarray) -> pd.DataFrame:
    rows = [
        (fact_id, name, layer, -1 if index is None else index, position,
         float(scores[name][atp.node_index(name, layer, position, index)]), float(value))
        for (name, layer, position, index), value in zip(nodes, exact, strict=True)
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=["fact_id", "node", "layer", "index", "position", "atp", "exact"])


def _provenance(model: Model, config: Config) -> dict:
    coefficient = {
        "atp": "dL/dn at the clean run",
        "relp": "LRP coefficient at the clean run (RelP: LN-rule, attention probabilities held, identity "
        "rule for activations, half rule for gated products; linear maps by their gradient)",
    }[config.estimator]
    return result_provenance(
        model,
        config,
        estimate=f"(n(corrupted) - n(clean)) . {coefficient} (one forward, one backward); mean over the "
        "corrupted copies",
        nodes="resid: resid_post[l]; mlp: mlp_out[l]; head: z[l][h] (before W_O); neuron: mlp_post[l][k]; "
        "query/key: the attention kernel's q[l][h] / k[l][kv head] (after RoPE and q/k norms); each at "
        "each position",
        query_key="AtP*: attention row recomputed exactly with the patched score, then first order in "
        "the attention probabilities" if config.qk_fix else "first order in q / k",
        skipped_nodes=", ".join(config.skipped_nodes) + " (inline attention code)"
        if config.skipped_nodes else "none",
        metric={"logit_diff": "logit(target) - logit(swapped-in answer)", "logprob": "log P(target)",
                "prob": "P(target)"}[config.metric],
        corruption=config.corruption,
        noise=dict(config.noise_levels) or config.noise,
        noise_rule=f"{config.noise_factor} x std of the embedding entries of {config.noise_calibrated_on}",
        verification=f"the {config.verify or 'all'} largest |estimate| per fact and node type patched for "
        "real (noising: corrupted value into the clean run), one batch row per node and copy",
        target=config.target,
        layers="0-based blocks",
        bos=model.bos,
        graddrop="1/(L-1) sum_l |estimate with nothing flowing back through block l's attention and MLP "
        "updates| (AtP*)" if config.graddrop else "off",
    )  # fmt: skip
