"""Tests of sthist.datasets: the toy generator and the her2st reader."""

from __future__ import annotations

import gzip
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from PIL import Image

import sthist
from sthist import _constants as C

HER2ST = Path(__file__).parents[2] / "shared" / "data" / "her2st"
SMALL = {"n_rows": 8, "n_cols": 8, "n_genes": 30}


@pytest.fixture(scope="module")
def small():
    return sthist.datasets.toy(**SMALL, seed=3)


@pytest.fixture(scope="module")
def medium():
    # enough spots of every class for correlations; 14 x 14 spots, about 1.7 megapixels
    return sthist.datasets.toy(n_rows=14, n_cols=14, n_genes=60, seed=0)


# ------------------------------------------------------------------------------------------------- toy
def test_toy_same_seed_is_bit_identical(small):
    again = sthist.datasets.toy(**SMALL, seed=3)
    assert (small.X != again.X).nnz == 0
    pd.testing.assert_frame_equal(small.obs, again.obs)
    pd.testing.assert_frame_equal(small.var, again.var)
    np.testing.assert_array_equal(small.obsm["spatial"], again.obsm["spatial"])
    for key in (C.FULLRES, C.HIRES):
        a = small.uns["spatial"]["toy"]["images"][key]
        b = again.uns["spatial"]["toy"]["images"][key]
        assert a.dtype == b.dtype and np.array_equal(a, b)


def test_toy_other_seed_gives_other_layout(small):
    other = sthist.datasets.toy(**SMALL, seed=4)
    img_a = small.uns["spatial"]["toy"]["images"]["fullres"]
    img_b = other.uns["spatial"]["toy"]["images"]["fullres"]
    assert img_a.shape == img_b.shape
    # not just different noise: the tissue layout under the spots differs
    assert np.mean(img_a != img_b) > 0.5
    assert (small.obs["region"].to_numpy() != other.obs["region"].to_numpy()).mean() > 0.2
    assert (small.X != other.X).nnz > 0


def test_toy_shapes_dtypes_and_keys(small):
    adata = small
    assert adata.shape == (64, 30)
    assert isinstance(adata.X, sp.csr_matrix) and adata.X.dtype == np.float32
    x = adata.X.toarray()
    assert (x >= 0).all() and np.array_equal(x, np.round(x)) and x.sum() > 0

    assert list(adata.obs.columns[:5]) == [C.ARRAY_ROW, C.ARRAY_COL, "in_tissue", C.SECTION_KEY, "region"]
    assert (adata.obs["in_tissue"] == 1).all()
    assert isinstance(adata.obs[C.SECTION_KEY].dtype, pd.CategoricalDtype)
    assert list(adata.obs[C.SECTION_KEY].cat.categories) == ["toy"]
    assert list(adata.obs["region"].cat.categories) == ["tumour", "stroma", "immune", "fat"]
    fractions = adata.obs[[f"fraction_{r}" for r in ["tumour", "stroma", "immune", "fat"]]].to_numpy()
    np.testing.assert_allclose(fractions.sum(axis=1), 1.0)
    np.testing.assert_array_equal(adata.obs["region"].cat.codes.to_numpy(), fractions.argmax(axis=1))
    assert adata.obs_names.is_unique
    assert adata.obs_names[1] == f"toy_{adata.obs[C.ARRAY_COL].iloc[1]}x{adata.obs[C.ARRAY_ROW].iloc[1]}"

    # genes: 15 informative ones named by class, then noise genes GENE0001...
    assert adata.var["informative"].dtype == bool
    assert adata.var["informative"].sum() == 15
    assert adata.var_names.is_unique
    informative = adata.var_names[adata.var["informative"].to_numpy()]
    assert all(re.fullmatch(r"(TUM|STR|IMM|FAT)_\d\d", g) for g in informative)
    assert list(informative[:4]) == ["TUM_01", "STR_01", "IMM_01", "FAT_01"]
    noise = adata.var_names[~adata.var["informative"].to_numpy()]
    assert list(noise[:2]) == ["GENE0001", "GENE0002"] and len(noise) == 15
    assert (adata.var.loc[noise, "driver"] == "none").all()
    assert (adata.var.loc["IMM_01", "driver"]) == "immune"

    lib = adata.uns["spatial"]["toy"]
    assert set(lib) == {C.IMAGES, C.SCALEFACTORS, C.METADATA} and lib[C.METADATA] == {}
    full = lib[C.IMAGES][C.FULLRES]
    # 8 x 8 spots at 1 um/px: (7.5 * 100 + 300) x (7 * 86.6 + 300) um
    assert full.dtype == np.uint8 and full.shape == (math.ceil(7 * 50 * math.sqrt(3) + 300), 1050, 3)
    hires = lib[C.IMAGES][C.HIRES]
    assert hires.dtype == np.uint8 and hires.shape == full.shape  # small image: not downscaled
    sf = lib[C.SCALEFACTORS]
    assert sf == {C.HIRES_SCALEF: 1.0, C.SPOT_DIAMETER: 55.0, C.MPP: 1.0}
    assert adata.uns["toy"]["params"]["seed"] == 3
    assert len(adata.uns["region_colors"]) == 4


def test_toy_image_looks_like_he(small):
    img = small.uns["spatial"]["toy"]["images"]["fullres"].astype(np.float64)
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    # H&E: stained tissue absorbs green most (pink/purple), not a grey or a flat image
    assert (g < r).mean() > 0.9 and (g < b).mean() > 0.8
    assert img.std() > 20
    # dark nuclei and near-white fat/background both occur
    assert (img.sum(axis=2) < 250).mean() > 0.02
    assert (img.min(axis=2) > 235).mean() > 0.01 or (small.obs["fraction_fat"] == 0).all()


def test_toy_hexagonal_geometry():
    mpp = 2.0
    adata = sthist.datasets.toy(n_rows=5, n_cols=6, n_genes=5, mpp=mpp)
    xy = adata.obsm["spatial"]
    assert xy.dtype == np.float64 and xy.shape == (30, 2)
    row = adata.obs[C.ARRAY_ROW].to_numpy()
    col = adata.obs[C.ARRAY_COL].to_numpy()
    assert set(row) == set(range(5))
    # Visium convention: array_col counts half pitches, even on even rows and odd on odd rows
    assert ((col - row) % 2 == 0).all()
    np.testing.assert_allclose(xy[:, 0] - xy[:, 0].min(), col * 50.0 / mpp)
    np.testing.assert_allclose(xy[:, 1] - xy[:, 1].min(), row * 50.0 * math.sqrt(3) / mpp)
    # odd rows are shifted by half a pitch
    x0 = xy[(row == 0) & (col == 0), 0][0]
    x1 = xy[(row == 1) & (col == 1), 0][0]
    assert x1 - x0 == pytest.approx(50.0 / mpp)
    # every spot's nearest neighbours lie at exactly 100 um; interior spots have six of them
    d = np.linalg.norm(xy[:, None] - xy[None], axis=2)
    d[np.diag_indices_from(d)] = np.inf
    np.testing.assert_allclose(d.min(axis=1), 100.0 / mpp)
    n_neighbours = np.isclose(d, 100.0 / mpp).sum(axis=1)
    interior = (row > 0) & (row < 4) & (col > 1) & (col < col.max() - 1)
    assert interior.any() and (n_neighbours[interior] == 6).all()
    # spots lie inside the image with room for a 224 um patch
    full = adata.uns["spatial"]["toy"]["images"]["fullres"]
    half = 112.0 / mpp
    assert (xy >= half).all() and (xy[:, 0] <= full.shape[1] - half).all() and (xy[:, 1] <= full.shape[0] - half).all()
    sf = adata.uns["spatial"]["toy"]["scalefactors"]
    assert sf[C.SPOT_DIAMETER] == pytest.approx(55.0 / mpp) and sf[C.MPP] == mpp


def test_toy_hires_is_downscaled_copy():
    adata = sthist.datasets.toy(n_rows=3, n_cols=18, n_genes=5)  # 2050 px wide at 1 um/px
    lib = adata.uns["spatial"]["toy"]
    full, hires = lib["images"]["fullres"], lib["images"]["hires"]
    assert full.shape[1] == 2050
    scalef = lib["scalefactors"][C.HIRES_SCALEF]
    assert max(hires.shape[:2]) == 2000 and scalef == pytest.approx(2000 / 2050)
    assert hires.shape[0] == round(full.shape[0] * scalef)
    # same picture: mean colours agree
    np.testing.assert_allclose(hires.mean(axis=(0, 1)), full.mean(axis=(0, 1)), atol=1.0)


def _lognorm(adata):
    x = adata.X.toarray()
    return np.log1p(x / x.sum(axis=1, keepdims=True) * 1e3)


def _corr(a, b):
    return float(np.corrcoef(a, b)[0, 1])


def test_toy_informative_genes_follow_region(medium):
    adata = medium
    x = _lognorm(adata)
    noise = np.flatnonzero(~adata.var["informative"].to_numpy())
    for region, prefix in [("tumour", "TUM"), ("stroma", "STR"), ("immune", "IMM"), ("fat", "FAT")]:
        indicator = (adata.obs["region"] == region).to_numpy(float)
        assert 0 < indicator.sum() < adata.n_obs, region
        genes = [i for i, g in enumerate(adata.var_names) if g.startswith(prefix + "_")]
        r_inf = np.array([_corr(x[:, i], indicator) for i in genes])
        r_noise = np.array([_corr(x[:, i], indicator) for i in noise])
        assert (r_inf > 0.4).all(), (region, r_inf)
        assert r_inf.min() > np.abs(r_noise).max(), (region, r_inf, np.abs(r_noise).max())


def test_toy_informative_genes_follow_image(medium):
    """The image itself carries the signal: darkness (nuclei) and whiteness (fat) under each spot."""
    adata = medium
    img = adata.uns["spatial"]["toy"]["images"]["fullres"].astype(np.float32)
    grey = img.mean(axis=2)
    radius = 27
    dy, dx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    disk = dx**2 + dy**2 <= radius**2
    xy = np.rint(adata.obsm["spatial"]).astype(int)
    patches = np.stack([grey[y + dy[disk], x + dx[disk]] for x, y in xy])
    dark = (patches < 110).mean(axis=1)  # haematoxylin-dark pixels: nuclei
    white = (patches > 235).mean(axis=1)  # fat
    x = _lognorm(adata)
    col = {g: i for i, g in enumerate(adata.var_names)}
    noise = np.flatnonzero(~adata.var["informative"].to_numpy())
    r_noise_dark = np.abs([_corr(x[:, i], dark) for i in noise]).max()
    r_noise_white = np.abs([_corr(x[:, i], white) for i in noise]).max()
    assert _corr(x[:, col["FAT_01"]], white) > 0.6 > r_noise_white
    assert _corr(x[:, col["STR_01"]], dark) < -0.3
    assert max(_corr(x[:, col["TUM_01"]], dark), _corr(x[:, col["IMM_01"]], dark)) > max(0.3, r_noise_dark)


def test_toy_counts_are_overdispersed_with_library_size_variation(medium):
    x = medium.X.toarray()
    lib = x.sum(axis=1)
    assert np.percentile(lib, 95) / np.percentile(lib, 5) > 2.5
    noise = x[:, ~medium.var["informative"].to_numpy()]
    mean, var = noise.mean(axis=0), noise.var(axis=0)
    assert (var[mean > 2] > 1.5 * mean[mean > 2]).mean() > 0.8  # negative binomial, not Poisson


def test_toy_multi_section():
    adata = sthist.datasets.toy(n_rows=4, n_cols=5, n_genes=10, n_sections=3, seed=7)
    libs = ["toy_0", "toy_1", "toy_2"]
    assert adata.n_obs == 60 and adata.obs_names.is_unique
    assert list(adata.obs[C.SECTION_KEY].cat.categories) == libs
    assert (adata.obs[C.SECTION_KEY].value_counts() == 20).all()
    assert list(adata.uns["spatial"]) == libs
    assert all(name.startswith(str(s) + "_") for name, s in zip(adata.obs_names, adata.obs[C.SECTION_KEY], strict=True))
    images = [adata.uns["spatial"][lib]["images"]["fullres"] for lib in libs]
    assert not np.array_equal(images[0], images[1]) and not np.array_equal(images[1], images[2])
    # section i does not depend on the number of sections
    single = sthist.datasets.toy(n_rows=4, n_cols=5, n_genes=10, n_sections=1, seed=7)
    np.testing.assert_array_equal(single.uns["spatial"]["toy"]["images"]["fullres"], images[0])
    first = adata[adata.obs[C.SECTION_KEY] == "toy_0"]
    np.testing.assert_array_equal(first.X.toarray(), single.X.toarray())
    np.testing.assert_array_equal(first.obsm["spatial"], single.obsm["spatial"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_rows": 0}, "n_rows must be a positive integer"),
        ({"n_cols": -3}, "n_cols must be a positive integer"),
        ({"n_genes": 2.5}, "n_genes must be a positive integer"),
        ({"n_sections": True}, "n_sections must be a positive integer"),
        ({"n_rows": "8"}, "n_rows must be a positive integer"),
        ({"mpp": 0}, "mpp"),
        ({"mpp": -1.0}, "mpp"),
        ({"mpp": float("nan")}, "mpp"),
        ({"mpp": float("inf")}, "mpp"),
        ({"mpp": "1"}, "mpp"),
        ({"seed": -1}, "seed must be a non-negative integer"),
        ({"seed": 1.5}, "seed must be a non-negative integer"),
        ({"n_genes": 10, "n_informative": 11}, "raise n_genes or lower n_informative"),
        ({"n_informative": -1}, "n_informative"),
        ({"n_rows": 2000, "n_cols": 2000}, "use fewer spots or a larger mpp"),
    ],
)
def test_toy_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sthist.datasets.toy(**{"n_rows": 2, "n_cols": 2, "n_genes": 5, **kwargs})


def test_toy_positional_arguments_rejected():
    with pytest.raises(TypeError):
        sthist.datasets.toy(8, 8)  # keyword-only


def test_toy_h5ad_round_trip(small, tmp_path):
    import anndata as ad

    small.write_h5ad(tmp_path / "toy.h5ad")
    back = ad.read_h5ad(tmp_path / "toy.h5ad")
    assert (back.X != small.X).nnz == 0
    pd.testing.assert_frame_equal(back.obs, small.obs)
    np.testing.assert_array_equal(
        back.uns["spatial"]["toy"]["images"]["fullres"], small.uns["spatial"]["toy"]["images"]["fullres"]
    )
    assert back.uns["spatial"]["toy"]["scalefactors"][C.SPOT_DIAMETER] == 55.0


def test_toy_scanpy_spatial_plot(small):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc

    ax = sc.pl.spatial(small, color="region", library_id="toy", show=False)
    ax = ax[0] if isinstance(ax, list) else ax
    assert len(ax.get_images()) == 1  # the H&E
    spots = [c for c in ax.collections if isinstance(c, matplotlib.collections.PatchCollection)]
    assert len(spots) == 1 and len(spots[0].get_paths()) == small.n_obs  # one circle per spot
    # each spot is coloured by its region with the colours in uns['region_colors']
    expected = np.array([matplotlib.colors.to_rgb(c) for c in small.uns["region_colors"]])
    expected = expected[small.obs["region"].cat.codes.to_numpy()]
    np.testing.assert_allclose(spots[0].get_facecolors()[:, :3], expected, atol=1e-6)
    plt.close("all")


# ------------------------------------------------------------------------------- her2st (made-up files)
def _write_counts(path: Path, table: pd.DataFrame) -> None:
    text = table.to_csv(sep="\t")
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt") as fh:
            fh.write(text)
    else:
        path.write_text(text)


def _write_section(
    data: Path, section: str, genes: list[str], spots: list[tuple[int, int]], *, image=True, gz=True, rng=None
):
    rng = rng or np.random.default_rng(0)
    (data / "ST-cnts").mkdir(parents=True, exist_ok=True)
    (data / "ST-spotfiles").mkdir(parents=True, exist_ok=True)
    (data / "ST-imgs").mkdir(parents=True, exist_ok=True)
    counts = pd.DataFrame(
        rng.integers(0, 20, (len(spots), len(genes))), index=[f"{x}x{y}" for x, y in spots], columns=genes
    )
    _write_counts(data / "ST-cnts" / (f"{section}.tsv.gz" if gz else f"{section}.tsv"), counts)
    # spot file: pixel = offset + array position * 200 um / (0.7 um/px); one extra spot without counts,
    # and the first count row lacks a spot-file row
    listed = [*spots[1:], (30, 30)]
    px_per_pitch = 200 / 0.7
    sel = pd.DataFrame(
        {
            "x": [x for x, _ in listed],
            "y": [y for _, y in listed],
            "new_x": [x + 0.01 for x, _ in listed],
            "new_y": [y - 0.01 for _, y in listed],
            "pixel_x": [100 + (x + 0.01) * px_per_pitch for x, _ in listed],
            "pixel_y": [50 + (y - 0.01) * px_per_pitch for _, y in listed],
            "selected": 1,
        }
    )
    sel.to_csv(data / "ST-spotfiles" / f"{section}_selection.tsv", sep="\t", index=False)
    if image:
        folder = data / "ST-imgs" / section[0] / section
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, (400, 600, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{section}_HE.jpg", quality=90)
    return counts


@pytest.fixture
def fake_root(tmp_path):
    root = tmp_path / "her2st"
    data = root / "data"
    spots = [(x, y) for x in range(2, 6) for y in range(3, 6)]
    tables = {
        "X1": _write_section(data, "X1", ["G1", "G2", "G3"], spots),
        "Y1": _write_section(data, "Y1", ["G2", "G4"], spots[:5], gz=False),
        "X2": _write_section(data, "X2", ["G1"], spots[:4], image=False),
    }
    (root / "genes_785.txt").write_text("G2\nG4\n")
    return root, tables


def test_her2st_reads_made_up_layout(fake_root):
    root, tables = fake_root
    adata = sthist.datasets.her2st(root, sections=["X1", "Y1"], hires_max_size=300, progress=False)
    # first count row has no spot-file row; the extra spot-file row has no counts
    assert adata.n_obs == 11 + 4
    assert list(adata.var_names) == ["G1", "G2", "G3", "G4"]  # union, in order of appearance
    assert isinstance(adata.X, sp.csr_matrix) and adata.X.dtype == np.float32
    assert list(adata.obs[C.SECTION_KEY].cat.categories) == ["X1", "Y1"]
    assert list(adata.obs[C.PATIENT_KEY]) == ["X"] * 11 + ["Y"] * 4
    assert adata.obs_names[0] == "X1_2x4"
    assert adata.obs[C.ARRAY_COL].iloc[0] == 2 and adata.obs[C.ARRAY_ROW].iloc[0] == 4
    x = pd.DataFrame(adata.X.toarray(), index=adata.obs_names, columns=adata.var_names)
    expected = tables["X1"].iloc[1:].set_axis([f"X1_{i}" for i in tables["X1"].index[1:]])
    pd.testing.assert_frame_equal(x.loc[expected.index, ["G1", "G2", "G3"]], expected.astype(np.float32))
    assert (x.loc[expected.index, "G4"] == 0).all()  # gene absent from X1's table
    y_rows = [n for n in adata.obs_names if n.startswith("Y1_")]
    assert (x.loc[y_rows, ["G1", "G3"]] == 0).all().all()
    np.testing.assert_allclose(x.loc[y_rows, "G4"], tables["Y1"].iloc[1:]["G4"])
    np.testing.assert_allclose(adata.obsm["spatial"][0], [100 + 2.01 * 200 / 0.7, 50 + 3.99 * 200 / 0.7])
    assert list(adata.var["genes_785"]) == [False, True, False, True]

    lib = adata.uns["spatial"]["X1"]
    hires = lib["images"]["hires"]
    assert hires.dtype == np.uint8 and hires.shape == (200, 300, 3)
    sf = lib["scalefactors"]
    assert sf[C.HIRES_SCALEF] == pytest.approx(0.5)
    assert sf[C.MPP] == pytest.approx(0.7)
    assert sf[C.SPOT_DIAMETER] == pytest.approx(100 / 0.7)
    path = Path(lib["metadata"][C.SOURCE_IMAGE_PATH])
    assert path.is_absolute() and path == root / "data" / "ST-imgs" / "X" / "X1" / "X1_HE.jpg"
    # the data folder itself is accepted as root
    again = sthist.datasets.her2st(root / "data", sections=["X1"], hires_max_size=300, progress=False)
    assert list(again.var_names) == ["G1", "G2", "G3"]
    np.testing.assert_array_equal(again.X.toarray(), adata.X[:11, :3].toarray())
    assert list(again.obs_names) == list(adata.obs_names[:11])


def test_her2st_small_image_not_upscaled(fake_root):
    root, _ = fake_root
    adata = sthist.datasets.her2st(root, sections="Y1", progress=False)
    lib = adata.uns["spatial"]["Y1"]
    assert lib["images"]["hires"].shape == (400, 600, 3) and lib["scalefactors"][C.HIRES_SCALEF] == 1.0


def test_her2st_unknown_section(fake_root):
    root, _ = fake_root
    with pytest.raises(
        ValueError, match=r"Unknown her2st section\(s\) \['Z9'\].*Available sections: \['X1', 'X2', 'Y1'\]"
    ):
        sthist.datasets.her2st(root, sections=["X1", "Z9"], progress=False)


def test_her2st_section_without_image(fake_root):
    root, _ = fake_root
    with pytest.raises(FileNotFoundError, match=r"\['X2'\] have no H&E image.*Sections with an image: \['X1', 'Y1'\]"):
        sthist.datasets.her2st(root, sections=["X2"], progress=False)
    with pytest.raises(FileNotFoundError, match=r"\['X2'\] have no H&E image"):
        sthist.datasets.her2st(root, progress=False)  # None reads all sections, X2 included


def test_her2st_missing_spot_file(fake_root):
    root, _ = fake_root
    (root / "data" / "ST-spotfiles" / "Y1_selection.tsv").unlink()
    with pytest.raises(FileNotFoundError, match=r"\['Y1'\] have no spot file"):
        sthist.datasets.her2st(root, sections=["Y1"], progress=False)


def test_her2st_bad_root(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Clone https://github\.com/almaan/her2st"):
        sthist.datasets.her2st(tmp_path / "nowhere")
    (tmp_path / "data" / "ST-cnts").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"lacks the sub-folder\(s\) \['ST-spotfiles', 'ST-imgs'\]"):
        sthist.datasets.her2st(tmp_path)
    (tmp_path / "data" / "ST-spotfiles").mkdir()
    (tmp_path / "data" / "ST-imgs").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no count file"):
        sthist.datasets.her2st(tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"hires_max_size": 0}, ValueError, "hires_max_size must be a positive integer"),
        ({"sections": []}, ValueError, "sections is empty"),
        ({"sections": ["X1", "X1"]}, ValueError, "more than once"),
    ],
)
def test_her2st_bad_arguments(fake_root, kwargs, error, match):
    root, _ = fake_root
    with pytest.raises(error, match=match):
        sthist.datasets.her2st(root, progress=False, **kwargs)


def _no_download(monkeypatch):
    from sthist.datasets import _her2st_fetch

    def fetch_her2st(**kwargs):
        raise AssertionError("her2st() must not download when STHIST_HER2ST or root names a copy")

    monkeypatch.setattr(_her2st_fetch, "fetch_her2st", fetch_her2st)


def test_her2st_env_variable_names_the_copy(fake_root, monkeypatch):
    root, tables = fake_root
    _no_download(monkeypatch)
    for folder in (root, root / "data"):  # the repository folder or its data folder
        monkeypatch.setenv("STHIST_HER2ST", str(folder))
        adata = sthist.datasets.her2st(sections=["X1"], hires_max_size=300, progress=False)
        assert adata.n_obs == len(tables["X1"]) - 1 and list(adata.var_names) == ["G1", "G2", "G3"]
        assert Path(adata.uns["spatial"]["X1"]["metadata"][C.SOURCE_IMAGE_PATH]).is_relative_to(root)


def test_her2st_env_variable_is_logged(fake_root, monkeypatch):
    from sthist.datasets import _her2st

    root, _ = fake_root
    _no_download(monkeypatch)
    logged = []
    monkeypatch.setattr(_her2st, "info", lambda msg, **kwargs: logged.append(msg))
    monkeypatch.setenv("STHIST_HER2ST", str(root))
    sthist.datasets.her2st(sections=["Y1"], progress=False)
    assert any("STHIST_HER2ST" in msg and str(root) in msg for msg in logged)


@pytest.mark.parametrize("layout", ["missing", "empty", "no-counts"])
def test_her2st_env_variable_wrong_path_raises(layout, tmp_path, monkeypatch):
    _no_download(monkeypatch)
    folder = tmp_path / "her2st"
    if layout != "missing":
        (folder / "data").mkdir(parents=True)
    if layout == "no-counts":
        (folder / "data" / "ST-imgs").mkdir()
    monkeypatch.setenv("STHIST_HER2ST", str(folder))
    with pytest.raises(FileNotFoundError, match=rf"STHIST_HER2ST.*{re.escape(repr(str(folder)))}") as info:
        sthist.datasets.her2st(progress=False)
    assert "unset STHIST_HER2ST" in str(info.value)


def test_her2st_env_variable_incomplete_copy_raises(fake_root, monkeypatch):
    root, _ = fake_root
    _no_download(monkeypatch)
    import shutil

    shutil.rmtree(root / "data" / "ST-imgs")
    monkeypatch.setenv("STHIST_HER2ST", str(root))
    with pytest.raises(FileNotFoundError, match=r"STHIST_HER2ST.*no complete her2st copy.*ST-imgs"):
        sthist.datasets.her2st(progress=False)


def test_her2st_explicit_root_wins_over_env_variable(fake_root, tmp_path, monkeypatch):
    root, _ = fake_root
    _no_download(monkeypatch)
    monkeypatch.setenv("STHIST_HER2ST", str(tmp_path / "nowhere"))  # wrong, but not read
    adata = sthist.datasets.her2st(root, sections=["Y1"], progress=False)
    assert list(adata.obs[C.SECTION_KEY].cat.categories) == ["Y1"]
    # an empty variable counts as unset: the download is tried
    monkeypatch.setenv("STHIST_HER2ST", "")
    with pytest.raises(AssertionError, match="must not download"):
        sthist.datasets.her2st(progress=False)


# ------------------------------------------------------------------------------------ her2st (real data)
needs_her2st = pytest.mark.skipif(
    not (HER2ST / "data" / "ST-cnts").is_dir(), reason=f"her2st subset not found at {HER2ST}"
)


@pytest.mark.realdata
@needs_her2st
def test_her2st_real_from_env_variable(monkeypatch):
    _no_download(monkeypatch)
    monkeypatch.setenv("STHIST_HER2ST", str(HER2ST))
    adata = sthist.datasets.her2st(sections=["C3"], progress=False)
    assert adata.n_obs == 180 and list(adata.obs[C.SECTION_KEY].cat.categories) == ["C3"]
    assert adata.var["genes_785"].sum() > 0
    path = Path(adata.uns["spatial"]["C3"]["metadata"][C.SOURCE_IMAGE_PATH])
    assert path.is_relative_to(HER2ST.resolve()) or path.is_relative_to(HER2ST)


@pytest.fixture(scope="module")
def her2st_all():
    return sthist.datasets.her2st(HER2ST, progress=False)


@pytest.mark.realdata
@needs_her2st
def test_her2st_real_spots_and_genes(her2st_all):
    adata = her2st_all
    counts = adata.obs[C.SECTION_KEY].value_counts()
    assert counts.to_dict() == {"B4": 283, "C2": 187, "C3": 180, "C4": 184}
    assert list(adata.obs[C.SECTION_KEY].cat.categories) == ["B4", "C2", "C3", "C4"]
    assert adata.obs.groupby(C.SECTION_KEY, observed=True)[C.PATIENT_KEY].first().to_dict() == {
        "B4": "B",
        "C2": "C",
        "C3": "C",
        "C4": "C",
    }
    assert adata.obs_names.is_unique and adata.var_names.is_unique
    assert adata.n_vars >= 15842
    assert isinstance(adata.X, sp.csr_matrix) and adata.X.dtype == np.float32
    assert adata.var["genes_785"].sum() == 785
    # one row of the raw table, compared value by value
    with gzip.open(HER2ST / "data" / "ST-cnts" / "C2.tsv.gz", "rt") as fh:
        genes = fh.readline().rstrip("\n").split("\t")[1:]
        fields = fh.readline().rstrip("\n").split("\t")
    spot, values = fields[0], np.array(fields[1:], dtype=np.float32)
    row = adata[f"C2_{spot}"].X.toarray().ravel()
    np.testing.assert_array_equal(row[adata.var_names.get_indexer(genes)], values)
    assert row.sum() == values.sum()  # genes outside C2's table are 0
    median_umi = np.median(np.asarray(adata[adata.obs[C.SECTION_KEY] == "C2"].X.sum(axis=1)).ravel())
    assert median_umi == pytest.approx(8508, rel=0.01)


@pytest.mark.realdata
@needs_her2st
def test_her2st_real_geometry(her2st_all):
    adata = her2st_all
    for section in ["B4", "C2", "C3", "C4"]:
        lib = adata.uns["spatial"][section]
        path = Path(lib["metadata"][C.SOURCE_IMAGE_PATH])
        assert path.is_absolute() and path.is_file() and path.suffix == ".jpg"
        with warnings.catch_warnings():  # ~92 megapixels: above PIL's decompression-bomb warning limit
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:  # reads the header only
                width, height = im.size
        xy = adata.obsm["spatial"][(adata.obs[C.SECTION_KEY] == section).to_numpy()]
        assert (xy > 0).all() and (xy[:, 0] < width).all() and (xy[:, 1] < height).all()
        sf = lib["scalefactors"]
        assert 0.65 < sf[C.MPP] < 0.72
        assert sf[C.SPOT_DIAMETER] == pytest.approx(100 / sf[C.MPP])
        hires = lib["images"]["hires"]
        assert hires.dtype == np.uint8 and max(hires.shape[:2]) == 2000
        assert hires.shape[:2] == (round(height * sf[C.HIRES_SCALEF]), round(width * sf[C.HIRES_SCALEF]))
        # the tissue (darker than the glass) lies under the spots
        hx, hy = np.rint(xy * sf[C.HIRES_SCALEF]).astype(int).T
        under_spots = hires[hy, hx].mean()
        assert under_spots < hires.mean()
