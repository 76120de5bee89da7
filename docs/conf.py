"""Sphinx configuration for sthist.

Build (executes the tutorials, warnings are errors)::

    pip install -e ".[doc]" && sphinx-build -W --keep-going -b html docs docs/_build/html

``STHIST_NB_EXECUTION=cache`` (or ``off``) skips re-running unchanged notebooks in local builds; the default,
``force``, runs every tutorial on every build so that they never rot.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import zlib
from importlib.metadata import version as _version
from pathlib import Path

HERE = Path(__file__).resolve().parent

project = "sthist"
author = "sthist developers"
copyright = "2026, sthist developers"
release = _version("sthist")
version = release

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
    "sphinxcontrib.bibtex",
]

# --- sources ---------------------------------------------------------------------------------------------------
# ".rst" first: autosummary writes its generated pages with the first suffix, and they are reStructuredText.
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints", "_static/*.py"]
templates_path = ["_templates"]
myst_enable_extensions = ["colon_fence", "dollarmath", "deflist"]
myst_heading_anchors = 3

# --- API reference ---------------------------------------------------------------------------------------------
autosummary_generate = True
autodoc_member_order = "groupwise"
autodoc_typehints = "signature"
numpydoc_show_class_members = False
numpydoc_xref_param_type = False
numpydoc_validation_checks: set[str] = set()
# Our own public cross-references must resolve. References into other projects cannot all be checked offline,
# and private modules (``sthist._engine``) are not documented.
nitpicky = True
nitpick_ignore_regex = [(r"py:.*", r"(?!sthist\b).*"), (r"py:.*", r"sthist(\.\w+)*\._\w.*")]

# --- bibliography ----------------------------------------------------------------------------------------------
bibtex_bibfiles = ["references.bib"]
bibtex_default_style = "plain"
bibtex_reference_style = "author_year"

# --- notebooks (tutorials/ is linked into the docs as docs/tutorials) ----------------------------------------
nb_execution_mode = os.environ.get("STHIST_NB_EXECUTION", "force")
nb_execution_timeout = 1200  # per cell, in seconds
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_execution_cache_path = str(HERE / "_build" / ".jupyter_cache")
nb_merge_streams = True
nb_output_stderr = "remove"  # library warnings and progress bars stay out of the rendered pages

# --- HTML ------------------------------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = "sthist"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_theme_options = {
    "repository_url": "https://github.com/sthist/sthist",
    "use_repository_button": True,
    "path_to_docs": "docs",
    "show_toc_level": 2,
}

# --- intersphinx ----------------------------------------------------------------------------------------------
# The real inventories are fetched when the internet is reachable. Offline (CI, air-gapped clusters) each
# project falls back to a small local inventory of the objects these pages link to, written below, so that the
# build neither fails nor loses those links. With a working alternative Sphinx only logs the fetch failure.
_INVENTORIES: dict[str, tuple[str, dict[str, tuple[str, str]]]] = {
    "python": (
        "https://docs.python.org/3/",
        {
            "pathlib.Path": ("py:class", "library/pathlib.html#$"),
            "os.PathLike": ("py:class", "library/os.html#$"),
        },
    ),
    "numpy": (
        "https://numpy.org/doc/stable/",
        {
            "numpy.ndarray": ("py:class", "reference/generated/numpy.ndarray.html#$"),
            "numpy.random.Generator": ("py:class", "reference/random/generator.html#$"),
        },
    ),
    "scipy": (
        "https://docs.scipy.org/doc/scipy/",
        {"scipy.sparse.csr_matrix": ("py:class", "reference/generated/scipy.sparse.csr_matrix.html#$")},
    ),
    "pandas": (
        "https://pandas.pydata.org/docs/",
        {"pandas.DataFrame": ("py:class", "reference/api/pandas.DataFrame.html#$")},
    ),
    "matplotlib": (
        "https://matplotlib.org/stable/",
        {
            "matplotlib.figure.Figure": ("py:class", "api/_as_gen/matplotlib.figure.Figure.html#$"),
            "matplotlib.axes.Axes": ("py:class", "api/_as_gen/matplotlib.axes.Axes.html#$"),
        },
    ),
    "anndata": (
        "https://anndata.readthedocs.io/en/stable/",
        {
            "anndata.AnnData": ("py:class", "generated/anndata.AnnData.html#$"),
            "anndata.read_h5ad": ("py:function", "generated/anndata.io.read_h5ad.html#anndata.io.read_h5ad"),
        },
    ),
    "scanpy": (
        "https://scanpy.readthedocs.io/en/stable/",
        {
            f"scanpy.{name}": ("py:function", f"generated/scanpy.{name}.html#$")
            for name in (
                "read_visium",
                "pp.normalize_total",
                "pp.log1p",
                "pp.highly_variable_genes",
                "pp.pca",
                "pp.neighbors",
                "tl.leiden",
                "tl.umap",
                "pl.spatial",
                "pl.umap",
            )
        },
    ),
    "squidpy": (
        "https://squidpy.readthedocs.io/en/stable/",
        {
            f"squidpy.{name}": ("py:function", f"api/squidpy.{name}.html#$")
            for name in ("gr.spatial_neighbors", "gr.spatial_autocorr", "pl.spatial_scatter", "read.visium")
        }
        | {"squidpy.im.ImageContainer": ("py:class", "api/squidpy.im.ImageContainer.html#$")},
    ),
    "spatialdata": (
        "https://spatialdata.scverse.org/en/stable/",
        {"spatialdata.SpatialData": ("py:class", "api/SpatialData.html#$")},
    ),
    "torch": (
        "https://docs.pytorch.org/docs/stable/",
        {
            "torch.nn.Module": ("py:class", "generated/torch.nn.Module.html#$"),
            "torch.Tensor": ("py:class", "tensors.html#$"),
            "torch.device": ("py:class", "tensor_attributes.html#$"),
        },
    ),
}


def _write_fallback_inventory(path: Path, name: str, entries: dict[str, tuple[str, str]]) -> None:
    """Write a Sphinx v2 ``objects.inv`` holding ``entries`` (object name -> (domain:role, relative URI))."""
    header = f"# Sphinx inventory version 2\n# Project: {name}\n# Version: \n"
    header += "# The remainder of this file is compressed using zlib.\n"
    body = "".join(f"{obj} {role} 1 {uri} -\n" for obj, (role, uri) in sorted(entries.items()))
    path.write_bytes(header.encode() + zlib.compress(body.encode()))


_FALLBACK_DIR = Path(tempfile.mkdtemp(prefix="sthist-intersphinx-"))
atexit.register(shutil.rmtree, _FALLBACK_DIR, ignore_errors=True)
intersphinx_mapping = {}
for _name, (_url, _entries) in _INVENTORIES.items():
    _inv = _FALLBACK_DIR / f"{_name}.inv"
    _write_fallback_inventory(_inv, _name, _entries)
    intersphinx_mapping[_name] = (_url, (None, str(_inv)))
intersphinx_timeout = 10


# --- Returns sections -----------------------------------------------------------------------------------------
# sthist's docstrings describe what a function returns in prose followed by the slots it writes (scanpy's style),
# which reads well in ``help()``. numpydoc would parse every unindented line of that prose as a separate return
# type. Before numpydoc sees a docstring, such a section is indented as a whole under one entry typed by the
# return annotation, so it renders as written.
_XREF = {
    "AnnData": ":class:`~anndata.AnnData`",
    "pd.DataFrame": ":class:`~pandas.DataFrame`",
    "np.ndarray": ":class:`~numpy.ndarray`",
    "Figure": ":class:`~matplotlib.figure.Figure`",
    "Axes": ":class:`~matplotlib.axes.Axes`",
    "ContrastiveModel": ":class:`~sthist.tl.ContrastiveModel`",
    "RidgeModel": ":class:`~sthist.tl.RidgeModel`",
}


def _annotation_rst(obj) -> str | None:
    import inspect
    import re

    try:
        ann = inspect.signature(obj).return_annotation
    except (TypeError, ValueError):
        return None
    if ann is inspect.Signature.empty:
        return None
    text = ann if isinstance(ann, str) else getattr(ann, "__name__", str(ann))
    return re.sub(r"[\w.]+", lambda m: _XREF.get(m.group(0), m.group(0)), text).replace("|", "or")


def _is_header(lines: list[str], i: int) -> bool:
    return (
        i + 1 < len(lines)
        and bool(lines[i].strip())
        and not lines[i].startswith(" ")
        and set(lines[i + 1].strip()) == {"-"}
        and len(lines[i + 1].strip()) >= 3
    )


def _wrap_returns(app, what, name, obj, options, lines: list[str]) -> None:
    import re

    start = next((i for i in range(len(lines)) if lines[i].strip() == "Returns" and _is_header(lines, i)), None)
    if start is None:
        return
    end = next((i for i in range(start + 2, len(lines)) if _is_header(lines, i)), len(lines))
    body = lines[start + 2 : end]
    while body and not body[0].strip():
        body.pop(0)
    while body and not body[-1].strip():
        body.pop()
    entries_only = all(
        i + 1 < len(body) and body[i + 1].startswith(" ")
        for i, line in enumerate(body)
        if line.strip() and not line.startswith(" ")
    )
    if not body or entries_only:
        return
    header = _annotation_rst(obj)
    if header is None:  # no annotation: the first class the prose names, if any
        found = re.search(r":class:`[^`]+`", " ".join(body))
        header = found.group(0) if found else "object"
    lines[start + 2 : end] = [header, *[("    " + line) if line.strip() else "" for line in body], ""]


def setup(app):
    """Register the Returns-section adapter before numpydoc (which listens with the default priority 500)."""
    app.connect("autodoc-process-docstring", _wrap_returns, priority=400)
