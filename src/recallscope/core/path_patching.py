"""Path patching of senders to the logits at the last position, on a resumed clean run (Lv et al.
2024, ``methods.md`` L3).

Senders are the heads (their ``z``) and MLPs (``mlp_out``) of a layer, the receiver the final
logits. With the ``q``, ``k``, ``v`` of every head frozen to their clean values and only the last
position ``N`` touched, nothing but the residual stream at ``N`` changes, so one resumed forward
per layer (:func:`~recallscope.core.resume.resume` at block ``ℓ``, position ``N``) holds one row per
prompt × sender:

- :func:`sender_values`: the counterfactual ``z`` and ``mlp_out`` at ``N`` of counterfactual prompts
  (per prompt, or their mean), as :class:`SenderValues`;
- :func:`last_position_keeper`: a site hook keeping the clean value at ``N`` while a run is recorded;
- :func:`sender_edits`: the site edits of the resumed forward at one layer: each row's sender set to
  its counterfactual value, ``attn_out`` of every later layer held clean (frozen ``q/k/v``), and with
  ``freeze_mlps`` the later MLP outputs too::

    for site, fn in sender_edits(model, layer, held, values, n_prompts, config):
        stack.enter_context(site_hook(model, site, fn))
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from recallscope.core.cache import run_with_cache
from recallscope.models.model import Model
from recallscope.models.sites import Site

__all__ = [
    "SenderValues",
    "sender_values",
    "row_chunks",
    "last_position_keeper",
    "sender_edits",
    "set_last_position",
]


def row_chunks(n: int, size: int) -> Iterator[range]:
    """Consecutive ``range`` s of at most ``size`` rows covering ``0 … n - 1``."""
    return (range(i, min(i + size, n)) for i in range(0, n, size))


@dataclass(frozen=True)
class SenderValues:
    """Counterfactual sender values at the last position, per fact or one mean broadcast to all.

    Attributes:
        z: ``[F | 1, L, H, d_head]``.
        mlp: ``[F | 1, L, d_model]``.
    """

    z: torch.Tensor
    mlp: torch.Tensor

    def rows(self, index: Sequence[int]) -> SenderValues:
        if self.z.shape[0] == 1:
            return self
        index = torch.as_tensor(list(index), dtype=torch.long)
        return SenderValues(self.z[index], self.mlp[index])


def sender_values(model: Model, cf, config) -> SenderValues:
    """``z`` and ``mlp_out`` at the last position of every counterfactual prompt (their mean in
    ``mean`` mode), ``batch_size`` prompts per forward.
    """
    layers = range(model.n_layers)
    z_sites = [Site(layer, "z") for layer in layers]
    mlp_sites = [Site(layer, "mlp_out") for layer in layers] if config.mlps else []
    zs, mlps = [], []
    for rows in row_chunks(len(cf), config.batch_size):
        cache = run_with_cache(model, cf.to_batch(model, list(rows)), [*z_sites, *mlp_sites], positions=[-1])
        zs.append(cache.stack(z_sites)[:, :, 0])  # [B, L, H, d_head]
        mlps.append(cache.stack(mlp_sites)[:, :, 0] if mlp_sites else torch.zeros(len(rows), 0))
    z, mlp = torch.cat(zs), torch.cat(mlps)
    if config.patching == "mean":  # averaged in float64 at least, then back to the model's dtype
        mean = lambda x: x.to(torch.promote_types(x.dtype, torch.float64)).mean(0, keepdim=True).to(x.dtype)  # noqa: E731
        z, mlp = mean(z), mean(mlp)
    return SenderValues(z, mlp)


def last_position_keeper(held: dict, site: Site):
    def keep(act: torch.Tensor) -> None:
        held[site] = act[:, -1].detach().clone()

    return keep


def sender_edits(model: Model, layer: int, held: dict, values: SenderValues, n_groups: int, config):
    """``(site, fn)`` edits of the resumed forward at ``layer``: rows are ``G × senders`` (heads of
    ``layer``, then its MLP), all at the one resumed position.
    """
    n_heads, device = model.n_heads, model.device
    n_send = n_heads + int(config.mlps)
    group = torch.arange(n_groups, device=device)
    head_rows = (group[:, None] * n_send + torch.arange(n_heads, device=device)).reshape(-1)
    heads = torch.arange(n_heads, device=device).repeat(n_groups)
    z = values.z[:, layer].to(device).expand(n_groups, -1, -1).reshape(-1, model.d_head)  # [G·H, d_head]
    edits = [(Site(layer, "z"), set_last_position(head_rows, z, heads))]
    every = torch.arange(n_groups * n_send, device=device)
    for later in range(layer + 1, model.n_layers):  # frozen q/k/v = clean attention output at N
        edits.append(
            (
                Site(later, "attn_out"),
                set_last_position(every, _per_row(held, Site(later, "attn_out"), n_send)),
            )
        )
        if config.freeze_mlps:
            edits.append(
                (
                    Site(later, "mlp_out"),
                    set_last_position(every, _per_row(held, Site(later, "mlp_out"), n_send)),
                )
            )
    mlp_rows, mlp_values = [], []
    if config.mlps:
        rows = group * n_send + n_heads
        edits.append((Site(layer, "attn_out"), set_last_position(rows, held[Site(layer, "attn_out")])))
        mlp_rows.append(rows)
        mlp_values.append(values.mlp[:, layer].to(device).expand(n_groups, -1))
    if config.freeze_mlps:  # a head sender's own MLP (reads it in a sequential block)
        mlp_rows.append(head_rows)
        mlp_values.append(held[Site(layer, "mlp_out")].repeat_interleave(n_heads, 0))
    if mlp_rows:
        edits.append((Site(layer, "mlp_out"), set_last_position(torch.cat(mlp_rows), torch.cat(mlp_values))))
    return edits


def _per_row(held: dict, site: Site, n_send: int) -> torch.Tensor:
    return held[site].repeat_interleave(n_send, 0)  # [G · senders, d]


def set_last_position(rows: torch.Tensor, values: torch.Tensor, heads: torch.Tensor | None = None):
    """A site edit writing ``values`` at the last position of ``rows`` (and query ``heads`` for ``z``)."""

    def edit(act: torch.Tensor) -> torch.Tensor:
        new = act.clone()
        if heads is None:
            new[rows, -1] = values.to(act.dtype)
        else:
            new[rows, -1, heads] = values.to(act.dtype)
        return new

    return edit
