"""The two-scale weight-free encoder ``hed-texture-ctx``: the whole patch and its centre, one vector."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sthist._engine.encoders import build_image_encoder, encode_patches, encode_tokens
from sthist._engine.encoders.hed import HEDTexture, HEDTextureContext

torch.set_num_threads(1)


def _textured(n: int, size: int, seed: int = 0) -> np.ndarray:
    """H&E-like patches: pink background with dark blobs of random sizes (no flat patches)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        img = np.full((size, size, 3), (230, 170, 200), dtype=np.float64)
        for _ in range(rng.integers(20, 60)):
            cy, cx, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(2, size / 12)
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = (80, 40, 140)
        out[i] = np.clip(img + rng.normal(0, 12, img.shape), 0, 255)
    return out


def test_two_fields_of_view_in_one_vector():
    enc, base = build_image_encoder("hed-texture-ctx"), build_image_encoder("hed-texture")
    assert enc.weight_free and enc.describe()["spec"] == "hed-texture-ctx"
    assert isinstance(enc.backbone, HEDTextureContext) and enc.out_dim == 2 * base.out_dim
    patches = _textured(6, 224)
    feats = encode_patches(enc, patches, progress=False)
    assert feats.shape == (6, 2 * base.out_dim) and feats.dtype == np.float32
    # first the whole patch, then its central 112 x 112 crop, each hed-texture's descriptor
    np.testing.assert_array_equal(feats[:, : base.out_dim], encode_patches(base, patches, progress=False))
    centre = np.ascontiguousarray(patches[:, 56:168, 56:168])
    np.testing.assert_array_equal(feats[:, base.out_dim :], encode_patches(base, centre, progress=False))
    # deterministic, and a patch's vector does not depend on its batch
    np.testing.assert_array_equal(feats, encode_patches(enc, patches, progress=False))
    np.testing.assert_array_equal(feats[2:3], encode_patches(enc, patches[2:3], progress=False))


def test_context_matters_and_the_centre_does_too():
    enc = build_image_encoder("hed-texture-ctx")
    d = HEDTexture().out_dim
    a = _textured(1, 224, seed=1)
    b = a.copy()
    b[:, :40] = 255  # another surrounding, the same centre
    fa, fb = (encode_patches(enc, p, progress=False)[0] for p in (a, b))
    assert not np.allclose(fa[:d], fb[:d]) and np.array_equal(fa[d:], fb[d:])
    c = a.copy()
    c[:, 100:124, 100:124] = 255  # another centre
    fc = encode_patches(enc, c, progress=False)[0]
    assert not np.allclose(fa[d:], fc[d:])


@pytest.mark.parametrize("turn", ["flip_h", "flip_v", "rot90"])
def test_flip_and_rotation_invariant_like_hed_texture(turn):
    enc = build_image_encoder("hed-texture-ctx")
    patches = _textured(4, 224, seed=2)
    ops = {
        "flip_h": lambda p: p[:, :, ::-1],
        "flip_v": lambda p: p[:, ::-1],
        "rot90": lambda p: np.rot90(p, 1, axes=(1, 2)),
    }
    got = encode_patches(enc, np.ascontiguousarray(ops[turn](patches)), progress=False)
    want = encode_patches(enc, patches, progress=False)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_tokens_and_bad_input():
    enc = build_image_encoder("hed-texture-ctx")
    tok = encode_tokens(enc, _textured(2, 224), grid=2, progress=False)
    assert tok.shape == (2, 4, enc.out_dim) and enc.token_dim == enc.out_dim
    with pytest.raises(ValueError, match="at least 8 x 8 pixels"):
        encode_patches(enc, np.zeros((1, 4, 4, 3), dtype=np.uint8), progress=False)
    with pytest.raises(ValueError, match="weight-free and takes no checkpoint"):
        build_image_encoder("hed-texture-ctx", checkpoint="weights.safetensors")
