"""CMRCNet: loss, reconstruction branch, training through `sthist.tl`, save/load, determinism, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import sthist as st
import sthist._engine.methods.cmrcnet  # registers "cmrcnet" until the registry imports it
from sthist._engine.methods import METHODS, Batch, get_method
from sthist._engine.methods.bleep import soft_clip_loss
from sthist._engine.methods.cmrcnet import CMRCNet, soft_clip_loss_per_spot
from sthist._engine.model import ContrastiveModel

torch.set_num_threads(1)

HER2ST = Path(__file__).parents[2] / "shared" / "data" / "her2st"
# a small network for the toy data (the defaults are the paper's, 256-d tokens)
SMALL = {"projection_dim": 32, "n_image_tokens": 4, "n_gene_tokens": 4}
FIT = {"method": "cmrcnet", "layer": "targets", "library_key": "section", "progress": False}


def _dense(x):
    return x.toarray() if hasattr(x, "toarray") else np.asarray(x)


def _anndata_equal(a, b) -> None:
    assert a.shape == b.shape
    np.testing.assert_array_equal(_dense(a.X), _dense(b.X))
    assert a.obs.equals(b.obs) and a.var.equals(b.var)
    assert sorted(a.obsm) == sorted(b.obsm) and sorted(a.layers) == sorted(b.layers) and sorted(a.uns) == sorted(b.uns)
    for k in a.obsm:
        np.testing.assert_array_equal(_dense(a.obsm[k]), _dense(b.obsm[k]))
    for k in a.layers:
        np.testing.assert_array_equal(_dense(a.layers[k]), _dense(b.layers[k]))


@pytest.fixture(scope="module")
def split(toy_split):
    return toy_split(1)


@pytest.fixture(scope="module")
def trained(split):
    train, _ = split
    train = train.copy()
    # the paper's training settings (lr 1e-4, batch 64, at most 60 epochs) come from CMRCNet.recipe
    model = st.tl.fit_contrastive(train, method_kwargs=SMALL, random_state=0, **FIT)
    return train, model


# ---------------------------------------------------------------------------------------------------------------------
# the module


def test_registered_with_paper_defaults():
    assert get_method("cmrcnet") is CMRCNet and METHODS["cmrcnet"] is CMRCNet
    assert CMRCNet.prediction == "retrieval" and CMRCNet.similarity == "cosine"
    assert not CMRCNet.needs_neighbors and not CMRCNet.needs_coords and not CMRCNet.batch_by_group
    # the authors' config.py / train.py and inference.py
    recipe = CMRCNet.recipe
    assert (recipe.optimizer.name, recipe.optimizer.lr, recipe.optimizer.weight_decay) == ("adamw", 1e-4, 1e-3)
    assert (recipe.batch_size, recipe.max_epochs) == (64, 60)
    assert recipe.stages == () and recipe.schedule.name == "constant" and recipe.select_on == "val_loss"
    assert CMRCNet.prediction_defaults == {"k": 50, "weighting": "average"}
    cfg = CMRCNet.Config()
    assert (cfg.projection_dim, cfg.dropout, cfg.temperature) == (256, 0.1, 1.0)
    assert (cfg.n_gene_tokens, cfg.mask_ratio, cfg.attention_heads, cfg.fusion_heads, cfg.fusion_layers) == (
        8,
        0.5,
        4,
        8,
        2,
    )
    m = CMRCNet(68, 785)
    # the self-normalising gene block of the authors: Linear(g, 2048) -> ELU -> AlphaDropout(0.25), 8 x 256 tokens
    lin, act, drop = m.gene_tokenizer
    assert (lin.in_features, lin.out_features) == (785, 2048)
    assert isinstance(act, torch.nn.ELU) and isinstance(drop, torch.nn.AlphaDropout) and drop.p == 0.25
    assert m.gene_tokens(torch.rand(3, 785)).shape == (3, 8, 256)
    assert m.image_tokens(torch.randn(3, 68)).shape == (3, cfg.n_image_tokens, 256)
    assert m.embed_image(torch.randn(3, 68)).shape == (3, 256)
    assert m.embed_expression(torch.rand(3, 785)).shape == (3, 256)
    assert m.first_attention.num_heads == 4 and m.fusion.attn.num_heads == 8


def test_fusion_block_is_shared_across_passes():
    m = CMRCNet(10, 20, CMRCNet.make_config({**SMALL, "fusion_layers": 2}))
    one = CMRCNet(10, 20, CMRCNet.make_config({**SMALL, "fusion_layers": 1}))
    # the authors' ModuleList holds one block instance twice: two passes, one set of weights
    assert sum(p.numel() for p in m.parameters()) == sum(p.numel() for p in one.parameters())
    calls = []
    m.fusion.register_forward_hook(lambda *_: calls.append(1))
    m.reconstruct(torch.randn(5, 10), torch.rand(5, 20))
    assert len(calls) == 2


def test_soft_clip_loss_per_spot():
    gen = torch.Generator().manual_seed(0)
    img, expr = (
        torch.randn(6, 8, generator=gen, dtype=torch.float64),
        torch.randn(6, 8, generator=gen, dtype=torch.float64),
    )
    per = soft_clip_loss_per_spot(img, expr, 1.0)
    assert per.shape == (6,)
    # at T = 1 its mean is BLEEP's loss
    torch.testing.assert_close(per.mean(), soft_clip_loss(img, expr, 1.0))
    # other temperatures: logits / T, target similarities * T (the authors' models.py)
    t = 0.5
    logits = expr @ img.T / t
    targets = F.softmax((img @ img.T + expr @ expr.T) / 2 * t, dim=-1)
    expected = (-(targets * F.log_softmax(logits, -1)).sum(1) - (targets.T * F.log_softmax(logits.T, -1)).sum(1)) / 2
    torch.testing.assert_close(soft_clip_loss_per_spot(img, expr, t), expected)


def test_loss_is_sum_of_log1p_terms():
    m = CMRCNet(10, 20, CMRCNet.make_config(SMALL)).eval()
    gen = torch.Generator().manual_seed(1)
    batch = Batch(img_feats=torch.randn(7, 10, generator=gen), expression=torch.rand(7, 20, generator=gen))
    torch.manual_seed(3)
    terms = m.loss(batch)
    assert set(terms) == {"contrastive", "reconstruction"}
    loss = sum(terms.values())
    img, spot = m.embed_image(batch.img_feats), m.embed_expression(batch.expression)
    torch.manual_seed(3)  # the same mask
    recon = m.reconstruct(batch.img_feats, batch.expression)
    contrastive = torch.log1p(soft_clip_loss_per_spot(img, spot)).mean()  # log(1 + l) per spot, then the mean
    reconstruction = torch.log1p(((recon - img) ** 2).mean())
    torch.testing.assert_close(loss, contrastive + reconstruction)
    torch.testing.assert_close(terms["contrastive"], contrastive)
    torch.testing.assert_close(terms["reconstruction"], reconstruction)


def test_masking_and_cross_modal_dependence():
    gen = torch.Generator().manual_seed(2)
    x, e = torch.randn(6, 10, generator=gen), torch.rand(6, 20, generator=gen)
    m = CMRCNet(10, 20, CMRCNet.make_config({**SMALL, "mask_ratio": 0.5})).eval()
    # about half of the token values are zeroed: two draws differ
    torch.manual_seed(0)
    a = m.reconstruct(x, e)
    b = m.reconstruct(x, e)
    assert not torch.allclose(a, b)
    captured = []
    m.first_attention.register_forward_hook(lambda mod, args, out: captured.append(args[0]))
    m.reconstruct(torch.randn(200, 10), torch.rand(200, 20))
    zero_share = float((captured[0] == 0).float().mean())
    assert 0.45 < zero_share < 0.55
    # no masking and no dropout in eval mode: deterministic; the reconstruction reads the expression
    m0 = CMRCNet(10, 20, CMRCNet.make_config({**SMALL, "mask_ratio": 0.0})).eval()
    torch.testing.assert_close(m0.reconstruct(x, e), m0.reconstruct(x, e))
    assert not torch.allclose(m0.reconstruct(x, e), m0.reconstruct(x, e.flip(0)))


def test_reconstruction_gradients_reach_image_head_not_expression_head():
    m = CMRCNet(10, 20, CMRCNet.make_config(SMALL))
    x, e = torch.randn(8, 10), torch.rand(8, 20)
    img = m.embed_image(x)
    torch.log1p(F.mse_loss(m.reconstruct(x, e), img)).backward()
    # the target is not detached (as in the authors' code); the expression head is trained by the contrastive loss only
    assert m.image_projection.projection.weight.grad.abs().sum() > 0
    assert m.gene_tokenizer[0].weight.grad.abs().sum() > 0
    assert m.image_tokenizer.weight.grad.abs().sum() > 0
    assert m.spot_projection.projection.weight.grad is None


# ---------------------------------------------------------------------------------------------------------------------
# through sthist.tl


def test_learns_informative_genes_and_beats_shuffled_control(split, trained):
    _, test = split
    train, model = trained
    assert model.method == "cmrcnet" and model.prediction == "retrieval"
    assert train.uns["contrastive"]["params"]["method"] == "cmrcnet"
    assert train.uns["contrastive"]["params"]["config"]["n_image_tokens"] == 4
    assert set(model.history["train_components"]) == {"contrastive", "reconstruction"}
    plan = model.config["plan"]
    assert (plan["optimizer"]["lr"], plan["batch_size"], plan["max_epochs"]) == (1e-4, 64, 60)
    assert [(s["name"], s["epochs"]) for s in plan["stages"]] == [("main", 60)]
    assert train.obsm["X_contrastive_image"].shape == (train.n_obs, 32)
    shuffled = train.copy()
    shuffled.layers["targets"] = shuffled.layers["targets"][np.random.default_rng(0).permutation(shuffled.n_obs)]
    control = st.tl.fit_contrastive(shuffled, method_kwargs=SMALL, random_state=0, **FIT)
    genes = test.var_names[test.var["informative"].to_numpy()].tolist()
    scores = {}
    for name, m in {"real": model, "shuffled": control}.items():
        st.tl.predict_expression(test, m, key_added=name, progress=False)
        df = st.tl.score_prediction(test, layer=name, true_layer="targets", genes=genes, inplace=False)
        scores[name] = df.loc["all", "pcc_all"]
    assert scores["real"] > 0.4
    assert scores["real"] > scores["shuffled"] + 0.3


def test_save_load_round_trip(split, trained, tmp_path):
    _, test = split
    _, model = trained
    model.save(tmp_path / "cmrcnet")
    loaded = ContrastiveModel.load(tmp_path / "cmrcnet")
    assert loaded.method == "cmrcnet" and loaded.config["method_config"] == model.config["method_config"]
    a, b = test.copy(), test.copy()
    st.tl.predict_expression(a, model, progress=False)
    st.tl.predict_expression(b, loaded, progress=False)
    np.testing.assert_array_equal(a.layers["predicted"], b.layers["predicted"])
    np.testing.assert_array_equal(model.bank_embeddings, loaded.bank_embeddings)


def test_same_seed_same_model(split):
    train, test = split
    model, again, other = (
        st.tl.fit_contrastive(train.copy(), max_epochs=5, method_kwargs=SMALL, random_state=seed, **FIT)
        for seed in (0, 0, 1)
    )
    assert again.history["train_loss"] == model.history["train_loss"]
    a, b, c = test.copy(), test.copy(), test.copy()
    for ad, m in ((a, model), (b, again), (c, other)):
        st.tl.predict_expression(ad, m, progress=False)
    np.testing.assert_array_equal(a.layers["predicted"], b.layers["predicted"])
    assert not np.array_equal(a.layers["predicted"], c.layers["predicted"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_tokens": 8}, r"not options of method 'cmrcnet'; valid: \[.*'n_gene_tokens', 'n_image_tokens'"),
        ({"projection_dim": 30}, r"projection_dim=30 must be divisible by attention_heads=4"),
        ({"projection_dim": 36}, r"projection_dim=36 must be divisible by fusion_heads=8"),
        ({"mask_ratio": 1.0}, r"mask_ratio must be in \[0, 1\)"),
        ({"n_image_tokens": 0}, r"n_image_tokens must be a positive integer"),
        ({"fusion_layers": -1}, r"fusion_layers must be a non-negative integer"),
        ({"temperature": 0}, r"temperature must be > 0"),
        ({"dropout": 1.5}, r"dropout must be in \[0, 1\)"),
    ],
)
def test_bad_method_kwargs_raise_and_leave_adata_unchanged(split, kwargs, message):
    train, _ = split
    adata = train.copy()
    before = adata.copy()
    with pytest.raises(ValueError, match=message):
        st.tl.fit_contrastive(adata, max_epochs=1, method_kwargs=kwargs, **FIT)
    _anndata_equal(adata, before)


def test_fusion_layers_zero_skips_the_fusion_block():
    m = CMRCNet(12, 9, CMRCNet.make_config({**SMALL, "fusion_layers": 0}))
    terms = m.loss(Batch(img_feats=torch.randn(4, 12), expression=torch.rand(4, 9)))
    assert set(terms) == {"contrastive", "reconstruction"}
    assert all(t.ndim == 0 and torch.isfinite(t) for t in terms.values())
    assert torch.isfinite(sum(terms.values()))


def test_fine_tuning_trains_the_encoder():
    adata = st.datasets.toy(n_rows=8, n_cols=8, n_genes=20, n_sections=1, seed=2)
    st.pp.extract_patches(adata, patch_size=32, progress=False)
    st.pp.normalize_expression(adata)
    model = st.tl.fit_contrastive(
        adata,
        method="cmrcnet",
        layer="targets",
        finetune=True,
        encoder="resnet18",
        max_epochs=1,
        batch_size=16,
        validation_fraction=0,
        method_kwargs=SMALL,
        progress=False,
    )
    assert model.finetuned and model.config["mode"] == "finetune"
    from sthist._engine.encoders import build_image_encoder

    fresh = build_image_encoder("resnet18", pretrained=False).state_dict()  # the same deterministic initialisation
    tuned = model._net.encoder.state_dict()
    assert any(not torch.equal(tuned[k], fresh[k]) for k in fresh if fresh[k].is_floating_point())
    st.tl.predict_expression(adata, model, progress=False)
    assert np.isfinite(adata.layers["predicted"]).all()


# ---------------------------------------------------------------------------------------------------------------------
# real data


@pytest.mark.realdata
@pytest.mark.filterwarnings("ignore:normalize_expression")
@pytest.mark.skipif(not HER2ST.is_dir(), reason=f"the her2st subset is not at {HER2ST}")
def test_her2st_serial_sections():
    adata = st.datasets.her2st(HER2ST, sections=["C3", "C4"], progress=False)
    panel = [g for g in (HER2ST / "genes_785.txt").read_text().split() if g in adata.var_names]
    adata = adata[:, panel].copy()
    st.pp.normalize_expression(adata, flavor="hist2st")
    st.pp.extract_patches(adata, patch_size=112, mpp=1.0, library_key="section", progress=False)
    st.pp.embed_patches(adata, progress=False)
    sec = adata.obs["section"].to_numpy()
    train, test = adata[sec == "C3"].copy(), adata[sec == "C4"].copy()
    model = st.tl.fit_contrastive(train, max_epochs=15, method_kwargs=SMALL, batch_size=64, **FIT)
    st.tl.predict_expression(test, model, progress=False)
    df = st.tl.score_prediction(test, layer="predicted", true_layer="targets", inplace=False)
    assert np.isfinite(test.layers["predicted"]).all()
    assert df.loc["all", "pcc_all"] > 0.1  # serial sections of one patient (0.19 when written; ~0 by chance)
