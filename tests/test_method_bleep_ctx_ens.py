"""bleep_ctx_ens: an ensemble of bleep_ctx heads retrieving by the mean of the members' cosine similarities."""

import numpy as np
import pytest
import torch

import sthist as st
from sthist._engine.methods import Batch, get_method
from sthist._engine.methods.bleep import soft_clip_loss
from sthist._engine.methods.bleep_ctx import BLEEPContext
from sthist._engine.methods.bleep_ctx_ens import BLEEPContextEnsemble

torch.set_num_threads(1)
FIT = {"method": "bleep_ctx_ens", "layer": "targets", "library_key": "section", "progress": False}


def _batch(n=6, d=5, g=7, k=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return Batch(
        img_feats=torch.randn(n, d, generator=gen),
        expression=torch.rand(n, g, generator=gen),
        neighbor_img_feats=torch.randn(n, k, d, generator=gen),
        neighbor_mask=torch.ones(n, k, dtype=torch.bool),
    )


def test_similarity_is_the_mean_of_the_members():
    torch.manual_seed(0)
    m = BLEEPContextEnsemble(5, 7, BLEEPContextEnsemble.make_config({"n_members": 3, "projection_dim": 8})).eval()
    assert get_method("bleep_ctx_ens") is BLEEPContextEnsemble and issubclass(BLEEPContextEnsemble, BLEEPContext)
    assert BLEEPContextEnsemble.recipe == BLEEPContext.recipe and len(m.image_heads) == len(m.spot_heads) == 3
    b = _batch()
    with torch.no_grad():
        img, expr = m.embed_image(b.img_feats, b), m.embed_expression(b.expression, b)
        assert img.shape == (6, 24) and torch.allclose(img.norm(dim=-1), torch.ones(6))
        x = m._image_inputs(b.img_feats, b)
        members = [
            torch.nn.functional.cosine_similarity(hi(x).unsqueeze(1), hs(b.expression).unsqueeze(0), dim=-1)
            for hi, hs in zip(m.image_heads, m.spot_heads, strict=True)
        ]
        torch.testing.assert_close(img @ expr.T, torch.stack(members).mean(0))
        # the loss is the mean of the members' soft-target CLIP losses
        want = torch.stack(
            [soft_clip_loss(hi(x), hs(b.expression)) for hi, hs in zip(m.image_heads, m.spot_heads, strict=True)]
        ).mean()
        torch.testing.assert_close(m.loss(b)["clip"], want)


def test_needs_neighbours_and_checks_its_config():
    m = BLEEPContextEnsemble(5, 7, BLEEPContextEnsemble.make_config({"n_members": 2, "projection_dim": 8}))
    with pytest.raises(ValueError, match="needs the spatial neighbours"):
        m.embed_image(torch.randn(2, 5), Batch(img_feats=torch.randn(2, 5)))
    with pytest.raises(ValueError, match="n_members must be a positive integer"):
        BLEEPContextEnsemble.make_config({"n_members": 0})


def test_learns_and_is_repeatable(toy_split):
    train, test = toy_split(2)
    kw = {"max_epochs": 30, "method_kwargs": {"n_members": 3, "projection_dim": 16}, **FIT}
    model = st.tl.fit_contrastive(train.copy(), random_state=0, **kw)
    again = st.tl.fit_contrastive(train.copy(), random_state=0, **kw)
    assert again.history["train_loss"] == model.history["train_loss"]
    shuffled = train.copy()
    shuffled.layers["targets"] = shuffled.layers["targets"][np.random.default_rng(0).permutation(train.n_obs)]
    control = st.tl.fit_contrastive(shuffled, random_state=0, **kw)
    genes = test.var_names[test.var["informative"]].tolist()
    scores = {}
    for name, m in {"real": model, "shuffled": control}.items():
        q = test.copy()
        st.tl.predict_expression(q, m, library_key="section", progress=False)
        scores[name] = st.tl.score_prediction(q, true_layer="targets", genes=genes, inplace=False).loc["all", "pcc_all"]
    assert scores["real"] > 0.4 and scores["real"] > scores["shuffled"] + 0.3
