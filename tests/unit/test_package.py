"""The package's public names load on first use; the command line starts without torch."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import recallscope


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys; print(' '.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return set(out.stdout.split())


@pytest.mark.parametrize(
    "code",
    [
        "import recallscope",
        "import recallscope.cli",
        "from recallscope.cli import main\ntry:\n    main(['run', '--help'])\nexcept SystemExit:\n    pass",
    ],
)
def test_the_package_and_the_cli_start_without_torch(code):
    loaded = _modules_after(code)
    assert not {"torch", "transformers", "sklearn"} & loaded


def test_every_public_name_resolves_to_its_module_object():
    assert set(recallscope.__all__) == set(recallscope._EXPORTS)
    for name, where in recallscope._EXPORTS.items():
        module = importlib.import_module(where)
        expected = module if where == f"recallscope.{name}" else getattr(module, name)
        assert getattr(recallscope, name) is expected, name
    assert set(recallscope.__all__) <= set(dir(recallscope))


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        recallscope.no_such_name  # noqa: B018


def test_stopwords_load_on_first_use():
    from recallscope.core.attributes import STOPWORDS

    assert isinstance(STOPWORDS, frozenset) and len(STOPWORDS) == 318 and "the" in STOPWORDS
    loaded = _modules_after("import recallscope.core.attributes")
    assert "torch" in loaded and "sklearn" not in loaded
