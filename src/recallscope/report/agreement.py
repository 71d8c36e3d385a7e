"""Cross-method agreement: do the methods put the recall in the same layers and heads?

Each method that measures a component gives a **profile**: one importance value per layer (or per
head), the mean over facts, signed so that larger means "carries more of the answer":

============  =======================================================================================
component     profiles
============  =======================================================================================
``mlp``       causal tracing (MLP window at the last subject token, indirect effect); log-probability
              attribution (FFN layers' log-probability increase); attribution patching (MLP update,
              ``−atp`` summed over positions: the metric's drop when the update is corrupted)
``attention`` causal tracing (attention window at the last token); attention knockout (subject →
              last, % drop of p(prediction)); log-probability attribution (attention layers);
              attribution patching (heads' ``−atp`` summed over heads and positions)
``head``      log-probability attribution (per head); attribution patching (``−atp`` summed over
              positions); argument heads (``−delta``: the answer's drop when the head's path from the
              subject is patched)
============  =======================================================================================

For every pair of profiles of a component: Spearman ρ over the layers (heads) both have, and the
overlap of their top ``k`` (``|A ∩ B| / k``; ``k`` = 5 layers or 10 heads, at most half of them).

::

    profiles = layer_profiles(store)      # component, method, layer, head, value
    pairs = agreement_pairs(profiles)     # component, method_a, method_b, spearman, top_overlap, k, n
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import combinations

import numpy as np
import pandas as pd

from recallscope.methods.general.summaries import first_trace

__all__ = ["layer_profiles", "agreement_pairs", "profile_figure", "agreement_section", "PROFILES"]

Profile = Callable[[object], pd.DataFrame]
"""``store → rows (layer, head, value)`` per fact: ``fact_id, layer, head, value`` (head −1 for layers)."""


def _trace(store, kind: str, bucket: str) -> pd.DataFrame:
    frame = first_trace(store.read_table("causal_tracing"))
    rows = frame[(frame["kind"] == kind) & (frame["bucket"] == bucket)]
    return rows.assign(head=-1, value=rows["indirect_effect"])


def _logprob(store, sublayer: str) -> pd.DataFrame:
    frame = store.read_table("logprob_attribution")
    rows = frame[frame["sublayer"] == sublayer]
    return rows.assign(head=-1, value=rows["logprob_increase"])


def _atp(store, node: str, per_head: bool) -> pd.DataFrame:
    frame = store.read_table("attribution_patching")
    rows = frame[frame["node"] == node]
    keys = ["fact_id", "layer", "index"] if per_head else ["fact_id", "layer"]
    summed = (-rows.groupby(keys)["atp"].sum()).rename("value").reset_index()
    return summed.rename(columns={"index": "head"}) if per_head else summed.assign(head=-1)


def _knockout(store) -> pd.DataFrame:
    frame = store.read_table("attention_knockout")
    rows = frame[frame["source"] == "subject"]
    return rows.assign(head=-1, value=-rows["change_pct"])


def _logprob_heads(store) -> pd.DataFrame:
    frame = store.read_table("logprob_attribution", "heads")
    return frame.assign(value=frame["logprob_increase"])


def _argument_heads(store) -> pd.DataFrame:
    frame = store.read_table("argument_heads")
    return frame.assign(value=-frame["delta"])


PROFILES: dict[str, dict[str, tuple[str, Profile]]] = {
    "mlp": {
        "causal tracing": ("causal_tracing", lambda s: _trace(s, "mlp", "last subject")),
        "log-prob attribution": ("logprob_attribution", lambda s: _logprob(s, "mlp")),
        "attribution patching": ("attribution_patching", lambda s: _atp(s, "mlp", False)),
    },
    "attention": {
        "causal tracing": ("causal_tracing", lambda s: _trace(s, "attn", "last token")),
        "attention knockout": ("attention_knockout", _knockout),
        "log-prob attribution": ("logprob_attribution", lambda s: _logprob(s, "attn")),
        "attribution patching": ("attribution_patching", lambda s: _atp(s, "head", False)),
    },
    "head": {
        "log-prob attribution": ("logprob_attribution", _logprob_heads),
        "attribution patching": ("attribution_patching", lambda s: _atp(s, "head", True)),
        "argument heads": ("argument_heads", _argument_heads),
    },
}


_METHOD_NAMES = list(dict.fromkeys(name for methods in PROFILES.values() for name in methods))


def layer_profiles(store) -> pd.DataFrame:
    """Every available profile, mean over facts: ``component, method, layer, head, value, n_facts``
    (``head`` −1 for layer profiles).
    """
    frames = []
    available = set(store.methods())
    for component, methods in PROFILES.items():
        for name, (method, rows) in methods.items():
            if method not in available:
                continue
            try:
                per_fact = rows(store)
            except KeyError:  # a table this run did not store (or an older run's columns)
                continue
            if per_fact.empty or per_fact["value"].isna().all():
                continue
            mean = per_fact.groupby(["layer", "head"])["value"].agg(["mean", "count"]).reset_index()
            frames.append(mean.rename(columns={"mean": "value", "count": "n_facts"}).assign(
                component=component, method=name))  # fmt: skip
    columns = ["component", "method", "layer", "head", "value", "n_facts"]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


def _top(values: pd.Series, k: int) -> set:
    return set(values.sort_values(ascending=False, kind="stable").index[:k])


def agreement_pairs(profiles: pd.DataFrame, *, top_layers: int = 5, top_heads: int = 10) -> pd.DataFrame:
    """Per component and pair of methods: ``spearman`` over the shared layers (heads), ``top_overlap``
    ``|A ∩ B| / k`` of their top ``k``, ``k`` and ``n`` (shared layers or heads).
    """
    rows = []
    for component, part in profiles.groupby("component", sort=False):
        series = {m: p.set_index(["layer", "head"])["value"] for m, p in part.groupby("method", sort=False)}
        for a, b in combinations(series, 2):
            shared = series[a].index.intersection(series[b].index)
            if len(shared) < 3:
                continue
            x, y = series[a][shared], series[b][shared]
            k = min(top_heads if component == "head" else top_layers, len(shared) // 2)
            rho = x.rank().corr(y.rank()) if x.nunique() > 1 and y.nunique() > 1 else np.nan
            overlap = len(_top(x, k) & _top(y, k)) / k if k else np.nan
            rows.append((component, a, b, float(rho), float(overlap), k, len(shared)))
    columns = ["component", "method_a", "method_b", "spearman", "top_overlap", "k", "n"]
    return pd.DataFrame(rows, columns=columns)


def profile_figure(profiles: pd.DataFrame):
    """The layer profiles of ``mlp`` and ``attention``, each scaled to its largest ``|value|``, one
    panel per component (the methods' curves overlaid).
    """
    import matplotlib.pyplot as plt

    layers = profiles[profiles["head"] < 0]
    components = [c for c in ("mlp", "attention") if c in set(layers["component"])]
    fig, axes = plt.subplots(1, max(1, len(components)), figsize=(6.4 * max(1, len(components)) / 1.4, 3.4),
                             squeeze=False)  # fmt: skip
    for ax, component in zip(axes[0], components, strict=False):
        for method, part in layers[layers["component"] == component].groupby("method", sort=False):
            scale = part["value"].abs().max()
            color = f"C{_METHOD_NAMES.index(method)}"  # one colour per method in every panel
            ax.plot(part["layer"], part["value"] / (scale if scale > 0 else 1), label=method, color=color)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_title(f"{'MLP' if component == 'mlp' else 'Attention'} layers")
        ax.set_xlabel("layer")
        ax.set_ylabel("importance / its largest |value|")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def agreement_section(store, folder):
    """The report's "Where the methods agree" section (None when no component has two profiles)."""
    from recallscope.report.figures import save_figure
    from recallscope.report.section import Section, Table

    profiles = layer_profiles(store)
    pairs = agreement_pairs(profiles)
    if pairs.empty:
        return None
    section = Section(
        "agreement",
        "Where the methods agree",
        "Each method that measures a component ranks its layers (or heads) by how much of the answer "
        "they carry, as a mean over facts; pairs of methods are compared by Spearman's ρ over the "
        "layers or heads and by the overlap of their top k. The methods answer different questions "
        "(causal tracing: the effect of restoring a state; log-probability attribution: a layer's "
        "direct push on the answer at the last position; attribution patching: the first-order "
        "effect of corrupting it), so disagreement locates where those questions part.",
    )
    title = "Layer profiles of the methods that measure MLP and attention layers"
    section.figures.append(save_figure(profile_figure(profiles), folder, "agreement_profiles", title))
    shown = pairs.rename(
        columns={"method_a": "method", "method_b": "against", "top_overlap": "top-k overlap"}
    )
    section.tables.append(
        Table.of("Agreement between methods (ρ over layers or heads; top-k overlap)", shown, 3)
    )
    return section
