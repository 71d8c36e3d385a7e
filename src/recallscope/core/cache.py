"""Forward passes: plain (:func:`forward`) and with a cache of chosen sites (:func:`run_with_cache`).

``run_with_cache`` keeps only the requested sites at the requested positions, and when no logits
are asked for it stops the forward after the last block it needs::

    sites = [Site(layer, "resid_post") for layer in range(model.n_layers)]
    cache = run_with_cache(model, batch, sites, positions=[-1])
    cache.stack(sites)                # [B, n_layers, 1, d_model]
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Literal

import torch

from recallscope.core.hooks import StopForward, module_hook, site_hook, stop_after
from recallscope.core.tokens import PromptBatch
from recallscope.errors import SiteError
from recallscope.models.model import Model
from recallscope.models.sites import Site, parse_site

__all__ = ["Cache", "forward", "forward_floats", "run_with_cache", "select_positions", "Positions"]

Positions = Sequence[int] | torch.Tensor | None
"""None (all), a list of positions shared by every row (negative = from the end), or a
``[B, P]`` tensor of per-row positions."""


def forward(
    model: Model, batch: PromptBatch | torch.Tensor, *, logits: Literal["last", "all"] = "last"
) -> torch.Tensor:
    """Run the model; return logits ``[B, d_vocab]`` at the last position, or ``[B, T, d_vocab]``."""
    inputs = _inputs(model, batch)
    with torch.no_grad():
        out = model.hf_model(**inputs, use_cache=False, logits_to_keep=1 if logits == "last" else 0)
    return out.logits[:, -1] if logits == "last" else out.logits


def forward_floats(model: Model, rows: int, tokens: int, *, logits: int = 1) -> int:
    """Peak float buffers of one forward of ``rows × tokens`` (for ``cost()`` memory).

    The larger of a block's buffers and the logits, which are not alive together. Per token inside
    a block: the residual and its normed copy (``2·d``), the attention's queries and output
    (``2·H·d_head``), keys and values (``2·n_kv·d_head``), its probabilities (``H·T``, materialised
    by eager attention) and three ``[d_mlp]`` buffers of the MLP; the head: ``logits`` positions
    of ``d_vocab`` logits per row. Checked against the memory forwards of real configurations
    allocate (``bench/scaling.py``: 0.85-0.98 of this).
    """
    d, heads, kv = model.d_model, model.n_heads * model.d_head, model.n_kv_heads * model.d_head
    per_token = 2 * d + 2 * heads + 2 * kv + model.n_heads * tokens + 3 * model.d_mlp
    return max(rows * tokens * per_token, rows * logits * model.d_vocab)


def _inputs(model: Model, batch: PromptBatch | torch.Tensor) -> dict[str, torch.Tensor]:
    if isinstance(batch, PromptBatch):
        return batch.model_inputs(model.device)
    ids = torch.as_tensor(batch)
    ids = ids[None] if ids.dim() == 1 else ids
    return {"input_ids": ids.to(model.device)}


def select_positions(act: torch.Tensor, positions: Positions, dim: int = 1) -> torch.Tensor:
    """Keep ``positions`` of ``act`` along ``dim`` (batch is dim 0)."""
    if positions is None:
        return act
    if isinstance(positions, torch.Tensor) and positions.dim() == 2:  # per-row [B, P]
        index = positions.to(act.device) % act.shape[dim]
        moved = act.movedim(dim, 1)
        rows = torch.arange(act.shape[0], device=act.device)[:, None]
        return moved[rows, index].movedim(1, dim)
    index = torch.as_tensor(positions, dtype=torch.long, device=act.device)
    if ((index < -act.shape[dim]) | (index >= act.shape[dim])).any():
        raise SiteError(f"positions {list(positions)} out of range for sequence length {act.shape[dim]}")
    return act.index_select(dim, index % act.shape[dim])


class Cache(Mapping):
    """Activations keyed by :class:`Site` (strings like ``"3.resid_post"`` also work).

    Each entry has the site's canonical shape with the position axis restricted to the requested
    positions (``[B, P, …]``; ``pattern`` is ``[B, n_heads, P, T]``).
    """

    def __init__(self, acts: dict[Site, torch.Tensor], logits: torch.Tensor | None = None) -> None:
        self._acts = acts
        self.logits = logits

    def __getitem__(self, site: Site | str) -> torch.Tensor:
        return self._acts[parse_site(site) if isinstance(site, str) else site]

    def __iter__(self) -> Iterator[Site]:
        return iter(self._acts)

    def __len__(self) -> int:
        return len(self._acts)

    def stack(self, sites: Iterable[Site | str], dim: int = 1) -> torch.Tensor:
        """Stack several sites along a new axis ``dim`` (e.g. ``[B, layer, P, d_model]``)."""
        return torch.stack([self[s] for s in sites], dim=dim)


def run_with_cache(
    model: Model,
    batch: PromptBatch | torch.Tensor,
    sites: Iterable[Site | str],
    *,
    positions: Positions = None,
    logits: Literal["last", "all"] | None = None,
    dtype: torch.dtype | None = None,
) -> Cache:
    """One forward that records ``sites`` at ``positions``.

    Args:
        model: the model.
        batch: a :class:`PromptBatch` or token ids ``[B, T]``.
        sites: sites to record.
        positions: which positions to keep (query positions for ``pattern``).
        logits: also return logits (``"last"`` position or ``"all"``); when None the forward stops
            after the last block a site needs.
        dtype: cast kept activations (e.g. ``torch.float32`` for bf16 models).
    """
    sites = [parse_site(s) if isinstance(s, str) else s for s in sites]
    acts: dict[Site, torch.Tensor] = {}
    inputs = _inputs(model, batch)
    index = _normalize(positions, inputs["input_ids"].shape[1], model.device)
    with torch.no_grad(), contextlib.ExitStack() as stack:
        for site in sites:
            stack.enter_context(site_hook(model, site, _saver(acts, site, index, dtype, model.device)))
        if logits is None:
            stack.enter_context(_stop_when_done(model, sites))
        try:
            out = model.hf_model(**inputs, use_cache=False, logits_to_keep=1 if logits == "last" else 0)
        except StopForward:
            out = None
    kept = None if out is None else (out.logits[:, -1] if logits == "last" else out.logits)
    return Cache(acts, logits=None if kept is None else kept.to(model.device))


def _normalize(positions: Positions, seq_len: int, device: torch.device) -> Positions:
    """Check shared positions once and turn them into an index tensor (per-row ones pass through)."""
    if positions is None or (isinstance(positions, torch.Tensor) and positions.dim() == 2):
        return positions
    values = [int(p) for p in positions]
    if any(not -seq_len <= p < seq_len for p in values):
        raise SiteError(f"positions {values} out of range for sequence length {seq_len}")
    return torch.tensor([p % seq_len for p in values], dtype=torch.long, device=device)


def _saver(acts: dict, site: Site, index: Positions, dtype: torch.dtype | None, device: torch.device):
    """Keep ``site``'s activation at ``index``, on ``device`` (with a device map, every block's
    activations are gathered where the token ids are, so they stack across layers).
    """
    dim = 2 if site.name == "pattern" else 1
    shared = isinstance(index, torch.Tensor) and index.dim() == 1

    def save(act: torch.Tensor) -> None:
        act = act.detach()
        if shared:
            kept = act.index_select(dim, index if index.device == act.device else index.to(act.device))
        else:
            kept = select_positions(act, index, dim)
        # (an output that modeling code later changes in place reaches here as a copy: site_hook)
        acts[site] = kept.to(device, dtype) if dtype is not None else kept.to(device)

    return save


def _stop_when_done(model: Model, sites: list[Site]) -> contextlib.AbstractContextManager:
    layers = [s.layer for s in sites if s.layer is not None]
    if not layers:  # only embeddings: stop before block 0 runs

        def stop(module, args, kwargs):
            raise StopForward

        return module_hook(model.block(0), stop, "pre")
    return stop_after(model, max(layers))
