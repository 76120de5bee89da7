"""Tests of :func:`sthist.pp.extract_patches` and its image sources (``sthist.pp._image``).

Geometry convention under test: the spot centre (x, y) is rounded half up to the pixel
(floor(x + 0.5), floor(y + 0.5)), which is ``patch[S // 2, S // 2]``: the exact centre for odd S, the
lower-right of the four central pixels for even S.
"""

from __future__ import annotations

import math
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from sthist.pp import _image as image_mod
from sthist.pp import extract_patches
from sthist.pp._image import OpenSlideSource, PILSource, TiffSource, open_image

HER2ST = Path(__file__).parents[2] / "shared" / "data" / "her2st"


# ----------------------------------------------------------------------------------------------- helpers


def coord_image(h: int, w: int) -> np.ndarray:
    """RGB image whose pixels encode their own position: R = y % 256, G = x % 256, B = 16 (y // 256) + x // 256."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([y % 256, x % 256, (y // 256) * 16 + x // 256], axis=-1).astype(np.uint8)


def decode_coords(patch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = patch.astype(np.int64)
    return p[..., 0] + 256 * (p[..., 2] // 16), p[..., 1] + 256 * (p[..., 2] % 16)


def smooth_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth random RGB image (JPEG-friendly; noise would make lossy codecs disagree a lot)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 16 + 2, w // 16 + 2, 3)).astype(np.float64)
    big = np.repeat(np.repeat(small, 16, axis=0), 16, axis=1)[:h, :w]
    k = np.ones(9) / 9
    for axis in (0, 1):
        big = np.apply_along_axis(lambda v: np.convolve(v, k, mode="same"), axis, big)
    return np.clip(big, 0, 255).astype(np.uint8)


def make_adata(xy, *, image=None, lib: str | None = "s1", mpp: float | None = None, path=None, key=None):
    xy = np.asarray(xy, dtype=np.float64)
    adata = ad.AnnData(
        X=np.zeros((len(xy), 2), dtype=np.float32),
        obs=pd.DataFrame(index=[f"spot{i}" for i in range(len(xy))]),
        obsm={"spatial": xy},
    )
    if lib is not None:
        entry: dict = {"images": {}, "scalefactors": {}, "metadata": {}}
        if image is not None:
            entry["images"]["fullres"] = image
        if mpp is not None:
            entry["scalefactors"]["microns_per_pixel"] = mpp
        if path is not None:
            entry["metadata"]["source_image_path"] = str(path)
        if key is not None:
            entry["metadata"]["source_image_key"] = key
        adata.uns["spatial"] = {lib: entry}
    return adata


def crop(img: np.ndarray, x: float, y: float, S: int, pad: int = 255) -> np.ndarray:
    """Reference crop with the documented convention, padding outside."""
    ix, iy = math.floor(x + 0.5), math.floor(y + 0.5)
    x0, y0 = ix - S // 2, iy - S // 2
    H, W = img.shape[:2]
    out = np.full((S, S, 3), pad, dtype=np.uint8)
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x0 + S, W), min(y0 + S, H)
    out[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = img[cy0:cy1, cx0:cx1]
    return out


def snapshot(adata: ad.AnnData) -> dict:
    return {
        "obs": adata.obs.copy(),
        "obsm": {k: np.array(v, copy=True) for k, v in adata.obsm.items()},
        "uns": sorted(adata.uns.keys()),
        "spatial": {lib: sorted(v) for lib, v in adata.uns.get("spatial", {}).items()},
        "var": adata.var.copy(),
    }


def assert_unchanged(adata: ad.AnnData, before: dict) -> None:
    pd.testing.assert_frame_equal(adata.obs, before["obs"])
    pd.testing.assert_frame_equal(adata.var, before["var"])
    assert sorted(adata.obsm.keys()) == sorted(before["obsm"])
    for k, v in before["obsm"].items():
        np.testing.assert_array_equal(np.asarray(adata.obsm[k]), v)
    assert sorted(adata.uns.keys()) == before["uns"]
    assert {lib: sorted(v) for lib, v in adata.uns.get("spatial", {}).items()} == before["spatial"]


def raises_unchanged(adata, exc, match, **kwargs):
    before = snapshot(adata)
    with pytest.raises(exc, match=match):
        extract_patches(adata, progress=False, **kwargs)
    assert_unchanged(adata, before)


@pytest.fixture(scope="module")
def cimg():
    return coord_image(300, 400)


# ----------------------------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("S", [7, 8, 31, 32])
def test_geometry_marker(S):
    """A marker at each spot centre pixel is the centre pixel patch[S // 2, S // 2] and the only marker there."""
    xy = np.array([[50.0, 60.0], [120.4, 80.6], [200.5, 150.49], [300.49, 40.5]])
    img = np.zeros((220, 380, 3), dtype=np.uint8)
    for x, y in xy:
        img[math.floor(y + 0.5), math.floor(x + 0.5)] = (255, 0, 255)
    adata = make_adata(xy, image=img)
    extract_patches(adata, patch_size=S, progress=False)
    patches = adata.obsm["patches"]
    assert patches.shape == (4, S, S, 3) and patches.dtype == np.uint8
    for p in patches:
        np.testing.assert_array_equal(p[S // 2, S // 2], [255, 0, 255])
        assert (p.sum(axis=-1) > 0).sum() == 1  # markers are far apart: only this spot's marker in the patch


@pytest.mark.parametrize("S", [9, 16])
def test_geometry_every_pixel(cimg, S):
    """Every pixel of a patch comes from the documented source position (rows and columns not swapped)."""
    xy = np.array([[100.2, 50.7], [250.0, 200.5], [399.4, 299.4]])  # the last one at the image corner
    adata = make_adata(xy, image=cimg)
    extract_patches(adata, patch_size=S, progress=False)
    for (x, y), p in zip(xy, adata.obsm["patches"], strict=True):
        ix, iy = math.floor(x + 0.5), math.floor(y + 0.5)
        rows, cols = decode_coords(p)
        inside = (np.arange(S)[:, None] + iy - S // 2 < 300) & (np.arange(S)[None, :] + ix - S // 2 < 400)
        exp_r = np.broadcast_to(np.arange(S)[:, None] + iy - S // 2, (S, S))
        exp_c = np.broadcast_to(np.arange(S)[None, :] + ix - S // 2, (S, S))
        np.testing.assert_array_equal(rows[inside], exp_r[inside])
        np.testing.assert_array_equal(cols[inside], exp_c[inside])
        assert (rows[S // 2, S // 2], cols[S // 2, S // 2]) == (iy, ix)


@pytest.mark.parametrize("pad", [255, 0, 17])
def test_border_padding_and_flag(cimg, pad):
    xy = np.array([[3.0, 4.0], [200.0, 150.0], [398.0, 150.0], [200.0, 299.0], [0.0, 0.0]])
    adata = make_adata(xy, image=cimg)
    extract_patches(adata, patch_size=20, pad_value=pad, progress=False)
    flag = adata.obs["patches_at_border"]
    assert flag.dtype == bool
    assert flag.tolist() == [True, False, True, True, True]
    for (x, y), p in zip(xy, adata.obsm["patches"], strict=True):
        np.testing.assert_array_equal(p, crop(cimg, x, y, 20, pad))
    # spot at (3, 4): columns 3 - 10 = -7 .. -1 and rows -6 .. -1 are padding
    p0 = adata.obsm["patches"][0]
    assert (p0[:, :7] == pad).all() and (p0[:6, :] == pad).all()
    assert not (p0[6:, 7:] == pad).all()


def test_patch_exactly_fits_is_not_border():
    img = coord_image(10, 12)
    adata = make_adata([[5.0, 5.0], [5.0, 6.0]], image=img)  # rows 1..10 of 10 cross the edge
    extract_patches(adata, patch_size=10, progress=False)
    assert adata.obs["patches_at_border"].tolist() == [False, True]


# ----------------------------------------------------------------------------------------------- API contract


def test_copy_and_inplace_equivalent(cimg):
    xy = np.array([[100.0, 100.0], [10.0, 290.0]])
    adata = make_adata(xy, image=cimg)
    before = snapshot(adata)
    out = extract_patches(adata, patch_size=16, copy=True, progress=False)
    assert isinstance(out, ad.AnnData)
    assert_unchanged(adata, before)  # copy=True leaves the input alone
    assert extract_patches(adata, patch_size=16, progress=False) is None
    np.testing.assert_array_equal(adata.obsm["patches"], out.obsm["patches"])
    pd.testing.assert_series_equal(adata.obs["patches_at_border"], out.obs["patches_at_border"])
    assert adata.uns["patches"]["params"] == out.uns["patches"]["params"]


def test_params_under_key_added(cimg):
    adata = make_adata([[100.0, 100.0]], image=cimg, mpp=0.25)
    extract_patches(adata, patch_size=16, key_added="hest", mpp=0.5, pad_value=0, progress=False)
    assert "patches" not in adata.obsm and "patches" not in adata.uns
    assert adata.obsm["hest"].shape == (1, 16, 16, 3)
    assert "hest_at_border" in adata.obs
    params = adata.uns["hest"]["params"]
    assert params["patch_size"] == 16
    assert params["mpp"] == 0.5
    assert params["pad_value"] == 0
    assert params["library_key"] is None
    assert params["library_id"] == ["s1"]
    assert params["source_mpp"] == {"s1": 0.25}
    assert params["source_patch_size"] == {"s1": 32}
    assert "fullres" in params["image_source"]["s1"]
    # a second run under another key does not overwrite the first
    extract_patches(adata, patch_size=8, key_added="small", progress=False)
    assert adata.obsm["hest"].shape[1] == 16 and adata.obsm["small"].shape[1] == 8
    assert adata.uns["small"]["params"]["mpp"] is None
    assert math.isclose(adata.uns["small"]["params"]["source_mpp"]["s1"], 0.25)


def test_several_libraries(cimg):
    img_b = 255 - cimg
    xy = np.array([[100.0, 100.0], [50.0, 60.0], [200.0, 250.0], [300.0, 30.0]])
    adata = make_adata(xy, image=cimg, lib="A")
    adata.uns["spatial"]["B"] = {"images": {"fullres": img_b}, "scalefactors": {}}
    adata.obs["library"] = pd.Categorical(["A", "B", "B", "A"])
    raises_unchanged(adata, ValueError, r"several libraries \['A', 'B'\].*library_key", patch_size=8)
    raises_unchanged(adata, ValueError, "either", patch_size=8, library_key="library", library_id="A")
    extract_patches(adata, patch_size=8, library_key="library", progress=False)
    for (x, y), lib, p in zip(xy, adata.obs["library"], adata.obsm["patches"], strict=True):
        np.testing.assert_array_equal(p, crop(cimg if lib == "A" else img_b, x, y, 8))
    params = adata.uns["patches"]["params"]
    assert params["library_key"] == "library" and params["library_id"] == ["A", "B"]
    assert set(params["image_source"]) == {"A", "B"}
    # library_id picks one library for all spots
    extract_patches(adata, patch_size=8, library_id="B", key_added="b", progress=False)
    np.testing.assert_array_equal(adata.obsm["b"][0], crop(img_b, 100, 100, 8))
    # image= as a dict per library overrides uns
    out = extract_patches(
        adata, patch_size=8, library_key="library", image={"A": img_b, "B": cimg}, copy=True, progress=False
    )
    np.testing.assert_array_equal(out.obsm["patches"][0], crop(img_b, 100, 100, 8))
    np.testing.assert_array_equal(out.obsm["patches"][1], crop(cimg, 50, 60, 8))


def test_each_library_image_opened_once(cimg, monkeypatch):
    calls = []
    real = image_mod.open_image

    def counting(image, **kwargs):
        calls.append(kwargs.get("what"))
        return real(image, **kwargs)

    monkeypatch.setattr("sthist.pp._patches.open_image", counting)
    adata = make_adata(np.tile([[100.0, 100.0]], (6, 1)), image=cimg, lib="A")
    adata.uns["spatial"]["B"] = {"images": {"fullres": cimg}}
    adata.obs["library"] = ["A", "B", "A", "B", "A", "B"]
    extract_patches(adata, patch_size=8, library_key="library", progress=False)
    assert len(calls) == 2


def test_library_errors(cimg):
    adata = make_adata([[10.0, 10.0]], image=cimg, lib="A")
    raises_unchanged(adata, KeyError, r"library_id='nope'.*available: \['A'\]", library_id="nope", patch_size=8)
    raises_unchanged(adata, KeyError, "not a column of adata.obs", library_key="section", patch_size=8)
    adata.obs["section"] = ["Z"]
    raises_unchanged(adata, KeyError, r"\['Z'\].*not in adata.uns\['spatial'\]", library_key="section", patch_size=8)
    adata.obs["section"] = pd.Series([np.nan], index=adata.obs_names, dtype=object)
    raises_unchanged(adata, ValueError, "missing values", library_key="section", patch_size=8)


def test_h5ad_round_trip(cimg, tmp_path):
    xy = np.array([[100.0, 100.0], [2.0, 2.0]])
    adata = make_adata(xy, image=cimg, mpp=0.5)
    extract_patches(adata, patch_size=12, progress=False)
    extract_patches(adata, patch_size=12, mpp=1.0, key_added="coarse", progress=False)
    adata.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    for key in ("patches", "coarse"):
        np.testing.assert_array_equal(back.obsm[key], adata.obsm[key])
        assert back.obsm[key].dtype == np.uint8
        assert back.obs[key + "_at_border"].dtype == bool
        pd.testing.assert_series_equal(back.obs[key + "_at_border"], adata.obs[key + "_at_border"])
        p_in, p_out = adata.uns[key]["params"], back.uns[key]["params"]
        assert set(p_in) == set(p_out)
        for k, v in p_in.items():
            if isinstance(v, list):
                assert list(p_out[k]) == v
            else:
                assert p_out[k] == v, k
    assert back.uns["coarse"]["params"]["mpp"] == 1.0


def test_progress_bar_can_be_turned_off(cimg, capsys):
    adata = make_adata([[100.0, 100.0]], image=cimg)
    extract_patches(adata, patch_size=8, progress=False)
    assert "patches" not in capsys.readouterr().err
    extract_patches(adata, patch_size=8, progress=True)
    assert "1/1" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- resampling


def test_mpp_resampling_matches_downsampled_crop():
    """A 2x source (0.25 µm/px) resampled to 0.5 µm/px equals the crop of the 2x2-averaged image."""
    base = (20 + 0.8 * smooth_image(160, 200, seed=3)).astype(np.uint8)  # the image at 0.5 µm/px, no clipping
    rng = np.random.default_rng(1)
    # a 0.25 µm/px source whose 2x2 blocks average to base (+-1 rounding): base plus zero-mean detail
    detail = rng.integers(-8, 9, (160, 200, 1, 1, 3))
    detail = np.concatenate([detail, -detail], axis=2)
    detail = np.concatenate([detail, detail[:, :, ::-1]], axis=3)  # (h, w, 2, 2, 3), each 2x2 block sums to 0
    src = np.clip(base[:, :, None, None, :].astype(int) + detail, 0, 255)
    src = src.transpose(0, 2, 1, 3, 4).reshape(320, 400, 3).astype(np.uint8)
    down = src.reshape(160, 2, 200, 2, 3).mean(axis=(1, 3))
    S = 24
    bxy = np.array([[60, 50], [120, 90], [100, 100]])
    xy = 2 * bxy + 0.5  # the source position of base pixel centres
    adata = make_adata(xy, image=src, mpp=0.25)
    extract_patches(adata, patch_size=S, mpp=0.5, progress=False)
    for (bx, by), p in zip(bxy, adata.obsm["patches"], strict=True):
        ref = down[by - S // 2 : by - S // 2 + S, bx - S // 2 : bx - S // 2 + S]
        assert np.abs(p.astype(float) - ref).max() <= 1.0
    assert adata.uns["patches"]["params"]["source_patch_size"] == {"s1": 2 * S}


def test_mpp_same_as_source_is_plain_crop_and_upsampling(cimg):
    adata = make_adata([[100.0, 120.0]], image=cimg, mpp=0.5)
    extract_patches(adata, patch_size=16, mpp=0.5, progress=False)
    np.testing.assert_array_equal(adata.obsm["patches"][0], crop(cimg, 100, 120, 16))
    img = smooth_image(200, 200)
    adata = make_adata([[100.0, 100.0]], image=img, mpp=0.5)
    extract_patches(adata, patch_size=32, mpp=0.25, progress=False)  # enlarge 2x
    p = adata.obsm["patches"][0].astype(float)
    ref = np.repeat(np.repeat(crop(img, 100, 100, 16).astype(float), 2, 0), 2, 1)
    assert np.abs(p - ref).mean() < 4
    assert adata.uns["patches"]["params"]["source_patch_size"] == {"s1": 16}


def test_mpp_from_file_metadata(tmp_path):
    """Without scalefactors, the OME-TIFF PhysicalSizeX gives the source mpp."""
    import tifffile

    img = smooth_image(256, 256)
    path = tmp_path / "a.ome.tif"
    tifffile.imwrite(
        path, img, photometric="rgb", tile=(128, 128), metadata={"PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25}
    )
    adata = make_adata([[128.0, 128.0]], path=path)
    extract_patches(adata, patch_size=16, mpp=0.5, progress=False)
    assert adata.uns["patches"]["params"]["source_mpp"] == {"s1": 0.25}
    assert adata.uns["patches"]["params"]["source_patch_size"] == {"s1": 32}


# ----------------------------------------------------------------------------------------------- backends


SPOTS = np.array([[40.3, 50.2], [200.0, 150.0], [390.0, 10.0], [255.5, 255.5], [128.0, 290.0]])


def _check_against(adata, ref: np.ndarray, S: int, atol: float = 0):
    for (x, y), p in zip(adata.obsm["spatial"], adata.obsm["patches"], strict=True):
        expected = crop(ref, x, y, S)
        if atol == 0:
            np.testing.assert_array_equal(p, expected)
        else:
            assert np.abs(p.astype(int) - expected).max() <= atol


def test_backend_jpeg(tmp_path):
    from PIL import Image

    img = smooth_image(300, 400)
    path = tmp_path / "he.jpg"
    Image.fromarray(img).save(path, quality=95)
    adata = make_adata(SPOTS, path=path)
    extract_patches(adata, patch_size=32, progress=False)
    _check_against(adata, np.asarray(Image.open(path).convert("RGB")), 32)  # equals the decoded file
    assert "JPEG" in adata.uns["patches"]["params"]["image_source"]["s1"]


def test_backend_png_and_palette(tmp_path):
    from PIL import Image

    img = coord_image(300, 400)
    Image.fromarray(img).save(tmp_path / "he.png")
    adata = make_adata(SPOTS, path=tmp_path / "he.png")
    extract_patches(adata, patch_size=21, progress=False)
    _check_against(adata, img, 21)
    pal = Image.fromarray(smooth_image(300, 400)).convert("P")
    pal.save(tmp_path / "pal.png")
    out = extract_patches(adata, patch_size=21, image=tmp_path / "pal.png", copy=True, progress=False)
    _check_against(out, np.asarray(pal.convert("RGB")), 21)


def test_backend_pil_source_decodes_once(tmp_path, monkeypatch):
    from PIL import Image, ImageFile

    img = smooth_image(300, 400)
    Image.fromarray(img).save(tmp_path / "he.png")
    n_decodes = []
    real = ImageFile.ImageFile.load

    def counting(self):
        if getattr(self, "tile", None):  # tiles still to decode: this load really decodes
            n_decodes.append(1)
        return real(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting)
    src = PILSource(tmp_path / "he.png")
    assert n_decodes == []  # opening reads the header only
    for x, y in SPOTS:
        np.testing.assert_array_equal(src.read_region(int(x) - 4, int(y) - 4, 8, 8), crop(img, int(x), int(y), 8))
    assert len(n_decodes) == 1
    src.close()


@pytest.mark.parametrize("compression", ["deflate", "jpeg"])
def test_backend_tiled_tiff(tmp_path, compression):
    import tifffile

    img = coord_image(300, 400) if compression == "deflate" else smooth_image(300, 400)
    path = tmp_path / "he.tif"
    tifffile.imwrite(path, img, photometric="rgb", tile=(64, 64), compression=compression)
    adata = make_adata(SPOTS, path=path)
    extract_patches(adata, patch_size=32, progress=False)
    _check_against(adata, tifffile.imread(path), 32)
    assert "tiles 64 x 64" in adata.uns["patches"]["params"]["image_source"]["s1"]


def test_backend_pyramidal_ome_tiff(tmp_path):
    import tifffile

    img = coord_image(300, 400)
    path = tmp_path / "he.ome.tif"
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(
            img,
            photometric="rgb",
            tile=(64, 64),
            compression="deflate",
            subifds=2,
            metadata={"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5},
        )
        tw.write(img[::2, ::2], photometric="rgb", tile=(64, 64), compression="deflate", subfiletype=1)
        tw.write(img[::4, ::4], photometric="rgb", tile=(64, 64), compression="deflate", subfiletype=1)
    with tifffile.TiffFile(path) as tf:
        assert tf.is_ome and len(tf.series[0].levels) == 3
    adata = make_adata(SPOTS, path=path)
    extract_patches(adata, patch_size=24, progress=False)
    _check_against(adata, img, 24)
    desc = adata.uns["patches"]["params"]["image_source"]["s1"]
    assert "OME-TIFF" in desc and "level 0 of 3" in desc
    assert adata.uns["patches"]["params"]["source_mpp"] == {"s1": 0.5}


def test_tiled_tiff_reads_only_touched_tiles(tmp_path):
    """A tiled TIFF is read tile by tile: a few spots decode only the tiles under their patches, each once."""
    import tifffile

    img = coord_image(1024, 1024)
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, img, photometric="rgb", tile=(256, 256), compression="deflate")
    src = open_image(path)
    assert isinstance(src, TiffSource) and src.block_shape == (256, 256)
    np.testing.assert_array_equal(src.read_region(300, 400, 50, 40), img[400:440, 300:350])
    assert src.blocks_read == 1
    np.testing.assert_array_equal(src.read_region(240, 420, 32, 32), img[420:452, 240:272])  # two tiles, one cached
    assert src.blocks_read == 2
    np.testing.assert_array_equal(src.read_region(1000, 1010, 40, 40), crop(img, 1000 + 20, 1010 + 20, 40))
    assert src.blocks_read == 3  # only tile (3, 3) lies inside the image
    assert sorted(src._cache) == [(1, 0), (1, 1), (3, 3)]
    src.release_above(512)  # row-major visits past row 512 never need tile row 1 again
    assert sorted(src._cache) == [(3, 3)] and src._cached == 256 * 256 * 3
    src.close()
    # many spots visited in tile order: every touched tile decoded once, untouched tiles never
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 500, (200, 2))
    adata = make_adata(xy, path=path)
    calls = []
    real = TiffSource._load

    def counting(self, x0, y0, x1, y1):
        calls.append((x0, y0))
        return real(self, x0, y0, x1, y1)

    import sthist.pp._image as m

    mp = pytest.MonkeyPatch()
    mp.setattr(m.TiffSource, "_load", counting)
    try:
        extract_patches(adata, patch_size=16, progress=False)
    finally:
        mp.undo()
    assert len(calls) == len(set(calls)) <= 9  # spots within 0..516 px touch at most 3 x 3 tiles
    _check_against(adata, img, 16)


def test_strip_tiff_small_and_large(tmp_path, monkeypatch):
    import tifffile

    img = coord_image(300, 400)
    path = tmp_path / "strips.tif"
    tifffile.imwrite(path, img, photometric="rgb", rowsperstrip=16, compression="deflate")
    src = open_image(path)
    assert "small: read whole" in src.description and src.block_shape == (300, 400)
    src.close()
    monkeypatch.setattr(image_mod, "SMALL_TIFF_BYTES", 1000)  # pretend it is large: bands of whole strips
    src = open_image(path)
    assert src.block_shape == (256, 400) and "strips of 16 rows" in src.description
    src.close()
    adata = make_adata(SPOTS, path=path)
    extract_patches(adata, patch_size=30, progress=False)
    _check_against(adata, img, 30)


def test_backend_numpy_and_dask(cimg):
    import dask.array as da

    adata = make_adata(SPOTS, image=cimg)
    extract_patches(adata, patch_size=20, progress=False)
    _check_against(adata, cimg, 20)
    out = extract_patches(
        make_adata(SPOTS), patch_size=20, image=da.from_array(cimg, chunks=(100, 128, 3)), copy=True, progress=False
    )
    np.testing.assert_array_equal(out.obsm["patches"], adata.obsm["patches"])
    # image= without any uns['spatial']
    out = extract_patches(make_adata(SPOTS, lib=None), patch_size=20, image=cimg, copy=True, progress=False)
    np.testing.assert_array_equal(out.obsm["patches"], adata.obsm["patches"])
    assert out.uns["patches"]["params"]["library_id"] == ["image"]


def test_backend_spatialdata_object(cimg):
    import spatialdata as sd
    from spatialdata.models import Image2DModel

    chw = np.ascontiguousarray(cimg.transpose(2, 0, 1))
    multiscale = Image2DModel.parse(chw, dims=("c", "y", "x"), scale_factors=[2], chunks=(3, 64, 64))
    single = Image2DModel.parse(chw, dims=("c", "y", "x"))
    sdata = sd.SpatialData(images={"he": multiscale, "other": single})
    adata = make_adata(SPOTS)
    raises_unchanged(adata, ValueError, r"2 images.*image_key", image=sdata, patch_size=20)
    raises_unchanged(adata, KeyError, "available images", image=sdata, image_key="nope", patch_size=20)
    extract_patches(adata, patch_size=20, image=sdata, image_key="he", progress=False)
    _check_against(adata, cimg, 20)
    assert "'he'" in adata.uns["patches"]["params"]["image_source"]["s1"]
    for element in (multiscale, single):  # the xarray image itself
        out = extract_patches(adata, patch_size=20, image=element, copy=True, progress=False)
        np.testing.assert_array_equal(out.obsm["patches"], adata.obsm["patches"])


def test_backend_spatialdata_zarr_store(cimg, tmp_path):
    import spatialdata as sd
    from spatialdata.models import Image2DModel

    chw = np.ascontiguousarray(cimg.transpose(2, 0, 1))
    sdata = sd.SpatialData(
        images={
            "he_full": Image2DModel.parse(chw, dims=("c", "y", "x"), scale_factors=[2], chunks=(3, 128, 128)),
            "he_small": Image2DModel.parse(chw[:, ::4, ::4].copy(), dims=("c", "y", "x")),
        }
    )
    store = tmp_path / "sample.zarr"
    sdata.write(store)
    adata = make_adata(SPOTS, path=store, key="he_full")
    extract_patches(adata, patch_size=20, progress=False)
    _check_against(adata, cimg, 20)
    desc = adata.uns["patches"]["params"]["image_source"]["s1"]
    assert "SpatialData store" in desc and "he_full" in desc
    # without source_image_key the store is ambiguous
    adata2 = make_adata(SPOTS, path=store)
    raises_unchanged(adata2, ValueError, "image_key", patch_size=20)


def _write_svs_like(path, img, mpp=0.5):
    """A small tiled pyramidal TIFF with an Aperio description: openslide opens it as an .svs slide."""
    import tifffile

    h, w = img.shape[:2]
    desc = f"Aperio Image Library v10.0.50\r\n{w}x{h} [0,0 {w}x{h}] (64x64) RAW/RGB|AppMag = 20|MPP = {mpp}"
    with tifffile.TiffWriter(path) as tw:
        tw.write(img, photometric="rgb", tile=(64, 64), compression="deflate", description=desc, metadata=None)
        small = img[::4, ::4]
        tw.write(
            small,
            photometric="rgb",
            tile=(64, 64),
            compression="deflate",
            metadata=None,
            description=f"Aperio Image Library v10.0.50\r\n{w}x{h} -> {small.shape[1]}x{small.shape[0]}",
        )


def test_backend_openslide(cimg, tmp_path):
    path = tmp_path / "slide.svs"
    _write_svs_like(path, cimg, mpp=0.5)
    src = open_image(path)
    assert isinstance(src, OpenSlideSource) and src.mpp == pytest.approx(0.5) and src.shape == (300, 400)
    assert "aperio" in src.description
    np.testing.assert_array_equal(src.read_region(-5, 290, 20, 20), crop(cimg, 5, 300, 20))
    src.close()
    adata = make_adata(SPOTS, path=path)
    extract_patches(adata, patch_size=20, mpp=1.0, progress=False)  # source mpp from the slide's metadata
    assert adata.uns["patches"]["params"]["source_mpp"] == {"s1": pytest.approx(0.5)}
    extract_patches(adata, patch_size=20, progress=False)
    _check_against(adata, cimg, 20)
    assert "openslide" in adata.uns["patches"]["params"]["image_source"]["s1"]


def test_backend_selection_by_format(tmp_path, cimg):
    """Suffix -> backend: JPEG/PNG -> PIL, TIFF -> tifffile, whole-slide formats -> openslide (tifffile fallback)."""
    import tifffile
    from PIL import Image

    Image.fromarray(cimg).save(tmp_path / "a.png")
    tifffile.imwrite(tmp_path / "a.tif", cimg, photometric="rgb", tile=(64, 64))
    tifffile.imwrite(tmp_path / "plain.svs", cimg, photometric="rgb", tile=(64, 64))  # no Aperio header
    _write_svs_like(tmp_path / "b.svs", cimg)
    _write_svs_like(tmp_path / "b_no_suffix", cimg)  # unknown suffix: openslide recognises the content
    kinds = {
        "a.png": PILSource,
        "a.tif": TiffSource,
        "b.svs": OpenSlideSource,
        "b_no_suffix": OpenSlideSource,
    }
    for name, cls in kinds.items():
        with open_image(tmp_path / name) as src:
            assert type(src) is cls, name
            np.testing.assert_array_equal(src.read_region(10, 20, 30, 40), cimg[20:60, 10:40])
    with open_image(tmp_path / "plain.svs") as src:  # openslide reads it as generic TIFF, or tifffile does
        assert isinstance(src, OpenSlideSource | TiffSource)
        np.testing.assert_array_equal(src.read_region(10, 20, 30, 40), cimg[20:60, 10:40])


# ----------------------------------------------------------------------------------------------- bad input


def test_spots_outside_image(cimg):
    xy = np.array([[10.0, 10.0], [4000.0, 2500.0], [-3.0, 5.0]])
    adata = make_adata(xy, image=cimg)
    before = snapshot(adata)
    with pytest.raises(ValueError, match="outside its image") as e:
        extract_patches(adata, patch_size=8, progress=False)
    assert "spot1" in str(e.value) and "spot2" in str(e.value) and "hires" in str(e.value)
    assert_unchanged(adata, before)
    # swapped x and y are recognised
    adata = make_adata([[50.0, 350.0]], image=cimg)
    raises_unchanged(adata, ValueError, "swapped", patch_size=8)


def test_missing_spatial_and_empty(cimg):
    adata = make_adata([[10.0, 10.0]], image=cimg)
    del adata.obsm["spatial"]
    raises_unchanged(adata, KeyError, r"obsm\['spatial'\] is missing", patch_size=8)
    empty = make_adata(np.zeros((0, 2)), image=cimg)
    raises_unchanged(empty, ValueError, "empty AnnData", patch_size=8)
    with pytest.raises(TypeError, match="AnnData"):
        extract_patches(cimg)


@pytest.mark.parametrize(
    ("img", "exc", "match"),
    [
        (np.zeros((300, 400), np.uint8), ValueError, "grayscale.*np.repeat"),
        (np.zeros((300, 400, 1), np.uint8), ValueError, "grayscale"),
        (np.zeros((300, 400, 4), np.uint8), ValueError, r"RGBA.*img\[\.\.\., :3\]"),
        (np.zeros((300, 400, 3), np.uint16), TypeError, "uint16.*8-bit RGB.*astype"),
        (np.zeros((300, 400, 3), np.float32), TypeError, r"float32.*np.clip\(img, 0, 1\)"),
        (np.zeros((3, 300, 400), np.uint8), ValueError, "channel-first"),
        (np.zeros((300, 400, 2), np.uint8), ValueError, "2 channels"),
    ],
)
def test_bad_image_arrays(img, exc, match):
    adata = make_adata([[10.0, 10.0]], image=img)
    raises_unchanged(adata, exc, match, patch_size=8)
    adata = make_adata([[10.0, 10.0]])
    raises_unchanged(adata, exc, match, patch_size=8, image=img)


def test_bad_image_files(tmp_path):
    import tifffile
    from PIL import Image

    Image.fromarray(np.zeros((50, 60), np.uint8)).save(tmp_path / "gray.png")
    Image.fromarray(np.zeros((50, 60, 4), np.uint8)).save(tmp_path / "rgba.png")
    tifffile.imwrite(tmp_path / "deep.tif", np.zeros((50, 60, 3), np.uint16), photometric="rgb", tile=(16, 16))
    tifffile.imwrite(tmp_path / "gray.tif", np.zeros((50, 60), np.uint8), tile=(16, 16))
    tifffile.imwrite(tmp_path / "rgba.tif", np.zeros((50, 60, 4), np.uint8), photometric="rgb", extrasamples=[2])
    cases = {
        "gray.png": (ValueError, "grayscale"),
        "rgba.png": (ValueError, "RGBA"),
        "deep.tif": (TypeError, "uint16.*8-bit RGB"),
        "gray.tif": (ValueError, "grayscale"),
        "rgba.tif": (ValueError, "RGBA"),
    }
    for name, (exc, match) in cases.items():
        adata = make_adata([[10.0, 10.0]], path=tmp_path / name)
        raises_unchanged(adata, exc, match, patch_size=8)
        raises_unchanged(make_adata([[10.0, 10.0]]), exc, match, patch_size=8, image=tmp_path / name)


def test_missing_image(tmp_path):
    adata = make_adata([[10.0, 10.0]], path=tmp_path / "nope.jpg")
    raises_unchanged(adata, FileNotFoundError, r"nope.jpg.*does not exist.*source_image_path", patch_size=8)
    raises_unchanged(adata, FileNotFoundError, "does not exist", patch_size=8, image=tmp_path / "gone.tif")
    adata = make_adata([[10.0, 10.0]])
    adata.uns["spatial"]["s1"]["images"]["hires"] = np.zeros((30, 40, 3), np.uint8)
    before = snapshot(adata)
    with pytest.raises(KeyError) as e:
        extract_patches(adata, patch_size=8, progress=False)
    msg = str(e.value)
    assert "image=" in msg and "fullres" in msg and "source_image_path" in msg and "['hires']" in msg
    assert_unchanged(adata, before)
    raises_unchanged(make_adata([[1.0, 1.0]], lib=None), KeyError, "no library", patch_size=8)


@pytest.mark.parametrize("size", [0, -3, 2.5, True, "224"])
def test_bad_patch_size(cimg, size):
    raises_unchanged(make_adata([[10.0, 10.0]], image=cimg), ValueError, "patch_size", patch_size=size)


def test_patch_larger_than_image(cimg):
    adata = make_adata([[10.0, 10.0]], image=cimg, mpp=0.5)
    raises_unchanged(adata, ValueError, "larger than .*300", patch_size=301)
    raises_unchanged(adata, ValueError, r"mpp=2.0 \(320 source pixels\).*larger", patch_size=80, mpp=2.0)


@pytest.mark.parametrize(
    ("mpp", "exc"), [(0, ValueError), (-0.5, ValueError), (float("nan"), ValueError), ("0.5", TypeError)]
)
def test_bad_mpp(cimg, mpp, exc):
    raises_unchanged(make_adata([[10.0, 10.0]], image=cimg, mpp=0.25), exc, "mpp", patch_size=8, mpp=mpp)


def test_mpp_unknown(cimg):
    adata = make_adata([[100.0, 100.0]], image=cimg)
    raises_unchanged(adata, ValueError, r"microns_per_pixel'\] = ", patch_size=8, mpp=0.5)


def test_bad_pad_value_and_key(cimg):
    adata = make_adata([[100.0, 100.0]], image=cimg)
    raises_unchanged(adata, ValueError, "pad_value", patch_size=8, pad_value=256)
    raises_unchanged(adata, ValueError, "key_added", patch_size=8, key_added="")


def test_single_image_for_several_libraries(cimg):
    adata = make_adata([[10.0, 10.0], [20.0, 20.0]], image=cimg, lib="A")
    adata.uns["spatial"]["B"] = {"images": {"fullres": cimg}}
    adata.obs["lib"] = ["A", "B"]
    raises_unchanged(adata, ValueError, r"one image.*dict", patch_size=8, library_key="lib", image=cimg)
    raises_unchanged(
        adata, KeyError, r"no entry for libraries \['B'\]", patch_size=8, library_key="lib", image={"A": cimg}
    )


def test_error_in_second_library_writes_nothing(cimg):
    adata = make_adata([[10.0, 10.0], [20.0, 20.0]], image=cimg, lib="A")
    adata.uns["spatial"]["B"] = {"images": {"fullres": np.zeros((300, 400, 4), np.uint8)}}
    adata.obs["lib"] = ["A", "B"]
    raises_unchanged(adata, ValueError, "RGBA", patch_size=8, library_key="lib")


# ----------------------------------------------------------------------------------------------- real data


@pytest.mark.realdata
@pytest.mark.skipif(not HER2ST.exists(), reason=f"her2st subset not found at {HER2ST}")
def test_her2st_jpeg_patch_equals_direct_crop(monkeypatch):
    """On the her2st C3 JPEG, a patch equals the crop of the decoded JPEG around round-half-up(pixel_x, pixel_y)."""
    from PIL import Image

    spots = pd.read_csv(HER2ST / "data" / "ST-spotfiles" / "C3_selection.tsv", sep="\t")
    jpg = next((HER2ST / "data" / "ST-imgs" / "C" / "C3").glob("*.jpg"))
    spots = spots.iloc[::20]  # a few spots keep the test fast; the image is decoded once anyway
    adata = ad.AnnData(
        obs=pd.DataFrame(index=[f"{x}x{y}" for x, y in zip(spots["x"], spots["y"], strict=True)]),
        obsm={"spatial": spots[["pixel_x", "pixel_y"]].to_numpy(dtype=float)},
    )
    adata.uns["spatial"] = {"C3": {"metadata": {"source_image_path": str(jpg)}, "scalefactors": {}}}
    extract_patches(adata, patch_size=224, progress=False)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # the slide is larger than PIL's default guard
    full = np.asarray(Image.open(jpg).convert("RGB"))
    assert adata.obsm["patches"].shape == (len(spots), 224, 224, 3)
    for (x, y), p in zip(adata.obsm["spatial"], adata.obsm["patches"], strict=True):
        ix, iy = math.floor(x + 0.5), math.floor(y + 0.5)
        np.testing.assert_array_equal(p, full[iy - 112 : iy + 112, ix - 112 : ix + 112])
    assert not adata.obs["patches_at_border"].any()
