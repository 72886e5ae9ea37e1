"""The documentation builds with Sphinx without a single warning (``-W``)."""

from __future__ import annotations

import os
import re
import site
import subprocess
import sys
from pathlib import Path

import pytest

import nidask

DOCS = Path(__file__).resolve().parents[1] / "docs"

for module in ("sphinx", "myst_parser"):
    pytest.importorskip(module, reason="docs tools not installed (pip install '.[docs]')")


def _pythonpath(current: str | None) -> str:
    """``PYTHONPATH`` for a child interpreter that imports the nidask imported here."""
    root = str(Path(nidask.__file__).resolve().parents[1])
    installed = {str(Path(p).resolve()) for p in site.getsitepackages()}
    parts = [] if root in installed else [root]
    return os.pathsep.join([*parts, *([current] if current else [])])


@pytest.mark.timeout(600)
def test_docs_build_without_warnings(tmp_path):
    env = dict(os.environ)
    # autodoc imports the nidask these tests import (the source tree or the install)
    env["PYTHONPATH"] = _pythonpath(env.get("PYTHONPATH"))
    command = [
        sys.executable,
        "-m",
        "sphinx",
        "-W",  # warnings are errors
        "--keep-going",  # report all of them
        "-b",
        "html",
        "-d",
        str(tmp_path / "doctrees"),
        str(DOCS),
        str(tmp_path / "html"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=580)
    assert result.returncode == 0, f"sphinx failed:\n{result.stdout[-4000:]}\n{result.stderr}"
    html = tmp_path / "html"
    for page in ("index", "installation", "concepts", "cluster", "api", "notebooks"):
        assert (html / f"{page}.html").is_file(), page
    api = (html / "api.html").read_text(encoding="utf-8")
    # the API reference really was generated from the docstrings
    for name in ("nidask.load", "nidask.Estimator.run", "nidask.data.dmri.readers.from_nii"):
        assert f'id="{name}"' in api, name


def test_api_reference_documents_every_module_of_the_tree():
    # the reference follows the tree: a module added, moved or removed shows here
    package = Path(nidask.__file__).parent
    modules = {
        ".".join(p.relative_to(package.parent).with_suffix("").parts)
        for p in package.rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py") and "cli" not in p.parts
    }
    text = (DOCS / "api.md").read_text()
    documented = set(re.findall(r"automodule:: (nidask[\w.]*)", text))
    assert modules - documented == set(), "modules missing from docs/api.md"
    assert documented - modules - {"nidask", "nidask.cli.info"} == set(), "stale entries"
    for package_dir in package.glob("*/__init__.py"):
        assert f"`nidask.{package_dir.parent.name}`" in text  # in the layout table
