"""Tests of the torch engine: encoders, BLEEP, training, retrieval, save/load."""

from __future__ import annotations

import json
import math
import socket
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from sthist._engine import bank
from sthist._engine.data import augment_images, spatial_neighbors
from sthist._engine.encoders import (
    DEFAULT_ENCODER,
    EncoderUnavailableError,
    ImageEncoder,
    build_image_encoder,
    encode_patches,
    encoder_key,
)
from sthist._engine.methods import METHODS, Method, ProjectionHead, get_method, register
from sthist._engine.methods.bleep import BLEEP, FROZEN_FEATURE_RECIPE, BLEEPEarlyStopping, soft_clip_loss
from sthist._engine.model import ContrastiveModel, ModelFileError
from sthist._engine.plan import TrainPlan
from sthist._engine.train import fit

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------------------------------
# synthetic data: image features determine expression


def _synthetic(n=600, d=24, g=40, seed=0):
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n, d)).astype(np.float32)
    z = feats[:, :6] @ rng.normal(size=(6, g))
    expr = (np.log1p(np.exp(z)) + rng.gamma(1.0, 0.05, size=(n, g))).astype(np.float32)
    genes = [f"gene{i}" for i in range(g)]
    return feats, expr, genes


def _gene_r(pred, true):
    p, t = pred - pred.mean(0), true - true.mean(0)
    return (p * t).sum(0) / np.sqrt((p * p).sum(0) * (t * t).sum(0))


# BLEEP's recipe (4 epochs of batch 256) lengthened to 30 epochs of 128 so that the 384 training spots converge
FAST = {"max_epochs": 30, "batch_size": 128, "progress": False, "device": "cpu"}


@pytest.fixture(scope="module")
def problem():
    feats, expr, genes = _synthetic()
    return {"feats": feats, "expr": expr, "genes": genes, "train": np.arange(480), "test": np.arange(480, 600)}


@pytest.fixture(scope="module")
def trained(problem):
    tr = problem["train"]
    return fit(expression=problem["expr"][tr], genes=problem["genes"], features=problem["feats"][tr], **FAST)


# ---------------------------------------------------------------------------------------------------------------------
# BLEEP


def test_soft_clip_loss_matches_hand_computation():
    img = [[1.0, 0.0], [0.5, 0.5], [0.0, 2.0]]
    expr = [[0.0, 1.0], [1.0, 1.0], [2.0, 0.0]]
    temperature = 0.7

    def dot(a, b):
        return sum(x * y for x, y in zip(a, b, strict=True))

    def softmax(row):
        m = max(row)
        e = [math.exp(v - m) for v in row]
        return [v / sum(e) for v in e]

    n = 3
    logits = [[dot(expr[i], img[j]) / temperature for j in range(n)] for i in range(n)]
    sim = [[(dot(img[i], img[j]) + dot(expr[i], expr[j])) / 2 / temperature for j in range(n)] for i in range(n)]
    targets = [softmax(r) for r in sim]
    logits_t = [[logits[j][i] for j in range(n)] for i in range(n)]
    targets_t = [[targets[j][i] for j in range(n)] for i in range(n)]

    def ce(lg, tg):
        out = []
        for lrow, trow in zip(lg, tg, strict=True):
            lse = math.log(sum(math.exp(v) for v in lrow))
            out.append(-sum(t * (v - lse) for v, t in zip(lrow, trow, strict=True)))
        return out

    spots, images = ce(logits, targets), ce(logits_t, targets_t)
    expected = sum((a + b) / 2 for a, b in zip(spots, images, strict=True)) / n
    got = soft_clip_loss(torch.tensor(img, dtype=torch.float64), torch.tensor(expr, dtype=torch.float64), temperature)
    assert float(got) == pytest.approx(expected, rel=1e-12)


def test_soft_clip_loss_is_lowest_for_aligned_pairs():
    rng = torch.Generator().manual_seed(0)
    emb = F.normalize(torch.randn(8, 16, generator=rng), dim=1) * 4
    aligned = soft_clip_loss(emb, emb)
    shuffled = soft_clip_loss(emb, emb[torch.randperm(8, generator=rng)])
    assert aligned < shuffled


def test_projection_head_is_bleeps():
    head = ProjectionHead(5, projection_dim=7, dropout=0.1).eval()
    x = torch.randn(3, 5)
    p = head.projection(x)
    expected = head.layer_norm(head.fc(F.gelu(p)) + p)
    torch.testing.assert_close(head(x), expected)
    assert isinstance(head.dropout, nn.Dropout) and head.dropout.p == 0.1
    model = BLEEP(10, 20)
    assert model.config.projection_dim == 256 and model.config.temperature == 1.0 and model.config.dropout == 0.1
    assert model.embed_image(torch.randn(4, 10)).shape == (4, 256)
    assert model.embed_expression(torch.randn(4, 20)).shape == (4, 256)
    assert BLEEP.prediction == "retrieval" and BLEEP.similarity == "cosine" and not BLEEP.needs_neighbors


def test_bleep_recipe_is_the_authors():
    # BLEEP_main.py: AdamW (lr 1e-3, weight decay 1e-3), batch 256, 4 epochs, 80/20 split, best validation epoch kept
    r = BLEEP.recipe
    assert (r.optimizer.name, r.optimizer.lr, r.optimizer.weight_decay) == ("adamw", 1e-3, 1e-3)
    assert (r.batch_size, r.max_epochs, r.validation_fraction) == (256, 4, 0.2)
    assert (r.early_stopping_patience, r.select_on, r.drop_last) == (None, "val_loss", True)
    assert r.stages == () and r.schedule.name == "constant"
    assert BLEEP.prediction_defaults == {"k": 50, "weighting": "average"}  # BLEEP_inference.ipynb


def test_bleep_es_is_bleep_with_the_frozen_feature_recipe():
    assert get_method("bleep_es") is BLEEPEarlyStopping and issubclass(BLEEPEarlyStopping, BLEEP)
    # sthist's previous BLEEP: the engine's default plan (<= 100 epochs, 10 % validation, early stopping after 10)
    assert BLEEPEarlyStopping.recipe is FROZEN_FEATURE_RECIPE and BLEEPEarlyStopping.recipe == TrainPlan()
    r = BLEEPEarlyStopping.recipe
    assert (r.optimizer.name, r.optimizer.lr, r.optimizer.weight_decay, r.batch_size) == ("adamw", 1e-3, 1e-3, 256)
    assert (r.max_epochs, r.validation_fraction, r.early_stopping_patience, r.select_on) == (100, 0.1, 10, "val_loss")
    # the same model, loss and retrieval as BLEEP
    assert BLEEPEarlyStopping.Config is BLEEP.Config and BLEEPEarlyStopping.loss is BLEEP.loss
    assert BLEEPEarlyStopping.prediction_defaults == BLEEP.prediction_defaults
    assert BLEEPEarlyStopping.similarity == BLEEP.similarity == "cosine"


def test_registry():
    assert get_method("bleep") is BLEEP and METHODS["bleep"] is BLEEP
    with pytest.raises(ValueError, match=r"not a registered method.*'bleep'"):
        get_method("blep")
    with pytest.raises(TypeError, match="Method subclasses"):
        register("x")(dict)
    with pytest.raises(ValueError, match="already registered"):

        @register("bleep")
        class Other(BLEEP):
            pass

    with pytest.raises(
        ValueError, match=r"not options of method 'bleep'; valid: \['dropout', 'projection_dim', 'temperature'\]"
    ):
        BLEEP.make_config({"proj_dim": 3})
    with pytest.raises(ValueError, match="temperature must be > 0"):
        BLEEP.make_config({"temperature": 0})


# ---------------------------------------------------------------------------------------------------------------------
# training and prediction


def test_frozen_training_learns_and_beats_shuffled_control(problem, trained):
    tr, te = problem["train"], problem["test"]
    hist = trained.history
    assert set(hist) >= {"train_loss", "val_loss", "best_epoch", "seconds"}
    # BLEEP's recipe: no early stopping, every epoch runs and the one with the lowest validation loss is kept
    assert len(hist["val_loss"]) == len(hist["train_loss"]) == 30 and not hist["stopped_early"]
    assert min(hist["val_loss"]) < 0.8 * hist["val_loss"][0]
    assert hist["val_loss"][hist["best_epoch"]] == min(hist["val_loss"])
    assert hist["n_train"] + hist["n_val"] == tr.size and hist["n_val"] == 96  # the authors' 80/20 split
    assert hist["train_components"]["clip"] == pytest.approx(hist["train_loss"])

    pred, spread = trained.predict(features=problem["feats"][te], progress=False, device="cpu")
    assert pred.shape == (te.size, len(problem["genes"])) and pred.dtype == np.float32
    assert spread.shape == (te.size,) and (spread >= 0).all()
    r = np.nanmean(_gene_r(pred, problem["expr"][te]))

    rng = np.random.default_rng(1)
    control = fit(
        expression=problem["expr"][tr][rng.permutation(tr.size)],
        genes=problem["genes"],
        features=problem["feats"][tr],
        **FAST,
    )
    pred_c, _ = control.predict(features=problem["feats"][te], progress=False, device="cpu")
    r_c = np.nanmean(_gene_r(pred_c, problem["expr"][te]))
    assert r > 0.6, r
    assert r > r_c + 0.4, (r, r_c)


def test_model_attributes_and_bank(problem, trained):
    tr = problem["train"]
    assert trained.method == "bleep" and trained.prediction == "retrieval" and not trained.needs_neighbors
    assert trained.encoder_spec == DEFAULT_ENCODER and trained.genes == problem["genes"]
    assert trained.bank_embeddings.shape == (tr.size, 256) and trained.bank_expression.shape == (tr.size, 40)
    np.testing.assert_array_equal(trained.bank_expression, problem["expr"][tr])
    np.testing.assert_allclose(
        trained.embed_expression(problem["expr"][tr], device="cpu"), trained.bank_embeddings, atol=1e-6
    )
    emb = trained.embed_images(features=problem["feats"][:5], device="cpu")
    assert emb.shape == (5, 256)
    json.dumps(trained.config)  # JSON-friendly
    # predictions through the bank module directly agree with model.predict
    q = trained.embed_images(features=problem["feats"][:30], device="cpu")
    p1, s1 = bank.retrieve(q, trained.bank_embeddings, trained.bank_expression, k=50, device="cpu")
    p2, s2 = trained.predict(features=problem["feats"][:30], progress=False, device="cpu")
    np.testing.assert_array_equal(p1, p2)
    np.testing.assert_array_equal(s1, s2)


def test_same_seed_same_model_other_seed_differs(problem):
    tr = problem["train"][:300]
    kw = {**FAST, "max_epochs": 4}
    a = fit(expression=problem["expr"][tr], genes=problem["genes"], features=problem["feats"][tr], random_state=3, **kw)
    b = fit(expression=problem["expr"][tr], genes=problem["genes"], features=problem["feats"][tr], random_state=3, **kw)
    c = fit(expression=problem["expr"][tr], genes=problem["genes"], features=problem["feats"][tr], random_state=4, **kw)
    assert a.history["train_loss"] == b.history["train_loss"] and a.history["val_loss"] == b.history["val_loss"]
    np.testing.assert_array_equal(a.bank_embeddings, b.bank_embeddings)
    pa, _ = a.predict(features=problem["feats"][-20:], progress=False, device="cpu")
    pb, _ = b.predict(features=problem["feats"][-20:], progress=False, device="cpu")
    np.testing.assert_array_equal(pa, pb)
    assert not np.array_equal(a.bank_embeddings, c.bank_embeddings)


def test_fit_input_errors(problem):
    feats, expr, genes = problem["feats"][:100], problem["expr"][:100], problem["genes"]
    kw = {"progress": False, "device": "cpu", "max_epochs": 1}
    # BLEEP validates on 20 % of the spots: 80 of the 100 train
    with pytest.raises(ValueError, match=r"the maximum batch size here is 80"):
        fit(expression=expr, genes=genes, features=feats, batch_size=256, **kw)
    with pytest.raises(ValueError, match=r"the maximum batch size here is 90"):
        fit(method="bleep_es", expression=expr, genes=genes, features=feats, batch_size=256, **kw)
    for bad, what in ((np.nan, "NaN or infinite"), (np.inf, "NaN or infinite"), (-1.0, "negative values")):
        e = expr.copy()
        e[3, 2] = bad
        with pytest.raises(ValueError, match=what):
            fit(expression=e, genes=genes, features=feats, batch_size=16, **kw)
    with pytest.raises(ValueError, match="features has 99 rows but expression has 100 spots"):
        fit(expression=expr, genes=genes, features=feats[:99], batch_size=16, **kw)
    with pytest.raises(ValueError, match="genes has 39 names but expression has 40 columns"):
        fit(expression=expr, genes=genes[:-1], features=feats, batch_size=16, **kw)
    with pytest.raises(ValueError, match="gene names must be unique"):
        fit(expression=expr, genes=["a"] * 40, features=feats, batch_size=16, **kw)
    with pytest.raises(ValueError, match=r"exactly one of images= .* or features="):
        fit(expression=expr, genes=genes, batch_size=16, **kw)
    with pytest.raises(ValueError, match=r"not a registered method; choose one of \[.*'bleep'"):
        fit(method="clip", expression=expr, genes=genes, features=feats, batch_size=16, **kw)
    with pytest.raises(ValueError, match=r"finetune=True .* needs images="):
        fit(expression=expr, genes=genes, features=feats, finetune=True, batch_size=16, **kw)
    with pytest.raises(ValueError, match="leaves 1 validation spots"):
        fit(expression=expr, genes=genes, features=feats, validation_fraction=0.01, batch_size=16, **kw)
    with pytest.raises(ValueError, match=r"valid: \['dropout', 'projection_dim', 'temperature'\]"):
        fit(expression=expr, genes=genes, features=feats, batch_size=16, method_kwargs={"dim": 3}, **kw)
    with pytest.raises(ValueError, match="coords must have shape"):
        fit(expression=expr, genes=genes, features=feats, coords=np.zeros((5, 2)), batch_size=16, **kw)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 2"):
        fit(expression=expr, genes=genes, features=feats, batch_size=1, **kw)
    images = np.zeros((100, 16, 16, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="weight-free and has nothing to fine-tune"):
        fit(expression=expr, genes=genes, images=images, finetune=True, batch_size=16, **kw)
    with pytest.raises(ValueError, match="dtype uint8"):
        fit(expression=expr, genes=genes, images=images.astype(np.float32), batch_size=16, **kw)


def test_bleep_es_stops_early_on_a_tenth_of_the_spots(problem):
    tr = problem["train"]
    m = fit(
        method="bleep_es",
        expression=problem["expr"][tr],
        genes=problem["genes"],
        features=problem["feats"][tr],
        **{**FAST, "max_epochs": 200},
    )
    hist = m.history
    assert m.method == "bleep_es" and hist["n_val"] == 48
    assert m.config["plan"]["early_stopping_patience"] == 10
    # stopped 10 epochs after the best validation loss, long before 200 epochs; the best epoch is kept
    assert hist["stopped_early"] and len(hist["val_loss"]) == hist["best_epoch"] + 11 < 200
    assert hist["val_loss"][hist["best_epoch"]] == min(hist["val_loss"])
    pred, _ = m.predict(features=problem["feats"][problem["test"]], progress=False, device="cpu")
    assert np.nanmean(_gene_r(pred, problem["expr"][problem["test"]])) > 0.6


def test_no_validation_keeps_last_epoch(problem):
    tr = problem["train"][:200]
    m = fit(
        expression=problem["expr"][tr],
        genes=problem["genes"],
        features=problem["feats"][tr],
        validation_fraction=0.0,
        **{**FAST, "max_epochs": 3},
    )
    assert m.history["val_loss"] == [] and m.history["best_epoch"] == 2 and len(m.history["train_loss"]) == 3


def test_predict_input_errors(problem, trained):
    with pytest.raises(ValueError, match="exactly one of images="):
        trained.predict(progress=False)
    with pytest.raises(ValueError, match="trained on 24-d features"):
        trained.predict(features=np.zeros((3, 5), dtype=np.float32), progress=False)
    with pytest.raises(ValueError, match="weighting='nearest' is not valid"):
        trained.predict(features=problem["feats"][:3], weighting="nearest", progress=False)
    with pytest.raises(ValueError, match=r"k=1000 is larger than the reference bank \(480 spots\)"):
        trained.predict(features=problem["feats"][:3], k=1000, progress=False, device="cpu")
    with pytest.raises(ValueError, match="model has 40 genes"):
        trained.embed_expression(problem["expr"][:3, :5])


# ---------------------------------------------------------------------------------------------------------------------
# save / load


def test_save_load_round_trip(problem, trained, tmp_path):
    folder = tmp_path / "model"
    trained.save(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["bank.safetensors", "config.json", "model.safetensors"]
    loaded = ContrastiveModel.load(folder, device="cpu")
    assert loaded.genes == trained.genes and loaded.method == "bleep" and loaded.encoder_spec == trained.encoder_spec
    assert loaded.history["train_loss"] == trained.history["train_loss"]
    assert loaded.config["method_config"] == trained.config["method_config"]
    np.testing.assert_array_equal(loaded.bank_embeddings, trained.bank_embeddings)
    np.testing.assert_array_equal(loaded.bank_expression, trained.bank_expression)
    x = problem["feats"][problem["test"]]
    for weighting in ("average", "distance", "softmax"):
        a = trained.predict(features=x, weighting=weighting, progress=False, device="cpu")
        b = loaded.predict(features=x, weighting=weighting, progress=False, device="cpu")
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    doc = json.loads((folder / "config.json").read_text())
    assert doc["format"] == "sthist.ContrastiveModel" and doc["format_version"] == 2
    raw = (folder / "model.safetensors").read_bytes() + (folder / "bank.safetensors").read_bytes()
    assert b"pickle" not in raw and not raw.startswith(b"\x80")


def _corrupt(folder, what):
    if what == "missing config":
        (folder / "config.json").unlink()
    elif what == "bad json":
        (folder / "config.json").write_text("{not json")
    elif what == "tampered weights":
        data = bytearray((folder / "model.safetensors").read_bytes())
        data[-5] ^= 0xFF
        (folder / "model.safetensors").write_bytes(bytes(data))
    elif what == "truncated bank":
        data = (folder / "bank.safetensors").read_bytes()
        (folder / "bank.safetensors").write_bytes(data[: len(data) // 2])
    elif what == "missing bank":
        (folder / "bank.safetensors").unlink()
    elif what == "genes mismatch":
        doc = json.loads((folder / "config.json").read_text())
        doc["genes"] = doc["genes"][:-1]
        (folder / "config.json").write_text(json.dumps(doc))
    elif what == "shape mismatch":
        doc = json.loads((folder / "config.json").read_text())
        doc["config"]["method_config"]["projection_dim"] = 128
        (folder / "config.json").write_text(json.dumps(doc))
    elif what == "newer version":
        doc = json.loads((folder / "config.json").read_text())
        doc["format_version"] = 99
        (folder / "config.json").write_text(json.dumps(doc))
    elif what == "wrong format":
        (folder / "config.json").write_text(json.dumps({"format": "something-else"}))


@pytest.mark.parametrize(
    ("what", "message"),
    [
        ("missing config", "has no config.json"),
        ("bad json", "not valid JSON"),
        ("tampered weights", "model.safetensors was modified or corrupted"),
        ("truncated bank", "bank.safetensors was modified or corrupted"),
        ("missing bank", "lacks bank.safetensors"),
        ("genes mismatch", "lists 39 genes, expected 40"),
        ("shape mismatch", "does not fit the configured model"),
        ("newer version", "newer sthist"),
        ("wrong format", "not an sthist model description"),
    ],
)
def test_load_rejects_damaged_folders(trained, tmp_path, what, message):
    folder = tmp_path / "m"
    trained.save(folder)
    _corrupt(folder, what)
    with pytest.raises(ModelFileError, match=message) as err:
        ContrastiveModel.load(folder)
    assert str(folder) in str(err.value)


def test_load_missing_folder(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist or is not a folder"):
        ContrastiveModel.load(tmp_path / "nothing")


# ---------------------------------------------------------------------------------------------------------------------
# retrieval


def test_chunked_retrieval_equals_unchunked(monkeypatch):
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(203, 8)).astype(np.float32)
    keys[50:60] = keys[5]  # exact ties across tiles
    values = rng.gamma(2.0, size=(203, 6)).astype(np.float32)
    query = np.concatenate([rng.normal(size=(37, 8)), keys[[5, 7]]]).astype(np.float32)
    one_tile = {}
    for sim in ("cosine", "dot"):
        one_tile[sim] = bank.topk_search(query, keys, 12, similarity=sim, device="cpu")
        for weighting in ("average", "distance", "softmax"):
            one_tile[sim, weighting] = bank.retrieve(
                query, keys, values, k=12, similarity=sim, weighting=weighting, device="cpu"
            )
    # tiny tiles: 10 query tiles x 26 bank tiles, merged by the running top-k
    monkeypatch.setattr(bank, "_tile_sizes", lambda device: (4, 8))
    for sim in ("cosine", "dot"):
        s_full, i_full = one_tile[sim]
        for chunk_size in (1, 7, 10_000):
            s_chunk, i_chunk = bank.topk_search(query, keys, 12, similarity=sim, chunk_size=chunk_size, device="cpu")
            np.testing.assert_array_equal(i_full, i_chunk)
            np.testing.assert_allclose(s_full, s_chunk, rtol=1e-6, atol=1e-7)
        s_a, _ = bank.topk_search(query, keys, 12, similarity=sim, chunk_size=5, device="cpu")
        np.testing.assert_array_equal(s_a, s_chunk)  # same tiles -> bit-identical, whatever chunk_size
        for weighting in ("average", "distance", "softmax"):
            a = bank.retrieve(
                query, keys, values, k=12, similarity=sim, weighting=weighting, chunk_size=3, device="cpu"
            )
            b = bank.retrieve(
                query, keys, values, k=12, similarity=sim, weighting=weighting, chunk_size=10_000, device="cpu"
            )
            np.testing.assert_array_equal(a[0], b[0])
            np.testing.assert_array_equal(a[1], b[1])
            full = one_tile[sim, weighting]
            np.testing.assert_allclose(a[0], full[0], rtol=1e-5)
            if weighting == "average":  # depends on the indices only
                np.testing.assert_array_equal(a[0], full[0])
    # against a brute-force search: best first, ties to the lower index
    qn = query / np.linalg.norm(query, axis=1, keepdims=True)
    kn = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    s, i = bank.topk_search(query, keys, 12, chunk_size=7, device="cpu")
    sims = qn @ kn.T
    for row in range(query.shape[0]):
        order = sorted(range(keys.shape[0]), key=lambda j: (-round(float(sims[row, j]), 5), j))[:12]
        assert i[row].tolist() == order
        np.testing.assert_allclose(s[row], sims[row, order], rtol=1e-5, atol=1e-6)
    assert i[-2, :11].tolist() == [5, *range(50, 60)]  # the query equal to keys[5] finds its 11 copies first


def test_retrieval_aggregation_formulas():
    rng = np.random.default_rng(1)
    keys = rng.normal(size=(30, 4)).astype(np.float32)
    values = rng.gamma(2.0, size=(30, 3)).astype(np.float32)
    query = rng.normal(size=(2, 4)).astype(np.float32)
    sims, idx = bank.topk_search(query, keys, 5, device="cpu")
    pred, spread = bank.retrieve(query, keys, values, k=5, weighting="average", device="cpu")
    np.testing.assert_allclose(pred, values[idx].mean(1), rtol=1e-5)
    np.testing.assert_allclose(spread, values[idx].std(1).mean(1), rtol=1e-5)
    pred, _ = bank.retrieve(query, keys, values, k=5, weighting="softmax", temperature=0.5, device="cpu")
    w = np.exp(sims / 0.5)
    w /= w.sum(1, keepdims=True)
    np.testing.assert_allclose(pred, (w[..., None] * values[idx]).sum(1), rtol=1e-5)
    pred, _ = bank.retrieve(query, keys, values, k=5, weighting="distance", device="cpu")
    d = np.abs(keys[idx] - query[:, None]).sum(-1)
    w = 1 / d**2
    w /= w.sum(1, keepdims=True)
    np.testing.assert_allclose(pred, (w[..., None] * values[idx]).sum(1), rtol=1e-5)
    with pytest.raises(ValueError, match="query embeddings have width 4 but the bank has width 3"):
        bank.retrieve(query, keys[:, :3], values, k=5)


# ---------------------------------------------------------------------------------------------------------------------
# encoders


@pytest.fixture
def no_network(monkeypatch):
    """Simulate a machine without internet: sockets refuse to connect and the Hugging Face hub is offline."""
    import huggingface_hub.constants as hf_constants

    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)


def _patches(n=6, size=32, seed=0):
    rng = np.random.default_rng(seed)
    base = np.array([200, 120, 190], dtype=np.float64)  # pink, eosin-like
    img = base + rng.normal(0, 25, size=(n, size, size, 3))
    img[:, ::6, ::6] = [80, 40, 140]  # dark purple dots: nuclei
    return img.clip(0, 255).astype(np.uint8)


def test_default_encoder_is_weight_free_hed_fast():
    enc = build_image_encoder()
    assert isinstance(enc, ImageEncoder) and enc.spec == DEFAULT_ENCODER == "hed-fast"
    assert enc.weight_free and enc.input_size is None and enc.mean == (0.0, 0.0, 0.0)
    p = _patches()
    a = encode_patches(enc, p, progress=False, device="cpu", batch_size=4)
    b = encode_patches(build_image_encoder(), p, progress=False, device="cpu")
    assert a.shape == (6, enc.out_dim) and a.dtype == np.float32 and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    # more nuclei -> more haematoxylin: the H-density features go up
    dense = p.copy()
    dense[:, ::3, ::3] = [80, 40, 140]
    c = encode_patches(enc, dense, progress=False, device="cpu")
    assert (c[:, 0] > a[:, 0]).all()  # mean haematoxylin density
    assert not np.allclose(a[0], a[1])
    with pytest.raises(ValueError, match="dtype uint8"):
        encode_patches(enc, p.astype(np.float32) / 255, progress=False)
    with pytest.raises(ValueError, match=r"shape \(n, S, S, 3\)"):
        encode_patches(enc, p[..., :2], progress=False)
    with pytest.raises(ValueError, match="at least 8 x 8"):
        encode_patches(enc, p[:, :4, :4], progress=False)


def test_timm_encoders_random_init_is_deterministic():
    a = build_image_encoder("resnet18", pretrained=False)
    b = build_image_encoder("resnet18", pretrained=False)
    assert a.out_dim == 512 and a.input_size is None and a.mean == pytest.approx((0.485, 0.456, 0.406))
    p = _patches(n=2)
    np.testing.assert_array_equal(
        encode_patches(a, p, progress=False, device="cpu"), encode_patches(b, p, progress=False, device="cpu")
    )
    vit = build_image_encoder("vit_tiny_patch16_224", pretrained=False)
    assert vit.input_size == 224  # ViTs with a fixed input size get patches resized to it
    assert encode_patches(vit, p, progress=False, device="cpu").shape == (2, vit.out_dim) == (2, 192)
    assert build_image_encoder("test_vit", pretrained=False).input_size is None  # dynamic image size: no resizing
    assert encoder_key("hf-hub:MahmoodLab/UNI") == "uni" and encoder_key("resnet50.a1_in1k") == "resnet50_a1_in1k"


def test_encoder_spec_errors():
    with pytest.raises(ValueError, match=r"neither 'hed-texture', a timm model name.*Similar names: \[.*'resnet18'"):
        build_image_encoder("resnet1")
    with pytest.raises(ValueError, match="non-empty string"):
        build_image_encoder("")
    with pytest.raises(ValueError, match="weight-free and takes no checkpoint"):
        build_image_encoder("hed-texture", checkpoint="x.safetensors")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_image_encoder("resnet18", checkpoint="/nonexistent/weights.safetensors")


def test_pretrained_download_failure_is_clear(no_network):
    with pytest.raises(EncoderUnavailableError) as err:
        build_image_encoder("resnet18", pretrained=True)
    msg = str(err.value)
    assert "'resnet18'" in msg and "pretrained=False" in msg and "checkpoint=" in msg and "'hed-texture'" in msg
    with pytest.raises(EncoderUnavailableError) as err:
        build_image_encoder("hf-hub:MahmoodLab/uni", pretrained=True)
    msg = str(err.value)
    assert "gated" in msg and "HF_TOKEN" in msg and "huggingface-cli login" in msg and "'hed-texture'" in msg


def test_checkpoint_loading(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(123)
    import timm

    src = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    state = src.state_dict()
    p = _patches(n=3)
    x = torch.from_numpy(p).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = src((x - mean) / std).numpy()

    st = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(st))
    enc = build_image_encoder("resnet18", checkpoint=st)
    assert enc.checkpoint == str(st.resolve()) and len(enc.checkpoint_sha256) == 64
    np.testing.assert_allclose(encode_patches(enc, p, progress=False, device="cpu"), expected, rtol=1e-5, atol=1e-5)

    # a BLEEP-style .pt file: DDP "module." prefix, image encoder under "image_encoder.model.", extra head tensors
    pt = tmp_path / "best.pt"
    bleep_like = {f"module.image_encoder.model.{k}": v for k, v in state.items()}
    bleep_like["module.image_projection.projection.weight"] = torch.zeros(256, 512)
    torch.save({"state_dict": bleep_like}, pt)
    enc = build_image_encoder("resnet18", checkpoint=pt)
    np.testing.assert_allclose(encode_patches(enc, p, progress=False, device="cpu"), expected, rtol=1e-5, atol=1e-5)

    with pytest.raises(ValueError, match="does not match the architecture 'resnet34'"):
        build_image_encoder("resnet34", checkpoint=st)
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"state_dict": state, "config": _Opaque()}, unsafe)
    with pytest.raises(ValueError, match="never unpickles code"):
        build_image_encoder("resnet18", checkpoint=unsafe)
    bad = tmp_path / "w.onnx"
    bad.write_bytes(b"x")
    with pytest.raises(ValueError, match="unknown file type"):
        build_image_encoder("resnet18", checkpoint=bad)


class _Opaque:
    """An arbitrary Python object: torch.load(weights_only=True) must refuse to unpickle it."""


# ---------------------------------------------------------------------------------------------------------------------
# images: frozen encoding on the fly and fine-tuning


def _image_problem(n=48, size=32, seed=0):
    rng = np.random.default_rng(seed)
    p = _patches(n=n, size=size, seed=seed)
    expr = rng.gamma(2.0, size=(n, 10)).astype(np.float32)
    return p, expr, [f"g{i}" for i in range(10)]


def test_frozen_mode_from_images_recomputes_features(tmp_path):
    p, expr, genes = _image_problem()
    m = fit(expression=expr, genes=genes, images=p, batch_size=16, max_epochs=2, progress=False, device="cpu")
    assert m.config["mode"] == "frozen" and not m.finetuned
    feats = encode_patches(build_image_encoder(), p, progress=False, device="cpu")
    a = m.predict(images=p, k=5, progress=False, device="cpu")
    b = m.predict(features=feats, k=5, progress=False, device="cpu")
    np.testing.assert_array_equal(a[0], b[0])
    m.save(tmp_path / "m")
    loaded = ContrastiveModel.load(tmp_path / "m")
    np.testing.assert_array_equal(loaded.predict(images=p, k=5, progress=False, device="cpu")[0], a[0])


def test_cached_timm_features_can_be_recomputed_from_images():
    # features cached earlier (as sthist.pp.embed_patches does) with a randomly initialised timm encoder
    p, expr, genes = _image_problem(n=24)
    feats = encode_patches(build_image_encoder("resnet18", pretrained=False), p, progress=False, device="cpu")
    m = fit(
        expression=expr, genes=genes, features=feats, encoder="resnet18", batch_size=8, max_epochs=2, progress=False
    )
    assert m.encoder_spec == "resnet18" and m.config["encoder"]["out_dim"] == 512
    a = m.predict(features=feats, k=3, progress=False, device="cpu")[0]
    b = m.predict(images=p, k=3, progress=False, device="cpu")[0]
    np.testing.assert_array_equal(a, b)
    wrong = fit(expression=expr, genes=genes, features=feats[:, :20], batch_size=8, max_epochs=1, progress=False)
    with pytest.raises(ValueError, match="gives 68-d features but the model was trained on 20-d features"):
        wrong.predict(images=p, progress=False)


def test_finetuning_resnet18_runs_and_saves_encoder(tmp_path):
    p, expr, genes = _image_problem(n=24)
    init = build_image_encoder("resnet18", pretrained=False)
    m = fit(
        expression=expr,
        genes=genes,
        images=p,
        encoder="resnet18",
        finetune=True,
        batch_size=8,
        max_epochs=2,
        validation_fraction=0.25,
        progress=False,
        device="cpu",
    )
    assert m.finetuned and m.config["mode"] == "finetune" and m.config["image_dim"] == 512
    assert len(m.history["train_loss"]) == 2 and all(np.isfinite(m.history["train_loss"]))
    trained_w = m._net.encoder.backbone.conv1.weight.detach()
    assert not torch.equal(trained_w, init.backbone.conv1.weight)  # the encoder was trained
    a = m.predict(images=p, k=3, progress=False, device="cpu")
    m.save(tmp_path / "ft")
    loaded = ContrastiveModel.load(tmp_path / "ft", device="cpu")
    np.testing.assert_array_equal(loaded.predict(images=p, k=3, progress=False, device="cpu")[0], a[0])
    with pytest.raises(ValueError, match="fine-tuned its image encoder"):
        m.predict(features=np.zeros((3, 512), dtype=np.float32), progress=False)


def test_augmentation_is_repeatable_and_label_preserving():
    x = torch.rand(6, 3, 16, 16)
    a = augment_images(x, torch.Generator().manual_seed(0))
    b = augment_images(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert not torch.equal(a, x)
    # flips and rotations only move pixels; without colour change the pixel values are a permutation
    flat = torch.rot90(x, 1, dims=(-2, -1)).flatten(1).sort(dim=1).values
    torch.testing.assert_close(flat, x.flatten(1).sort(dim=1).values)


# ---------------------------------------------------------------------------------------------------------------------
# the method abstraction carries neighbours and regression (for NH2ST-like methods)


def test_spatial_neighbors_within_groups():
    coords = np.array([[0, 0], [1, 0], [3, 0], [0, 0.5], [10, 10], [11, 10]], dtype=float)
    groups = np.array([0, 0, 0, 0, 1, 1])
    nb = spatial_neighbors(coords, groups, 2)
    assert nb[0].tolist() == [3, 1] and nb[2].tolist() == [1, 0]
    assert nb[4].tolist() == [5, -1] and nb[5].tolist() == [4, -1]
    same = spatial_neighbors(np.zeros((4, 2)), None, 3)  # duplicated coordinates: never the spot itself
    assert all(sorted(same[i].tolist()) == sorted(set(range(4)) - {i}) for i in range(4))


@pytest.fixture
def regression_method():
    @dataclass
    class Config:
        n_neighbors: int = 3

    class NeighbourRegression(Method):
        prediction = "regression"
        needs_neighbors = True

        def __init__(self, image_dim, n_genes, config=None):
            super().__init__(image_dim, n_genes, config)
            self.head = nn.Linear(2 * image_dim, n_genes)
            self.expr = nn.Linear(n_genes, 8)
            self.img = nn.Linear(2 * image_dim, 8)

        def _context(self, img_feats, batch):
            m = batch.neighbor_mask.unsqueeze(-1).float()
            mean_nb = (batch.neighbor_img_feats * m).sum(1) / m.sum(1).clamp_min(1)
            return torch.cat([img_feats, mean_nb], dim=1)

        def predict(self, img_feats, batch):
            return self.head(self._context(img_feats, batch))

        def embed_image(self, img_feats, batch):
            return self.img(self._context(img_feats, batch))

        def embed_expression(self, expr, batch):
            return self.expr(expr)

        def loss(self, batch):
            assert batch.neighbor_index.shape == (len(batch), 3) and batch.neighbor_expression is not None
            return {"mse": F.mse_loss(self.predict(batch.img_feats, batch), batch.expression)}

    NeighbourRegression.Config = Config
    register("_test_regression")(NeighbourRegression)
    yield NeighbourRegression
    del METHODS["_test_regression"]


def test_regression_method_with_neighbours(regression_method, tmp_path):
    rng = np.random.default_rng(0)
    n = 120
    coords = rng.uniform(0, 100, size=(n, 2))
    feats = rng.normal(size=(n, 5)).astype(np.float32)
    expr = (feats[:, :3] - feats[:, :3].min()).astype(np.float32)
    genes = ["a", "b", "c"]
    groups = np.repeat(["s1", "s2"], n // 2)
    with pytest.raises(ValueError, match="uses spot coordinates: pass coords="):
        fit(method="_test_regression", expression=expr, genes=genes, features=feats, batch_size=16, progress=False)
    m = fit(
        method="_test_regression",
        expression=expr,
        genes=genes,
        features=feats,
        coords=coords,
        groups=groups,
        batch_size=16,
        max_epochs=40,
        lr=1e-2,
        progress=False,
        device="cpu",
    )
    assert m.prediction == "regression" and m.needs_neighbors
    pred, spread = m.predict(features=feats, coords=coords, groups=groups, progress=False, device="cpu")
    assert pred.shape == (n, 3) and spread is None  # regression: no spread
    assert np.nanmean(_gene_r(pred, expr)) > 0.5
    with pytest.raises(ValueError, match="uses spatial neighbours: pass coords="):
        m.predict(features=feats, progress=False)
    m.save(tmp_path / "reg")
    loaded = ContrastiveModel.load(tmp_path / "reg")
    np.testing.assert_array_equal(
        loaded.predict(features=feats, coords=coords, groups=groups, progress=False, device="cpu")[0], pred
    )
