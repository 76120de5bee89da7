"""Published recipes: what each registered name trains with, the engine pieces they need, the paper encoders.

The method-specific behaviour (losses, shuffled controls) is in ``test_method_*.py``; here: the recipe a saved model
records, the variants beside the originals, per-stage batches, sets that mix sections, retrieval caps, encoder specs
with architecture options, and each paper's encoder family fine-tuned end to end from a random initialisation.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import sthist as st
from sthist._engine.methods import METHODS
from sthist._engine.methods.mclstexp import MclSTExp, grid_positions
from sthist._engine.model import retrieval_settings
from sthist._engine.plan import WHOLE_SECTION, Stage, TrainPlan

torch.set_num_threads(1)

FIT = {"layer": "targets", "library_key": "section", "progress": False}

#: Each published name and what its saved config must show: optimiser, lr, weight decay, schedule, batch, stages
#: (name, epochs, batch), validation fraction, early stopping, selection, retrieval defaults.
PUBLISHED = {
    "bleep": {
        "optimizer": ("adamw", 1e-3, 1e-3),
        "schedule": "constant",
        "batch_size": 256,
        "stages": [("main", 4, None)],
        "validation_fraction": 0.2,
        "patience": None,
        "select_on": "val_loss",
        "by_group": False,
        "inputs": {"hflip": True, "vflip": True, "rotation": "quarter", "jitter": [0.0, 0.0, 0.0], "norm": "imagenet"},
        "retrieval": {"k": 50, "weighting": "average"},
    },
    "mclstexp": {
        "optimizer": ("adam", 1e-4, 1e-3),
        "schedule": "constant",
        "batch_size": 128,
        "stages": [("main", 90, None)],
        "validation_fraction": 0.0,
        "patience": None,
        "select_on": "val_loss",
        "by_group": False,
        "inputs": {"hflip": True, "vflip": False, "rotation": "any", "jitter": [0.5, 0.5, 0.5], "norm": "unit"},
        "retrieval": {"k": 200, "weighting": "distance", "max_k_fraction": 1.0},
    },
    "nh2st": {
        "optimizer": ("adam", 5e-4, 0.0),
        "schedule": "step",
        "batch_size": 8,
        "stages": [("main", 200, None)],
        "validation_fraction": 0.1,
        "patience": 20,
        "select_on": "val_pearson_top50",
        "by_group": False,
        "inputs": {"hflip": True, "vflip": True, "rotation": "quarter", "jitter": [0.0, 0.0, 0.0], "norm": "imagenet"},
        "retrieval": {},
    },
    "stgchb": {
        "optimizer": ("adamw", 1e-3, 1e-3),
        "schedule": "constant",
        "batch_size": 16,
        "stages": [("dgi_image", 50, WHOLE_SECTION), ("dgi_expression", 50, WHOLE_SECTION), ("align", 4, None)],
        "validation_fraction": 0.0,
        "patience": None,
        "select_on": "val_loss",
        "by_group": False,
        "inputs": {"hflip": True, "vflip": True, "rotation": "quarter", "jitter": [0.0, 0.0, 0.0], "norm": "unit"},
        "retrieval": {"k": 50, "weighting": "average"},
    },
    "cmrcnet": {
        "optimizer": ("adamw", 1e-4, 1e-3),
        "schedule": "cosine",
        "batch_size": 64,
        "stages": [("main", 60, None)],
        "validation_fraction": 0.2,
        "patience": None,
        "select_on": "val_loss",
        "by_group": True,
        "inputs": {"hflip": True, "vflip": True, "rotation": "quarter", "jitter": [0.0, 0.0, 0.0], "norm": "imagenet"},
        "retrieval": {"k": 50, "weighting": "average"},
    },
}

#: sthist's variants and the published name each departs from.
VARIANTS = {
    "bleep_es": "bleep",
    "mclstexp_section": "mclstexp",
    "nh2st_ctx": "nh2st",
    "stgchb_joint": "stgchb",
    "cmrcnet_pooled": "cmrcnet",
}

#: Small networks and a token grid that fits 48 px patches (hed-texture cells need >= 8 px).
SMALL = {
    "bleep": {"projection_dim": 16},
    "mclstexp": {"projection_dim": 16, "n_layers": 1, "head_dim": 8},
    "nh2st": {"embed_dim": 32, "hidden_dim": 32, "decoder_dim": 16},
    "stgchb": {"image_hidden_dim": 16, "expression_hidden_dim": 16, "projection_dim": 16},
    "cmrcnet": {"projection_dim": 16, "n_gene_tokens": 2, "fusion_heads": 4, "token_grid": 3},
}


def _plan_view(plan: dict) -> dict:
    stages = [(s["name"], s["epochs"], s.get("batch_size")) for s in plan["stages"]]
    opt = plan["optimizer"]
    return {
        "optimizer": (opt["name"], opt["lr"], opt["weight_decay"]),
        "schedule": plan["schedule"]["name"],
        "batch_size": plan["batch_size"],
        "stages": stages,
        "validation_fraction": plan["validation_fraction"],
        "patience": plan["early_stopping_patience"],
        "select_on": plan["select_on"],
        "by_group": plan.get("validation_by_group", False),
        "inputs": {
            **{k: v for k, v in plan["augmentation"].items() if k != "jitter"},
            "jitter": list(plan["augmentation"]["jitter"]),
            "norm": plan["normalisation"],
        },
    }


def test_every_published_name_has_a_variant_and_the_recipes_differ():
    assert {name: cls.variant_of for name, cls in METHODS.items() if cls.variant_of} == VARIANTS
    for variant, original in VARIANTS.items():
        assert variant in METHODS and original in METHODS
        assert issubclass(METHODS[variant], METHODS[original])
        assert METHODS[variant].recipe != METHODS[original].recipe or (
            METHODS[variant].Config() != METHODS[original].Config()
        )
    # the recipes' fixed parts are the papers' (the authors' code, see the module docstrings)
    for name, want in PUBLISHED.items():
        view = _plan_view(METHODS[name].recipe.to_dict())
        assert view == {k: v for k, v in want.items() if k != "retrieval"}, name
        assert METHODS[name].prediction_defaults == want["retrieval"], name
    nh = METHODS["nh2st"].recipe.schedule
    assert (nh.step_size, nh.gamma) == (50, 0.9)
    assert METHODS["cmrcnet"].recipe.schedule.min_lr == 1e-5
    assert METHODS["nh2st"].Config().neighbor_context is False and METHODS["nh2st_ctx"].Config().neighbor_context
    assert METHODS["stgchb"].Config().image_relevance == "hsic"
    assert METHODS["stgchb_joint"].Config().image_relevance == "nhsic"
    assert not METHODS["mclstexp"].batch_by_group and METHODS["mclstexp_section"].batch_by_group
    assert METHODS["mclstexp"].expression_set_size == 32
    assert METHODS["cmrcnet"].consumes == ("features", "tokens") and METHODS["cmrcnet_pooled"].consumes == ("features",)
    # the public registry lists them all, with their recipes
    table = st.tl.methods()
    assert {*PUBLISHED, *VARIANTS} <= set(table.index)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_saved_config_records_the_published_recipe(toy_split, tmp_path, name):
    train, test = toy_split(0)
    # shortened by an override (every stage runs 2 epochs); the rest of the recipe is the paper's
    model = st.tl.fit_contrastive(train, method=name, max_epochs=2, method_kwargs=SMALL[name], random_state=0, **FIT)
    model.save(tmp_path / name)
    config = json.loads((tmp_path / name / "config.json").read_text())["config"]
    view = _plan_view(config["plan"])
    want = {k: v for k, v in PUBLISHED[name].items() if k != "retrieval"}
    want["stages"] = [(s, 2, b) for s, _, b in want["stages"]]
    if name == "bleep" or name == "cmrcnet":
        # a recipe's batch larger than the training spots is reduced to fit (and logged)
        want["batch_size"] = min(want["batch_size"], view["batch_size"])
    assert view == want
    assert config["prediction_defaults"] == PUBLISHED[name]["retrieval"]
    assert [s["name"] for s in model.history["stages"]] == [s for s, _, _ in want["stages"]]
    # the same seed gives the same model
    again = st.tl.fit_contrastive(
        train.copy(), method=name, max_epochs=2, method_kwargs=SMALL[name], random_state=0, **FIT
    )
    assert again.history["train_loss"] == model.history["train_loss"]
    a, b = test.copy(), test.copy()
    st.tl.predict_expression(a, model, library_key="section", progress=False)
    st.tl.predict_expression(b, again, library_key="section", progress=False)
    np.testing.assert_array_equal(a.layers["predicted"], b.layers["predicted"])


def test_whole_section_stage_batches(prepared_toy):
    from sthist._engine.train import _epoch_batches, _prepare

    adata = prepared_toy(0)
    run = _prepare(
        method="stgchb",
        expression=adata.layers["targets"],
        genes=list(adata.var_names),
        features=adata.obsm["X_hed_fast"],
        coords=adata.obsm["spatial"],
        groups=adata.obs["section"].to_numpy(),
        method_kwargs=SMALL["stgchb"],
        progress=False,
    )
    items = list(_epoch_batches(run, WHOLE_SECTION)())
    train = [idx for tag, idx in items if tag == "train"]
    codes = run.codes
    # one batch per section with all its training spots
    assert len(train) == len(np.unique(codes))
    assert sorted(np.concatenate(train).tolist()) == sorted(run.train_idx.tolist())
    assert all(len(np.unique(codes[idx])) == 1 for idx in train)
    # the align stage: batches of 16 spots of one section, the incomplete last ones kept
    small = [idx for tag, idx in _epoch_batches(run, 16)() if tag == "train"]
    assert max(i.size for i in small) <= 16 and all(len(np.unique(codes[i])) == 1 for i in small)
    assert sum(i.size for i in small) == run.train_idx.size


def test_stage_batch_size_is_checked():
    Stage("a", batch_size=WHOLE_SECTION)
    Stage("a", batch_size=2)
    for bad in (1, 0, "all", 2.5, True):
        with pytest.raises(ValueError, match=r"Stage\.batch_size must be an integer >= 2, 'section'"):
            Stage("a", batch_size=bad)
    with pytest.raises(TypeError, match="drop_last must be True or False"):
        TrainPlan(drop_last=1)


def test_mclstexp_positions_do_not_depend_on_the_batch(prepared_toy):
    adata = prepared_toy(0)
    coords = adata.obsm["spatial"].astype(np.float64)
    codes = (adata.obs["section"] == "toy_1").to_numpy().astype(np.int64)
    pos = MclSTExp.prepare_coords(coords, codes)
    # per section, as grid_positions of the whole section
    for g in (0, 1):
        rows = codes == g
        np.testing.assert_array_equal(pos[rows], grid_positions(torch.as_tensor(coords[rows]), 2**24).numpy())
    # a random mixed batch of both sections embeds each spot with its section's indices
    m = MclSTExp(8, 40, MclSTExp.make_config(SMALL["mclstexp"])).eval()
    from sthist._engine.methods import Batch

    rng = np.random.default_rng(0)
    targets = adata.layers["targets"]
    expr = torch.as_tensor(targets.toarray() if hasattr(targets, "toarray") else targets, dtype=torch.float32)
    idx = rng.choice(adata.n_obs, 32, replace=False)
    batch = Batch(img_feats=torch.zeros(32, 8), expression=expr[idx], coords=torch.as_tensor(pos[idx]))
    with torch.no_grad():
        a = m.embed_expression(batch.expression, batch)
        moved = Batch(img_feats=torch.zeros(32, 8), expression=expr[idx], coords=torch.as_tensor(pos[idx]) + 256)
        b = m.embed_expression(moved.expression, moved)  # indices wrap modulo n_positions
    torch.testing.assert_close(a, b)


def test_default_k_caps():
    assert retrieval_settings({"k": 200}, 300, None, None)[:2] == (100, "average")
    k, _, note = retrieval_settings({"k": 200, "max_k_fraction": 1.0}, 150, None, None)
    assert k == 150 and "150" in note
    assert retrieval_settings({"k": 200, "max_k_fraction": 1.0}, 5000, None, None)[0] == 200
    assert retrieval_settings({"k": 200}, 300, 250, None)[0] == 250  # the caller's k is not capped


def test_encoder_spec_with_architecture_options():
    from sthist._engine.encoders import build_image_encoder
    from sthist._engine.encoders.hub import parse_spec

    assert parse_spec("resnet18") == ("resnet18", {})
    assert parse_spec("vit_base_patch32_224(depth=8, num_heads=8)") == (
        "vit_base_patch32_224",
        {"depth": 8, "num_heads": 8},
    )
    for bad in ("resnet18(2)", "resnet18(depth=x)", "resnet18(**kw)"):
        with pytest.raises(ValueError, match="keyword arguments with literal values"):
            parse_spec(bad)
    with pytest.raises(ValueError, match="change the architecture"):
        build_image_encoder("vit_base_patch32_224(depth=2)", pretrained=True)
    enc = build_image_encoder("vit_base_patch32_224(depth=1, num_heads=2, embed_dim=32)", pretrained=False)
    assert enc.describe()["spec"] == "vit_base_patch32_224(depth=1, num_heads=2, embed_dim=32)"
    assert (enc.out_dim, enc.input_size) == (32, 224)
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        feats, tokens = enc(x, grid=7)
        torch.testing.assert_close(feats, enc(x))
        torch.testing.assert_close(tokens, enc.tokens(x, 7))
    assert tokens.shape == (2, 49, 32)  # the 7 x 7 patch tokens of a /32 ViT at 224 px


# ---------------------------------------------------------------------------------------------------------------------
# each paper's encoder family, fine-tuned end to end from a random initialisation (tiny data, one or two epochs)

FAMILIES = {
    "bleep": ("resnet50", {}),
    "mclstexp": ("densenet121", {}),
    "nh2st": ("resnet18", {}),
    "stgchb": ("resnet50", {}),
    # CMRCNet's ViT-B/32 (8 layers, 8 heads in the paper), narrowed for the test; its 7 x 7 tokens are masked
    "cmrcnet": ("vit_base_patch32_224(depth=1, num_heads=2, embed_dim=32)", {"token_grid": 7}),
}


@pytest.fixture(scope="module")
def tiny():
    adata = st.datasets.toy(n_rows=6, n_cols=6, n_genes=12, n_sections=2, seed=3)
    st.pp.extract_patches(adata, patch_size=32, library_key="section", progress=False)
    st.pp.normalize_expression(adata)
    return adata


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_paper_encoder_family_fine_tunes_end_to_end(tiny, name):
    from sthist._engine.encoders import build_image_encoder

    spec, extra = FAMILIES[name]
    adata = tiny.copy()
    model = st.tl.fit_contrastive(
        adata,
        method=name,
        encoder=spec,
        pretrained=False,
        finetune=True,
        max_epochs=1,
        batch_size=16,
        validation_fraction=0,
        method_kwargs={**SMALL[name], **extra},
        random_state=0,
        **FIT,
    )
    assert model.finetuned and model.inputs.encoder == spec
    fresh = build_image_encoder(spec, pretrained=False).state_dict()  # the same deterministic initialisation
    tuned = model._net.encoder.state_dict()
    changed = [k for k in fresh if fresh[k].is_floating_point() and not torch.equal(tuned[k], fresh[k])]
    assert changed, f"the {spec} encoder did not train"
    if name == "cmrcnet":
        assert model.inputs.tokens == 7
        assert any(k.startswith("backbone.patch_embed") for k in changed)  # gradients reach the ViT through tokens
    st.tl.predict_expression(adata, model, library_key="section", progress=False)
    assert np.isfinite(adata.layers["predicted"]).all()
