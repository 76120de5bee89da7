"""Calibrated models: intervals that hold their level, reliable genes, the shift detector, saving, bad input."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import sthist as st
from sthist._engine.calibration import ShiftWarning, conformal_quantile
from sthist.tl._recommended import choose

N_FEATURES = 6
N_GENES = 12


def _synthetic(n_sections: int, n_per: int, *, seed: int, shift: float = 0.0) -> ad.AnnData:
    """Features x ~ N(shift, 1); gene g = its own linear function of x plus noise whose sd grows with |x_0|.

    The noise is known, so the coverage of a calibrated interval can be checked against its level.
    """
    rng = np.random.default_rng(seed)
    n = n_sections * n_per
    x = rng.normal(shift, 1.0, size=(n, N_FEATURES))
    w = np.random.default_rng(1).normal(size=(N_FEATURES, N_GENES))
    noise_sd = 0.2 + 0.8 * np.abs(x[:, :1])  # heteroscedastic: the intervals should widen with |x_0|
    y = 3.0 + x @ w * 0.5 + noise_sd * rng.normal(size=(n, N_GENES))
    adata = ad.AnnData(np.zeros((n, N_GENES), dtype=np.float32))
    adata.var_names = [f"G{i}" for i in range(N_GENES)]
    adata.obs_names = [f"s{seed}_{i}" for i in range(n)]
    adata.obs["section"] = pd.Categorical(np.repeat([f"S{i}" for i in range(n_sections)], n_per))
    adata.layers["targets"] = y.astype(np.float32)
    adata.obsm["X_enc"] = x.astype(np.float32)
    adata.uns["X_enc"] = {"params": {"encoder": "hed-fast"}}
    side = int(np.ceil(np.sqrt(n_per)))
    grid = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:n_per] * 100.0
    adata.obsm["spatial"] = np.tile(grid, (n_sections, 1)) + 50.0
    return adata


@pytest.fixture(scope="module")
def synthetic():
    train = _synthetic(4, 250, seed=0)
    test = _synthetic(1, 2000, seed=1)
    test.obs["section"] = pd.Categorical(["T"] * test.n_obs)
    return train, test


@pytest.mark.parametrize("method", ["knn", "ridge_gcv"])
def test_intervals_hold_their_level_on_data_with_known_noise(synthetic, method):
    train, test = synthetic
    from sthist.tl._registry import fit_predictor

    model = fit_predictor(train, method, features_key="X_enc", layer="targets", progress=False)
    assert st.tl.calibrate(train, model, groupby="section", features_key="X_enc", progress=False) is model
    cal = model.calibration
    assert cal.provenance["groups"] == ["S0", "S1", "S2", "S3"] and cal.provenance["spots_per_group"] == [250] * 4
    assert cal.uses_spread is (method == "knn")
    for level in (0.5, 0.8, 0.9, 0.95):
        query = test.copy()
        st.tl.predict_expression(query, model, features_key="X_enc", level=level, progress=False)
        y = query.layers["targets"]
        lo, hi = query.layers["predicted_lower"], query.layers["predicted_upper"]
        coverage = ((y >= lo) & (y <= hi)).mean()
        # 24,000 values of 2,000 spots: the sampling error of the coverage is below 0.01
        assert abs(coverage - level) < 0.025, (level, coverage)
    # adaptive: wider where the noise is larger (|x_0| large)
    width = (hi - lo).mean(1)
    assert np.corrcoef(width, np.abs(test.obsm["X_enc"][:, 0]))[0, 1] > 0.5


def test_calibrated_prediction_writes_every_slot_and_scores(synthetic):
    train, test = synthetic
    model = st.tl.fit_knn(train, features_key="X_enc", layer="targets", progress=False)
    st.tl.calibrate(train, model, features_key="X_enc", progress=False)  # groupby=None: the sections
    assert model.calibration.provenance["how"].startswith("sections")
    query = test.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ShiftWarning)  # like the calibration tissue: no warning
        st.tl.predict_expression(query, model, features_key="X_enc", progress=False)
    for col in ("predicted_cv_r", "predicted_cv_r_low", "predicted_cv_r_high", "predicted_train_range"):
        assert np.isfinite(query.var[col]).all()
    assert query.var["predicted_reliable"].dtype == bool and query.var["predicted_reliable"].all()  # r ~ 0.9
    assert (query.var["predicted_cv_r_low"] <= query.var["predicted_cv_r"]).all()
    assert query.obs["predicted_ood"].mean() <= 0.05 and query.obs["predicted_shift"].between(0, 1).all()
    summary = query.uns["predicted"]["calibration"]
    assert summary["level"] == 0.9 and not summary["unlike_calibration"] and summary["n_reliable"] == N_GENES
    assert list(query.varm["predicted_interval_scale"].columns) == ["0.5", "0.6", "0.7", "0.8", "0.9", "0.95", "0.99"]
    st.tl.score_prediction(query, n_top=5)
    scores = query.uns["predicted_scores"]
    s = scores["summary"]
    assert abs(s["coverage_all"] - 0.9) < 0.025 and 0 < s["width_rel_all"] < 2 and s["adaptivity_heg"] > 0.3
    curve = scores["coverage_curve"]
    np.testing.assert_allclose(curve["coverage_all"], curve["level"], atol=0.03)
    assert np.isfinite(query.var["predicted_scores_coverage"]).all()
    import matplotlib

    matplotlib.use("Agg")
    query.uns["spatial"] = {"T": {"scalefactors": {"spot_diameter_fullres": 50.0, "tissue_hires_scalef": 1.0}}}
    axes = st.pl.calibration(query, img_key=None, show=False)
    assert len(axes) == 4 and axes[0].get_title() == "coverage vs nominal"
    assert "flagged" in axes[3].get_title()


def test_shift_flags_unlike_tissue_and_warns(synthetic):
    train, _ = synthetic
    model = st.tl.fit_knn(train, features_key="X_enc", layer="targets", progress=False)
    st.tl.calibrate(train, model, features_key="X_enc", progress=False)
    far = _synthetic(1, 300, seed=5, shift=6.0)
    with pytest.warns(ShiftWarning, match=r"of the 300 spots are unlike the tissue"):
        st.tl.predict_expression(far, model, features_key="X_enc", progress=False)
    assert far.obs["predicted_ood"].mean() >= 0.95
    assert far.uns["predicted"]["calibration"]["unlike_calibration"]


def test_one_section_is_calibrated_on_spatial_blocks(synthetic):
    train, _ = synthetic
    one = train[train.obs["section"] == "S0"].copy()
    model = st.tl.fit_dual_knn(one, features_key="X_enc", layer="targets", progress=False)
    st.tl.calibrate(one, model, features_key="X_enc", n_blocks=4, progress=False)
    prov = model.calibration.provenance
    assert prov["groupby"] == "spatial block" and len(prov["groups"]) == 4 and "spatial blocks" in prov["how"]
    assert sum(prov["spots_per_group"]) == one.n_obs
    assert model.calibration.uses_spread  # dual_knn retrieves profiles


@pytest.mark.parametrize("fit", ["fit_knn", "fit_dual_knn", "fit_ridge"])
def test_calibration_is_saved_and_loaded_with_the_model(synthetic, tmp_path, fit):
    train, test = synthetic
    extra = {"library_key": "section"} if fit == "fit_dual_knn" else {}
    model = getattr(st.tl, fit)(train, features_key="X_enc", layer="targets", progress=False, **extra)
    st.tl.calibrate(train, model, features_key="X_enc", level=0.8, progress=False)

    model.save(tmp_path / "m")
    loaded = st.tl.load_model(tmp_path / "m")
    assert loaded.calibration.level == 0.8 and loaded.calibration.provenance == model.calibration.provenance
    a, b = test.copy(), test.copy()
    st.tl.predict_expression(a, model, features_key="X_enc", library_key="section", progress=False)
    st.tl.predict_expression(b, loaded, features_key="X_enc", library_key="section", progress=False)
    for key in ("predicted", "predicted_lower", "predicted_upper"):
        np.testing.assert_array_equal(a.layers[key], b.layers[key])
    np.testing.assert_array_equal(a.obs["predicted_shift"], b.obs["predicted_shift"])
    # saving an uncalibrated model over it leaves no stale calibration behind
    model.calibration = None
    model.save(tmp_path / "m", overwrite=True)
    assert st.tl.load_model(tmp_path / "m").calibration is None
    assert not (tmp_path / "m" / "calibration.npz").exists()


def test_contrastive_model_is_calibrated_by_refitting_per_group(toy_split, tmp_path):
    ref, query = toy_split(0)
    model = st.tl.fit_contrastive(ref, method="bleep", layer="targets", max_epochs=3, progress=False)
    three = ref.copy()
    three.obs["block"] = np.where(three.obsm["spatial"][:, 0] < np.median(three.obsm["spatial"][:, 0]), "a", "b")
    st.tl.calibrate(three, model, groupby="block", progress=False)
    assert model.calibration.uses_spread and model.calibration.provenance["refit"]["method"] == "bleep"
    st.tl.predict_expression(query, model, progress=False)
    assert np.isfinite(query.layers["predicted_lower"]).all() and (query.layers["predicted_lower"] >= 0).all()
    model.save(tmp_path / "bleep")
    assert st.tl.load_model(tmp_path / "bleep").calibration.genes == model.genes


def test_bad_input(synthetic, toy_split):
    train, test = synthetic
    model = st.tl.fit_knn(train, features_key="X_enc", layer="targets", progress=False)
    with pytest.raises(ValueError, match=r"not calibrated: run `sthist.tl.calibrate"):
        st.tl.predict_expression(test.copy(), model, features_key="X_enc", level=0.9, progress=False)
    one_group = train.copy()
    one_group.obs["patient"] = "P"
    with pytest.raises(ValueError, match=r"has 1 group.*at least two"):
        st.tl.calibrate(one_group, model, groupby="patient", features_key="X_enc")
    with pytest.raises(KeyError, match="groupby='nope'"):
        st.tl.calibrate(train, model, groupby="nope", features_key="X_enc")
    for kwargs, match in (({"level": 1.5}, "level"), ({"n_blocks": 1}, "n_blocks"), ({"min_r": 1.0}, "min_r")):
        with pytest.raises(ValueError, match=match):
            st.tl.calibrate(train, model, features_key="X_enc", **kwargs)
    before = sorted(train.uns), sorted(train.obsm), sorted(train.obs.columns)
    st.tl.calibrate(train, model, features_key="X_enc", progress=False)
    assert (sorted(train.uns), sorted(train.obsm), sorted(train.obs.columns)) == before  # adata left as it was
    with pytest.raises(ValueError, match=r"level=0.85 was not calibrated"):
        st.tl.predict_expression(test.copy(), model, features_key="X_enc", level=0.85, progress=False)
    # a truth on another scale than the model's targets
    ref, _ = toy_split(0)
    knn = st.tl.fit_knn(ref, layer="targets", progress=False)
    st.pp.normalize_expression(ref, flavor="hist2st", key_added="other")
    with pytest.raises(ValueError, match="another scale"):
        st.tl.calibrate(ref, knn, layer="other", progress=False)


def test_conformal_quantile_rank():
    scores = np.arange(1, 10, dtype=float)[:, None]  # n = 9
    assert conformal_quantile(scores, 0.9)[0] == 9.0  # ceil(10 * 0.9) = 9th smallest
    assert conformal_quantile(scores, 0.5)[0] == 5.0
    assert np.isinf(conformal_quantile(scores, 0.95)[0])  # ceil(10 * 0.95) = 10 > 9: no finite bound


def test_recommended_chooses_by_cross_validation_and_calibrates(synthetic):
    train, test = synthetic
    model = st.tl.fit_recommended(train, features_key="X_enc", layer="targets", progress=False)
    sel = model.calibration.provenance["selection"]
    assert set(sel["candidates"]) == {"knn", "dual_knn[raw]", "ridge_gcv", "dual_knn[learnt]", "dual_knn"}
    assert sel["chosen"] in sel["candidates"] and sel["candidates"][sel["chosen"]]["within_one_se"]
    # linear truth: the ridge is best by far, and nothing simpler is within one standard error of it
    assert sel["chosen"] == "ridge_gcv"
    assert train.uns["recommended"]["params"]["chosen"] == "ridge_gcv"
    st.tl.predict_expression(test, model, features_key="X_enc", progress=False)
    assert "predicted_lower" in test.layers


def test_one_standard_error_rule():
    folds = ["a", "b", "c", "d"]
    per_fold = {
        "simple": pd.Series([0.30, 0.31, 0.29, 0.30], index=folds),
        "flexible": pd.Series([0.31, 0.30, 0.31, 0.305], index=folds),  # better on average, within the noise
    }
    chosen, rows = choose(per_fold)
    assert chosen == "simple" and rows[1]["best"]
    per_fold["flexible"] = per_fold["simple"] + 0.02  # better in every group
    assert choose(per_fold)[0] == "flexible"
    two = {k: v.iloc[:2] for k, v in per_fold.items()}  # two groups: no standard error, the best is taken
    two["flexible"] = pd.Series([0.32, 0.31], index=folds[:2])  # with 4 such groups it would be within 1 SE
    assert choose(two)[0] == "flexible"


#: Small networks for the recipes' toy fits (a token grid that fits 48 px patches for CMRCNet).
SMALL = {
    "bleep": {"projection_dim": 32},
    "mclstexp": {"projection_dim": 32},
    "nh2st": {"embed_dim": 32, "hidden_dim": 32, "decoder_dim": 16},
    "stgchb": {"projection_dim": 32, "image_hidden_dim": 32, "expression_hidden_dim": 32},
    "cmrcnet": {"projection_dim": 32, "n_gene_tokens": 4, "token_grid": 3},
}


@pytest.mark.parametrize("method", list(SMALL))
def test_every_published_recipe_can_be_calibrated(toy_split, method):
    """calibrate refits the model's own configuration (its recipe, shortened to one epoch per stage) once per group."""
    ref, query = toy_split(0)
    kw = {"method": method, "layer": "targets", "library_key": "section", "max_epochs": 1, "progress": False}
    model = st.tl.fit_contrastive(ref, method_kwargs=SMALL[method], **kw)
    st.tl.calibrate(ref, model, n_blocks=3, progress=False)
    cal = model.calibration
    assert cal.provenance["refit"]["method"] == method and len(cal.provenance["groups"]) == 3
    assert cal.uses_spread is (model.prediction == "retrieval")
    st.tl.predict_expression(query, model, library_key="section", progress=False)
    lo, hi = query.layers["predicted_lower"], query.layers["predicted_upper"]
    assert np.isfinite(lo).all() and (hi >= lo).all() and "predicted_reliable" in query.var
