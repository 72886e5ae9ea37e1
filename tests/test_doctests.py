"""The examples in nidask's docstrings run and print what they show.

Every module of the package is walked, subpackages included (``nidask.io``,
``nidask.ops``, ``nidask.estimation``, ``nidask.cli``), so the README's test command
runs every example.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil
from pathlib import Path

import pytest

import nidask


def _raise(name: str) -> None:
    raise ImportError(f"{name} could not be imported to collect its examples")


MODULES = sorted(
    ["nidask"]
    + [info.name for info in pkgutil.walk_packages(nidask.__path__, "nidask.", onerror=_raise)]
)


def test_every_module_is_walked():
    """Each ``.py`` file of the package is one of the modules whose examples run."""
    root = Path(nidask.__file__).parent
    files = {
        ".".join(("nidask", *path.relative_to(root).with_suffix("").parts)).removesuffix(
            ".__init__"
        )
        for path in root.rglob("*.py")
    }
    assert files == set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an example that writes a relative path writes it here
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, report=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
