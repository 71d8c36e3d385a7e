"""The site vocabulary: where in the model an activation is read or written.

Names follow TransformerLens, so users of the field read them without a glossary. A site is a
layer plus a name; ``str(site)`` and :func:`parse_site` round-trip, so CLI flags, store keys and
report labels share one spelling::

    >>> parse_site("12.attn.z")
    Site(layer=12, name='z')
    >>> str(Site(3, "resid_post"))
    '3.resid_post'
    >>> str(Site(None, "embed"))
    'embed'

Canonical shapes (``B`` batch, ``P`` positions kept, ``T`` key positions; see ``methods.md`` §0.3):

=============  =================================  ==============================================
name           shape                              meaning
=============  =================================  ==============================================
``embed``      ``[B, P, d_model]``                token embedding (scaled for Gemma)
``pos_embed``  ``[B, P, d_model]``                position embedding (GPT-2, OPT; CTRL's sinusoids)
``resid_pre``  ``[B, P, d_model]``                input of block ``layer``  (``x^ℓ``)
``resid_mid``  ``[B, P, d_model]``                after attention, before the MLP (``r^ℓ``)
``resid_post`` ``[B, P, d_model]``                output of block ``layer`` (``x^{ℓ+1}``)
``attn_out``   ``[B, P, d_model]``                attention update added to the residual (``a^ℓ``)
``mlp_out``    ``[B, P, d_model]``                MLP update added to the residual (``m^ℓ``)
``ple_out``    ``[B, P, d_model]``                third update, after the MLP's: Gemma 3n/4's
                                                  per-layer input (``p^ℓ``; ``ArchSpec.ple_update``)
``q``          ``[B, P, n_heads, d_head]``        query projection (before RoPE and qk-norm)
``k``, ``v``   ``[B, P, n_kv_heads, d_head]``     key / value projection (before RoPE and qk-norm)
``z``          ``[B, P, n_heads, d_head]``        per-head mix ``Σ_j α_ij v_j`` (input of ``W_O``)
``pattern``    ``[B, n_heads, P, T]``             attention probabilities (query × key)
``mlp_pre``    ``[B, P, d_mlp]``                  input of the MLP activation (gate for gated MLPs)
``mlp_post``   ``[B, P, d_mlp]``                  neuron coefficients ``c_k`` (input of ``W_out``)
=============  =================================  ==============================================

For Gemma-2 (sandwich norms) ``attn_out`` and ``mlp_out`` are the outputs of the post-norms, i.e.
what is really added to the residual stream.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, get_args

from recallscope.errors import SiteError

__all__ = ["Site", "SiteName", "SITE_NAMES", "LAYERLESS_SITES", "parse_site"]

SiteName = Literal[
    "embed",
    "pos_embed",
    "resid_pre",
    "resid_mid",
    "resid_post",
    "attn_out",
    "mlp_out",
    "ple_out",
    "q",
    "k",
    "v",
    "z",
    "pattern",
    "mlp_pre",
    "mlp_post",
]
SITE_NAMES: tuple[str, ...] = get_args(SiteName)
LAYERLESS_SITES = frozenset({"embed", "pos_embed"})

# Sites living inside the attention module or the MLP are spelled "12.attn.z" / "12.mlp.mlp_post"
# in TL; we accept both that and the short "12.z".
_SUBMODULE_PREFIX = {"q": "attn", "k": "attn", "v": "attn", "z": "attn", "pattern": "attn"}
_SITE_RE = re.compile(r"^(?:(?P<layer>-?\d+)\.)?(?:(?:attn|mlp|hook)\.)?(?P<name>[a-z_]+)$")


@dataclass(frozen=True, order=True)
class Site:
    """One place in the model: a block index and a site name (``layer`` is None for embeddings)."""

    layer: int | None
    name: str

    def __post_init__(self) -> None:
        if self.name not in SITE_NAMES:
            raise SiteError(f"unknown site name {self.name!r}; expected one of {', '.join(SITE_NAMES)}")
        if (self.layer is None) != (self.name in LAYERLESS_SITES):
            need = "no layer" if self.name in LAYERLESS_SITES else "a layer index"
            raise SiteError(
                f"site {self.name!r} takes {need}, got layer={self.layer!r}; "
                f"write e.g. {'embed' if self.name in LAYERLESS_SITES else '3.' + self.name!r}"
            )

    def __str__(self) -> str:
        if self.layer is None:
            return self.name
        prefix = _SUBMODULE_PREFIX.get(self.name)
        return f"{self.layer}.{prefix}.{self.name}" if prefix else f"{self.layer}.{self.name}"


def parse_site(text: str) -> Site:
    """Parse ``"12.attn.z"``, ``"12.z"``, ``"3.resid_post"`` or ``"embed"`` into a :class:`Site`."""
    match = _SITE_RE.match(text.strip())
    if match is None:
        raise SiteError(
            f"cannot parse site {text!r}; expected 'LAYER.NAME' such as '12.resid_post' or "
            f"'12.attn.z', or a layerless name such as 'embed'"
        )
    layer = match["layer"]
    return Site(None if layer is None else int(layer), match["name"])
