"""CMRCNet (encoder tokens) and cmrcnet_pooled (tokens from the pooled vector): loss, reconstruction branch, training
through `sthist.tl`, save/load, determinism, bad input."""

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
from sthist._engine.methods.cmrcnet import CMRCNet, CMRCNetPooled, soft_clip_loss_per_spot
from sthist._engine.model import ContrastiveModel
from sthist._engine.plan import TrainPlan

torch.set_num_threads(1)

HER2ST = Path(__file__).parents[2] / "shared" / "data" / "her2st"
# a small network for the toy data (the defaults are the paper's, 256-d tokens, a 7 x 7 token grid); hed-texture
# token cells must be >= 8 px, so the 48 px toy patches take a 3 x 3 grid (16 px cells) instead of the ViT's 7 x 7
SMALL = {"projection_dim": 32, "n_gene_tokens": 4, "token_grid": 3}
FIT = {"method": "cmrcnet", "layer": "targets", "library_key": "section", "progress": False}
# cmrcnet_pooled (sthist's previous CMRCNet): tokens are learned linear views of the pooled feature vector
SMALL_POOLED = {"projection_dim": 32, "n_image_tokens": 4, "n_gene_tokens": 4}
FIT_POOLED = {**FIT, "method": "cmrcnet_pooled"}
# a tiny random ViT-B/32 (the paper's encoder family, trained from scratch): 224 px input, a 7 x 7 patch grid
TINY_VIT = "vit_base_patch32_224(depth=2, num_heads=2, embed_dim=64)"


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


def _batch(n: int, image_dim: int, n_genes: int, tokens: int, token_dim: int, seed: int = 0) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    return Batch(
        img_feats=torch.randn(n, image_dim, generator=gen),
        expression=torch.rand(n, n_genes, generator=gen),
        img_tokens=torch.randn(n, tokens, token_dim, generator=gen),
    )


def _small(**extra) -> CMRCNet:
    """A token CMRCNet on 10-d features, 20 genes and 12-d tokens."""
    return CMRCNet(10, 20, CMRCNet.make_config({**SMALL, **extra}), token_dim=12)


def _shuffled_control(train, model, test, fit_kwargs, method_kwargs) -> dict[str, float]:
    shuffled = train.copy()
    shuffled.layers["targets"] = shuffled.layers["targets"][np.random.default_rng(0).permutation(shuffled.n_obs)]
    control = st.tl.fit_contrastive(shuffled, method_kwargs=method_kwargs, random_state=0, **fit_kwargs)
    genes = test.var_names[test.var["informative"].to_numpy()].tolist()
    scores = {}
    for name, m in {"real": model, "shuffled": control}.items():
        st.tl.predict_expression(test, m, key_added=name, progress=False)
        df = st.tl.score_prediction(test, layer=name, true_layer="targets", genes=genes, inplace=False)
        scores[name] = df.loc["all", "pcc_all"]
    return scores


@pytest.fixture(scope="module")
def split():
    """Two 16 x 16 toy sections: the authors' 20 % validation needs more spots than a 12 x 12 section gives."""
    adata = st.datasets.toy(n_rows=16, n_cols=16, n_genes=40, n_sections=2, seed=1)
    st.pp.extract_patches(adata, patch_size=48, library_key="section", progress=False)
    st.pp.normalize_expression(adata)
    st.pp.embed_patches(adata, progress=False)
    sec = adata.obs["section"].to_numpy()
    return adata[sec == "toy_0"].copy(), adata[sec == "toy_1"].copy()


@pytest.fixture(scope="module")
def trained(split):
    train, _ = split
    train = train.copy()
    # the paper's training settings (AdamW 1e-4, cosine to 1e-5, batch 64, 60 epochs) come from CMRCNet.recipe
    model = st.tl.fit_contrastive(train, method_kwargs=SMALL, random_state=0, **FIT)
    return train, model


@pytest.fixture(scope="module")
def trained_pooled(split):
    train, _ = split
    train = train.copy()
    # sthist's previous settings (AdamW 1e-4, batch 64, <= 60 epochs, early stopping) come from CMRCNetPooled.recipe
    model = st.tl.fit_contrastive(train, method_kwargs=SMALL_POOLED, random_state=0, **FIT_POOLED)
    return train, model


# ---------------------------------------------------------------------------------------------------------------------
# the module


def test_registered_with_paper_defaults():
    assert get_method("cmrcnet") is CMRCNet and METHODS["cmrcnet"] is CMRCNet
    assert CMRCNet.prediction == "retrieval" and CMRCNet.similarity == "cosine"
    assert not CMRCNet.needs_neighbors and not CMRCNet.needs_coords and not CMRCNet.batch_by_group
    assert CMRCNet.consumes == ("features", "tokens")
    # the authors' config.py / train.py and inference.py
    recipe = CMRCNet.recipe
    assert (recipe.optimizer.name, recipe.optimizer.lr, recipe.optimizer.weight_decay) == ("adamw", 1e-4, 1e-3)
    assert (recipe.schedule.name, recipe.schedule.min_lr, recipe.schedule.warmup_epochs) == ("cosine", 1e-5, 0)
    assert (recipe.batch_size, recipe.max_epochs) == (64, 60)
    # the epoch with the lowest validation loss is kept, no early stopping
    # a random 20 % of every training section's spots validates (splits.py), the lowest validation loss is kept
    assert (recipe.validation_fraction, recipe.validation_by_group) == (0.2, True)
    assert (recipe.early_stopping_patience, recipe.select_on) == (None, "val_loss")
    assert recipe.stages == ()
    assert CMRCNet.prediction_defaults == {"k": 50, "weighting": "average"}
    cfg = CMRCNet.Config()
    assert (cfg.projection_dim, cfg.dropout, cfg.temperature) == (256, 0.1, 1.0)
    assert (cfg.token_grid, cfg.n_gene_tokens, cfg.mask_ratio) == (7, 8, 0.5)  # the ViT-B/32's 7 x 7 patch tokens
    assert (cfg.attention_heads, cfg.fusion_heads, cfg.fusion_layers) == (4, 8, 2)
    assert not hasattr(cfg, "n_image_tokens")
    m = CMRCNet(68, 785, token_dim=768)
    assert m.token_grid == 7 and m.token_dim == 768
    # the self-normalising gene block of the authors: Linear(g, 2048) -> ELU -> AlphaDropout(0.25), 8 x 256 tokens
    lin, act, drop = m.gene_tokenizer
    assert (lin.in_features, lin.out_features) == (785, 2048)
    assert isinstance(act, torch.nn.ELU) and isinstance(drop, torch.nn.AlphaDropout) and drop.p == 0.25
    # latent_linear_768_2_256: the encoder tokens to the fusion width; the image head reads the token width
    assert (m.token_projection.in_features, m.token_projection.out_features) == (768, 256)
    assert m.image_projection.projection.in_features == 768
    assert not hasattr(m, "image_tokenizer")
    batch = _batch(3, 68, 785, 49, 768)
    assert m.gene_tokens(torch.rand(3, 785)).shape == (3, 8, 256)
    assert m.image_tokens(batch.img_feats, batch).shape == (3, 49, 256)
    assert m.embed_image(batch.img_feats, batch).shape == (3, 256)
    assert m.embed_expression(torch.rand(3, 785)).shape == (3, 256)
    assert m.first_attention.num_heads == 4 and m.fusion.attn.num_heads == 8


def test_needs_token_dim_and_tokens():
    with pytest.raises(ValueError, match="build it with token_dim="):
        CMRCNet(68, 785)
    m = _small().eval()
    with pytest.raises(ValueError, match="reads the encoder's token grid"):
        m.embed_image(torch.randn(3, 10))
    with pytest.raises(ValueError, match="reads the encoder's token grid"):
        m.embed_image(torch.randn(3, 10), Batch(img_feats=torch.randn(3, 10), expression=torch.rand(3, 20)))


def test_image_embedding_is_the_projection_of_the_mean_token():
    m = _small().eval()
    batch = _batch(5, 10, 20, 9, 12, seed=4)
    emb = m.embed_image(batch.img_feats, batch)
    torch.testing.assert_close(emb, m.image_projection(batch.img_tokens.mean(dim=1)))
    # the pooled features are not read: the image embedding depends on the tokens only
    other = Batch(img_feats=torch.randn(5, 10), expression=batch.expression, img_tokens=batch.img_tokens)
    torch.testing.assert_close(m.embed_image(other.img_feats, other), emb)
    moved = Batch(img_feats=batch.img_feats, expression=batch.expression, img_tokens=batch.img_tokens + 1.0)
    assert not torch.allclose(m.embed_image(moved.img_feats, moved), emb)
    # the reconstruction branch maps every token to the fusion width
    torch.testing.assert_close(m.image_tokens(batch.img_feats, batch), m.token_projection(batch.img_tokens))


def test_fusion_block_is_shared_across_passes():
    m = _small(fusion_layers=2)
    one = _small(fusion_layers=1)
    # the authors' ModuleList holds one block instance twice: two passes, one set of weights
    assert sum(p.numel() for p in m.parameters()) == sum(p.numel() for p in one.parameters())
    calls = []
    m.fusion.register_forward_hook(lambda *_: calls.append(1))
    batch = _batch(5, 10, 20, 9, 12)
    m.reconstruct(batch.img_feats, batch.expression, batch)
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
    m = _small().eval()
    batch = _batch(7, 10, 20, 9, 12, seed=1)
    torch.manual_seed(3)
    terms = m.loss(batch)
    assert set(terms) == {"contrastive", "reconstruction"}
    loss = sum(terms.values())
    img, spot = m.embed_image(batch.img_feats, batch), m.embed_expression(batch.expression)
    torch.manual_seed(3)  # the same mask
    recon = m.reconstruct(batch.img_feats, batch.expression, batch)
    contrastive = torch.log1p(soft_clip_loss_per_spot(img, spot)).mean()  # log(1 + l) per spot, then the mean
    reconstruction = torch.log1p(((recon - img) ** 2).mean())
    torch.testing.assert_close(loss, contrastive + reconstruction)
    torch.testing.assert_close(terms["contrastive"], contrastive)
    torch.testing.assert_close(terms["reconstruction"], reconstruction)


def test_masking_and_cross_modal_dependence():
    batch = _batch(6, 10, 20, 9, 12, seed=2)
    x, e = batch.img_feats, batch.expression
    m = _small(mask_ratio=0.5).eval()
    # about half of the (projected) token values are zeroed, element by element: two draws differ
    torch.manual_seed(0)
    a = m.reconstruct(x, e, batch)
    b = m.reconstruct(x, e, batch)
    assert not torch.allclose(a, b)
    captured = []
    m.first_attention.register_forward_hook(lambda mod, args, out: captured.append(args[0]))
    big = _batch(200, 10, 20, 9, 12, seed=5)
    m.reconstruct(big.img_feats, big.expression, big)
    assert captured[0].shape == (200, 9, 32)  # one query per encoder token
    zero_share = float((captured[0] == 0).float().mean())
    assert 0.45 < zero_share < 0.55
    # element-wise masking: tokens are partly masked (a token-level mask would zero about half of them entirely)
    per_token = (captured[0] == 0).float().mean(-1)
    assert bool(((per_token > 0) & (per_token < 1)).all())
    # no masking and no dropout in eval mode: deterministic; the reconstruction reads the expression and the tokens
    m0 = _small(mask_ratio=0.0).eval()
    torch.testing.assert_close(m0.reconstruct(x, e, batch), m0.reconstruct(x, e, batch))
    assert not torch.allclose(m0.reconstruct(x, e, batch), m0.reconstruct(x, e.flip(0), batch))
    flipped = Batch(img_feats=x, expression=e, img_tokens=batch.img_tokens.flip(0))
    assert not torch.allclose(m0.reconstruct(x, e, batch), m0.reconstruct(x, e, flipped))


def test_reconstruction_gradients_reach_image_head_not_expression_head():
    m = _small()
    batch = _batch(8, 10, 20, 9, 12, seed=6)
    batch.img_tokens.requires_grad_(True)
    img = m.embed_image(batch.img_feats, batch)
    torch.log1p(F.mse_loss(m.reconstruct(batch.img_feats, batch.expression, batch), img)).backward()
    # the target is not detached (as in the authors' code); the expression head is trained by the contrastive loss only
    assert m.image_projection.projection.weight.grad.abs().sum() > 0
    assert m.gene_tokenizer[0].weight.grad.abs().sum() > 0
    assert m.token_projection.weight.grad.abs().sum() > 0
    assert m.spot_projection.projection.weight.grad is None
    # through both paths the tokens (a fine-tuned encoder's output) receive gradients
    assert batch.img_tokens.grad.abs().sum() > 0


def test_fusion_layers_zero_skips_the_fusion_block():
    m = CMRCNet(12, 9, CMRCNet.make_config({**SMALL, "fusion_layers": 0}), token_dim=5)
    terms = m.loss(_batch(4, 12, 9, 4, 5))
    assert set(terms) == {"contrastive", "reconstruction"}
    assert all(t.ndim == 0 and torch.isfinite(t) for t in terms.values())
    assert torch.isfinite(sum(terms.values()))


# ---------------------------------------------------------------------------------------------------------------------
# through sthist.tl


def test_learns_informative_genes_and_beats_shuffled_control(split, trained):
    _, test = split
    train, model = trained
    assert model.method == "cmrcnet" and model.prediction == "retrieval"
    assert train.uns["contrastive"]["params"]["method"] == "cmrcnet"
    assert train.uns["contrastive"]["params"]["config"]["token_grid"] == 3
    # the encoder's 3 x 3 hed-texture cell descriptors (68-d each), standardised
    assert model.inputs.tokens == 3 and model.config["token_dim"] == 68
    assert set(model.history["train_components"]) == {"contrastive", "reconstruction"}
    plan = model.config["plan"]
    assert (plan["optimizer"]["lr"], plan["batch_size"], plan["max_epochs"]) == (1e-4, 64, 60)
    assert (plan["schedule"]["name"], plan["schedule"]["min_lr"]) == ("cosine", 1e-5)
    assert [(s["name"], s["epochs"]) for s in plan["stages"]] == [("main", 60)]
    # no early stopping: all 60 epochs run, the best validation epoch is kept
    assert len(model.history["train_loss"]) == 60 and len(model.history["val_loss"]) == 60
    assert not model.history["stopped_early"]
    assert model.history["best_epoch"] == int(np.argmin(model.history["val_loss"]))
    assert train.obsm["X_contrastive_image"].shape == (train.n_obs, 32)
    scores = _shuffled_control(train, model, test, FIT, SMALL)
    assert scores["real"] > 0.4
    assert scores["real"] > scores["shuffled"] + 0.3


def test_save_load_round_trip(split, trained, tmp_path):
    _, test = split
    _, model = trained
    model.save(tmp_path / "cmrcnet")
    loaded = ContrastiveModel.load(tmp_path / "cmrcnet")
    assert loaded.method == "cmrcnet" and loaded.config["method_config"] == model.config["method_config"]
    assert loaded.inputs.tokens == 3 and loaded.config["token_dim"] == 68
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
        ({"n_tokens": 8}, r"not options of method 'cmrcnet'; valid: \[.*'n_gene_tokens'.*'token_grid'"),
        # the pooled tokeniser belongs to cmrcnet_pooled
        ({"n_image_tokens": 8}, r"\['n_image_tokens'\] are not options of method 'cmrcnet'"),
        ({"projection_dim": 30}, r"projection_dim=30 must be divisible by attention_heads=4"),
        ({"projection_dim": 36}, r"projection_dim=36 must be divisible by fusion_heads=8"),
        ({"mask_ratio": 1.0}, r"mask_ratio must be in \[0, 1\)"),
        ({"token_grid": 0}, r"token_grid must be a positive integer"),
        ({"fusion_layers": -1}, r"fusion_layers must be a non-negative integer"),
        ({"temperature": 0}, r"temperature must be > 0"),
        ({"dropout": 1.5}, r"dropout must be in \[0, 1\)"),
        # the paper's 7 x 7 grid of hed-texture cells on 48 px patches: 6 px cells, below hed-texture's 8 px
        ({}, r"8 x 8 pixels"),
    ],
)
def test_bad_method_kwargs_raise_and_leave_adata_unchanged(split, kwargs, message):
    train, _ = split
    adata = train.copy()
    before = adata.copy()
    with pytest.raises(ValueError, match=message):
        st.tl.fit_contrastive(adata, max_epochs=1, method_kwargs=kwargs, **FIT)
    _anndata_equal(adata, before)


@pytest.fixture(scope="module")
def finetuned():
    # the paper's setting: a ViT-B/32 trained from scratch (here 2 layers, 2 heads, 64-d), its 7 x 7 patch tokens
    adata = st.datasets.toy(n_rows=8, n_cols=8, n_genes=20, n_sections=1, seed=2)
    st.pp.extract_patches(adata, patch_size=32, progress=False)
    st.pp.normalize_expression(adata)
    model = st.tl.fit_contrastive(
        adata,
        method="cmrcnet",
        layer="targets",
        finetune=True,
        encoder=TINY_VIT,
        pretrained=False,
        max_epochs=1,
        batch_size=16,
        validation_fraction=0,
        method_kwargs={"projection_dim": 32, "n_gene_tokens": 4},  # the default 7 x 7 token grid
        progress=False,
    )
    return adata, model


def test_fine_tuning_trains_the_encoder_and_reads_its_tokens(finetuned):
    adata, model = finetuned
    assert model.finetuned and model.config["mode"] == "finetune"
    assert model.inputs.tokens == 7 and model.inputs.encoder == TINY_VIT
    # the tokens are the encoder's 64-d patch tokens, unstandardised
    assert model._net.method.token_dim == 64 and model._net.token_scaler is None
    from sthist._engine.encoders import build_image_encoder

    fresh_encoder = build_image_encoder(TINY_VIT, pretrained=False)  # the same deterministic initialisation
    fresh = fresh_encoder.state_dict()
    tuned = model._net.encoder.state_dict()
    assert any(not torch.equal(tuned[k], fresh[k]) for k in fresh if fresh[k].is_floating_point())
    # the image embedding reads the tokens of the tuned encoder: the same as its tokens through the trained head
    from sthist._engine.encoders import encode_tokens

    emb = model.embed_images(images=adata.obsm["patches"], device="cpu")
    tok = encode_tokens(model._net.encoder, adata.obsm["patches"], grid=7, device="cpu", progress=False)
    with torch.no_grad():
        ref = model._net.method.image_projection(torch.from_numpy(tok).mean(dim=1)).numpy()
    np.testing.assert_allclose(emb, ref, rtol=1e-4, atol=1e-5)
    st.tl.predict_expression(adata, model, progress=False)
    assert np.isfinite(adata.layers["predicted"]).all()


def test_fine_tuned_save_load_round_trip(finetuned, tmp_path):
    adata, model = finetuned
    model.save(tmp_path / "cmrcnet_ft")
    loaded = ContrastiveModel.load(tmp_path / "cmrcnet_ft")
    assert loaded.finetuned and loaded.inputs.tokens == 7 and loaded._net.method.token_dim == 64
    a, b = adata.copy(), adata.copy()
    st.tl.predict_expression(a, model, progress=False)
    st.tl.predict_expression(b, loaded, progress=False)
    np.testing.assert_array_equal(a.layers["predicted"], b.layers["predicted"])


def test_tokens_from_a_frozen_cnn(split):
    # frozen mode with a timm CNN: its last feature map (2 x 2 at 48 px for a ResNet-18) gives the tokens
    train, test = split
    model = st.tl.fit_contrastive(
        train.copy(),
        encoder="resnet18",
        pretrained=False,
        max_epochs=2,
        method_kwargs={**SMALL, "token_grid": 1},
        random_state=0,
        **FIT,
    )
    assert model.inputs.tokens == 1 and model.config["token_dim"] == 512
    st.tl.predict_expression(test, model, progress=False)
    assert np.isfinite(test.layers["predicted"]).all()


# ---------------------------------------------------------------------------------------------------------------------
# cmrcnet_pooled: sthist's previous CMRCNet (tokens made from the pooled feature vector)


def test_pooled_variant_registered_with_the_previous_behaviour():
    assert get_method("cmrcnet_pooled") is CMRCNetPooled and METHODS["cmrcnet_pooled"] is CMRCNetPooled
    assert issubclass(CMRCNetPooled, CMRCNet)
    assert CMRCNetPooled.consumes == ("features",)
    assert CMRCNetPooled.prediction == "retrieval" and CMRCNetPooled.similarity == "cosine"
    assert CMRCNetPooled.prediction_defaults == {"k": 50, "weighting": "average"}
    # AdamW 1e-4, batch 64, <= 60 epochs at a constant lr, the engine's validation split and early stopping
    recipe = CMRCNetPooled.recipe
    assert (recipe.optimizer.name, recipe.optimizer.lr, recipe.optimizer.weight_decay) == ("adamw", 1e-4, 1e-3)
    assert (recipe.batch_size, recipe.max_epochs) == (64, 60)
    assert recipe.schedule.name == "constant" and recipe.stages == ()
    default = TrainPlan()
    assert (recipe.validation_fraction, recipe.early_stopping_patience, recipe.select_on) == (
        default.validation_fraction,
        default.early_stopping_patience,
        "val_loss",
    )
    assert (recipe.validation_fraction, recipe.early_stopping_patience) == (0.1, 10)
    cfg = CMRCNetPooled.Config()
    assert cfg.n_image_tokens == 8
    assert (cfg.projection_dim, cfg.n_gene_tokens, cfg.mask_ratio, cfg.fusion_layers) == (256, 8, 0.5, 2)
    m = CMRCNetPooled(68, 785)  # no token width needed
    assert m.token_grid == 0  # consumes no tokens, whatever config.token_grid says
    assert (m.image_tokenizer.in_features, m.image_tokenizer.out_features) == (68, 8 * 256)
    assert m.image_projection.projection.in_features == 68
    assert not hasattr(m, "token_projection")
    x = torch.randn(3, 68)
    assert m.image_tokens(x).shape == (3, cfg.n_image_tokens, 256)
    # the image embedding is the projection of the pooled features (no tokens in the batch)
    m.eval()
    torch.testing.assert_close(m.embed_image(x), m.image_projection(x))
    assert m.embed_expression(torch.rand(3, 785)).shape == (3, 256)


def test_pooled_variant_loss_and_gradients():
    m = CMRCNetPooled(10, 20, CMRCNetPooled.make_config(SMALL_POOLED))
    x, e = torch.randn(8, 10), torch.rand(8, 20)
    terms = m.loss(Batch(img_feats=x, expression=e))
    assert set(terms) == {"contrastive", "reconstruction"}
    img = m.embed_image(x)
    torch.log1p(F.mse_loss(m.reconstruct(x, e), img)).backward()
    assert m.image_projection.projection.weight.grad.abs().sum() > 0
    assert m.image_tokenizer.weight.grad.abs().sum() > 0
    assert m.spot_projection.projection.weight.grad is None
    captured = []
    m.eval().first_attention.register_forward_hook(lambda mod, args, out: captured.append(args[0]))
    m.reconstruct(torch.randn(200, 10), torch.rand(200, 20))
    assert captured[0].shape == (200, 4, 32)
    assert 0.45 < float((captured[0] == 0).float().mean()) < 0.55


def test_pooled_variant_learns_and_beats_shuffled_control(split, trained_pooled):
    _, test = split
    train, model = trained_pooled
    assert model.method == "cmrcnet_pooled" and model.inputs.tokens is None
    assert train.uns["contrastive"]["params"]["config"]["n_image_tokens"] == 4
    plan = model.config["plan"]
    assert (plan["optimizer"]["lr"], plan["batch_size"], plan["max_epochs"]) == (1e-4, 64, 60)
    assert plan["schedule"]["name"] == "constant" and plan["early_stopping_patience"] == 10
    scores = _shuffled_control(train, model, test, FIT_POOLED, SMALL_POOLED)
    assert scores["real"] > 0.4
    assert scores["real"] > scores["shuffled"] + 0.3


def test_pooled_variant_save_load_round_trip(split, trained_pooled, tmp_path):
    _, test = split
    _, model = trained_pooled
    model.save(tmp_path / "pooled")
    loaded = ContrastiveModel.load(tmp_path / "pooled")
    assert loaded.method == "cmrcnet_pooled"
    a, b = test.copy(), test.copy()
    st.tl.predict_expression(a, model, progress=False)
    st.tl.predict_expression(b, loaded, progress=False)
    np.testing.assert_array_equal(a.layers["predicted"], b.layers["predicted"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_image_tokens": 0}, r"n_image_tokens must be a positive integer"),
        ({"n_tokens": 8}, r"not options of method 'cmrcnet_pooled'; valid: \[.*'n_gene_tokens', 'n_image_tokens'"),
    ],
)
def test_pooled_variant_bad_method_kwargs(split, kwargs, message):
    train, _ = split
    adata = train.copy()
    before = adata.copy()
    with pytest.raises(ValueError, match=message):
        st.tl.fit_contrastive(adata, max_epochs=1, method_kwargs=kwargs, **FIT_POOLED)
    _anndata_equal(adata, before)


def test_pooled_variant_fine_tuning_trains_the_encoder():
    adata = st.datasets.toy(n_rows=8, n_cols=8, n_genes=20, n_sections=1, seed=2)
    st.pp.extract_patches(adata, patch_size=32, progress=False)
    st.pp.normalize_expression(adata)
    model = st.tl.fit_contrastive(
        adata,
        method="cmrcnet_pooled",
        layer="targets",
        finetune=True,
        encoder="resnet18",
        max_epochs=1,
        batch_size=16,
        validation_fraction=0,
        method_kwargs=SMALL_POOLED,
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
@pytest.mark.parametrize(
    ("fit", "method_kwargs"),
    [
        # 112 px patches: the paper's 7 x 7 token grid of 16 px hed-texture cells
        (FIT, {**SMALL, "token_grid": 7}),
        (FIT_POOLED, SMALL_POOLED),
    ],
    ids=["cmrcnet", "cmrcnet_pooled"],
)
def test_her2st_serial_sections(fit, method_kwargs):
    adata = st.datasets.her2st(HER2ST, sections=["C3", "C4"], progress=False)
    panel = [g for g in (HER2ST / "genes_785.txt").read_text().split() if g in adata.var_names]
    adata = adata[:, panel].copy()
    st.pp.normalize_expression(adata, flavor="hist2st")
    st.pp.extract_patches(adata, patch_size=112, mpp=1.0, library_key="section", progress=False)
    st.pp.embed_patches(adata, progress=False)
    sec = adata.obs["section"].to_numpy()
    train, test = adata[sec == "C3"].copy(), adata[sec == "C4"].copy()
    model = st.tl.fit_contrastive(train, max_epochs=15, method_kwargs=method_kwargs, batch_size=64, **fit)
    st.tl.predict_expression(test, model, progress=False)
    df = st.tl.score_prediction(test, layer="predicted", true_layer="targets", inplace=False)
    assert np.isfinite(test.layers["predicted"]).all()
    assert df.loc["all", "pcc_all"] > 0.1  # serial sections of one patient (pooled: 0.19 when written; ~0 by chance)
