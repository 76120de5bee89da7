"""`dual_knn` (neighbour-context retrieval in two spaces) and the GCV ridge probe (`ridge_gcv`)."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest

import sthist as st
from sthist._engine.base import ModelFileError
from sthist._engine.dual_knn import DualKNNModel, context_features


def _pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(0)
    b = b - b.mean(0)
    return (a * b).sum(0) / np.sqrt((a * a).sum(0) * (b * b).sum(0))


def _grid_section(name: str, *, side: int = 20, d: int = 32, g: int = 10, seed: int = 0, noise: float = 2.0):
    """One section on a square grid: a smooth latent field drives the expression; each spot's features see the
    field under heavy per-spot noise, in two of ``d`` feature columns (the others are strong noise)."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    field = gaussian_filter(rng.normal(size=(side, side, 2)), sigma=(3, 3, 0))
    field = (field - field.mean((0, 1))) / field.std((0, 1))
    z = field.reshape(-1, 2)
    feats = rng.normal(size=(side * side, d)) * 3.0
    feats[:, :2] = z + noise * rng.normal(size=(side * side, 2))
    w = np.random.default_rng(100).normal(size=(2, g))  # the same biology in every section
    y = z @ w + 0.3 * rng.normal(size=(side * side, g)) + 5.0
    yy, xx = np.mgrid[0:side, 0:side]
    adata = ad.AnnData(y.astype(np.float32))
    adata.var_names = [f"G{i}" for i in range(g)]
    adata.obs_names = [f"{name}_{i}" for i in range(side * side)]
    adata.obs["section"] = name
    adata.obsm["spatial"] = np.c_[xx.ravel(), yy.ravel()].astype(np.float64) * 100.0
    adata.obsm["X_enc"] = feats.astype(np.float32)
    adata.uns["X_enc"] = {"params": {"encoder": "resnet50", "dim": np.int64(d), "normalize": np.bool_(True)}}
    return adata


def _sections(seed: int = 0, **kw):
    train = ad.concat([_grid_section(f"s{i}", seed=seed + i, **kw) for i in range(2)], uns_merge="first")
    test = _grid_section("t", seed=seed + 7, **kw)
    return train, test


def _score(model, test) -> float:
    t = test.copy()
    st.tl.predict_expression(t, model, features_key="X_enc", library_key="section", progress=False)
    return float(np.mean(_pearson(t.layers["predicted"].astype(np.float64), t.X.astype(np.float64))))


def test_context_and_learnt_space_beat_raw_knn():
    train, test = _sections()
    dual = st.tl.fit_dual_knn(train, features_key="X_enc", library_key="section", progress=False)
    knn = st.tl.fit_knn(train, features_key="X_enc", progress=False)
    r_dual, r_knn = _score(dual, test), _score(knn, test)
    # raw kNN drowns in the 30 noise columns; the learnt space finds the two informative ones and the context
    # averages their per-spot noise away
    assert r_knn < 0.4
    assert r_dual > 0.65 and r_dual > r_knn + 0.3
    # without context (one neighbour barely averages) it is worse: the neighbours carry information
    one = st.tl.fit_dual_knn(train, features_key="X_enc", library_key="section", n_neighbors=1, progress=False)
    assert _score(one, test) < r_dual - 0.05
    # the ablations: the context alone lifts even raw retrieval (it averages the per-spot noise away); the learnt
    # space, which finds the two informative columns, is better still
    kw = {"features_key": "X_enc", "library_key": "section", "progress": False}
    raw = st.tl.fit_dual_knn(train, spaces="raw", **kw)
    learnt = st.tl.fit_dual_knn(train, spaces=["learnt"], **kw)
    assert raw.spaces == ("raw",) and learnt.spaces == ("learnt",) and dual.spaces == ("raw", "learnt")
    r_raw, r_learnt = _score(raw, test), _score(learnt, test)
    assert r_raw > r_knn + 0.2 and r_learnt > r_raw + 0.05 and r_dual > r_raw + 0.05
    # a model fitted on shuffled expression learns nothing
    shuffled = train.copy()
    shuffled.X = shuffled.X[np.random.default_rng(3).permutation(shuffled.n_obs)]
    null = st.tl.fit_dual_knn(shuffled, features_key="X_enc", library_key="section", progress=False)
    assert abs(_score(null, test)) < 0.15


def test_learns_on_toy_sections(toy_split):
    train, test = toy_split(0)
    kw = {"features_key": "X_hed_fast", "layer": "targets", "library_key": "section", "progress": False}
    model = st.tl.fit_dual_knn(train, **kw)
    st.tl.predict_expression(test, model, features_key="X_hed_fast", library_key="section", progress=False)
    truth = np.asarray(
        test.layers["targets"].toarray() if hasattr(test.layers["targets"], "toarray") else test.layers["targets"]
    )
    r = _pearson(test.layers["predicted"].astype(np.float64), truth.astype(np.float64))
    informative = test.var["informative"].to_numpy(bool)
    shuffled = train.copy()
    shuffled.obsm["X_hed_fast"] = shuffled.obsm["X_hed_fast"][np.random.default_rng(0).permutation(train.n_obs)]
    null = st.tl.fit_dual_knn(shuffled, **kw)
    st.tl.predict_expression(
        test, null, features_key="X_hed_fast", library_key="section", key_added="null", progress=False
    )
    r_null = _pearson(test.layers["null"].astype(np.float64), truth.astype(np.float64))
    assert np.nanmean(r[informative]) > np.nanmean(r_null[informative]) + 0.2
    assert "predicted_spread" in test.obs and np.isfinite(test.obs["predicted_spread"]).all()


def test_fit_is_repeatable_and_records_itself():
    train, test = _sections(1)
    before = set(train.uns)
    a = st.tl.fit_dual_knn(train, features_key="X_enc", library_key="section", progress=False)
    b = st.tl.fit_dual_knn(train.copy(), features_key="X_enc", library_key="section", progress=False)
    pa = a.predict(features=test.obsm["X_enc"], coords=test.obsm["spatial"], groups=test.obs["section"].to_numpy())
    pb = b.predict(features=test.obsm["X_enc"], coords=test.obsm["spatial"], groups=test.obs["section"].to_numpy())
    np.testing.assert_array_equal(pa.expression, pb.expression)
    assert set(train.uns) == before | {"dual_knn"}
    params = train.uns["dual_knn"]["params"]
    assert params["method"] == "dual_knn" and params["k"] == 50 and params["n_neighbors"] == 12
    assert params["alpha"] in set(np.logspace(-1, 4, 12).tolist())
    assert a.inputs.needs_neighbors and a.prediction == "retrieval" and a.method == "dual_knn"
    assert pa.expression.shape == (test.n_obs, train.n_vars) and pa.expression.dtype == np.float32


def test_context_features_stay_within_a_section():
    x = np.arange(8, dtype=np.float64).reshape(4, 2)
    coords = np.array([[0, 0], [1, 0], [0, 0], [1, 0]], dtype=np.float64)
    ctx = context_features(x, coords, np.array([0, 0, 1, 1]), 3)
    # each spot's only same-section neighbour is its partner; spots of the other section are never used
    np.testing.assert_array_equal(ctx[:, :2], x)
    np.testing.assert_array_equal(ctx[:, 2:], x[[1, 0, 3, 2]])
    lonely = context_features(x[:1], coords[:1], None, 6)
    np.testing.assert_array_equal(lonely, np.c_[x[:1], x[:1]])  # no neighbour: its own features


def test_save_load_round_trip(tmp_path):
    train, test = _sections(2)
    model = st.tl.fit_dual_knn(
        train, features_key="X_enc", library_key="section", save_dir=tmp_path / "m", progress=False
    )
    loaded = st.tl.load_model(tmp_path / "m")
    assert isinstance(loaded, DualKNNModel) and loaded.settings == model.settings
    kw = {"features": test.obsm["X_enc"], "coords": test.obsm["spatial"], "groups": test.obs["section"].to_numpy()}
    np.testing.assert_array_equal(loaded.predict(**kw).expression, model.predict(**kw).expression)
    # the pipeline form: predict_expression(adata) finds the folder the fit recorded
    t = test.copy()
    t.uns["dual_knn"] = train.uns["dual_knn"]
    st.tl.predict_expression(t, str(tmp_path / "m"), features_key="X_enc", library_key="section", progress=False)
    assert np.isfinite(t.layers["predicted"]).all()
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["format"] == "sthist.DualKNNModel" and cfg["n_neighbors"] == 12 and cfg["spaces"] == ["raw", "learnt"]
    st.tl.fit_dual_knn(
        train, features_key="X_enc", library_key="section", spaces="learnt", save_dir=tmp_path / "l", progress=False
    )
    assert st.tl.load_model(tmp_path / "l").spaces == ("learnt",)
    (tmp_path / "m" / "dual_knn_model.npz").unlink()
    with pytest.raises(ModelFileError, match=r"lacks dual_knn_model\.npz"):
        st.tl.load_model(tmp_path / "m")


def test_prediction_needs_positions():
    train, test = _sections(3)
    model = st.tl.fit_dual_knn(train, features_key="X_enc", library_key="section", progress=False)
    with pytest.raises(ValueError, match="pass coords="):
        model.predict(features=test.obsm["X_enc"])
    with pytest.raises(ValueError, match="exactly one of images="):
        model.predict(coords=test.obsm["spatial"])
    with pytest.raises(ValueError, match=r"features have 5 columns"):
        model.predict(features=np.zeros((3, 5)), coords=np.zeros((3, 2)))
    no_pos = test.copy()
    del no_pos.obsm["spatial"]
    with pytest.raises(KeyError, match=r"obsm\['spatial'\] is missing"):
        st.tl.predict_expression(no_pos, model, features_key="X_enc", progress=False)
    assert "predicted" not in no_pos.layers


@pytest.mark.parametrize(
    ("kwargs", "mutate", "exc", "match"),
    [
        ({"k": 0}, None, ValueError, "k"),
        ({"n_neighbors": 0}, None, ValueError, "n_neighbors"),
        ({"n_expression_components": -1}, None, ValueError, "n_expression_components"),
        ({"spaces": ["raw", "raw"]}, None, ValueError, r"spaces must name one or both of \['raw', 'learnt'\]"),
        ({"spaces": []}, None, ValueError, "spaces must name"),
        ({"spaces": "pixels"}, None, ValueError, "spaces must name"),
        ({}, "no_spatial", KeyError, r"method 'dual_knn' uses the spots' positions"),
        ({}, "nan_features", ValueError, "NaN or infinite"),
        ({"library_key": "nope"}, None, KeyError, "nope"),
    ],
)
def test_bad_input_leaves_adata_unchanged(kwargs, mutate, exc, match):
    train, _ = _sections(4)
    if mutate == "no_spatial":
        del train.obsm["spatial"]
    elif mutate == "nan_features":
        train.obsm["X_enc"][5, 1] = np.nan
    before = train.copy()
    with pytest.raises(exc, match=match):
        st.tl.fit_dual_knn(train, features_key="X_enc", **{"library_key": "section", **kwargs})
    assert set(train.uns) == set(before.uns) and set(train.obsm) == set(before.obsm)
    np.testing.assert_array_equal(train.X, before.X)


def test_ridge_gcv_regularises_small_cohorts():
    # 80 spots, 64 features of which 2 matter: HEST's nearly unpenalised rule over-fits, GCV does not
    train, test = _sections(5, side=8, d=64)
    hest = st.tl.fit_ridge(train, features_key="X_enc", progress=False)
    gcv = st.tl.fit_ridge(train, features_key="X_enc", alpha="gcv", progress=False)
    assert gcv.alpha in set(np.logspace(-1, 4, 12).tolist()) and gcv.alpha > 100 * hest.alpha
    assert gcv.settings["alpha_rule"] == "gcv" and hest.settings["alpha_rule"] == "hest"
    assert _score(gcv, test) > _score(hest, test) + 0.05
    with pytest.raises(ValueError, match="'gcv'"):
        st.tl.fit_ridge(train, features_key="X_enc", alpha="loo", progress=False)


def test_registered_and_benchmarked(prepared_toy):
    table = st.tl.methods()
    assert (
        table.index[0] == "recommended"
        and table.loc["recommended", "kind"] == "recommended"
        and table.loc["dual_knn", "kind"] == "closed-form"
        and bool(table.loc["dual_knn", "needs_coords"])
    )
    assert table.loc["dual_knn", "prediction"] == "retrieval" and table.loc["ridge_gcv", "prediction"] == "regression"
    data = prepared_toy(0)
    res = st.tl.benchmark(
        data,
        methods=[],
        baselines=["ridge_gcv", "knn", "dual_knn"],
        groupby="section",
        layer="targets",
        seeds=1,
        reference="knn",
        progress=False,
    )
    assert set(res.table["method"]) == {"ridge_gcv", "knn", "dual_knn"}
    dual = res.summary[res.summary["method"] == "dual_knn"]
    assert len(dual) == 3 and np.isfinite(dual["pcc_all_mean"]).all()  # one row per held-out section and overall


def test_recommended_configuration_learns_on_toy_data(tmp_path):
    # the README's configuration end to end: hed-fast features computed by the fit, prediction from the patches of
    # unseen spots through the saved folder (the encoder is rebuilt from the model's record)
    data = st.datasets.toy(n_rows=12, n_cols=12, n_genes=40, n_sections=2, seed=1)
    st.pp.extract_patches(data, patch_size=96, library_key="section", progress=False)
    st.pp.normalize_expression(data)
    sec = data.obs["section"].to_numpy()
    train, test = data[sec == "toy_0"].copy(), data[sec == "toy_1"].copy()
    model = st.tl.fit_dual_knn(
        train, encoder="hed-fast", layer="targets", library_key="section", save_dir=tmp_path / "m", progress=False
    )
    assert model.inputs.encoder == "hed-fast" and "X_hed_fast" in train.obsm
    st.tl.predict_expression(test, str(tmp_path / "m"), library_key="section", progress=False)
    truth = test.layers["targets"]
    truth = np.asarray(truth.toarray() if hasattr(truth, "toarray") else truth, dtype=np.float64)
    r = _pearson(test.layers["predicted"].astype(np.float64), truth)
    informative = test.var["informative"].to_numpy(bool)
    null_train = train.copy()
    y = train.layers["targets"]
    null_train.layers["targets"] = np.asarray(y.toarray() if hasattr(y, "toarray") else y)[
        np.random.default_rng(0).permutation(train.n_obs)
    ]
    null = st.tl.fit_dual_knn(null_train, encoder="hed-fast", layer="targets", library_key="section", progress=False)
    st.tl.predict_expression(test, null, library_key="section", key_added="null", progress=False)
    r_null = _pearson(test.layers["null"].astype(np.float64), truth)
    assert np.nanmean(r[informative]) > 0.3 and np.nanmean(r[informative]) > np.nanmean(r_null[informative]) + 0.25
