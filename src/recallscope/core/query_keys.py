"""Query attribution kernels (Yu & Ananiadou, ``methods.md`` Y&A-6): the keys that activate value
neurons and attention units, and the shares of the residual's components in their inner products.

Value rows are frames: FFN neurons ``fact_row, layer, neuron, imp`` (:data:`NEURON_COLUMNS`) and
attention units ``fact_row, layer, head, dim, src, imp`` (:data:`UNIT_COLUMNS`, ``src`` the source
position in the padded batch). One :func:`component_cache` forward caches every component at every
position; then, for all rows at once:

- (a) :func:`ffn_value_scores`: the components' shares ``(c·key) / Σ_c' (c'·key)`` of each FFN value
  neuron's key (:func:`ffn_keys`: ``linearized``, ``input_row``, ``gate_row``, ``value``, ``as_coded``)
  at the last position, times ``imp``, summed per fact;
- (b) :func:`attn_unit_scores`: the same for the units' keys (:func:`unit_keys`) at their source;
- (c) :func:`query_neuron_scores`: every earlier FFN subvalue's share of ``x^ℓ_j · key``, times ``imp``;
- (d) :func:`ov_tokens`: the top query neurons' value vectors through the best unit's OV map, decoded.

A row with ``|Σ c·key| < guard · Σ |c·key|`` is skipped and counted. With ``centre`` and LayerNorms
every key is centred (:func:`centred`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from recallscope.core.cache import run_with_cache
from recallscope.core.decompose import ov_outputs
from recallscope.core.dtypes import compute_dtype
from recallscope.core.moe import moe_coefficients
from recallscope.core.subvalues import chunked_directions, ffn_subvalues, value_vectors
from recallscope.core.tokens import PromptBatch
from recallscope.core.vocab import decode_tokens, readout_chunk
from recallscope.errors import RecallscopeError
from recallscope.models.model import Model
from recallscope.models.sites import Site

__all__ = [
    "NEURON_COLUMNS",
    "UNIT_COLUMNS",
    "check_rows",
    "chunk_rows",
    "with_fact_ids",
    "component_cache",
    "centred",
    "ffn_keys",
    "ffn_layer_keys",
    "frozen_norm",
    "mlp_gradient",
    "act_and_slope",
    "unit_keys",
    "component_shares",
    "accumulate_shares",
    "ffn_value_scores",
    "attn_unit_scores",
    "query_neuron_scores",
    "ranked_scores",
    "ov_tokens",
    "top_tokens",
]

NEURON_COLUMNS = ("fact_row", "layer", "neuron", "imp")
UNIT_COLUMNS = ("fact_row", "layer", "head", "dim", "src", "imp")


def check_rows(model, batch, frame: pd.DataFrame, columns, name: str) -> None:
    """Raise unless ``frame`` has ``columns``, its ``fact_row`` indexes ``batch``, its ``layer`` a block."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise RecallscopeError(f"{name} lacks columns {missing}; expected {list(columns)}")
    if len(frame) == 0:
        return
    if frame["fact_row"].min() < 0 or frame["fact_row"].max() >= len(batch):
        raise RecallscopeError(f"{name}.fact_row must index the batch (0 ≤ row < {len(batch)})")
    if frame["layer"].min() < 0 or frame["layer"].max() >= model.n_layers:
        raise RecallscopeError(f"{name}.layer must be a block index (0 ≤ layer < {model.n_layers})")


def chunk_rows(frame: pd.DataFrame, rows: range) -> pd.DataFrame:
    """The rows of facts ``rows``, with ``fact_row`` counted from the chunk's start."""
    kept = frame[(frame["fact_row"] >= rows.start) & (frame["fact_row"] < rows.stop)]
    return kept.assign(fact_row=kept["fact_row"] - rows.start)


def with_fact_ids(frame: pd.DataFrame, fact_ids: list[str], pads: np.ndarray | None = None) -> pd.DataFrame:
    """``frame`` with ``fact_id`` (first) for ``fact_row``; given ``pads``, ``src_pos`` (from the prompt's
    start) for ``src``.
    """
    rows = frame["fact_row"].to_numpy(int)
    out = frame.drop(columns="fact_row").assign(fact_id=np.array(fact_ids, dtype=object)[rows])
    if pads is not None:
        out = out.drop(columns="src").assign(src_pos=frame["src"].to_numpy(int) - pads[rows])
    return out[["fact_id", *[c for c in out.columns if c != "fact_id"]]].reset_index(drop=True)


def _long(frame: pd.DataFrame, column: str, device) -> torch.Tensor:
    return torch.tensor(frame[column].to_numpy(np.int64), device=device)


def _imp(frame: pd.DataFrame, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(frame["imp"].to_numpy(np.float64), dtype=like.dtype, device=like.device)


def component_cache(model: Model, batch: PromptBatch, neurons: pd.DataFrame, units: pd.DataFrame) -> dict:
    """One forward's activations at every position, as float32 at least.

    Returns ``comps [B, T, 2L+1, d]`` (components; zero past the deepest row's layer), ``resid
    [B, T, L', d]`` (``x^ℓ``, up to that layer) and ``posts``: ``mlp_post [B, T, d_mlp]`` of each
    layer below the deepest unit.
    """
    n_post = int(units["layer"].max()) if len(units) else 0  # query neurons lie below the deepest unit
    deepest = max(n_post, int(neurons["layer"].max()) if len(neurons) else 0)
    sites = [Site(i, n) for i in range(deepest + 1) for n in ("resid_pre", "attn_out", "mlp_out")]
    sites += [Site(i, "mlp_post") for i in range(n_post)]
    dtype = compute_dtype(model.dtype)
    cache = run_with_cache(model, batch, sites, dtype=dtype)
    resid = cache.stack([Site(i, "resid_pre") for i in range(deepest + 1)], 2)  # [B, T, L', d]
    parts = [resid[:, :, 0]]
    for i in range(deepest + 1):
        parts += [cache[Site(i, "attn_out")], cache[Site(i, "mlp_out")]]
    comps = torch.stack(parts, 2)  # [B, T, 2L'+1, d]
    comps = torch.nn.functional.pad(comps, (0, 0, 0, 2 * model.n_layers + 1 - comps.shape[2]))
    posts = [cache[Site(i, "mlp_post")] for i in range(n_post)]
    return {"comps": comps, "resid": resid, "posts": posts}


def centred(model: Model, key: torch.Tensor, centre: bool) -> torch.Tensor:
    """``key [..., d]`` minus its mean when the norms are LayerNorms and ``centre``."""
    return key - key.mean(-1, keepdim=True) if centre and model.spec.norm == "layer" else key


def component_shares(comps: torch.Tensor, keys: torch.Tensor, n_used: torch.Tensor, guard: float):
    """Per-row component dots ``[R, C]`` (zero past ``n_used [R]``), their sum and the unstable mask."""
    used = torch.arange(comps.shape[1], device=comps.device)[None] < n_used[:, None]
    dots = torch.einsum("rcd,rd->rc", comps, keys) * used
    total = dots.sum(-1)
    unstable = (total.abs() < guard * dots.abs().sum(-1)) | (total == 0)
    return dots, total, unstable


def accumulate_shares(
    B: int, fact: torch.Tensor, dots, total, unstable, imp
) -> tuple[torch.Tensor, torch.Tensor]:
    """``Σ_rows share · Imp`` per fact ``[B, C]`` and the unstable count per fact ``[B]``."""
    weight = torch.where(unstable, 0.0, imp / torch.where(unstable, 1.0, total))
    scores = torch.zeros(B, dots.shape[1], dtype=dots.dtype, device=dots.device)
    scores.index_add_(0, fact, dots * weight[:, None])
    count = torch.zeros(B, dtype=torch.long, device=dots.device).index_add_(0, fact, unstable.long())
    return scores.cpu(), count.cpu()


def ffn_value_scores(
    model: Model, acts: dict, neurons: pd.DataFrame, ffn_key: str, centre: bool, guard: float
):
    """(a): scores ``[B, 2L+1]`` and unstable counts ``[B]``."""
    comps = acts["comps"]
    B, device = comps.shape[0], comps.device
    fact, layer = _long(neurons, "fact_row", device), _long(neurons, "layer", device)
    imp = _imp(neurons, comps)
    keys = centred(model, ffn_keys(model, acts, neurons, ffn_key), centre)  # [M, d]
    n_used = 2 * layer + (1 if model.spec.parallel else 2)
    dots, total, unstable = component_shares(comps[fact, -1], keys, n_used, guard)
    return accumulate_shares(B, fact, dots, total, unstable, imp)


def ffn_keys(model: Model, acts: dict, neurons: pd.DataFrame, ffn_key: str) -> torch.Tensor:
    """Key ``[M, d]`` of each value neuron (before centring)."""
    comps = acts["comps"]
    keys = torch.zeros(len(neurons), model.d_model, dtype=comps.dtype, device=comps.device)
    how = ffn_key
    if how == "as_coded":
        how = "value" if model.spec.gated_mlp else "input_row"
    if how == "gate_row" and not model.spec.gated_mlp:
        raise RecallscopeError(f"ffn_key='gate_row' needs a gated MLP; {model.spec.family} has none")
    for layer in sorted(set(neurons["layer"].tolist())):
        at = np.flatnonzero(neurons["layer"].to_numpy() == layer)
        rows = neurons.iloc[at]
        k, fact = _long(rows, "neuron", comps.device), _long(rows, "fact_row", comps.device)
        keys[torch.as_tensor(at, device=comps.device)] = ffn_layer_keys(model, acts, layer, fact, k, how)
    return keys


def _weight(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return tensor.to(like.device, like.dtype)


def ffn_layer_keys(model: Model, acts: dict, layer: int, fact, k, how: str) -> torch.Tensor:
    """Keys ``[m, d]`` of neurons ``k [m]`` of ``layer`` (rows ``fact [m]``)."""
    like = acts["comps"]
    path = model.spec.at(layer).mlp_norm
    params = model.norm_params(path, layer)
    gain = params.gain(like.dtype, like.device)
    gain = torch.ones(model.d_model, dtype=like.dtype, device=like.device) if gain is None else gain
    x = acts["resid"][fact, -1, layer]  # x^ℓ_N; sequential blocks: r^ℓ = x^ℓ + a^ℓ
    x = x if model.spec.parallel else x + acts["comps"][fact, -1, 2 * layer + 1]
    gate = model.norm_gate(path, layer, x)  # [m, d] a gated norm's gate at N, frozen (else None)
    scale = gain if gate is None else gain * gate.to(like.dtype)
    if how == "value":
        return _weight(model.W_out(layer), like)[k] * scale
    if how in ("input_row", "gate_row"):
        W = model.W_in(layer) if how == "input_row" else model.W_gate(layer)
        return _weight(W, like)[:, k].T * scale
    normed, inv_rho = frozen_norm(params, x, gain, gate)  # [m, d], [m]
    return mlp_gradient(model, layer, normed, k) * scale * inv_rho[:, None]


def frozen_norm(params, x: torch.Tensor, gain: torch.Tensor, gate) -> tuple[torch.Tensor, torch.Tensor]:
    """The norm's output ``x̃ [m, d]`` (times a gated norm's ``gate [m, d]``) and its scale
    ``1/ρ [m]`` for inputs ``x [m, d]``.
    """
    inv_rho = 1.0 / params.rho(x)[:, 0]
    normed = params.centre(x) * inv_rho[:, None] * gain
    normed = normed if params.bias is None else normed + _weight(params.bias, x)
    return (normed if gate is None else normed * gate.to(normed.dtype)), inv_rho


def mlp_gradient(model: Model, layer: int, normed: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``∇_x̃ c_k [m, d]`` at ``x̃ = normed [m, d]`` for neurons ``k [m]``."""
    if model.spec.at(layer).experts is not None:  # router weights and experts: by autograd
        x = normed.detach().requires_grad_(True)
        with torch.enable_grad():
            coeffs = moe_coefficients(model, layer, x)  # [m, d_mlp], each row its own token
            (grad,) = torch.autograd.grad(coeffs[torch.arange(len(k)), k].sum(), x)
        return grad.to(normed.dtype)
    W_in = _weight(model.W_in(layer), normed)[:, k].T  # [m, d]
    pre_in = (normed * W_in).sum(-1) + _bias(model.b_in(layer), k, normed)
    act = model.mlp_act(layer)
    if not model.is_gated(layer):
        return act_and_slope(act, pre_in)[1][:, None] * W_in
    W_gate = _weight(model.W_gate(layer), normed)[:, k].T
    pre_gate = (normed * W_gate).sum(-1) + _bias(model.b_gate(layer), k, normed)
    value, slope = act_and_slope(act, pre_gate)
    return (slope * pre_in)[:, None] * W_gate + value[:, None] * W_in


def _bias(bias: torch.Tensor | None, k: torch.Tensor, like: torch.Tensor) -> torch.Tensor | float:
    return 0.0 if bias is None else _weight(bias, like)[k]


def act_and_slope(act, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``act(z)`` and ``act'(z)`` elementwise, by autograd on the activation alone."""
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        y = act(z)
        (slope,) = torch.autograd.grad(y.sum(), z)
    return y.detach(), slope


def unit_keys(model: Model, acts: dict, units: pd.DataFrame, centre: bool) -> torch.Tensor:
    """``W_V^ℓ[kv(h)][:, n] ⊙ γ_1`` (times a gated norm's gate at the unit's source) (centred) per
    unit: ``[U, d]``.
    """
    like = acts["comps"]
    keys = torch.zeros(len(units), model.d_model, dtype=like.dtype, device=like.device)
    for layer in sorted(set(units["layer"].tolist())):
        at = np.flatnonzero(units["layer"].to_numpy() == layer)
        rows = units.iloc[at]
        kv = _long(rows, "head", like.device) // model.n_groups_at(layer)
        n = _long(rows, "dim", like.device)
        W_V = _weight(model.W_V(layer), like)  # [n_kv, d, d_head]
        path = model.spec.at(layer).ln_1
        gain = model.norm_params(path, layer).gain(like.dtype, like.device)
        key = W_V[kv, :, n]  # [m, d]
        key = key if gain is None else key * gain
        x = acts["resid"][_long(rows, "fact_row", like.device), _long(rows, "src", like.device), layer]
        gate = model.norm_gate(path, layer, x)  # [m, d] at each unit's source, frozen (else None)
        keys[torch.as_tensor(at, device=like.device)] = key if gate is None else key * gate.to(key.dtype)
    return centred(model, keys, centre)


def attn_unit_scores(model: Model, acts: dict, units: pd.DataFrame, centre: bool, guard: float):
    """(b): scores ``[B, 2L+1]``, unstable counts ``[B]`` and the unit keys ``[U, d]``."""
    comps = acts["comps"]
    B, device = comps.shape[0], comps.device
    fact, layer = _long(units, "fact_row", device), _long(units, "layer", device)
    src = _long(units, "src", device)
    imp = _imp(units, comps)
    keys = unit_keys(model, acts, units, centre)
    dots, total, unstable = component_shares(comps[fact, src], keys, 2 * layer + 1, guard)
    scores, count = accumulate_shares(B, fact, dots, total, unstable, imp)
    return scores, count, keys


def query_neuron_scores(model: Model, acts: dict, units: pd.DataFrame, keys: torch.Tensor, guard: float):
    """(c): query scores ``[B, L, d_mlp]``, each one's best unit ``[B, L, d_mlp]`` (``-1``: none),
    unstable counts ``[B]``.
    """
    comps, resid = acts["comps"], acts["resid"]
    B, device, dtype = comps.shape[0], comps.device, comps.dtype
    fact, layer = _long(units, "fact_row", device), _long(units, "layer", device)
    src = _long(units, "src", device)
    imp = _imp(units, comps)
    used = torch.arange(comps.shape[2], device=device)[None] < (2 * layer + 1)[:, None]
    spread = (torch.einsum("ucd,ud->uc", comps[fact, src], keys).abs() * used).sum(-1)
    denom = (resid[fact, src, layer] * keys).sum(-1)  # x^ℓ_j · key
    unstable = (denom.abs() < guard * spread) | (denom == 0)
    weight = torch.where(unstable, 0.0, imp / torch.where(unstable, 1.0, denom))  # [U]
    score = torch.zeros(B, model.n_layers, model.d_mlp, dtype=dtype, device=device)
    best = torch.full((B, model.n_layers, model.d_mlp), -1, dtype=torch.long, device=device)
    for i, post in enumerate(acts["posts"]):
        sub = ffn_subvalues(model, i, post[fact, src])  # coeffs [U, d_mlp, 1], values [d_mlp, d]
        live = (layer > i) & ~unstable  # [U]
        contrib = sub.coeffs[..., 0] * (keys @ sub.values.T) * weight[:, None]  # [U, d_mlp]
        score[:, i].index_add_(0, fact, contrib * live[:, None])
        best[:, i] = _best_unit(B, fact, torch.where(live[:, None], contrib, -torch.inf))
    count = torch.zeros(B, dtype=torch.long, device=device).index_add_(0, fact, unstable.long())
    return score.cpu(), best.cpu(), count.cpu()


def _best_unit(B: int, fact: torch.Tensor, contrib: torch.Tensor) -> torch.Tensor:
    """``[B, d_mlp]`` index (into the units) of each fact's largest finite contribution, ``-1`` if none."""
    U, K = contrib.shape
    index = fact[:, None].expand(U, K)
    top = torch.full((B, K), -torch.inf, dtype=contrib.dtype, device=contrib.device)
    top = top.scatter_reduce(0, index, contrib, "amax")
    unit = torch.arange(U, device=contrib.device)[:, None].expand(U, K)
    hit = (contrib == top[fact]) & torch.isfinite(contrib)
    first = torch.full((B, K), U, dtype=torch.long, device=contrib.device)
    first = first.scatter_reduce(0, index, torch.where(hit, unit, U), "amin")
    return torch.where(first == U, -1, first)


def ranked_scores(query: torch.Tensor, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per fact: flat indices ``[r]`` and scores of the top ``n`` non-zero query scores, best first."""
    out = []
    for row in query.flatten(1):
        nonzero = torch.nonzero(row != 0)[:, 0]
        order = torch.argsort(row[nonzero], descending=True, stable=True)[:n]
        out.append((nonzero[order], row[nonzero[order]]))
    return out


def ov_tokens(
    model: Model, acts: dict, units: pd.DataFrame, query, best, n_show: int, n_tokens: int
) -> list[dict]:
    """(d): per fact, the top ``n_show`` query neurons with their OV-mapped and own top tokens.

    The work is batched: one value-vector read per query layer, one OV map per head layer (over
    every shown neuron whose best unit is in it) and one product with the unembedding for every
    decoded vector of the chunk (a vector at a time would copy the layer's weights, or read the
    whole ``[d_vocab, d]`` matrix, per vector).
    """
    shown, listed = [], []  # listed: (the fact's rows, query layer, neuron, head layer, head)
    for b, (flat, _) in enumerate(ranked_scores(query, n_show)):
        shown.append({})
        for index in flat.tolist():
            i, k = divmod(index, model.d_mlp)
            unit = int(best[b, i, k])
            if unit >= 0:
                listed.append((shown[b], i, k, int(units["layer"].iloc[unit]), int(units["head"].iloc[unit])))
    if not listed:
        return shown
    dtype, device = compute_dtype(acts["posts"][0].dtype), acts["posts"][0].device
    # [n, d] the listed neurons' value vectors (post-norm gain folded) and their OV maps
    values = torch.empty(len(listed), model.d_model, dtype=dtype, device=device)
    for i in sorted({row[1] for row in listed}):
        at = [n for n, row in enumerate(listed) if row[1] == i]
        values[at] = value_vectors(model, "mlp", i, dtype=dtype, device=device)[[listed[n][2] for n in at]]
    mapped = torch.empty_like(values)
    for layer in sorted({row[3] for row in listed}):
        at = [n for n, row in enumerate(listed) if row[3] == layer]
        heads = torch.tensor([listed[n][4] for n in at])
        out = ov_outputs(model, layer, values[at].to(model.device, model.dtype))  # [n, H, d]
        mapped[at] = out[torch.arange(len(at)), heads].to(device, dtype)
    decoded = top_tokens(model, torch.stack([mapped, values], 1).flatten(0, 1), n_tokens, acts["comps"].dtype)
    for n, (rows, i, k, layer, h) in enumerate(listed):
        rows[(i, k)] = dict(
            head_layer=layer, head=h, ov_top_tokens=decoded[2 * n], value_top_tokens=decoded[2 * n + 1]
        )
    return shown


def top_tokens(model: Model, vector: torch.Tensor, n: int, dtype: torch.dtype) -> list:
    """The top ``n`` tokens of ``W_U (γ ⊙ centre(vector))``, computed in ``dtype`` a readout chunk of
    rows at a time: a list of strings for a vector ``[d]``, one list per row for vectors ``[k, d]``.
    """
    rows, step, k = vector.reshape(-1, vector.shape[-1]), readout_chunk(model), min(n, model.d_vocab)
    ids = torch.cat([D.topk(k).indices for D in chunked_directions(model, rows, step, dtype=dtype)])
    return decode_tokens(model, (ids[0] if vector.dim() == 1 else ids).cpu())
