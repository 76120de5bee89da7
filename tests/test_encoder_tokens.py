"""Token-level image inputs: ``ImageEncoder.tokens`` and ``encode_tokens`` for hed-texture, a CNN and a ViT."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

from torch.nn import functional as F  # noqa: E402

from sthist._engine.encoders import build_image_encoder, encode_patches, encode_tokens  # noqa: E402

torch.set_num_threads(1)

CNN = "resnet18"  # 64 px patches give a 2 x 2 last feature map
VIT = "vit_tiny_patch16_224"  # patches are resized to 224 px: 14 x 14 patch tokens after the class token


@pytest.fixture(scope="module")
def patches():
    return np.random.default_rng(0).integers(0, 256, size=(5, 64, 64, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def hed():
    return build_image_encoder("hed-texture")


@pytest.fixture(scope="module")
def cnn():
    return build_image_encoder(CNN, pretrained=False)


@pytest.fixture(scope="module")
def vit():
    return build_image_encoder(VIT, pretrained=False)


def _images(patches):
    return torch.from_numpy(patches).permute(0, 3, 1, 2).float() / 255.0


def _tokens(encoder, patches, grid, **kw):
    return encode_tokens(encoder, patches, grid=grid, progress=False, device="cpu", **kw)


# ---------------------------------------------------------------------------------------------------------------------
# shapes


@pytest.mark.parametrize("grid", [1, 2, 4, 8])
def test_hed_token_shapes(hed, patches, grid):
    tok = _tokens(hed, patches, grid)
    assert tok.shape == (len(patches), grid * grid, hed.token_dim)
    assert tok.dtype == np.float32
    assert hed.token_dim == hed.out_dim == 68
    assert np.isfinite(tok).all()


def test_hed_tokens_are_the_descriptor_of_each_cell_in_row_major_order(hed, patches):
    tok = _tokens(hed, patches, 2)
    for i in range(2):
        for j in range(2):
            cell = np.ascontiguousarray(patches[:, 32 * i : 32 * (i + 1), 32 * j : 32 * (j + 1)])
            ref = encode_patches(hed, cell, progress=False, device="cpu")
            np.testing.assert_allclose(tok[:, 2 * i + j], ref, rtol=1e-5, atol=1e-6)
    # one cell is the whole patch; the mean of finer tokens need not be the pooled descriptor (it is nonlinear)
    np.testing.assert_allclose(_tokens(hed, patches, 1)[:, 0], encode_patches(hed, patches, progress=False), atol=1e-6)


def test_hed_tokens_of_patches_not_divisible_by_the_grid(hed):
    p = np.random.default_rng(1).integers(0, 256, size=(2, 50, 50, 3), dtype=np.uint8)
    tok = _tokens(hed, p, 6)  # cells of 8 or 9 pixels, every pixel in one cell
    assert tok.shape == (2, 36, hed.token_dim)
    first = encode_patches(hed, np.ascontiguousarray(p[:, :8, :8]), progress=False)
    last = encode_patches(hed, np.ascontiguousarray(p[:, 41:, 41:]), progress=False)
    np.testing.assert_allclose(tok[:, 0], first, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tok[:, -1], last, rtol=1e-5, atol=1e-6)


def test_cnn_token_shapes_and_layout(cnn, patches):
    assert cnn.token_dim == 512
    assert _tokens(cnn, patches, 1).shape == (len(patches), 1, 512)
    tok = _tokens(cnn, patches, 2)
    assert tok.shape == (len(patches), 4, 512)
    with torch.no_grad():
        fmap = cnn.backbone.forward_features(cnn._prepare(_images(patches)))  # (n, 512, 2, 2)
    assert tuple(fmap.shape[-2:]) == (2, 2)
    ref = fmap.flatten(2).transpose(1, 2).numpy()  # row-major: (0, 0), (0, 1), (1, 0), (1, 1)
    np.testing.assert_allclose(tok, ref, rtol=1e-5, atol=1e-5)


def test_cnn_grid_1_token_is_the_pooled_feature(cnn, patches):
    pooled = encode_patches(cnn, patches, progress=False, device="cpu")
    tok = _tokens(cnn, patches, 1)
    np.testing.assert_allclose(tok[:, 0], pooled, rtol=1e-5, atol=1e-5)


def test_vit_token_shapes_drop_the_class_token(vit, patches):
    assert vit.input_size == 224
    assert vit.token_dim == 192
    tok14 = _tokens(vit, patches, 14)
    tok7 = _tokens(vit, patches, 7)
    assert tok14.shape == (len(patches), 196, 192)
    assert tok7.shape == (len(patches), 49, 192)
    with torch.no_grad():
        feats = vit.backbone.forward_features(vit._prepare(_images(patches)))  # (n, 1 + 196, 192)
    assert vit.backbone.num_prefix_tokens == 1
    np.testing.assert_allclose(tok14, feats[:, 1:].numpy(), rtol=1e-5, atol=1e-5)
    # grid 7 averages 2 x 2 blocks of the 14 x 14 patch tokens, row-major
    grid14 = torch.from_numpy(tok14).transpose(1, 2).reshape(len(patches), 192, 14, 14)
    ref7 = F.avg_pool2d(grid14, 2).flatten(2).transpose(1, 2).numpy()
    np.testing.assert_allclose(tok7, ref7, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", ["hed-texture", CNN, VIT])
def test_forward_with_grid_gives_features_and_tokens_of_one_pass(spec, hed, cnn, vit, patches):
    # fine-tuning methods that read tokens: ImageEncoder.forward(x, grid) = (forward(x), tokens(x, grid))
    enc = {"hed-texture": hed, CNN: cnn, VIT: vit}[spec]
    x = _images(patches[:2])
    with torch.no_grad():
        feats, tok = enc(x, grid=2)
        torch.testing.assert_close(feats, enc(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tok, enc.tokens(x, 2), rtol=1e-5, atol=1e-5)
        assert isinstance(enc(x, grid=0), torch.Tensor)  # no grid: the pooled features only
    assert feats.shape == (2, enc.out_dim) and tok.shape == (2, 4, enc.token_dim)
    with pytest.raises(ValueError, match="grid must be a positive integer"):
        enc(x, grid=-1)


# ---------------------------------------------------------------------------------------------------------------------
# determinism, lazy input, encoder state


@pytest.mark.parametrize("spec", ["hed-texture", CNN, VIT])
def test_tokens_are_deterministic(spec, hed, cnn, vit, patches):
    enc = {"hed-texture": hed, CNN: cnn, VIT: vit}[spec]
    a = _tokens(enc, patches, 2)
    np.testing.assert_array_equal(a, _tokens(enc, patches, 2))
    # other batch sizes may take other kernels: equal up to float rounding
    np.testing.assert_allclose(a, _tokens(enc, patches, 2, batch_size=2), rtol=1e-5, atol=1e-6)
    if spec != "hed-texture":  # a rebuilt random initialisation is the same network
        np.testing.assert_array_equal(a, _tokens(build_image_encoder(spec, pretrained=False), patches, 2))


@pytest.mark.parametrize("spec", ["hed-texture", CNN])
def test_lazy_input_equals_numpy(spec, hed, cnn, patches):
    da = pytest.importorskip("dask.array")
    enc = hed if spec == "hed-texture" else cnn
    ref = _tokens(enc, patches, 2, batch_size=2)
    lazy = da.from_array(patches, chunks=(3, 64, 64, 3))
    np.testing.assert_array_equal(_tokens(enc, lazy, 2, batch_size=2), ref)


def test_encode_tokens_restores_training_mode(cnn, patches):
    cnn.train()
    try:
        _tokens(cnn, patches[:2], 1)
        assert cnn.training
    finally:
        cnn.eval()


# ---------------------------------------------------------------------------------------------------------------------
# bad grids


@pytest.mark.parametrize("grid", [0, -1, 2.0, 2.5, True, "2", None])
def test_bad_grid_raises(hed, patches, grid):
    with pytest.raises(ValueError, match="grid must be a positive integer"):
        _tokens(hed, patches, grid)
    with pytest.raises(ValueError, match="grid must be a positive integer"):
        hed.tokens(_images(patches), grid)


def test_grid_too_fine_for_hed_names_patch_size_and_grid(hed, patches):
    with pytest.raises(ValueError, match=r"8 x 8 pixels.*64 x 64 pixel patch.*9 x 9 grid.*grid <= 8"):
        _tokens(hed, patches, 9)
    small = np.zeros((1, 6, 6, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="use larger patches"):
        _tokens(hed, small, 1)


def test_grid_finer_than_the_feature_map_raises(cnn, patches):
    with pytest.raises(ValueError, match=r"grid=3 is finer than the 2 x 2 feature map.*grid <= 2"):
        _tokens(cnn, patches, 3)


def test_bad_patches_raise(hed):
    with pytest.raises(ValueError, match="uint8"):
        _tokens(hed, np.zeros((2, 16, 16, 3), dtype=np.float32), 1)
