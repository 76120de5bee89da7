from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy.stats import pearsonr

from sthist.tl._score import score_prediction


def _make(n: int = 120, g: int = 30, *, seed: int = 0, n_nan_genes: int = 3, constant: int | None = 7) -> ad.AnnData:
    """True expression in X with gene-specific levels, a noisy prediction; the last genes are not modelled."""
    rng = np.random.default_rng(seed)
    level = np.linspace(0.5, 6.0, g)  # gene j has mean ~ level[j]: the HEG are the last genes
    spread = np.linspace(2.0, 0.2, g)  # variance falls with j: the HVG are the first genes
    true = level + spread * rng.normal(size=(n, g))
    noise = rng.uniform(0.2, 2.0, size=g)
    pred = true + noise * rng.normal(size=(n, g))
    if constant is not None:
        true[:, constant] = 2.5
    if n_nan_genes:
        pred[:, g - n_nan_genes :] = np.nan
    adata = ad.AnnData(true.astype(np.float64))
    adata.var_names = [f"G{i:02d}" for i in range(g)]
    adata.obs_names = [f"s{i}" for i in range(n)]
    adata.layers["predicted"] = pred
    adata.obs["section"] = pd.Categorical(np.where(np.arange(n) < n // 2, "A", "B"))
    # what predict_expression records: the model was fitted on X (its scale not recorded)
    adata.uns["predicted"] = {"params": {"targets": {"layer": "X", "scale": "unknown"}}}
    return adata


def _state(adata: ad.AnnData) -> dict:
    return {
        "var": adata.var.copy(),
        "uns": sorted(adata.uns.keys()),
        "layers": {k: np.array(v, copy=True) for k, v in adata.layers.items()},
        "obs": adata.obs.copy(),
    }


def _assert_unchanged(adata: ad.AnnData, before: dict) -> None:
    pd.testing.assert_frame_equal(adata.var, before["var"])
    pd.testing.assert_frame_equal(adata.obs, before["obs"])
    assert sorted(adata.uns.keys()) == before["uns"]
    assert set(adata.layers.keys()) == set(before["layers"])
    for k, v in before["layers"].items():
        np.testing.assert_array_equal(adata.layers[k], v)


def _r_manual(t: np.ndarray, p: np.ndarray) -> np.ndarray:
    out = np.full(t.shape[1], np.nan)
    for j in range(t.shape[1]):
        if np.ptp(t[:, j]) > 0 and np.ptp(p[:, j]) > 0:
            out[j] = pearsonr(t[:, j], p[:, j])[0]
    return out


def test_per_gene_r_matches_scipy_and_nan_genes_excluded():
    adata = _make()
    score_prediction(adata)
    r = adata.var["predicted_scores_pearson"].to_numpy()
    expected = _r_manual(adata.X, np.nan_to_num(adata.layers["predicted"]))
    expected[-3:] = np.nan  # not modelled
    np.testing.assert_allclose(r, expected, rtol=1e-10, atol=1e-12, equal_nan=True)
    assert np.isnan(r[7])  # constant true gene
    summary = adata.uns["predicted_scores"]["summary"]
    assert summary["pcc_all"] == pytest.approx(np.nanmean(expected))
    assert summary["n_genes"] == 30 - 3 - 1
    assert summary["n_constant"] == 1
    assert summary["n_obs"] == adata.n_obs


def test_sparse_true_gives_the_same_numbers():
    adata = _make()
    dense = score_prediction(adata, inplace=False, groupby="section")
    adata.X = sp.csr_matrix(adata.X)
    sparse_table = score_prediction(adata, inplace=False, groupby="section")
    pd.testing.assert_frame_equal(dense, sparse_table, rtol=1e-10)
    adata.layers["true_csc"] = sp.csc_matrix(adata.X)
    csc = score_prediction(adata, true_layer="true_csc", inplace=False, groupby="section")
    pd.testing.assert_frame_equal(dense, csc, rtol=1e-10)


def test_heg_hvg_markers_mse_mae_definitions():
    adata = _make(constant=None)
    n_top = 5
    table = score_prediction(adata, inplace=False, n_top=n_top, markers=["G03", "G10", "G11"])
    t = adata.X
    p = adata.layers["predicted"]
    modelled = np.isfinite(p).any(0)
    r = _r_manual(t[:, modelled], p[:, modelled])
    mean = t[:, modelled].mean(0)
    var = t[:, modelled].var(0)
    heg = np.argsort(-mean)[:n_top]
    hvg = np.argsort(-var)[:n_top]
    row = table.loc["all"]
    assert row["pcc_heg"] == pytest.approx(r[heg].mean())
    assert row["pcc_hvg"] == pytest.approx(r[hvg].mean())
    assert row["pcc_markers"] == pytest.approx(r[[3, 10, 11]].mean())
    diff = p[:, modelled] - t[:, modelled]
    assert row["mse"] == pytest.approx((diff**2).mean())
    assert row["mae"] == pytest.approx(np.abs(diff).mean())
    # HEG are the high-level genes, HVG the high-spread genes of the fixture
    assert set(heg) <= set(range(15, 27))
    assert set(hvg) <= set(range(0, 10))


def test_gene_gene_correlation_preservation():
    adata = _make()
    score_prediction(adata, n_top=6)
    out = adata.uns["predicted_scores"]
    genes = list(out["gene_corr_genes"])
    assert len(genes) == 6
    # top-6 by mean true expression among genes with a finite r: G07 is constant, G27-G29 not modelled
    means = pd.Series(adata.X.mean(0), index=adata.var_names)
    finite = adata.var["predicted_scores_pearson"].notna()
    assert genes == means[finite].sort_values(ascending=False).index[:6].tolist()
    idx = adata.var_names.get_indexer(genes)
    ct = np.corrcoef(adata.X[:, idx], rowvar=False)
    cp = np.corrcoef(adata.layers["predicted"][:, idx], rowvar=False)
    np.testing.assert_allclose(out["gene_corr_true"], ct, atol=1e-10)
    np.testing.assert_allclose(out["gene_corr_pred"], cp, atol=1e-10)
    iu = np.triu_indices(6, 1)
    assert out["summary"]["gene_corr"] == pytest.approx(np.corrcoef(ct[iu], cp[iu])[0, 1])


def test_perfect_prediction_scores_one():
    adata = _make(n_nan_genes=0, constant=None)
    adata.layers["predicted"] = np.array(adata.X, copy=True)
    row = score_prediction(adata, inplace=False).loc["all"]
    for m in ("pcc_all", "pcc_heg", "pcc_hvg", "gene_corr"):
        assert row[m] == pytest.approx(1.0)
    assert row["mse"] == 0 and row["mae"] == 0


def test_groupby_per_group_equals_scoring_the_subset():
    adata = _make()
    table = score_prediction(adata, inplace=False, groupby="section")
    assert list(table.index) == ["all", "A", "B"]
    assert list(table.columns) == [
        "pcc_all", "pcc_heg", "pcc_hvg", "mse", "mae", "gene_corr", "n_obs", "n_genes", "n_constant",
    ]  # fmt: skip
    sub = adata[adata.obs["section"] == "A"].copy()
    alone = score_prediction(sub, inplace=False).loc["all"]
    for m in ("pcc_all", "mse", "mae"):
        assert table.loc["A", m] == pytest.approx(alone[m])
    assert table.loc["A", "n_obs"] == (adata.obs["section"] == "A").sum()


def test_inplace_false_writes_nothing_and_inplace_true_writes_the_same():
    adata = _make()
    before = _state(adata)
    table = score_prediction(adata, inplace=False, groupby="section", key_added="run1")
    assert isinstance(table, pd.DataFrame)
    _assert_unchanged(adata, before)
    assert score_prediction(adata, groupby="section", key_added="run1") is None
    out = adata.uns["run1"]
    assert "run1_pearson" in adata.var.columns
    assert out["summary"] == pytest.approx(table.loc["all"].to_dict())
    assert out["per_group"]["B"] == pytest.approx(table.loc["B"].to_dict())
    assert out["params"]["layer"] == "predicted"
    assert out["params"]["true_layer"] == "X"
    assert out["params"]["groupby"] == "section"
    # default key follows the layer name
    adata.layers["pred2"] = adata.layers["predicted"]
    score_prediction(adata, layer="pred2", true_layer="X")
    assert "pred2_scores" in adata.uns and "pred2_scores_pearson" in adata.var.columns


def test_h5ad_round_trip(tmp_path):
    adata = _make()
    score_prediction(adata, groupby="section", markers=["G01", "G02"])
    path = tmp_path / "scored.h5ad"
    adata.write_h5ad(path)
    back = ad.read_h5ad(path)
    a, b = adata.uns["predicted_scores"], back.uns["predicted_scores"]
    assert b["summary"] == pytest.approx(a["summary"])
    assert b["per_group"]["A"] == pytest.approx(a["per_group"]["A"])
    np.testing.assert_allclose(b["gene_corr_true"], a["gene_corr_true"])
    assert list(b["gene_corr_genes"]) == a["gene_corr_genes"]
    assert list(b["params"]["markers"]) == ["G01", "G02"]


def test_genes_selection_and_spots_with_nan_prediction():
    adata = _make()
    adata.var["chosen"] = np.arange(adata.n_vars) < 10
    by_col = score_prediction(adata, genes="chosen", inplace=False)
    by_list = score_prediction(adata, genes=[f"G{i:02d}" for i in range(10)], inplace=False)
    pd.testing.assert_frame_equal(by_col, by_list)
    with pytest.warns(UserWarning, match="XYZ"):  # unknown names among known ones: scored without them
        partial_list = score_prediction(adata, genes=[*[f"G{i:02d}" for i in range(10)], "XYZ"], inplace=False)
    pd.testing.assert_frame_equal(by_col, partial_list)
    assert by_col.loc["all", "n_genes"] == 9  # G07 is constant
    # spots without a prediction (e.g. training spots) are left out
    half = adata.copy()
    half.layers["predicted"][: adata.n_obs // 2] = np.nan
    partial = score_prediction(half, inplace=False).loc["all"]
    other = score_prediction(adata[adata.n_obs // 2 :].copy(), inplace=False).loc["all"]
    assert partial["n_obs"] == adata.n_obs - adata.n_obs // 2
    assert partial["pcc_all"] == pytest.approx(other["pcc_all"])


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"layer": "nope"}, KeyError, r"layers\['nope'\].*available layers: \['predicted'\]"),
        ({"true_layer": "targets"}, KeyError, r"targets.*available layers"),
        ({"groupby": "patient"}, KeyError, r"groupby='patient'.*section"),
        ({"genes": ["XYZ", "ABC"]}, KeyError, r"None of the 2 genes"),
        ({"genes": "not_a_column"}, KeyError, r"neither a column of adata.var"),
        ({"genes": ["G28", "G29"]}, ValueError, r"no finite value"),
        ({"markers": ["XYZ"]}, KeyError, r"marker"),
        ({"n_top": 0}, ValueError, r"n_top"),
    ],
)
def test_bad_input_raises_and_leaves_adata_unchanged(kwargs, exc, match):
    adata = _make()
    before = _state(adata)
    with pytest.raises(exc, match=match):
        score_prediction(adata, **kwargs)
    _assert_unchanged(adata, before)


def test_prediction_missing_says_how_to_make_it():
    adata = _make()
    del adata.layers["predicted"]
    with pytest.raises(KeyError, match="predict_expression"):
        score_prediction(adata)
    with pytest.raises(TypeError, match="AnnData"):
        score_prediction(np.zeros((3, 3)))
