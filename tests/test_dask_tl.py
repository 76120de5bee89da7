"""predict_expression and predict_slide on a Dask cluster: the results of the serial run."""

from __future__ import annotations

import numpy as np
import pytest

import sthist as st


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    client = Client(cluster)
    yield client
    client.close()
    cluster.close()


def _same(a, b, key="predicted"):
    np.testing.assert_array_equal(a.layers[key], b.layers[key])
    for side in ("lower", "upper"):
        if f"{key}_{side}" in a.layers:
            np.testing.assert_array_equal(a.layers[f"{key}_{side}"], b.layers[f"{key}_{side}"])


def test_predict_expression_on_a_cluster_equals_the_serial_run(client, toy_split, tmp_path):
    ref, query = toy_split(0)
    spatial = st.tl.fit_dual_knn(ref, layer="targets", library_key="section", progress=False)
    st.tl.calibrate(ref, spatial, progress=False)
    knn = st.tl.fit_knn(ref, layer="targets", progress=False)
    for model, kw in ((spatial, {"library_key": "section"}), (knn, {"chunk_size": 25})):  # sections / row blocks
        serial, dist = query.copy(), query.copy()
        st.tl.predict_expression(serial, model, progress=False, **kw)
        st.tl.predict_expression(dist, model, client=client, progress=False, **kw)
        _same(serial, dist)
        if model.calibration is not None:
            np.testing.assert_array_equal(serial.obs["predicted_shift"], dist.obs["predicted_shift"])
    # a contrastive model is sent to the workers once; its predictions agree to float rounding
    bleep = st.tl.fit_contrastive(ref, method="bleep", layer="targets", max_epochs=2, progress=False)
    serial, dist = query.copy(), query.copy()
    st.tl.predict_expression(serial, bleep, progress=False)
    st.tl.predict_expression(dist, bleep, client=client, chunk_size=40, progress=False)
    np.testing.assert_allclose(serial.layers["predicted"], dist.layers["predicted"], rtol=1e-5, atol=1e-6)


def test_workers_read_patches_from_the_store(client, toy_split, tmp_path):
    ref, query = toy_split(0)
    lazy = query.copy()
    st.pp.extract_patches(lazy, patch_size=48, library_key="section", store=tmp_path / "q.zarr", progress=False)
    model = st.tl.fit_ridge(ref, layer="targets", progress=False)
    del lazy.obsm["X_hed_fast"]  # predict from the patches: each worker reads its rows from the store
    serial = lazy.copy()
    st.tl.predict_expression(serial, model, progress=False)
    st.tl.predict_expression(lazy, model, client=client, chunk_size=30, progress=False)
    np.testing.assert_allclose(serial.layers["predicted"], lazy.layers["predicted"], rtol=1e-6, atol=1e-6)
    # a subset of the spots of a store: the workers read the subset's rows, not the store's first ones
    sub = lazy[::3].copy()
    st.tl.predict_expression(sub, model, client=client, chunk_size=10, progress=False, key_added="sub")
    np.testing.assert_allclose(sub.layers["sub"], serial.layers["predicted"][::3], rtol=1e-6, atol=1e-6)


def test_client_of_the_wrong_type(toy_split):
    ref, query = toy_split(0)
    model = st.tl.fit_knn(ref, layer="targets", progress=False)
    before = sorted(query.layers)
    with pytest.raises(TypeError, match=r"client must be a dask.distributed.Client"):
        st.tl.predict_expression(query, model, client="tcp://scheduler:8786", progress=False)
    assert sorted(query.layers) == before


def _slide_files(tmp_path, n=2):
    """PNG files of synthetic H&E sections (1 µm/px), a model fitted on another section, and their arrays."""
    from PIL import Image

    paths = []
    for seed in range(n):
        toy = st.datasets.toy(n_rows=6, n_cols=6, n_genes=10, seed=seed + 1)
        img = toy.uns["spatial"]["toy"]["images"]["fullres"]
        path = tmp_path / f"slide{seed}.png"
        Image.fromarray(img).save(path)
        paths.append(path)
    return paths


def test_predict_slide_list_on_a_cluster_with_a_calibrated_model(client, tmp_path):
    ref = st.datasets.toy(n_rows=10, n_cols=10, n_genes=10, n_sections=2, seed=0)
    st.pp.extract_patches(ref, patch_size=48, mpp=1.0, library_key="section", progress=False)
    st.pp.normalize_expression(ref)
    model = st.tl.fit_recommended(ref, layer="targets", library_key="section", progress=False)
    paths = _slide_files(tmp_path)
    kw = {"mpp": 1.0, "spot_diameter": 96, "progress": False}
    here = st.tl.predict_slide(paths, model, **kw)
    there = st.tl.predict_slide(paths, model, client=client, **kw)
    assert isinstance(there, list) and len(there) == 2
    for a, b, path in zip(here, there, paths, strict=True):
        _same(a, b)
        alone = st.tl.predict_slide(path, model, **kw)
        _same(a, alone)
        # a calibrated model: intervals, reliability, the shift flag and the slide summary on every slide
        assert {"predicted_lower", "predicted_upper"} <= set(b.layers)
        assert "predicted_reliable" in b.var and "predicted_ood" in b.obs
        assert "calibration" in b.uns["predicted"]
    with pytest.raises(ValueError, match="one per slide"):
        st.tl.predict_slide(paths, model, store=[tmp_path / "a.zarr"], **kw)
    with pytest.raises(ValueError, match="list of slides"):
        st.tl.predict_slide(paths[0], model, client=client, **kw)
    with pytest.raises(TypeError, match=r"dask\.distributed\.Client"):
        st.tl.predict_slide(paths, model, client=object(), **kw)
