"""One model contract, the training plan, token inputs and the public registry."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pytest

import sthist as st
from sthist._engine import train
from sthist._engine.base import BaseModel, ModelInputs, Prediction
from sthist._engine.methods import METHODS, register
from sthist._engine.methods.bleep import BLEEP
from sthist._engine.plan import Optim, Schedule, Stage, TrainPlan, resolve_plan


def _toy_arrays(n=120, g=10, d=12, seed=0):
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n, d)).astype(np.float32)
    w = rng.normal(size=(d, g))
    expr = np.log1p(np.exp(feats @ w / 3)).astype(np.float32)
    return feats, expr, [f"g{i}" for i in range(g)]


# ---- the plan --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: Optim("rmsprop"), "Optim.name"),
        (lambda: Optim(lr=0), "Optim.lr"),
        (lambda: Schedule("linear"), "Schedule.name"),
        (lambda: Schedule(step_size=0), "Schedule.step_size"),
        (lambda: Stage(epochs=0), "Stage.epochs"),
        (lambda: Stage(losses=()), "Stage.losses"),
        (lambda: TrainPlan(batch_size=1), "TrainPlan.batch_size"),
        (lambda: TrainPlan(validation_fraction=1.0), "validation_fraction"),
        (lambda: TrainPlan(select_on="val_r2"), "select_on"),
        (lambda: TrainPlan(stages=(Stage("a"), Stage("a"))), "distinct names"),
    ],
)
def test_plan_fields_are_checked_once_when_made(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_schedules_give_the_published_learning_rates():
    assert [Schedule("step", step_size=2, gamma=0.5).lr_at(e, lr=1.0, epochs=6) for e in range(6)] == [
        1.0,
        1.0,
        0.5,
        0.5,
        0.25,
        0.25,
    ]
    cos = Schedule("cosine", min_lr=1e-5)
    assert cos.lr_at(0, lr=1e-4, epochs=11) == pytest.approx(1e-4)
    assert cos.lr_at(10, lr=1e-4, epochs=11) == pytest.approx(1e-5)
    assert cos.lr_at(5, lr=1e-4, epochs=11) == pytest.approx((1e-4 + 1e-5) / 2)
    warm = Schedule("constant", warmup_epochs=3)
    assert [warm.lr_at(e, lr=1.0, epochs=10) for e in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]


def test_resolve_plan_overrides_fields_and_keeps_the_recipe():
    recipe = TrainPlan(optimizer=Optim("adam", lr=5e-4), stages=(Stage("pre", epochs=5), Stage("main", epochs=3)))
    assert resolve_plan(recipe) is recipe
    p = resolve_plan(recipe, lr=1e-2, max_epochs=2, select_on="val_pearson", early_stopping_patience=None)
    assert p.optimizer == Optim("adam", lr=1e-2) and p.select_on == "val_pearson"
    assert [s.epochs for s in p.stages] == [2, 2] and recipe.stages[0].epochs == 5
    assert p.early_stopping_patience == recipe.early_stopping_patience  # None is "not given"
    assert resolve_plan(recipe, optimizer="sgd").optimizer.name == "sgd"
    with pytest.raises(TypeError, match="unknown training settings"):
        resolve_plan(recipe, learning_rate=1e-3)
    assert TrainPlan.from_dict(p.to_dict()).to_dict() == p.to_dict()


def test_every_method_declares_a_recipe_the_engine_resolves():
    for name, cls in METHODS.items():
        assert isinstance(cls.recipe, TrainPlan), name
        assert cls.description, name
    assert METHODS["mclstexp"].recipe.optimizer.lr == 1e-4 and METHODS["mclstexp"].recipe.batch_size == 128
    assert METHODS["cmrcnet"].recipe.batch_size == 64 and METHODS["cmrcnet"].recipe.max_epochs == 60


def test_engine_and_tl_run_the_same_recipe(prepared_toy):
    adata = prepared_toy()
    adata = adata[adata.obs["section"] == "toy_0"].copy()
    # cmrcnet reads encoder tokens: a 3 x 3 grid of hed-texture cells fits the 48 px patches (the paper's 7 x 7 not)
    kwargs = {"token_grid": 3}
    model = st.tl.fit_contrastive(
        adata, method="cmrcnet", layer="targets", max_epochs=2, method_kwargs=kwargs, progress=False
    )
    expr = adata.layers["targets"]
    direct = train.fit(
        method="cmrcnet",
        expression=expr,
        genes=list(adata.var_names),
        images=adata.obsm["patches"],  # the engine encodes the features and the tokens itself, as tl has it do
        max_epochs=2,
        method_kwargs=kwargs,
        progress=False,
    )
    assert model.config["plan"] == direct.config["plan"]
    assert model.config["plan"]["optimizer"] == {"name": "adamw", "lr": 1e-4, "weight_decay": 1e-3, "momentum": 0.9}
    assert model.config["plan"]["schedule"]["name"] == "cosine" and model.config["plan"]["schedule"]["min_lr"] == 1e-5
    assert model.inputs.tokens == direct.inputs.tokens == 3
    assert direct.history["train_loss"] == model.history["train_loss"]


def test_stages_train_only_their_parameters_and_terms():
    feats, expr, genes = _toy_arrays()
    plan = TrainPlan(
        batch_size=32,
        stages=(
            Stage("image_only", epochs=3, trainable=("image_projection",), optimizer=Optim("sgd", lr=0.05)),
            Stage("all", epochs=2, schedule=Schedule("cosine", min_lr=1e-5)),
        ),
        validation_fraction=0.2,
        early_stopping_patience=None,
    )
    run = train._prepare(method="bleep", expression=expr, genes=genes, features=feats, plan=plan, progress=False)
    spot0 = {k: v.detach().clone() for k, v in run.trainer.module.spot_projection.state_dict().items()}
    assert isinstance(run.trainer.optimizer, __import__("torch").optim.SGD)
    run.trainer.train(True)
    run.trainer.step(run.train_idx[:32])
    for k, v in run.trainer.module.spot_projection.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), spot0[k].numpy())  # frozen in stage 1

    model = train.fit(method="bleep", expression=expr, genes=genes, features=feats, plan=plan, progress=False)
    assert [s["name"] for s in model.history["stages"]] == ["image_only", "all"]
    assert [s["epochs"] for s in model.history["stages"]] == [3, 2] and len(model.history["train_loss"]) == 5
    assert model.config["plan"]["stages"][0]["optimizer"]["name"] == "sgd"
    assert all(p.requires_grad for p in model.module.parameters())  # restored after training
    with pytest.raises(ValueError, match="name no parameters"):
        train.fit(
            method="bleep",
            expression=expr,
            genes=genes,
            features=feats,
            progress=False,
            plan=TrainPlan(stages=(Stage("x", epochs=1, trainable=("decoder",)),)),
        )
    with pytest.raises(ValueError, match="does not return"):
        train.fit(
            method="bleep",
            expression=expr,
            genes=genes,
            features=feats,
            progress=False,
            plan=TrainPlan(stages=(Stage("x", epochs=1, losses=("dgi",)),)),
        )


@pytest.mark.parametrize("method", ["bleep", "nh2st"])
def test_selection_on_validation_pearson(method):
    feats, expr, genes = _toy_arrays(n=150)
    coords = np.stack(np.meshgrid(np.arange(15), np.arange(10)), -1).reshape(-1, 2) * 100.0
    model = train.fit(
        method=method,
        expression=expr,
        genes=genes,
        features=feats,
        coords=coords,
        progress=False,
        max_epochs=6,
        batch_size=32,
        select_on="val_pearson",
        early_stopping_patience=None,
    )
    r = model.history["val_pearson"]
    assert len(r) == 6 and np.isfinite(r).all()
    assert model.history["best_epoch"] == int(np.argmax(r))
    assert model.config["plan"]["select_on"] == "val_pearson"


# ---- token inputs ----------------------------------------------------------------------------------------------------


@pytest.fixture
def token_method():
    """A small registered method that reads the token grid (its image embedding pools projected tokens)."""
    import torch

    @dataclass
    class Config(BLEEP.Config):
        token_grid: int = 2

    class TokenBLEEP(BLEEP):
        """Test method: BLEEP whose image side also reads encoder tokens."""

        consumes = ("features", "tokens")

        def __init__(self, image_dim, n_genes, config=None, *, token_dim=0):
            super().__init__(image_dim, n_genes, config)
            self.token_dim = token_dim
            self.token_gate = torch.nn.Linear(token_dim, 1)

        def embed_image(self, img_feats, batch=None):
            gate = torch.sigmoid(self.token_gate(batch.img_tokens)).mean(1)
            return super().embed_image(img_feats, batch) * gate

    TokenBLEEP.Config = Config
    register("_test_tokens")(TokenBLEEP)
    yield TokenBLEEP
    METHODS.pop("_test_tokens", None)


def test_methods_can_consume_token_grids(prepared_toy, token_method, tmp_path):
    adata = prepared_toy()
    ref = adata[adata.obs["section"] == "toy_0"].copy()
    query = adata[adata.obs["section"] == "toy_1"].copy()
    patches = ref.obsm["patches"]
    expr, genes = ref.layers["targets"], list(ref.var_names)
    model = train.fit(method="_test_tokens", expression=expr, genes=genes, images=patches, max_epochs=2, progress=False)
    assert model.inputs.tokens == 2 and model.config["token_dim"] > 0
    pred = model.predict(images=query.obsm["patches"], progress=False)
    assert pred.expression.shape == (query.n_obs, len(genes))
    model.save(tmp_path / "m")
    again = st.tl.load_model(tmp_path / "m", device="cpu")
    np.testing.assert_allclose(again.predict(images=query.obsm["patches"]).expression, pred.expression, rtol=1e-5)
    # through tl: the patches are encoded once into features and tokens
    fitted = st.tl.fit_contrastive(ref, method="_test_tokens", layer="targets", max_epochs=1, progress=False)
    st.tl.predict_expression(query, fitted, progress=False)
    assert fitted.inputs.tokens == 2 and np.isfinite(query.layers["predicted"]).all()
    with pytest.raises(ValueError, match="grid of encoder tokens"):
        train.fit(method="_test_tokens", expression=expr, genes=genes, features=ref.obsm["X_hed_fast"], progress=False)
    with pytest.raises(ValueError, match="does not consume encoder tokens"):
        train.fit(
            method="bleep",
            expression=expr,
            genes=genes,
            features=ref.obsm["X_hed_fast"],
            tokens=np.zeros((ref.n_obs, 4, 3)),
            progress=False,
        )


# ---- the model contract ----------------------------------------------------------------------------------------------


def test_every_model_follows_one_contract(toy_split, tmp_path):
    ref, query = toy_split()
    bleep = st.tl.fit_contrastive(ref, layer="targets", max_epochs=2, progress=False)
    ridge = st.tl.fit_ridge(ref, layer="targets", progress=False)
    for model in (bleep, ridge):
        assert isinstance(model, BaseModel)
        assert isinstance(model.inputs, ModelInputs)
        assert model.inputs.patch_size == 48 and model.inputs.encoder == "hed-fast"
        with pytest.raises(dataclasses.FrozenInstanceError):
            model.inputs.patch_size = 1
        out = model.predict(features=query.obsm["X_hed_fast"])
        assert isinstance(out, Prediction) and out.expression.shape == (query.n_obs, ref.n_vars)
        folder = tmp_path / model.method
        model.save(folder)
        with pytest.raises(FileExistsError, match="overwrite=True"):
            model.save(folder)
        model.save(folder, overwrite=True)
        loaded = st.tl.load_model(folder)
        assert type(loaded) is type(model) and loaded.inputs == model.inputs
        np.testing.assert_allclose(
            loaded.predict(features=query.obsm["X_hed_fast"]).expression, out.expression, rtol=1e-5, atol=1e-6
        )
    assert bleep.predict(features=query.obsm["X_hed_fast"]).spread is not None
    assert ridge.predict(features=query.obsm["X_hed_fast"]).spread is None


def test_ridge_is_a_registered_predictor(toy_split, tmp_path):
    ref, query = toy_split()
    model = st.tl.fit_ridge(ref, layer="targets", save_dir=tmp_path / "ridge", progress=False)
    assert ref.uns["ridge"]["params"]["features_key"] == "X_hed_fast"
    assert ref.uns["ridge"]["model_dir"] == str((tmp_path / "ridge").resolve())
    st.tl.predict_expression(ref, progress=False)  # the model fit_ridge recorded
    np.testing.assert_allclose(ref.layers["predicted"], model.predict(features=ref.obsm["X_hed_fast"]).expression)
    # from the saved folder, on patches only (features recomputed with the recorded encoder)
    del query.obsm["X_hed_fast"]
    st.tl.predict_expression(query, str(tmp_path / "ridge"), progress=False)
    assert np.isfinite(query.layers["predicted"]).all()
    assert query.uns["predicted"]["params"]["method"] == "ridge"
    table = st.tl.methods()
    assert {"bleep", "mclstexp", "nh2st", "stgchb", "cmrcnet", "bleep_ctx", "ridge"} <= set(table.index)
    assert table.loc["ridge", "kind"] == "control" and table.loc["nh2st", "prediction"] == "regression"


def test_predicting_on_another_patch_geometry_raises(toy_split):
    ref, query = toy_split()
    model = st.tl.fit_contrastive(ref, layer="targets", max_epochs=1, progress=False)
    st.pp.extract_patches(query, patch_size=32, library_key="section", progress=False)
    del query.obsm["X_hed_fast"]
    before = set(query.layers)
    with pytest.raises(ValueError, match=r"32 px instead of 48 px.*extract_patches\(adata, patch_size=48"):
        st.tl.predict_expression(query, model, progress=False)
    assert set(query.layers) == before


def test_predict_records_the_key_and_model_it_used(toy_split, tmp_path):
    ref, query = toy_split()
    model = st.tl.fit_contrastive(ref, layer="targets", max_epochs=1, progress=False, save_dir=tmp_path / "m")
    st.tl.predict_expression(query, str(tmp_path / "m"), progress=False)
    params = query.uns["predicted"]["params"]
    assert params["features_key"] == "X_hed_fast" and params["model_dir"] == str((tmp_path / "m").resolve())
    assert params["k"] == min(50, ref.n_obs // 3) and params["method"] == model.method


def test_new_slide_predictions_follow_the_copy_rule(toy_split):
    ref, query = toy_split()
    model = st.tl.fit_ridge(ref, layer="targets", progress=False)
    slide = query[:, []].copy()
    out = st.tl.predict_expression(slide, model, copy=True, progress=False)
    assert out.n_vars == ref.n_vars and slide.n_vars == 0 and "predicted" not in slide.obsm
    assert st.tl.predict_expression(slide, model, progress=False) is None
    np.testing.assert_allclose(slide.obsm["predicted"].to_numpy(), out.layers["predicted"])
    assert list(slide.obsm["predicted"].columns) == list(out.var_names)


def test_cross_validate_inplace_false_leaves_adata_unchanged(prepared_toy):
    adata = prepared_toy()
    layers, uns = set(adata.layers), set(adata.uns)
    table = st.tl.cross_validate(
        adata, groupby="section", method="ridge", layer="targets", progress=False, inplace=False
    )
    assert len(table) == 2 and set(adata.layers) == layers and set(adata.uns) == uns
    with pytest.raises(ValueError, match="not registered"):
        st.tl.cross_validate(adata, groupby="section", method="ridge2", layer="targets", progress=False)
    with pytest.raises(TypeError, match="does not take"):
        st.tl.cross_validate(
            adata, groupby="section", method="ridge", layer="targets", progress=False, fit_kwargs={"max_epochs": 3}
        )


def test_early_stopping_none_trains_every_epoch(toy_split):
    ref, _ = toy_split()
    # bleep_es's recipe stops early (patience 10); None switches it off
    full = st.tl.fit_contrastive(
        ref, method="bleep_es", layer="targets", max_epochs=25, early_stopping_patience=None, progress=False
    )
    assert len(full.history["train_loss"]) == 25 and full.config["plan"]["early_stopping_patience"] is None
    # BLEEP's recipe does not stop early; a patience switches it on
    early = st.tl.fit_contrastive(ref, layer="targets", max_epochs=25, early_stopping_patience=2, progress=False)
    assert early.config["plan"]["early_stopping_patience"] == 2
    assert len(early.history["train_loss"]) < 25 and early.history["stopped_early"]
    # "recipe" (the default): the plan's
    default = st.tl.fit_contrastive(ref, method="bleep_es", layer="targets", max_epochs=3, progress=False)
    assert default.config["plan"]["early_stopping_patience"] == 10
    bleep = st.tl.fit_contrastive(ref, layer="targets", max_epochs=3, progress=False)
    assert bleep.config["plan"]["early_stopping_patience"] is None and len(bleep.history["train_loss"]) == 3
