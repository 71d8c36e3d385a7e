"""Head mappings: attention heads whose OV circuit maps the subject to the attribute
(Geva et al. 2023 after Dar et al. 2023, ``methods.md`` G7).

For head ``(ℓ, h)`` and an input vector ``x`` (the subject's token embeddings: their ``mean``, or
the ``first`` / ``last`` one, as the ``embed`` site gives them, i.e. with Gemma's ``sqrt(d)``
scale and without position embeddings), the head's OV map is::

    out_h(x) = (norm_ℓ(x) W_V^{kv(h)} + b_V^{kv(h)}) W_O^h        kv(h) = h // n_groups   [d_model]

It is what the head would write if it attended only to a position holding ``x`` (no ``b_O``,
which belongs to no head). ``norm_ℓ`` is block ℓ's pre-attention norm (``input_norm=True``,
default: what the head really reads) or nothing (Dar et al. and the ``geva`` preset project raw
embeddings). Gemma-2's post-attention norm is applied to ``out_h`` alone. The vocabulary row
``readout(out_h)`` is row ``s`` of ``M = E W_V W_O Eᵀ`` without building ``[V, V]``.

Per fact × layer × head: the rank of the attribute (the model's clean top-1 by default, rank 0 =
top) in that row, whether it is in the top ``top_k`` (the head "encodes the mapping"), the top-k
token ids, and the head's *actual* output at the last position of the clean run,
``o^h = z^h W_O^h`` (:func:`~recallscope.core.decompose.head_outputs`), read out the same way:
its rank and logit of the attribute, so candidate heads can be ranked by their role in extraction.
:func:`rank_heads` orders heads by how often they encode the mapping.

Fast by construction: one clean forward per ``max_batch_rows`` facts (targets, embeddings, ``z``)
and a few matmuls per layer for all facts and heads at once; the naive loop over layers, heads
and facts with a ``[V, V]`` matrix is in ``tests/oracles`` and gives the same ranks.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import pandas as pd
import torch

from recallscope.core.attributes import Readout, readout
from recallscope.core.cache import forward, forward_floats
from recallscope.core.decoding import choose_targets
from recallscope.core.decompose import head_outputs, ov_outputs, post_norm_note
from recallscope.core.dtypes import upcast
from recallscope.core.hooks import site_hook
from recallscope.core.tokens import PromptBatch, as_batch
from recallscope.core.vocab import decode_tokens, readout_floats
from recallscope.data.facts import FactSet
from recallscope.errors import RecallscopeError
from recallscope.methods.base import Cost, MethodConfig, MethodResult, head_frame, result_provenance
from recallscope.methods.geva2023.summaries import rank_heads
from recallscope.methods.hints import Positive
from recallscope.models.model import Model
from recallscope.models.sites import Site

__all__ = ["NAME", "DESCRIPTION", "Config", "HeadMappingsResult", "run", "cost", "rank_heads", "ov_outputs"]

NAME = "head_mappings"
DESCRIPTION = "Heads whose OV circuit maps the subject's embedding to the attribute (Geva 2023 / Dar 2023)."
CHUNK_SIZE = 32


@dataclass(frozen=True, kw_only=True)
class Config(MethodConfig):
    """Head-mapping settings; ``geva`` follows Dar et al.'s raw-embedding projection."""

    readout: Readout = "logit_lens"
    """How head outputs are read: ``logit_lens``, ``raw`` (``W_U·v``) or ``raw_embed`` (``E·v``, Geva)."""
    subject_tokens: Literal["mean", "last", "first"] = "mean"
    """Input vector: the mean of the subject's token embeddings, or its last / first token's."""
    input_norm: bool = True
    """Apply block ℓ's pre-attention norm to the input (what the head really reads)."""
    target: Literal["top1", "gold"] = "top1"
    """The attribute: the model's clean top-1 token (Geva) or the gold answer's first token."""
    top_k: Positive = 10
    """A head encodes the mapping when the attribute is among the top ``top_k`` tokens of its row."""
    max_batch_rows: Positive = 64
    """Facts per clean forward and per mapping pass (memory bound)."""

    PRESETS = {
        "geva": dict(readout="raw_embed", subject_tokens="mean", input_norm=False, target="top1", top_k=10)
    }


@dataclass(frozen=True)
class HeadMappingsResult(MethodResult):
    """Mapping ranks and top tokens ``[fact, layer, head]`` and the heads' real last-position outputs."""

    n_groups: np.ndarray
    """``[layer]`` query heads per key/value head in each block (``kv_head = head // n_groups[layer]``)."""
    target_ids: np.ndarray
    """``[fact]`` the attribute token."""
    target_tokens: list[str]
    subject_tokens: list[list[str]]
    """The subject's tokens per fact (the input vector is built from them)."""
    mapping_rank: np.ndarray
    """``[fact, layer, head]`` rank of the attribute in the head's OV row (0 = top)."""
    top_ids: np.ndarray
    """``[fact, layer, head, top_k]`` top tokens of the head's OV row."""
    output_rank: np.ndarray
    """``[fact, layer, head]`` rank of the attribute in the head's real output at the last position."""
    output_logit: np.ndarray
    """``[fact, layer, head]`` the attribute's logit (same readout) in that output."""
    top_tokens: pd.DataFrame = field(default_factory=pd.DataFrame)
    """One row per (fact, layer, head) in the top-k: ``fact_id, layer, head, mapping_rank, target,
    top_tokens`` (the decoded top-k, a list)."""

    @property
    def in_top_k(self) -> np.ndarray:
        """``[fact, layer, head]`` bool: the head encodes the subject → attribute mapping."""
        return self.mapping_rank < self.config.top_k

    def to_frame(self) -> pd.DataFrame:
        """One row per fact × layer × head."""
        return head_frame(
            self.fact_ids,
            self.n_groups,
            mapping_rank=self.mapping_rank,
            in_top_k=self.in_top_k,
            output_rank=self.output_rank,
            output_logit=self.output_logit,
            target=np.array(self.target_tokens, dtype=object),
        )

    def tables(self) -> dict[str, pd.DataFrame]:
        """``{"top_tokens": the decoded top-k of every (fact, layer, head) that encodes the mapping}``."""
        return {"top_tokens": self.top_tokens} if len(self.top_tokens) else {}

    def summary(self) -> pd.DataFrame:
        """:func:`rank_heads` of this result's facts."""
        return rank_heads(self.to_frame())

    def arrays(self) -> dict[str, np.ndarray]:
        """Per fact ``mapping_rank``, ``output_rank`` ``[layer, head]``, ``top_ids`` ``[layer, head, k]``."""
        return self.per_fact(
            mapping_rank=self.mapping_rank, top_ids=self.top_ids, output_rank=self.output_rank
        )


def run(model: Model, batch: PromptBatch | FactSet, config: Config | None = None) -> HeadMappingsResult:
    """Map every fact's subject through every head's OV circuit; read the heads' real outputs too."""
    config = config or Config()
    batch = as_batch(model, batch)
    if "subject" not in batch.spans:
        raise RecallscopeError("head mappings need a subject span: tokenize(..., spans={'subject': [...]})")
    if config.top_k > model.d_vocab:
        raise RecallscopeError(f"top_k={config.top_k} exceeds the vocabulary ({model.d_vocab} tokens)")
    fact_ids = list(batch.fact_ids or map(str, range(len(batch))))
    has_subject = batch.spans["subject"][:, 0] >= 0
    skipped = [(fact_ids[i], "no subject span") for i in range(len(batch)) if not has_subject[i]]
    rows = torch.nonzero(has_subject)[:, 0]
    step = config.max_batch_rows
    chunks = [_chunk(model, batch.select(rows[i : i + step]), config) for i in range(0, len(rows), step)]
    arrays = _merge(model, chunks, config)
    kept = batch.select(rows)
    result = HeadMappingsResult(
        config=config,
        fact_ids=[fact_ids[i] for i in rows.tolist()],
        n_groups=np.array([model.n_groups_at(layer) for layer in range(model.n_layers)]),
        target_tokens=decode_tokens(model, torch.as_tensor(arrays["target_ids"])),
        subject_tokens=[
            decode_tokens(model, kept.input_ids[b, slice(*_span(kept, b))]) for b in range(len(kept))
        ],
        **arrays,
        provenance=_provenance(model, config),
        skipped=skipped,
    )
    return replace(result, top_tokens=_top_tokens(model, result))


def _span(batch: PromptBatch, row: int) -> tuple[int, int]:
    start, stop = (int(v) for v in batch.spans["subject"][row])
    return start, stop


def _chunk(model: Model, batch: PromptBatch, config: Config) -> dict[str, torch.Tensor]:
    """All results for one chunk of facts: one clean forward, then per layer a few matmuls."""
    logits, embed, z = _clean_run(model, batch)  # [B, V], [B, T, d], [B, L, H, d_head]
    targets = choose_targets(batch, logits, config.target)  # [B]
    x = subject_inputs(batch, embed, config.subject_tokens)  # [B, d]
    per_layer = [_layer(model, layer, x, z[:, layer], targets, config) for layer in range(model.n_layers)]
    out = {name: torch.stack([p[name] for p in per_layer], 1).cpu() for name in per_layer[0]}
    return {"target_ids": targets, **out}


def _clean_run(model: Model, batch: PromptBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clean logits ``[B, V]``, token embeddings ``[B, T, d]``, last-position ``z [B, L, H, d_head]``."""
    saved: dict = {}

    def keep(key, last_only: bool):
        def save(act: torch.Tensor) -> None:
            saved[key] = (act[:, -1] if last_only else act).detach()

        return save

    with contextlib.ExitStack() as stack:
        stack.enter_context(site_hook(model, Site(None, "embed"), keep("embed", False)))
        for layer in range(model.n_layers):
            stack.enter_context(site_hook(model, Site(layer, "z"), keep(layer, True)))
        logits = upcast(forward(model, batch))
    z = torch.stack([saved[layer] for layer in range(model.n_layers)], 1)
    return logits, saved["embed"], z


def subject_inputs(batch: PromptBatch, embed: torch.Tensor, how: str) -> torch.Tensor:
    """The input vector of each row ``[B, d_model]`` from token embeddings ``embed [B, T, d_model]``.

    ``how``: ``mean`` of the subject's embeddings, or its ``first`` / ``last`` token's.
    """
    embed = upcast(embed)
    bounds = batch.spans["subject"].to(embed.device)
    rows = torch.arange(len(batch), device=embed.device)
    if how == "first":
        return embed[rows, bounds[:, 0]]
    if how == "last":
        return embed[rows, bounds[:, 1] - 1]
    mask = batch.span_mask("subject").to(embed.device, embed.dtype)  # [B, T]
    return (mask[..., None] * embed).sum(1) / mask.sum(1, keepdim=True)


@torch.no_grad()
def _layer(model, layer, x, z, targets, config) -> dict[str, torch.Tensor]:
    """One layer, all facts and heads: the OV rows (ranks, top-k) and the real outputs (rank, logit)."""
    mapped = readout(
        model,
        ov_outputs(model, layer, x, input_norm=config.input_norm),
        config.readout,
        targets=targets,
        k=config.top_k,
    )
    real = head_outputs(model, layer, z[:, None]).parts[:, 0]  # [B, H, d_model]
    actual = readout(model, real, config.readout, targets=targets)
    return {
        "mapping_rank": mapped.target_ranks,
        "top_ids": mapped.topk_ids,
        "output_rank": actual.target_ranks,
        "output_logit": actual.target_logits.double(),
    }


def _merge(model: Model, chunks: list[dict], config: Config) -> dict[str, np.ndarray]:
    if not chunks:  # every fact skipped
        shape = (0, model.n_layers, model.n_heads)
        empty = np.zeros(shape, dtype=np.int64)
        return dict(
            target_ids=np.zeros(0, dtype=np.int64),
            mapping_rank=empty,
            top_ids=np.zeros((*shape, config.top_k), dtype=np.int64),
            output_rank=empty.copy(),
            output_logit=np.zeros(shape),
        )
    return {name: torch.cat([c[name] for c in chunks]).numpy() for name in chunks[0]}


def _top_tokens(model: Model, result: HeadMappingsResult) -> pd.DataFrame:
    """The decoded top-k of every (fact, layer, head) whose top-k holds the attribute."""
    f, layer, head = np.nonzero(result.in_top_k)
    return pd.DataFrame(
        {
            "fact_id": np.array(result.fact_ids, dtype=object)[f],
            "layer": layer,
            "head": head,
            "mapping_rank": result.mapping_rank[f, layer, head],
            "target": np.array(result.target_tokens, dtype=object)[f],
            "top_tokens": decode_tokens(model, torch.as_tensor(result.top_ids[f, layer, head]))
            if len(f)
            else [],
        }
    )


def _provenance(model: Model, config: Config) -> dict:
    post = post_norm_note(model, "post-attention norm applied to out_h alone")
    return result_provenance(
        model,
        config,
        readout=config.readout,
        target=config.target,
        subject_input=f"{config.subject_tokens} of the subject's token embeddings (embed site: the "
        "model's embedding scale included, no position embeddings)",
        input_norm="block l's pre-attention norm" if config.input_norm else "none (raw embeddings)",
        ov_map=f"out_h = (norm_l(x) W_V[h // n_groups] + b_V) W_O[h], no b_O{post}",
        output="head h's real output z^h W_O^h at the last position of the clean run (Gemma-2: "
        "post-norm folded in with the full attention output's scale), same readout",
        rank="0 = top: number of tokens with a strictly larger logit",
        in_top_k=f"mapping_rank < {config.top_k}",
        heads=f"query heads; kv_head = {model.kv_head_rule()}",
        layers="0-based blocks",
        bos=model.bos,
    )


def cost(model: Model, batch: PromptBatch | FactSet, config: Config | None = None) -> Cost:
    """One clean forward per ``max_batch_rows`` facts, plus two readouts of every head per fact.

    The readouts (``2·L·H`` vectors per fact over the whole vocabulary) dominate for large
    vocabularies.
    """
    config = config or Config()
    batch = as_batch(model, batch)
    n_facts, n_tokens, d = len(batch), batch.seq_len, model.d_model
    forwards = -(-n_facts // config.max_batch_rows)
    readouts = 2 * n_facts * model.n_layers * model.n_heads
    width = min(n_facts, config.max_batch_rows)
    floats = width * model.n_layers * d + width * model.n_heads * d  # kept, then the forward or the readouts
    floats += max(forward_floats(model, width, n_tokens), readout_floats(model, width * model.n_heads))
    itemsize = max(model.dtype.itemsize, 4)
    return Cost(forwards, float(n_facts * n_tokens * model.n_layers), floats * itemsize, vocab_rows=readouts)
