"""sthist.get.predicted: the predicted genes as an AnnData that scanpy and squidpy take directly."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import sthist as st


@pytest.fixture
def predicted_query(toy_split):
    ref, query = toy_split(0)
    model = st.tl.fit_dual_knn(ref[:, ref.var_names[:30]].copy(), layer="targets", library_key="section")
    st.tl.predict_expression(query, model, library_key="section", progress=False)  # 10 of 40 genes not modelled
    return query, model


def test_predicted_genes_only_and_ready_for_scanpy_and_squidpy(predicted_query):
    import scanpy as sc
    import squidpy as sq

    query, model = predicted_query
    before = query.copy()
    assert np.isnan(query.layers["predicted"]).any()
    with pytest.raises(ValueError, match="NaN"):  # why it is needed
        sc.pp.pca(query.copy(), layer="predicted", n_comps=5)
    pred = st.get.predicted(query)
    assert list(pred.var_names) == model.genes and pred.n_obs == query.n_obs
    assert pred.X.dtype == np.float32 and np.isfinite(pred.X).all()
    np.testing.assert_array_equal(pred.X, query.layers["predicted"][:, :30])
    np.testing.assert_array_equal(pred.layers["predicted"], pred.X)
    np.testing.assert_array_equal(pred.obsm["spatial"], query.obsm["spatial"])
    assert "predicted_spread" in pred.obs and "spatial" in pred.uns
    sc.pp.pca(pred, n_comps=5)
    sc.pp.neighbors(pred, n_neighbors=8)
    sq.gr.spatial_neighbors(pred, coord_type="generic", n_neighs=6)
    sq.gr.spatial_autocorr(pred, mode="moran", n_perms=None, n_jobs=1)
    assert pred.uns["moranI"].shape[0] == 30
    # the input is left as it was
    assert sorted(query.uns) == sorted(before.uns) and list(query.obsm) == list(before.obsm)
    np.testing.assert_array_equal(query.layers["predicted"], before.layers["predicted"])
    pred.uns["spatial"]["toy_1"]["scalefactors"]["x"] = 1  # uns is a copy
    assert "x" not in query.uns["spatial"]["toy_1"]["scalefactors"]


def test_predicted_new_slide_in_place_and_unpredicted_spots(predicted_query):
    query, model = predicted_query
    slide = query[:, []].copy()
    st.tl.predict_expression(slide, model, library_key="section", progress=False)  # a DataFrame in obsm
    assert isinstance(slide.obsm["predicted"], pd.DataFrame)
    pred = st.get.predicted(slide)
    assert list(pred.var_names) == model.genes and "predicted" not in pred.obsm
    np.testing.assert_array_equal(pred.X, st.get.predicted(query).X)
    # spots without a prediction (outside the folds of cross_validate) are left out, or refused
    query.layers["predicted"][:5] = np.nan
    assert st.get.predicted(query).n_obs == query.n_obs - 5
    with pytest.raises(ValueError, match="5 spot"):
        st.get.predicted(query, drop_unpredicted=False)


def test_predicted_bad_input(predicted_query):
    query, _ = predicted_query
    with pytest.raises(KeyError, match=r"no prediction 'nope'.*predict_expression"):
        st.get.predicted(query, key="nope")
    with pytest.raises(TypeError, match="AnnData"):
        st.get.predicted(np.zeros((3, 3)))
    with pytest.raises(TypeError, match="key"):
        st.get.predicted(query, key=3)
