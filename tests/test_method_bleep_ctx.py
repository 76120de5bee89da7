"""bleep_ctx: BLEEP whose image embedding sees the spot's spatial neighbours."""

import numpy as np
import pytest
import torch

import sthist as st
from sthist._engine.methods import METHODS, get_method
from sthist._engine.methods.bleep import BLEEP, FROZEN_FEATURE_RECIPE
from sthist._engine.methods.bleep_ctx import BLEEPContext
from sthist._engine.plan import TrainPlan

torch.set_num_threads(1)
FIT = {"method": "bleep_ctx", "layer": "targets", "library_key": "section", "progress": False}


@pytest.fixture(scope="module")
def split(toy_split):
    return toy_split(2)


@pytest.fixture(scope="module")
def fitted(split):
    return st.tl.fit_contrastive(split[0].copy(), max_epochs=40, **FIT)


def _score(query, model, genes):
    q = query.copy()
    st.tl.predict_expression(q, model, library_key="section", progress=False)
    return st.tl.score_prediction(q, true_layer="targets", genes=genes, inplace=False).loc["all", "pcc_all"], q


def test_registered_with_sthists_frozen_feature_recipe():
    assert get_method("bleep_ctx") is BLEEPContext and METHODS["bleep_ctx"] is BLEEPContext
    assert issubclass(BLEEPContext, BLEEP) and BLEEPContext.needs_neighbors
    # not BLEEP's published 4 epochs: the engine's default plan (up to 100 epochs, 10 % validation, patience 10)
    assert BLEEPContext.recipe is FROZEN_FEATURE_RECIPE and BLEEPContext.recipe == TrainPlan()
    assert BLEEPContext.recipe != BLEEP.recipe
    r = BLEEPContext.recipe
    assert (r.optimizer.name, r.optimizer.lr, r.optimizer.weight_decay, r.batch_size) == ("adamw", 1e-3, 1e-3, 256)
    assert (r.max_epochs, r.validation_fraction, r.early_stopping_patience, r.select_on) == (100, 0.1, 10, "val_loss")
    # BLEEP's retrieval
    assert BLEEPContext.prediction_defaults == BLEEP.prediction_defaults == {"k": 50, "weighting": "average"}


def test_trains_with_early_stopping_on_a_validation_split(split, fitted):
    train, _ = split
    plan = fitted.config["plan"]
    assert (plan["validation_fraction"], plan["early_stopping_patience"], plan["max_epochs"]) == (0.1, 10, 40)
    h = fitted.history
    assert h["n_val"] == round(0.1 * train.n_obs) and len(h["val_loss"]) == len(h["train_loss"]) <= 40
    assert h["best_epoch"] == int(np.argmin(h["val_loss"]))


def test_learns_and_beats_shuffled_control(split, fitted):
    train, test = split
    genes = test.var_names[test.var["informative"]].tolist()
    shuffled = train.copy()
    shuffled.layers["targets"] = shuffled.layers["targets"][np.random.default_rng(0).permutation(train.n_obs)]
    control = st.tl.fit_contrastive(shuffled, max_epochs=40, **FIT)
    real, _ = _score(test, fitted, genes)
    ctrl, _ = _score(test, control, genes)
    assert real > 0.45
    assert real > ctrl + 0.3


def test_context_changes_the_image_embedding(split, fitted):
    _, test = split
    feats = test.obsm["X_hed_fast"]
    xy = test.obsm["spatial"]
    a = fitted.embed_images(features=feats, coords=xy)
    shuffled = feats.copy()
    shuffled[1:] = shuffled[1:][::-1]  # same first spot, different neighbours
    b = fitted.embed_images(features=shuffled, coords=xy)
    assert not np.allclose(a[0], b[0], atol=1e-4)


def test_save_load_round_trip(split, fitted, tmp_path):
    _, test = split
    _, a = _score(test, fitted, None)
    fitted.save(tmp_path / "m")
    _, b = _score(test, st.tl.ContrastiveModel.load(tmp_path / "m"), None)
    np.testing.assert_array_equal(a.layers["predicted"], b.layers["predicted"])


def test_query_needs_coordinates(split, fitted):
    _, test = split
    q = test.copy()
    del q.obsm["spatial"]
    with pytest.raises(KeyError, match=r"obsm\['spatial'\] is missing"):
        st.tl.predict_expression(q, fitted, library_key="section")
    assert "predicted" not in q.layers


def test_several_sections_need_library_key(split):
    import anndata as ad

    both = ad.concat([split[0], split[1]], uns_merge="first")
    with pytest.raises(ValueError, match="library_key='section'"):
        st.tl.fit_contrastive(both, method="bleep_ctx", layer="targets", max_epochs=1, progress=False)


def test_bad_config():
    with pytest.raises(ValueError, match="n_neighbors must be a positive integer"):
        st.tl.fit_contrastive(
            st.datasets.toy(n_rows=6, n_cols=6, n_genes=10), method="bleep_ctx", method_kwargs={"n_neighbors": 0}
        )
