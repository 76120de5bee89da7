"""Tests of sthist.io: Space Ranger folders and SpatialData objects into the common AnnData layout."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from PIL import Image

import sthist
from sthist import _constants as C

warnings.filterwarnings("ignore", message=".*Could not infer format.*")  # pandas date guessing inside readers

# ---------------------------------------------------------------------------------------------------------------
# A tiny Space Ranger output folder
# ---------------------------------------------------------------------------------------------------------------

FULL_W, FULL_H = 1000, 800  # the (not written) full-resolution image
HIRES_SCALEF, LOWRES_SCALEF = 0.2, 0.06
SPOT_DIAMETER = 130.0  # full-resolution pixels of a 65 µm circle -> 0.5 µm per pixel
# barcode: (in_tissue, array_row, array_col, x = pxl_col_in_fullres, y = pxl_row_in_fullres)
SPOTS = {
    "AAAC-1": (1, 0, 0, 150, 100),
    "AAAG-1": (1, 0, 2, 400, 250),
    "AACA-1": (1, 1, 1, 700, 600),
    "AACC-1": (1, 1, 3, 900, 150),
    "AAGA-1": (0, 2, 0, 250, 700),  # outside the tissue
    "AAGC-1": (1, 2, 2, 500, 500),
}
IN_TISSUE = [b for b, v in SPOTS.items() if v[0] == 1]
EXTRA_BARCODE = "TTTT-1"  # in the counts file, absent from the positions file
GENES = ["GeneA", "GeneB", "GeneC"]
PALETTE = np.array(
    [[230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48], [145, 30, 180], [70, 240, 240], [240, 50, 230]],
    dtype=np.uint8,
)


def _counts(barcodes: list[str]) -> np.ndarray:
    # spot i has counts (i + 1, 2 (i + 1), 0): easy to check which row belongs to which barcode
    return np.array([[i + 1, 2 * (i + 1), 0] for i in range(len(barcodes))], dtype=np.int32)


def _write_10x_h5(path: Path, barcodes: list[str], counts: np.ndarray, *, library_id: str | None) -> None:
    """Write the Cell Ranger >= 3 / Space Ranger feature-barcode matrix HDF5 layout."""
    m = sp.csr_matrix(counts)  # barcodes x features in CSR == features x barcodes in CSC, as 10x stores it
    with h5py.File(path, "w") as f:
        if library_id is not None:
            f.attrs["library_ids"] = np.array([library_id.encode()])
        f.attrs["chemistry_description"] = b"Spatial 3' v1"
        f.attrs["software_version"] = b"spaceranger-2.1.0"
        g = f.create_group("matrix")
        g.create_dataset("barcodes", data=np.array([b.encode() for b in barcodes]))
        g.create_dataset("data", data=m.data.astype(np.int32))
        g.create_dataset("indices", data=m.indices.astype(np.int64))
        g.create_dataset("indptr", data=m.indptr.astype(np.int64))
        g.create_dataset("shape", data=np.array([len(GENES), len(barcodes)], dtype=np.int32))
        feat = g.create_group("features")
        feat.create_dataset("id", data=np.array([f"ENSG{i:05d}".encode() for i in range(len(GENES))]))
        feat.create_dataset("name", data=np.array([n.encode() for n in GENES]))
        feat.create_dataset("feature_type", data=np.array([b"Gene Expression"] * len(GENES)))
        feat.create_dataset("genome", data=np.array([b"GRCh38"] * len(GENES)))
        feat.create_dataset("_all_tag_keys", data=np.array([b"genome"]))


def _dot_image(scalef: float) -> np.ndarray:
    w, h = round(FULL_W * scalef), round(FULL_H * scalef)
    img = np.full((h, w, 3), 255, dtype=np.uint8)
    for i, (_, _, _, x, y) in enumerate(SPOTS.values()):
        cx, cy = round(x * scalef), round(y * scalef)
        img[max(cy - 1, 0) : cy + 2, max(cx - 1, 0) : cx + 2] = PALETTE[i]
    return img


def _make_visium(
    root: Path,
    *,
    positions: str = "tissue_positions.csv",
    library_id: str | None = "lib1",
    scalefactors_extra: dict | None = None,
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    barcodes = [*SPOTS, EXTRA_BARCODE]
    _write_10x_h5(root / "filtered_feature_bc_matrix.h5", barcodes, _counts(barcodes), library_id=library_id)
    spatial = root / "spatial"
    spatial.mkdir(exist_ok=True)
    rows = [[b, *v[:3], v[4], v[3]] for b, v in SPOTS.items()]  # 10x order: ..., pxl_row (y), pxl_col (x)
    df = pd.DataFrame(
        rows, columns=["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
    )
    # Space Ranger >= 2: tissue_positions.csv with a header; Space Ranger 1: tissue_positions_list.csv without
    df.to_csv(spatial / positions, index=False, header=positions == "tissue_positions.csv")
    scalefactors = {
        "spot_diameter_fullres": SPOT_DIAMETER,
        "tissue_hires_scalef": HIRES_SCALEF,
        "fiducial_diameter_fullres": 200.0,
        "tissue_lowres_scalef": LOWRES_SCALEF,
        **(scalefactors_extra or {}),
    }
    (spatial / "scalefactors_json.json").write_text(json.dumps(scalefactors))
    Image.fromarray(_dot_image(HIRES_SCALEF)).save(spatial / "tissue_hires_image.png")
    Image.fromarray(_dot_image(LOWRES_SCALEF)).save(spatial / "tissue_lowres_image.png")
    return root


@pytest.fixture(scope="module")
def visium_dir(tmp_path_factory) -> Path:
    return _make_visium(tmp_path_factory.mktemp("visium") / "sample1" / "outs")


# ---------------------------------------------------------------------------------------------------------------
# read_visium
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("positions", ["tissue_positions.csv", "tissue_positions_list.csv"])
def test_read_visium_layout(tmp_path, positions):
    adata = sthist.io.read_visium(_make_visium(tmp_path / "v", positions=positions))

    # only in-tissue spots, in the order of the counts file; the barcode without position is dropped
    assert adata.obs_names.tolist() == IN_TISSUE
    assert adata.var_names.tolist() == GENES
    all_barcodes = [*SPOTS, EXTRA_BARCODE]
    expected_counts = _counts(all_barcodes)[[all_barcodes.index(b) for b in IN_TISSUE]]
    np.testing.assert_array_equal(np.asarray(adata.X.todense()), expected_counts)

    # x = column, y = row, in full-resolution pixels
    coords = adata.obsm[C.SPATIAL_KEY]
    assert coords.dtype == np.float64
    np.testing.assert_array_equal(coords, [[SPOTS[b][3], SPOTS[b][4]] for b in IN_TISSUE])
    np.testing.assert_array_equal(adata.obs[C.ARRAY_ROW].to_numpy(), [SPOTS[b][1] for b in IN_TISSUE])

    lib = adata.uns[C.SPATIAL_KEY]["lib1"]
    sf = lib[C.SCALEFACTORS]
    assert sf[C.HIRES_SCALEF] == HIRES_SCALEF
    assert sf[C.SPOT_DIAMETER] == SPOT_DIAMETER
    assert sf[C.MPP] == pytest.approx(65.0 / SPOT_DIAMETER) == pytest.approx(0.5)
    hires = lib[C.IMAGES][C.HIRES]
    assert hires.shape == (FULL_H * HIRES_SCALEF, FULL_W * HIRES_SCALEF, 3)
    assert lib[C.IMAGES][C.LOWRES].shape == (round(FULL_H * LOWRES_SCALEF), round(FULL_W * LOWRES_SCALEF), 3)
    # the dot drawn for each spot sits under its coordinates in the hires image
    order = list(SPOTS)
    for barcode, (x, y) in zip(adata.obs_names, coords, strict=True):
        pixel = hires[round(y * sf[C.HIRES_SCALEF]), round(x * sf[C.HIRES_SCALEF]), :3]
        np.testing.assert_array_equal(pixel, PALETTE[order.index(barcode)])

    assert adata.obs[C.SECTION_KEY].astype(str).eq("lib1").all()
    assert isinstance(adata.obs[C.SECTION_KEY].dtype, pd.CategoricalDtype)
    assert lib[C.METADATA]["software_version"] == "spaceranger-2.1.0"
    assert C.SOURCE_IMAGE_PATH not in lib[C.METADATA]


def test_read_visium_source_image_path_is_absolute(visium_dir, tmp_path, monkeypatch):
    Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(tmp_path / "he.tif")
    monkeypatch.chdir(tmp_path)
    adata = sthist.io.read_visium(visium_dir, source_image_path="he.tif")
    recorded = adata.uns[C.SPATIAL_KEY]["lib1"][C.METADATA][C.SOURCE_IMAGE_PATH]
    assert Path(recorded).is_absolute()
    assert Path(recorded) == (tmp_path / "he.tif").absolute()


def test_read_visium_without_images_keeps_coordinates(visium_dir):
    adata = sthist.io.read_visium(visium_dir, load_images=False, library_id="my_section")
    lib = adata.uns[C.SPATIAL_KEY]["my_section"]
    assert lib[C.IMAGES] == {}
    assert lib[C.SCALEFACTORS][C.MPP] == pytest.approx(0.5)
    np.testing.assert_array_equal(adata.obsm[C.SPATIAL_KEY][0], [SPOTS[IN_TISSUE[0]][3], SPOTS[IN_TISSUE[0]][4]])
    assert adata.obs[C.SECTION_KEY].astype(str).eq("my_section").all()


def test_read_visium_library_id_falls_back_to_folder_name(tmp_path):
    adata = sthist.io.read_visium(_make_visium(tmp_path / "patient7_A1" / "outs", library_id=None))
    assert list(adata.uns[C.SPATIAL_KEY]) == ["patient7_A1"]
    adata = sthist.io.read_visium(_make_visium(tmp_path / "B2", library_id=None))
    assert list(adata.uns[C.SPATIAL_KEY]) == ["B2"]


def test_read_visium_keeps_a_given_microns_per_pixel(tmp_path):
    adata = sthist.io.read_visium(_make_visium(tmp_path / "hd", scalefactors_extra={"microns_per_pixel": 0.2737}))
    assert adata.uns[C.SPATIAL_KEY]["lib1"][C.SCALEFACTORS][C.MPP] == 0.2737


def test_read_visium_scanpy_fallback_gives_the_same(visium_dir, monkeypatch):
    expected = sthist.io.read_visium(visium_dir)
    monkeypatch.setitem(sys.modules, "squidpy", None)  # `import squidpy...` now raises ImportError
    monkeypatch.setitem(sys.modules, "squidpy.read", None)
    got = sthist.io.read_visium(visium_dir)
    assert got.obs_names.tolist() == expected.obs_names.tolist()
    np.testing.assert_array_equal(got.obsm[C.SPATIAL_KEY], expected.obsm[C.SPATIAL_KEY])
    np.testing.assert_array_equal(got.X.toarray(), expected.X.toarray())
    assert got.uns[C.SPATIAL_KEY]["lib1"][C.SCALEFACTORS] == expected.uns[C.SPATIAL_KEY]["lib1"][C.SCALEFACTORS]
    np.testing.assert_array_equal(
        got.uns[C.SPATIAL_KEY]["lib1"][C.IMAGES][C.HIRES], expected.uns[C.SPATIAL_KEY]["lib1"][C.IMAGES][C.HIRES]
    )


def test_read_visium_errors(tmp_path, visium_dir):
    with pytest.raises(FileNotFoundError, match="does not exist or is not a folder"):
        sthist.io.read_visium(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"counts_file=.*filtered_feature_bc_matrix\.h5"):
        sthist.io.read_visium(visium_dir, counts_file="raw_feature_bc_matrix.h5")
    with pytest.raises(FileNotFoundError, match="source_image_path"):
        sthist.io.read_visium(visium_dir, source_image_path=tmp_path / "missing.tif")

    no_spatial = tmp_path / "no_spatial"
    no_spatial.mkdir()
    (no_spatial / "filtered_feature_bc_matrix.h5").write_bytes(
        (visium_dir / "filtered_feature_bc_matrix.h5").read_bytes()
    )
    with pytest.raises(FileNotFoundError, match=r"no `spatial/` folder"):
        sthist.io.read_visium(no_spatial)

    broken = _make_visium(tmp_path / "broken")
    (broken / "spatial" / "tissue_positions.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"tissue_positions_list\.csv"):
        sthist.io.read_visium(broken)
    broken = _make_visium(tmp_path / "broken2")
    (broken / "spatial" / "scalefactors_json.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"scalefactors_json\.json.*is missing"):
        sthist.io.read_visium(broken)


def test_read_visium_output_plots_and_round_trips(visium_dir, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc

    adata = sthist.io.read_visium(visium_dir, load_images=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # scanpy points to squidpy.pl.spatial_scatter
        ax = sc.pl.spatial(adata, color="GeneA", show=False)
    assert ax[0].images  # the H&E is drawn under the spots
    plt.close("all")
    adata.write_h5ad(tmp_path / "v.h5ad")
    back = ad.read_h5ad(tmp_path / "v.h5ad")
    np.testing.assert_array_equal(back.obsm[C.SPATIAL_KEY], adata.obsm[C.SPATIAL_KEY])
    assert back.uns[C.SPATIAL_KEY]["lib1"][C.SCALEFACTORS][C.MPP] == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------------------------
# SpatialData
# ---------------------------------------------------------------------------------------------------------------

IMG_H, IMG_W = 120, 160
# instance id -> full-resolution pixel (x, y); instance 4 is a circle the table does not annotate
SD_PIXELS = {0: (20, 15), 1: (100, 50), 2: (150, 110), 3: (8, 100), 4: (60, 60)}
TABLE_INSTANCES = [2, 0, 3, 1]  # table rows in a different order than the shapes
RADIUS_UM = 7.0
UM_PER_PX = 0.5


def _sd_image(pixels=SD_PIXELS, shape=(IMG_H, IMG_W), half=2) -> np.ndarray:
    img = np.full((3, *shape), 255, dtype=np.uint8)
    for i, (x, y) in pixels.items():
        img[:, y - half : y + half + 1, x - half : x + half + 1] = PALETTE[i][:, None, None]
    return img


def _make_sdata(case: str = "shapes_scaled", *, image=None, extra_table_row: bool = False):
    """Image + circles (in µm, with a transformation) + table; returns (sdata, expected spot diameter in px)."""
    import spatialdata as sd
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale, Sequence, Translation

    ids = np.array(list(SD_PIXELS))
    px = np.array([SD_PIXELS[i] for i in ids], dtype=float)
    image = _sd_image() if image is None else image
    if case == "shapes_scaled":
        # image pixels define "global"; the circles are stored in µm relative to an origin at pixel (10, 4)
        um = (px - [10, 4]) * UM_PER_PX
        to_px = Sequence([Scale([1 / UM_PER_PX] * 2, axes=("x", "y")), Translation([10, 4], axes=("x", "y"))])
        img_t, shp_t = {"global": Identity()}, {"global": to_px, "other": Identity()}
    elif case == "image_scaled":
        # the common coordinate system is in µm: the image carries the scale, the circles are translated
        um = px * UM_PER_PX - [3, 1]
        img_t = {"microns": Scale([UM_PER_PX] * 2, axes=("x", "y"))}
        shp_t = {"microns": Translation([3, 1], axes=("x", "y"))}
    else:
        raise ValueError(case)
    circles = ShapesModel.parse(um, geometry=0, radius=np.full(len(ids), RADIUS_UM), index=ids, transformations=shp_t)
    he = Image2DModel.parse(image, dims=("c", "y", "x"), transformations=img_t)
    instances = [*TABLE_INSTANCES, 99] if extra_table_row else TABLE_INSTANCES
    table = ad.AnnData(
        X=np.array(instances, dtype=np.float32)[:, None] * [1.0, 10.0],  # X encodes the instance id
        obs=pd.DataFrame(
            {"region": pd.Categorical(["spots"] * len(instances)), "spot_id": instances},
            index=[f"cell{i}" for i in instances],
        ),
        var=pd.DataFrame(index=["g0", "g1"]),
    )
    table = TableModel.parse(table, region="spots", region_key="region", instance_key="spot_id")
    sdata = sd.SpatialData(images={"he": he}, shapes={"spots": circles}, tables={"table": table})
    return sdata, 2 * RADIUS_UM / UM_PER_PX


def _snapshot(sdata) -> dict:
    from spatialdata.transformations import get_transformation

    return {
        "elements": sorted(name for _, name, _ in sdata.gen_elements()),
        "obs": sdata["table"].obs.copy(),
        "X": np.asarray(sdata["table"].X).copy(),
        "uns": sorted(sdata["table"].uns),
        "obsm": sorted(sdata["table"].obsm),
        "geometry": sdata["spots"].geometry.copy(),
        "t_spots": repr(get_transformation(sdata["spots"], get_all=True)),
        "t_he": repr(get_transformation(sdata["he"], get_all=True)),
        "image": np.asarray(sdata["he"].data).copy(),
    }


def _assert_unchanged(sdata, before: dict) -> None:
    after = _snapshot(sdata)
    assert after["elements"] == before["elements"]
    pd.testing.assert_frame_equal(after["obs"], before["obs"])
    np.testing.assert_array_equal(after["X"], before["X"])
    assert after["uns"] == before["uns"] and after["obsm"] == before["obsm"]
    assert after["geometry"].equals(before["geometry"])
    assert after["t_spots"] == before["t_spots"] and after["t_he"] == before["t_he"]
    np.testing.assert_array_equal(after["image"], before["image"])


@pytest.mark.parametrize("case", ["shapes_scaled", "image_scaled"])
def test_from_spatialdata_centres_land_on_their_pixels(case):
    sdata, diameter = _make_sdata(case)
    before = _snapshot(sdata)
    adata = sthist.io.from_spatialdata(sdata)
    _assert_unchanged(sdata, before)

    # rows: the table's, in the table's order; the circle the table does not annotate is not there
    assert adata.obs_names.tolist() == [f"cell{i}" for i in TABLE_INSTANCES]
    np.testing.assert_array_equal(adata.X[:, 0], TABLE_INSTANCES)
    coords = adata.obsm[C.SPATIAL_KEY]
    assert coords.dtype == np.float64
    np.testing.assert_allclose(coords, [SD_PIXELS[i] for i in TABLE_INSTANCES], atol=1e-9)

    lib = adata.uns[C.SPATIAL_KEY]["spots"]
    fullres = lib[C.IMAGES][C.FULLRES]
    assert fullres.dtype == np.uint8 and fullres.shape == (IMG_H, IMG_W, 3)
    for i, (x, y) in zip(TABLE_INSTANCES, coords, strict=True):
        np.testing.assert_array_equal(fullres[round(y), round(x)], PALETTE[i])

    sf = lib[C.SCALEFACTORS]
    assert sf[C.SPOT_DIAMETER] == pytest.approx(diameter)
    assert sf[C.HIRES_SCALEF] == 1.0  # image smaller than 2000 px: hires is the image itself
    np.testing.assert_array_equal(lib[C.IMAGES][C.HIRES], fullres)
    assert C.MPP not in sf  # not knowable from the SpatialData object alone
    assert lib[C.METADATA] == {C.OBS_KIND: "spots"}
    assert adata.obs[C.SECTION_KEY].astype(str).eq("spots").all()


def test_from_spatialdata_drops_rows_without_a_circle_and_names_the_library():
    sdata, _ = _make_sdata(extra_table_row=True)
    adata = sthist.io.from_spatialdata(sdata, library_id="sec1")
    assert adata.obs_names.tolist() == [f"cell{i}" for i in TABLE_INSTANCES]
    assert list(adata.uns[C.SPATIAL_KEY]) == ["sec1"]
    assert adata.obs[C.SECTION_KEY].astype(str).eq("sec1").all()


def test_from_spatialdata_zarr_store_records_path_not_pixels(tmp_path):
    import spatialdata as sd

    sdata, _ = _make_sdata()
    store = tmp_path / "sample.zarr"
    sdata.write(store)
    expected = sthist.io.from_spatialdata(_make_sdata()[0])

    for source in (str(store), sd.read_zarr(store), sdata):  # a path, a lazily read object, the written object
        adata = sthist.io.from_spatialdata(source)
        lib = adata.uns[C.SPATIAL_KEY]["spots"]
        assert lib[C.METADATA][C.SOURCE_IMAGE_PATH] == str(store.resolve())
        assert lib[C.METADATA][C.SOURCE_IMAGE_KEY] == "he"
        assert C.FULLRES not in lib[C.IMAGES]
        np.testing.assert_allclose(adata.obsm[C.SPATIAL_KEY], expected.obsm[C.SPATIAL_KEY])
        np.testing.assert_array_equal(lib[C.IMAGES][C.HIRES], expected.uns[C.SPATIAL_KEY]["spots"][C.IMAGES][C.HIRES])

    # an image added in memory to a backed object is not in the store: its pixels are copied
    backed = sd.read_zarr(store)
    backed.images["he2"] = backed.images["he"].copy()
    adata = sthist.io.from_spatialdata(backed, image_key="he2")
    assert C.FULLRES in adata.uns[C.SPATIAL_KEY]["spots"][C.IMAGES]
    assert C.SOURCE_IMAGE_PATH not in adata.uns[C.SPATIAL_KEY]["spots"][C.METADATA]


@pytest.mark.parametrize("multiscale", [True, False])
def test_from_spatialdata_downscales_large_images(multiscale):
    import spatialdata as sd
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity

    h, w = 300, 4100  # a strip: longest side 4100 -> hires 2000 wide
    pixels = {0: (100, 150), 1: (2050, 60), 2: (4000, 250)}
    image = _sd_image(pixels, shape=(h, w), half=8)
    he = Image2DModel.parse(
        image, dims=("c", "y", "x"), scale_factors=[2, 2] if multiscale else None, transformations={"g": Identity()}
    )
    circles = ShapesModel.parse(
        np.array(list(pixels.values()), float), geometry=0, radius=np.full(3, 20.0), transformations={"g": Identity()}
    )
    table = ad.AnnData(
        np.ones((3, 1), np.float32),
        obs=pd.DataFrame({"r": pd.Categorical(["s"] * 3), "i": [0, 1, 2]}, index=list("abc")),
    )
    sdata = sd.SpatialData(
        images={"he": he},
        shapes={"s": circles},
        tables={"t": TableModel.parse(table, region="s", region_key="r", instance_key="i")},
    )
    adata = sthist.io.from_spatialdata(sdata)
    lib = adata.uns[C.SPATIAL_KEY]["s"]
    sf = lib[C.SCALEFACTORS]
    hires = lib[C.IMAGES][C.HIRES]
    assert sf[C.HIRES_SCALEF] == pytest.approx(2000 / w)
    assert hires.dtype == np.uint8 and hires.shape == (round(h * 2000 / w), 2000, 3)
    assert max(lib[C.IMAGES][C.LOWRES].shape[:2]) == 600
    assert sf[C.LOWRES_SCALEF] == pytest.approx(600 / w)
    assert sf[C.SPOT_DIAMETER] == pytest.approx(40.0)
    for i, (x, y) in zip([0, 1, 2], adata.obsm[C.SPATIAL_KEY], strict=True):
        for img, key in ((hires, C.HIRES_SCALEF), (lib[C.IMAGES][C.LOWRES], C.LOWRES_SCALEF)):
            pixel = img[int(y * sf[key]), int(x * sf[key])].astype(int)
            # the box filter keeps the colour at the dot centre (a 17-px dot stays >= 2 px wide in lowres)
            assert np.abs(pixel - PALETTE[i]).max() <= 40, (i, key, pixel)
    np.testing.assert_array_equal(lib[C.IMAGES][C.FULLRES], np.moveaxis(image, 0, -1))


def test_from_spatialdata_float_image_becomes_uint8():
    image = _sd_image().astype(np.float32) / 255.0
    adata = sthist.io.from_spatialdata(_make_sdata(image=image)[0])
    np.testing.assert_array_equal(
        adata.uns[C.SPATIAL_KEY]["spots"][C.IMAGES][C.FULLRES], np.moveaxis(_sd_image(), 0, -1)
    )


def test_from_spatialdata_microns_per_pixel_from_table_scalefactors():
    sdata, diameter = _make_sdata()
    # the table was once in a Visium layout whose pixels were twice as large as the image used here
    sdata["table"].uns[C.SPATIAL_KEY] = {"old": {C.SCALEFACTORS: {C.MPP: 2 * UM_PER_PX, C.SPOT_DIAMETER: diameter / 2}}}
    adata = sthist.io.from_spatialdata(sdata)
    assert adata.uns[C.SPATIAL_KEY]["spots"][C.SCALEFACTORS][C.MPP] == pytest.approx(UM_PER_PX)
    assert list(adata.uns[C.SPATIAL_KEY]) == ["spots"]  # the old library is replaced
    assert list(sdata["table"].uns[C.SPATIAL_KEY]) == ["old"]  # ... in the copy only


def test_from_spatialdata_plots_and_round_trips(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc

    adata = sthist.io.from_spatialdata(_make_sdata()[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # scanpy points to squidpy.pl.spatial_scatter
        axes = sc.pl.spatial(adata, color="g0", show=False)
    assert axes[0].images
    plt.close("all")
    adata.write_h5ad(tmp_path / "s.h5ad")
    back = ad.read_h5ad(tmp_path / "s.h5ad")
    np.testing.assert_array_equal(
        back.uns[C.SPATIAL_KEY]["spots"][C.IMAGES][C.FULLRES], adata.uns[C.SPATIAL_KEY]["spots"][C.IMAGES][C.FULLRES]
    )
    np.testing.assert_array_equal(back.obsm[C.SPATIAL_KEY], adata.obsm[C.SPATIAL_KEY])


def test_from_spatialdata_matches_read_visium_through_spatialdata_io(visium_dir):
    spatialdata_io = pytest.importorskip("spatialdata_io")
    sdata = spatialdata_io.visium(visium_dir, dataset_id="lib1")
    # spatialdata-io puts both the hires and the lowres PNG in the spots' coordinate system
    with pytest.raises(ValueError, match=r"Several images.*lib1_hires_image.*lib1_lowres_image"):
        sthist.io.from_spatialdata(sdata)
    adata = sthist.io.from_spatialdata(sdata, image_key="lib1_hires_image")
    # the table keeps the out-of-tissue spot; the barcode without position (NaN centre) is dropped
    assert sorted(adata.obs_names) == sorted(SPOTS)
    reference = sthist.io.read_visium(visium_dir)
    # the hires PNG is the "full-resolution" image here: coordinates and diameter in its pixels
    ours = pd.DataFrame(adata.obsm[C.SPATIAL_KEY], index=adata.obs_names).loc[reference.obs_names]
    np.testing.assert_allclose(ours.to_numpy(), reference.obsm[C.SPATIAL_KEY] * HIRES_SCALEF, rtol=1e-6)
    sf = adata.uns[C.SPATIAL_KEY]["lib1"][C.SCALEFACTORS]
    assert sf[C.SPOT_DIAMETER] == pytest.approx(SPOT_DIAMETER * HIRES_SCALEF)


def test_from_spatialdata_ambiguity_and_missing_elements(tmp_path):
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity

    sdata, _ = _make_sdata()
    before = _snapshot(sdata)
    with pytest.raises(KeyError, match=r"table_key='nope'.*\['table'\]"):
        sthist.io.from_spatialdata(sdata, table_key="nope")
    with pytest.raises(KeyError, match=r"image_key='nope'.*\['he'\]"):
        sthist.io.from_spatialdata(sdata, image_key="nope")
    with pytest.raises(KeyError, match=r"shapes_key='nope'.*\['spots'\]"):
        sthist.io.from_spatialdata(sdata, shapes_key="nope")
    _assert_unchanged(sdata, before)

    # two tables annotating the spots
    sdata.tables["table2"] = sdata["table"].copy()
    with pytest.raises(ValueError, match=r"Several tables.*'table'.*'table2'.*table_key="):
        sthist.io.from_spatialdata(sdata)
    assert sthist.io.from_spatialdata(sdata, table_key="table2").n_obs == len(TABLE_INSTANCES)
    del sdata.tables["table2"]

    # two images in the spots' coordinate system
    sdata.images["he_copy"] = Image2DModel.parse(
        _sd_image(), dims=("c", "y", "x"), transformations={"global": Identity()}
    )
    with pytest.raises(ValueError, match=r"Several images.*'he'.*'he_copy'.*image_key="):
        sthist.io.from_spatialdata(sdata)
    assert sthist.io.from_spatialdata(sdata, image_key="he_copy").n_obs == len(TABLE_INSTANCES)
    # an image in another coordinate system only is not a candidate, and naming it raises
    sdata.images["he_copy"] = Image2DModel.parse(
        _sd_image(), dims=("c", "y", "x"), transformations={"elsewhere": Identity()}
    )
    assert sthist.io.from_spatialdata(sdata).n_obs == len(TABLE_INSTANCES)
    with pytest.raises(ValueError, match=r"No image shares a coordinate system.*set_transformation"):
        sthist.io.from_spatialdata(sdata, image_key="he_copy")
    del sdata.images["he_copy"]

    # a table annotating two circles elements
    sdata.shapes["spots_b"] = ShapesModel.parse(
        np.array([[1.0, 1.0]]), geometry=0, radius=np.array([1.0]), transformations={"global": Identity()}
    )
    both = sdata["table"].copy()
    both.obs["region"] = pd.Categorical(["spots"] * (both.n_obs - 1) + ["spots_b"])
    both.obs.loc[both.obs_names[-1], "spot_id"] = 0
    del both.uns["spatialdata_attrs"]
    sdata.tables["table"] = TableModel.parse(
        both, region=["spots", "spots_b"], region_key="region", instance_key="spot_id"
    )
    with pytest.raises(ValueError, match=r"several circles elements.*shapes_key="):
        sthist.io.from_spatialdata(sdata)
    assert sthist.io.from_spatialdata(sdata, shapes_key="spots_b").n_obs == 1

    # polygons are read too (bins, cells), but only those a table annotates
    from shapely.geometry import Polygon

    sdata.shapes["poly"] = ShapesModel.parse(
        __import__("geopandas").GeoDataFrame(geometry=[Polygon([(0, 0), (1, 0), (1, 1)])]),
        transformations={"global": Identity()},
    )
    with pytest.raises(ValueError, match=r"No table annotates 'poly'.*set_table_annotates_spatialelement"):
        sthist.io.from_spatialdata(sdata, shapes_key="poly")


def test_from_spatialdata_no_table_no_image_bad_input(tmp_path):
    import spatialdata as sd

    sdata, _ = _make_sdata()
    with pytest.raises(ValueError, match="no table"):
        sthist.io.from_spatialdata(sd.SpatialData(images={"he": sdata["he"]}, shapes={"spots": sdata["spots"]}))
    with pytest.raises(ValueError, match="no image"):
        sthist.io.from_spatialdata(sd.SpatialData(shapes={"spots": sdata["spots"]}, tables={"table": sdata["table"]}))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sthist.io.from_spatialdata(tmp_path / "missing.zarr")
    with pytest.raises(TypeError, match="SpatialData"):
        sthist.io.from_spatialdata(sdata["table"])
    # instance ids that match no circle
    bad = sdata["table"].copy()
    bad.obs["spot_id"] = bad.obs["spot_id"] + 1000
    sdata.tables["table"] = bad
    with pytest.raises(ValueError, match=r"No row of table 'table' matches a circle"):
        sthist.io.from_spatialdata(sdata)


# ---------------------------------------------------------------------------------------------------------------
# Visium from any scverse reader: µm/px from spot_diameter_fullres, by the one rule of sthist._anndata.resolve_mpp
# ---------------------------------------------------------------------------------------------------------------

SQUARE = 20  # half-side (full-resolution px) of the coloured square drawn around each spot in the full image


def _full_image() -> np.ndarray:
    img = np.full((FULL_H, FULL_W, 3), 255, dtype=np.uint8)
    for i, (_, _, _, x, y) in enumerate(SPOTS.values()):
        img[max(y - SQUARE, 0) : y + SQUARE + 1, max(x - SQUARE, 0) : x + SQUARE + 1] = PALETTE[i]
    return img


@pytest.fixture(scope="module")
def visium_fullres(visium_dir, tmp_path_factory) -> Path:
    import tifffile

    path = tmp_path_factory.mktemp("fullres") / "he.tif"
    tifffile.imwrite(path, _full_image(), tile=(128, 128), photometric="rgb")
    return path


def _check_centres(adata, key="patches"):
    """Each patch's centre pixel has the colour of its spot's square."""
    order = list(SPOTS)
    patches = np.asarray(adata.obsm[key])
    S = patches.shape[1]
    for i, name in enumerate(adata.obs_names):
        np.testing.assert_array_equal(patches[i, S // 2, S // 2], PALETTE[order.index(name)])


def test_extract_patches_mpp_on_squidpy_visium(visium_dir, visium_fullres):
    sq = pytest.importorskip("squidpy")
    adata = sq.read.visium(visium_dir, source_image_path=visium_fullres)
    adata = adata[adata.obs["in_tissue"] == 1].copy()
    lib = next(iter(adata.uns["spatial"]))
    assert C.MPP not in adata.uns["spatial"][lib]["scalefactors"]  # squidpy does not write it
    before = adata.uns["spatial"][lib]["scalefactors"].copy()
    sthist.pp.extract_patches(adata, patch_size=16, mpp=1.0, progress=False)
    params = adata.uns["patches"]["params"]
    assert params["source_mpp"][lib] == pytest.approx(65.0 / SPOT_DIAMETER)  # 0.5 µm/px
    assert params["source_mpp_origin"][lib].startswith("65 / scalefactors['spot_diameter_fullres']")
    assert params["source_patch_size"][lib] == 32  # 16 px at 1 µm/px = 32 px at 0.5 µm/px
    assert adata.obsm["patches"].shape == (len(IN_TISSUE), 16, 16, 3)
    _check_centres(adata)
    assert adata.uns["spatial"][lib]["scalefactors"] == before  # the rule is recorded, not written into the library
    # the same µm/px as sthist's own reader
    ours = sthist.io.read_visium(visium_dir, source_image_path=visium_fullres)
    assert ours.uns["spatial"]["lib1"]["scalefactors"][C.MPP] == pytest.approx(params["source_mpp"][lib])


def test_extract_patches_mpp_on_scanpy_visium(visium_dir, visium_fullres):
    import scanpy as sc

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata = sc.read_visium(visium_dir, source_image_path=visium_fullres)
    adata = adata[adata.obs["in_tissue"] == 1].copy()
    adata.var_names_make_unique()
    sthist.pp.extract_patches(adata, patch_size=16, mpp=1.0, progress=False)
    lib = adata.uns["patches"]["params"]["library_id"][0]
    assert adata.uns["patches"]["params"]["source_mpp"][lib] == pytest.approx(0.5)
    _check_centres(adata)


def test_extract_patches_mpp_on_spatialdata_io_visium(visium_dir, visium_fullres):
    spatialdata_io = pytest.importorskip("spatialdata_io")
    sdata = spatialdata_io.visium(visium_dir, dataset_id="lib1", fullres_image_file=visium_fullres)
    adata = sthist.io.from_spatialdata(sdata, image_key="lib1_full_image")
    adata = adata[adata.obs["in_tissue"] == 1].copy()
    sf = adata.uns["spatial"]["lib1"]["scalefactors"]
    assert sf[C.SPOT_DIAMETER] == pytest.approx(SPOT_DIAMETER) and C.MPP not in sf
    sthist.pp.extract_patches(adata, patch_size=16, mpp=1.0, progress=False)
    assert adata.uns["patches"]["params"]["source_mpp"]["lib1"] == pytest.approx(0.5)
    _check_centres(adata)


def _snapshot_adata(adata) -> dict:
    return {"obsm": sorted(adata.obsm), "obs": list(adata.obs), "uns": repr(adata.uns)}


def test_unknown_mpp_errors_show_values_from_the_data(visium_dir, visium_fullres):
    sq = pytest.importorskip("squidpy")
    adata = sq.read.visium(visium_dir, source_image_path=visium_fullres)
    adata = adata[adata.obs["in_tissue"] == 1].copy()
    lib = next(iter(adata.uns["spatial"]))
    del adata.uns["spatial"][lib]["scalefactors"]["spot_diameter_fullres"]
    before = _snapshot_adata(adata)
    with pytest.raises(ValueError, match=r"mpp=1.0 needs the microns per pixel") as err:
        sthist.pp.extract_patches(adata, patch_size=16, mpp=1.0, progress=False)
    msg = str(err.value)
    assert "0.2738" not in msg
    coords = adata.obsm["spatial"].astype(float)
    d = np.sort(np.linalg.norm(coords[:, None] - coords[None], axis=-1), axis=1)[:, 1]
    pitch = float(np.median(d))
    assert f"{pitch:.1f} px apart" in msg and f"{100 / pitch:.4f} µm/px" in msg
    assert f"{FULL_W} x {FULL_H} px" in msg and "microns_per_pixel" in msg
    assert _snapshot_adata(adata) == before

    # a HEST-1k table: its spot_diameter_fullres is a 55 µm spot, so the 10x rule does not apply
    adata.uns["spatial"][lib]["scalefactors"].update(
        {"spot_diameter_fullres": 110.0, "tissue_downscaled_fullres_scalef": 0.1}
    )
    with pytest.raises(ValueError, match=r"HEST-1k.*read_hest"):
        sthist.pp.extract_patches(adata, patch_size=16, mpp=1.0, progress=False)
    assert "patches" not in adata.obsm

    # a slide without metadata: tile_tissue and predict_slide say how large it would be at common resolutions
    with pytest.raises(ValueError, match=rf"{FULL_W} x {FULL_H} px.*0.25 µm/px.*Pass mpp="):
        sthist.pp.tile_tissue(_full_image())


def test_mpp_rule_order_and_exceptions():
    from sthist._anndata import MPP_FROM_FILE, MPP_FROM_SCALEFACTORS, MPP_FROM_SPOT_DIAMETER, resolve_mpp

    visium = {"scalefactors": {"spot_diameter_fullres": 130.0}}
    assert resolve_mpp(entry=visium) == (pytest.approx(0.5), MPP_FROM_SPOT_DIAMETER)
    assert resolve_mpp(entry={"scalefactors": {"spot_diameter_fullres": 130.0, "microns_per_pixel": 0.3}}) == (
        0.3,
        MPP_FROM_SCALEFACTORS,
    )
    assert resolve_mpp(given=0.7, entry=visium) == (0.7, "mpp=")
    assert resolve_mpp(entry={}, source_mpp=0.25) == (0.25, MPP_FROM_FILE)
    # bins and cells carry spot_diameter_fullres too, but it is not a 65 µm circle
    for kind in ("bins", "cells"):
        entry = {"scalefactors": {"spot_diameter_fullres": 130.0}, "metadata": {C.OBS_KIND: kind}}
        assert resolve_mpp(entry=entry) == (None, None)
    assert resolve_mpp(entry={"scalefactors": {"spot_diameter_fullres": 0.0}}) == (None, None)


def test_targets_without_variance_raise_before_anything_changes(prepared_toy):
    adata = prepared_toy()
    adata.layers["flat"] = np.ones(adata.shape, dtype=np.float32)
    before = (sorted(adata.obsm), sorted(adata.uns), sorted(adata.layers))
    with pytest.raises(ValueError, match=r"no variance in any of its 40 selected genes.*normalize_expression"):
        sthist.tl.fit_ridge(adata, layer="flat", features_key="X_hed_texture")
    assert (sorted(adata.obsm), sorted(adata.uns), sorted(adata.layers)) == before
