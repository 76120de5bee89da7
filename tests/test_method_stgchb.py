"""ST-GCHB: graph encoders, DGI, HSIC bottleneck, the authors' three training stages, retrieval through the AnnData
tools; and its ``stgchb_joint`` variant (one joint objective with early stopping, nHSIC in both relevance terms)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree
from torch.nn import functional as F

import sthist as st
import sthist._engine.methods.stgchb as stgchb  # registers "stgchb"
from sthist._engine.data import spatial_neighbors
from sthist._engine.methods import METHODS, Batch, get_method
from sthist._engine.model import ContrastiveModel
from sthist._engine.plan import WHOLE_SECTION, TrainPlan
from sthist._engine.train import fit

torch.set_num_threads(1)

EPOCHS = 30  # stgchb_joint: at most 30 of the engine's 100 epochs keep its fits short
FIT = {"method": "stgchb", "layer": "targets", "library_key": "section", "progress": False}
FIT_JOINT = {**FIT, "method": "stgchb_joint", "max_epochs": EPOCHS}
TERMS = {"align", "dgi_image", "dgi_expression", "hsic"}


@pytest.fixture(scope="module")
def split(toy_split):
    return toy_split(0)


@pytest.fixture(scope="module")
def fitted(split):
    train, _ = split
    train = train.copy()
    # the authors' recipe as it is (50 + 50 epochs of DGI on the whole section, 4 epochs of alignment): a few seconds
    model = st.tl.fit_contrastive(train, **FIT)
    return train, model


@pytest.fixture(scope="module")
def fitted_joint(split):
    train, _ = split
    train = train.copy()
    model = st.tl.fit_contrastive(train, **FIT_JOINT)
    return train, model


def _score(test, model, key):
    st.tl.predict_expression(test, model, library_key="section", key_added=key, progress=False)
    genes = test.var_names[test.var["informative"].to_numpy()].tolist()
    df = st.tl.score_prediction(test, layer=key, true_layer="targets", genes=genes, inplace=False)
    return float(df.loc["all", "pcc_all"])


def _dense(x):
    return x.toarray() if hasattr(x, "toarray") else np.asarray(x)


def _features(adata):
    return np.asarray(adata.obsm["X_hed_fast"], dtype=np.float32)


# ---------------------------------------------------------------------------------------------------------------------
# the pieces


def test_registered_with_paper_defaults():
    cls = get_method("stgchb")
    assert cls is stgchb.STGCHB and METHODS["stgchb"] is cls
    assert cls.prediction == "retrieval" and cls.similarity == "dot"
    assert cls.needs_neighbors and cls.needs_coords and cls.batch_by_group
    cfg = cls.Config()
    assert (cfg.n_neighbors, cfg.radius, cfg.image_hidden_dim, cfg.expression_hidden_dim) == (6, None, 256, 256)
    assert (cfg.projection_dim, cfg.dropout, cfg.temperature, cfg.beta, cfg.sigma) == (128, 0.4, 1.0, 25.0, 10.0)
    assert (cfg.dgi_weight, cfg.hsic_weight) == (1.0, 1.0)
    assert cfg.image_relevance == "hsic"  # the authors' HSIC_loss_image: plain HSIC in the relevance term
    assert cls.prediction_defaults == {"k": 50, "weighting": "average"}
    m = cls(10, 20)
    assert m.n_neighbors == 6
    # the authors' three stages (ST-GCHB.py, models.py)
    recipe = cls.recipe
    assert (recipe.optimizer.name, recipe.optimizer.lr, recipe.optimizer.weight_decay) == ("adamw", 1e-3, 1e-3)
    assert recipe.batch_size == 16
    assert (recipe.validation_fraction, recipe.early_stopping_patience) == (0.0, None)
    assert [s.name for s in recipe.stages] == ["dgi_image", "dgi_expression", "align"]
    dgi_image, dgi_expression, align = recipe.stages
    for stage, module in ((dgi_image, "image_dgi"), (dgi_expression, "expression_dgi")):
        assert (stage.epochs, stage.losses, stage.trainable) == (50, (stage.name,), (module,))
        assert (stage.optimizer.name, stage.optimizer.lr, stage.optimizer.weight_decay) == ("adam", 1e-3, 0.0)
        assert stage.batch_size == WHOLE_SECTION == "section"  # one step per section on its whole graph
    assert (align.epochs, align.losses, align.trainable) == (4, ("align", "hsic"), None)
    assert align.optimizer is None and align.batch_size is None  # the plan's AdamW and batch of 16
    resolved = recipe.resolved_stages()
    assert resolved[2].optimizer == recipe.optimizer and all(s.schedule.name == "constant" for s in resolved)
    # every stage names modules of the model and terms of its loss
    names = {n.split(".")[0] for n, _ in m.named_parameters()}
    assert {"image_dgi", "expression_dgi"} <= names
    assert {t for s in recipe.stages for t in s.losses} == TERMS


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_neighbors": 0}, "n_neighbors must be a positive integer"),
        ({"projection_dim": 2.5}, "projection_dim must be a positive integer"),
        ({"radius": -1.0}, "radius must be None or a positive number"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"sigma": 0}, "sigma must be > 0"),
        ({"beta": -1}, "beta must be >= 0"),
        ({"image_relevance": "nHSIC"}, "image_relevance must be 'hsic' or 'nhsic'"),
        ({"topk": 6}, r"not options of method 'stgchb'; valid: \['beta', 'dgi_weight'"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        stgchb.STGCHB.make_config(kwargs)


def test_hsic_matches_the_trace_formula():
    g = torch.Generator().manual_seed(0)
    x, y, z = torch.randn(9, 4, generator=g), torch.randn(9, 3, generator=g), torch.randn(9, 2, generator=g)
    sigma = 1.7

    def kernel(a):
        d2 = torch.cdist(a.double(), a.double()) ** 2
        return torch.exp(-d2 / sigma**2)

    n = 9
    c = torch.eye(n, dtype=torch.float64) - torch.ones(n, n, dtype=torch.float64) / n

    def ref(a, b):
        return torch.trace(kernel(a) @ c @ kernel(b) @ c) / (n - 1) ** 2

    assert float(stgchb.hsic(x, y, sigma)) == pytest.approx(float(ref(x, y)), rel=1e-5)
    expected_n = ref(x, y) / torch.sqrt((1 + ref(x, x)) * (1 + ref(y, y)))
    assert float(stgchb.nhsic(x, y, sigma)) == pytest.approx(float(expected_n), rel=1e-5)
    hb = stgchb.hsic_bottleneck(x, y, z, beta=25.0, sigma=sigma)
    expected_hb = expected_n - 25.0 * ref(z, y) / torch.sqrt((1 + ref(z, z)) * (1 + ref(y, y)))
    assert float(hb) == pytest.approx(float(expected_hb), rel=1e-5)
    # the authors' image term: plain HSIC(h, e) in the relevance part, the compression part normalised
    hb_plain = stgchb.hsic_bottleneck(x, y, z, beta=25.0, sigma=sigma, relevance="hsic")
    assert float(hb_plain) == pytest.approx(float(expected_n - 25.0 * ref(z, y)), rel=1e-5)
    nh = stgchb.hsic_bottleneck(x, y, z, beta=25.0, sigma=sigma, relevance="nhsic")
    assert float(nh) == pytest.approx(float(expected_hb), rel=1e-5)
    # dependence: a function of x is more dependent on x than independent noise
    assert stgchb.nhsic(x, x[:, :2] * 2, sigma) > stgchb.nhsic(x, y, sigma)


def test_gcn_equals_dense_adjacency_product():
    """The neighbour GCN is PReLU(A X W + b) with the binary kNN adjacency plus self loops (the authors' GCN)."""
    rng = np.random.default_rng(0)
    n, k, d = 15, 4, 5
    coords = rng.uniform(0, 10, size=(n, 2))
    x = torch.as_tensor(rng.normal(size=(n, d)), dtype=torch.float32)
    nb = spatial_neighbors(coords, None, k)
    a = torch.eye(n)
    for i in range(n):
        a[i, nb[i]] = 1.0
    gcn = stgchb.NeighbourGCN(d, 6)
    with torch.no_grad():
        gcn.bias.normal_()
    expected = gcn.act(a @ x @ gcn.fc.weight.T + gcn.bias)
    mask = torch.ones(n, k, dtype=torch.bool)
    torch.testing.assert_close(gcn(x, x[torch.as_tensor(nb)], mask), expected)
    # a missing edge contributes nothing
    mask[0, 0] = False
    a[0, nb[0, 0]] = 0.0
    torch.testing.assert_close(gcn(x, x[torch.as_tensor(nb)], mask)[0], gcn.act(a @ x @ gcn.fc.weight.T + gcn.bias)[0])


def test_corruption_permutes_node_features_consistently():
    rng = np.random.default_rng(1)
    n, k = 12, 3
    nb = torch.as_tensor(spatial_neighbors(rng.uniform(0, 5, size=(n, 2)), None, k))
    feats = torch.arange(n, dtype=torch.float32).unsqueeze(1).repeat(1, 2)  # row i = (i, i)
    idx = torch.arange(0, n, 2)  # half the spots form the batch
    mask = torch.ones(idx.numel(), k, dtype=torch.bool)
    mask[0, -1] = False
    g = torch.Generator().manual_seed(0)
    cx, cnb = stgchb._corrupt(feats[idx], feats[nb[idx]], idx, nb[idx], mask, lambda m: torch.randperm(m, generator=g))
    nodes = sorted(set(idx.tolist()) | set(nb[idx][mask].tolist()))
    mapping = {}
    for node, new in zip(
        idx.tolist() + nb[idx][mask].tolist(), cx[:, 0].tolist() + cnb[mask][:, 0].tolist(), strict=True
    ):
        assert mapping.setdefault(node, new) == new  # one node, one shuffled feature vector wherever it appears
    assert sorted(mapping.values()) == [float(v) for v in nodes]  # a permutation of the subgraph's features
    assert any(mapping[v] != v for v in nodes)
    assert torch.equal(cnb[0, -1], torch.zeros(2))  # missing neighbours stay empty


def _batch(n=40, k=6, d=8, g=12, seed=0):
    rng = np.random.default_rng(seed)
    coords = rng.uniform(0, 100, size=(n, 2))
    nb = spatial_neighbors(coords, None, k)
    x = torch.as_tensor(rng.normal(size=(n, d)), dtype=torch.float32)
    e = torch.as_tensor(rng.gamma(1.0, 1.0, size=(n, g)), dtype=torch.float32)
    t_nb = torch.as_tensor(nb)
    c = torch.as_tensor(coords, dtype=torch.float32)
    return Batch(
        img_feats=x,
        expression=e,
        index=torch.arange(n),
        coords=c,
        neighbor_index=t_nb,
        neighbor_img_feats=x[t_nb],
        neighbor_expression=e[t_nb],
        neighbor_mask=torch.ones(n, k, dtype=torch.bool),
        neighbor_coords=c[t_nb],
    )


def test_loss_components_and_gradients():
    torch.manual_seed(0)
    m = stgchb.STGCHB(8, 12)
    batch = _batch()
    terms = m.loss(batch)
    assert set(terms) == TERMS
    assert all(v.ndim == 0 and torch.isfinite(v) for v in terms.values())
    loss = sum(terms.values())
    assert torch.isfinite(loss)
    loss.backward()
    for name in ("image_dgi.gcn.fc.weight", "expression_dgi.gcn.fc.weight", "image_dgi.disc.weight"):
        assert dict(m.named_parameters())[name].grad.abs().sum() > 0, name
    # evaluation uses a fixed corruption: the validation loss is repeatable
    m.eval()
    with torch.no_grad():
        first, again = m.loss(batch), m.loss(batch)
    assert all(float(first[k]) == float(again[k]) for k in first)

    # the terms are align, dgi_weight * DGI of the image graph, dgi_weight * DGI of the expression graph and
    # hsic_weight * (HSIC bottleneck of the image side + of the expression side); recomputed from the pieces
    # with non-unit weights (same parameters; eval mode: no dropout and the fixed corruption)
    cfg = stgchb.STGCHB.make_config({"dgi_weight": 0.3, "hsic_weight": 2.0})
    assert cfg.image_relevance == "hsic"
    w = stgchb.STGCHB(8, 12, cfg).eval()
    w.load_state_dict(m.state_dict())
    with torch.no_grad():
        got = w.loss(batch)
        perm = w._perm_fn()  # the evaluation permutation, drawn image side first, then expression side
        h_img, mask = w._hidden_image(batch.img_feats, batch)
        c_img, c_img_nb = stgchb._corrupt(
            batch.img_feats, batch.neighbor_img_feats, batch.index, batch.neighbor_index, mask, perm
        )
        dgi_image = w.image_dgi.loss(h_img, w.image_dgi.gcn(c_img, c_img_nb, mask))
        h_expr, _ = w._hidden_expression(batch.expression, batch)
        c_expr, c_expr_nb = stgchb._corrupt(
            batch.expression, batch.neighbor_expression, batch.index, batch.neighbor_index, mask, perm
        )
        dgi_expression = w.expression_dgi.loss(h_expr, w.expression_dgi.gcn(c_expr, c_expr_nb, mask))
        e_img, e_expr = w.image_projection(h_img), w.expression_projection(h_expr)
        align = stgchb.soft_clip_loss(e_img, e_expr, cfg.temperature)
        # the image side with the authors' plain HSIC relevance, the expression side with nHSIC
        hsic_image = stgchb.hsic_bottleneck(
            batch.img_feats, h_img, e_img, beta=cfg.beta, sigma=cfg.sigma, relevance="hsic"
        )
        hsic_image_n = stgchb.hsic_bottleneck(
            batch.img_feats, h_img, e_img, beta=cfg.beta, sigma=cfg.sigma, relevance="nhsic"
        )
        hsic_expression = stgchb.hsic_bottleneck(batch.expression, h_expr, e_expr, beta=cfg.beta, sigma=cfg.sigma)
    assert all(torch.isfinite(v) for v in (dgi_image, dgi_expression, hsic_image, hsic_expression))
    assert float(got["align"]) == pytest.approx(float(align), rel=1e-5)
    assert float(got["dgi_image"]) == pytest.approx(0.3 * float(dgi_image), rel=1e-5)
    assert float(got["dgi_expression"]) == pytest.approx(0.3 * float(dgi_expression), rel=1e-5)
    assert float(got["hsic"]) == pytest.approx(2.0 * float(hsic_image + hsic_expression), rel=1e-5)
    assert float(got["hsic"]) != pytest.approx(2.0 * float(hsic_image_n + hsic_expression), rel=1e-3)
    # the unit-weight model of the same parameters: the same alignment, the weights scale only their terms
    assert float(got["align"]) == pytest.approx(float(first["align"]), rel=1e-5)
    assert float(got["dgi_image"]) == pytest.approx(0.3 * float(first["dgi_image"]), rel=1e-5)
    assert float(got["dgi_expression"]) == pytest.approx(0.3 * float(first["dgi_expression"]), rel=1e-5)
    assert float(got["hsic"]) == pytest.approx(2.0 * float(first["hsic"]), rel=1e-5)
    # image_relevance="nhsic" (the paper's equation, stgchb_joint): nHSIC in both relevance terms
    n_cfg = stgchb.STGCHB.make_config({"dgi_weight": 0.3, "hsic_weight": 2.0, "image_relevance": "nhsic"})
    nm = stgchb.STGCHB(8, 12, n_cfg).eval()
    nm.load_state_dict(m.state_dict())
    with torch.no_grad():
        n_got = nm.loss(batch)
    assert float(n_got["hsic"]) == pytest.approx(2.0 * float(hsic_image_n + hsic_expression), rel=1e-5)
    assert float(n_got["align"]) == pytest.approx(float(align), rel=1e-5)
    # the discriminator term is DGI's BCE: real nodes scored against the summary, corrupted ones as negatives
    h = torch.randn(5, m.config.image_hidden_dim)
    hc = torch.randn(5, m.config.image_hidden_dim)
    s = torch.sigmoid(h.mean(0, keepdim=True)).expand_as(h)
    logits = torch.cat([m.image_dgi.disc(h, s), m.image_dgi.disc(hc, s)]).squeeze(-1)
    ref = F.binary_cross_entropy_with_logits(logits, torch.cat([torch.ones(5), torch.zeros(5)]))
    assert float(m.image_dgi.loss(h, hc)) == pytest.approx(float(ref), rel=1e-5)


def test_dgi_learns_on_a_smooth_graph():
    """Trained alone, DGI separates real from corrupted nodes (loss well below log 2)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    n, k = 60, 6
    coords = rng.uniform(0, 10, size=(n, 2))
    x = torch.as_tensor(np.c_[np.sin(coords), np.cos(coords)] + rng.normal(0, 0.1, size=(n, 4)), dtype=torch.float32)
    t_nb = torch.as_tensor(spatial_neighbors(coords, None, k))
    mask = torch.ones(n, k, dtype=torch.bool)
    dgi = stgchb.GraphInfomax(4, 16)
    opt = torch.optim.Adam(dgi.parameters(), lr=1e-2)
    losses = []
    for _ in range(150):
        cx, cnb = stgchb._corrupt(x, x[t_nb], torch.arange(n), t_nb, mask, lambda m: torch.randperm(m))
        loss = dgi.loss(dgi.gcn(x, x[t_nb], mask), dgi.gcn(cx, cnb, mask))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert np.mean(losses[-10:]) < 0.5 * math.log(2)


def test_radius_drops_long_edges():
    m = stgchb.STGCHB(8, 12, stgchb.STGCHB.make_config({"radius": 15.0})).eval()
    batch = _batch()
    mask = m._edges(batch, "x")
    dist = torch.linalg.vector_norm(batch.neighbor_coords - batch.coords.unsqueeze(1), dim=-1)
    assert torch.equal(mask, dist <= 15.0) and 0 < int(mask.sum()) < mask.numel()
    far = m.embed_image(batch.img_feats, batch)
    batch.neighbor_img_feats = batch.neighbor_img_feats + 100.0 * (~mask).unsqueeze(-1)  # only dropped edges change
    torch.testing.assert_close(m.embed_image(batch.img_feats, batch), far)


def test_embedding_needs_the_graph():
    m = stgchb.STGCHB(8, 12).eval()
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"spatial graph.*coords="):
        m.embed_image(x)
    with pytest.raises(ValueError, match=r"spatial graph.*coords="):
        m.embed_expression(torch.rand(4, 12), Batch(img_feats=x))
    # the neighbours matter: changing them changes the embedding
    batch = _batch()
    a = m.embed_image(batch.img_feats, batch)
    batch.neighbor_img_feats = batch.neighbor_img_feats + 1.0
    assert not torch.allclose(m.embed_image(batch.img_feats, batch), a)


# ---------------------------------------------------------------------------------------------------------------------
# training and prediction through the AnnData tools


def test_learns_informative_genes_and_beats_shuffled_control(split, fitted):
    train, model = fitted
    _, test = split
    test = test.copy()
    assert model.method == "stgchb" and model.prediction == "retrieval" and model.needs_neighbors
    assert model.config["similarity"] == "dot" and model.bank_embeddings.shape == (train.n_obs, 128)
    assert model.config["method_config"]["image_relevance"] == "hsic"
    hist = model.history
    # no validation split: all spots train, every stage runs all its epochs and keeps its last one
    assert hist["n_val"] == 0 and hist["val_loss"] == [] and hist["n_train"] == train.n_obs
    assert [(s["name"], s["epochs"], s["best_epoch"], s["stopped_early"]) for s in hist["stages"]] == [
        ("dgi_image", 50, 49, False),
        ("dgi_expression", 50, 99, False),
        ("align", 4, 103, False),
    ]
    assert len(hist["train_loss"]) == 104
    assert set(hist["train_components"]) == TERMS  # every term is logged in every stage
    assert all(len(v) == len(hist["train_loss"]) for v in hist["train_components"].values())
    # the engine's training loss is the sum of the current stage's terms
    comp = {k: np.asarray(v) for k, v in hist["train_components"].items()}
    loss = np.asarray(hist["train_loss"])
    np.testing.assert_allclose(loss[:50], comp["dgi_image"][:50], rtol=1e-5)
    np.testing.assert_allclose(loss[50:100], comp["dgi_expression"][50:100], rtol=1e-5)
    np.testing.assert_allclose(loss[100:], comp["align"][100:] + comp["hsic"][100:], rtol=1e-5)
    # the image DGI separates real from corrupted nodes (BCE below chance, log 2) by the end of its stage (which
    # modules each stage trains: test_stages_train_their_modules_on_their_batches)
    assert comp["dgi_image"][40:50].mean() < math.log(2)
    assert loss[-1] < loss[100]  # the alignment stage lowers align + hsic
    plan = model.config["plan"]
    assert [(s["name"], s["batch_size"]) for s in plan["stages"]] == [
        ("dgi_image", "section"),
        ("dgi_expression", "section"),
        ("align", None),
    ]
    assert plan["batch_size"] == 16
    assert train.obsm["X_contrastive_image"].shape == (train.n_obs, 128)

    shuffled = train.copy()
    shuffled.layers["targets"] = shuffled.layers["targets"][np.random.default_rng(0).permutation(shuffled.n_obs)]
    control = st.tl.fit_contrastive(shuffled, **FIT)
    real, shuf = _score(test, model, "real"), _score(test, control, "shuffled")
    # the paper's retrieval: plain average of the top 50, capped at a third of this 144-spot bank
    assert model.prediction_settings(k=None)["k"] == 48 and "a third" in model.prediction_settings()["note"]
    assert (test.uns["real"]["params"]["k"], test.uns["real"]["params"]["weighting"]) == (48, "average")
    assert real > 0.4, real
    assert real > shuf + 0.3, (real, shuf)


def test_stages_train_their_modules_on_their_batches(prepared_toy, monkeypatch):
    """Stages 1 and 2: one batch per section (its whole graph), only that DGI module trains; stage 3: batches of 16
    spots of one section, every parameter trains."""
    adata = prepared_toy(0)  # two sections of 144 spots
    seen = []
    original = stgchb.STGCHB.loss

    def spy(self, batch):
        if self.training:
            trainable = sorted({n.split(".")[0] for n, p in self.named_parameters() if p.requires_grad})
            seen.append((tuple(trainable), batch.expression.shape[0], torch.unique(batch.groups).numel()))
        return original(self, batch)

    monkeypatch.setattr(stgchb.STGCHB, "loss", spy)
    model = st.tl.fit_contrastive(adata, **FIT, max_epochs=2)  # every stage 2 epochs
    assert [(s["name"], s["epochs"]) for s in model.history["stages"]] == [
        ("dgi_image", 2),
        ("dgi_expression", 2),
        ("align", 2),
    ]
    assert seen[:4] == [(("image_dgi",), 144, 1)] * 4  # 2 epochs x 2 sections
    assert seen[4:8] == [(("expression_dgi",), 144, 1)] * 4
    align = seen[8:]
    all_modules = tuple(sorted({n.split(".")[0] for n, _ in model.module.named_parameters()}))
    assert len(align) == 2 * 2 * 9  # 2 epochs x 2 sections x 144 / 16
    assert all(t == all_modules and n == 16 and g == 1 for t, n, g in align)
    # the parameters are trainable again after the fit
    assert all(p.requires_grad for p in model.module.parameters())


def test_query_embeddings_use_the_full_section_graph(split, fitted):
    """Image embeddings equal the authors' full-slice computation, whatever the batching."""
    _, model = fitted
    _, test = split
    feats, coords = _features(test), np.asarray(test.obsm["spatial"], dtype=np.float64)
    emb = model.embed_images(features=feats, coords=coords, device="cpu")
    emb_small = model.embed_images(features=feats, coords=coords, batch_size=7, device="cpu")
    np.testing.assert_allclose(emb_small, emb, atol=1e-5)

    m = model.module
    x = model._net.scaler(torch.as_tensor(feats))
    _, nb = cKDTree(coords).query(coords, k=7)  # itself and its 6 nearest spots (`Cal_Spatial_Net`)
    a = torch.zeros(len(feats), len(feats))
    a[torch.arange(len(feats)).unsqueeze(1), torch.as_tensor(nb)] = 1.0
    with torch.no_grad():
        h = m.image_dgi.gcn.act(a @ x @ m.image_dgi.gcn.fc.weight.T + m.image_dgi.gcn.bias)
        ref = m.image_projection(h).numpy()
    np.testing.assert_allclose(emb, ref, atol=1e-4)


def test_save_load_round_trip(split, fitted, tmp_path):
    _, model = fitted
    _, test = split
    kw = {"features": _features(test), "coords": np.asarray(test.obsm["spatial"]), "progress": False, "device": "cpu"}
    pred, spread = model.predict(**kw)
    model.save(tmp_path / "m")
    loaded = ContrastiveModel.load(tmp_path / "m", device="cpu")
    assert loaded.method == "stgchb" and loaded.module.config == model.module.config
    p2, s2 = loaded.predict(**kw)
    np.testing.assert_array_equal(p2, pred)
    np.testing.assert_array_equal(s2, spread)
    # through the AnnData tools, from the folder
    q1, q2 = test.copy(), test.copy()
    st.tl.predict_expression(q1, model, library_key="section", progress=False)
    st.tl.predict_expression(q2, str(tmp_path / "m"), library_key="section", progress=False)
    np.testing.assert_array_equal(q1.layers["predicted"], q2.layers["predicted"])


def test_same_seed_same_model():
    rng = np.random.default_rng(0)
    n = 80
    coords = rng.uniform(0, 1000, size=(n, 2))
    feats = rng.normal(size=(n, 6)).astype(np.float32)
    expr = np.abs(feats[:, :4] + rng.normal(0, 0.1, size=(n, 4))).astype(np.float32)
    groups = np.repeat(["a", "b"], n // 2)
    kw = {
        "method": "stgchb",
        "expression": expr,
        "genes": list("wxyz"),
        "features": feats,
        "coords": coords,
        "groups": groups,
        "max_epochs": 3,
        "batch_size": 32,
        "progress": False,
        "device": "cpu",
    }
    a, b, c = fit(**kw, random_state=3), fit(**kw, random_state=3), fit(**kw, random_state=4)
    np.testing.assert_array_equal(a.bank_embeddings, b.bank_embeddings)
    assert a.history["train_loss"] == b.history["train_loss"]
    pa = a.predict(features=feats, coords=coords, groups=groups, k=5, progress=False, device="cpu")[0]
    pb = b.predict(features=feats, coords=coords, groups=groups, k=5, progress=False, device="cpu")[0]
    np.testing.assert_array_equal(pa, pb)
    assert not np.array_equal(a.bank_embeddings, c.bank_embeddings)


def test_missing_coordinates_raise_and_leave_adata_unchanged(split, fitted):
    _, model = fitted
    train, test = split
    q = test.copy()
    del q.obsm["spatial"]
    before = q.copy()
    with pytest.raises(KeyError, match=r"obsm\['spatial'\] is missing"):
        st.tl.predict_expression(q, model, library_key="section", progress=False)
    assert set(q.layers) == set(before.layers) and set(q.uns) == set(before.uns) and set(q.obs) == set(before.obs)
    assert set(q.var) == set(before.var) and set(q.obsm) == set(before.obsm)

    t = train.copy()
    del t.obsm["spatial"]
    before = t.copy()
    with pytest.raises((KeyError, ValueError), match=r"obsm\['spatial'\] is missing"):
        st.tl.fit_contrastive(t, method="stgchb", layer="targets", library_key="section", max_epochs=1, progress=False)
    assert set(t.obsm) == set(before.obsm) and set(t.uns) == set(before.uns) and set(t.layers) == set(before.layers)
    np.testing.assert_array_equal(_dense(t.layers["targets"]), _dense(before.layers["targets"]))


@pytest.mark.realdata
@pytest.mark.parametrize(
    "fit_kwargs",
    [{"method": "stgchb"}, {"method": "stgchb_joint", "max_epochs": 20}],  # stgchb: the authors' recipe as it is
    ids=["stgchb", "stgchb_joint"],
)
def test_her2st_serial_section(fit_kwargs):
    """Trained on her2st C3, the 50 most expressed genes of the serial section C4 are predicted better than chance."""
    root = Path(__file__).parents[2] / "shared" / "data" / "her2st"
    if not root.is_dir():
        pytest.skip(f"the her2st subset is not at {root}")
    adata = st.datasets.her2st(root, sections=["C3", "C4"], progress=False)
    x = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    adata = adata[:, np.argsort(-x.sum(0))[:50]].copy()
    st.pp.normalize_expression(adata)
    st.pp.extract_patches(adata, patch_size=64, library_key="section", progress=False)
    st.pp.embed_patches(adata, progress=False)
    sec = adata.obs["section"].to_numpy()
    train, test = adata[sec == "C3"].copy(), adata[sec == "C4"].copy()
    model = st.tl.fit_contrastive(train, layer="targets", library_key="section", progress=False, **fit_kwargs)
    st.tl.predict_expression(test, model, library_key="section", progress=False)
    df = st.tl.score_prediction(test, layer="predicted", true_layer="targets", inplace=False)
    assert np.isfinite(test.layers["predicted"]).all()
    assert float(df.loc["all", "pcc_all"]) > 0.1


# ---------------------------------------------------------------------------------------------------------------------
# stgchb_joint: sthist's previous ST-GCHB (one joint objective, early stopping, nHSIC in both relevance terms)


def test_joint_variant_registered_with_the_previous_behaviour():
    cls = get_method("stgchb_joint")
    assert cls is stgchb.STGCHBJoint and METHODS["stgchb_joint"] is cls and issubclass(cls, stgchb.STGCHB)
    assert cls.needs_neighbors and cls.needs_coords and cls.batch_by_group and cls.similarity == "dot"
    # the engine's default plan: one stage of all terms, AdamW 1e-3, batch 256, early stopping on 10 % of the spots
    assert cls.recipe == TrainPlan()
    recipe = cls.recipe
    assert recipe.stages == () and [s.losses for s in recipe.resolved_stages()] == [None]
    assert (recipe.optimizer.name, recipe.optimizer.lr) == ("adamw", 1e-3)
    assert (recipe.batch_size, recipe.max_epochs) == (256, 100)
    assert (recipe.validation_fraction, recipe.early_stopping_patience, recipe.select_on) == (0.1, 10, "val_loss")
    cfg = cls.Config()
    assert cfg.image_relevance == "nhsic"
    default = stgchb.STGCHB.Config()
    assert {**vars(cfg), "image_relevance": "hsic"} == vars(default)


def test_joint_variant_learns_informative_genes_and_beats_shuffled_control(split, fitted_joint):
    train, model = fitted_joint
    _, test = split
    test = test.copy()
    assert model.method == "stgchb_joint" and model.config["method_config"]["image_relevance"] == "nhsic"
    hist = model.history
    assert min(hist["val_loss"]) < hist["val_loss"][0]
    assert [s["name"] for s in hist["stages"]] == ["main"] and len(hist["train_loss"]) <= EPOCHS
    assert set(hist["train_components"]) == TERMS
    assert all(len(v) == len(hist["train_loss"]) for v in hist["train_components"].values())
    # one joint objective: the engine's training loss is the sum of all terms
    total = np.sum([hist["train_components"][k] for k in sorted(TERMS)], axis=0)
    np.testing.assert_allclose(total, hist["train_loss"], rtol=1e-5)

    shuffled = train.copy()
    shuffled.layers["targets"] = shuffled.layers["targets"][np.random.default_rng(0).permutation(shuffled.n_obs)]
    control = st.tl.fit_contrastive(shuffled, **FIT_JOINT)
    real, shuf = _score(test, model, "real"), _score(test, control, "shuffled")
    assert real > 0.4, real
    assert real > shuf + 0.3, (real, shuf)


def test_joint_variant_batches_hold_one_section_and_all_modules_train(prepared_toy, monkeypatch):
    adata = prepared_toy(0)
    seen = []
    original = stgchb.STGCHB.loss

    def spy(self, batch):
        if self.training:
            seen.append((all(p.requires_grad for p in self.parameters()), torch.unique(batch.groups).numel()))
        return original(self, batch)

    monkeypatch.setattr(stgchb.STGCHB, "loss", spy)
    st.tl.fit_contrastive(adata, **{**FIT_JOINT, "max_epochs": 2})
    assert len(seen) == 4 and set(seen) == {(True, 1)}  # 2 epochs x 2 sections (fewer than 256 spots each)
