"""Whole-slide tiling (`sthist.pp.tile_tissue`) and prediction (`sthist.tl.predict_slide`) on a synthetic slide."""

from types import SimpleNamespace

import numpy as np
import pytest

import sthist as st

H, W, MPP = 3072, 4096, 0.5  # the synthetic slide: 4096 x 3072 px at 0.5 µm/px
CX, CY, A, B = 2048.0, 1536.0, 1500.0, 1000.0  # tissue: an ellipse centred at (CX, CY), semi-axes A (x) and B (y)
SIDE = 224  # 112 µm pseudo-spots at 0.5 µm/px


def _slide_pixels() -> np.ndarray:
    """A textured pink/purple ellipse of tissue on a near-white background (separable terms: fast to build)."""
    y = np.arange(H, dtype=np.float32)[:, None]
    x = np.arange(W, dtype=np.float32)[None, :]
    inside = ((x - CX) / A) ** 2 + ((y - CY) / B) ** 2 <= 1
    # sin((x + 2y) / 31) = sin(x/31) cos(2y/31) + cos(x/31) sin(2y/31)
    waves = np.sin(x / 7) * np.sin(y / 9) + 0.4 * (
        np.sin(x / 31) * np.cos(2 * y / 31) + np.cos(x / 31) * np.sin(2 * y / 31)
    )
    nuclei = np.clip(waves, 0, None)
    noise = np.random.default_rng(0).integers(-8, 9, (H, W), dtype=np.int16).astype(np.float32)
    img = np.empty((H, W, 3), dtype=np.uint8)
    for c, (base, amp) in enumerate(((225, 70), (140, 80), (200, 30))):
        img[..., c] = np.where(inside, np.clip(base - amp * nuclei + noise, 0, 255), 245)
    return img


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    """A tiled pyramidal JPEG OME-TIFF (256 px tiles, 3 levels, PhysicalSizeX) and its pixels."""
    import tifffile

    img = _slide_pixels()
    path = tmp_path_factory.mktemp("wsi") / "slide.ome.tif"
    opts = {"tile": (256, 256), "compression": "jpeg", "photometric": "rgb"}
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(img, subifds=2, metadata={"axes": "YXS", "PhysicalSizeX": MPP, "PhysicalSizeY": MPP}, **opts)
        for k in (1, 2):
            f = 2**k
            tw.write(img.reshape(H // f, f, W // f, f, 3).mean(axis=(1, 3)).astype(np.uint8), subfiletype=1, **opts)
    return SimpleNamespace(path=path, img=img)


def _ellipse_fraction(xy: np.ndarray, side: float = SIDE, n: int = 32) -> np.ndarray:
    """Fraction of each square (centre ``xy``, level-0 px) inside the ellipse, by supersampling n x n points."""
    g = (np.arange(n) + 0.5) / n * side - side / 2
    ox, oy = np.meshgrid(g, g)
    x = xy[:, 0, None, None] + ox
    y = xy[:, 1, None, None] + oy
    return ((((x - CX) / A) ** 2 + ((y - CY) / B) ** 2) <= 1).mean(axis=(1, 2))


def _grid(pitch: float, shape=(H, W)) -> np.ndarray:
    """Every cell centre of the documented grid, (x, y) row-major."""
    cols = (np.arange(int(np.ceil(shape[1] / pitch))) + 0.5) * pitch - 0.5
    rows = (np.arange(int(np.ceil(shape[0] / pitch))) + 0.5) * pitch - 0.5
    cols, rows = cols[cols < shape[1] - 0.5], rows[rows < shape[0] - 0.5]
    yy, xx = np.meshgrid(rows, cols, indexing="ij")
    return np.column_stack([xx.ravel(), yy.ravel()])


def test_tiles_cover_the_tissue(slide, tmp_path):
    tiles = st.pp.tile_tissue(slide.path, spot_diameter=112)
    assert tiles.n_vars == 0
    assert {"array_row", "array_col", "tissue_fraction", "in_tissue"} <= set(tiles.obs)
    xy = tiles.obsm["spatial"]
    # the measured tissue fraction matches the ellipse (mask pixels are 4 px; JPEG and morphology blur the edge)
    truth = _ellipse_fraction(xy)
    np.testing.assert_allclose(tiles.obs["tissue_fraction"], truth, atol=0.02)
    frac = tiles.obs["tissue_fraction"].to_numpy()
    assert ((frac >= 0.5) & (frac <= 1)).all()
    # exactly the grid cells that are at least half inside the ellipse, apart from cells within 0.02 of the cut
    grid = _grid(SIDE)
    grid_truth = _ellipse_fraction(grid)
    kept = {tuple(p) for p in np.round(xy, 6)}
    for p, f in zip(np.round(grid, 6), grid_truth, strict=True):
        if abs(f - 0.5) > 0.02:
            assert (tuple(p) in kept) == (f >= 0.5), (p, f)
    # so the count is the tissue area over the cell area, up to the cells cut by the boundary
    expected = np.pi * A * B / SIDE**2
    assert abs(tiles.n_obs - expected) < 0.1 * expected
    # every centre lies in the ellipse grown by half a pseudo-spot
    assert ((((xy[:, 0] - CX) / (A + SIDE / 2)) ** 2 + ((xy[:, 1] - CY) / (B + SIDE / 2)) ** 2) <= 1).all()
    # grid indices and centres agree with the pitch
    np.testing.assert_allclose(xy[:, 0], (tiles.obs["array_col"] + 0.5) * SIDE - 0.5)
    np.testing.assert_allclose(xy[:, 1], (tiles.obs["array_row"] + 0.5) * SIDE - 0.5)
    lib = tiles.uns["spatial"]["slide"]
    assert lib["scalefactors"]["spot_diameter_fullres"] == SIDE
    assert lib["scalefactors"]["microns_per_pixel"] == MPP
    assert lib["metadata"]["source_image_path"] == str(slide.path.resolve())
    hires = lib["images"]["hires"]
    assert hires.dtype == np.uint8 and hires.shape == (768, 1024, 3)
    assert lib["scalefactors"]["tissue_hires_scalef"] == pytest.approx(1024 / W)
    assert tiles.obs_names.is_unique
    import anndata as ad

    tiles.write_h5ad(tmp_path / "tiles.h5ad")
    back = ad.read_h5ad(tmp_path / "tiles.h5ad")
    np.testing.assert_array_equal(back.obsm["spatial"], xy)
    np.testing.assert_array_equal(back.uns["spatial"]["slide"]["images"]["hires"], hires)
    assert back.uns["tile_tissue"]["params"]["pitch_px"] == SIDE


def test_spacing_and_min_tissue(slide):
    tiles = st.pp.tile_tissue(slide.path, spot_diameter=56, spacing=150, min_tissue=0.9)
    xy = tiles.obsm["spatial"]
    pitch = 150 / MPP
    steps = np.diff(np.unique(xy[:, 0]))
    np.testing.assert_allclose(steps[steps < 1.5 * pitch], pitch)  # neighbouring columns are one pitch apart
    np.testing.assert_allclose(xy[:, 0], (tiles.obs["array_col"] + 0.5) * pitch - 0.5)
    assert (tiles.obs["tissue_fraction"] >= 0.9).all()
    np.testing.assert_allclose(tiles.obs["tissue_fraction"], _ellipse_fraction(xy, side=112), atol=0.03)
    assert tiles.uns["tile_tissue"]["params"]["pitch_px"] == pitch
    everything = st.pp.tile_tissue(slide.path, min_tissue=0)
    assert everything.n_obs == len(_grid(SIDE))  # min_tissue=0 keeps the whole grid
    assert set(everything.obs["in_tissue"]) == {0, 1}
    np.testing.assert_array_equal(everything.obs["in_tissue"], everything.obs["tissue_fraction"] >= 0.5)


def test_level_zero_is_never_read(slide, monkeypatch):
    from sthist.pp import _image

    loads = []
    real = _image.TiffSource._load
    monkeypatch.setattr(_image.TiffSource, "_load", lambda self, *a: loads.append(a) or real(self, *a))
    tiles = st.pp.tile_tissue(slide.path)
    params = tiles.uns["tile_tissue"]["params"]
    assert loads == []  # no level-0 tile was decoded
    assert params["detection_level"].startswith("TIFF level 2")
    assert params["detection_shape"] == [768, 1024]
    st.pp.extract_patches(tiles[:3].copy(), patch_size=SIDE, progress=False)
    assert loads  # the counter does see level-0 reads


def test_user_tissue_mask(slide):
    # a rectangle at 1/8 resolution: columns 50-249, rows 100-299 -> level-0 edges [400, 2000) x [800, 2400) - 0.5
    mask = np.zeros((H // 8, W // 8), dtype=bool)
    mask[100:300, 50:250] = True
    tiles = st.pp.tile_tissue(slide.path, tissue_mask=mask, min_tissue=0.25)
    xy = tiles.obsm["spatial"]

    def overlap(c, lo, hi):
        return np.clip(np.minimum(c + SIDE / 2, hi) - np.maximum(c - SIDE / 2, lo), 0, None) / SIDE

    grid = _grid(SIDE)
    exact = overlap(grid[:, 0], 399.5, 1999.5) * overlap(grid[:, 1], 799.5, 2399.5)
    np.testing.assert_allclose(xy, grid[exact >= 0.25])
    np.testing.assert_allclose(tiles.obs["tissue_fraction"], exact[exact >= 0.25], atol=1e-6)
    assert tiles.uns["tile_tissue"]["params"]["tissue_mask"]
    with pytest.raises(ValueError, match="transposed"):
        st.pp.tile_tissue(slide.path, tissue_mask=mask.T)
    with pytest.raises(TypeError, match="boolean"):
        st.pp.tile_tissue(slide.path, tissue_mask=mask * 0.5)


def test_array_input_and_patches(slide):
    tiles = st.pp.tile_tissue(slide.path)
    from_array = st.pp.tile_tissue(slide.img, mpp=MPP)
    # the array is averaged down from level 0 band by band: same tissue up to the cells cut by the boundary
    a = {tuple(p) for p in tiles.obsm["spatial"]}
    b = {tuple(p) for p in from_array.obsm["spatial"]}
    differ = np.array(sorted(a ^ b)).reshape(-1, 2)
    assert (np.abs(_ellipse_fraction(differ) - 0.5) < 0.02).all()
    np.testing.assert_allclose(
        from_array.obs["tissue_fraction"], _ellipse_fraction(from_array.obsm["spatial"]), atol=0.02
    )
    assert from_array.uns["spatial"]["slide"]["images"]["fullres"] is slide.img
    # extract_patches reads the slide from the path that tile_tissue recorded
    st.pp.extract_patches(tiles, patch_size=SIDE, progress=False)
    patches = tiles.obsm["patches"]
    assert patches.shape == (tiles.n_obs, SIDE, SIDE, 3)
    x, y = (np.floor(tiles.obsm["spatial"][0] + 0.5).astype(int) - SIDE // 2).tolist()
    jpeg_error = np.abs(patches[0].astype(int) - slide.img[y : y + SIDE, x : x + SIDE].astype(int))
    assert jpeg_error.mean() < 4  # the same place of the slide (JPEG-compressed)
    st.pp.extract_patches(from_array, patch_size=SIDE, progress=False)
    assert from_array.obsm["patches"].shape[0] == from_array.n_obs


def test_bad_input(slide, tmp_path):
    with pytest.raises(ValueError, match="mpp="):
        st.pp.tile_tissue(slide.img)  # an array has no metadata
    for bad in (0, -5.0, float("nan")):
        with pytest.raises(ValueError, match="spot_diameter"):
            st.pp.tile_tissue(slide.path, spot_diameter=bad)
    with pytest.raises(ValueError, match="spacing"):
        st.pp.tile_tissue(slide.path, spacing=0)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="min_tissue"):
            st.pp.tile_tissue(slide.path, min_tissue=bad)
    with pytest.raises(ValueError, match="larger than the slide"):
        st.pp.tile_tissue(slide.path, spot_diameter=5000)
    blank = np.full((512, 512, 3), 245, dtype=np.uint8)
    with pytest.raises(ValueError, match=r"min_tissue=0\.5.*tissue_mask"):
        st.pp.tile_tissue(blank, mpp=1.0, spot_diameter=50)
    with pytest.raises(ValueError, match="min_tissue"):
        st.pp.tile_tissue(slide.path, tissue_mask=np.zeros((30, 40), dtype=bool))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        st.pp.tile_tissue(tmp_path / "missing.ome.tif")


# --------------------------------------------------------------------------------------------- prediction


@pytest.fixture(scope="module")
def toy_models():
    """A BLEEP model and a ridge probe fitted on toy data with frozen hed-fast features (48 px, 1 µm/px)."""
    adata = st.datasets.toy(n_rows=8, n_cols=8, n_genes=20, seed=0)
    st.pp.extract_patches(adata, patch_size=48, mpp=1.0, progress=False)
    st.pp.normalize_expression(adata)
    st.pp.embed_patches(adata, progress=False)
    bleep = st.tl.fit_contrastive(adata, layer="targets", max_epochs=3, progress=False, device="cpu")
    ridge = st.tl.fit_ridge(adata, features_key="X_hed_fast", layer="targets")
    return SimpleNamespace(bleep=bleep, ridge=ridge)


SLIDE_KW = {"spot_diameter": 224, "progress": False, "device": "cpu"}  # 448 px pseudo-spots: ~24 on the ellipse


def test_predict_slide_chunked_equals_whole(slide, toy_models, tmp_path):
    model = toy_models.bleep
    pred = st.tl.predict_slide(slide.path, model, chunk_size=10_000, **SLIDE_KW)
    chunked = st.tl.predict_slide(slide.path, model, chunk_size=5, **SLIDE_KW)
    tiles = st.pp.tile_tissue(slide.path, spot_diameter=224)
    assert list(pred.var_names) == list(model.genes)
    assert pred.n_obs == tiles.n_obs > 5
    np.testing.assert_array_equal(pred.obsm["spatial"], tiles.obsm["spatial"])
    assert pred.uns["spatial"]["slide"]["scalefactors"] == tiles.uns["spatial"]["slide"]["scalefactors"]
    assert np.isfinite(pred.X).all()
    np.testing.assert_array_equal(pred.layers["predicted"], pred.X)
    assert pred.var["predicted_modelled"].all()
    assert np.isfinite(pred.obs["predicted_spread"]).all()
    # the patches were cut at the model's geometry: 48 px at 1 µm/px, i.e. 96 slide pixels resized
    params = pred.uns["predicted"]["params"]
    assert params["patch_size"] == 48 and params["patch_mpp"] == 1.0 and params["chunk_size"] == 10_000
    assert pred.uns["X_hed_fast"]["params"]["patch_size"] == 48
    # chunks change only how many patches are in memory at once, not the result (float32 batches of other sizes)
    np.testing.assert_allclose(chunked.obsm["X_hed_fast"], pred.obsm["X_hed_fast"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(chunked.X, pred.X, rtol=1e-5, atol=1e-6)
    # the features are those of extract_patches + embed_patches on the pseudo-spots
    st.pp.extract_patches(tiles, patch_size=48, mpp=1.0, progress=False)
    st.pp.embed_patches(tiles, progress=False)
    np.testing.assert_allclose(pred.obsm["X_hed_fast"], tiles.obsm["X_hed_fast"], rtol=1e-5, atol=1e-6)
    # a ridge probe predicts from the same features
    ridge = st.tl.predict_slide(slide.path, toy_models.ridge, chunk_size=5, **SLIDE_KW)
    np.testing.assert_allclose(
        ridge.X, toy_models.ridge.predict(features=pred.obsm["X_hed_fast"]).expression, rtol=1e-4, atol=1e-5
    )
    import anndata as ad

    pred.write_h5ad(tmp_path / "pred.h5ad")
    back = ad.read_h5ad(tmp_path / "pred.h5ad")
    np.testing.assert_array_equal(back.layers["predicted"], pred.X)
    assert back.uns["predicted"]["params"]["patch_size"] == 48

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import squidpy as sq

    sq.pl.spatial_scatter(pred, color=pred.var_names[0], library_id="slide", shape="square", img_res_key="hires")
    fig = plt.gcf()
    out = tmp_path / "slide_prediction.png"
    fig.savefig(out, dpi=40)
    plt.close(fig)
    assert out.stat().st_size > 1000
    assert sum(len(ax.collections) for ax in fig.axes) > 0  # the pseudo-spots were drawn over the thumbnail
    assert sum(len(ax.images) for ax in fig.axes) > 0


def test_predict_slide_with_store_keeps_lazy_patches(slide, toy_models, tmp_path):
    import dask.array as da

    model = toy_models.bleep
    in_memory = st.tl.predict_slide(slide.path, model, chunk_size=5, **SLIDE_KW)
    on_disk = st.tl.predict_slide(slide.path, model, store=tmp_path / "slide.zarr", **SLIDE_KW)
    np.testing.assert_allclose(on_disk.X, in_memory.X, rtol=1e-5, atol=1e-6)
    assert isinstance(on_disk.obsm["patches"], da.Array)
    assert on_disk.uns["patches"]["params"]["store"] == str((tmp_path / "slide.zarr").absolute())
    tiles = st.pp.tile_tissue(slide.path, spot_diameter=224)
    st.pp.extract_patches(tiles, patch_size=48, mpp=1.0, progress=False)
    np.testing.assert_array_equal(on_disk.obsm["patches"].compute(), tiles.obsm["patches"])


def test_predict_slide_errors(slide, toy_models, tmp_path):
    existing = tmp_path / "taken.zarr"
    existing.mkdir()
    with pytest.raises(ValueError, match="already exists"):
        st.tl.predict_slide(slide.path, toy_models.bleep, store=existing)
    with pytest.raises(ValueError, match="needs a model"):
        st.tl.predict_slide(slide.path, None)
    with pytest.raises(KeyError, match="not covered"):
        st.tl.predict_slide(slide.path, toy_models.bleep, genes=["NOPE"])
    with pytest.raises(ValueError, match="chunk_size"):
        st.tl.predict_slide(slide.path, toy_models.bleep, chunk_size=0)
    with pytest.raises(ValueError, match="patch_mpp"):
        st.tl.predict_slide(slide.path, toy_models.bleep, patch_mpp=-1)


@pytest.mark.slow
def test_predict_slide_finetuned_in_chunks(slide):
    """A fine-tuned encoder without neighbours predicts chunk by chunk, as predict_expression on all patches."""
    adata = st.datasets.toy(n_rows=8, n_cols=8, n_genes=20, seed=0)
    st.pp.extract_patches(adata, patch_size=48, mpp=1.0, progress=False)
    st.pp.normalize_expression(adata)
    model = st.tl.fit_contrastive(
        adata, layer="targets", encoder="resnet18", finetune=True, max_epochs=1, batch_size=32, progress=False
    )
    assert model.finetuned
    pred = st.tl.predict_slide(slide.path, model, chunk_size=5, **SLIDE_KW)
    tiles = st.pp.tile_tissue(slide.path, spot_diameter=224)
    st.pp.extract_patches(tiles, patch_size=48, mpp=1.0, progress=False)
    whole = st.tl.predict_expression(tiles, model, progress=False, device="cpu", copy=True)
    np.testing.assert_allclose(pred.X, whole.X, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pred.obs["predicted_spread"], whole.obs["predicted_spread"], rtol=1e-5, atol=1e-6)
    assert "patches" not in pred.obsm  # the temporary patch store was removed, and nothing points to it
    assert pred.uns["predicted"]["params"]["chunk_size"] == 5


def test_cli_predict_slide(slide, toy_models, tmp_path, capsys):
    import anndata as ad

    from sthist._cli import main

    toy_models.bleep.save(tmp_path / "model")
    out = tmp_path / "slide.h5ad"
    args = ["predict-slide", str(slide.path), "--model", str(tmp_path / "model"), "--out", str(out)]
    assert main([*args, "--spot-diameter", "224", "--device", "cpu", "--no-progress"]) == 0
    assert "pseudo-spots" in capsys.readouterr().out
    written = ad.read_h5ad(out)
    expected = st.tl.predict_slide(slide.path, tmp_path / "model", **SLIDE_KW)
    np.testing.assert_allclose(written.X, expected.X, rtol=1e-5, atol=1e-6)
    assert list(written.var_names) == list(expected.var_names)
    # a user error is one line on stderr and exit code 2
    assert main([*args, "--min-tissue", "2", "--no-progress"]) == 2
    assert "min_tissue" in capsys.readouterr().err
