import pytest

from recallscope import Site, SiteError, parse_site
from recallscope.models.sites import SITE_NAMES


@pytest.mark.parametrize(
    ("text", "site"),
    [
        ("12.attn.z", Site(12, "z")),
        ("12.z", Site(12, "z")),
        ("3.resid_post", Site(3, "resid_post")),
        ("0.mlp.mlp_post", Site(0, "mlp_post")),
        ("embed", Site(None, "embed")),
        (" 7.attn.pattern ", Site(7, "pattern")),
    ],
)
def test_parse(text, site):
    assert parse_site(text) == site


@pytest.mark.parametrize("name", SITE_NAMES)
def test_round_trip(name):
    site = Site(None, name) if name in ("embed", "pos_embed") else Site(4, name)
    assert parse_site(str(site)) == site


def test_errors_say_what_is_expected():
    with pytest.raises(SiteError, match=r"unknown site name 'resid'; expected one of embed, pos_embed"):
        Site(1, "resid")
    with pytest.raises(SiteError, match=r"takes a layer index, got layer=None; write e.g. '3.resid_pre'"):
        Site(None, "resid_pre")
    with pytest.raises(SiteError, match="takes no layer"):
        Site(2, "embed")
    with pytest.raises(SiteError, match=r"cannot parse site '12-resid'; expected 'LAYER.NAME'"):
        parse_site("12-resid")


def test_sites_sort_by_layer():
    assert sorted([Site(2, "z"), Site(0, "z"), Site(1, "attn_out")])[0] == Site(0, "z")
