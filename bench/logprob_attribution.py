"""Log-probability increase of every FFN neuron of a fact: rank-1 scoring against the per-neuron loop.

Yu & Ananiadou score FFN neuron ``(ℓ, k)`` by ``log p(t | r^ℓ + c_k w_k) − log p(t | r^ℓ)`` under the
frozen-scale head. The naive loop builds ``r^ℓ + c_k w_k`` and projects it onto the vocabulary for every
neuron (one ``[V, d]`` matrix-vector product each). recallscope projects each value vector once per
model (its direction ``D_k = W_U (γ ⊙ w_k)`` is static, like a weight) and scores a fact with a rank-1
update and one logsumexp per neuron (:func:`recallscope.core.subvalues.rank1_increase`). The ``top``
mode of the method scores only the neurons whose exact bounds can reach the top/bottom ``n``.

Printed: the time of one forward pass of the fact, the per-fact scoring time of all ``L × d_mlp``
neurons (static directions cached, as on a GPU; and with the projection recomputed per layer), the
naive loop, the largest score difference, and peak memory. Run::

    python bench/logprob_attribution.py --facts 3               # CPU
    python bench/logprob_attribution.py --facts 3 --device cuda # GPU (directions cached on the device)
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import time

import torch
import transformers

import recallscope as rs
from recallscope.core.subvalues import FrozenHead, ffn_subvalues, rank1_increase, value_directions
from recallscope.methods import logprob_attribution as la


def peak_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, repeat: int = 1):
    """Median wall time of ``fn()`` over ``repeat`` runs and its last value."""
    times, value = [], None
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        value = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), value


def trace(model, batch):
    """Last-position ``resid_mid``, ``mlp_post`` per layer and the final residual; the target."""
    L = model.n_layers
    sites = [rs.Site(layer, n) for layer in range(L) for n in ("resid_mid", "mlp_post")] + [
        rs.Site(L - 1, "resid_post")
    ]
    cache = rs.run_with_cache(model, batch, sites, positions=[-1], logits="last")
    last = {site: cache[site][:, 0] for site in sites}
    return last, cache.logits.argmax(-1)


def fast_scores(model, last, targets, directions=None) -> torch.Tensor:
    """``[L, d_mlp]`` exact increases of one fact; ``directions[l]`` cached or projected per layer."""
    L = model.n_layers
    head = FrozenHead.from_final(model, last[rs.Site(L - 1, "resid_post")], bias=False)
    out = []
    for layer in range(L):
        sub = ffn_subvalues(model, layer, last[rs.Site(layer, "mlp_post")])
        D = directions[layer] if directions is not None else head.directions(sub.values)
        base = head.logits(last[rs.Site(layer, "resid_mid")])
        out.append(rank1_increase(base, sub.coeffs / head.scale[:, None, None], D, targets)[0, :, 0])
    return torch.stack(out)


def naive_scores(model, last, targets, n_layers: int | None = None) -> torch.Tensor:
    """``[n_layers, d_mlp]``: for each neuron, project ``r + c_k w_k`` and take the target's log-softmax."""
    L = model.n_layers
    head = FrozenHead.from_final(model, last[rs.Site(L - 1, "resid_post")], bias=False)
    t = int(targets[0])
    out = torch.empty(n_layers or L, model.d_mlp, dtype=head.dtype, device=head.scale.device)
    for layer in range(n_layers or L):
        sub = ffn_subvalues(model, layer, last[rs.Site(layer, "mlp_post")])
        r = last[rs.Site(layer, "resid_mid")].to(head.dtype)
        before = head.logits(r).log_softmax(-1)[0, t]
        for k in range(model.d_mlp):
            after = head.logits(r + sub.coeffs[0, k, 0] * sub.values[k]).log_softmax(-1)[0, t]
            out[layer, k] = after - before
    return out


def measure(model, facts, i, directions, device, *, naive: bool, naive_layers: int | None) -> tuple:
    """Forward, cached, per-layer and naive timings for fact ``i``, and the score differences."""
    batch = facts.to_batch(model, [i])
    fwd_s, _ = timed(lambda: rs.forward(model, batch), device, repeat=5)
    last, targets = trace(model, batch)
    cached_s, scores = timed(lambda: fast_scores(model, last, targets, directions), device, repeat=3)
    uncached_s, again = timed(lambda: fast_scores(model, last, targets), device)
    naive_s, diff = float("nan"), float("nan")
    if naive:
        naive_s, expected = timed(lambda: naive_scores(model, last, targets, naive_layers), device)
        diff = float((scores[: len(expected)] - expected).abs().max())
        naive_s *= model.n_layers / len(expected)  # extrapolated when only some layers were looped
    same = float((scores - again).abs().max())
    return facts[i].prompt, fwd_s, cached_s, uncached_s, naive_s, diff, same


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--facts", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--naive-facts", type=int, default=1, help="facts timed with the naive loop")
    parser.add_argument(
        "--naive-layers", type=int, default=None, help="loop over the first N layers only and scale the time"
    )
    parser.add_argument(
        "--method-facts", type=int, default=8, help="facts for the method's end-to-end timing"
    )
    args = parser.parse_args(argv)
    device = args.device
    if device == "cpu":
        torch.set_num_threads(2)
    model = rs.load_model(args.model, device=device, dtype=getattr(torch, args.dtype))
    facts = rs.load_facts("mixed", templates="first").known_by(model).sample(args.facts, seed=0)
    n_neurons = model.n_layers * model.d_mlp
    print(
        f"recallscope {rs.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"python {platform.python_version()}, device {device} "
        f"({torch.cuda.get_device_name() if device == 'cuda' else f'{torch.get_num_threads()} threads'}), "
        f"model {args.model} {args.dtype}, {model.n_layers} x {model.d_mlp} = {n_neurons} FFN neurons, "
        f"vocabulary {model.d_vocab}, {len(facts)} facts"
    )
    sync(device)
    proj_s, directions = timed(lambda: _all_directions(model), device)
    if args.naive_layers:
        print(f"naive loop timed on the first {args.naive_layers} layers, scaled to {model.n_layers}")
    print(f"static directions of all neurons (once per model): {proj_s:.2f} s, {peak_mb(device):.0f} MB peak")

    rows = [
        measure(
            model, facts, i, directions, device, naive=i < args.naive_facts, naive_layers=args.naive_layers
        )
        for i in range(len(facts))
    ]
    print(
        "\n| fact | forward (ms) | all neurons, cached directions (ms) | ratio to forward | "
        "projecting per layer (s) | naive loop (s) | speed-up vs naive | max abs diff |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for prompt, fwd_s, cached_s, uncached_s, naive_s, diff, _ in rows:
        speedup = naive_s / cached_s if naive_s == naive_s else float("nan")
        print(
            f"| {prompt} | {fwd_s * 1e3:.1f} | {cached_s * 1e3:.1f} | {cached_s / fwd_s:.2f}× | "
            f"{uncached_s:.2f} | {naive_s:.1f} | {speedup:.0f}× | {diff:.1e} |"
        )
    print(f"\npeak memory: {peak_mb(device):.0f} MB ({'GPU allocated' if device == 'cuda' else 'RSS'})")
    del directions
    batch = facts.to_batch(model, list(range(min(args.method_facts, len(facts)))))
    for mode in ("top", "all"):
        seconds, _ = timed(
            lambda m=mode: la.run(model, batch, la.Config(levels=("neuron",), exact=m)), device
        )
        print(f"logprob_attribution.run neurons exact={mode}: {seconds:.2f} s for {len(batch)} facts")


def _all_directions(model) -> list[torch.Tensor]:
    """``D_l [d_mlp, V]`` per layer (the frozen head without ρ; only the gain enters)."""
    zeros = torch.zeros(1, model.d_mlp, device=model.device)
    return [
        value_directions(model, ffn_subvalues(model, layer, zeros).values) for layer in range(model.n_layers)
    ]


if __name__ == "__main__":
    main()
