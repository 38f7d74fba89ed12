"""Sphinx configuration: `make docs` builds docs/ into build/docs/html (warnings are errors).

The API reference (``api/``) is written here from ``docs/_api.py``'s list of public names;
the gallery (``gallery/*.py``) is executed by sphinx-gallery on every build.
"""

import logging
import os
import sys
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))
os.environ.setdefault("MPLBACKEND", "Agg")

import _api  # noqa: E402

import curvlab  # noqa: E402

project = "curvlab"
author = "curvlab developers"
copyright = "curvlab developers"  # noqa: A001
release = version = curvlab.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
    "sphinx_gallery.gen_gallery",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "gallery/README.txt", "**/*.ipynb", "**/*.py.md5"]
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_inherit_docstrings = True
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # dataclass "Attributes:" as fields, not duplicate entries

html_theme = "furo"
html_title = f"curvlab {release}"
# no external fonts, scripts or analytics: the site works offline
html_theme_options = {"navigation_with_keys": True}

sphinx_gallery_conf = {
    "examples_dirs": "gallery",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",       # execute every plot_*.py
    "download_all_examples": False,
    "remove_config_comments": True,
    "abort_on_example_error": True,
    "only_warn_on_example_error": False,
    "plot_gallery": "True",
    "within_subsection_order": "FileNameSortKey",
    "matplotlib_animations": False,
    # the timing pages load jQuery / DataTables from a CDN: the site must work offline
    "write_computation_times": False,
}

# The examples' library logs (curvlab's monitor events, transformers' notices) stay out of
# the build output; the examples print what they show.
for _name in ("curvlab", "transformers"):
    logging.getLogger(_name).addHandler(logging.NullHandler())
    logging.getLogger(_name).propagate = False

# Warnings raised by the libraries the examples use (not by curvlab or the docs).
warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch")
warnings.filterwarnings("ignore", message=".*torch.jit.script.*")


def _write_api_pages() -> None:
    """One page per public module: every name it documents, linked from its parents."""
    import importlib

    out = HERE / "api"
    out.mkdir(exist_ok=True)
    owned = _api.owners()
    index = ["API reference", "=============", "",
             "Every public name, generated from its docstring. Names re-exported by several",
             "modules are documented once, on the most specific module's page.", "",
             ".. toctree::", "   :maxdepth: 1", ""]
    directive = {"class": "autoclass", "exception": "autoexception",
                 "function": "autofunction", "data": "autodata"}
    for modname, title in _api.PUBLIC_MODULES:
        index.append(f"   {modname}")
        lines = [f"``{modname}``: {title}", "=" * (len(modname) + len(title) + 6), "",
                 f".. automodule:: {modname}", "   :no-members:", ""]
        for name, k in owned[modname]:
            if k == "data":  # the `#:` comment may sit in a submodule: write it out here
                doc = _api._attr_doc(importlib.import_module(modname), name)
                lines += [f".. py:data:: {modname}.{name}", ""]
                lines += ["   " + line if line else "" for line in doc.splitlines()]
                lines.append("")
                continue
            lines += [f".. {directive[k]}:: {modname}.{name}"]
            if k in ("class", "exception"):
                lines += ["   :members:", "   :show-inheritance:"]
            lines.append("")
        mod = importlib.import_module(modname)
        elsewhere = [n for n in _api.public_names(mod) if n not in dict(owned[modname])]
        if elsewhere:
            lines += ["Also exported here (documented on their own module's page):", ""]
            for n in elsewhere:
                obj = getattr(mod, n)
                if _api.kind(obj) == "module":
                    lines.append(f"* :mod:`{obj.__name__}`")
                else:
                    home = next(m for m, names in owned.items() if n in dict(names))
                    lines.append(f"* :py:obj:`{n} <{home}.{n}>`")
            lines.append("")
        text = "\n".join(lines)
        path = out / f"{modname}.rst"
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
    text = "\n".join(index) + "\n"
    if not (out / "index.rst").exists() or (out / "index.rst").read_text() != text:
        (out / "index.rst").write_text(text)


_write_api_pages()


def _run_snippets(app) -> None:
    """Every ```python block of the guides runs (docs/_snippets.py), or the build fails."""
    import _snippets

    for page in _snippets.pages(HERE):
        _snippets.run_page(page)


def setup(app):
    app.connect("builder-inited", _run_snippets)
