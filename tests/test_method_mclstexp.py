"""mclSTExp: Transformer over a section's spots with position embeddings, CLIP loss, 1/d^2 retrieval."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import sthist as st
from sthist._engine.methods import get_method
from sthist._engine.methods._base import Batch

# importing the module registers "mclstexp" (until the registry imports it itself)
from sthist._engine.methods.mclstexp import (
    RECOMMENDED_K,
    RECOMMENDED_WEIGHTING,
    MclSTExp,
    clip_loss,
    grid_positions,
    quantized_unit,
    recommended_k,
)
from sthist._engine.model import ContrastiveModel

torch.set_num_threads(1)

FIT = {"method": "mclstexp", "layer": "targets", "library_key": "section", "batch_size": 64, "progress": False}


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


def _predict(test, model, key="p", n_reference=144):
    k = recommended_k(n_reference)  # the bank holds the 144 spots of toy_0
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
    assert MclSTExp.batch_by_group and not MclSTExp.needs_neighbors
    cfg = MclSTExp.Config()
    assert (cfg.projection_dim, cfg.temperature, cfg.n_layers, cfg.n_heads, cfg.head_dim) == (256, 1.0, 2, 8, 64)
    assert cfg.mlp_dim is None and cfg.dropout == 0.0 and cfg.n_positions == 256
    recipe = MclSTExp.recipe
    assert (recipe.optimizer.lr, recipe.batch_size, recipe.max_epochs) == (1e-4, 128, 90)
    # the authors' AdamW; weight decay is the engine's default (1e-3), as before
    assert (recipe.optimizer.name, recipe.optimizer.weight_decay) == ("adamw", 1e-3)
    assert recipe.stages == () and recipe.schedule.name == "constant" and recipe.select_on == "val_loss"
    assert (RECOMMENDED_K, RECOMMENDED_WEIGHTING) == (200, "distance")
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
    assert recommended_k(551) == 183
    assert recommended_k(2) == 1
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


def test_expression_side_is_set_level_image_side_is_not():
    torch.manual_seed(0)
    m = MclSTExp(6, 12).eval()
    coords = torch.tensor([[0.0, 0.0], [100.0, 0.0], [50.0, 86.6], [150.0, 86.6], [200.0, 0.0]])
    expr, feats = torch.rand(5, 12), torch.randn(5, 6)
    full = m.embed_expression(expr, Batch(img_feats=feats, expression=expr, coords=coords))
    sub = m.embed_expression(expr[:3], Batch(img_feats=feats[:3], expression=expr[:3], coords=coords[:3]))
    assert full.shape == (5, 256)
    assert not torch.allclose(full[:3], sub, atol=1e-4)  # context of the other spots matters
    moved = m.embed_expression(expr, Batch(img_feats=feats, expression=expr, coords=coords + 100.0))
    assert not torch.allclose(full, moved, atol=1e-4)  # positions matter
    img = m.embed_image(feats, Batch(img_feats=feats))  # no coordinates needed
    torch.testing.assert_close(img, m.embed_image(feats, Batch(img_feats=feats, coords=coords)))
    with pytest.raises(ValueError, match=r"needs the spots' coordinates: pass coords="):
        m.embed_expression(expr, Batch(img_feats=feats, expression=expr))


# ---------------------------------------------------------------------------------------------------------------------
# through the AnnData layer


def test_learns_and_beats_shuffled_control(split, fitted):
    train, test = split
    assert fitted.method == "mclstexp" and fitted.bank_embeddings.shape == (train.n_obs, 256)
    assert fitted.history["val_loss"][fitted.history["best_epoch"]] < fitted.history["val_loss"][0]
    t = test.copy()
    _predict(t, fitted)
    real = _informative_r(t, "p")
    shuffled = train.copy()
    shuffled.layers["targets"] = shuffled.layers["targets"][np.random.default_rng(0).permutation(shuffled.n_obs)]
    control = st.tl.fit_contrastive(shuffled, max_epochs=30, **FIT)
    t = test.copy()
    _predict(t, control)
    ctrl = _informative_r(t, "p")
    assert real > 0.5, real
    assert real > ctrl + 0.3, (real, ctrl)


def test_training_batches_hold_one_section(prepared, monkeypatch):
    seen = []
    original = MclSTExp.loss

    def spy(self, batch):
        seen.append(torch.unique(batch.groups).numel())
        return original(self, batch)

    monkeypatch.setattr(MclSTExp, "loss", spy)
    st.tl.fit_contrastive(prepared.copy(), max_epochs=1, **FIT)
    assert len(seen) >= 4 and set(seen) == {1}


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
