"""Checks of the documentation sources that need no Sphinx build (the build itself runs in `.ci/run`)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

import sthist

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
TUTORIALS = ROOT / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))


def _load_conf():
    spec = importlib.util.spec_from_file_location("sthist_docs_conf", DOCS / "conf.py")
    conf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conf)
    return conf


def test_the_tutorials_are_all_listed():
    assert [p.stem for p in NOTEBOOKS] == [
        "01_quickstart",
        "02_your_own_data",
        "03_comparing_methods",
        "04_scanpy_squidpy",
        "05_whole_slide",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_are_committed_without_outputs(path):
    nb = json.loads(path.read_text())
    assert nb["nbformat"] == 4
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code, "a tutorial without code"
    for cell in code:
        assert cell["outputs"] == [], f"{path.name}: outputs committed; clear them before committing"
        assert cell["execution_count"] is None, f"{path.name}: execution counts committed"
    assert nb["cells"][0]["cell_type"] == "markdown" and nb["cells"][0]["source"][0].startswith("# ")


def test_tutorials_are_linked_into_the_docs_and_listed():
    link = DOCS / "tutorials"
    assert link.is_dir() and link.resolve() == TUTORIALS.resolve()
    toc = (DOCS / "tutorials.md").read_text()
    for path in NOTEBOOKS:
        assert f"tutorials/{path.stem}" in toc


def test_every_public_function_is_in_the_api_reference():
    api = (DOCS / "api.md").read_text()
    listed = set(re.findall(r"^\s+(\w+\.\w+)\s*$", api, flags=re.M))
    for module in ("pp", "tl", "pl", "get", "datasets", "io"):
        for name in getattr(sthist, module).__all__:
            assert f"{module}.{name}" in listed, f"sthist.{module}.{name} is missing from docs/api.md"


def test_every_citation_has_a_bibliography_entry():
    keys = set(re.findall(r"^@\w+\{([^,]+),", (DOCS / "references.bib").read_text(), flags=re.M))
    sources = [*DOCS.glob("*.md"), *DOCS.glob("methods/*.md"), *NOTEBOOKS]
    cited = set()
    for path in sources:
        for group in re.findall(r"\{cite:[pt]\}`([^`]+)`", path.read_text()):
            cited.update(k.strip() for k in group.split(","))
    assert cited, "no citations found"
    assert cited <= keys, f"cited but not in references.bib: {sorted(cited - keys)}"


def test_readme_figure_exists_and_is_small():
    readme = (ROOT / "README.md").read_text()
    figures = re.findall(r"\((docs/_static/[\w.-]+\.png)\)", readme)
    assert figures, "the README shows no figure from docs/_static"
    for fig in figures:
        assert (ROOT / fig).is_file()
        assert (ROOT / fig).stat().st_size < 300 * 1024


def test_readme_names_the_docs_build_command():
    assert "sphinx-build -W --keep-going -b html docs docs/_build/html" in (ROOT / "README.md").read_text()


def test_returns_sections_in_prose_become_one_numpydoc_entry():
    conf = _load_conf()

    def f():  # pragma: no cover - only its signature is read
        ...

    f.__annotations__ = {"return": "RidgeModel | None"}

    lines = [
        "Summary.",
        "",
        "Returns",
        "-------",
        "``None`` or a copy of ``adata``",
        "(when ``copy=True``), with",
        "",
        "``adata.layers['x']``",
        "    float32 values.",
        "",
        "Examples",
        "--------",
        ">>> 1",
    ]
    conf._wrap_returns(None, "function", "f", f, {}, lines)
    i = lines.index("Returns")
    assert lines[i + 2] == ":class:`~sthist.tl.RidgeModel` or None"
    assert lines[i + 3 : i + 9] == [
        "    ``None`` or a copy of ``adata``",
        "    (when ``copy=True``), with",
        "",
        "    ``adata.layers['x']``",
        "        float32 values.",
        "",
    ]
    assert lines[-3:] == ["Examples", "--------", ">>> 1"]

    proper = ["Returns", "-------", "int", "    The answer."]
    conf._wrap_returns(None, "function", "f", f, {}, proper)
    assert proper == ["Returns", "-------", "int", "    The answer."]


def test_offline_intersphinx_fallbacks_are_valid_inventories():
    inventory = pytest.importorskip("sphinx.util.inventory", reason="needs the doc extra")
    conf = _load_conf()
    for name, (url, (remote, local)) in conf.intersphinx_mapping.items():
        assert remote is None and url.startswith("https://")
        with open(local, "rb") as f:
            inv = inventory.InventoryFile.load(f, url, lambda base, uri: base + uri)
        entries = dict(inv.data.items()) if hasattr(inv, "data") else inv
        assert entries, f"empty fallback inventory for {name}"
