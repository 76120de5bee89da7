"""Tests of sthist.pp.embed_patches."""

from __future__ import annotations

import re
import socket

import anndata as ad
import numpy as np
import pytest
import torch

import sthist
from sthist._engine.base import state_sha256
from sthist._engine.encoders import EncoderUnavailableError, build_image_encoder, encode_patches

torch.set_num_threads(1)


def _adata(n=10, size=32, seed=0):
    rng = np.random.default_rng(seed)
    patches = (np.array([200, 120, 190]) + rng.normal(0, 30, size=(n, size, size, 3))).clip(0, 255).astype(np.uint8)
    patches[: n // 2, ::5, ::5] = [70, 40, 140]  # nuclei in half of the spots
    adata = ad.AnnData(X=rng.poisson(2.0, size=(n, 5)).astype(np.float32))
    adata.obs_names = [f"spot{i}" for i in range(n)]
    adata.obsm["spatial"] = rng.uniform(0, 1000, size=(n, 2))
    adata.obsm["patches"] = patches
    adata.uns["patches"] = {"params": {"size": size}}
    return adata


def _assert_same(a, b):
    assert a.obs.equals(b.obs) and a.var.equals(b.var)
    assert sorted(a.obsm.keys()) == sorted(b.obsm.keys()) and sorted(a.uns.keys()) == sorted(b.uns.keys())
    for key in a.obsm:
        np.testing.assert_array_equal(a.obsm[key], b.obsm[key])
    np.testing.assert_array_equal(a.X, b.X)


def test_embed_patches_default_encoder():
    adata = _adata()
    assert sthist.pp.embed_patches(adata, progress=False, device="cpu") is None
    emb = adata.obsm["X_hed_fast"]
    expected = encode_patches(build_image_encoder("hed-fast"), adata.obsm["patches"], progress=False, device="cpu")
    assert emb.dtype == np.float32 and emb.shape == (10, expected.shape[1])
    np.testing.assert_array_equal(emb, expected)
    assert adata.uns["X_hed_fast"]["params"] == {
        "encoder": "hed-fast",
        "pretrained": False,
        "checkpoint": "",
        "weights_sha256": "",  # the hed-fast encoder has no weights
        "out_dim": expected.shape[1],
        "patches_key": "patches",
    }
    # spots with nuclei have more haematoxylin than those without
    assert emb[:5, 0].min() > emb[5:, 0].max()


def test_embed_patches_copy_and_key_added(tmp_path):
    adata = _adata()
    before = adata.copy()
    out = sthist.pp.embed_patches(adata, key_added="X_mine", copy=True, progress=False, device="cpu")
    _assert_same(adata, before)  # the input is untouched
    assert "X_mine" in out.obsm and out.uns["X_mine"]["params"]["encoder"] == "hed-fast"
    inplace = adata.copy()
    sthist.pp.embed_patches(inplace, key_added="X_mine", progress=False, device="cpu")
    np.testing.assert_array_equal(inplace.obsm["X_mine"], out.obsm["X_mine"])
    # everything written survives an h5ad round trip
    out.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    np.testing.assert_array_equal(back.obsm["X_mine"], out.obsm["X_mine"])
    assert dict(back.uns["X_mine"]["params"]) == out.uns["X_mine"]["params"]


def test_embed_patches_timm_random_init():
    adata = _adata(n=4)
    sthist.pp.embed_patches(adata, encoder="resnet18", batch_size=2, progress=False, device="cpu")
    assert adata.obsm["X_resnet18"].shape == (4, 512)
    params = adata.uns["X_resnet18"]["params"]
    assert params["out_dim"] == 512
    # a hex SHA-256 of the weights used (the random initialisation of resnet18 is deterministic)
    assert re.fullmatch(r"[0-9a-f]{64}", params["weights_sha256"])
    assert params["weights_sha256"] == state_sha256(build_image_encoder("resnet18", pretrained=False))


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"patches_key": "tiles"}, KeyError, r"run `sthist.pp.extract_patches\(adata\)` first"),
        ({"encoder": "not-a-model"}, ValueError, "neither 'hed-texture', a timm model name"),
        ({"encoder": ""}, ValueError, "non-empty string"),
        ({"batch_size": 0}, ValueError, "batch_size must be a positive integer"),
        ({"checkpoint": "/nonexistent.safetensors", "encoder": "resnet18"}, FileNotFoundError, "does not exist"),
    ],
)
def test_embed_patches_errors_leave_adata_unchanged(kwargs, exc, match):
    adata = _adata(n=4)
    before = adata.copy()
    with pytest.raises(exc, match=match):
        sthist.pp.embed_patches(adata, progress=False, device="cpu", **kwargs)
    _assert_same(adata, before)


def test_embed_patches_missing_patches_names_the_fix():
    adata = _adata(n=4)
    del adata.obsm["patches"]
    with pytest.raises(
        KeyError, match=r"adata.obsm\['patches'\] is missing: run `sthist.pp.extract_patches\(adata\)` first"
    ):
        sthist.pp.embed_patches(adata, progress=False)


def test_embed_patches_bad_patches():
    adata = _adata(n=4)
    adata.obsm["patches"] = adata.obsm["patches"].astype(np.float32)
    before = adata.copy()
    with pytest.raises(ValueError, match="must hold uint8 RGB patches"):
        sthist.pp.embed_patches(adata, progress=False)
    _assert_same(adata, before)
    with pytest.raises(TypeError, match="expects an AnnData"):
        sthist.pp.embed_patches(np.zeros((3, 3)))


def test_embed_patches_offline_pretrained_error(monkeypatch):
    import huggingface_hub.constants as hf_constants

    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    adata = _adata(n=4)
    before = adata.copy()
    with pytest.raises(EncoderUnavailableError, match="pretrained=False"):
        sthist.pp.embed_patches(adata, encoder="resnet18", pretrained=True, progress=False)
    _assert_same(adata, before)
