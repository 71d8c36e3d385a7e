"""Models: loading, architecture specs, the site vocabulary and the conformance checks."""

from recallscope.models.families import spec_for
from recallscope.models.load import DEFAULT_MODEL, load_model
from recallscope.models.model import Model, ModelInfo
from recallscope.models.sites import SITE_NAMES, Site, parse_site
from recallscope.models.spec import ArchSpec, Dims

__all__ = [
    "ArchSpec",
    "DEFAULT_MODEL",
    "Dims",
    "Model",
    "ModelInfo",
    "SITE_NAMES",
    "Site",
    "load_model",
    "parse_site",
    "spec_for",
]
