"""Neuron ablation: evaluate neuron-level attributions by zeroing what they rank highest
(Yu & Ananiadou, EMNLP 2024, ``methods.md`` Y&A-7).

Each attribution *method* ranks every subvalue of a fact at the last position ``N`` (FFN neurons
``(ℓ, k)`` and attention units ``(ℓ, h, n, j)``, see :mod:`recallscope.core.subvalues`); the top
``K`` of each kind, as a *budget* such as ``"ffn:100"`` or ``"attn:200+ffn:100"`` says, are zeroed
together in one forward and the target's reciprocal rank ``mrr = 1/(rank + 1)`` (rank 0 = top of
the final logits), probability and log-probability are compared with the clean run. Methods (the
scores are those of the required ``logprob_attribution``, same target and head ``bias``):

- ``logprob_increase``: ``log p(t | x + s) − log p(t | x)`` (the paper's score, Y&A-4/5);
- ``prob_increase``: ``p(t | x + s) − p(t | x)``;
- ``logit_increase``: the direct logit gain ``(c/ρ)·D_w[t]`` of the frozen head;
- ``coef_norm``: ``|c|·‖w‖``;
- ``coef_inv_rank``: ``|c| / (rank + 1)`` with ``rank`` the target's rank in the value vector's
  direction ``D_w = W_U (γ ⊙ centre(w))`` if ``c > 0`` and in ``−D_w`` if ``c < 0`` (Geva et al. 2022);
- ``coef``: ``|c|``;

plus ``random``: ``K`` subvalues of each kind drawn uniformly, ``random_seeds`` times.

Conventions: ``c`` and ``w`` are :class:`~recallscope.core.subvalues.Subvalues`' coefficients and
value vectors (Gemma-2's post-norm gain in ``w``, its ``1/ρ`` in ``c``); attention-unit
coefficients are ``α_{N,j} v_{j,kv(h),n}``. Zeroing FFN neuron ``(ℓ, k)`` sets ``mlp_post[ℓ]`` at
``N`` to 0; zeroing attention unit ``(ℓ, h, n, j)`` subtracts ``α_{N,j} v_{j,kv(h),n}`` from
``z[ℓ]`` at ``N``, head ``h``, dimension ``n``, with ``α`` and ``v`` read live in the same
(already intervened) forward, so later layers see the earlier edits. Only position ``N`` is
edited; source positions ``j`` are counted from the start of the real prompt (BOS included).
Top-``K`` ties are broken by the lower flat index ``(ℓ, k)`` / ``(ℓ, h, n, j)``, so a smaller
budget's selection is a prefix of a larger one's; random draws are nested the same way and
depend only on ``(seed, fact_id, kind)``.

The core is :func:`ablate` (any per-row selections, every row of a chunk in one batched forward
with per-row edits); :func:`run` builds the selections; :func:`summary` gives per method × budget
mean drops across facts with 95% CIs. The naive one-prompt, hand-computed version is in
``tests/oracles`` and gives the same numbers.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
import pandas as pd
import torch

from recallscope.core.ablation import METRICS, Selection, ablate, target_metrics, top_ranked
from recallscope.core.attribution import value_stats
from recallscope.core.cache import forward, forward_floats
from recallscope.core.decoding import choose_targets
from recallscope.core.dtypes import upcast
from recallscope.core.tokens import PromptBatch, as_batch
from recallscope.core.vocab import decode_tokens
from recallscope.data.facts import FactSet
from recallscope.errors import RecallscopeError
from recallscope.methods.base import Cost, Given, MethodConfig, MethodResult, result_provenance
from recallscope.methods.hints import DISTINCT, NON_EMPTY, NonNegative, Positive
from recallscope.methods.yu2024.summaries import SUMMARY_COLUMNS
from recallscope.methods.yu2024.summaries import neuron_ablation_summary as summary
from recallscope.models.model import Model

__all__ = [
    "NAME",
    "DESCRIPTION",
    "METHODS",
    "Config",
    "Budget",
    "Selection",
    "NeuronAblationResult",
    "run",
    "cost",
    "requires",
    "ablate",
    "summary",
    "SUMMARY_COLUMNS",
    "parse_budget",
    "target_metrics",
]

NAME = "neuron_ablation"
DESCRIPTION = "Zero the top-K neurons of each attribution method and measure MRR/prob drops (Yu 2024)."
CHUNK_SIZE = 32
METHODS = ("logprob_increase", "prob_increase", "logit_increase", "coef_norm", "coef_inv_rank", "coef")
KINDS = ("ffn", "attn")
BUDGETS = ("ffn:10", "ffn:100", "ffn:200", "attn:200", "attn:200+ffn:100")
LOGPROB = "logprob_attribution"


@dataclass(frozen=True)
class Budget:
    """How many subvalues of each kind one variant zeroes, e.g. ``attn:200+ffn:100``."""

    label: str
    n_ffn: int = 0
    n_attn: int = 0


def parse_budget(text: str) -> Budget:
    """``"ffn:K"``, ``"attn:K"`` or both joined by ``+`` (positive ``K``) → :class:`Budget`."""
    counts: dict[str, int] = {}
    parts = [part.strip().lower() for part in str(text).split("+")]
    for part in parts:
        kind, _, number = part.partition(":")
        kind, number = kind.strip(), number.strip()
        if kind not in KINDS or kind in counts or not number.isdigit() or int(number) < 1:
            raise RecallscopeError(
                f"budget {text!r} is not valid: expected 'ffn:K', 'attn:K' or 'attn:K+ffn:K' with "
                f"positive integers K and each kind at most once, e.g. 'attn:200+ffn:100'"
            )
        counts[kind] = int(number)
    label = "+".join(f"{kind}:{counts[kind]}" for kind in counts)
    return Budget(label, counts.get("ffn", 0), counts.get("attn", 0))


@dataclass(frozen=True, kw_only=True)
class Config(MethodConfig):
    """Neuron-ablation settings; ``yu`` follows the paper (gold target, head without the ln_f bias)."""

    budgets: Annotated[tuple[str, ...], NON_EMPTY] = BUDGETS
    """Subvalues zeroed together per variant: ``ffn:K``, ``attn:K`` or ``attn:K+ffn:K``."""
    methods: Annotated[tuple[Literal[METHODS], ...], DISTINCT] = tuple(
        m for m in METHODS if m != "coef_inv_rank"
    )
    """Attribution scores whose top-K are zeroed (module docstring); a subset of :data:`METHODS`.
    ``coef_inv_rank`` is left out by default: it projects every value vector onto the vocabulary and
    ranks each fact's target in all of them (``L·(d_mlp + H·d_head)·V`` per fact; minutes per chunk
    on a CPU for SmolLM2-135M). The ``yu`` preset includes it."""
    random_seeds: NonNegative = 3
    """Random selections per budget (seeds ``seed``, ``seed + 1``, …); 0 for none."""
    seed: NonNegative = 0
    """First random seed."""
    target: Literal["top1", "gold"] = "gold"
    """Token measured and attributed: the gold answer's first token (paper) or the clean top-1."""
    bias: bool = True
    """Frozen head with ``W_U·β + b_U`` for the attribution scores (``logprob_attribution.Config.bias``)."""
    max_batch_rows: Positive = 64
    """Ablated rows (fact × variant) per forward (memory bound)."""

    PRESETS = {"yu": dict(bias=False, target="gold", budgets=BUDGETS, methods=METHODS, random_seeds=3)}

    def __post_init__(self) -> None:
        labels = [parse_budget(b).label for b in self.budgets]
        if len(set(labels)) != len(labels):
            raise RecallscopeError(f"budgets {self.budgets!r} repeat a budget; list each once")
        if not self.methods and not self.random_seeds:
            raise RecallscopeError("nothing to ablate: give at least one method or random_seeds ≥ 1")

    @property
    def parsed_budgets(self) -> list[Budget]:
        return [parse_budget(b) for b in self.budgets]

    @property
    def variants(self) -> list[tuple[str, int, Budget]]:
        """``(method, seed, budget)`` of each ablated row of a fact: methods, then random (seed ≥ 0)."""
        budgets = self.parsed_budgets
        ranked = [(m, -1, b) for m in self.methods for b in budgets]
        seeds = range(self.seed, self.seed + self.random_seeds)
        return ranked + [("random", s, b) for s in seeds for b in budgets]

    def max_k(self, kind: str) -> int:
        return max(getattr(b, f"n_{kind}") for b in self.parsed_budgets)


@dataclass(frozen=True)
class NeuronAblationResult(MethodResult):
    """Target metrics ``[fact, variant]`` after zeroing each variant's selection, and the clean ones."""

    variants: list[tuple[str, int, str]]
    """``(method, seed, budget)`` per variant; ``seed`` is -1 except for ``random``."""
    target_ids: np.ndarray
    """``[fact]``"""
    target_tokens: list[str]
    n_ffn: np.ndarray
    """``[fact, variant]`` FFN neurons zeroed (fewer than the budget if fewer have a score)."""
    n_attn: np.ndarray
    """``[fact, variant]`` attention units zeroed."""
    mrr: np.ndarray
    """``[fact, variant]`` ``1/(rank + 1)`` of the target after zeroing."""
    prob: np.ndarray
    logprob: np.ndarray
    clean_mrr: np.ndarray
    """``[fact]``"""
    clean_prob: np.ndarray
    clean_logprob: np.ndarray
    rankings: list[dict[str, tuple[np.ndarray, np.ndarray]]]
    """Per fact, method name (``random<seed>`` for random) → ranked ``ffn [K, 2]`` and ``attn [K, 4]``
    (as :class:`Selection`); a budget zeroes a prefix of each."""

    def to_frame(self) -> pd.DataFrame:
        """One row per fact × variant, with the drops ``100·(clean − after)/clean`` and ``clean − after``."""
        n_facts, n_variants = self.mrr.shape
        f = np.repeat(np.arange(n_facts), n_variants)
        v = np.tile(np.arange(n_variants), n_facts)
        frame = pd.DataFrame(
            {
                "fact_id": np.array(self.fact_ids, dtype=object)[f],
                "method": np.array([m for m, _, _ in self.variants], dtype=object)[v],
                "seed": np.array([s for _, s, _ in self.variants], dtype=np.int64)[v],
                "budget": np.array([b for _, _, b in self.variants], dtype=object)[v],
                "n_ffn": self.n_ffn.reshape(-1),
                "n_attn": self.n_attn.reshape(-1),
            }
        )
        for name in METRICS:
            frame[name] = getattr(self, name).reshape(-1)
        for name in METRICS:
            frame[f"clean_{name}"] = getattr(self, f"clean_{name}")[f]
        frame["mrr_drop_pct"] = 100 * (frame["clean_mrr"] - frame["mrr"]) / frame["clean_mrr"]
        frame["prob_drop_pct"] = 100 * (frame["clean_prob"] - frame["prob"]) / frame["clean_prob"]
        frame["logprob_drop"] = frame["clean_logprob"] - frame["logprob"]
        return frame

    def tables(self) -> dict[str, pd.DataFrame]:
        """No extra tables (the selections are in :meth:`arrays`; use :func:`summary` on the frame)."""
        return {}

    def summary(self) -> pd.DataFrame:
        """:func:`summary` of this result's facts: mean drops per method × budget with 95% CIs."""
        return summary(self.to_frame())

    def arrays(self) -> dict[str, np.ndarray]:
        """Per fact and method the ranked subvalues: ``<name>_ffn [K, 2]`` and ``<name>_attn [K, 4]``."""
        named = {}
        for fact, ranking in zip(self.fact_ids, self.rankings, strict=True):
            for name, (ffn, attn) in ranking.items():
                named[f"{fact}/{name}_ffn"] = ffn
                named[f"{fact}/{name}_attn"] = attn
        return named


# -- rankings -------------------------------------------------------------------------------------


def requires(config: Config) -> dict[str, dict]:
    """``logprob_attribution`` (neurons and attention units, the largest budget ranked exactly, the
    same target and head) when a method ranks by its scores.
    """
    if not config.methods:
        return {}
    n_top = max(config.max_k("ffn"), config.max_k("attn"))
    levels = ("neuron", "attn_unit")
    return {LOGPROB: dict(levels=levels, n_top=n_top, target=config.target, bias=config.bias)}


def _scores(method: str, attribution: Given, fact: str, f: int, stats: dict) -> tuple[np.ndarray, np.ndarray]:
    """``ffn [L, d_mlp]`` and ``attn [L, H, d_head, T_fact]`` scores of ``fact`` (our fact ``f``)."""
    if method in ("logprob_increase", "prob_increase", "logit_increase"):
        name = {"logprob_increase": "score", "prob_increase": "prob", "logit_increase": "logit"}[method]
        ffn, attn = attribution.array(fact, f"neuron_{name}"), attribution.array(fact, f"unit_{name}")
    else:
        ffn_c, attn_c = attribution.array(fact, "neuron_coeff"), attribution.array(fact, "unit_coeff")
        ffn, attn = np.abs(ffn_c), np.abs(attn_c)
        if method == "coef_norm":
            ffn, attn = ffn * stats["ffn_norm"], attn * stats["attn_norm"][..., None]
        elif method == "coef_inv_rank":
            ffn_rank = np.where(ffn_c < 0, stats["ffn_rank_neg"][f], stats["ffn_rank_pos"][f])
            attn_rank = np.where(
                attn_c < 0, stats["attn_rank_neg"][f][..., None], stats["attn_rank_pos"][f][..., None]
            )
            ffn, attn = ffn / (ffn_rank + 1), attn / (attn_rank + 1)
    return np.asarray(ffn, dtype=np.float64), np.asarray(attn, dtype=np.float64)


def _ranked(method: str, attribution: Given, fact: str, f: int, stats: dict, config: Config):
    """Ranked ``ffn [K, 2]`` and ``attn [K, 4]`` (src relative to the prompt start) of one method."""
    ffn, attn = _scores(method, attribution, fact, f, stats)
    ffn_index = np.stack(np.unravel_index(top_ranked(ffn, config.max_k("ffn")), ffn.shape), 1)
    attn_index = np.stack(np.unravel_index(top_ranked(attn, config.max_k("attn")), attn.shape), 1)
    return ffn_index, attn_index


def _random(model: Model, fact_id: str, seed: int, length: int, config: Config):
    """Random ``ffn [K, 2]`` and ``attn [K, 4]`` of one fact (``length`` real tokens); nested over K."""
    spaces = {
        "ffn": (model.n_layers, model.d_mlp),
        "attn": (model.n_layers, model.n_heads, model.d_head, length),
    }
    drawn = []
    for i, kind in enumerate(KINDS):
        shape = spaces[kind]
        rng = np.random.default_rng([seed, zlib.crc32(fact_id.encode()), i])
        size = math.prod(shape)
        flat = rng.permutation(size)[: config.max_k(kind)]  # a prefix of one permutation: nested over K
        drawn.append(np.stack(np.unravel_index(flat, shape), 1).astype(np.int64))
    return drawn[0], drawn[1]


# -- run ------------------------------------------------------------------------------------------


def run(
    model: Model,
    batch: PromptBatch | FactSet,
    config: Config | None = None,
    given: dict[str, Given] | None = None,
) -> NeuronAblationResult:
    """Rank every fact's subvalues by each method, zero each budget's top-K (and random ones), measure.

    ``given``: the required ``logprob_attribution`` (:func:`requires`) as the runner hands it over;
    computed here when absent.
    """
    config = config or Config()
    batch = as_batch(model, batch)
    fact_ids = list(batch.fact_ids or map(str, range(len(batch))))
    clean_logits = _clean_logits(model, batch, config.max_batch_rows)
    targets = choose_targets(batch, clean_logits, config.target)
    attribution, keep, skipped = _attribute(model, batch, fact_ids, targets, config, given)
    rankings = _rankings(model, batch, config, fact_ids, targets, attribution, keep)
    selections, rows = [], []
    for f, row in enumerate(keep):
        for method, seed, budget in config.variants:
            ffn, attn = rankings[f][method if seed < 0 else f"random{seed}"]
            selections.append(Selection(ffn[: budget.n_ffn], attn[: budget.n_attn]))
            rows.append(row)
    after = ablate(model, batch, selections, targets, rows=rows, max_batch_rows=config.max_batch_rows)
    clean = target_metrics(clean_logits[keep], targets[keep])
    shape = (len(keep), len(config.variants))
    return NeuronAblationResult(
        config=config,
        fact_ids=[fact_ids[row] for row in keep],
        variants=[(method, seed, budget.label) for method, seed, budget in config.variants],
        target_ids=targets[keep].numpy(),
        target_tokens=decode_tokens(model, targets[keep]),
        n_ffn=np.array([len(s.ffn) for s in selections], dtype=np.int64).reshape(shape),
        n_attn=np.array([len(s.attn) for s in selections], dtype=np.int64).reshape(shape),
        **{name: after[name].reshape(shape) for name in METRICS},
        **{f"clean_{name}": clean[name] for name in METRICS},
        rankings=rankings,
        provenance=_provenance(model, config),
        skipped=skipped,
    )


def _clean_logits(model: Model, batch: PromptBatch, step: int) -> torch.Tensor:
    """``[B, d_vocab]`` clean last-position logits (at least float32), ``step`` prompts per forward."""
    parts = [
        upcast(forward(model, batch.select(range(i, min(i + step, len(batch))))))
        for i in range(0, len(batch), step)
    ]
    return torch.cat(parts).cpu() if parts else torch.zeros(0, model.d_vocab)


def _attribute(model: Model, batch: PromptBatch, fact_ids: list[str], targets: torch.Tensor, config, given):
    """``(logprob_attribution of the facts or None, rows of the facts kept, skipped)``.

    A handed-over result that scored another token for a fact (its top-1 where ours is the gold
    answer) is recomputed for those facts, in this chunk's whole batch: float32 sums depend on the
    batch's shape, and so the numbers equal those of a run where nothing is handed over.
    """
    if not config.methods:
        return None, list(range(len(batch))), []
    need = requires(config)[LOGPROB]
    attribution = Given.obtain(LOGPROB, need, model, batch, given)
    scored = lambda row: int(attribution.array(fact_ids[row], "target_id")[0])  # noqa: E731
    here = set(attribution.fact_ids)
    other = [row for row, fact in enumerate(fact_ids) if fact in here and scored(row) != int(targets[row])]
    if other:
        redone = {fact_ids[row] for row in other}
        redo = Given.obtain(LOGPROB, need, model, batch, None).select([f for f in fact_ids if f in redone])
        attribution = attribution.select([f for f in fact_ids if f in here - redone]).merge(redo)
        here = set(attribution.fact_ids)
    keep = [row for row, fact in enumerate(fact_ids) if fact in here]
    for row in keep:
        if scored(row) != int(targets[row]):
            raise RecallscopeError(
                f"fact {fact_ids[row]!r}: logprob_attribution scored token {scored(row)} but the ablation "
                f"measures {int(targets[row])}; both must use target={config.target!r}"
            )
    return attribution, keep, list(attribution.skipped)


def _rankings(
    model: Model,
    batch: PromptBatch,
    config: Config,
    fact_ids: list[str],
    targets: torch.Tensor,
    attribution: Given | None,
    keep: list[int],
) -> list[dict]:
    """Per kept fact: method name (``random<seed>``) → ranked ``(ffn [K, 2], attn [K, 4])``."""
    ranks = "coef_inv_rank" in config.methods
    stats = value_stats(model, targets[keep].numpy(), ranks) if config.methods else {}
    lengths = batch.attention_mask.sum(-1).tolist()
    rankings = []
    for f, row in enumerate(keep):
        ranking = {m: _ranked(m, attribution, fact_ids[row], f, stats, config) for m in config.methods}
        for seed in range(config.seed, config.seed + config.random_seeds):
            ranking[f"random{seed}"] = _random(model, fact_ids[row], seed, lengths[row], config)
        rankings.append(ranking)
    return rankings


def _provenance(model: Model, config: Config) -> dict:
    return result_provenance(
        model,
        config,
        metrics="mrr = 1/(rank+1), rank 0 = top of the final logits (strictly larger logits); prob; logprob",
        drops="mrr_drop_pct = 100(clean - after)/clean, same for prob; logprob_drop = clean - after",
        target=config.target,
        scores="logprob_attribution (levels neuron, attn_unit; exact top n_top = largest budget), "
        f"frozen-scale head, bias={config.bias}",
        methods={
            "logprob_increase": "neuron_score / unit_score",
            "prob_increase": "neuron_prob / unit_prob",
            "logit_increase": "neuron_logit / unit_logit (direct logit of the frozen head)",
            "coef_norm": "|c| * ||w|| (Gemma-2 post-norm gain in w, 1/rho_post in c)",
            "coef_inv_rank": "|c| / (rank + 1), rank of the target in D_w (c > 0) or -D_w (c < 0), "
            "D_w = W_U (gamma * centre(w)), no bias",
            "coef": "|c|",
            "random": "uniform without replacement per kind, rng(seed, crc32(fact_id), kind); nested over K",
        },
        selection="top K per kind by score, NaN never selected, ties by lower flat index",
        zeroing="ffn (l, k): mlp_post[l] at N set to 0; attn (l, h, n, j): alpha_Nj v_j,kv(h),n "
        "(live, same forward) subtracted from z[l] at N; only the last position N is edited",
        positions="src counted from the real prompt's start (BOS included); pads never selected",
        layers="0-based blocks",
        bos=model.bos,
    )


def cost(model: Model, batch: PromptBatch | FactSet, config: Config | None = None, given=None) -> Cost:
    """Clean forwards, one ablated row per fact × variant, plus the required ``logprob_attribution``
    unless ``given`` (the runner computes it once for every method that requires it).

    ``coef_inv_rank`` also projects every value vector to the vocabulary once per call
    (``L·(d_mlp + H·d_head)`` directions), which is not counted in forwards.
    """
    config = config or Config()
    batch = as_batch(model, batch)
    step = config.max_batch_rows
    rows = len(batch) * len(config.variants)
    forwards = -(-len(batch) // step) + -(-rows // step)
    width = min(max(rows, 1), step)
    floats = forward_floats(model, width, batch.seq_len)
    floats += 2 * width * model.d_vocab  # the metrics' log-sum-exp and rank comparison over the logits
    blocks = float((rows + len(batch)) * batch.seq_len * model.n_layers)
    own = Cost(forwards, blocks, floats * model.dtype.itemsize, vocab_rows=float(rows + len(batch)))
    return own + Given.cost(requires(config), model, batch, given)
