"""The papers' claims, each a per-fact effect computed from a run's stored tables (pandas only).

Every measure takes the run's :class:`~recallscope.runner.store.Store` and returns one number per
fact (a ``Series`` indexed by fact id), signed so that the claim is "the mean is > 0" (``side=1``),
"< 0" (``side=-1``) or "≠ 0" (``side=0``), with its null or baseline already subtracted. Depths are
relative, ``layer / (n_layers − 1)``, so models of different depths compare. A measure raises
:class:`~recallscope.report.scorecard.NotApplicable` when the run's data cannot test the claim.
"""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd

from recallscope.methods.general.summaries import first_trace
from recallscope.promote_suppress import per_fact_stats
from recallscope.report.scorecard import Claim, NoEvidence, NotApplicable

__all__ = ["CLAIMS", "step_claims"]


def _read(store, method: str, table: str | None = None) -> pd.DataFrame:
    """The stored table, or :class:`NoEvidence` when the method stored no row in it."""
    frame = store.read_table(method, table)
    if frame.empty:
        name = method if table is None else f"{method}.{table}"
        raise NoEvidence(f"{name} stored no rows (too few facts for it, or every fact skipped)")
    return frame


def _depth(layers: pd.Series, n_layers: int) -> pd.Series:
    return layers / max(1, n_layers - 1)


def _n_layers(frame: pd.DataFrame, column: str = "layer") -> int:
    return int(frame[column].max()) + 1


# -- Geva et al. 2023 --------------------------------------------------------------------------------


def flow_order(store) -> pd.Series:
    """Per fact: depth of the subject → last flow's centre of mass minus that of the non-subject
    (relation) → last flow, each over ``clip(−change_pct/100, 0, 1)`` per knocked-out window.
    """
    frame = _read(store, "attention_knockout")
    n_layers = _n_layers(frame)
    frame = frame.assign(drop=(-frame["change_pct"] / 100).clip(0, 1))

    def centre(rows: pd.DataFrame) -> float:
        total = rows["drop"].sum()
        return float((rows["layer"] * rows["drop"]).sum() / total) if total > 0 else np.nan

    centres = frame.groupby(["fact_id", "source"]).apply(centre, include_groups=False).unstack()
    if not {"subject", "non_subject"} <= set(centres.columns):
        raise NotApplicable("the attention knockout has no subject and non-subject sources")
    return _depth(centres["subject"] - centres["non_subject"], n_layers).dropna()


def mlp_enrichment(store) -> pd.Series:
    """Per fact: mean change of the last subject token's attributes rate when MLP updates of the
    first half of the layers up to the target are knocked out, minus the same for attention updates
    (facts whose clean rate is 0 cannot drop and are left out).
    """
    frame = _read(store, "sublayer_knockout")
    frame = frame[(frame["sublayer"] != "none") & (frame["clean_rate"] > 0)]
    early = frame[frame["start_layer"] <= frame["target_layer"] / 2]
    means = early.groupby(["fact_id", "sublayer"])["change"].mean().unstack()
    if not {"mlp", "attn"} <= set(means.columns):
        raise NoEvidence("no fact has a non-zero attributes rate at the target layer to knock out")
    return (means["mlp"] - means["attn"]).dropna()


def attention_extracts(store) -> pd.Series:
    """Per fact: 1 if some layer's attention update extracts the attribute, minus 1 if some layer's
    MLP update does (Geva's extraction events).
    """
    frame = _read(store, "extraction_rate")
    if not (frame["attn_extracts"].any() or frame["mlp_extracts"].any()):
        raise NoEvidence(
            "no attention or MLP update of any layer ranks the attribute first for any fact: there is no "
            "extraction event to compare"
        )
    by_fact = frame.groupby("fact_id")[["attn_extracts", "mlp_extracts"]].any().astype(float)
    return by_fact["attn_extracts"] - by_fact["mlp_extracts"]


def ov_heads(store, d_vocab: int | None = None) -> pd.Series:
    """Per fact: ``−log10 p`` minus its null mean ``1/ln 10``, where ``p = 1 − (1 − (r + 1)/V)^H`` is
    the chance that ``H`` heads with uniformly random ranks map the subject to the attribute at a
    rank as good as the best head's ``r`` (0-based, vocabulary ``V``).
    """
    frame = _read(store, "head_mappings")
    d_vocab = d_vocab or store.read_manifest().get("model", {}).get("dims", {}).get("d_vocab")
    if not d_vocab:
        raise NotApplicable("the run does not record the vocabulary size (rerun with this version)")
    best = frame.groupby("fact_id")["mapping_rank"].min()
    heads = frame.groupby("fact_id").size()
    chance = -np.expm1(heads * np.log1p(-(best + 1) / d_vocab))
    return -np.log10(chance) - 1 / np.log(10)


# -- Meng et al. 2022 (ROME) ----------------------------------------------------------------------


def rome_sites(store) -> pd.Series:
    """Per fact: relative depth of the attention peak at the last token minus that of the MLP peak at
    the last subject token (indirect effects of causal tracing; the first corruption and direction).
    """
    frame = first_trace(_read(store, "causal_tracing"))
    n_layers = _n_layers(frame)

    def peak(kind: str, bucket: str) -> pd.Series:
        rows = frame[(frame["kind"] == kind) & (frame["bucket"] == bucket)]
        best = rows.loc[rows.groupby("fact_id")["indirect_effect"].idxmax()]
        return _depth(best.set_index("fact_id")["layer"], n_layers)

    return (peak("attn", "last token") - peak("mlp", "last subject")).dropna()


# -- Yu & Ananiadou 2024 ----------------------------------------------------------------------------


def top_neurons(store) -> pd.Series:
    """Per fact: log-probability drop when the top FFN neurons by log-probability increase are
    ablated, minus the mean drop over random neurons of the same budget (the first FFN-only budget).
    """
    frame = _read(store, "neuron_ablation")
    random = frame[frame["method"] == "random"]
    top = frame[frame["method"] == "logprob_increase"]
    shared = [b for b in top["budget"].unique() if b in set(random["budget"])]
    if not shared:
        raise NotApplicable("no random-neuron baseline shares a budget with the top neurons")
    budget = next((b for b in shared if "attn" not in b), shared[0])
    drop = top[top["budget"] == budget].groupby("fact_id")["logprob_drop"].mean()
    baseline = random[random["budget"] == budget].groupby("fact_id")["logprob_drop"].mean()
    return (drop - baseline).dropna()


def attention_vs_ffn(store) -> pd.Series:
    """Per fact: total log-probability increase of attention layers minus that of FFN layers."""
    frame = _read(store, "logprob_attribution")
    sums = frame.groupby(["fact_id", "sublayer"])["logprob_increase"].sum().unstack()
    return (sums.get("attn", np.nan) - sums.get("mlp", np.nan)).dropna()


# -- Yan & Jia 2025 ----------------------------------------------------------------------------------


def _promote_suppress(store) -> pd.DataFrame:
    early = _read(store, "early_decoding")
    lens = store.read_table("token_lens") if "token_lens" in store.methods() else None
    return per_fact_stats(early, lens)


def mlps_promote(store) -> pd.Series:
    """Per fact (mean over answer steps): upper MLPs' direct logit on the current answer."""
    stats = _promote_suppress(store)
    return stats.groupby("fact_id")["mlp_current"].mean().dropna()


def attention_suppresses(store) -> pd.Series:
    """Per fact (mean over steps after the first): attention from each previous answer's span on that
    answer, over the upper layers.
    """
    stats = _promote_suppress(store)
    if "lens_previous" not in stats or stats["lens_previous"].isna().all():
        raise NotApplicable(
            "no fact has an earlier answer to suppress (one-to-one facts, or token_lens not run): "
            "run one-to-many facts, e.g. --dataset country_cities"
        )
    return stats.groupby("fact_id")["lens_previous"].mean().dropna()


def _at_step(store, step: int, column: str) -> pd.Series:
    stats = _promote_suppress(store)
    at = stats[stats["step"] == step]
    if column not in at or at[column].isna().all():
        raise NotApplicable(f"answer step {step} has nothing to judge ({column})")
    return at.set_index("fact_id")[column].dropna()


def step_claims(store) -> tuple[Claim, ...]:
    """Yan & Jia's two claims once per answer step, when the run's facts have several steps
    (one-to-many lists); none otherwise.
    """
    if "early_decoding" not in store.methods():
        return ()
    steps = sorted(int(s) for s in store.read_table("early_decoding")["step"].unique())
    if len(steps) < 2:
        return ()
    out = []
    for step in steps:
        out.append(Claim(
            f"yan_jia.promote.step{step}", YAN,
            f"At answer step {step}, upper-layer MLPs promote the current answer.",
            "direct logit of the upper half's MLP updates on the current answer", "no promotion (0)",
            "early_decoding", functools.partial(_at_step, step=step, column="mlp_current"),
        ))  # fmt: skip
        if step > 1:
            out.append(Claim(
                f"yan_jia.suppress.step{step}", YAN,
                f"At answer step {step}, attention on each earlier answer's span suppresses that answer.",
                "direct logit of upper-layer attention from each previous answer's span on that answer",
                "no suppression (0)", "token_lens",
                functools.partial(_at_step, step=step, column="lens_previous"), side=-1,
            ))  # fmt: skip
    return tuple(out)


# -- Lv et al. 2024 ----------------------------------------------------------------------------------

TOP_HEADS = 5


def argument_heads(store) -> pd.Series:
    """Per fact: mean ``delta`` over all heads minus mean ``delta`` of the ``TOP_HEADS`` heads with the
    most negative mean ``delta`` on the *other* facts (leave-one-fact-out: no fact picks its own heads).
    """
    frame = _read(store, "argument_heads")
    per_head = frame.groupby(["fact_id", "layer", "head"])["delta"].mean().unstack("fact_id")
    out = {}
    for fact in per_head.columns:
        others = per_head.drop(columns=fact).mean(axis=1)
        if others.isna().all():
            continue
        top = others.nsmallest(TOP_HEADS).index
        out[fact] = per_head[fact].mean() - per_head.loc[top, fact].mean()
    return pd.Series(out, dtype=float)


def mlp_regression(store) -> pd.Series:
    """Per fact: adjusted R² of the MLP outputs on the heads' outputs, mean over layers (0: chance)."""
    frame = _read(store, "mlp_regression", "fit")
    return frame.groupby("fact_id")["r2_adjusted"].mean().dropna()


def final_layer(store) -> pd.Series:
    """Per fact: the final layer's direct change of the answer's logit."""
    frame = _read(store, "anti_overconfidence", "facts")
    return frame.set_index("fact_id")["final_layer_logit"].dropna()


def mitigation(store) -> pd.Series:
    """Per held-out fact: the answer's log-probability after the mitigation minus before."""
    frame = _read(store, "anti_overconfidence", "facts")
    held = frame[frame["split"] == "heldout"].set_index("fact_id")
    if held.empty:
        raise NotApplicable("no held-out fact (the mitigation is fitted and judged on separate facts)")
    return held["log_prob_after"] - held["log_prob_before"]


GEVA, ROME, YU = "Geva et al. 2023", "Meng et al. 2022 (ROME)", "Yu & Ananiadou 2024"
YAN, LV = "Yan & Jia 2025", "Lv et al. 2024"

CLAIMS: tuple[Claim, ...] = (
    Claim(
        "geva.flow_order", GEVA,
        "The relation's tokens flow to the last position at earlier layers than the subject's.",
        "depth of the subject→last knockout effect minus that of the non-subject→last effect (centres of "
        "mass of the probability drop over 9-layer windows)",
        "the same depth (0)", "attention_knockout", flow_order,
    ),
    Claim(
        "geva.mlp_enrichment", GEVA,
        "Early MLP updates enrich the last subject token with the subject's attributes.",
        "attributes-rate change at the last subject token when early MLP updates are knocked out, "
        "minus the change when early attention updates are",
        "knocking out attention instead (0)", "sublayer_knockout", mlp_enrichment, side=-1,
    ),
    Claim(
        "geva.extraction", GEVA,
        "Attention extracts the attribute at the last position more often than MLPs do.",
        "per fact 1 if some attention update extracts the attribute, minus 1 if some MLP update does",
        "as often (0)", "extraction_rate", attention_extracts,
    ),
    Claim(
        "geva.ov_heads", GEVA,
        "Some attention heads map the subject to the attribute in their OV circuit.",
        "−log10 of the chance that as many random heads reach the best head's attribute rank, minus its "
        "null mean 1/ln 10",
        "heads with random ranks (0)", "head_mappings", ov_heads,
    ),
    Claim(
        "rome.sites", ROME,
        "Early MLPs at the last subject token and later attention at the last token carry the effect.",
        "depth of the attention peak at the last token minus depth of the MLP peak at the last subject "
        "token (indirect effects, layers as fractions of the depth)",
        "peaks at the same depth (0)", "causal_tracing", rome_sites,
    ),
    Claim(
        "yu.top_neurons", YU,
        "The neurons with the largest log-probability increase matter more than random neurons.",
        "log-probability drop when the top FFN neurons are ablated minus the drop for as many random ones",
        "random neurons of the same budget", "neuron_ablation", top_neurons,
    ),
    Claim(
        "yu.attention_vs_ffn", YU,
        "Attention and FFN layers add different amounts to the answer's log-probability.",
        "total log-probability increase of attention layers minus that of FFN layers",
        "equal shares (0)", "logprob_attribution", attention_vs_ffn, side=0,
        sides=("FFN layers add more", "attention layers add more"),
    ),
    Claim(
        "yan_jia.promote", YAN,
        "Upper-layer MLPs promote the current answer.",
        "direct logit of the upper half's MLP updates on the current answer (mean over answer steps)",
        "no promotion (0)", "early_decoding", mlps_promote,
    ),
    Claim(
        "yan_jia.suppress", YAN,
        "Attention reading an earlier answer's span suppresses that answer.",
        "direct logit of upper-layer attention from each previous answer's span on that answer",
        "no suppression (0)", "token_lens", attention_suppresses, side=-1,
    ),
    Claim(
        "lv.argument_heads", LV,
        "Some heads pass the subject (the function's argument) to the last position.",
        f"mean patching change over all heads minus that of the {TOP_HEADS} heads with the largest drop on "
        "the other facts",
        "random heads (the mean over all heads)", "argument_heads", argument_heads,
    ),
    Claim(
        "lv.mlp_regression", LV,
        "MLP outputs are linear in the heads' outputs (MLPs amplify or erase them).",
        "adjusted R² of the MLP output on the same layer's head outputs, mean over layers",
        "chance fit (0)", "mlp_regression", mlp_regression,
    ),
    Claim(
        "lv.final_layer", LV,
        "The final layer lowers the answer's logit (anti-overconfidence).",
        "the final layer's direct change of the answer's logit",
        "no change (0)", "anti_overconfidence", final_layer, side=-1,
    ),
    Claim(
        "lv.mitigation", LV,
        "Scaling down the most suppressive component raises held-out answers' log-probability.",
        "log-probability of the answer after the mitigation minus before, on held-out facts",
        "no gain (0)", "anti_overconfidence", mitigation,
    ),
)  # fmt: skip
