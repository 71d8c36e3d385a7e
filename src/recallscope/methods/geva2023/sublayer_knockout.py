"""Sublayer knockout: which updates enrich the subject representation (Geva et al. 2023, ``methods.md`` G3).

Target: the attributes rate (AR, G2 and :mod:`recallscope.core.attributes`) of the **last subject
token** read at ``resid_post[ℓ*]``, the output of block ``ℓ*`` (HF ``hidden_states[ℓ* + 1]``; Geva:
``ℓ* = 40`` of GPT-2 XL's 48 blocks; by default here ``round(40·L/48)``). For every start layer
``s = 0..ℓ*`` and sublayer type (``mlp``, ``attn``), the sublayer's update is removed at **all
positions** in the blocks ``[s, min(s + k, ℓ* + 1))`` (block ``ℓ*`` itself included: its update is
part of its output), and AR is measured again. The unablated run gives ``clean_rate``.

Removal modes:

- ``mlp_mode="zero"`` (default): the MLP update added to the residual (``mlp_out``) is 0.
  ``"as_coded"``: the neuron activations (``mlp_post``) are 0, as the reference code's zeroed
  pre-activations give (``act(0) = 0``), so the update is the MLP output bias.
- ``attn_mode="zero"`` (default): the attention update (``attn_out``) is 0. ``"as_coded"``: the
  attention probabilities are uniform over each query's causal, non-padding prefix (what the
  reference code's all-``finfo.min`` mask does), so the update is the mean of the value vectors
  passed through ``W_O`` (plus ``b_O``). Sliding windows are ignored in this mode.

The ``geva`` preset is the reference code: both modes ``as_coded``, window 11 (the code's
``range(s, s + 10 + 1)``; the paper's text says 10), raw ``E·h`` readout, references not lowercased.

Fast by construction: every (fact, sublayer, start) and each fact's unablated run is a batch row
whose hooks ablate only the rows whose window covers the layer; the forward stops after block ``ℓ*``,
so a chunk of facts takes ``ceil(rows / max_batch_rows)`` partial forwards. The naive loop (one
unpadded forward per fact × sublayer × start) is in ``tests/oracles`` and gives the same numbers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
import pandas as pd
import torch

from recallscope.core.attributes import (
    Readout,
    TokenFilter,
    attributes_rate,
    clean_token_mask,
    clean_top_tokens,
    readout,
    reference_masks,
    texts_for,
    with_subject_objects,
)
from recallscope.core.cache import forward_floats, run_with_cache
from recallscope.core.sublayer_removal import MODES, SUBLAYERS, SublayerMode, knock_out, knockout_window
from recallscope.core.tokens import PromptBatch, as_batch
from recallscope.core.vocab import decode_tokens, readout_floats
from recallscope.data.facts import FactSet
from recallscope.errors import RecallscopeError
from recallscope.methods.base import Cost, MethodConfig, MethodResult, result_provenance
from recallscope.methods.hints import DISTINCT, NON_EMPTY, NonNegative, Positive
from recallscope.models.model import Model
from recallscope.models.sites import Site
from recallscope.stats import mean_ci

__all__ = [
    "NAME",
    "DESCRIPTION",
    "SUBLAYERS",
    "MODES",
    "Config",
    "SublayerKnockoutResult",
    "run",
    "prepare",
    "cost",
    "knock_out",
    "knockout_window",
    "resolve_target_layer",
]

NAME = "sublayer_knockout"
DESCRIPTION = (
    "Attributes rate of the last subject token with MLP / attention updates removed in windows (Geva 2023)."
)
CHUNK_SIZE = 8
TOP_TOKENS_SHOWN = 10
"""Clean top tokens of the unablated target state listed in the ``top_tokens`` table."""


@dataclass(frozen=True, kw_only=True)
class Config(MethodConfig):
    """Sublayer-knockout settings; clean defaults, the reference code as preset ``geva``."""

    target_layer: NonNegative | None = None
    """Block whose output is read (0-based); None = ``round(40·L/48)`` clipped to ``[0, L-1]``."""
    window: Positive = 10
    """Blocks knocked out from each start layer (the paper's text: 10; its code: 11)."""
    sublayers: Annotated[tuple[Literal[SUBLAYERS], ...], NON_EMPTY, DISTINCT] = SUBLAYERS
    """Sublayer types knocked out, each in its own rows: ``mlp`` and/or ``attn``."""
    mlp_mode: SublayerMode = "zero"
    """``zero``: MLP update = 0; ``as_coded``: neuron activations = 0 (update = output bias)."""
    attn_mode: SublayerMode = "zero"
    """``zero``: attention update = 0; ``as_coded``: uniform attention over the causal prefix."""
    readout: Readout = "logit_lens"
    """Vocabulary projection of the target state (Geva: ``raw_embed``, ``E·h``)."""
    top_k: Positive = 500
    """Top tokens of the projection before cleaning (Geva: 500)."""
    keep: Positive = 50
    """Clean top tokens kept (Geva: 50)."""
    min_length: NonNegative = 3
    """Tokens whose stripped text is shorter are dropped (Geva: ``len(strip()) <= 2``)."""
    lowercase_references: bool = True
    """Lowercase reference tokens before the stopword test (Geva's code: only predictions)."""
    subject_objects: Mapping[str, tuple[str, ...]] | None = None
    """Subject → answers over the whole dataset (filled by :func:`prepare`); references of facts
    without a description. None = gathered from the facts of each run only."""
    max_batch_rows: Positive = 128
    """Rows (fact × sublayer × start, plus the unablated row) per forward (memory bound)."""

    PRESETS = {
        "geva": dict(
            window=11,
            sublayers=SUBLAYERS,
            mlp_mode="as_coded",
            attn_mode="as_coded",
            readout="raw_embed",
            top_k=500,
            keep=50,
            min_length=3,
            lowercase_references=False,
        )
    }

    def __post_init__(self) -> None:
        if self.keep > self.top_k:
            raise RecallscopeError(
                f"need keep <= top_k, got keep={self.keep}, top_k={self.top_k} (Geva: top_k=500, keep=50)"
            )

    @property
    def token_filter(self) -> TokenFilter:
        return TokenFilter(self.top_k, self.keep, self.min_length, self.lowercase_references)

    def mode(self, sublayer: str) -> str:
        """The removal mode of ``sublayer`` (``mlp`` or ``attn``)."""
        return self.mlp_mode if sublayer == "mlp" else self.attn_mode


@dataclass(frozen=True)
class SublayerKnockoutResult(MethodResult):
    """Attributes rates ``[fact, sublayer, start]`` with knockouts, and each fact's unablated rate."""

    sublayers: list[str]
    target_layer: int
    rate: np.ndarray
    """``[fact, sublayer, start]`` AR in percent (NaN: no references or no clean top token)."""
    clean_rate: np.ndarray
    """``[fact]`` AR of the unablated run."""
    n_top: np.ndarray
    """``[fact, sublayer, start]`` clean top tokens kept (≤ keep)."""
    clean_n_top: np.ndarray
    """``[fact]``"""
    has_references: np.ndarray
    """``[fact]`` bool: the fact has at least one reference token."""
    top_tokens: list[list[str]]
    """Per fact, the first clean top tokens of the unablated target state."""
    top_in_references: list[list[bool]]

    @property
    def starts(self) -> np.ndarray:
        """``[start]`` start layers ``0..target_layer``."""
        return np.arange(self.rate.shape[-1])

    def to_frame(self) -> pd.DataFrame:
        """One row per fact × sublayer × start layer, after one ``sublayer="none"`` row per fact
        (the unablated run: ``start_layer = window_start = window_stop = -1``).
        """
        n_facts, n_sub, n_starts = self.rate.shape
        windows = [knockout_window(s, self.config.window, self.target_layer) for s in range(n_starts)]
        per_fact = 1 + n_sub * n_starts
        sublayer = ["none", *np.repeat(self.sublayers, n_starts)]
        start = np.concatenate([[-1], np.tile(np.arange(n_starts), n_sub)])
        w_start = np.concatenate([[-1], np.tile([w.start for w in windows], n_sub)])
        w_stop = np.concatenate([[-1], np.tile([w.stop for w in windows], n_sub)])
        rate = np.concatenate([self.clean_rate[:, None], self.rate.reshape(n_facts, -1)], 1).reshape(-1)
        n_top = np.concatenate([self.clean_n_top[:, None], self.n_top.reshape(n_facts, -1)], 1).reshape(-1)
        clean = np.repeat(self.clean_rate, per_fact)
        return pd.DataFrame(
            {
                "fact_id": np.repeat(np.array(self.fact_ids, dtype=object), per_fact),
                "sublayer": np.tile(np.array(sublayer, dtype=object), n_facts),
                "start_layer": np.tile(start, n_facts),
                "window_start": np.tile(w_start, n_facts),
                "window_stop": np.tile(w_stop, n_facts),
                "target_layer": self.target_layer,
                "attributes_rate": rate,
                "clean_rate": clean,
                "change": rate - clean,
                "n_top": n_top.astype(np.int64),
                "has_references": np.repeat(self.has_references, per_fact),
            }
        )

    def tables(self) -> dict[str, pd.DataFrame]:
        """``{"top_tokens": fact_id, rank, token, in_references}``: the unablated state's first
        clean top tokens (up to 10 per fact).
        """
        frames = [
            pd.DataFrame(
                {
                    "fact_id": pd.Series([fact] * len(tokens), dtype=object),
                    "rank": np.arange(len(tokens)),
                    "token": pd.Series(tokens, dtype=object),
                    "in_references": np.array(hits, dtype=bool),
                }
            )
            for fact, tokens, hits in zip(self.fact_ids, self.top_tokens, self.top_in_references, strict=True)
        ]
        return {"top_tokens": pd.concat(frames, ignore_index=True)} if frames else {}

    def summary(self) -> pd.DataFrame:
        """Per sublayer × window, the attributes rate without the window and its change: means over
        facts with 95% normal-approximation bands (``*_ci``) and ``n``.
        """
        return mean_ci(
            self.to_frame(),
            ["sublayer", "start_layer", "window_start", "window_stop"],
            ["attributes_rate", "clean_rate", "change"],
        )

    def arrays(self) -> dict[str, np.ndarray]:
        """Per fact ``rate [sublayer, start]`` (sublayers in ``self.sublayers`` order)."""
        return self.per_fact(rate=self.rate)


# -- conventions -----------------------------------------------------------------------------------


def resolve_target_layer(model: Model, config: Config) -> int:
    """``config.target_layer``, or ``round(40·L/48)`` clipped to ``[0, L-1]`` (Geva: 40 of 48)."""
    n_layers = model.n_layers
    default = min(max(round(40 * n_layers / 48), 0), n_layers - 1)
    if config.target_layer is None:
        return default
    if not 0 <= config.target_layer < n_layers:
        raise RecallscopeError(
            f"target_layer={config.target_layer} is out of range: the model has {n_layers} blocks "
            f"(0..{n_layers - 1}); pass one of those, or None for round(40·L/48) = {default}"
        )
    return config.target_layer


# -- run -------------------------------------------------------------------------------------------


def prepare(
    model: Model, facts: PromptBatch | FactSet, config: Config, dataset: FactSet | None = None
) -> Config:
    """Gather the answers about subjects without a description over the facts of the run (the runner
    calls this before chunking; ``dataset``, the whole loaded dataset, is not read).
    """
    return with_subject_objects(config, facts)


def run(
    model: Model,
    facts: PromptBatch | FactSet,
    config: Config | None = None,
    *,
    references: Sequence[Sequence[str]] | None = None,
) -> SublayerKnockoutResult:
    """Knock out every (sublayer, window) for every fact and measure the attributes rate.

    Args:
        model: the model.
        facts: a :class:`FactSet` (references from :func:`reference_texts`) or a
            :class:`PromptBatch` with a ``subject`` span (then ``references`` is required).
        config: settings (default :class:`Config`).
        references: one sequence of texts about the subject per fact (overrides the facts').
    """
    config = config or Config()
    texts = texts_for(facts, config.subject_objects, references, NAME)
    batch = as_batch(model, facts)
    target = resolve_target_layer(model, config)
    last_subject = _last_subject(batch)  # [B]
    refs = reference_masks(model, texts, config.token_filter)  # [B, V]
    fact, kind, start, stop = _rows(len(batch), config, target)
    states = _states(model, batch, last_subject, (fact, kind, start, stop), config, target)  # [R, d]
    rates, count, top = _attributes(model, states, refs[fact], config)  # [R], [R], [R, keep]
    per_fact = 1 + len(config.sublayers) * (target + 1)
    rates, count = rates.view(len(batch), per_fact), count.view(len(batch), per_fact)
    clean_top = top.view(len(batch), per_fact, -1)[:, 0, :TOP_TOKENS_SHOWN]
    return SublayerKnockoutResult(
        config=config,
        fact_ids=list(batch.fact_ids or map(str, range(len(batch)))),
        sublayers=list(config.sublayers),
        target_layer=target,
        rate=rates[:, 1:].reshape(len(batch), len(config.sublayers), target + 1).numpy(),
        clean_rate=rates[:, 0].numpy(),
        n_top=count[:, 1:].reshape(len(batch), len(config.sublayers), target + 1).numpy(),
        clean_n_top=count[:, 0].numpy(),
        has_references=refs.any(-1).numpy(),
        top_tokens=[decode_tokens(model, row[row >= 0]) for row in clean_top],
        top_in_references=[refs[b][row[row >= 0]].tolist() for b, row in enumerate(clean_top)],
        provenance=_provenance(
            model, config, target, references is not None or isinstance(facts, PromptBatch)
        ),
    )


def _attributes(model, states, refs, config: Config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AR ``[R]``, clean top tokens kept ``[R]`` and their ids ``[R, keep]`` (−1 = none), on the CPU.

    ``states [R, d_model]``; ``refs [R, V]`` bool reference tokens of each row's fact.
    """
    k = min(config.top_k, (model.W_E if config.readout == "raw_embed" else model.W_U).shape[0])
    projection = readout(model, states, config.readout, k=k)
    top, count = clean_top_tokens(projection, clean_token_mask(model, config.token_filter), config.keep)
    return attributes_rate(top, refs.to(top.device)).cpu(), count.cpu(), top.cpu()


def _last_subject(batch: PromptBatch) -> torch.Tensor:
    """``[B]`` padded position of each prompt's last subject token."""
    span = batch.spans.get("subject")
    if span is None or (span[:, 0] < 0).any() or (span[:, 1] <= span[:, 0]).any():
        raise RecallscopeError("sublayer knockout needs a subject span in every prompt")
    return span[:, 1] - 1


def _rows(n_facts: int, config: Config, target: int) -> tuple[torch.Tensor, ...]:
    """Every row: ``fact [R]``, ``kind [R]`` (−1 = unablated, else index into ``config.sublayers``),
    ``start [R]``, ``stop [R]`` (window ``[start, stop)``; −1 for unablated rows).

    Each fact's rows are consecutive: unablated first, then sublayer-major, start-minor.
    """
    n_sub, n_starts = len(config.sublayers), target + 1
    per_fact = 1 + n_sub * n_starts
    none = torch.tensor([-1])
    fact = torch.arange(n_facts).repeat_interleave(per_fact)
    kind = torch.cat([none, torch.arange(n_sub).repeat_interleave(n_starts)]).repeat(n_facts)
    start = torch.cat([none, torch.arange(n_starts).repeat(n_sub)]).repeat(n_facts)
    stop = torch.where(kind >= 0, (start + config.window).clamp(max=n_starts), -1)
    return fact, kind, start, stop


def _states(model, batch, last_subject, rows, config: Config, target: int) -> torch.Tensor:
    """``[R, d_model]`` ``resid_post[target]`` at the last subject token of every row."""
    fact, kind, start, stop = rows
    site = Site(target, "resid_post")
    out = []
    for begin in range(0, len(fact), config.max_batch_rows):
        part = slice(begin, begin + config.max_batch_rows)
        sub = batch.select(fact[part])
        positions = last_subject[fact[part]][:, None]  # [r, 1]
        with _window_knockouts(model, sub, kind[part], start[part], stop[part], config, target):
            cache = run_with_cache(model, sub, [site], positions=positions)
        out.append(cache[site][:, 0])
    return torch.cat(out)


@contextlib.contextmanager
def _window_knockouts(model, sub: PromptBatch, kind, start, stop, config: Config, target: int):
    """Hooks on blocks ``0..target`` removing each row's sublayer inside its window."""
    with contextlib.ExitStack() as stack:
        for layer in range(target + 1):
            inside = (start <= layer) & (layer < stop)  # [r]
            for k, sublayer in enumerate(config.sublayers):
                rows = inside & (kind == k)
                if rows.any():
                    hook = knock_out(
                        model,
                        layer,
                        sublayer,
                        config.mode(sublayer),
                        rows=rows,
                        attention_mask=sub.attention_mask,
                    )
                    stack.enter_context(hook)
        yield


def _provenance(model: Model, config: Config, target: int, given_references: bool) -> dict:
    rule = (
        "given" if config.target_layer is not None else "round(40*L/48) clipped to [0, L-1] (Geva: 40 of 48)"
    )
    refs = (
        "given by the caller"
        if given_references
        else "fact description, else the other answers about the subject"
    )
    if not given_references:
        refs += " over the whole dataset" if config.subject_objects is not None else " in this run's facts"
    return result_provenance(
        model,
        config,
        readout=config.readout,
        target_layer=target,
        target_layer_rule=rule,
        target_state="resid_post[target_layer]: output of that block (HF hidden_states[target_layer+1])",
        position="last subject token (subject span end - 1)",
        window=config.window,
        window_rule="start s = 0..target_layer; blocks [s, min(s + window, target_layer + 1))",
        knockout_positions="all positions",
        mlp_mode={"zero": "mlp_out = 0", "as_coded": "mlp_post = 0 (update = MLP output bias)"}[
            config.mlp_mode
        ],
        attn_mode={
            "zero": "attn_out = 0",
            "as_coded": "uniform probabilities over the causal non-padding prefix (sliding windows ignored)",
        }[config.attn_mode],
        token_filter=dict(
            top_k=config.top_k,
            keep=config.keep,
            min_length=config.min_length,
            lowercase_references=config.lowercase_references,
            stopwords="scikit-learn English",
        ),
        references=refs,
        none_rows="sublayer 'none' = unablated run; start_layer = window_start = window_stop = -1",
        layers="0-based blocks",
        bos=model.bos,
    )


def cost(model: Model, batch: PromptBatch | FactSet, config: Config | None = None) -> Cost:
    """Forwards: ``ceil(rows / max_batch_rows)``, each stopped after the target block."""
    config = config or Config()
    batch = as_batch(model, batch)
    target = resolve_target_layer(model, config)
    rows = len(batch) * (1 + len(config.sublayers) * (target + 1))
    forwards = -(-rows // config.max_batch_rows)
    width = min(rows, config.max_batch_rows)
    # a forward stopped after the target block, then (its activations freed) the kept rows' readouts
    readouts = readout_floats(model, rows)
    floats = max(forward_floats(model, width, batch.seq_len, logits=0), readouts)
    floats += rows * (model.d_model + config.top_k)
    work = float(rows * batch.seq_len * (target + 1))
    return Cost(forwards, work, floats * model.dtype.itemsize, vocab_rows=rows)
