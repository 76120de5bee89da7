"""Conventions of the public API, checked over every function in the ``__all__`` of each subpackage.

The rules (the house guide's "Signatures" and "Plots" sections):

- ``pp``, ``tl`` and ``pl`` functions take the data first and positionally: ``adata``, annotated as an AnnData.
  The exceptions are the functions listed in ``SOURCE_FIRST``, which build a new AnnData from a source (an image
  or a store path); they take that source first.
- ``io`` readers and ``datasets`` take either no positional argument at all (a generator such as ``toy``) or one
  source first: a path, a data root or a SpatialData object (``READER_SOURCES``).
- Besides the first, at most one more positional-or-keyword parameter, and only where ``EXTRA_POSITIONAL`` names
  it; no ``*args``. Everything else is keyword-only.
- ``copy`` is keyword-only with default ``False``; no function has both ``copy`` and ``inplace``.
- Every public function has a return annotation.
- Every ``pl`` function has keyword-only ``show=None`` and ``return_fig=False``; ``ax=None`` exactly on the
  single-panel plots listed in ``SINGLE_PANEL``.

Then the behaviour of ``copy``: ``copy=True`` returns a new AnnData and leaves the input as it was;
``copy=False`` writes the same into the input and returns ``None``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import numpy as np
import pandas as pd
import pytest
from anndata import AnnData
from scipy import sparse

import sthist as st

SUBPACKAGES = ("pp", "tl", "pl", "get", "io", "datasets")
READERS = ("io", "datasets")

# functions of pp/tl that make a new AnnData from a source instead of taking one: name of their first parameter
SOURCE_FIRST = {
    "sthist.pp.read_store": "path",
    "sthist.pp.tile_tissue": "image",
    "sthist.tl.predict_slide": "image",
    "sthist.tl.load_model": "dir_path",
    "sthist.pl.benchmark": "result",
}
# functions that take no data at all (registries)
NO_DATA = {"sthist.tl.methods"}
# names the first (source) parameter of a reader or data set may have
READER_SOURCES = {"path", "root", "sdata", "ids"}  # ids: the HEST-1k samples sthist.datasets.hest downloads
# the one extra positional-or-keyword parameter a function may have after its data
EXTRA_POSITIONAL = {
    "sthist.tl.predict_expression": "model",
    "sthist.tl.predict_slide": "model",
    "sthist.tl.calibrate": "model",
    "sthist.pl.predicted_vs_true": "genes",
}
# plots that draw one panel and so take ``ax=``
SINGLE_PANEL = {"sthist.pl.scores", "sthist.pl.training_history"}

POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
KW = inspect.Parameter.KEYWORD_ONLY


def _public_functions() -> dict[str, Callable[..., Any]]:
    out: dict[str, Callable[..., Any]] = {}
    for sub in SUBPACKAGES:
        module = getattr(st, sub)
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isclass(obj):
                continue
            out[f"sthist.{sub}.{name}"] = obj
    return out


FUNCTIONS = _public_functions()


def _subpackage(qualname: str) -> str:
    return qualname.split(".")[1]


def _sig(qualname: str) -> inspect.Signature:
    return inspect.signature(FUNCTIONS[qualname])


def _positional(sig: inspect.Signature) -> list[inspect.Parameter]:
    return [p for p in sig.parameters.values() if p.kind in POSITIONAL]


def test_public_names_are_functions_or_classes():
    for sub in SUBPACKAGES:
        module = getattr(st, sub)
        for name in module.__all__:
            obj = getattr(module, name)
            assert inspect.isclass(obj) or inspect.isfunction(inspect.unwrap(obj)), f"sthist.{sub}.{name}: {obj!r}"


def test_allow_lists_name_public_functions():
    """An allow-list entry for a function that is gone or renamed would silently allow nothing."""
    for listed in (SOURCE_FIRST, EXTRA_POSITIONAL, SINGLE_PANEL):
        stale = sorted(set(listed) - set(FUNCTIONS))
        assert not stale, f"allow-list names no public function: {stale}"
    assert all(_subpackage(q) not in READERS for q in SOURCE_FIRST), "readers need no SOURCE_FIRST entry"
    assert all(_subpackage(q) == "pl" for q in SINGLE_PANEL)


@pytest.mark.parametrize("qualname", list(FUNCTIONS))
def test_sig_conventions(qualname: str):
    sig = _sig(qualname)
    sub = _subpackage(qualname)
    params = list(sig.parameters.values())
    positional = _positional(sig)
    assert not any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params), f"{qualname}: no *args"

    # the data first
    if sub in READERS:
        if positional:
            assert positional[0].name in READER_SOURCES, (
                f"{qualname}: a reader takes nothing positional or a source first named one of "
                f"{sorted(READER_SOURCES)}, not {positional[0].name!r}"
            )
    elif qualname in NO_DATA:
        assert not params, f"{qualname}: a registry listing takes no parameters"
    else:
        assert positional, f"{qualname}: the data must be the first, positional parameter"
        first = positional[0]
        assert params[0] is first
        expected = SOURCE_FIRST.get(qualname, "adata")
        assert first.name == expected, f"{qualname}: first parameter is {first.name!r}, expected {expected!r}"
        if expected == "adata":
            assert "AnnData" in str(first.annotation), f"{qualname}: annotate `adata` as AnnData"

    # at most one more positional parameter, only where allowed, named as allowed
    extra = positional[1:]
    allowed = EXTRA_POSITIONAL.get(qualname)
    assert len(extra) <= (1 if allowed else 0), (
        f"{qualname}: {[p.name for p in extra]} can be passed positionally; make them keyword-only (after `*`)"
    )
    if extra:
        assert extra[0].name == allowed, f"{qualname}: positional {extra[0].name!r}, allowed only {allowed!r}"

    # copy
    if "copy" in sig.parameters:
        copy = sig.parameters["copy"]
        assert copy.kind is KW, f"{qualname}: `copy` must be keyword-only"
        assert copy.default is False, f"{qualname}: `copy` defaults to False"
        assert "inplace" not in sig.parameters, f"{qualname}: has both `copy` and `inplace`"

    # return annotation
    assert sig.return_annotation is not inspect.Signature.empty, f"{qualname}: add a return annotation"


@pytest.mark.parametrize("qualname", [q for q in FUNCTIONS if _subpackage(q) == "pl"])
def test_plot_conventions(qualname: str):
    sig = _sig(qualname)
    for name, default in (("show", None), ("return_fig", False)):
        assert name in sig.parameters, f"{qualname}: add `{name}={default}`"
        p = sig.parameters[name]
        assert p.kind is KW and p.default is default, f"{qualname}: `{name}` keyword-only, default {default}"
    if qualname in SINGLE_PANEL:
        assert "ax" in sig.parameters, f"{qualname}: a single-panel plot takes `ax=`"
        p = sig.parameters["ax"]
        assert p.kind is KW and p.default is None, f"{qualname}: `ax` keyword-only, default None"
    else:
        assert "ax" not in sig.parameters, f"{qualname}: takes `ax`; list it in SINGLE_PANEL if it draws one panel"
    assert "save" not in sig.parameters, f"{qualname}: no `save=`; users call `fig.savefig`"
    assert "Figure" in str(sig.return_annotation), f"{qualname}: the return annotation must include the Figure"


# --------------------------------------------------------------------------------------------- #
# copy=True / copy=False
# --------------------------------------------------------------------------------------------- #
@lru_cache(maxsize=1)
def _raw() -> AnnData:
    return st.datasets.toy(n_rows=6, n_cols=6, n_genes=12, seed=0)


@lru_cache(maxsize=1)
def _prepared() -> AnnData:
    adata = _raw().copy()
    st.pp.extract_patches(adata, patch_size=32, progress=False)
    st.pp.normalize_expression(adata)
    st.pp.embed_patches(adata, progress=False)
    return adata


@lru_cache(maxsize=1)
def _ridge():
    return st.tl.fit_ridge(_prepared(), features_key="X_hed_fast", layer="targets")


def _without_embeddings() -> AnnData:
    adata = _prepared().copy()
    del adata.obsm["X_hed_fast"]
    del adata.uns["X_hed_fast"]
    return adata


def _no_genes() -> AnnData:
    return _prepared()[:, []].copy()


# case id -> (function, data, positional arguments after the data, keyword arguments)
COPY_CASES: dict[str, tuple[str, Callable[[], AnnData], tuple, dict[str, Any]]] = {
    "extract_patches": ("sthist.pp.extract_patches", lambda: _raw().copy(), (), {"patch_size": 32, "progress": False}),
    "embed_patches": ("sthist.pp.embed_patches", _without_embeddings, (), {"progress": False}),
    "normalize_expression": ("sthist.pp.normalize_expression", lambda: _raw().copy(), (), {}),
    "select_genes": ("sthist.pp.select_genes", lambda: _raw().copy(), (), {"n_top": 5}),
    "predict_expression": (
        "sthist.tl.predict_expression",
        lambda: _prepared().copy(),
        (_ridge,),
        {"progress": False},
    ),
    "predict_expression[new slide, no genes]": (
        "sthist.tl.predict_expression",
        _no_genes,
        (_ridge,),
        {"progress": False},
    ),
}


def _new_slide_in_place(adata: Any, reference: Any) -> None:
    # the documented rule: genes cannot be added to an AnnData in place, so the predictions of a slide without genes
    # go to a spots x genes DataFrame in obsm; copy=True returns an AnnData with the model's genes instead
    frame = adata.obsm["predicted"]
    assert adata.n_vars == 0 and list(frame.columns) == list(reference.var_names)
    np.testing.assert_array_equal(frame.to_numpy(), reference.layers["predicted"])
    assert adata.uns["predicted"]["params"].keys() == reference.uns["predicted"]["params"].keys()


# cases whose copy=False writes elsewhere than copy=True, by a documented rule, with the check of that rule
IN_PLACE_ELSEWHERE = {"predict_expression[new slide, no genes]": _new_slide_in_place}
WITH_COPY = [q for q in FUNCTIONS if _subpackage(q) in {"pp", "tl"} and "copy" in _sig(q).parameters]


def test_every_function_with_copy_has_a_case():
    covered = {fn for fn, *_ in COPY_CASES.values()}
    assert set(WITH_COPY) <= covered, f"add a COPY_CASES entry for {sorted(set(WITH_COPY) - covered)}"


def _same(a: Any, b: Any) -> bool:
    """Deep equality of what an AnnData holds (arrays with NaN, sparse matrices, frames, nested dicts)."""
    if isinstance(a, dict) or isinstance(b, dict):
        return (
            isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
        )
    if isinstance(a, pd.DataFrame | pd.Series) or isinstance(b, pd.DataFrame | pd.Series):
        return type(a) is type(b) and a.equals(b)
    if sparse.issparse(a) or sparse.issparse(b):
        return sparse.issparse(a) and sparse.issparse(b) and a.shape == b.shape and (a != b).nnz == 0
    if isinstance(a, np.ndarray | list | tuple) or isinstance(b, np.ndarray | list | tuple):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            return False
        if a.dtype.kind in "fc" and b.dtype.kind in "fc":
            return bool(np.array_equal(a, b, equal_nan=True))
        return bool(np.array_equal(a, b))
    if isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b):
        return True
    return bool(a == b)


def _state(adata: AnnData) -> dict[str, Any]:
    return {
        "shape": adata.shape,
        "obs_names": list(adata.obs_names),
        "var_names": list(adata.var_names),
        "X": adata.X,
        "obs": adata.obs,
        "var": adata.var,
        "obsm": dict(adata.obsm),
        "layers": dict(adata.layers),
        "uns": dict(adata.uns),
    }


def _frozen(adata: AnnData) -> dict[str, Any]:
    """A deep copy of ``_state``, so later writes into ``adata`` cannot change it."""
    return _state(adata.copy())


def _assert_same_state(a: dict[str, Any], b: dict[str, Any], what: str) -> None:
    for slot in a:
        assert _same(a[slot], b[slot]), f"{what}: {slot} differs"


def _slots(adata: AnnData) -> dict[str, set[str]]:
    return {
        "obs": set(adata.obs.columns),
        "var": set(adata.var.columns),
        "obsm": set(adata.obsm.keys()),
        "layers": set(adata.layers.keys()),
        "uns": set(adata.uns.keys()),
    }


@pytest.mark.parametrize("case", list(COPY_CASES))
def test_copy_true_returns_a_new_anndata_and_leaves_the_input(case: str):
    qualname, make, args, kwargs = COPY_CASES[case]
    fn = FUNCTIONS[qualname]
    adata = make()
    before = _frozen(adata)
    out = fn(adata, *(a() for a in args), **kwargs, copy=True)
    assert isinstance(out, AnnData), f"{qualname}(copy=True) returned {type(out).__name__}, not an AnnData"
    assert out is not adata
    _assert_same_state(_state(adata), before, f"{qualname}(copy=True) changed its input")
    written = {k: v - _slots(adata)[k] for k, v in _slots(out).items()}
    assert any(written.values()), f"{qualname}(copy=True) returned a copy with nothing written into it"


@pytest.mark.parametrize("case", list(COPY_CASES))
def test_copy_false_writes_into_the_input_and_returns_none(case: str):
    qualname, make, args, kwargs = COPY_CASES[case]
    fn = FUNCTIONS[qualname]
    reference = fn(make(), *(a() for a in args), **kwargs, copy=True)
    adata = make()
    out = fn(adata, *(a() for a in args), **kwargs, copy=False)
    assert out is None, (
        f"{qualname}(copy=False) returned {type(out).__name__}; it must write into adata and return None"
    )
    if case in IN_PLACE_ELSEWHERE:
        IN_PLACE_ELSEWHERE[case](adata, reference)
        return
    assert _slots(adata) == _slots(reference), f"{qualname}: copy=False and copy=True write different slots"
    _assert_same_state(_state(adata), _state(reference), f"{qualname}: copy=False and copy=True differ")
