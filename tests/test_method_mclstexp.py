"""mclSTExp: Transformer over a set of spots with position embeddings, CLIP loss, 1/d^2 retrieval; and its
``mclstexp_section`` variant (sets are single sections, early stopping, ``k`` capped at a third of the bank)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import sthist as st
from sthist._engine.methods import get_method
from sthist._engine.methods._base import Batch, Method

# importing the module registers "mclstexp" (until the registry imports it itself)
from sthist._engine.methods.mclstexp import (
    RECOMMENDED_K,
    RECOMMENDED_WEIGHTING,
    MclSTExp,
    MclSTExpSection,
    clip_loss,
    grid_positions,
    quantized_unit,
    recommended_k,
)
from sthist._engine.model import ContrastiveModel, retrieval_settings
from sthist._engine.plan import TrainPlan

torch.set_num_threads(1)

FIT = {"method": "mclstexp", "layer": "targets", "library_key": "section", "batch_size": 64, "progress": False}
FIT_SECTION = {**FIT, "method": "mclstexp_section"}


@pytest.fixture(scope="module")
def prepared(prepared_toy):
    return prepared_toy(0)


@pytest.fixture(scope="module")
def split(toy_split):
    return toy_split(0)


@pytest.fixture(scope="module")
def fitted(split):
    train, _ = split
    return st.tl.fit_contrastive(train.copy(), max_epochs=30, **FIT)


@pytest.fixture(scope="module")
def fitted_section(split):
    train, _ = split
    return st.tl.fit_contrastive(train.copy(), max_epochs=30, **FIT_SECTION)


def _predict(test, model, key="p", n_reference=144, k=None):
    if k is None:
        k = recommended_k(n_reference)  # the bank holds the 144 spots of toy_0: all of them (k = min(200, n))
    st.tl.predict_expression(
        test, model, k=k, weighting=RECOMMENDED_WEIGHTING, key_added=key, library_key="section", progress=False
    )
    return test.layers[key]


def _dense(x):
    return x.toarray() if hasattr(x, "toarray") else np.asarray(x)


def _informative_r(test, key):
    inf = test.var["informative"].to_numpy()
    df = st.tl.score_prediction(
        test, layer=key, true_layer="targets", genes=test.var_names[inf].tolist(), inplace=False
    )
    return float(df.loc["all", "pcc_all"])


# ---------------------------------------------------------------------------------------------------------------------
# the pieces


def test_registered_with_paper_defaults():
    assert get_method("mclstexp") is MclSTExp
    assert MclSTExp.prediction == "retrieval" and MclSTExp.similarity == "cosine"
    assert MclSTExp.needs_coords and not MclSTExp.needs_neighbors
    # the authors' shuffled DataLoader: batches mix the training sections; the bank is embedded in sets of 32
    assert not MclSTExp.batch_by_group and MclSTExp.expression_set_size == 32
    cfg = MclSTExp.Config()
    assert (cfg.projection_dim, cfg.temperature, cfg.n_layers, cfg.n_heads, cfg.head_dim) == (256, 1.0, 2, 8, 64)
    assert cfg.mlp_dim is None and cfg.dropout == 0.0 and cfg.n_positions == 256
    recipe = MclSTExp.recipe
    assert (recipe.optimizer.lr, recipe.batch_size, recipe.max_epochs) == (1e-4, 128, 90)
    # the authors' train.py: Adam with L2 weight decay 1e-3, no validation, the last epoch kept, no dropped batch
    assert (recipe.optimizer.name, recipe.optimizer.weight_decay) == ("adam", 1e-3)
    assert (recipe.validation_fraction, recipe.early_stopping_patience, recipe.drop_last) == (0.0, None, False)
    assert recipe.stages == () and recipe.schedule.name == "constant"
    assert (RECOMMENDED_K, RECOMMENDED_WEIGHTING) == (200, "distance")
    # the top 200 of any bank (all of a smaller one), not capped at a third
    assert MclSTExp.prediction_defaults == {"k": 200, "weighting": "distance", "max_k_fraction": 1.0}
    assert retrieval_settings(MclSTExp.prediction_defaults, 10_000, None, None) == (200, "distance", None)
    assert retrieval_settings(MclSTExp.prediction_defaults, 551, None, None) == (200, "distance", None)
    k, weighting, note = retrieval_settings(MclSTExp.prediction_defaults, 144, None, None)
    assert (k, weighting) == (144, "distance") and note.startswith("k reduced to 144") and "144 reference" in note
    m = MclSTExp(10, 30)
    assert len(m.spot_encoder) == 2 and m.spot_encoder[0].ff[0].out_features == 30  # mlp_dim = n_genes
    assert m.x_embed.weight.shape == m.y_embed.weight.shape == (256, 30)
    assert m.spot_encoder[0].attn.qkv.bias is None and m.spot_encoder[0].attn.qkv.out_features == 3 * 8 * 64


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_heads": 0}, "n_heads must be a positive integer"),
        ({"n_positions": 2.5}, "n_positions must be a positive integer"),
        ({"mlp_dim": -3}, "mlp_dim must be a positive integer"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"temperature": 0}, "temperature must be > 0"),
        ({"heads": 4}, r"not options of method 'mclstexp'; valid: \[.*'n_heads'"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MclSTExp.make_config(kwargs)


def test_recommended_k():
    assert recommended_k(10_000) == 200
    assert recommended_k(551) == 200
    assert recommended_k(144) == 144  # a bank of fewer than 200 spots: all of them
    assert recommended_k(2) == 2
    assert recommended_k(1) == 1
    with pytest.raises(ValueError, match="empty"):
        recommended_k(0)


def test_clip_loss_matches_hand_computation():
    img = [[1.0, 0.0], [0.5, 0.5], [0.0, 2.0]]
    spot = [[0.0, 1.0], [1.0, 1.0], [2.0, 0.0]]
    t = 0.5
    n = 3
    logits = [[sum(a * b for a, b in zip(spot[i], img[j], strict=True)) / t for j in range(n)] for i in range(n)]

    def ce(rows):
        return sum(math.log(sum(math.exp(v) for v in r)) - r[i] for i, r in enumerate(rows)) / n

    expected = (ce(logits) + ce([[logits[j][i] for j in range(n)] for i in range(n)])) / 2
    got = clip_loss(torch.tensor(img, dtype=torch.float64), torch.tensor(spot, dtype=torch.float64), t)
    assert float(got) == pytest.approx(expected, rel=1e-12)
    emb = F.normalize(torch.randn(8, 16, generator=torch.Generator().manual_seed(0)), dim=1) * 4
    assert clip_loss(emb, emb) < clip_loss(emb, emb.roll(1, dims=0))


def _structure_ok(pos, rows, cols, *, jittered=False):
    """Every spot its own (x, y); x increasing along a grid row; y increasing with the row (constant along a row
    unless positions are jittered)."""
    assert len({tuple(p) for p in pos}) == len(pos)
    urows = np.unique(rows)
    if not jittered:
        assert all(np.unique(pos[rows == r, 1]).size == 1 for r in urows)
    assert all(pos[rows == a, 1].max() < pos[rows == b, 1].min() for a, b in itertools.pairwise(urows))
    for r in urows:
        order = np.argsort(cols[rows == r])
        assert (np.diff(pos[rows == r, 0][order]) > 0).all()


def test_quantized_unit():
    # half the pitch rounded down to a power of 2 ** (1 / 8)
    for pitch in (100.0, 137.2, 288.4, 290.0, 4000.0):
        unit = quantized_unit(pitch)
        assert pitch / 2 / 2 ** (1 / 8) < unit <= pitch / 2
        assert math.log2(unit) * 8 == pytest.approx(round(math.log2(unit) * 8), abs=1e-9)
    assert quantized_unit(288.4) == quantized_unit(290.0)  # the pitch measured in different her2st sets


def test_grid_positions_on_visium_grid(prepared):
    sec = prepared.obs["section"].to_numpy() == "toy_0"
    xy = prepared.obsm["spatial"][sec]
    rows, cols = prepared.obs["array_row"].to_numpy()[sec], prepared.obs["array_col"].to_numpy()[sec]
    pos = grid_positions(torch.tensor(xy, dtype=torch.float32)).numpy()
    assert pos.dtype == np.int64 and ((pos >= 0) & (pos < 256)).all()
    _structure_ok(pos, rows, cols)
    # about half a pitch: horizontally adjacent Visium spots (two array columns apart) are 2 or 3 indices apart
    same_row = (rows[:, None] == rows[None]) & (cols[None] - cols[:, None] == 2)
    i, j = np.nonzero(same_row)
    assert set(np.unique(pos[j, 0] - pos[i, 0])) <= {2, 3}
    # the same in any set holding part of the section
    half = np.random.default_rng(0).permutation(len(xy))[: len(xy) // 2]
    np.testing.assert_array_equal(grid_positions(torch.tensor(xy[half], dtype=torch.float32)).numpy(), pos[half])
    # another image resolution: the same structure
    _structure_ok(grid_positions(torch.tensor(xy * 2.7, dtype=torch.float32)).numpy(), rows, cols)


def test_grid_positions_square_grid_jitter_wrap_and_degenerate():
    rng = np.random.default_rng(0)
    gx, gy = np.meshgrid(np.arange(30), np.arange(20))
    rows, cols = gy.ravel(), gx.ravel()
    xy = np.c_[cols, rows] * 290.7 + 5000 + rng.normal(0, 10, size=(600, 2))
    # two stray spots close to others (e.g. a mis-registered spot) do not change the pitch
    xy_stray = np.r_[xy, xy[:2] + np.array([60.0, 0.0])]
    pos = grid_positions(torch.tensor(xy, dtype=torch.float32), n_positions=512).numpy()
    _structure_ok(pos, rows, cols, jittered=True)
    steps = np.diff(pos.reshape(20, 30, 2)[:, :, 0], axis=1)  # adjacent spots about two half-pitches apart
    assert set(np.unique(steps)) <= {1, 2, 3} and 1.95 < steps.mean() < 2.2
    np.testing.assert_array_equal(
        grid_positions(torch.tensor(xy_stray, dtype=torch.float32), n_positions=512)[:600].numpy(), pos
    )
    wrapped = grid_positions(torch.tensor(xy, dtype=torch.float32), n_positions=16).numpy()
    np.testing.assert_array_equal(wrapped, pos % 16)
    # an exact duplicate does not break the pitch; one spot or identical spots give index 0
    dup = np.r_[xy, xy[:1]]
    np.testing.assert_array_equal(
        grid_positions(torch.tensor(dup, dtype=torch.float32), n_positions=512)[:-1].numpy(), pos
    )
    assert grid_positions(torch.tensor(xy[:1], dtype=torch.float32)).tolist() == [[0, 0]]
    assert grid_positions(torch.tensor(np.zeros((3, 2)), dtype=torch.float32)).abs().sum() == 0


def test_prepare_coords_gives_whole_section_grid_indices():
    rng = np.random.default_rng(0)
    gx, gy = np.meshgrid(np.arange(12), np.arange(10))
    a = np.c_[gx.ravel(), gy.ravel()] * 290.0 + 3000 + rng.normal(0, 5, size=(120, 2))
    b = np.c_[gx.ravel(), gy.ravel()] * 137.0 + 800 + rng.normal(0, 3, size=(120, 2))  # another resolution
    coords, groups = np.r_[a, b], np.r_[np.zeros(120, int), np.ones(120, int)]
    out = MclSTExp.prepare_coords(coords, groups)
    assert out.shape == (240, 2) and out.dtype == np.float32
    # the indices of grid_positions over each whole section (its own pitch), as exact floats
    for g, xy in ((0, a), (1, b)):
        # unwrapped (the model wraps them modulo its own n_positions)
        ref = grid_positions(torch.tensor(xy, dtype=torch.float64), 2**24).numpy()
        np.testing.assert_array_equal(out[groups == g], ref.astype(np.float32))
    # a spot's index does not depend on the order or the company of the other spots of the data set
    perm = rng.permutation(240)
    np.testing.assert_array_equal(MclSTExp.prepare_coords(coords[perm], groups[perm]), out[perm])
    # no groups: one section; no coordinates: none
    np.testing.assert_array_equal(MclSTExp.prepare_coords(a, None), out[:120])
    assert MclSTExp.prepare_coords(None, groups) is None
    # the base class leaves coordinates as they are
    assert Method.prepare_coords(coords, groups) is coords


def test_n_positions_of_the_model_wraps_the_indices():
    # a wide section: 300 columns at a 100 px pitch give indices up to ~600 (two per pitch)
    gx, gy = np.meshgrid(np.arange(300), np.arange(3))
    xy = np.c_[gx.ravel(), gy.ravel()] * 100.0
    pos = MclSTExp.prepare_coords(xy, None)
    assert pos[:, 0].max() > 512  # not wrapped by prepare_coords
    torch.manual_seed(0)
    expr = torch.rand(len(xy), 12)
    for n_positions in (256, 1024):
        m = MclSTExp(6, 12, MclSTExp.make_config({"n_positions": n_positions})).eval()
        batch = Batch(img_feats=torch.zeros(len(xy), 6), expression=expr, coords=torch.tensor(pos))
        wrapped = Batch(img_feats=batch.img_feats, expression=expr, coords=torch.tensor(pos % n_positions))
        with torch.no_grad():
            torch.testing.assert_close(m.embed_expression(expr, batch), m.embed_expression(expr, wrapped))
    # with 1024 rows, spots 150 pitches apart (300 indices) keep distinct rows; with 256 they would share some
    idx = torch.tensor(pos).long()[:, 0]
    assert len(torch.unique(idx % 1024)) == len(torch.unique(idx)) > len(torch.unique(idx % 256))


def test_expression_side_is_set_level_image_side_is_not():
    torch.manual_seed(0)
    m = MclSTExp(6, 12).eval()
    xy = np.array([[0.0, 0.0], [100.0, 0.0], [50.0, 86.6], [150.0, 86.6], [200.0, 0.0]])
    coords = torch.tensor(MclSTExp.prepare_coords(xy, None))  # batches carry the grid indices of prepare_coords
    expr, feats = torch.rand(5, 12), torch.randn(5, 6)
    full = m.embed_expression(expr, Batch(img_feats=feats, expression=expr, coords=coords))
    sub = m.embed_expression(expr[:3], Batch(img_feats=feats[:3], expression=expr[:3], coords=coords[:3]))
    assert full.shape == (5, 256)
    assert not torch.allclose(full[:3], sub, atol=1e-4)  # context of the other spots matters
    moved = m.embed_expression(expr, Batch(img_feats=feats, expression=expr, coords=coords + 3.0))
    assert not torch.allclose(full, moved, atol=1e-4)  # positions matter
    # the batch's coordinates are read as indices (mod n_positions): the position embeddings of those rows
    wrapped = m.embed_expression(expr, Batch(img_feats=feats, expression=expr, coords=coords + 256.0))
    torch.testing.assert_close(wrapped, full)
    pos = coords.long()
    h = expr + m.x_embed(pos[:, 0]) + m.y_embed(pos[:, 1])
    torch.testing.assert_close(full, m.spot_projection(m.spot_encoder(h.unsqueeze(0)).squeeze(0)))
    img = m.embed_image(feats, Batch(img_feats=feats))  # no coordinates needed
    torch.testing.assert_close(img, m.embed_image(feats, Batch(img_feats=feats, coords=coords)))
    with pytest.raises(ValueError, match=r"needs the spots' coordinates: pass coords="):
        m.embed_expression(expr, Batch(img_feats=feats, expression=expr))


# ---------------------------------------------------------------------------------------------------------------------
# through the AnnData layer


def test_learns_and_beats_shuffled_control(split, fitted):
    train, test = split
    assert fitted.method == "mclstexp" and fitted.bank_embeddings.shape == (train.n_obs, 256)
    # no validation split: every spot trains, the last epoch is kept
    h = fitted.history
    assert h["n_val"] == 0 and h["n_train"] == train.n_obs and h["val_loss"] == []
    assert len(h["train_loss"]) == 30 and h["best_epoch"] == 29 and not h["stopped_early"]
    assert h["train_loss"][-1] < h["train_loss"][0]
    plan = fitted.config["plan"]
    assert (plan["optimizer"]["name"], plan["drop_last"], plan["validation_fraction"]) == ("adam", False, 0.0)
    shuffled = train.copy()
    shuffled.layers["targets"] = shuffled.layers["targets"][np.random.default_rng(0).permutation(shuffled.n_obs)]
    control = st.tl.fit_contrastive(shuffled, max_epochs=30, **FIT)
    # the paper's default k = min(200, n) retrieves all 144 spots of this small bank, weighted by 1 / d^2: a smooth
    # average (r ~ 0.49 when written, the shuffled control ~ -0.06); a local retrieval (k = 48, a third of the bank,
    # the previous default) shows the ranking the joint space has learned (r ~ 0.68, control ~ 0.01)
    scores = {}
    for k in (None, 48):
        real, ctrl = test.copy(), test.copy()
        _predict(real, fitted, k=k)
        _predict(ctrl, control, k=k)
        scores[k] = (_informative_r(real, "p"), _informative_r(ctrl, "p"))
    assert scores[None][0] > 0.4, scores
    assert scores[None][0] > scores[None][1] + 0.3, scores
    assert scores[48][0] > 0.5, scores
    assert scores[48][0] > scores[48][1] + 0.3, scores
    # predict_expression's default k is the paper's (all of the bank here, not capped at a third)
    t = test.copy()
    st.tl.predict_expression(t, fitted, key_added="d", library_key="section", progress=False)
    assert (t.uns["d"]["params"]["k"], t.uns["d"]["params"]["weighting"]) == (144, "distance")
    np.testing.assert_array_equal(t.layers["d"], _predict(test.copy(), fitted))


def _training_batches(adata, fit, monkeypatch, **kwargs):
    """(n_sections, n_spots) of every training batch of a one-epoch fit (validation batches are not trained on)."""
    seen = []
    original = MclSTExp.loss

    def spy(self, batch):
        if self.training:
            seen.append((torch.unique(batch.groups).numel(), batch.expression.shape[0]))
        return original(self, batch)

    monkeypatch.setattr(MclSTExp, "loss", spy)
    st.tl.fit_contrastive(adata.copy(), max_epochs=1, **{**fit, **kwargs})
    return seen


def test_training_batches_mix_sections(prepared, monkeypatch):
    # the authors' shuffled DataLoader over all training sections, the incomplete last batch kept
    seen = _training_batches(prepared, FIT, monkeypatch)
    assert len(seen) == 5 and sum(n for _, n in seen) == prepared.n_obs  # 288 spots, no validation, none dropped
    assert max(n for _, n in seen) <= 64
    assert all(sections == 2 for sections, _ in seen)


def test_grid_indices_do_not_depend_on_the_batch(prepared, monkeypatch):
    # every batch carries the spots' indices on their whole section's grid, whichever spots share the batch
    ref = MclSTExp.prepare_coords(prepared.obsm["spatial"], prepared.obs["section"].to_numpy())
    seen = []
    original = MclSTExp.loss

    def spy(self, batch):
        seen.append((batch.index.cpu().numpy(), batch.coords.cpu().numpy()))
        return original(self, batch)

    monkeypatch.setattr(MclSTExp, "loss", spy)
    st.tl.fit_contrastive(prepared.copy(), max_epochs=2, **FIT)
    assert sum(idx.size for idx, _ in seen) == 2 * prepared.n_obs
    for idx, coords in seen:
        np.testing.assert_array_equal(coords, ref[idx])


def _record_set_sizes(monkeypatch) -> list[int]:
    """The sizes of the sets ``MclSTExp.embed_expression`` is called on from now on (appended as it runs)."""
    sizes: list[int] = []
    original = MclSTExp.embed_expression

    def spy(self, expr, batch=None):
        sizes.append(expr.shape[0])
        return original(self, expr, batch)

    monkeypatch.setattr(MclSTExp, "embed_expression", spy)
    return sizes


def test_bank_is_embedded_in_sets_of_32(split, fitted, monkeypatch):
    train, _ = split
    sizes = _record_set_sizes(monkeypatch)
    emb = fitted.embed_expression(
        train.layers["targets"],
        coords=train.obsm["spatial"],
        groups=train.obs["section"].to_numpy(),
        batch_size=256,  # the caller's batch size does not matter: the method's set size does
    )
    assert max(sizes) <= 32 and sum(sizes) == train.n_obs and len(sizes) == -(-train.n_obs // 32)
    # the bank was built the same way
    np.testing.assert_allclose(emb, fitted.bank_embeddings, rtol=1e-5, atol=1e-6)


def test_predict_needs_no_query_coordinates(split, fitted):
    _, test = split
    with_xy = _predict(test.copy(), fitted)
    no_xy = test.copy()
    del no_xy.obsm["spatial"]
    np.testing.assert_array_equal(_predict(no_xy, fitted), with_xy)


def test_save_load_round_trip(split, fitted, tmp_path):
    _, test = split
    fitted.save(tmp_path / "m")
    loaded = ContrastiveModel.load(tmp_path / "m", device="cpu")
    assert loaded.method == "mclstexp" and loaded.config["method_config"]["n_positions"] == 256
    np.testing.assert_array_equal(loaded.bank_embeddings, fitted.bank_embeddings)
    np.testing.assert_array_equal(_predict(test.copy(), loaded), _predict(test.copy(), fitted))
    np.testing.assert_array_equal(_predict(test.copy(), tmp_path / "m"), _predict(test.copy(), fitted))


def test_same_seed_same_model(split):
    train, _ = split
    a = st.tl.fit_contrastive(train.copy(), max_epochs=3, random_state=3, **FIT)
    b = st.tl.fit_contrastive(train.copy(), max_epochs=3, random_state=3, **FIT)
    c = st.tl.fit_contrastive(train.copy(), max_epochs=3, random_state=4, **FIT)
    np.testing.assert_array_equal(a.bank_embeddings, b.bank_embeddings)
    assert not np.allclose(a.bank_embeddings, c.bank_embeddings)


@pytest.mark.parametrize(
    ("mutate", "kwargs", "match"),
    [
        (
            lambda a: a.obsm.pop("spatial"),
            {},
            r"method 'mclstexp' uses the spots' positions.*obsm\['spatial'\] is missing",
        ),
        (lambda a: None, {"method_kwargs": {"n_heads": 0}}, "n_heads must be a positive integer"),
        (lambda a: None, {"method_kwargs": {"pitch": 100}}, "not options of method 'mclstexp'"),
    ],
)
def test_bad_input_leaves_adata_unchanged(split, mutate, kwargs, match):
    adata = split[0].copy()
    mutate(adata)
    before = adata.copy()
    with pytest.raises((KeyError, ValueError), match=match):
        st.tl.fit_contrastive(adata, **{**FIT, "max_epochs": 1, **kwargs})
    assert set(adata.obsm) == set(before.obsm) and set(adata.uns) == set(before.uns)
    assert set(adata.layers) == set(before.layers) and adata.obs.equals(before.obs)
    for key in before.obsm:
        np.testing.assert_array_equal(adata.obsm[key], before.obsm[key])
    np.testing.assert_array_equal(_dense(adata.layers["targets"]), _dense(before.layers["targets"]))


# ---------------------------------------------------------------------------------------------------------------------
# mclstexp_section: sthist's previous mclSTExp (sets are sections, early stopping, k capped at a third)


def test_section_variant_registered_with_the_previous_behaviour():
    assert get_method("mclstexp_section") is MclSTExpSection and issubclass(MclSTExpSection, MclSTExp)
    assert MclSTExpSection.batch_by_group and MclSTExpSection.expression_set_size is None
    assert MclSTExpSection.needs_coords and MclSTExpSection.similarity == "cosine"
    recipe = MclSTExpSection.recipe
    assert (recipe.optimizer.name, recipe.optimizer.lr, recipe.optimizer.weight_decay) == ("adamw", 1e-4, 1e-3)
    assert (recipe.batch_size, recipe.max_epochs) == (128, 90)
    # the engine's default validation split and early stopping
    default = TrainPlan()
    assert (recipe.validation_fraction, recipe.early_stopping_patience, recipe.select_on, recipe.drop_last) == (
        default.validation_fraction,
        default.early_stopping_patience,
        "val_loss",
        True,
    )
    assert recipe.stages == () and recipe.schedule.name == "constant"
    # k = 200 with 1/d^2 weights, capped at a third of small banks
    assert MclSTExpSection.prediction_defaults == {"k": 200, "weighting": "distance"}
    assert retrieval_settings(MclSTExpSection.prediction_defaults, 10_000, None, None) == (200, "distance", None)
    k, _, note = retrieval_settings(MclSTExpSection.prediction_defaults, 551, None, None)
    assert k == 183 and "a third of the 551" in note
    assert MclSTExpSection.Config is MclSTExp.Config


def test_section_variant_training_batches_hold_one_section(prepared, monkeypatch):
    seen = _training_batches(prepared, FIT_SECTION, monkeypatch)
    assert len(seen) >= 4 and {sections for sections, _ in seen} == {1}


def test_section_variant_learns_and_beats_shuffled_control(split, fitted_section):
    train, test = split
    m = fitted_section
    assert m.method == "mclstexp_section" and m.bank_embeddings.shape == (train.n_obs, 256)
    assert m.history["n_val"] > 0
    assert m.history["val_loss"][m.history["best_epoch"]] < m.history["val_loss"][0]
    # a default k is a third of the 144-spot bank
    settings = m.prediction_settings()
    assert (settings["k"], settings["weighting"]) == (48, "distance") and "a third" in settings["note"]
    t = test.copy()
    st.tl.predict_expression(t, m, key_added="p", library_key="section", progress=False)
    assert t.uns["p"]["params"]["k"] == 48
    real = _informative_r(t, "p")
    shuffled = train.copy()
    shuffled.layers["targets"] = shuffled.layers["targets"][np.random.default_rng(0).permutation(shuffled.n_obs)]
    control = st.tl.fit_contrastive(shuffled, max_epochs=30, **FIT_SECTION)
    t = test.copy()
    st.tl.predict_expression(t, control, key_added="p", library_key="section", progress=False)
    ctrl = _informative_r(t, "p")
    assert real > 0.5, real
    assert real > ctrl + 0.3, (real, ctrl)


def test_section_variant_bank_uses_the_callers_batches(split, fitted_section, monkeypatch):
    train, _ = split
    sizes = _record_set_sizes(monkeypatch)
    fitted_section.embed_expression(
        train.layers["targets"], coords=train.obsm["spatial"], groups=train.obs["section"].to_numpy(), batch_size=256
    )
    assert sizes == [train.n_obs]  # one section of 144 spots, one set
