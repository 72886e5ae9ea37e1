"""Sphinx configuration for the nidask documentation.

Build with ``python -m sphinx -W -b html docs docs/_build/html`` (the ``docs`` extra
installs what this needs).  Pages are Markdown (MyST); the API reference comes from
the numpy-style docstrings in ``src/nidask``.
"""

from __future__ import annotations

import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")
# prefer the source tree (an installed copy may be older than the docs being built)
if os.path.isdir(os.path.join(SRC, "nidask")) and SRC not in sys.path:
    sys.path.insert(0, SRC)

import nidask  # noqa: E402

project = "nidask"
author = "the nidask developers"
copyright = "the nidask developers"
release = nidask.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# -- MyST ----------------------------------------------------------------------------
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

# -- API reference -------------------------------------------------------------------
autosummary_generate = False  # summary tables only; objects are documented in api.md
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"show-inheritance": True}
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
napoleon_use_ivar = True

# -- HTML ----------------------------------------------------------------------------
html_theme = "furo" if importlib.util.find_spec("furo") else "alabaster"
html_title = f"nidask {release}"
html_static_path: list[str] = []
