from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import sthist
from sthist._engine.base import ModelFileError, ModelInputs, Prediction
from sthist._engine.ridge import RidgeModel
from sthist.tl._ridge import fit_ridge


def _make(n: int = 300, d: int = 64, g: int = 8, *, seed: int = 0, noise: float = 0.5) -> ad.AnnData:
    """Features in obsm['X_enc'] that drive the expression linearly (plus noise), with an offset per gene."""
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n, d)) * rng.uniform(0.5, 3.0, size=d) + rng.normal(size=d) * 5
    w = rng.normal(size=(d, g)) / np.sqrt(d)
    y = (feats - feats.mean(0)) / feats.std(0) @ w + 3.0 + noise * rng.normal(size=(n, g))
    adata = ad.AnnData(y.astype(np.float32))
    adata.var_names = [f"G{i}" for i in range(g)]
    adata.obs_names = [f"s{i}" for i in range(n)]
    adata.obsm["X_enc"] = feats.astype(np.float32)
    adata.uns["X_enc"] = {"params": {"encoder": "resnet50", "dim": np.int64(d), "normalize": np.bool_(True)}}
    return adata


def _pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(0)
    b = b - b.mean(0)
    return (a * b).sum(0) / np.sqrt((a * a).sum(0) * (b * b).sum(0))


def test_fit_predicts_held_out_spots():
    adata = _make(n=400, noise=0.3)  # best achievable r is about 0.96
    train, test = adata[:300].copy(), adata[300:].copy()
    model = fit_ridge(train, features_key="X_enc")
    out = model.predict(features=test.obsm["X_enc"])
    assert isinstance(out, Prediction) and out.spread is None  # regression: no retrieval spread
    pred = out.expression
    assert pred.shape == (100, 8) and pred.dtype == np.float32
    r = _pearson(pred.astype(np.float64), test.X.astype(np.float64))
    assert r.min() > 0.85
    # a probe fitted on shuffled spots learns nothing
    shuffled = train.copy()
    shuffled.obsm["X_enc"] = shuffled.obsm["X_enc"][np.random.default_rng(1).permutation(300)]
    null = fit_ridge(shuffled, features_key="X_enc").predict(features=test.obsm["X_enc"]).expression
    r_null = _pearson(null.astype(np.float64), test.X)
    assert np.abs(r_null).mean() < 0.25
    # intercept puts the prediction on the scale of the targets
    assert np.abs(pred.mean(0) - test.X.mean(0)).max() < 0.3
    assert model.prediction == "regression" and model.method == "ridge"
    assert model.genes == list(adata.var_names)
    # what the model was fitted on: the encoder recorded with the features, their width
    # the expression it was fitted on is recorded too: X, whose scale no normalisation recorded
    assert model.inputs == ModelInputs(encoder="resnet50", feature_dim=64, targets={"layer": "X", "scale": "unknown"})
    params = train.uns["ridge"]["params"]
    assert params["features_key"] == "X_enc" and params["method"] == "ridge" and params["n_components"] == 64
    assert train.uns["ridge"]["model_id"] and train.uns["ridge"]["model_dir"] == ""


def test_matches_the_hest_recipe():
    """StandardScaler -> PCA(k, seeded) -> Ridge(lsqr, alpha = 100 / (k * n_genes), no intercept)."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import StandardScaler

    adata = _make(n=200, d=48, g=6)
    x = adata.obsm["X_enc"].astype(np.float64)
    y = adata.X.astype(np.float64)
    model = fit_ridge(adata, features_key="X_enc", n_components=32, random_state=1)
    assert model.n_components == 32
    assert model.alpha == pytest.approx(100 / (32 * 6))
    xs = StandardScaler().fit_transform(x)
    z = PCA(n_components=32, random_state=1).fit_transform(xs)
    hest = Ridge(solver="lsqr", alpha=100 / (32 * 6), fit_intercept=False, max_iter=1000).fit(z, y).predict(z)
    ours = model.predict(features=x).expression.astype(np.float64)
    np.testing.assert_allclose(_pearson(ours, y), _pearson(hest, y), atol=2e-3)
    # and the coefficients are the exact ridge solution on centred targets
    zc = model.transform(x)
    exact = np.linalg.solve(zc.T @ zc + model.alpha * np.eye(32), zc.T @ (y - y.mean(0))).T
    np.testing.assert_allclose(model.coef, exact, atol=1e-3 * np.abs(exact).max())
    np.testing.assert_allclose(model.intercept, y.mean(0), rtol=1e-6)


def test_n_components_is_clipped_and_alpha_can_be_set():
    adata = _make(n=40, d=64, g=3)
    model = fit_ridge(adata, features_key="X_enc")  # 256 > min(40, 64)
    assert model.n_components == 40
    assert model.alpha == pytest.approx(100 / (40 * 3))
    adata = _make(n=100, d=16, g=3)
    model = fit_ridge(adata, features_key="X_enc", alpha=2.5)
    assert model.n_components == 16 and model.alpha == 2.5


def test_layer_genes_sparse_and_seed():
    adata = _make()
    adata.layers["targets"] = sp.csr_matrix(adata.X)
    adata.var["keep"] = [True, False] * 4
    m1 = fit_ridge(
        adata, features_key="X_enc", layer="targets", genes="keep", n_components=20, random_state=3, key_added="r1"
    )
    m2 = fit_ridge(
        adata, features_key="X_enc", genes=["G0", "G2", "G4", "G6"], n_components=20, random_state=3, key_added="r2"
    )
    assert m1.genes == ["G0", "G2", "G4", "G6"] and adata.uns["r1"]["params"]["layer"] == "targets"
    assert adata.uns["r2"]["params"]["layer"] == "" and adata.uns["r1"]["params"]["random_state"] == 3
    assert m1.settings["random_state"] == 3
    np.testing.assert_array_equal(m1.coef, m2.coef)
    # predicting from the AnnData (the model's features, found in obsm) equals predicting from the array
    q = adata.copy()
    sthist.tl.predict_expression(q, m1, features_key="X_enc", progress=False)
    expected = m2.predict(features=adata.obsm["X_enc"]).expression
    np.testing.assert_array_equal(q[:, m1.genes].layers["predicted"], expected)
    assert np.isnan(q[:, ["G1", "G3", "G5", "G7"]].layers["predicted"]).all()


def _unchanged_inputs(adata, before):
    pd.testing.assert_frame_equal(adata.obs, before.obs)
    pd.testing.assert_frame_equal(adata.var, before.var)
    np.testing.assert_array_equal(adata.X, before.X)
    assert sorted(adata.layers) == sorted(before.layers)
    for key in before.layers:
        np.testing.assert_array_equal(_dense(adata.layers[key]), _dense(before.layers[key]))
    for key in before.obsm:
        np.testing.assert_array_equal(adata.obsm[key], before.obsm[key])
    for key in before.uns:
        assert adata.uns[key] == before.uns[key], key


def _dense(x):
    return x.toarray() if hasattr(x, "toarray") else np.asarray(x)


def test_fit_only_records_itself_in_adata():
    adata = _make()
    adata.layers["targets"] = sp.csr_matrix(adata.X)
    before = adata.copy()
    fit_ridge(adata, features_key="X_enc", layer="targets", n_components=10)
    # the inputs are unchanged; the only addition is the record uns['ridge']
    _unchanged_inputs(adata, before)
    assert sorted(adata.obsm) == sorted(before.obsm)
    assert sorted(adata.uns) == sorted([*before.uns, "ridge"])
    assert set(adata.uns["ridge"]) == {"params", "model_id", "model_dir"}


def test_fit_from_patches_caches_the_features():
    rng = np.random.default_rng(0)
    adata = _make(n=60)
    adata.obsm["patches"] = rng.integers(0, 256, size=(60, 32, 32, 3), dtype=np.uint8)
    adata.uns["patches"] = {"params": {"patch_size": 32, "mpp": 0.5}}
    before = adata.copy()
    model = fit_ridge(adata, n_components=10, progress=False, device="cpu")  # features_key=None: hed-fast, the default
    _unchanged_inputs(adata, before)
    # added: the record and the features computed here (as `sthist.pp.embed_patches` writes them)
    assert sorted(adata.obsm) == sorted([*before.obsm, "X_hed_fast"])
    assert sorted(adata.uns) == sorted([*before.uns, "ridge", "X_hed_fast"])
    assert adata.uns["ridge"]["params"]["features_key"] == "X_hed_fast"
    assert adata.uns["X_hed_fast"]["params"]["encoder"] == "hed-fast"
    assert model.inputs.encoder == "hed-fast" and model.inputs.feature_dim == adata.obsm["X_hed_fast"].shape[1]
    assert (model.inputs.patch_size, model.inputs.mpp) == (32, 0.5)
    # the same model as one fitted on the cached features, and predictions from patches use the same encoder
    again = fit_ridge(adata, n_components=10, progress=False, device="cpu")
    np.testing.assert_array_equal(again.coef, model.coef)
    assert again.inputs == model.inputs and again is not model
    np.testing.assert_allclose(
        model.predict(images=adata.obsm["patches"], device="cpu").expression,
        model.predict(features=adata.obsm["X_hed_fast"]).expression,
        rtol=1e-5,
        atol=1e-5,
    )


def test_save_load_round_trip(tmp_path):
    adata = _make()
    model = fit_ridge(adata, features_key="X_enc", n_components=24)
    model.save(tmp_path / "probe")
    loaded = RidgeModel.load(tmp_path / "probe")
    x = adata.obsm["X_enc"]
    np.testing.assert_array_equal(loaded.predict(features=x).expression, model.predict(features=x).expression)
    assert loaded.predict(features=x).spread is None
    assert loaded.genes == model.genes
    assert loaded.alpha == model.alpha and loaded.n_components == 24
    assert loaded.inputs == model.inputs
    assert model.inputs == ModelInputs(encoder="resnet50", feature_dim=64, targets={"layer": "X", "scale": "unknown"})
    assert loaded.settings == model.settings
    assert model.settings == {"n_components": 24, "n_components_requested": 24, "random_state": 0, "alpha_rule": "hest"}
    assert loaded.prediction == "regression" and loaded.method == "ridge"
    for name in ("scaler_mean", "scaler_scale", "pca_mean", "pca_components", "coef", "intercept"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(model, name))
    # any model folder loads through sthist.tl.load_model, dispatching on the format
    assert isinstance(sthist.tl.load_model(tmp_path / "probe"), RidgeModel)
    meta = json.loads((tmp_path / "probe" / "config.json").read_text())
    assert meta["format"] == "sthist.RidgeModel" and meta["format_version"] == 2 and meta["n_features"] == 64
    assert meta["inputs"]["encoder"] == "resnet50" and meta["genes"] == model.genes
    with pytest.raises(FileExistsError, match="overwrite=True"):
        model.save(tmp_path / "probe")
    model.save(tmp_path / "probe", overwrite=True)


def test_load_rejects_bad_files(tmp_path):
    adata = _make()
    model = fit_ridge(adata, features_key="X_enc", n_components=8)
    with pytest.raises(ModelFileError, match=r"nothing'? does not exist or is not a folder"):
        RidgeModel.load(tmp_path / "nothing")
    model.save(tmp_path / "m")
    npz = tmp_path / "m" / "ridge_model.npz"
    arrays = dict(np.load(npz))

    # object array: refused, nothing unpickled
    np.savez(npz, **{**arrays, "coef": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(ModelFileError, match=r"object arrays.*allow_pickle=False"):
        RidgeModel.load(tmp_path / "m")
    # missing array
    np.savez(npz, **{k: v for k, v in arrays.items() if k != "intercept"})
    with pytest.raises(ModelFileError, match=r"lacks the arrays \['intercept'\]"):
        RidgeModel.load(tmp_path / "m")
    # inconsistent shapes
    np.savez(npz, **{**arrays, "coef": arrays["coef"][:, :3]})
    with pytest.raises(ModelFileError, match=r"parameter 'coef' has shape \(8, 3\), expected \(8, 8\)"):
        RidgeModel.load(tmp_path / "m")
    np.savez(npz, **arrays)
    assert RidgeModel.load(tmp_path / "m").n_genes == 8
    js = tmp_path / "m" / "config.json"
    meta = json.loads(js.read_text())
    js.write_text(json.dumps({**meta, "format": "something else"}))
    with pytest.raises(ModelFileError, match=r"description of format 'sthist.RidgeModel' \(found 'something else'\)"):
        RidgeModel.load(tmp_path / "m")
    js.write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ModelFileError, match="version 99"):
        RidgeModel.load(tmp_path / "m")
    js.write_text("{not json")
    with pytest.raises(ModelFileError, match="not valid JSON"):
        RidgeModel.load(tmp_path / "m")
    js.unlink()
    with pytest.raises(ModelFileError, match=r"has no config\.json"):
        RidgeModel.load(tmp_path / "m")
    js.write_text(json.dumps(meta))
    npz.unlink()
    with pytest.raises(ModelFileError, match=r"lacks ridge_model\.npz"):
        RidgeModel.load(tmp_path / "m")


def test_loads_version_1_folders(tmp_path):
    """Folders written before models recorded their inputs (format version 1) still load and predict the same."""
    adata = _make()
    model = fit_ridge(adata, features_key="X_enc", n_components=10)
    model.save(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    v1 = {
        "format": "sthist.RidgeModel",
        "version": 1,
        "method": "ridge",
        "genes": meta["genes"],
        "features_key": "X_enc",
        "layer": None,
        "alpha": meta["alpha"],
        "n_features": 64,
        "n_components": 10,
        "random_state": 0,
        "encoder_params": {"encoder": "resnet50", "dim": 64, "normalize": True},
    }
    (tmp_path / "m" / "config.json").write_text(json.dumps(v1))
    loaded = RidgeModel.load(tmp_path / "m")
    assert loaded.inputs == ModelInputs(encoder="resnet50", feature_dim=64) and loaded.genes == model.genes
    x = adata.obsm["X_enc"]
    np.testing.assert_array_equal(loaded.predict(features=x).expression, model.predict(features=x).expression)


def test_predict_checks_its_input():
    adata = _make()
    model = fit_ridge(adata, features_key="X_enc", n_components=8)
    with pytest.raises(ValueError, match=r"features have 10 columns but the model was trained on 64-d features"):
        model.predict(features=np.zeros((5, 10)))
    with pytest.raises(ValueError, match=r"shape \(n, 64\)"):
        model.transform(np.zeros((5, 10)))
    bad = np.zeros((5, 64))
    bad[2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        model.predict(features=bad)
    with pytest.raises(ValueError, match=r"NaN or infinite values in 1 row\(s\) \(e\.g\. \[2\]\)"):
        model.transform(bad)
    with pytest.raises(ValueError, match="exactly one of images="):
        model.predict()
    with pytest.raises(ValueError, match="exactly one of images="):
        model.predict(features=np.zeros((5, 64)), images=np.zeros((5, 32, 32, 3), dtype=np.uint8))
    # an AnnData goes through sthist.tl.predict_expression, which names the missing features
    other = ad.AnnData(np.zeros((5, 8), dtype=np.float32))
    other.var_names = [f"G{i}" for i in range(8)]
    with pytest.raises(
        KeyError, match=r"adata\.obsm\['X_enc'\] is missing \(obsm keys: .*\); run `sthist\.pp\.embed_patches"
    ):
        sthist.tl.predict_expression(other, model, features_key="X_enc", progress=False)


@pytest.mark.parametrize(
    ("mutate", "kwargs", "exc", "match"),
    [
        (
            None,
            {"features_key": "X_uni"},
            KeyError,
            r"obsm\['X_uni'\] is missing \(obsm keys: \['X_enc'\]\); run `sthist\.pp\.embed_patches",
        ),
        (
            "nan_features",
            {"features_key": "X_enc"},
            ValueError,
            r"obsm\['X_enc'\] holds NaN or infinite values for 1 spot\(s\), e\.g\. \['s7'\]",
        ),
        ("nan_targets", {"features_key": "X_enc"}, ValueError, r"adata\.X holds NaN or infinite values.*\['s4'\]"),
        (
            None,
            {"features_key": "X_enc", "layer": "counts"},
            KeyError,
            # names the key and the (empty) list of available layers
            r"adata\.layers\['counts'\].*is missing; available layers: \[\]",
        ),
        (None, {"features_key": "X_enc", "genes": ["nope"]}, KeyError, r"None of the 1 genes"),
        (None, {"features_key": "X_enc", "n_components": 0}, ValueError, r"n_components"),
        (None, {"features_key": "X_enc", "alpha": -1.0}, ValueError, r"alpha"),
        ("one_spot", {"features_key": "X_enc"}, ValueError, r"at least 2 spots"),
    ],
)
def test_bad_input(mutate, kwargs, exc, match):
    adata = _make(n=30)
    if mutate == "nan_features":
        adata.obsm["X_enc"][7, 0] = np.nan
    elif mutate == "nan_targets":
        adata.X[4, 1] = np.inf
    elif mutate == "one_spot":
        adata = adata[:1].copy()
    before = adata.copy()
    with pytest.raises(exc, match=match):
        fit_ridge(adata, **kwargs)
    np.testing.assert_array_equal(adata.obsm["X_enc"], before.obsm["X_enc"])
    np.testing.assert_array_equal(adata.X, before.X)
    assert sorted(adata.uns.keys()) == sorted(before.uns.keys())
