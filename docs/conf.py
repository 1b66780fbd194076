"""Sphinx configuration of the perturbx documentation.

Built by ``.ci/run`` with warnings as errors and without network access: the tutorials are
rendered from their saved outputs (copied from ``../tutorials`` at build time), never
executed, and no inventory of another project is fetched.
"""

from __future__ import annotations

import shutil
from importlib.metadata import version as _installed_version
from pathlib import Path

HERE = Path(__file__).resolve().parent

project = "perturbx"
author = "the perturbx developers"
copyright = "the perturbx developers"
release = _installed_version("perturbx")
version = release

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
]
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
autodoc_typehints = "description"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "inherited-members": False}
autosummary_generate = False
nb_execution_mode = "off"  # rendered from the outputs saved in the notebooks
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3
exclude_patterns = ["_build", "**.ipynb_checkpoints"]
html_theme = "furo"
html_title = f"perturbx {release}"

# The tutorials live at the repository root (the test suite executes them there); the docs
# render copies of them.
_tutorials = HERE / "tutorials"
_tutorials.mkdir(exist_ok=True)
for notebook in sorted((HERE.parent / "tutorials").glob("*.ipynb")):
    shutil.copyfile(notebook, _tutorials / notebook.name)
