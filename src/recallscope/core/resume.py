"""Resume a recorded forward pass from any block and position (prefix reuse).

An intervention at block ``s`` and position ``t`` changes nothing in blocks below ``s``, and, with
causal attention, nothing at positions before ``t``. So a grid of interventions need not recompute
those parts: :func:`record_run` keeps one run's residual stream at every block input and its
keys/values, and :func:`resume` runs only blocks ``s…L-1`` on positions ``t…T-1``, reading the
recorded keys/values of positions ``< t``::

    state = record_run(model, ids)                        # ids [R, T]
    hidden = state.stream[:, s, t:]                      # input of block s at positions t…T-1
    logits = resume(model, state, rows, start_layer=s, start_pos=t, hidden=hidden)

Resuming with the recorded input reproduces the recorded logits (tested on every family). It works
through the native modules: blocks below ``s`` are swapped for pass-through stubs for the duration of
the call, the recorded keys/values are handed to transformers as a ``DynamicCache``, and position ids
continue at ``t``; interventions (``patch_cells`` etc.) compose by nesting as usual, with positions
relative to ``t``.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

from recallscope.core.hooks import module_hook, site_hook
from recallscope.errors import SiteError
from recallscope.models.families import get_module
from recallscope.models.model import Model
from recallscope.models.sites import Site

__all__ = ["RunState", "record_run", "resume", "equal_length_rows", "cache_argument"]


def cache_argument(model: Model) -> str:
    """Name of the key/value cache argument of the model's forward: ``cache`` from transformers
    5.25 on, ``past_key_values`` before (read from the forward's public signature).
    """
    parameters = inspect.signature(model.hf_model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def equal_length_rows(batch, size: int) -> Iterator[list[int]]:
    """Rows of a left-padded ``batch`` grouped by prompt length, at most ``size`` per group, in row order.

    :func:`record_run` takes unpadded prompts, so a padded batch is recorded one group at a time
    (``batch.input_ids[group, -length:]``).
    """
    lengths = batch.attention_mask.sum(-1).tolist()
    for length in sorted(set(lengths)):
        rows = [row for row, n in enumerate(lengths) if n == length]
        for start in range(0, len(rows), size):
            yield rows[start : start + size]


@dataclass
class RunState:
    """What :func:`resume` needs of a recorded run of ``R`` rows and ``T`` positions.

    Attributes:
        stream: ``[R, n_layers + 1, T, d_model]``: the input of every block (``resid_pre``) and,
            last, the output of the last block.
        keys, values: per layer ``[R, n_kv_heads, T, d_head]`` as the attention modules cache them.
        logits: ``[R, n_keep, d_vocab]`` at the last ``n_keep`` positions.
        tuple_blocks: whether blocks return tuples (GPT-J) rather than tensors.
    """

    stream: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    logits: torch.Tensor
    tuple_blocks: bool
    cache: Cache | None = None
    """The model's own cache object, kept when its layers hold more than keys and values (the
    indexer keys of DeepSeek-V3.2's sparse attention); resumed by cropping and row selection."""
    block_inputs: list[dict] | None = None
    """Per block, the per-position inputs it received besides the residual (``{argument: [R, T,
    …]}``: Gemma 4's per-layer inputs, ``ArchSpec.ple_update``), replayed on resume; None for models
    whose blocks read only the residual."""

    @property
    def seq_len(self) -> int:
        return self.stream.shape[2]


def record_run(model: Model, input_ids: torch.Tensor, *, logits_to_keep: int = 1) -> RunState:
    """One forward of ``input_ids [R, T]`` (no padding) recording what :func:`resume` needs.

    Interventions active around the call (e.g. ``add_noise``) are part of the recorded run.
    """
    n_layers = model.n_layers
    stream: list[torch.Tensor | None] = [None] * (n_layers + 1)
    is_tuple = [False]

    def keep(index):
        def save(act):
            stream[index] = act.detach()

        return save

    def block_type(module, args, kwargs, output):
        is_tuple[0] = isinstance(output, tuple)

    cache = _empty_cache(model)
    block_inputs: list[dict] | None = [{} for _ in range(n_layers)] if model.spec.ple_update else None
    with torch.no_grad(), contextlib.ExitStack() as stack:
        for layer in range(n_layers):
            stack.enter_context(site_hook(model, Site(layer, "resid_pre"), keep(layer)))
            if block_inputs is not None:
                stack.enter_context(_record_block_inputs(model, layer, block_inputs[layer]))
        stack.enter_context(site_hook(model, Site(n_layers - 1, "resid_post"), keep(n_layers)))
        stack.enter_context(module_hook(model.block(0), block_type, "fwd"))
        out = model.hf_model(
            input_ids=input_ids.to(model.device),
            **{cache_argument(model): cache},
            use_cache=True,
            logits_to_keep=logits_to_keep,
        )
    keys = [layer.keys for layer in cache.layers]
    values = [layer.values for layer in cache.layers]
    special = None if _plain(cache) else cache
    return RunState(torch.stack(stream, dim=1), keys, values, out.logits, is_tuple[0], special, block_inputs)


def _per_position(args: tuple, kwargs: dict) -> dict:
    """A block call's per-position inputs besides the residual (its first argument): tensors
    ``[R, T, …]`` with the residual's rows and positions, keyed by argument index or name.
    """
    hidden = args[0] if args else kwargs["hidden_states"]
    found = {i: a for i, a in enumerate(args) if i}
    found |= {k: v for k, v in kwargs.items() if k != "hidden_states"}
    return {
        key: value
        for key, value in found.items()
        if torch.is_tensor(value) and value.dim() >= 3 and value.shape[:2] == hidden.shape[:2]
    }


def _record_block_inputs(model: Model, layer: int, into: dict) -> contextlib.AbstractContextManager:
    def save(module, args, kwargs):
        into.update({key: value.detach() for key, value in _per_position(args, kwargs).items()})

    return module_hook(model.block(layer), save, "pre")


@contextlib.contextmanager
def _replayed_block_inputs(model: Model, state: RunState, rows, start_layer: int, start_pos: int):
    """Blocks from ``start_layer`` on get the recorded run's per-position inputs (rows ``rows``,
    positions from ``start_pos``) instead of those the model derives from the resumed input.
    """

    def replay(recorded: dict):
        def pre(module, args, kwargs):
            args, kwargs = list(args), dict(kwargs)
            for key, value in recorded.items():
                new = value[rows, start_pos:]
                if isinstance(key, int):
                    args[key] = new
                else:
                    kwargs[key] = new
            return tuple(args), kwargs

        return pre

    with contextlib.ExitStack() as stack:
        for layer in range(start_layer, model.n_layers):
            stack.enter_context(module_hook(model.block(layer), replay(state.block_inputs[layer]), "pre"))
        yield


def _plain(cache: Cache) -> bool:
    return all(type(layer) is DynamicLayer for layer in cache.layers)


def _empty_cache(model: Model) -> Cache:
    """A cache of full key/value layers (sliding windows are left to the attention masks, so every
    position stays reusable), or, when the model's layers keep more than keys and values (sparse
    attention's indexer keys), a cache of the model's own layer types.
    """
    own = DynamicCache(config=model.hf_model.config)
    special = any(type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer) for layer in own.layers)
    return own if special else DynamicCache()


class _PassThrough(nn.Module):
    """Stands in for a block that must not run: returns its input hidden states, or ``output``."""

    def __init__(self, tuple_output: bool, output: torch.Tensor | None = None) -> None:
        super().__init__()
        self.tuple_output = tuple_output
        self.output = output

    def forward(self, hidden_states, *args, **kwargs):
        out = hidden_states if self.output is None else self.output.to(hidden_states.dtype)
        return (out, None) if self.tuple_output else out


@contextlib.contextmanager
def _blocks_skipped(model: Model, below: int, tuple_output: bool, hidden: torch.Tensor) -> Iterator[None]:
    """Blocks ``< below`` replaced by stubs, the last of which outputs ``hidden`` (the input of
    block ``below``), whatever the embedding computed (scales, norms, position embeddings).
    """
    blocks = get_module(model.hf_model, model.spec.blocks)
    saved = [blocks[i] for i in range(below)]
    try:
        for i in range(below):
            blocks[i] = _PassThrough(tuple_output, hidden if i == below - 1 else None)
        yield
    finally:
        for i, block in enumerate(saved):
            blocks[i] = block


def resume(
    model: Model,
    state: RunState,
    rows: torch.Tensor,
    *,
    start_layer: int,
    start_pos: int,
    hidden: torch.Tensor,
    logits_to_keep: int = 1,
) -> torch.Tensor:
    """Logits ``[R', logits_to_keep, d_vocab]`` of the recorded run resumed at block ``start_layer``,
    position ``start_pos``.

    Args:
        state: the recorded run.
        rows: ``[R']`` which recorded row each new row continues (its keys/values of positions
            ``< start_pos`` are reused).
        start_layer: first block to run (``n_layers`` runs only the final norm and unembedding).
        start_pos: first position to run.
        hidden: ``[R', T - start_pos, d_model]``, the input of block ``start_layer`` at positions
            ``start_pos…T-1`` (the recorded one, possibly edited).
    """
    n_new = state.seq_len - start_pos
    if not 0 <= start_layer <= model.n_layers or not 0 <= start_pos < state.seq_len:
        raise SiteError(
            f"cannot resume at layer {start_layer}, position {start_pos} of a {state.seq_len}-token run"
        )
    if hidden.shape[1] != n_new:
        raise SiteError(f"hidden must cover positions {start_pos}…{state.seq_len - 1}: got {hidden.shape[1]}")
    rows = rows.to(state.keys[0].device)
    if state.cache is not None:
        cache = copy.deepcopy(state.cache)
        cache.crop(start_pos - state.seq_len)  # (a negative count: the tokens to drop)
        cache.batch_select_indices(rows)
    else:
        prefix = [
            (k[rows, :, :start_pos], v[rows, :, :start_pos])
            for k, v in zip(state.keys, state.values, strict=True)
        ]
        cache = DynamicCache(ddp_cache_data=prefix)
    hidden = hidden.to(model.device)
    # a copy: modeling code may scale inputs_embeds in place (CTRL), and hidden is the stubs' output
    inputs = {"inputs_embeds": hidden.clone(), cache_argument(model): cache}
    parameters = inspect.signature(model.hf_model.forward).parameters
    if "position_ids" in parameters:  # not ALiBi models
        inputs["position_ids"] = torch.arange(start_pos, state.seq_len, device=model.device).expand(
            len(rows), -1
        )
    if state.block_inputs is not None and "per_layer_inputs" in parameters:
        # Gemma 4 would otherwise find token ids by matching inputs_embeds with its embedding:
        # placeholders, as the blocks get the recorded ones
        for value in state.block_inputs[0].values():
            inputs["per_layer_inputs"] = value.new_zeros(len(rows), n_new, model.n_layers, value.shape[-1])
    stream = model.stream_scale(start_layer - 1, "post") if start_layer else 1.0  # the residual: D × site
    with torch.no_grad(), contextlib.ExitStack() as stack:
        stack.enter_context(
            _blocks_skipped(
                model, start_layer, state.tuple_blocks, hidden if stream == 1.0 else hidden * stream
            )
        )
        if start_layer == 0:  # the embedding pipeline may scale, normalize or add positions
            stack.enter_context(site_hook(model, Site(0, "resid_pre"), lambda act: hidden))
        if state.block_inputs is not None:
            stack.enter_context(_replayed_block_inputs(model, state, rows, start_layer, start_pos))
        out = model.hf_model(**inputs, use_cache=True, logits_to_keep=logits_to_keep)
    return out.logits
