"""Logit lens / early decoding (nostalgebraist 2020; Yan & Jia 2025 Y1; ``methods.md`` §5.3).

Decode, at every layer and at chosen positions, the residual stream (``resid_pre``, ``resid_mid``,
``resid_post``) or the sublayer updates (``attn_out``, ``mlp_out``) into vocabulary space, and follow
chosen tokens: their probability, log-probability, logit and rank, plus the top-k tokens.

Projection modes (:func:`recallscope.core.vocab.project_to_vocab`): ``logit_lens`` (default; the
model's own final norm and head on the vector — the classic logit lens), ``raw`` (``W_U·v``, Geva
et al.) and ``frozen_scale`` (final-norm scale frozen from the real final residual at the same
position: additive over components, Yan & Jia's "early decoding"). Probabilities in
``frozen_scale``/``raw`` modes are softmaxes of those logits; they mainly serve ranking.

Tracked tokens (``targets``): ``gold`` (first token of the fact's answer), ``top1`` (the model's own
clean prediction), ``subject`` (first token of the subject), or any name in ``batch.tracked``
(``"tracked"`` = all of them, e.g. every answer of a one-to-many list). Layer ``l`` of
``resid_pre`` is the input of block ``l``; of ``resid_post``, its output.

Preset ``yan_jia``: frozen-scale decoding of the attention and MLP updates at the last position
for the tracked tokens (Y1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
import pandas as pd
import torch

from recallscope.core.cache import forward_floats, run_with_cache
from recallscope.core.tokens import PromptBatch, as_batch
from recallscope.core.vocab import ProjectionMode, decode_tokens, project_to_vocab, readout_floats
from recallscope.data.facts import FactSet
from recallscope.errors import RecallscopeError
from recallscope.methods.base import Cost, MethodConfig, MethodResult, result_provenance
from recallscope.methods.hints import NON_EMPTY, Positive
from recallscope.models.model import Model
from recallscope.models.sites import Site
from recallscope.stats import mean_ci

__all__ = ["NAME", "DESCRIPTION", "Config", "LogitLensResult", "run", "cost"]

NAME = "logit_lens"
DESCRIPTION = "Decode the residual stream and sublayer updates at every layer: when does the answer appear?"
_SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "ple_out")
CHUNK_SIZE = 16
"""Facts per runner chunk (one forward each)."""


@dataclass(frozen=True, kw_only=True)
class Config(MethodConfig):
    """Logit-lens settings (defaults: classic logit lens of the residual stream at the last token)."""

    sites: Annotated[tuple[Literal[_SITES], ...], NON_EMPTY] = ("resid_post", "attn_out", "mlp_out")
    """Sites to decode at every layer: residual stream and/or sublayer updates."""
    mode: ProjectionMode = "logit_lens"
    positions: Annotated[tuple[str | int, ...], NON_EMPTY] = ("last",)
    """``"last"``, ``"<span>_first"`` / ``"<span>_last"`` (e.g. ``"subject_last"``), or token indices
    within each prompt (``0`` = its first token, ``-1`` = its last; padding never counts)."""
    targets: Annotated[tuple[str, ...], NON_EMPTY] = ("gold", "top1")
    """Tokens to follow: ``gold``, ``top1``, ``subject``, names in ``batch.tracked``, or ``tracked``."""
    k: Positive = 10
    """Top tokens kept per (fact, site, layer, position)."""

    PRESETS = {
        "yan_jia": dict(
            sites=("attn_out", "mlp_out"),
            mode="frozen_scale",
            positions=("last",),
            targets=("tracked", "subject"),
            k=10,
        ),
        "geva": dict(
            sites=("resid_pre",), mode="raw", positions=("subject_last", "last"), targets=("top1",), k=50
        ),
    }


@dataclass(frozen=True)
class LogitLensResult(MethodResult):
    """Tracked-token statistics ``[fact, site, layer, position, target]`` and top-k tokens."""

    sites: list[str]
    positions: list[str]
    targets: list[str]
    target_tokens: list[list[str]]
    """``[fact][target]`` the tracked token strings."""
    prob: np.ndarray
    logprob: np.ndarray
    logit: np.ndarray
    rank: np.ndarray
    topk_ids: np.ndarray
    """``[fact, site, layer, position, k]``."""
    topk_tokens: list

    def to_frame(self) -> pd.DataFrame:
        """One row per fact × site × layer × position × tracked token."""
        n_facts, n_sites, n_layers, n_pos, n_targets = self.prob.shape
        index = pd.MultiIndex.from_product(
            [range(n_facts), range(n_sites), range(n_layers), range(n_pos), range(n_targets)],
            names=["f", "s", "layer", "p", "t"],
        ).to_frame(index=False)
        frame = pd.DataFrame(
            {
                "fact_id": np.array(self.fact_ids, dtype=object)[index.f],
                "site": np.array(self.sites, dtype=object)[index.s],
                "layer": index.layer,
                "position": np.array(self.positions, dtype=object)[index.p],
                "target": np.array(self.targets, dtype=object)[index.t],
                "token": [self.target_tokens[f][t] for f, t in zip(index.f, index.t, strict=True)],
                "prob": self.prob.reshape(-1),
                "logprob": self.logprob.reshape(-1),
                "logit": self.logit.reshape(-1),
                "rank": self.rank.reshape(-1),
            }
        )
        return frame

    def topk_frame(self) -> pd.DataFrame:
        """One row per fact × site × layer × position with the top-k token strings (best first)."""
        rows = []
        for f, fact in enumerate(self.fact_ids):
            for s, site in enumerate(self.sites):
                for layer in range(self.topk_ids.shape[2]):
                    for p, pos in enumerate(self.positions):
                        rows.append(
                            {
                                "fact_id": fact,
                                "site": site,
                                "layer": layer,
                                "position": pos,
                                "topk": self.topk_tokens[f][s][layer][p],
                            }
                        )
        return pd.DataFrame(rows)

    def tables(self) -> dict[str, pd.DataFrame]:
        """``{"topk": topk_frame()}``."""
        return {"topk": self.topk_frame()}

    def arrays(self) -> dict[str, np.ndarray]:
        """Per fact ``[site, layer, position, target]`` statistics (``topk_ids``: ``[…, k]``)."""
        named = {"prob": self.prob, "logprob": self.logprob, "logit": self.logit, "rank": self.rank}
        return self.per_fact(**named, topk_ids=self.topk_ids)

    def summary(self) -> pd.DataFrame:
        """Mean over facts of each statistic, with 95% normal-approximation bands (``*_ci``) and ``n``."""
        by = ["site", "layer", "position", "target"]
        return mean_ci(self.to_frame(), by, ["prob", "logprob", "logit", "rank"])


def run(model: Model, batch: PromptBatch | FactSet, config: Config | None = None) -> LogitLensResult:
    """Decode every configured site at every layer for every fact of ``batch``."""
    config = config or Config()
    batch = as_batch(model, batch)
    if "resid_mid" in config.sites and model.spec.parallel:
        raise RecallscopeError(f"{model.spec.family} has parallel blocks: resid_mid does not exist")
    if "ple_out" in config.sites and model.spec.ple_update is None:
        raise RecallscopeError(
            f"{model.spec.family}'s blocks add no per-layer input after the MLP: ple_out does not exist"
        )
    positions = _positions(batch, config.positions)  # [B, P]
    sites = [Site(layer, name) for name in config.sites for layer in range(model.n_layers)]
    final = Site(model.n_layers - 1, "resid_post")
    cache = run_with_cache(model, batch, [*sites, final], positions=positions, logits="last")
    targets, names = _targets(model, batch, config.targets, cache.logits)  # [B, n]
    stacked = cache.stack(sites, dim=1)  # [B, sites*layers, P, d]
    stacked = stacked.reshape(len(batch), len(config.sites), model.n_layers, *stacked.shape[2:])
    scale_from = cache[final][:, None, None] if config.mode == "frozen_scale" else None
    proj = project_to_vocab(model, stacked, config.mode, scale_from=scale_from, targets=targets, k=config.k)
    target_tokens = [decode_tokens(model, row) for row in targets]
    provenance = result_provenance(
        model,
        config,
        projection=config.mode,
        positions=list(map(str, config.positions)),
        targets=names,
        layers="resid_pre[l] = input of block l; others: block l",
        bos=model.bos,
    )
    lp = proj.target_logprobs.reshape(*stacked.shape[:-1], len(names))
    return LogitLensResult(
        config=config,
        fact_ids=list(batch.fact_ids or map(str, range(len(batch)))),
        sites=list(config.sites),
        positions=[str(p) for p in config.positions],
        targets=names,
        target_tokens=target_tokens,
        prob=lp.exp().cpu().numpy(),
        logprob=lp.cpu().numpy(),
        logit=proj.target_logits.reshape(lp.shape).cpu().numpy(),
        rank=proj.target_ranks.reshape(lp.shape).cpu().numpy(),
        topk_ids=proj.topk_ids.cpu().numpy(),
        topk_tokens=decode_tokens(model, proj.topk_ids),
        provenance=provenance,
    )


def cost(model: Model, batch: PromptBatch | FactSet, config: Config | None = None) -> Cost:
    """One forward per call; memory: the kept vectors and one projection chunk of logits."""
    config = config or Config()
    batch = as_batch(model, batch)
    n_vectors = len(batch) * len(config.sites) * model.n_layers * len(config.positions)
    floats = n_vectors * model.d_model  # then the forward, or (after it) the readouts
    floats += max(forward_floats(model, len(batch), batch.seq_len), readout_floats(model, n_vectors))
    work = float(len(batch) * batch.seq_len * model.n_layers)
    return Cost(1, work, floats * model.dtype.itemsize, vocab_rows=n_vectors)


def _positions(batch: PromptBatch, selectors) -> torch.Tensor:
    """``[B, P]`` absolute positions for each selector."""
    columns = []
    for sel in selectors:
        if sel == "last":
            columns.append(torch.full((len(batch),), batch.seq_len - 1))
        elif isinstance(sel, int):  # a prompt token index: >= 0 from each prompt's start, < 0 from the end
            start = batch.pad_lengths if sel >= 0 else torch.full((len(batch),), batch.seq_len)
            position = start + sel
            if ((position < batch.pad_lengths) | (position >= batch.seq_len)).any():
                raise RecallscopeError(f"position {sel} is outside some prompts of the batch")
            columns.append(position)
        else:
            span, _, end = str(sel).rpartition("_")
            if span not in batch.spans or end not in ("first", "last"):
                raise RecallscopeError(
                    f"unknown position {sel!r}: use 'last', an index, or '<span>_first'/'<span>_last' with a "
                    f"span of the batch ({', '.join(batch.spans) or 'none'})"
                )
            bounds = batch.spans[span]
            if (bounds[:, 0] < 0).any():
                raise RecallscopeError(f"some facts have no {span!r} span")
            columns.append(bounds[:, 0] if end == "first" else bounds[:, 1] - 1)
    return torch.stack(columns, dim=1)


def _targets(model: Model, batch: PromptBatch, names, logits: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """``[B, n]`` token ids of the tracked tokens, and their names."""
    columns, labels = [], []
    for name in names:
        if name == "tracked":
            for key, ids in batch.tracked.items():
                columns.append(ids)
                labels.append(key)
        elif name == "gold":
            if batch.target_ids is None:
                raise RecallscopeError("target 'gold' needs a batch with targets")
            columns.append(batch.target_ids)
            labels.append(name)
        elif name == "top1":
            columns.append(logits.argmax(-1).cpu())
            labels.append(name)
        elif name == "subject":
            start = batch.spans["subject"][:, 0]
            columns.append(batch.input_ids[torch.arange(len(batch)), start])
            labels.append(name)
        elif name in batch.tracked:
            columns.append(batch.tracked[name])
            labels.append(name)
        else:
            raise RecallscopeError(
                f"unknown target {name!r}: use gold, top1, subject, tracked or {list(batch.tracked)}"
            )
    if not columns:
        raise RecallscopeError("no token to track (the batch has no tracked tokens)")
    return torch.stack([c.to(torch.long) for c in columns], dim=1), labels
