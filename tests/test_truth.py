"""One rule for the truth a prediction is scored against and the scale a model is fitted on (issue 19)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import sthist as st
from sthist._anndata import CountsWarning, expression_scale


@pytest.fixture
def split(toy_split):
    """Two toy sections with ``layers['targets']`` (log1p) and hed-fast features; counts in X."""
    return toy_split(0)


def _fit(ref, **kw):
    return st.tl.fit_dual_knn(ref, layer="targets", library_key="section", progress=False, **kw)


def test_default_truth_is_the_layer_the_model_was_fitted_on(split):
    ref, query = split
    model = _fit(ref)
    assert model.inputs.targets == {"layer": "targets", "scale": "log1p", "target_sum": 1e4, "library_genes": "all"}
    st.tl.predict_expression(query, model, library_key="section", progress=False)
    assert dict(query.uns["predicted"]["params"]["targets"]) == model.inputs.targets
    default = st.tl.score_prediction(query, inplace=False)
    explicit = st.tl.score_prediction(query, true_layer="targets", inplace=False)
    np.testing.assert_allclose(default.to_numpy(dtype=float), explicit.to_numpy(dtype=float))
    st.tl.score_prediction(query)
    assert query.uns["predicted_scores"]["params"]["true_layer"] == "targets"
    # the raw counts in X are another scale than the model's: refused, not scored
    with pytest.raises(ValueError, match=r"adata.X \(raw counts\) is on another scale.*flavor='log1p'"):
        st.tl.score_prediction(query, true_layer="X")


def test_missing_truth_layer_says_how_to_make_it(split):
    ref, query = split
    model = _fit(ref)
    del query.layers["targets"]
    st.tl.predict_expression(query, model, library_key="section", progress=False)
    before = (sorted(query.uns), sorted(query.var.columns))
    with pytest.raises(KeyError, match=r"fitted on layers\['targets'\].*normalize_expression\(adata, flavor='log1p'\)"):
        st.tl.score_prediction(query)
    assert (sorted(query.uns), sorted(query.var.columns)) == before  # nothing written
    with pytest.raises(KeyError, match=r"normalize_expression"):
        st.pl.predicted_vs_true(query, [query.var_names[0]], library_key="section", show=False)
    st.pp.normalize_expression(query, flavor="log1p")  # the call the message names
    assert st.tl.score_prediction(query, inplace=False).loc["all", "n_genes"] > 0


def test_truth_on_another_normalisation_raises(split):
    ref, query = split
    model = _fit(ref)
    st.tl.predict_expression(query, model, library_key="section", progress=False)
    st.pp.normalize_expression(query, flavor="hist2st")  # layers['targets'] now on another scale
    with pytest.raises(ValueError, match=r"flavor='hist2st'.*another scale.*flavor='log1p'"):
        st.tl.score_prediction(query)
    with pytest.raises(ValueError, match="another scale"):
        st.pl.predicted_vs_true(query, [query.var_names[0]], library_key="section", show=False)
    st.pp.normalize_expression(query, flavor="log1p", target_sum=1e3, key_added="t3")
    with pytest.raises(ValueError, match="target_sum=1000"):
        st.tl.score_prediction(query, true_layer="t3")
    library = query.var_names[:10].tolist()
    st.pp.normalize_expression(query, flavor="log1p", genes=library, key_added="panel")
    with pytest.raises(ValueError, match="library genes: 10 genes"):
        st.tl.score_prediction(query, true_layer="panel")


def test_fitting_on_counts_warns_and_scores_on_counts(split):
    ref, query = split
    with pytest.warns(CountsWarning, match=r"adata.X holds raw counts.*normalize_expression"):
        model = st.tl.fit_knn(ref, progress=False)
    assert model.inputs.targets == {"layer": "X", "scale": "counts"}
    st.tl.predict_expression(query, model, progress=False)
    st.tl.score_prediction(query)  # the truth is X, the counts the model predicts
    assert query.uns["predicted_scores"]["params"]["true_layer"] == "X"
    # the normalised targets are another scale than the counts it predicts
    with pytest.raises(ValueError, match="another scale"):
        st.tl.score_prediction(query, true_layer="targets")
    with warnings.catch_warnings():  # normalised targets: no warning
        warnings.simplefilter("error", CountsWarning)
        st.tl.fit_knn(ref, layer="targets", progress=False)


@pytest.mark.parametrize("fit", ["fit_ridge", "fit_knn", "fit_contrastive"])
def test_every_fit_records_its_targets_and_keeps_them_on_disk(split, fit, tmp_path):
    ref, _ = split
    kwargs = {"max_epochs": 2} if fit == "fit_contrastive" else {}
    model = getattr(st.tl, fit)(ref, layer="targets", progress=False, **kwargs)
    assert model.inputs.targets["layer"] == "targets" and model.inputs.targets["scale"] == "log1p"
    model.save(tmp_path / "m")
    assert st.tl.load_model(tmp_path / "m").inputs.targets == model.inputs.targets


def test_prediction_without_a_record_needs_true_layer(split):
    _, query = split
    query.layers["mine"] = (
        query.layers["targets"].toarray()
        if hasattr(query.layers["targets"], "toarray")
        else query.layers["targets"].copy()
    )
    with pytest.raises(ValueError, match=r"does not record which expression.*true_layer="):
        st.tl.score_prediction(query, layer="mine")
    table = st.tl.score_prediction(query, layer="mine", true_layer="targets", inplace=False)
    assert table.loc["all", "pcc_all"] == pytest.approx(1.0)


def test_cross_validate_records_its_truth(prepared_toy):
    adata = prepared_toy(0)
    st.tl.cross_validate(adata, groupby="section", method="knn", layer="targets", progress=False)
    assert adata.uns["cv_predicted"]["params"]["targets"]["layer"] == "targets"
    pooled = st.tl.score_prediction(adata, layer="cv_predicted", inplace=False)  # no true_layer needed
    assert np.isfinite(pooled.loc["all", "pcc_all"])


def test_benchmark_on_counts_warns_once(prepared_toy):
    adata = prepared_toy(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        st.tl.benchmark(adata, methods=[], baselines=["knn"], groupby="section", seeds=1, progress=False)
    assert sum(issubclass(w.category, CountsWarning) for w in caught) == 1


def test_expression_scale_records():
    import anndata as ad
    import scanpy as sc

    counts = np.random.default_rng(0).poisson(3, size=(20, 5)).astype(np.float32)
    a = ad.AnnData(counts.copy())
    assert expression_scale(a, None) == {"layer": "X", "scale": "counts"}
    sc.pp.normalize_total(a)
    sc.pp.log1p(a)
    assert expression_scale(a, None) == {"layer": "X", "scale": "scanpy log1p", "log_base": "e"}
    b = ad.AnnData(np.log1p(counts))
    assert expression_scale(b, None) == {"layer": "X", "scale": "unknown"}
