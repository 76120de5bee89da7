"""Visium HD bins and cells (Xenium-like polygons, circles, points) from SpatialData objects built the way
spatialdata-io builds them: sthist.io.from_spatialdata, then patches in µm and predictions per bin or cell."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import sthist
from sthist import _constants as C

sd = pytest.importorskip("spatialdata")

MPP = 0.5  # µm per pixel of the full-resolution H&E
BIN_UM = 8.0
BIN_PX = BIN_UM / MPP  # 16 px
N = 12  # 12 x 12 bins
ORIGIN = 40.0  # px: centre of bin (0, 0) is at ORIGIN + BIN_PX / 2
SIDE = 320  # image side (px)
DATASET = "lib"
HIRES = 0.25


def _block_colour(row: int, col: int) -> np.ndarray:
    """Colour of the 16 µm block (2 x 2 bins) holding bin (row, col)."""
    r, c = row // 2, col // 2
    return np.array([40 + 30 * r, 40 + 30 * c, 200 - 20 * ((r + c) % 5)], dtype=np.uint8)


def _bins():
    rows, cols = np.meshgrid(np.arange(N), np.arange(N), indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()
    x = ORIGIN + (cols + 0.5) * BIN_PX
    y = ORIGIN + (rows + 0.5) * BIN_PX
    return rows, cols, np.column_stack([x, y])


def _he_image() -> np.ndarray:
    img = np.full((3, SIDE, SIDE), 245, dtype=np.uint8)
    rows, cols, xy = _bins()
    for r, c, (x, y) in zip(rows, cols, xy, strict=True):
        x0, y0 = int(x - BIN_PX / 2), int(y - BIN_PX / 2)
        img[:, y0 : y0 + int(BIN_PX), x0 : x0 + int(BIN_PX)] = _block_colour(r, c)[:, None, None]
    return img


def _visium_hd(*, shapes_name=f"{DATASET}_square_008um", table_name="square_008um", image_cs=DATASET, shift=0.0):
    """Like spatialdata_io.visium_hd: square bins (circles buffered with a square cap), a table per bin size."""
    from geopandas import GeoDataFrame
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    rows, cols, xy = _bins()
    transformations = {DATASET: Identity(), f"{DATASET}_downscaled_hires": Scale([HIRES, HIRES], axes=("x", "y"))}
    radius = BIN_PX / 2
    circles = ShapesModel.parse(
        xy + shift,
        geometry=0,
        radius=np.full(len(xy), radius),
        index=np.arange(len(xy)),
        transformations=transformations,
    )
    squares = ShapesModel.parse(
        GeoDataFrame(geometry=circles.buffer(radius, cap_style=3)), transformations=transformations
    )
    rng = np.random.default_rng(0)
    counts = rng.poisson(2.0, (len(xy), 5)).astype(np.float32)
    counts[:, 0] += 3 * (rows // 2)  # gene 0 follows the block row, as the image's red channel does
    table = ad.AnnData(
        X=counts,
        obs=pd.DataFrame(
            {"in_tissue": 1, "array_row": rows, "array_col": cols, "location_id": np.arange(len(xy))},
            index=[f"s_008um_{r:05d}_{c:05d}-1" for r, c in zip(rows, cols, strict=True)],
        ),
        var=pd.DataFrame(index=[f"G{i}" for i in range(5)]),
    )
    table.obs["region"] = pd.Categorical([shapes_name] * table.n_obs)
    table = TableModel.parse(table, region=shapes_name, region_key="region", instance_key="location_id")
    full = Image2DModel.parse(_he_image(), dims=("c", "y", "x"), transformations={image_cs: Identity()})
    small = _he_image()[:, ::4, ::4]
    hires = Image2DModel.parse(
        small, dims=("c", "y", "x"), transformations={DATASET: Scale([1 / HIRES, 1 / HIRES], axes=("x", "y"))}
    )
    return sd.SpatialData(
        images={f"{DATASET}_full_image": full, f"{DATASET}_hires_image": hires},
        shapes={shapes_name: squares},
        tables={table_name: table},
    )


def _centre_colours(adata):
    patches = np.asarray(adata.obsm["patches"])
    S = patches.shape[1]
    return patches[:, S // 2, S // 2]


def test_visium_hd_bins_centres_size_and_mpp():
    sdata = _visium_hd()
    with pytest.raises(ValueError, match=r"Several images.*lib_full_image.*lib_hires_image.*image_key="):
        sthist.io.from_spatialdata(sdata)
    adata = sthist.io.from_spatialdata(sdata, image_key=f"{DATASET}_full_image")
    rows, cols, xy = _bins()
    np.testing.assert_allclose(adata.obsm["spatial"], xy, atol=1e-9)
    lib = adata.uns["spatial"][f"{DATASET}_square_008um"]
    assert lib["metadata"][C.OBS_KIND] == "bins" and lib["metadata"]["bin_size_um"] == BIN_UM
    assert lib["scalefactors"][C.SPOT_DIAMETER] == pytest.approx(BIN_PX)
    assert lib["scalefactors"][C.MPP] == pytest.approx(MPP)  # 8 µm / 16 px, from the element's name

    sthist.pp.extract_patches(adata, patch_size=8, mpp=1.0, progress=False)  # 8 µm patches: one bin each
    params = adata.uns["patches"]["params"]
    assert params["source_patch_size"][f"{DATASET}_square_008um"] == 16
    expected = np.array([_block_colour(r, c) for r, c in zip(rows, cols, strict=True)])
    np.testing.assert_array_equal(_centre_colours(adata), expected)


def test_visium_hd_bins_aggregated_and_predicted_into_a_layer():
    sdata = _visium_hd()
    bins = sthist.io.from_spatialdata(sdata, image_key=f"{DATASET}_full_image")
    coarse = sthist.io.from_spatialdata(sdata, image_key=f"{DATASET}_full_image", aggregate_to=16, library_id="hd")
    assert coarse.n_obs == (N // 2) ** 2
    assert (coarse.obs["n_bins"] == 4).all()
    np.testing.assert_allclose(coarse.X.sum(), bins.X.sum())
    first = (bins.obs["array_row"] < 2) & (bins.obs["array_col"] < 2)
    np.testing.assert_allclose(coarse.X[0].toarray().ravel(), np.asarray(bins.X[first.to_numpy()]).sum(axis=0))
    np.testing.assert_allclose(coarse.obsm["spatial"][0], [ORIGIN + BIN_PX, ORIGIN + BIN_PX])
    lib = coarse.uns["spatial"]["hd"]
    assert lib["metadata"]["bin_size_um"] == 16 and lib["metadata"]["aggregated_from_um"] == BIN_UM
    assert lib["scalefactors"][C.SPOT_DIAMETER] == pytest.approx(2 * BIN_PX)
    assert lib["scalefactors"][C.MPP] == pytest.approx(MPP)

    sthist.pp.extract_patches(coarse, patch_size=16, mpp=1.0, progress=False)  # 16 µm patches
    np.testing.assert_array_equal(
        _centre_colours(coarse),
        [_block_colour(2 * r, 2 * c) for r, c in zip(coarse.obs["array_row"], coarse.obs["array_col"], strict=True)],
    )
    sthist.pp.normalize_expression(coarse)
    sthist.pp.embed_patches(coarse, progress=False)
    model = sthist.tl.fit_ridge(coarse, layer="targets", features_key="X_hed_fast", progress=False)
    sthist.tl.predict_expression(coarse, model, features_key="X_hed_fast", progress=False)
    assert coarse.layers["predicted"].shape == coarse.shape  # one prediction per coarse bin and gene
    assert np.isfinite(coarse.layers["predicted"]).all()

    with pytest.raises(ValueError, match=r"whole multiple of the bin size 8 µm.*16"):
        sthist.io.from_spatialdata(sdata, image_key=f"{DATASET}_full_image", aggregate_to=12)


def test_visium_hd_bad_input():
    # bins whose size is unknown: the error computes what a guess would mean
    sdata = _visium_hd(shapes_name="bins", table_name="table")
    with pytest.raises(ValueError, match=r"size of the bins of 'bins' is unknown.*16.00 px.*bin_size=8.*0.5000 µm/px"):
        sthist.io.from_spatialdata(sdata, image_key=f"{DATASET}_full_image")
    adata = sthist.io.from_spatialdata(sdata, image_key=f"{DATASET}_full_image", bin_size=8)
    assert adata.uns["spatial"]["bins"]["scalefactors"][C.MPP] == pytest.approx(MPP)
    assert sthist.io.from_spatialdata(sdata, image_key=f"{DATASET}_full_image", mpp=0.5).n_obs == N * N

    # an image without a transformation to the bins' coordinate system
    sdata = _visium_hd(image_cs="elsewhere")
    with pytest.raises(ValueError, match=r"No image shares a coordinate system.*set_transformation"):
        sthist.io.from_spatialdata(sdata, image_key=f"{DATASET}_full_image")

    # a table with no bin in the image
    sdata = _visium_hd(shift=10_000.0)
    with pytest.raises(ValueError, match=r"None of the 144 bins.*lies inside image 'lib_full_image' \(320 x 320 px\)"):
        sthist.io.from_spatialdata(sdata, image_key=f"{DATASET}_full_image")

    with pytest.raises(ValueError, match="kind="):
        sthist.io.from_spatialdata(_visium_hd(), kind="nuclei")
    with pytest.raises(ValueError, match=r"aggregate_to=.*holds cells"):
        sthist.io.from_spatialdata(_visium_hd(), image_key=f"{DATASET}_full_image", kind="cells", aggregate_to=16)


# ---------------------------------------------------------------------------------------------------------------
# cells: Xenium as spatialdata-io reads it (µm coordinates scaled to the morphology pixels of "global", and the
# post-Xenium H&E aligned to it by an affine transformation)
# ---------------------------------------------------------------------------------------------------------------

XENIUM_PX = 0.2125  # µm per unit of Xenium's "global" coordinate system
CELLS_UM = np.array([[20.0, 30.0], [60.0, 45.0], [110.0, 90.0], [40.0, 120.0]])  # cell centres in µm
CELL_R_UM = 5.0


def _xenium(kind: str):
    from geopandas import GeoDataFrame
    from shapely.geometry import Point
    from spatialdata.models import Image2DModel, PointsModel, ShapesModel, TableModel
    from spatialdata.transformations import Affine, Scale

    to_global = Scale([1 / XENIUM_PX, 1 / XENIUM_PX], axes=("x", "y"))
    ids = np.array([f"cell{i}" for i in range(len(CELLS_UM))])
    if kind == "polygons":
        geoms = [Point(x, y).buffer(CELL_R_UM, quad_segs=32) for x, y in CELLS_UM]
        element = ShapesModel.parse(GeoDataFrame(geometry=geoms, index=ids), transformations={"global": to_global})
        name = "cell_boundaries"
    elif kind == "circles":
        element = ShapesModel.parse(
            CELLS_UM, geometry=0, radius=np.full(len(ids), CELL_R_UM), index=ids, transformations={"global": to_global}
        )
        name = "cell_circles"
    else:
        df = pd.DataFrame({"x": CELLS_UM[:, 0], "y": CELLS_UM[:, 1]}, index=ids)
        element = PointsModel.parse(df, transformations={"global": to_global})
        name = "cell_points"
    # H&E pixels (0.5 µm) -> global, rotated by 90°: global = R @ he_px * (0.5 / 0.2125) + t
    s = MPP / XENIUM_PX
    matrix = np.array([[0.0, -s, 300.0], [s, 0.0, 10.0], [0.0, 0.0, 1.0]])
    he = Image2DModel.parse(
        np.full((3, 400, 400), 230, np.uint8),
        dims=("c", "y", "x"),
        transformations={"global": Affine(matrix, input_axes=("x", "y"), output_axes=("x", "y"))},
    )
    table = ad.AnnData(
        X=np.arange(len(ids) * 3, dtype=np.float32).reshape(-1, 3),
        obs=pd.DataFrame({"cell_id": ids[::-1], "region": pd.Categorical([name] * len(ids))}, index=ids[::-1]),
    )
    table = TableModel.parse(table, region=name, region_key="region", instance_key="cell_id")
    kw = {"points": {name: element}} if kind == "points" else {"shapes": {name: element}}
    return sd.SpatialData(images={"he": he}, tables={"table": table}, **kw), matrix


def _expected_he_px(matrix) -> np.ndarray:
    glob = CELLS_UM / XENIUM_PX
    inv = np.linalg.inv(matrix)
    return (np.column_stack([glob, np.ones(len(glob))]) @ inv.T)[:, :2]


@pytest.mark.parametrize("kind", ["polygons", "circles", "points"])
def test_cells_land_on_the_he_pixels(kind):
    sdata, matrix = _xenium(kind)
    adata = sthist.io.from_spatialdata(sdata, microns_per_unit=1.0)
    order = [int(n[4:]) for n in adata.obs_names]  # the table's order (reversed)
    np.testing.assert_allclose(adata.obsm["spatial"], _expected_he_px(matrix)[order], atol=1e-4)
    lib = adata.uns["spatial"][next(iter(adata.uns["spatial"]))]
    assert lib["metadata"][C.OBS_KIND] == "cells"
    assert lib["scalefactors"][C.MPP] == pytest.approx(MPP)
    if kind == "points":
        assert C.SPOT_DIAMETER not in lib["scalefactors"]
    else:
        assert lib["scalefactors"][C.SPOT_DIAMETER] == pytest.approx(2 * CELL_R_UM / MPP, rel=1e-3)


def test_cells_without_a_known_pixel_size_never_use_the_visium_rule():
    sdata, _ = _xenium("circles")
    adata = sthist.io.from_spatialdata(sdata)
    sf = adata.uns["spatial"]["cell_circles"]["scalefactors"]
    assert C.MPP not in sf and C.SPOT_DIAMETER in sf
    with pytest.raises(ValueError, match=r"observations are cells.*microns_per_pixel"):
        sthist.pp.extract_patches(adata, patch_size=8, mpp=1.0, progress=False)
    assert "patches" not in adata.obsm
    sthist.pp.extract_patches(adata, patch_size=8, progress=False)  # at the image's own resolution: fine
