from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

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
    pred = model.predict(test.obsm["X_enc"])
    assert pred.shape == (100, 8) and pred.dtype == np.float32
    r = _pearson(pred.astype(np.float64), test.X.astype(np.float64))
    assert r.min() > 0.85
    # a probe fitted on shuffled spots learns nothing
    shuffled = train.copy()
    shuffled.obsm["X_enc"] = shuffled.obsm["X_enc"][np.random.default_rng(1).permutation(300)]
    r_null = _pearson(fit_ridge(shuffled, features_key="X_enc").predict(test.obsm["X_enc"]).astype(np.float64), test.X)
    assert np.abs(r_null).mean() < 0.25
    # intercept puts the prediction on the scale of the targets
    assert np.abs(pred.mean(0) - test.X.mean(0)).max() < 0.3
    assert model.prediction == "regression" and model.method == "ridge"
    assert model.genes == list(adata.var_names) and model.features_key == "X_enc"


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
    ours = model.predict(x).astype(np.float64)
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
    m1 = fit_ridge(adata, features_key="X_enc", layer="targets", genes="keep", n_components=20, random_state=3)
    m2 = fit_ridge(adata, features_key="X_enc", genes=["G0", "G2", "G4", "G6"], n_components=20, random_state=3)
    assert m1.genes == ["G0", "G2", "G4", "G6"] and m1.layer == "targets"
    np.testing.assert_array_equal(m1.coef, m2.coef)
    np.testing.assert_array_equal(m1.predict(adata), m2.predict(adata.obsm["X_enc"]))


def test_fit_does_not_modify_adata():
    adata = _make()
    before = adata.copy()
    fit_ridge(adata, features_key="X_enc", n_components=10)
    assert sorted(adata.uns.keys()) == sorted(before.uns.keys())
    assert list(adata.obsm.keys()) == list(before.obsm.keys())
    pd.testing.assert_frame_equal(adata.var, before.var)
    np.testing.assert_array_equal(adata.X, before.X)


def test_save_load_round_trip(tmp_path):
    adata = _make()
    model = fit_ridge(adata, features_key="X_enc", n_components=24)
    model.save(tmp_path / "probe")
    loaded = RidgeModel.load(tmp_path / "probe")
    np.testing.assert_array_equal(loaded.predict(adata.obsm["X_enc"]), model.predict(adata.obsm["X_enc"]))
    assert loaded.genes == model.genes and loaded.features_key == "X_enc"
    assert loaded.alpha == model.alpha and loaded.n_components == 24
    assert loaded.encoder_params == {"encoder": "resnet50", "dim": 64, "normalize": True}
    assert loaded.prediction == "regression" and loaded.method == "ridge"
    meta = json.loads((tmp_path / "probe" / "config.json").read_text())
    assert meta["format"] == "sthist.RidgeModel" and meta["n_features"] == 64
    with pytest.raises(FileExistsError, match="overwrite=True"):
        model.save(tmp_path / "probe")
    model.save(tmp_path / "probe", overwrite=True)


def test_load_rejects_bad_files(tmp_path):
    adata = _make()
    model = fit_ridge(adata, features_key="X_enc", n_components=8)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        RidgeModel.load(tmp_path / "nothing")
    model.save(tmp_path / "m")
    npz = tmp_path / "m" / "ridge_model.npz"
    arrays = dict(np.load(npz))

    # object array: refused, nothing unpickled
    np.savez(npz, **{**arrays, "coef": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(ValueError, match="allow_pickle=False"):
        RidgeModel.load(tmp_path / "m")
    # missing array
    np.savez(npz, **{k: v for k, v in arrays.items() if k != "intercept"})
    with pytest.raises(ValueError, match="intercept"):
        RidgeModel.load(tmp_path / "m")
    # inconsistent shapes
    np.savez(npz, **{**arrays, "coef": arrays["coef"][:, :3]})
    with pytest.raises(ValueError, match="coef"):
        RidgeModel.load(tmp_path / "m")
    np.savez(npz, **arrays)
    assert RidgeModel.load(tmp_path / "m").n_genes == 8
    js = tmp_path / "m" / "config.json"
    meta = json.loads(js.read_text())
    js.write_text(json.dumps({**meta, "format": "something else"}))
    with pytest.raises(ValueError, match="not a sthist RidgeModel"):
        RidgeModel.load(tmp_path / "m")
    js.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        RidgeModel.load(tmp_path / "m")
    js.unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        RidgeModel.load(tmp_path / "m")


def test_predict_checks_its_input():
    adata = _make()
    model = fit_ridge(adata, features_key="X_enc", n_components=8)
    with pytest.raises(ValueError, match=r"shape \(n, 64\)"):
        model.predict(np.zeros((5, 10)))
    bad = np.zeros((5, 64))
    bad[2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        model.predict(bad)
    other = ad.AnnData(np.zeros((5, 8), dtype=np.float32))
    with pytest.raises(KeyError, match="embed_patches"):
        model.predict(other)


@pytest.mark.parametrize(
    ("mutate", "kwargs", "exc", "match"),
    [
        (None, {"features_key": "X_uni"}, KeyError, r"embed_patches.*X_enc"),
        ("nan_features", {"features_key": "X_enc"}, ValueError, r"NaN or infinite features.*s7"),
        ("nan_targets", {"features_key": "X_enc"}, ValueError, r"NaN or infinite values.*s4"),
        (None, {"features_key": "X_enc", "layer": "counts"}, KeyError, r"available layers"),
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
