"""The public verbs are importable from the package root, lazily."""

import subprocess
import sys

import pytest

import qanalyze


@pytest.mark.parametrize("name", qanalyze.__all__)
def test_every_public_name_resolves(name):
    assert getattr(qanalyze, name).__doc__


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError):
        qanalyze.no_such_verb  # noqa: B018


def test_import_does_not_load_torch():
    code = "import sys, qanalyze; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
