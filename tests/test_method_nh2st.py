"""NH2ST: dual-scale contrastive learning with a query and a neighbour branch, prediction by regression; and its
``nh2st_ctx`` variant (the decoder also reads the neighbour context, sthist's frozen-feature recipe)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

import sthist as st
from sthist._engine.data import SpotData, spatial_neighbors
from sthist._engine.methods import METHODS, get_method
from sthist._engine.methods.nh2st import (  # importing the module registers "nh2st"
    NH2ST,
    HypergraphConv,
    NH2STContext,
    neighbourhood_hypergraph,
    weighted_info_nce,
)
from sthist._engine.model import ContrastiveModel
from sthist._engine.plan import TrainPlan
from sthist._engine.train import fit

torch.set_num_threads(1)

SMALL = {"embed_dim": 32, "hidden_dim": 64, "decoder_dim": 32, "n_heads": 4}


# ---------------------------------------------------------------------------------------------------------------------
# building blocks


def test_registered_with_the_papers_defaults():
    assert get_method("nh2st") is NH2ST and METHODS["nh2st"] is NH2ST
    assert NH2ST.prediction == "regression" and NH2ST.needs_neighbors and not NH2ST.batch_by_group
    cfg = NH2ST.make_config({})
    assert dataclasses.asdict(cfg) == {
        "n_neighbors": 8,
        "hyperedge_size": 3,
        "embed_dim": 512,
        "hidden_dim": 1024,
        "decoder_dim": 256,
        "depth": 1,
        "n_heads": 8,
        "mlp_ratio": 1.0,
        "dropout": 0.5,
        "temperature_query": 0.05,
        "temperature_neighbor": 0.05,
        "weight_query": 1.0,
        "weight_neighbor": 0.5,
        "negative_weight": 0.1,
        "neighbor_context": False,  # the authors' decoder reads the target's encoding alone
    }
    # the authors' configure_optimizers and README config
    recipe = NH2ST.recipe
    assert (recipe.optimizer.name, recipe.optimizer.lr, recipe.optimizer.weight_decay) == ("adam", 5e-4, 0.0)
    assert (recipe.schedule.name, recipe.schedule.step_size, recipe.schedule.gamma) == ("step", 50, 0.9)
    assert (recipe.batch_size, recipe.max_epochs, recipe.drop_last) == (8, 200, False)
    # NGHist2ST.py's R: the mean r of the 50 best-predicted genes (on 10 % of the training spots here)
    assert (recipe.validation_fraction, recipe.early_stopping_patience, recipe.select_on) == (
        0.1,
        20,
        "val_pearson_top50",
    )
    assert recipe.stages == ()
    model = NH2ST(10, 7, cfg)
    assert model.n_neighbors == 8 and model.image_encoder.out_features == 512
    assert model.neighbor_image_encoder.conv1.lin.out_features == 1024 and model.decoder[0].out_features == 256
    data = _spot_data(d=10, g=7)
    batch = data.make_batch(np.arange(16), n_neighbors=8)
    terms = model.loss(batch)
    assert set(terms) == {"mse", "query", "neighbor"} and all(t.ndim == 0 for t in terms.values())
    loss = sum(terms.values())
    loss.backward()
    assert torch.isfinite(loss)
    # the terms are weighted: mse + weight_query (1.0) * query + weight_neighbor (0.5) * neighbour. The same
    # weights with unit loss weights (no dropout, so the passes are comparable) give the unweighted terms.
    unit = NH2ST(10, 7, dataclasses.replace(cfg, weight_query=1.0, weight_neighbor=1.0))
    twice = NH2ST(10, 7, dataclasses.replace(cfg, weight_query=2.0, weight_neighbor=1.0))
    unit.load_state_dict(model.state_dict())
    twice.load_state_dict(model.state_dict())
    with torch.no_grad():
        weighted, raw, doubled = (m.eval().loss(batch) for m in (model, unit, twice))
    torch.testing.assert_close(weighted["mse"], raw["mse"])
    torch.testing.assert_close(weighted["query"], raw["query"])
    torch.testing.assert_close(weighted["neighbor"], 0.5 * raw["neighbor"])
    torch.testing.assert_close(doubled["query"], 2.0 * raw["query"])
    assert raw["neighbor"] > 0 and raw["query"] > 0


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"n_neighbors": 0}, ValueError, "n_neighbors must be a positive integer"),
        ({"embed_dim": 100, "n_heads": 8}, ValueError, r"multiple of n_heads=8; e.g. embed_dim=96"),
        ({"temperature_query": 0}, ValueError, "temperature_query must be > 0"),
        ({"dropout": 1.0}, ValueError, r"dropout must be in \[0, 1\)"),
        ({"weight_neighbor": -1}, ValueError, "weight_neighbor must be >= 0"),
        ({"neighbor_context": "yes"}, TypeError, "neighbor_context must be True or False"),
        ({"n_neighbours": 8}, ValueError, r"not options of method 'nh2st'; valid: \[.*'n_neighbors'"),
    ],
)
def test_config_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        NH2ST.make_config(kwargs)


def test_weighted_info_nce_matches_hand_computation():
    a = [[1.0, 0.0], [0.6, 0.8], [0.0, 2.0]]
    b = [[0.8, 0.6], [1.0, 1.0], [-1.0, 3.0]]
    t, w = 0.5, 0.1

    def unit(v):
        s = math.sqrt(sum(x * x for x in v))
        return [x / s for x in v]

    au, bu = [unit(v) for v in a], [unit(v) for v in b]
    total = 0.0
    for i in range(3):
        logits = [sum(x * y for x, y in zip(au[i], bu[j], strict=True)) / t * (1.0 if i == j else w) for j in range(3)]
        total += math.log(sum(math.exp(v) for v in logits)) - logits[i]
    got = weighted_info_nce(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), t, w)
    assert float(got) == pytest.approx(total / 3, rel=1e-12)
    # aligned pairs score lower than shuffled ones
    emb = torch.nn.functional.normalize(torch.randn(16, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    assert weighted_info_nce(emb, emb) < weighted_info_nce(emb, emb.roll(1, dims=0))


def test_hypergraph_joins_each_node_to_its_most_similar_existing_nodes():
    # node 0 (the target) is closest to 1 and 2, node 3 is missing, node 4 resembles node 1
    feats = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [0.8, 0.3], [1.0, 0.0], [0.0, 1.0]]])
    mask = torch.tensor([[True, True, True, False, True]])
    inc = neighbourhood_hypergraph(feats, mask, k=2)[0]  # inc[v, e]
    edge = {e: sorted(torch.nonzero(inc[:, e]).flatten().tolist()) for e in range(5)}
    assert edge[0] == [0, 1, 2]
    assert edge[4] == [1, 2, 4]  # the most similar existing nodes, never the missing node 3
    assert edge[3] == [] and inc[3].sum() == 0  # a missing node has no hyperedge and belongs to none
    assert all(3 not in members for members in edge.values())
    # with fewer existing nodes than k every existing node is joined, nothing else
    few = neighbourhood_hypergraph(feats, torch.tensor([[True, True, False, False, False]]), k=3)[0]
    assert torch.nonzero(few[:, 0]).flatten().tolist() == [0, 1] and few[2:].sum() == 0


def test_hypergraph_conv_is_the_normalised_incidence_operator():
    torch.manual_seed(0)
    conv = HypergraphConv(3, 2).double()
    torch.nn.init.normal_(conv.bias)
    x = torch.randn(1, 4, 3, dtype=torch.float64)
    h = torch.tensor([[[1, 0, 1], [1, 1, 0], [0, 1, 1], [0, 0, 0]]], dtype=torch.float64)  # 4 nodes, 3 hyperedges
    dv = torch.diag(1 / h[0].sum(1).clamp_min(1))
    be = torch.diag(1 / h[0].sum(0))
    expected = dv @ h[0] @ be @ h[0].T @ conv.lin(x[0]) + conv.bias
    torch.testing.assert_close(conv(x, h)[0], expected)


# ---------------------------------------------------------------------------------------------------------------------
# the neighbourhood: prediction never sees expression; the per-spot shortcut is exact


def _spot_data(n=60, d=6, g=5, seed=0):
    rng = np.random.default_rng(seed)
    coords = np.stack(np.meshgrid(np.arange(10), np.arange(6)), -1).reshape(-1, 2)[:n] * 100.0
    feats = rng.normal(size=(n, d)).astype(np.float32)
    expr = rng.gamma(2.0, size=(n, g)).astype(np.float32)
    groups = np.zeros(n, dtype=np.int64)
    groups[-1] = 1  # a section of one spot: no neighbours at all
    nb = spatial_neighbors(coords, groups, 8)
    return SpotData(
        features=feats, expression=expr, coords=coords, groups=groups, neighbors=nb, device=torch.device("cpu")
    )


def _other_neighbours(batch):
    """Give every spot the neighbours of another spot (all neighbour fields together, as the engine would)."""
    for name in ("neighbor_index", "neighbor_img_feats", "neighbor_mask", "neighbor_expression", "neighbor_coords"):
        value = getattr(batch, name)
        if value is not None:
            setattr(batch, name, value.roll(7, dims=0))


def test_ctx_variant_registered_with_the_previous_behaviour():
    assert get_method("nh2st_ctx") is NH2STContext and METHODS["nh2st_ctx"] is NH2STContext
    assert issubclass(NH2STContext, NH2ST)
    assert NH2STContext.prediction == "regression" and NH2STContext.needs_neighbors
    # the decoder reads h_p + n_p; every other setting is NH2ST's
    cfg = NH2STContext.make_config({})
    assert cfg.neighbor_context is True
    assert {**dataclasses.asdict(cfg), "neighbor_context": False} == dataclasses.asdict(NH2ST.make_config({}))
    # sthist's frozen-feature recipe: the engine's default plan (AdamW 1e-3, batch 256, early stopping on val_loss)
    assert NH2STContext.recipe == TrainPlan()
    recipe = NH2STContext.recipe
    assert (recipe.optimizer.name, recipe.optimizer.lr) == ("adamw", 1e-3)
    assert (recipe.batch_size, recipe.max_epochs) == (256, 100)
    assert (recipe.validation_fraction, recipe.early_stopping_patience, recipe.select_on) == (0.1, 10, "val_loss")
    assert recipe.schedule.name == "constant" and recipe.drop_last


def test_prediction_uses_image_features_only():
    data = _spot_data()
    # the ctx variant: the decoder also reads the neighbour branch (its image encodings only)
    model = NH2STContext(6, 5, NH2STContext.make_config(SMALL)).eval()
    idx = np.arange(data.n)
    batch = data.make_batch(idx, n_neighbors=8)
    assert batch.neighbor_expression is not None and not batch.neighbor_mask[-1].any()
    with torch.no_grad():
        pred = model.predict(batch.img_feats, batch)
        emb = model.embed_image(batch.img_feats, batch)
        # other expression (target and neighbours), or none at all: the same outputs
        batch.expression = batch.expression * 0 + 123.0
        batch.neighbor_expression = torch.randn_like(batch.neighbor_expression) * 50
        torch.testing.assert_close(model.predict(batch.img_feats, batch), pred, rtol=0, atol=0)
        batch.expression = batch.neighbor_expression = None
        torch.testing.assert_close(model.predict(batch.img_feats, batch), pred, rtol=0, atol=0)
        torch.testing.assert_close(model.embed_image(batch.img_feats, batch), emb, rtol=0, atol=0)
        # but the neighbours' image features do matter (neighbour context)
        _other_neighbours(batch)
        assert not torch.allclose(model.predict(batch.img_feats, batch), pred)
    assert pred.shape == (data.n, 5) and torch.isfinite(pred).all()
    # NH2ST (the authors' decoder): decoder(h_p), the neighbours do not enter the prediction
    without = NH2ST(6, 5, NH2ST.make_config(SMALL)).eval()
    assert without.config.neighbor_context is False
    b1, b2 = data.make_batch(idx, n_neighbors=8), data.make_batch(idx, n_neighbors=8)
    _other_neighbours(b2)
    with torch.no_grad():
        p1 = without.predict(b1.img_feats, b1)
        torch.testing.assert_close(p1, without.predict(b2.img_feats, b2))
        torch.testing.assert_close(p1, without.decoder(without.image_encoder(b1.img_feats)))
        b1.expression = b1.neighbor_expression = None
        torch.testing.assert_close(without.predict(b1.img_feats, b1), p1, rtol=0, atol=0)
    # the same weights with the neighbour context switched on predict otherwise
    ctx = NH2STContext(6, 5, NH2STContext.make_config(SMALL)).eval()
    ctx.load_state_dict(without.state_dict())
    with torch.no_grad():
        assert not torch.allclose(ctx.predict(b2.img_feats, b2), p1)
    with pytest.raises(ValueError, match="needs the spatial neighbours"):
        model.predict(batch.img_feats, data.make_batch(idx))


def test_per_spot_shortcut_gives_the_same_loss_and_gradients():
    data = _spot_data()
    model = NH2ST(6, 5, NH2ST.make_config({**SMALL, "dropout": 0.0})).double()
    batch = data.make_batch(np.arange(0, data.n, 2), n_neighbors=8)
    for name in ("img_feats", "expression", "neighbor_img_feats", "neighbor_expression"):
        setattr(batch, name, getattr(batch, name).double())
    results = []
    for index in (batch.index, None):  # with spot indices: distinct spots once; without: every node
        batch.index = index
        model.zero_grad()
        terms = model.loss(batch)
        loss = sum(terms.values())
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()], terms))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b)
    assert set(results[0][2]) == set(results[1][2]) == {"mse", "query", "neighbor"}
    for name in results[0][2]:
        torch.testing.assert_close(results[0][2][name].detach(), results[1][2][name].detach())


# ---------------------------------------------------------------------------------------------------------------------
# through the AnnData API on toy data


@pytest.fixture(scope="module")
def toy(prepared_toy):
    adata = prepared_toy(0)
    sec = adata.obs["section"].to_numpy()
    return adata[sec == "toy_0"].copy(), adata[sec == "toy_1"].copy()


FIT = {"method": "nh2st", "layer": "targets", "library_key": "section", "progress": False, "device": "cpu"}


# a narrower network than the paper's (embed 512, hidden 1024), at most 60 epochs instead of the recipe's 200 and a
# larger lr (3e-3 instead of 5e-4) keep the fits below a few seconds; the rest is the recipe (Adam, StepLR, batch 8,
# early stopping on the validation Pearson r with patience 20)
TOY = {"max_epochs": 60, "lr": 3e-3, "method_kwargs": {"embed_dim": 64, "hidden_dim": 128, "decoder_dim": 64}}
FIT_CTX = {**FIT, "method": "nh2st_ctx"}


@pytest.fixture(scope="module")
def trained(toy):
    train, _ = toy
    return st.tl.fit_contrastive(train.copy(), **TOY, **FIT)


def _score(adata, model, key):
    st.tl.predict_expression(adata, model, key_added=key, library_key="section", progress=False)
    genes = adata.var_names[adata.var["informative"].to_numpy()].tolist()
    df = st.tl.score_prediction(adata, layer=key, true_layer="targets", genes=genes, inplace=False)
    return float(df.loc["all", "pcc_all"])


def test_learns_informative_genes_and_beats_shuffled_control(toy, trained):
    train, test = toy
    assert trained.method == "nh2st" and trained.prediction == "regression" and trained.needs_neighbors
    assert trained.config["method_config"]["neighbor_context"] is False
    plan = trained.config["plan"]
    opt = plan["optimizer"]
    assert (opt["name"], opt["lr"], opt["weight_decay"]) == ("adam", 3e-3, 0.0)  # the lr is the test's override
    assert (plan["batch_size"], plan["drop_last"], plan["select_on"], plan["early_stopping_patience"]) == (
        8,
        False,
        "val_pearson_top50",
        20,
    )
    assert (plan["schedule"]["name"], plan["schedule"]["step_size"], plan["schedule"]["gamma"]) == ("step", 50, 0.9)
    hist = trained.history
    assert set(hist["train_components"]) == {"mse", "query", "neighbor"}
    assert hist["train_components"]["mse"][-1] < 0.5 * hist["train_components"]["mse"][0]
    # model selection on the validation Pearson r: the best epoch is the one with the highest r
    n_epochs = len(hist["train_loss"])
    assert len(hist["val_pearson"]) == len(hist["val_loss"]) == n_epochs <= 60
    assert hist["best_epoch"] == int(np.argmax(hist["val_pearson"]))
    if hist["stopped_early"]:
        assert n_epochs - 1 - hist["best_epoch"] == 20
    shuffled = train.copy()
    shuffled.layers["targets"] = shuffled.layers["targets"][np.random.default_rng(0).permutation(shuffled.n_obs)]
    control = st.tl.fit_contrastive(shuffled, **TOY, **FIT)
    q = test.copy()
    real, ctrl = _score(q, trained, "real"), _score(q, control, "shuffled")
    assert np.isfinite(q.layers["real"]).all() and "real_spread" not in q.obs  # regression: no retrieval spread
    assert real > 0.45, real
    assert real > ctrl + 0.3, (real, ctrl)


def test_ctx_variant_learns_and_beats_shuffled_control(toy):
    # sthist's previous NH2ST: the same test as above under the engine's default plan (AdamW, batch 256, early
    # stopping on the validation loss), the decoder reading the neighbour context
    train, test = toy
    model = st.tl.fit_contrastive(train.copy(), **TOY, **FIT_CTX)
    assert model.method == "nh2st_ctx" and model.config["method_config"]["neighbor_context"] is True
    plan = model.config["plan"]
    # the default batch of 256, reduced to the 130 training spots of this small section
    assert (plan["optimizer"]["name"], plan["select_on"]) == ("adamw", "val_loss")
    assert plan["batch_size"] == min(256, model.history["n_train"]) == 130
    assert "val_pearson" not in model.history
    shuffled = train.copy()
    shuffled.layers["targets"] = shuffled.layers["targets"][np.random.default_rng(0).permutation(shuffled.n_obs)]
    control = st.tl.fit_contrastive(shuffled, **TOY, **FIT_CTX)
    q = test.copy()
    real, ctrl = _score(q, model, "real"), _score(q, control, "shuffled")
    assert real > 0.45, real
    assert real > ctrl + 0.3, (real, ctrl)


def test_save_load_round_trip(toy, trained, tmp_path):
    _, test = toy
    trained.save(tmp_path / "nh2st")
    loaded = ContrastiveModel.load(tmp_path / "nh2st", device="cpu")
    assert loaded.method == "nh2st" and loaded.config["method_config"] == trained.config["method_config"]
    a, b = test.copy(), test.copy()
    st.tl.predict_expression(a, trained, library_key="section", progress=False)
    st.tl.predict_expression(b, str(tmp_path / "nh2st"), library_key="section", progress=False)
    np.testing.assert_array_equal(a.layers["predicted"], b.layers["predicted"])


def test_missing_coordinates_raise_and_leave_adata_unchanged(toy, trained):
    train, test = toy
    q = test.copy()
    del q.obsm["spatial"]
    before = q.copy()
    missing = r"method 'nh2st' uses the spots' positions, but adata\.obsm\['spatial'\] is missing"
    with pytest.raises(KeyError, match=missing):
        st.tl.predict_expression(q, trained, library_key="section", progress=False)
    assert set(q.layers) == set(before.layers) and set(q.obsm) == set(before.obsm) and set(q.uns) == set(before.uns)
    assert q.var.equals(before.var) and q.obs.equals(before.obs)

    t = train.copy()
    del t.obsm["spatial"]
    before = t.copy()
    with pytest.raises(KeyError, match=r"method 'nh2st' uses the spots' positions.*obsm\['spatial'\] is missing"):
        st.tl.fit_contrastive(t, max_epochs=1, **FIT)
    assert set(t.obsm) == set(before.obsm) and set(t.uns) == set(before.uns) and set(t.layers) == set(before.layers)


def test_same_seed_same_predictions(toy):
    train, test = toy
    kw = {**FIT, "max_epochs": 3, "method_kwargs": SMALL}
    models = [st.tl.fit_contrastive(train.copy(), random_state=s, **kw) for s in (7, 7, 8)]
    preds = []
    for m in models:
        q = test.copy()
        st.tl.predict_expression(q, m, library_key="section", progress=False)
        preds.append(q.layers["predicted"])
    assert models[0].history["train_loss"] == models[1].history["train_loss"]
    np.testing.assert_array_equal(preds[0], preds[1])
    assert not np.array_equal(preds[0], preds[2])


def test_fine_tuning_the_encoder_runs(tmp_path):
    rng = np.random.default_rng(0)
    n = 24
    images = rng.integers(0, 255, size=(n, 32, 32, 3), dtype=np.uint8)
    expr = rng.gamma(2.0, size=(n, 6)).astype(np.float32)
    coords = np.stack(np.meshgrid(np.arange(6), np.arange(4)), -1).reshape(-1, 2) * 100.0
    m = fit(
        method="nh2st",
        expression=expr,
        genes=[f"g{i}" for i in range(6)],
        images=images,
        coords=coords,
        encoder="resnet18",
        finetune=True,
        batch_size=8,
        max_epochs=2,
        validation_fraction=0.25,
        progress=False,
        device="cpu",
        method_kwargs=SMALL,
    )
    assert m.finetuned and all(np.isfinite(m.history["train_loss"]))
    pred, spread = m.predict(images=images, coords=coords, progress=False, device="cpu")
    assert pred.shape == (n, 6) and np.isfinite(pred).all() and spread is None  # regression: no retrieval spread
    m.save(tmp_path / "ft")
    again = ContrastiveModel.load(tmp_path / "ft").predict(images=images, coords=coords, progress=False, device="cpu")
    np.testing.assert_array_equal(again.expression, pred)
    assert again.spread is None
