"""What an MLP does to the vectors that feed it and to tracked tokens, at the last position (Lv et
al. 2024, ``methods.md`` L5 and §1.6 pitfall 2).

- :func:`linearized_effects`: with ``J`` the Jacobian of the MLP (and its norm) at its actual input
  (:func:`~recallscope.core.mlp.mlp_jvp`), per head output ``o``: ``linear_coef = ⟨J o, o⟩ / ‖o‖²``
  and ``linear_norm = ‖J o‖``; per layer the first-order total ``Σ_h J o_h``, its norm and its cosine
  with the MLP output ``y``.
- :func:`logit_lens_ranks`: the 1-based rank of tracked tokens under the logit lens (the model's
  own final norm) of the residual before the MLP (``resid_post − mlp_out``) and after it
  (:func:`after_mlp`: ``resid_post``, less ``ple_out`` in blocks that add a per-layer input after
  the MLP, Gemma 4).
"""

from __future__ import annotations

import numpy as np
import torch

from recallscope.core.mlp import mlp_jvp
from recallscope.core.vocab import project_to_vocab
from recallscope.models.model import Model
from recallscope.models.sites import Site

__all__ = ["linearized_effects", "logit_lens_ranks", "after_mlp"]


def linearized_effects(model, layer, resid, raw, y, batch_size, out, fit, i) -> None:
    """``J o_h`` in chunks of facts: per-head ``linear_coef`` / ``linear_norm``, per-layer total."""
    n = raw.shape[1]
    Jo = torch.cat(
        [
            mlp_jvp(model, layer, resid[s : s + batch_size], raw[s : s + batch_size]).double()
            for s in range(0, len(raw), batch_size)
        ]
    )  # [F, n, d]
    sq = raw.pow(2).sum(-1)  # [F, n]
    coef = (Jo * raw).sum(-1) / sq
    out["linear_coef"][:, i, :n] = torch.where(sq > 0, coef, torch.nan).numpy()
    out["linear_norm"][:, i, :n] = Jo.norm(dim=-1).numpy()
    total = Jo.sum(1)  # [F, d]
    fit["linear_total_norm"][:, i] = total.norm(dim=-1).numpy()
    fit["linear_total_cos"][:, i] = torch.nn.functional.cosine_similarity(total, y, dim=-1).numpy()


def logit_lens_ranks(model: Model, acts, layers: list[int], tokens: torch.Tensor) -> dict[str, np.ndarray]:
    """1-based logit-lens ranks of the subject / target token before and after each MLP."""
    after = torch.stack([after_mlp(model, acts, layer) for layer in layers], 1)  # [F, layer, d]
    mlp = torch.stack([acts[Site(layer, "mlp_out")] for layer in layers], 1)
    x = torch.stack([after - mlp, after], 2)  # [F, layer, 2 (before/after), d]
    proj = project_to_vocab(model, x.to(model.dtype), "logit_lens", targets=tokens.clamp(min=0))
    ranks = (proj.target_ranks + 1).double()  # [F, layer, 2, 2 (subject/target)]
    ranks[(tokens < 0)[:, None, None, :].expand_as(ranks)] = torch.nan
    out = {}
    for t, token in enumerate(("subject", "target")):
        for w, when in enumerate(("before", "after")):
            out[f"{token}_rank_{when}"] = ranks[:, :, w, t].numpy()
    return out


def after_mlp(model: Model, acts, layer: int) -> torch.Tensor:
    """The residual just after MLP ``layer``'s update: ``resid_post``, less the third update a block
    adds after it (``ple_out``, Gemma 4's per-layer input).
    """
    after = acts[Site(layer, "resid_post")]
    return after - acts[Site(layer, "ple_out")] if model.spec.ple_update else after
