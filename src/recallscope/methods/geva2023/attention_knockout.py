"""Attention knockout: information flow to the last position (Geva et al. 2023, ``methods.md`` G1).

For every centre layer ``ℓ`` and source set ``P`` (``subject``, ``non_subject`` = every other prompt
position before the last, ``last`` = the last position itself), block the last position's attention
to ``P`` in all heads of the window ``W(ℓ) = [max(0, ℓ - ⌊k/2⌋), min(L, ℓ - (-k//2)))`` and measure the
probability of the model's clean top-1 token: ``change_pct = 100·(p' - p)/p``. With ``token_map``,
each prompt position is also blocked on its own (same windows): a ``[positions × layers]`` map of
``p'`` per fact.

Modes: ``pre_softmax`` (default: −∞ on the blocked scores, softmax renormalizes over the rest, as
the reference code's additive mask) or ``post_softmax_zero`` (blocked probabilities set to 0 after
the softmax, not renormalized).

Fast by construction: every (fact, source set, window) is a batch row with its own mask, and a
knockout changes nothing below its window nor at any position but the last. So each row resumes the
fact's recorded clean run at its window's first block and runs the last position only, reading the
recorded keys and values of the others (:mod:`recallscope.core.resume`); rows that start at the same
block share a forward, ``max_batch_rows`` at a time. The naive loop (one full forward per fact × set
× layer) is in ``tests/oracles`` and gives the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
import pandas as pd
import torch

from recallscope.core.cache import forward, forward_floats
from recallscope.core.decoding import choose_targets
from recallscope.core.dtypes import upcast
from recallscope.core.knockout import KnockoutMode, block_attention
from recallscope.core.patching import window
from recallscope.core.resume import equal_length_rows, record_run, resume
from recallscope.core.tokens import PromptBatch, as_batch
from recallscope.core.vocab import decode_tokens
from recallscope.data.facts import FactSet
from recallscope.errors import RecallscopeError
from recallscope.methods.base import Cost, MethodConfig, MethodResult, result_provenance
from recallscope.methods.hints import NON_EMPTY, Positive
from recallscope.models.model import Model
from recallscope.stats import mean_ci

__all__ = ["NAME", "DESCRIPTION", "Config", "AttentionKnockoutResult", "run", "cost", "window", "SOURCES"]

NAME = "attention_knockout"
DESCRIPTION = "Block the last token's attention to subject / other / itself in layer windows (Geva 2023)."
CHUNK_SIZE = 8
SOURCES = ("subject", "non_subject", "last")


@dataclass(frozen=True, kw_only=True)
class Config(MethodConfig):
    """Attention-knockout settings; defaults follow Geva et al.'s code for GPT-2 XL (``geva``)."""

    window: Positive = 9
    """Layers blocked around each centre layer (GPT-2 XL: 9)."""
    mode: KnockoutMode = "pre_softmax"
    sources: Annotated[tuple[Literal[SOURCES], ...], NON_EMPTY] = SOURCES
    """Source sets whose edges to the last position are blocked: subject, non_subject, last."""
    target: Literal["top1", "gold"] = "top1"
    """Token whose probability is measured: the model's clean top-1 (Geva) or the gold answer's first."""
    token_map: bool = True
    """Also block each prompt position on its own: a ``[positions × layers]`` map per fact."""
    max_batch_rows: Positive = 128
    """Knocked-out rows per forward (memory bound)."""

    PRESETS = {"geva": dict(window=9, mode="pre_softmax", sources=SOURCES, target="top1")}


@dataclass(frozen=True)
class AttentionKnockoutResult(MethodResult):
    """``prob [fact, source, layer]`` after knockout, the clean ``p``, and the optional token maps."""

    sources: list[str]
    clean_prob: np.ndarray
    """``[fact]``"""
    prob: np.ndarray
    """``[fact, source, layer]``"""
    target_tokens: list[str]
    subject_at_start: list[bool]
    tokens: list[list[str]]
    token_maps: list[np.ndarray | None]
    """Per fact ``[positions, layers]`` probability with one source position blocked."""

    def to_frame(self) -> pd.DataFrame:
        """One row per fact × source set × centre layer."""
        n_facts, n_sources, n_layers = self.prob.shape
        f, s, layer = (a.reshape(-1) for a in np.indices(self.prob.shape))
        window_size = self.config.window
        starts = [window(int(x), window_size, n_layers) for x in layer]
        clean = self.clean_prob[f]
        return pd.DataFrame(
            {
                "fact_id": np.array(self.fact_ids, dtype=object)[f],
                "source": np.array(self.sources, dtype=object)[s],
                "layer": layer,
                "window_start": [w.start for w in starts],
                "window_stop": [w.stop for w in starts],
                "prob": self.prob.reshape(-1),
                "clean_prob": clean,
                "change_pct": 100 * (self.prob.reshape(-1) - clean) / clean,
                "change_abs": self.prob.reshape(-1) - clean,
                "target": np.array(self.target_tokens, dtype=object)[f],
                "subject_at_start": np.array(self.subject_at_start)[f],
            }
        )

    def tables(self) -> dict[str, pd.DataFrame]:
        """``{"tokens": one row per fact × position × layer of the token maps}`` (when computed)."""
        frames = []
        for fact_id, tokens, grid, clean in zip(
            self.fact_ids, self.tokens, self.token_maps, self.clean_prob, strict=True
        ):
            if grid is None:
                continue
            n_pos, n_layers = grid.shape
            frames.append(
                pd.DataFrame(
                    {
                        "fact_id": fact_id,
                        "position": np.repeat(np.arange(n_pos), n_layers),
                        "layer": np.tile(np.arange(n_layers), n_pos),
                        "token": np.repeat(tokens, n_layers),
                        "prob": grid.reshape(-1),
                        "change_pct": 100 * (grid.reshape(-1) - clean) / clean,
                    }
                )
            )
        return {"tokens": pd.concat(frames, ignore_index=True)} if frames else {}

    def summary(self) -> pd.DataFrame:
        """Per source × window, the knocked-out probability and its change: means over facts with
        95% normal-approximation bands (``*_ci``) and ``n``.
        """
        return mean_ci(
            self.to_frame(),
            ["source", "layer", "window_start", "window_stop"],
            ["prob", "clean_prob", "change_pct", "change_abs"],
        )

    def arrays(self) -> dict[str, np.ndarray]:
        """Per fact ``prob`` ``[source, layer]`` and ``token_map`` ``[positions, layers]``."""
        named = {f"{fact}/prob": self.prob[i] for i, fact in enumerate(self.fact_ids)}
        for fact, grid in zip(self.fact_ids, self.token_maps, strict=True):
            if grid is not None:
                named[f"{fact}/token_map"] = grid
        return named


def run(model: Model, batch: PromptBatch | FactSet, config: Config | None = None) -> AttentionKnockoutResult:
    """Knock out every (source set, window) for every fact of ``batch``, in few batched forwards."""
    config = config or Config()
    batch = as_batch(model, batch)
    logits = upcast(forward(model, batch))  # [B, V]
    targets = choose_targets(batch, logits, config.target)
    clean = _target_probs(logits, targets)  # [B] float64 on the CPU
    rows, sources, layers = _rows(model, batch, config)  # fact row [R], sources [R, T], centre [R]
    probs = _knocked(model, batch, rows, sources, layers, targets, config)
    n_sets = len(config.sources)
    per_set = len(batch) * n_sets * model.n_layers  # rows of the source sets come first
    prob = probs[:per_set].reshape(len(batch), n_sets, model.n_layers)
    maps = probs[per_set:].reshape(len(batch), batch.seq_len, model.n_layers) if config.token_map else None
    pads = batch.pad_lengths.tolist()
    subject = batch.spans["subject"]
    return AttentionKnockoutResult(
        config=config,
        fact_ids=list(batch.fact_ids or map(str, range(len(batch)))),
        sources=list(config.sources),
        clean_prob=clean.numpy(),
        prob=prob.cpu().numpy(),
        target_tokens=decode_tokens(model, targets),
        subject_at_start=[int(subject[b, 0]) == pads[b] for b in range(len(batch))],
        tokens=[decode_tokens(model, batch.input_ids[b, pads[b] :]) for b in range(len(batch))],
        token_maps=[None if maps is None else maps[b, pads[b] :].cpu().numpy() for b in range(len(batch))],
        provenance=result_provenance(
            model,
            config,
            knockout_mode=config.mode,
            window=config.window,
            window_rule="[l - k//2, l - (-k//2)) clipped to [0, L)",
            target=config.target,
            sources="subject; non_subject = prompt positions before the last not in the subject; last",
            heads="all",
            bos=model.bos,
            layers="centre layer l of the window (0-based blocks)",
        ),
    )


def _rows(
    model: Model, batch: PromptBatch, config: Config
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every knocked-out row: ``(fact row [R], blocked source positions [R, T], centre layer [R])``."""
    n_batch, n_tokens, n_layers = len(batch), batch.seq_len, model.n_layers
    real = batch.attention_mask.bool()
    before_last = real.clone()
    before_last[:, -1] = False
    subject = batch.span_mask("subject") if "subject" in batch.spans else torch.zeros_like(real)
    if (subject.sum(-1) == 0).any():
        raise RecallscopeError("attention knockout needs a subject span in every prompt")
    last = torch.zeros_like(real)
    last[:, -1] = True
    named = {"subject": subject, "non_subject": before_last & ~subject, "last": last}
    sets = torch.stack([named[s] for s in config.sources], 1)  # [B, S, T]
    layers = torch.arange(n_layers)
    fact = torch.arange(n_batch).repeat_interleave(len(config.sources) * n_layers)
    source = sets.repeat_interleave(n_layers, dim=1).reshape(-1, n_tokens)
    centre = layers.repeat(n_batch * len(config.sources))
    if config.token_map:
        single = torch.eye(n_tokens, dtype=torch.bool)[None].expand(n_batch, -1, -1) & real[:, :, None]
        fact = torch.cat([fact, torch.arange(n_batch).repeat_interleave(n_tokens * n_layers)])
        source = torch.cat([source, single.repeat_interleave(n_layers, dim=1).reshape(-1, n_tokens)])
        centre = torch.cat([centre, layers.repeat(n_batch * n_tokens)])
    return fact, source, centre


def _knocked(model, batch, rows, sources, layers, targets, config) -> torch.Tensor:
    """``[R]`` probability of each row's target with its edges blocked.

    A knockout changes only the last position's attention, from its window's first block on: each
    row resumes the fact's recorded clean run (:mod:`recallscope.core.resume`) at that block and
    the last position, reading the recorded keys and values of the earlier positions. Rows are
    sorted by window start, so that one resumed forward serves rows that start together.
    """
    out = torch.empty(len(rows), dtype=torch.float64)
    starts = torch.tensor([window(c, config.window, model.n_layers).start for c in range(model.n_layers)])
    stops = torch.tensor([window(c, config.window, model.n_layers).stop for c in range(model.n_layers)])
    for group in equal_length_rows(batch, len(batch)):
        length = int(batch.attention_mask[group[0]].sum())
        state = record_run(model, batch.input_ids[group, -length:])
        recorded = {fact: i for i, fact in enumerate(group)}
        mine = torch.nonzero(torch.isin(rows, torch.tensor(group))).reshape(-1)
        mine = mine[torch.argsort(starts[layers[mine]], stable=True)]
        for part in mine.split(config.max_batch_rows):
            begin, stop = starts[layers[part]], stops[layers[part]]
            first = int(begin.min())
            masks = {
                layer: (
                    sources[part, None, None, -length:]
                    & ((begin <= layer) & (layer < stop))[:, None, None, None]
                )
                for layer in range(first, model.n_layers)
            }
            ids = torch.tensor([recorded[int(f)] for f in rows[part]])
            hidden = state.stream[ids, first, -1:]
            with block_attention(model, masks, config.mode):
                logits = resume(model, state, ids, start_layer=first, start_pos=length - 1, hidden=hidden)
            out[part] = _target_probs(logits[:, -1], targets[rows[part]])
            del logits  # before the next part's forward: one part's logits held at a time
    return out


def _target_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[R]`` float64 (on the CPU) probability of ``targets [R]`` under ``logits [R, V]``."""
    probs = upcast(logits).softmax(-1)
    return probs.gather(1, targets[:, None].to(probs.device))[:, 0].double().cpu()


def cost(model: Model, batch: PromptBatch | FactSet, config: Config | None = None) -> Cost:
    """Forwards: the clean one, one recorded run per prompt length, and ``ceil(rows /
    max_batch_rows)`` resumed ones, each row one position through the blocks from its window's
    start; memory: the recorded run, and per resumed forward its rows with their copy of the
    recorded keys and values.
    """
    config = config or Config()
    batch = as_batch(model, batch)
    n_layers, n_tokens = model.n_layers, batch.seq_len
    per_fact = len(config.sources) + (n_tokens if config.token_map else 0)
    rows = len(batch) * per_fact * n_layers
    lengths = batch.attention_mask.sum(-1).tolist()  # one recorded run per prompt length
    forwards = 1 + len(set(lengths)) + -(-rows // config.max_batch_rows)
    resumed = (
        len(batch)
        * per_fact
        * sum(n_layers - window(c, config.window, n_layers).start for c in range(n_layers))
    )
    same_length = max(lengths.count(n) for n in set(lengths))  # the facts a resumed forward can hold
    width = min(same_length * per_fact * n_layers, config.max_batch_rows)
    kv = 2 * model.n_kv_heads * model.d_head * n_tokens * n_layers
    # one query row each, and its probabilities over the vocabulary
    floats = forward_floats(model, width, 1) + width * (model.n_heads * (n_tokens - 1) + kv + model.d_vocab)
    floats += len(batch) * (n_layers + 1) * n_tokens * model.d_model
    clean = 2 * len(batch) * n_tokens * n_layers
    return Cost(forwards, float(clean + resumed), floats * model.dtype.itemsize, vocab_rows=float(rows))
