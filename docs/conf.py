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


# -- short cross-references ----------------------------------------------------------
# Docstrings refer to their neighbours by short names (:func:`find_shells`,
# :meth:`BaseDataset.materialize`).  The public classes are documented under their
# ``nidask.`` names, so Python's lookup from the documenting module can miss them.
# Resolve such a reference when exactly one documented nidask object ends with it.
def _resolve_short_reference(app, env, node, contnode):
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "").lstrip(".~")
    if not target or target.startswith("nidask."):
        return None
    domain = env.get_domain("py")
    suffix = "." + target
    matches = {
        name
        for name, entry in domain.objects.items()
        if name.startswith("nidask.") and name.endswith(suffix) and not entry.aliased
    }
    if len(matches) != 1:
        return None
    name = matches.pop()
    from sphinx.util.nodes import make_refnode

    entry = domain.objects[name]
    return make_refnode(app.builder, node["refdoc"], entry.docname, entry.node_id, contnode, name)


def setup(app):
    app.connect("missing-reference", _resolve_short_reference)
