"""The weight-free encoder ``hed-fast``: the ``hed-texture`` descriptor of a 56 px antialiased thumbnail of each patch.

Its definition (``HEDFast`` docstring): the uint8 patch resized with torch's antialiased bilinear uint8 kernel so that
its shorter side is 56 px (smaller patches as they are), then ``HEDTexture._describe``. The float path quantises to
uint8 first, so both paths give the same features exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import sthist as st
from sthist._engine.encoders import ImageEncoder, build_image_encoder, encode_patches, encode_tokens
from sthist._engine.encoders.hed import HED_FAST_SPEC, HEDFast, HEDTexture

torch.set_num_threads(1)

# features that count pixels (see tests/test_hed_fast.py): three H thresholds, H > mean + sd, blobs (x 100), background
COUNT_FEATURES = {52: 1.0, 53: 1.0, 54: 1.0, 55: 1.0, 56: 100.0, 57: 100.0, 65: 1.0}


def _textured(n: int, height: int, width: int | None = None, seed: int = 0) -> np.ndarray:
    """H&E-like patches: pink background with dark blobs of random sizes and noise (as in test_hed_context.py)."""
    width = height if width is None else width
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    out = np.empty((n, height, width, 3), dtype=np.uint8)
    for i in range(n):
        img = np.full((height, width, 3), (230, 170, 200), dtype=np.float64)
        for _ in range(rng.integers(20, 60)):
            cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(2, max(3, min(height, width) / 12))
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = (80, 40, 140)
        out[i] = np.clip(img + rng.normal(0, 12, img.shape), 0, 255)
    return out


def _images(patches: np.ndarray) -> torch.Tensor:
    """Float images as ``images_to_tensor`` gives them (in [0, 1])."""
    return torch.from_numpy(np.ascontiguousarray(patches)).permute(0, 3, 1, 2).float().div_(255.0)


def _u8(patches: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(patches))


def _relative(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """|got - want| relative to each feature's scale over the patches compared (its largest magnitude, >= 1e-2)."""
    got, want = got.double(), want.double()
    return (got - want).abs() / want.abs().amax(0).clamp_min(1e-2)


@pytest.fixture(scope="module")
def fast():
    return HEDFast()


@pytest.fixture(scope="module")
def toy_patches():
    """64 toy H&E patches of 224 px (sthist.datasets.toy through extract_patches)."""
    adata = st.datasets.toy(n_rows=8, n_cols=8, n_genes=10, seed=0)
    st.pp.extract_patches(adata, patch_size=224, progress=False)
    return np.ascontiguousarray(np.asarray(adata.obsm["patches"]))


# ---------------------------------------------------------------------------------------------------------------------
# definition, shape, dtype


def test_is_the_hed_texture_descriptor_of_a_uint8_thumbnail(fast):
    patches = _textured(5, 224)
    x = _u8(patches).permute(0, 3, 1, 2)
    small = F.interpolate(x, size=(56, 56), mode="bilinear", antialias=True)  # uint8 in, uint8 out
    assert small.dtype == torch.uint8
    want = HEDTexture()._describe(small.float().div_(255))
    torch.testing.assert_close(fast.from_uint8(_u8(patches)), want, rtol=0, atol=0)
    # patches at or below the thumbnail size are described as they are: exactly hed-texture
    small_patches = _textured(3, 48, seed=1)
    torch.testing.assert_close(
        fast.from_uint8(_u8(small_patches)), HEDTexture().from_uint8(_u8(small_patches)), rtol=0, atol=0
    )


def test_thumbnail_size():
    f = HEDFast()
    assert f.thumbnail == 56
    assert f.thumbnail_size(224, 224) == (56, 56)
    assert f.thumbnail_size(224, 300) == (56, 75)  # shorter side 56, aspect kept
    assert f.thumbnail_size(300, 224) == (75, 56)
    assert f.thumbnail_size(150, 151) == (56, 56)  # 151 * 56 / 150 = 56.37
    assert f.thumbnail_size(112, 170) == (56, 85)  # 85, rounded half up
    assert f.thumbnail_size(56, 500) == (56, 500)  # at or below the thumbnail: as it is
    assert f.thumbnail_size(40, 300) == (40, 300)


@pytest.mark.parametrize("shape", [(224, 224), (160, 240), (240, 160), (40, 300), (8, 8)])
def test_shape_and_dtype(fast, shape):
    patches = _textured(3, *shape, seed=2)
    out = fast.from_uint8(_u8(patches))
    assert out.shape == (3, 68) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert fast(_images(patches)).shape == (3, 68)


def test_registered_and_built(fast):
    assert fast.out_dim == 68 and fast.name == HED_FAST_SPEC == "hed-fast"
    enc = build_image_encoder("hed-fast")
    assert isinstance(enc, ImageEncoder) and isinstance(enc.backbone, HEDFast)
    assert enc.weight_free and enc.out_dim == enc.token_dim == 68 and enc.describe()["spec"] == "hed-fast"
    with pytest.raises(ValueError, match="weight-free and takes no checkpoint"):
        build_image_encoder("hed-fast", checkpoint="weights.safetensors")


def test_embed_patches_public_path():
    adata = st.datasets.toy(n_rows=4, n_cols=4, n_genes=10, seed=0)
    st.pp.extract_patches(adata, patch_size=224, progress=False)
    st.pp.embed_patches(adata, encoder="hed-fast", progress=False)
    feats = adata.obsm["X_hed_fast"]
    assert feats.shape == (adata.n_obs, 68) and feats.dtype == np.float32 and np.isfinite(feats).all()
    assert adata.uns["X_hed_fast"]["params"]["encoder"] == "hed-fast"
    patches = np.asarray(adata.obsm["patches"])
    np.testing.assert_array_equal(feats, HEDFast().from_uint8(_u8(patches)).numpy())


# ---------------------------------------------------------------------------------------------------------------------
# determinism and one definition


def test_deterministic_and_independent_of_batch(fast):
    patches = _textured(130, 224, seed=3)  # more than one pass (64 patches of 224 px per pass)
    assert fast._images_per_pass(224, 224) == 64
    once = fast.from_uint8(_u8(patches))
    torch.testing.assert_close(fast.from_uint8(_u8(patches)), once, rtol=0, atol=0)
    alone = torch.cat([fast.from_uint8(_u8(patches[i : i + 1])) for i in range(len(patches))])
    torch.testing.assert_close(alone, once, rtol=0, atol=0)
    # through encode_patches, with blocks that do not line up with the passes
    enc = build_image_encoder("hed-fast")
    np.testing.assert_array_equal(encode_patches(enc, patches, batch_size=50, progress=False), once.numpy())


def test_independent_of_chunk_size(monkeypatch):
    patches = _textured(20, 224, seed=4)
    want = HEDFast().from_uint8(_u8(patches))
    monkeypatch.setattr(HEDFast, "chunk_pixels", 1)  # one patch per pass
    torch.testing.assert_close(HEDFast().from_uint8(_u8(patches)), want, rtol=0, atol=0)
    monkeypatch.setattr(HEDFast, "chunk_pixels", 1 << 30)
    monkeypatch.setattr(HEDFast, "thumbnail_pixels", 1 << 30)  # all patches in one pass
    torch.testing.assert_close(HEDFast().from_uint8(_u8(patches)), want, rtol=0, atol=0)


def test_identical_copies_in_a_batch_give_identical_features(fast):
    patch = _textured(1, 224, seed=5)
    others = _textured(3, 224, seed=6)
    batch = np.concatenate([patch, others[:2], patch, others[2:], patch])
    out = fast.from_uint8(_u8(batch))
    alone = fast.from_uint8(_u8(patch))[0]
    for i in (0, 3, 5):
        torch.testing.assert_close(out[i], alone, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(224, 224), (160, 240), (40, 300)])
def test_float_input_equals_uint8_input(fast, shape):
    patches = _textured(4, *shape, seed=7)
    torch.testing.assert_close(fast(_images(patches)), fast.from_uint8(_u8(patches)), rtol=0, atol=0)
    # float images in another memory layout, or off the uint8 grid by less than half a level, are quantised alike
    x = _images(patches).contiguous() + 0.4 / 255
    torch.testing.assert_close(fast(x), fast.from_uint8(_u8(patches)), rtol=0, atol=0)
    # values outside [0, 1] are clamped first
    y = _images(patches)
    y[:, :, :2] = 1.7
    q = patches.copy()
    q[:, :2] = 255
    torch.testing.assert_close(fast(y), fast.from_uint8(_u8(q)), rtol=0, atol=0)


def test_out_dim_probe_goes_through_the_override():
    # __init__ measures out_dim with forward on a 32 x 32 image: below the thumbnail, described as it is
    f = HEDFast()
    assert f.out_dim == HEDTexture().out_dim == 68
    assert f(torch.full((1, 3, 32, 32), 0.5)).shape == (1, 68)


# ---------------------------------------------------------------------------------------------------------------------
# what it must ignore


@pytest.mark.parametrize("turn", ["rot180", "flip_h", "flip_v"])
@pytest.mark.parametrize("size", [224, 150])
def test_flips_and_rotations(fast, turn, size):
    # torch's antialiased resize has mirror-symmetric weights, so the thumbnail of a flipped / rotated patch is the
    # flipped / rotated thumbnail exactly (also at non-integer scales, 150 -> 56 px), and the descriptor is built
    # from statistics of the whole image: the features agree up to float32 rounding (measured: < 1e-6 of their
    # scale), apart from pixel counts, which may differ by one pixel where a value ties a threshold
    patches = _textured(6, size, seed=8)
    ops = {
        "rot180": (lambda p: np.rot90(p, 2, axes=(1, 2)), lambda t: t.flip(-2, -1)),
        "flip_h": (lambda p: p[:, :, ::-1], lambda t: t.flip(-1)),
        "flip_v": (lambda p: p[:, ::-1], lambda t: t.flip(-2)),
    }
    on_patch, on_thumb = ops[turn]
    turned = _u8(on_patch(patches))
    assert torch.equal(fast._thumbnails(turned), on_thumb(fast._thumbnails(_u8(patches))))
    got, want = fast.from_uint8(turned), fast.from_uint8(_u8(patches))
    rel, diff = _relative(got, want), (got.double() - want.double()).abs()
    pixels = 56 * 56
    for j in range(68):
        if j in COUNT_FEATURES:
            assert diff[:, j].max() <= COUNT_FEATURES[j] / pixels * 1.001, f"feature {j}: over a pixel apart"
        else:
            assert rel[:, j].max() < 1e-4, f"feature {j}: {rel[:, j].max()}"


def test_quarter_turns_change_features_a_little(fast, toy_patches):
    # not exact: the uint8 resize rounds to uint8 between its horizontal and its vertical pass, so a transposed
    # patch is rounded in the other order and about 13 % of the thumbnail's values differ by one level. Measured
    # (toy and synthetic patches, 150 and 224 px): relative differences at most 0.08 of a feature's scale (quantiles
    # and blob counts), 99 % of them below 0.03
    for patches in (toy_patches[:32], _textured(16, 150, seed=8)):
        turned = _u8(np.rot90(patches, 1, axes=(1, 2)))
        diff = (fast._thumbnails(turned).int() - fast._thumbnails(_u8(patches)).rot90(1, dims=(-2, -1)).int()).abs()
        assert diff.max() <= 1
        rel = _relative(fast.from_uint8(turned), fast.from_uint8(_u8(patches)))
        assert rel.max() < 0.15 and rel.quantile(0.99) < 0.05


def test_half_resolution_gives_close_features(fast, toy_patches):
    # the same content at 112 px (downsampled with the same antialiased uint8 resize) is thumbnailed 112 -> 56 px
    # instead of 224 -> 56 px: slightly smoother, so texture and blob features move a little. Measured on these
    # patches: relative differences median 0.016, 90 % below 0.065, per-feature correlation over patches >= 0.993,
    # each patch's nearest neighbour (standardised features) is itself
    full = _u8(toy_patches)
    half = F.interpolate(full.permute(0, 3, 1, 2), size=(112, 112), mode="bilinear", antialias=True)
    a = fast.from_uint8(full).double()
    b = fast.from_uint8(half.permute(0, 2, 3, 1).contiguous()).double()
    rel = _relative(b, a)
    assert rel.median() < 0.03 and rel.quantile(0.9) < 0.1
    varying = a.std(0) > 1e-6
    corr = torch.stack([torch.corrcoef(torch.stack([a[:, j], b[:, j]]))[0, 1] for j in torch.nonzero(varying)[:, 0]])
    assert corr.min() > 0.98
    mu, sd = a.mean(0), a.std(0).clamp_min(1e-9)
    nearest = torch.cdist((b - mu) / sd, (a - mu) / sd).argmin(1)
    assert (nearest == torch.arange(len(a))).double().mean() >= 0.95
    # and much closer than other patches are: the mean difference is a small part of the spread between patches
    assert ((b - a).abs().mean(0)[varying] / a.std(0)[varying]).median() < 0.15


# ---------------------------------------------------------------------------------------------------------------------
# tokens


def test_tokens(fast):
    patches = _textured(3, 224, seed=9)
    tok = fast.from_uint8(_u8(patches), grid=7)
    assert tok.shape == (3, 49, 68) and tok.dtype == torch.float32
    torch.testing.assert_close(fast.cell_features(_images(patches), 7), tok, rtol=0, atol=0)
    # 32 px cells are below the thumbnail: exactly hed-texture's tokens
    torch.testing.assert_close(HEDTexture().from_uint8(_u8(patches), grid=7), tok, rtol=0, atol=0)
    # 112 px cells: cropped at full resolution, then thumbnailed like a patch
    tok2 = fast.from_uint8(_u8(patches), grid=2)
    assert tok2.shape == (3, 4, 68)
    torch.testing.assert_close(fast.cell_features(_images(patches), 2), tok2, rtol=0, atol=0)
    cells = [patches[:, i : i + 112, j : j + 112] for i in (0, 112) for j in (0, 112)]
    want = torch.stack([fast.from_uint8(_u8(c)) for c in cells], dim=1)
    torch.testing.assert_close(tok2, want, rtol=0, atol=0)
    enc = build_image_encoder("hed-fast")
    np.testing.assert_array_equal(encode_tokens(enc, patches, grid=2, progress=False), tok2.numpy())
    feats, tokens = enc(_images(patches), grid=2)
    torch.testing.assert_close(feats, fast.from_uint8(_u8(patches)), rtol=0, atol=0)
    torch.testing.assert_close(tokens, tok2, rtol=0, atol=0)
    with pytest.raises(ValueError, match="hed-fast tokens need cells of at least 8 x 8 pixels"):
        fast.from_uint8(_u8(patches), grid=29)


# ---------------------------------------------------------------------------------------------------------------------
# bad input


def test_bad_input(fast):
    with pytest.raises(ValueError, match=r"hed-fast expects images of shape \(B, 3, H, W\)"):
        fast(torch.rand(2, 4, 32, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"hed-fast expects images of shape \(B, 3, H, W\)"):
        fast(torch.rand(3, 32, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="hed-fast from_uint8 expects a uint8 tensor"):
        fast.from_uint8(torch.rand(2, 32, 32, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"hed-fast from_uint8 expects patches of shape \(B, H, W, 3\)"):
        fast.from_uint8(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="hed-fast needs patches of at least 8 x 8 pixels, got \\(4, 300\\)"):
        fast.from_uint8(torch.zeros(1, 4, 300, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="at least 8 x 8 pixels"):
        fast(torch.rand(1, 3, 7, 7))
    with pytest.raises(ValueError, match="at least 8 x 8 pixels"):
        encode_patches(build_image_encoder("hed-fast"), np.zeros((1, 4, 4, 3), dtype=np.uint8), progress=False)
    bad = torch.rand(1, 3, 32, 32)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        fast(bad)
