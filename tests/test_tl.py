"""The AnnData-facing tools: fit_contrastive, predict_expression, cross_validate."""

import numpy as np
import pytest
import torch

import sthist as st
from sthist.tl._utils import _MODELS

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def prepared(prepared_toy):
    return prepared_toy(1)


@pytest.fixture(scope="module")
def fitted(prepared):
    adata = prepared.copy()
    model = st.tl.fit_contrastive(adata, layer="targets", max_epochs=30, progress=False)
    return adata, model


def test_fit_writes_contract(fitted):
    adata, model = fitted
    assert adata.obsm["X_contrastive_image"].shape == (adata.n_obs, model.bank_embeddings.shape[1])
    assert adata.obsm["X_contrastive_expression"].shape == adata.obsm["X_contrastive_image"].shape
    entry = adata.uns["contrastive"]
    assert entry["params"]["method"] == "bleep"
    assert len(entry["history"]["train_loss"]) >= 1
    assert entry["model_id"] in _MODELS
    assert model.genes == adata.var_names.tolist()


def test_predict_layer_and_flags(fitted):
    adata, model = fitted
    st.tl.predict_expression(adata, model, progress=False)
    pred = adata.layers["predicted"]
    assert pred.shape == adata.shape and pred.dtype == np.float32
    assert np.isfinite(pred).all()
    assert adata.var["predicted_modelled"].all()
    assert (adata.obs["predicted_spread"] >= 0).all()
    assert adata.uns["predicted"]["params"]["k"] == 50


def test_learns_informative_genes(prepared):
    """Out-of-section predictions of morphology-driven genes beat a model trained on shuffled pairs."""
    adata = prepared.copy()
    inf = adata.var["informative"].to_numpy()
    sec = adata.obs["section"].to_numpy()
    train, test = adata[sec == "toy_0"].copy(), adata[sec == "toy_1"].copy()
    # BLEEP's recipe runs 4 epochs of batch 256 (a single step per epoch on these 115 training spots): lengthened to
    # 40 epochs by an override; the rest is the recipe (80/20 split, the best validation epoch kept)
    model = st.tl.fit_contrastive(train, layer="targets", max_epochs=40, progress=False)
    assert model.config["plan"]["validation_fraction"] == 0.2 and len(model.history["train_loss"]) == 40
    shuffled = train.copy()
    rng = np.random.default_rng(0)
    shuffled.layers["targets"] = shuffled.layers["targets"][rng.permutation(shuffled.n_obs)]
    control = st.tl.fit_contrastive(shuffled, layer="targets", max_epochs=40, progress=False)
    scores = {}
    for name, m in {"real": model, "shuffled": control}.items():
        st.tl.predict_expression(test, m, key_added=name, progress=False)
        df = st.tl.score_prediction(
            test, layer=name, true_layer="targets", genes=test.var_names[inf].tolist(), inplace=False
        )
        scores[name] = df.loc["all", "pcc_all"]
    assert scores["real"] > 0.4
    assert scores["real"] > scores["shuffled"] + 0.3


def test_predict_with_recorded_model_and_folder(fitted, tmp_path):
    adata, model = fitted
    a1 = adata.copy()
    st.tl.predict_expression(a1, progress=False)  # the model fit_contrastive recorded
    model.save(tmp_path / "m")
    a2 = adata.copy()
    st.tl.predict_expression(a2, tmp_path / "m", progress=False)
    np.testing.assert_allclose(a1.layers["predicted"], a2.layers["predicted"], rtol=1e-5, atol=1e-6)


def test_save_dir_recorded_for_later_session(prepared, tmp_path):
    adata = prepared[:150].copy()
    st.tl.fit_contrastive(adata, layer="targets", max_epochs=3, save_dir=tmp_path / "saved", progress=False)
    _MODELS.pop(adata.uns["contrastive"]["model_id"])  # as in a new Python session
    st.tl.predict_expression(adata, progress=False)
    assert np.isfinite(adata.layers["predicted"]).all()


def test_no_model_error(prepared):
    adata = prepared.copy()
    with pytest.raises(ValueError, match="no model given and none recorded"):
        st.tl.predict_expression(adata)


def test_predict_on_slide_without_counts(fitted):
    adata, model = fitted
    slide = adata[:, []].copy()
    del slide.layers["targets"]
    out = st.tl.predict_expression(slide, model, progress=False, copy=True)
    assert out is not None and out.n_vars == len(model.genes)
    np.testing.assert_array_equal(out.X, out.layers["predicted"])
    assert slide.n_vars == 0 and "predicted" not in slide.obsm  # the input is left as it was
    # in place, the model's genes cannot be added: a spots x genes DataFrame in obsm
    assert st.tl.predict_expression(slide, model, progress=False) is None
    np.testing.assert_array_equal(slide.obsm["predicted"].to_numpy(), out.X)


def test_predict_from_patches_equals_cached_features(fitted):
    adata, model = fitted
    a1, a2 = adata.copy(), adata.copy()
    st.tl.predict_expression(a1, model, progress=False)
    del a2.obsm["X_hed_fast"]
    st.tl.predict_expression(a2, model, progress=False)
    np.testing.assert_allclose(a1.layers["predicted"], a2.layers["predicted"], rtol=1e-4, atol=1e-5)


def test_genes_not_in_model_are_nan(fitted):
    adata, _ = fitted
    sub = st.tl.fit_contrastive(
        adata.copy(), layer="targets", genes=adata.var_names[:10].tolist(), max_epochs=2, progress=False
    )
    a = adata.copy()
    st.tl.predict_expression(a, sub, progress=False)
    assert np.isnan(a.layers["predicted"][:, 10:]).all()
    assert np.isfinite(a.layers["predicted"][:, :10]).all()
    assert a.var["predicted_modelled"].sum() == 10
    with pytest.raises(KeyError, match="not covered by the model"):
        st.tl.predict_expression(a, sub, genes=[adata.var_names[20]])


def test_copy_equals_inplace(fitted):
    adata, model = fitted
    a = adata.copy()
    out = st.tl.predict_expression(a, model, copy=True, progress=False)
    assert "predicted" not in a.layers or a is not out
    b = adata.copy()
    st.tl.predict_expression(b, model, progress=False)
    np.testing.assert_array_equal(out.layers["predicted"], b.layers["predicted"])


@pytest.mark.parametrize(
    ("mutate", "kwargs", "exc", "match"),
    [
        (lambda a: (a.obsm.pop("patches"), a.obsm.pop("X_hed_fast")), {}, KeyError, "extract_patches"),
        (lambda a: None, {"layer": "nope"}, KeyError, "normalize_expression"),
        (lambda a: None, {"batch_size": 10_000}, ValueError, "larger than the"),
        (lambda a: a.layers["targets"].__setitem__((0, 0), np.nan), {}, ValueError, "NaN"),
        (lambda a: a.layers["targets"].__setitem__((0, 0), -1.0), {}, ValueError, "negative"),
        (lambda a: None, {"method": "nope"}, (KeyError, ValueError), "bleep"),
        (lambda a: None, {"genes": ["NOT_A_GENE"]}, (KeyError, ValueError), "NOT_A_GENE"),
    ],
)
def test_fit_bad_input_leaves_adata(prepared, mutate, kwargs, exc, match):
    adata = prepared.copy()
    if "targets" in adata.layers and hasattr(adata.layers["targets"], "toarray"):
        adata.layers["targets"] = adata.layers["targets"].toarray()
    mutate(adata)
    before = adata.copy()
    kwargs = {"layer": "targets", "max_epochs": 1, "progress": False} | kwargs
    with pytest.raises(exc, match=match):
        st.tl.fit_contrastive(adata, **kwargs)
    assert set(adata.obsm) == set(before.obsm) and set(adata.uns) == set(before.uns)
    assert set(adata.layers) == set(before.layers)


def test_predict_bad_model_folder(prepared, tmp_path):
    with pytest.raises(FileNotFoundError, match="no model folder"):
        st.tl.predict_expression(prepared.copy(), tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"has no config\.json"):
        st.tl.predict_expression(prepared.copy(), tmp_path / "empty")
    with pytest.raises(TypeError, match="fitted sthist model"):
        st.tl.predict_expression(prepared.copy(), 42)


def test_ridge_through_predict_expression(prepared):
    adata = prepared.copy()
    model = st.tl.fit_ridge(adata, features_key="X_hed_fast", layer="targets")
    st.tl.predict_expression(adata, model, key_added="ridge")
    assert np.isfinite(adata.layers["ridge"]).all()
    del adata.obsm["X_hed_fast"]  # recomputed from the patches with the recorded encoder
    st.tl.predict_expression(adata, model, key_added="ridge2")
    np.testing.assert_allclose(adata.layers["ridge"], adata.layers["ridge2"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["bleep", "ridge"])
def test_cross_validate(prepared, method):
    adata = prepared.copy()
    df = st.tl.cross_validate(
        adata,
        groupby="section",
        method=method,
        layer="targets",
        progress=False,
        fit_kwargs={"max_epochs": 20} if method != "ridge" else None,
    )
    assert df["fold"].tolist() == ["toy_0", "toy_1"]
    assert {"pcc_all", "pcc_heg", "pcc_hvg", "gene_corr", "mse", "seconds"} <= set(df.columns)
    assert np.isfinite(adata.layers["cv_predicted"]).all()
    assert (df["pcc_all"] > 0.05).all()
    assert list(adata.uns["cv_predicted"]["scores"]["fold"]) == ["toy_0", "toy_1"]


def test_cross_validate_needs_two_groups(prepared):
    adata = prepared[prepared.obs["section"] == "toy_0"].copy()
    with pytest.raises(ValueError, match="at least two"):
        st.tl.cross_validate(adata, groupby="section", layer="targets")
    with pytest.raises(KeyError, match="not a column"):
        st.tl.cross_validate(adata, groupby="patient", layer="targets")


def test_features_from_another_encoder_rejected(fitted):
    adata, model = fitted
    a = adata.copy()
    st.pp.embed_patches(a, encoder="resnet18", pretrained=False, key_added="X_other", progress=False)
    before = set(a.layers)
    with pytest.raises(ValueError, match="was made with encoder 'resnet18'"):
        st.tl.predict_expression(a, model, features_key="X_other")
    assert set(a.layers) == before


def test_tampered_model_folder(fitted, tmp_path):
    adata, model = fitted
    model.save(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="m"):
        st.tl.predict_expression(adata.copy(), tmp_path / "m")
