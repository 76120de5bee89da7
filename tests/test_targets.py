"""Tests of sthist.pp.select_genes, sthist.pp.normalize_expression and sthist._validate.resolve_genes."""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import sthist
from sthist._validate import resolve_genes

HER2ST = Path(__file__).parents[2] / "shared" / "data" / "her2st"


# --------------------------------------------------------------------------- fixtures and helpers


def _counts(n_obs: int = 40, n_vars: int = 30, seed: int = 0) -> np.ndarray:
    """Poisson counts with gene-specific rates, spot-specific depths and two sections of different depth."""
    rng = np.random.default_rng(seed)
    rates = rng.gamma(0.8, 3.0, size=n_vars)
    depth = rng.uniform(0.5, 2.0, size=n_obs)
    depth[n_obs // 2 :] *= 4.0  # the second section is much deeper
    counts = rng.poisson(depth[:, None] * rates[None, :]).astype(np.float32)
    counts[:, 0] += 1  # no spot has an empty library
    return counts


def _make(sparse_x: bool = False, n_obs: int = 40, n_vars: int = 30, seed: int = 0) -> ad.AnnData:
    counts = _counts(n_obs, n_vars, seed)
    obs = pd.DataFrame(
        {"section": pd.Categorical(["A"] * (n_obs // 2) + ["B"] * (n_obs - n_obs // 2))},
        index=[f"s{i}" for i in range(n_obs)],
    )
    var = pd.DataFrame(index=[f"G{j}" for j in range(n_vars)])
    return ad.AnnData(sparse.csr_matrix(counts) if sparse_x else counts, obs=obs, var=var)


@pytest.fixture(params=[False, True], ids=["dense", "sparse"])
def adata(request) -> ad.AnnData:
    return _make(sparse_x=request.param)


def _dense(x) -> np.ndarray:
    return x.toarray() if sparse.issparse(x) else np.asarray(x)


def _lognorm(counts: np.ndarray, target_sum: float = 1e4, lib_cols=None, base=None) -> np.ndarray:
    """Direct numpy reference: log(1 + target_sum * x / library), library over ``lib_cols``; 0 where library is 0."""
    counts = np.asarray(counts, dtype=np.float64)
    lib = counts[:, lib_cols].sum(1) if lib_cols is not None else counts.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = np.where(lib[:, None] > 0, target_sum * counts / lib[:, None], 0.0)
    out = np.log1p(scaled)
    return out / np.log(base) if base is not None else out


def _assert_unchanged(a: ad.AnnData, b: ad.AnnData) -> None:
    assert a.shape == b.shape
    np.testing.assert_array_equal(_dense(a.X), _dense(b.X))
    assert sparse.issparse(a.X) == sparse.issparse(b.X)
    assert set(a.layers.keys()) == set(b.layers.keys())
    for k in a.layers:
        np.testing.assert_array_equal(_dense(a.layers[k]), _dense(b.layers[k]))
    pd.testing.assert_frame_equal(a.obs, b.obs)
    pd.testing.assert_frame_equal(a.var, b.var)
    assert set(a.uns.keys()) == set(b.uns.keys())


def _top(scores: np.ndarray, n: int, candidates=None) -> list[str]:
    idx = np.arange(scores.size) if candidates is None else np.asarray(candidates)
    order = idx[np.argsort(-scores[idx], kind="stable")][:n]
    return [f"G{j}" for j in order]


# --------------------------------------------------------------------------- select_genes: heg / hvg


@pytest.mark.parametrize("flavor", ["heg", "hvg"])
def test_select_genes_matches_numpy(adata, flavor):
    ref = _lognorm(_dense(adata.X))
    scores = ref.mean(0) if flavor == "heg" else ref.var(0)
    assert sthist.pp.select_genes(adata, flavor=flavor, n_top=7) is None

    expected = _top(scores, 7)
    assert list(adata.uns["sthist_genes"]["genes"]) == expected
    np.testing.assert_allclose(adata.uns["sthist_genes"]["scores"], np.sort(scores)[::-1][:7], rtol=1e-5)
    col = adata.var["sthist_genes"]
    assert col.dtype == bool
    assert col.sum() == 7
    assert set(adata.var_names[col]) == set(expected)
    params = adata.uns["sthist_genes"]["params"]
    assert params["flavor"] == flavor
    assert params["n_top"] == 7
    assert params["layer"] == "X"
    assert params["target_sum"] == 1e4
    assert params["n_candidates"] == adata.n_vars
    assert ("mean" if flavor == "heg" else "var") in params["statistic"]


def test_select_genes_default_n_top_is_50():
    adata = _make(n_vars=60)
    sthist.pp.select_genes(adata)
    assert adata.var["sthist_genes"].sum() == 50
    assert adata.uns["sthist_genes"]["params"]["flavor"] == "heg"


def test_select_genes_sparse_and_dense_agree():
    dense, sp = _make(), _make(sparse_x=True)
    for flavor in ["heg", "hvg"]:
        sthist.pp.select_genes(dense, flavor=flavor, n_top=10)
        sthist.pp.select_genes(sp, flavor=flavor, n_top=10)
        assert list(dense.uns["sthist_genes"]["genes"]) == list(sp.uns["sthist_genes"]["genes"])
        np.testing.assert_allclose(dense.uns["sthist_genes"]["scores"], sp.uns["sthist_genes"]["scores"], rtol=1e-6)


def test_select_genes_groupby_ranks_by_mean_of_group_statistics():
    adata = _make(n_obs=40)
    X = _dense(adata.X).copy()
    X[:20, 5], X[20:, 5] = 0, 60  # G5: off in section A, on in section B; varies between sections, not within
    adata.X = X
    ref = _lognorm(X)
    pooled = ref.var(0)
    grouped = np.mean([ref[:20].var(0), ref[20:].var(0)], axis=0)

    sthist.pp.select_genes(adata, flavor="hvg", n_top=5, key_added="pooled")
    sthist.pp.select_genes(adata, flavor="hvg", n_top=5, groupby="section", key_added="grouped")
    assert list(adata.uns["pooled"]["genes"]) == _top(pooled, 5)
    assert list(adata.uns["grouped"]["genes"]) == _top(grouped, 5)
    assert adata.uns["pooled"]["genes"][0] == "G5"  # the section difference dominates the pooled variance
    assert "G5" not in adata.uns["grouped"]["genes"]  # and does not count within sections
    assert adata.uns["grouped"]["params"]["groupby"] == "section"
    assert adata.uns["grouped"]["params"]["n_groups"] == 2

    sthist.pp.select_genes(adata, flavor="heg", n_top=5, groupby="section", key_added="heg")
    assert list(adata.uns["heg"]["genes"]) == _top(np.mean([ref[:20].mean(0), ref[20:].mean(0)], axis=0), 5)


def test_select_genes_candidates_restrict_the_ranking(adata):
    cands = ["G3", "G7", "G11", "G12", "G20", "G29"]
    sthist.pp.select_genes(adata, flavor="heg", n_top=3, genes=cands)
    ref = _lognorm(_dense(adata.X)).mean(0)
    assert list(adata.uns["sthist_genes"]["genes"]) == _top(ref, 3, [3, 7, 11, 12, 20, 29])
    assert adata.uns["sthist_genes"]["params"]["n_candidates"] == 6


def test_select_genes_reads_layer(adata):
    counts = adata.X.copy()
    adata.layers["counts"] = counts
    adata.X = _lognorm(_dense(counts)).astype(np.float32)  # X is log data now
    sthist.pp.select_genes(adata, flavor="hvg", n_top=6, layer="counts")
    assert list(adata.uns["sthist_genes"]["genes"]) == _top(_lognorm(_dense(counts)).var(0), 6)
    assert adata.uns["sthist_genes"]["params"]["layer"] == "counts"


@pytest.mark.parametrize("flavor", ["heg", "hvg", "list"])
def test_select_genes_copy_equals_inplace(adata, flavor):
    genes = ["G4", "G1", "G9"] if flavor == "list" else None
    before = adata.copy()
    out = sthist.pp.select_genes(adata, flavor=flavor, n_top=5, genes=genes, copy=True)
    assert isinstance(out, ad.AnnData) and out is not adata
    _assert_unchanged(adata, before)  # copy=True leaves the input alone
    assert sthist.pp.select_genes(adata, flavor=flavor, n_top=5, genes=genes) is None
    pd.testing.assert_series_equal(out.var["sthist_genes"], adata.var["sthist_genes"])
    assert list(out.uns["sthist_genes"]["genes"]) == list(adata.uns["sthist_genes"]["genes"])
    assert dict(out.uns["sthist_genes"]["params"]) == dict(adata.uns["sthist_genes"]["params"])


def test_select_genes_warns_on_log_like_data():
    adata = _make()
    adata.X = _lognorm(adata.X).astype(np.float32)
    with pytest.warns(UserWarning, match="looks log-transformed"):
        sthist.pp.select_genes(adata, flavor="hvg", n_top=5)
    assert adata.var["sthist_genes"].sum() == 5


# --------------------------------------------------------------------------- select_genes: list


def test_select_genes_list_keeps_order_and_n_top(adata):
    sthist.pp.select_genes(adata, flavor="list", genes=["G9", "G2", "G9", "G15"])
    assert list(adata.uns["sthist_genes"]["genes"]) == ["G9", "G2", "G15"]
    assert set(adata.var_names[adata.var["sthist_genes"]]) == {"G9", "G2", "G15"}
    assert adata.uns["sthist_genes"]["params"]["n_top"] == 3
    assert "missing" not in adata.uns["sthist_genes"]
    assert "scores" not in adata.uns["sthist_genes"]

    sthist.pp.select_genes(adata, flavor="list", genes=["G9", "G2", "G15"], n_top=2, key_added="two")
    assert list(adata.uns["two"]["genes"]) == ["G9", "G2"]


def test_select_genes_list_from_file(adata, tmp_path):
    path = tmp_path / "panel.txt"
    path.write_text("# my panel\nG12\n\n  G3  \nG27\n")
    sthist.pp.select_genes(adata, flavor="list", genes=str(path))
    assert list(adata.uns["sthist_genes"]["genes"]) == ["G12", "G3", "G27"]
    assert adata.uns["sthist_genes"]["params"]["genes"] == str(path)
    sthist.pp.select_genes(adata, flavor="list", genes=path, key_added="as_path")  # a pathlib.Path too
    assert list(adata.uns["as_path"]["genes"]) == ["G12", "G3", "G27"]


def test_select_genes_list_from_var_column(adata):
    adata.var["mine"] = adata.var_names.isin(["G20", "G1"])
    sthist.pp.select_genes(adata, flavor="list", genes="mine", key_added="copy_of_mine")
    assert list(adata.uns["copy_of_mine"]["genes"]) == ["G1", "G20"]  # var order
    assert (adata.var["copy_of_mine"] == adata.var["mine"]).all()


def test_select_genes_list_missing_genes(adata):
    genes = ["G1", "NOPE1", "G2", "NOPE2", "NOPE3"]
    with pytest.warns(UserWarning, match=r"3 of 5 genes .* not in adata.var_names.*NOPE1"):
        sthist.pp.select_genes(adata, flavor="list", genes=genes)
    assert list(adata.uns["sthist_genes"]["genes"]) == ["G1", "G2"]
    assert list(adata.uns["sthist_genes"]["missing"]) == ["NOPE1", "NOPE2", "NOPE3"]
    assert adata.var["sthist_genes"].sum() == 2


def test_select_genes_list_none_present_raises_unchanged(adata):
    before = adata.copy()
    with pytest.raises(KeyError, match="None of the 2 genes"):
        sthist.pp.select_genes(adata, flavor="list", genes=["NOPE1", "NOPE2"])
    with pytest.raises(KeyError, match="ignored"):
        sthist.pp.select_genes(adata, flavor="list", genes=["g1", "g2"])  # case hint
    _assert_unchanged(adata, before)


# --------------------------------------------------------------------------- select_genes: bad input


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"flavor": "seurat"}, ValueError, "choose one of"),
        ({"n_top": 0}, ValueError, "positive integer"),
        ({"n_top": 2.5}, ValueError, "positive integer"),
        ({"n_top": True}, ValueError, "positive integer"),
        ({"n_top": 31}, ValueError, "n_top <= 30"),
        ({"n_top": 4, "genes": ["G1", "G2", "G3"]}, ValueError, "n_top <= 3"),
        ({"layer": "counts"}, KeyError, r"available layers: \['raw'\]"),
        ({"groupby": "patient"}, KeyError, "not a column of adata.obs"),
        ({"groupby": "with_nan"}, ValueError, "missing values"),
        ({"flavor": "list"}, ValueError, "needs `genes=`"),
        ({"flavor": "list", "genes": ["G1"], "groupby": "section"}, ValueError, "groupby= only applies"),
        ({"genes": "not_a_column"}, KeyError, "neither a column of adata.var nor an existing file"),
        ({"genes": "/nowhere/genes.txt"}, FileNotFoundError, "does not exist"),
        ({"genes": "numeric"}, TypeError, "must be boolean"),
        ({"genes": []}, ValueError, "empty list"),
        ({"key_added": ""}, ValueError, "key_added"),
    ],
)
def test_select_genes_bad_input_raises_and_leaves_adata_unchanged(adata, kwargs, exc, match):
    adata.layers["raw"] = adata.X.copy()
    adata.obs["with_nan"] = ["a", np.nan] * (adata.n_obs // 2)
    adata.var["numeric"] = np.arange(adata.n_vars)
    before = adata.copy()
    with pytest.raises(exc, match=match):
        sthist.pp.select_genes(adata, **kwargs)
    _assert_unchanged(adata, before)


@pytest.mark.parametrize("bad", ["nan", "negative"])
@pytest.mark.parametrize("fn", ["select_genes", "normalize_expression"])
def test_non_count_input_raises_and_leaves_adata_unchanged(bad, fn):
    adata = _make()
    X = adata.X.copy()
    X[3, 4] = np.nan if bad == "nan" else -1.0
    adata.X = X
    before = adata.copy()
    with pytest.raises(ValueError, match="NaN" if bad == "nan" else "negative values") as err:
        getattr(sthist.pp, fn)(adata)
    assert "layer=" in str(err.value)  # the message says how to fix it
    _assert_unchanged(adata, before)


def test_select_genes_rejects_non_anndata():
    with pytest.raises(TypeError, match="expects an AnnData"):
        sthist.pp.select_genes(np.ones((3, 3)))


# --------------------------------------------------------------------------- normalize_expression


def test_normalize_log1p_matches_numpy_dense():
    adata = _make()
    assert sthist.pp.normalize_expression(adata) is None
    out = adata.layers["targets"]
    assert isinstance(out, np.ndarray)
    assert out.dtype == np.float32
    assert out.shape == adata.shape
    np.testing.assert_allclose(out, _lognorm(adata.X), rtol=1e-5, atol=1e-6)
    params = adata.uns["targets"]["params"]
    assert params["flavor"] == "log1p"
    assert params["log_base"] == "e"
    assert params["target_sum"] == 1e4
    assert params["layer"] == "X"
    assert params["genes"] == "all"
    assert params["n_library_genes"] == adata.n_vars
    assert params["n_zero_library"] == 0


def test_normalize_sparse_stays_sparse_and_equals_dense():
    dense, sp = _make(), _make(sparse_x=True)
    for flavor in ["log1p", "hist2st", "none"]:
        sthist.pp.normalize_expression(dense, flavor=flavor, genes=["G0", "G1", "G2", "G3"])
        sthist.pp.normalize_expression(sp, flavor=flavor, genes=["G0", "G1", "G2", "G3"])
        out = sp.layers["targets"]
        assert sparse.issparse(out) and out.format == "csr"
        assert out.dtype == np.float32
        assert out.nnz == sp.X.nnz  # zeros stay zeros, nothing else becomes zero
        np.testing.assert_allclose(out.toarray(), dense.layers["targets"], rtol=1e-6)


def test_normalize_hist2st_uses_the_library_of_the_gene_panel(adata):
    panel = ["G2", "G5", "G6", "G17", "G28"]
    cols = [2, 5, 6, 17, 28]
    sthist.pp.normalize_expression(adata, flavor="hist2st", genes=panel)
    out = _dense(adata.layers["targets"])
    counts = _dense(adata.X)
    np.testing.assert_allclose(out, _lognorm(counts, lib_cols=cols, base=10), rtol=1e-5, atol=1e-6)
    # on the panel: the scprep recipe, log10(1 + 1e4 * m / m.sum(1)) on the panel's count matrix
    m = counts[:, cols].astype(np.float64)
    np.testing.assert_allclose(out[:, cols], np.log10(1 + 1e4 * m / m.sum(1, keepdims=True)), rtol=1e-5)
    params = adata.uns["targets"]["params"]
    assert params["flavor"] == "hist2st"
    assert params["log_base"] == 10
    assert list(params["genes"]) == sorted(panel, key=lambda g: int(g[1:]))
    assert params["n_library_genes"] == 5


def test_normalize_gene_forms_agree(adata, tmp_path):
    panel = ["G4", "G8", "G15"]
    path = tmp_path / "genes.txt"
    path.write_text("\n".join(panel) + "\n")
    adata.var["panel"] = adata.var_names.isin(panel)
    results = []
    for i, genes in enumerate([panel, "panel", str(path), np.asarray(adata.var["panel"])]):
        sthist.pp.normalize_expression(adata, flavor="hist2st", genes=genes, key_added=f"t{i}")
        results.append(_dense(adata.layers[f"t{i}"]))
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])
    assert adata.uns["t2"]["params"]["genes_source"] == str(path)
    assert adata.uns["t1"]["params"]["genes_source"] == "panel"


def test_normalize_after_select_genes(adata):
    sthist.pp.select_genes(adata, flavor="heg", n_top=8)
    sthist.pp.normalize_expression(adata, flavor="hist2st", genes="sthist_genes")
    cols = np.flatnonzero(adata.var["sthist_genes"])
    np.testing.assert_allclose(
        _dense(adata.layers["targets"]), _lognorm(_dense(adata.X), lib_cols=cols, base=10), rtol=1e-5, atol=1e-6
    )


def test_normalize_target_sum_and_layer_and_key(adata):
    adata.layers["counts"] = adata.X.copy()
    adata.X = adata.X * 0  # X holds nothing useful; the layer is read
    sthist.pp.normalize_expression(adata, target_sum=100.0, layer="counts", key_added="cpm")
    np.testing.assert_allclose(
        _dense(adata.layers["cpm"]), _lognorm(_dense(adata.layers["counts"]), target_sum=100.0), rtol=1e-5, atol=1e-6
    )
    assert adata.uns["cpm"]["params"]["layer"] == "counts"
    assert adata.uns["cpm"]["params"]["target_sum"] == 100.0
    assert "targets" not in adata.layers


def test_normalize_zero_library_gives_zero_and_warns(adata):
    X = _dense(adata.X).copy()
    X[[1, 7], :3] = 0  # empty library over G0..G2, counts elsewhere
    X[11] = 0  # empty spot
    adata.X = sparse.csr_matrix(X) if sparse.issparse(adata.X) else X
    with pytest.warns(UserWarning, match=r"3 of 40 spots \(e.g. \['s1', 's7', 's11'\]\)"):
        sthist.pp.normalize_expression(adata, flavor="hist2st", genes=["G0", "G1", "G2"])
    out = _dense(adata.layers["targets"])
    assert np.isfinite(out).all()
    assert (out[[1, 7, 11]] == 0).all()
    assert adata.uns["targets"]["params"]["n_zero_library"] == 3  # spots 1, 7 and 11
    with pytest.warns(UserWarning, match="1 of 40 spots"):
        sthist.pp.normalize_expression(adata, key_added="all_genes")
    assert (_dense(adata.layers["all_genes"])[11] == 0).all()


def test_normalize_none_copies_values(adata):
    adata.X = _dense(adata.X) - 3.5  # negative, non-integer: fine for 'none', which does not check
    sthist.pp.normalize_expression(adata, flavor="none")
    out = adata.layers["targets"]
    assert out.dtype == np.float32
    np.testing.assert_array_equal(_dense(out), _dense(adata.X).astype(np.float32))
    assert out is not adata.X
    assert adata.uns["targets"]["params"]["log_base"] == "none"


def test_normalize_warns_on_log_like_data():
    adata = _make()
    adata.X = _lognorm(adata.X).astype(np.float32)
    with pytest.warns(UserWarning, match="looks log-transformed"):
        sthist.pp.normalize_expression(adata)
    assert "targets" in adata.layers  # a warning, not an error


def test_normalize_integer_counts_do_not_warn():
    adata = _make()
    adata.X = adata.X.astype(np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sthist.pp.normalize_expression(adata)
    np.testing.assert_allclose(adata.layers["targets"], _lognorm(adata.X), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("flavor", ["log1p", "hist2st", "none"])
def test_normalize_copy_equals_inplace(adata, flavor):
    before = adata.copy()
    out = sthist.pp.normalize_expression(adata, flavor=flavor, genes=["G1", "G3"], copy=True)
    assert isinstance(out, ad.AnnData) and out is not adata
    _assert_unchanged(adata, before)
    assert sthist.pp.normalize_expression(adata, flavor=flavor, genes=["G1", "G3"]) is None
    np.testing.assert_array_equal(_dense(out.layers["targets"]), _dense(adata.layers["targets"]))
    p1, p2 = out.uns["targets"]["params"], adata.uns["targets"]["params"]
    assert p1.keys() == p2.keys()
    for k in p1:
        np.testing.assert_array_equal(np.asarray(p1[k]), np.asarray(p2[k]))


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"flavor": "log2"}, ValueError, "choose one of"),
        ({"target_sum": 0}, ValueError, "positive finite"),
        ({"target_sum": -1e4}, ValueError, "positive finite"),
        ({"target_sum": float("nan")}, ValueError, "positive finite"),
        ({"target_sum": True}, ValueError, "positive finite"),
        ({"target_sum": "1e4"}, ValueError, "positive finite"),
        ({"layer": "counts"}, KeyError, r"available layers: \['raw'\]"),
        ({"genes": ["NOPE"]}, KeyError, "None of the 1 genes"),
        ({"genes": "G1"}, KeyError, r"pass a list: genes=\['G1'\]"),
        ({"genes": "panel.txt"}, FileNotFoundError, "does not exist"),
        ({"genes": [1, 2]}, TypeError, "must be strings"),
        ({"genes": np.ones(3, dtype=bool)}, ValueError, "must have shape"),
        ({"genes": np.zeros(30, dtype=bool)}, ValueError, "selects no gene"),
        ({"genes": "all_false"}, ValueError, "selects no gene"),
        ({"key_added": None}, ValueError, "key_added"),
    ],
)
def test_normalize_bad_input_raises_and_leaves_adata_unchanged(adata, kwargs, exc, match):
    adata.layers["raw"] = adata.X.copy()
    adata.var["all_false"] = False
    before = adata.copy()
    with pytest.raises(exc, match=match):
        sthist.pp.normalize_expression(adata, **kwargs)
    _assert_unchanged(adata, before)


# --------------------------------------------------------------------------- resolve_genes


def test_resolve_genes_forms(adata, tmp_path):
    expected = adata.var_names.isin(["G1", "G5"])
    np.testing.assert_array_equal(resolve_genes(adata, None), np.ones(adata.n_vars, dtype=bool))
    np.testing.assert_array_equal(resolve_genes(adata, ["G5", "G1"]), expected)
    np.testing.assert_array_equal(resolve_genes(adata, ("G5", "G1")), expected)
    np.testing.assert_array_equal(resolve_genes(adata, {"G5", "G1"}), expected)
    np.testing.assert_array_equal(resolve_genes(adata, pd.Index(["G5", "G1"])), expected)
    np.testing.assert_array_equal(resolve_genes(adata, pd.Series(expected)), expected)
    path = tmp_path / "g.txt"
    path.write_text("G5\nG1\n")
    np.testing.assert_array_equal(resolve_genes(adata, path), expected)
    adata.var["sel"] = expected
    mask = resolve_genes(adata, "sel")
    assert mask.dtype == bool
    np.testing.assert_array_equal(mask, expected)
    mask[:] = True  # the returned mask is not a view of adata.var
    assert adata.var["sel"].sum() == 2


def test_resolve_genes_empty_file(adata, tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="lists no gene"):
        resolve_genes(adata, str(path))


# --------------------------------------------------------------------------- h5ad round trip


def test_h5ad_round_trip(adata, tmp_path):
    with pytest.warns(UserWarning, match="not in adata.var_names"):
        sthist.pp.select_genes(adata, flavor="list", genes=["G3", "G1", "MISSING"], key_added="panel")
    sthist.pp.select_genes(adata, flavor="heg", n_top=6, groupby="section")
    sthist.pp.normalize_expression(adata, flavor="hist2st", genes="sthist_genes")
    sthist.pp.normalize_expression(adata, key_added="ln")
    path = tmp_path / "targets.h5ad"
    adata.write_h5ad(path)
    back = ad.read_h5ad(path)

    for key in ["targets", "ln"]:
        assert sparse.issparse(back.layers[key]) == sparse.issparse(adata.layers[key])
        assert back.layers[key].dtype == np.float32
        np.testing.assert_array_equal(_dense(back.layers[key]), _dense(adata.layers[key]))
    for key in ["panel", "sthist_genes"]:
        pd.testing.assert_series_equal(back.var[key], adata.var[key])
        assert list(back.uns[key]["genes"]) == list(adata.uns[key]["genes"])
    assert list(back.uns["panel"]["missing"]) == ["MISSING"]
    np.testing.assert_allclose(back.uns["sthist_genes"]["scores"], adata.uns["sthist_genes"]["scores"])
    for key in ["panel", "sthist_genes", "targets", "ln"]:
        p_back, p = back.uns[key]["params"], adata.uns[key]["params"]
        assert p_back.keys() == p.keys()
        for k in p:
            if isinstance(p[k], np.ndarray):
                assert list(p_back[k]) == list(p[k])
            else:
                assert p_back[k] == p[k], (key, k)


# --------------------------------------------------------------------------- real data


@pytest.mark.realdata
def test_her2st_c3_genes_785_hist2st():
    cnts = HER2ST / "data" / "ST-cnts" / "C3.tsv.gz"
    panel = HER2ST / "genes_785.txt"
    if not cnts.exists() or not panel.exists():
        pytest.skip(f"her2st subset not found under {HER2ST} (needs data/ST-cnts/C3.tsv.gz and genes_785.txt)")
    df = pd.read_csv(cnts, sep="\t", index_col=0)
    adata = ad.AnnData(
        sparse.csr_matrix(df.to_numpy(dtype=np.float32)),
        obs=pd.DataFrame(index=df.index.astype(str)),
        var=pd.DataFrame(index=df.columns.astype(str)),
    )
    assert adata.var_names.is_unique
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # every panel gene is present in C3: no missing-gene warning
        sthist.pp.select_genes(adata, flavor="list", genes=panel)
    assert adata.var["sthist_genes"].sum() == 785
    assert len(adata.uns["sthist_genes"]["genes"]) == 785
    assert "missing" not in adata.uns["sthist_genes"]

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*library size of zero.*")  # one C3 spot has no panel counts
        sthist.pp.normalize_expression(adata, flavor="hist2st", genes="sthist_genes")
    out = adata.layers["targets"]
    assert np.isfinite(out.data).all()
    sel = adata.var["sthist_genes"].to_numpy()
    m = df.loc[:, sel].to_numpy(dtype=np.float64)
    lib = m.sum(1, keepdims=True)
    ref = np.log10(1 + 1e4 * np.divide(m, lib, out=np.zeros_like(m), where=lib > 0))
    np.testing.assert_allclose(out[:, np.flatnonzero(sel)].toarray(), ref, rtol=1e-5, atol=1e-6)
    assert adata.uns["targets"]["params"]["n_zero_library"] == int((lib == 0).sum())
