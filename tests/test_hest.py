"""HEST-1k: sthist.io.read_hest on a HEST-layout folder built from synthetic data, sthist.datasets.hest's download."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import sthist
from sthist import _constants as C

MPP = 0.5  # µm per pixel of the synthetic slides
W, H = 640, 512
HALF = 12  # half-side (px) of the coloured square drawn around each spot
COLOURS = np.array([[230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48], [145, 30, 180], [70, 240, 240]])
SAMPLES = {
    # id: (spot centres (x, y), genes, patient, organ)
    "TENXA": ([(100, 100), (300, 120), (500, 300), (200, 400)], ["G1", "G2", "G3"], "P1", "Breast"),
    "NCBIB": ([(150, 200), (450, 150), (320, 380)], ["G2", "G3", "G4"], "P2", "Lung"),
}


def _slide(centres) -> np.ndarray:
    img = np.full((H, W, 3), 250, dtype=np.uint8)
    for i, (x, y) in enumerate(centres):
        img[y - HALF : y + HALF + 1, x - HALF : x + HALF + 1] = COLOURS[i]
    return img


def _write_pyramid(path: Path, img: np.ndarray) -> None:
    import tifffile

    with tifffile.TiffWriter(path) as tif:
        tif.write(img, subifds=2, tile=(64, 64), photometric="rgb")
        tif.write(img[::2, ::2], subfiletype=1, tile=(64, 64), photometric="rgb")
        tif.write(img[::4, ::4], subfiletype=1, tile=(64, 64), photometric="rgb")


def _write_sample(root: Path, sample: str, *, meta_extra: dict | None = None, centres=None) -> None:
    spots, genes, patient, organ = SAMPLES[sample]
    centres = spots if centres is None else centres
    for sub in ("st", "wsis", "metadata"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    n = len(centres)
    X = sp.csr_matrix(np.arange(1, n * len(genes) + 1, dtype=np.float32).reshape(n, len(genes)))
    obs = pd.DataFrame(
        {"in_tissue": 1, "array_row": np.arange(n), "array_col": np.arange(n)},
        index=[f"bc{i}" for i in range(n)],
    )
    table = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=genes))
    table.obsm["spatial"] = np.asarray(centres, dtype=np.float64)
    small = _slide(spots)[::10, ::10]
    table.uns["spatial"] = {
        "ST": {
            "images": {"downscaled_fullres": small},
            "scalefactors": {"tissue_downscaled_fullres_scalef": 0.1, "spot_diameter_fullres": 55.0 / MPP},
        }
    }
    table.write_h5ad(root / "st" / f"{sample}.h5ad")
    _write_pyramid(root / "wsis" / f"{sample}.tif", _slide(spots))
    meta = {
        "pixel_size_um_estimated": MPP,
        "pixel_size_um_embedded": 0.4,
        "spot_diameter": 55.0,
        "inter_spot_dist": 100.0,
        "st_technology": "Visium",
        "patient": patient,
        "organ": organ,
        "species": "Homo sapiens",
        "dataset_title": "synthetic",
        "fullres_px_width": W,
        "nested": {"ignored": True},
        **(meta_extra or {}),
    }
    (root / "metadata" / f"{sample}.json").write_text(json.dumps(meta))


@pytest.fixture
def hest_root(tmp_path) -> Path:
    root = tmp_path / "hest"
    for sample in SAMPLES:
        _write_sample(root, sample)
    return root


def test_read_hest_layout(hest_root):
    adata = sthist.io.read_hest(hest_root, ids=["TENXA", "NCBIB"], progress=False)
    assert adata.n_obs == 7 and adata.var_names.tolist() == ["G1", "G2", "G3", "G4"]
    assert adata.obs_names[0] == "TENXA_bc0"
    for key in ("library_id", "section"):
        assert isinstance(adata.obs[key].dtype, pd.CategoricalDtype)
        assert adata.obs[key].cat.categories.tolist() == ["TENXA", "NCBIB"]
    # ids=None: every sample with a table, in sorted order
    assert sthist.io.read_hest(hest_root, progress=False).obs["library_id"].cat.categories.tolist() == [
        "NCBIB",
        "TENXA",
    ]
    assert adata.obs.loc["NCBIB_bc1", "patient"] == "P2" and adata.obs.loc["TENXA_bc0", "organ"] == "Breast"
    assert adata.obs["species"].eq("Homo sapiens").all() and adata.obs["st_technology"].eq("Visium").all()
    # union of genes, 0 where a sample lacks one; counts as stored
    X = adata.X.toarray()
    assert sp.issparse(adata.X) and X.dtype == np.float32
    np.testing.assert_array_equal(X[adata.obs_names.get_loc("TENXA_bc0")], [1, 2, 3, 0])
    np.testing.assert_array_equal(X[adata.obs_names.get_loc("NCBIB_bc0")], [0, 1, 2, 3])
    np.testing.assert_array_equal(adata.obsm["spatial"][:4], SAMPLES["TENXA"][0])

    lib = adata.uns["spatial"]["TENXA"]
    sf = lib["scalefactors"]
    assert sf[C.MPP] == MPP  # pixel_size_um_estimated, not the embedded 0.4 nor 65 / spot_diameter_fullres
    assert sf[C.SPOT_DIAMETER] == pytest.approx(55.0 / MPP)
    assert Path(lib["metadata"][C.SOURCE_IMAGE_PATH]) == (hest_root / "wsis" / "TENXA.tif").resolve()
    assert lib["metadata"][C.OBS_KIND] == "spots"
    assert lib["metadata"]["hest"]["organ"] == "Breast" and "nested" not in lib["metadata"]["hest"]
    hires = lib["images"]["hires"]
    assert hires.dtype == np.uint8 and hires.shape == (-(-H // 10), W // 10, 3)  # the table's downscaled image
    assert sf[C.HIRES_SCALEF] == pytest.approx(0.1)


@pytest.mark.parametrize("mpp", [1.0, 2.0])
def test_read_hest_patches_at_any_physical_size(hest_root, mpp):
    adata = sthist.io.read_hest(hest_root, ids=["TENXA", "NCBIB"], progress=False)
    sthist.pp.extract_patches(adata, patch_size=8, mpp=mpp, library_key="library_id", progress=False)
    params = adata.uns["patches"]["params"]
    assert params["source_mpp"] == {"NCBIB": MPP, "TENXA": MPP}
    assert params["source_mpp_origin"]["TENXA"] == "scalefactors['microns_per_pixel']"
    assert params["source_patch_size"]["TENXA"] == round(8 * mpp / MPP)
    assert "TIFF" in params["image_source"]["TENXA"]
    patches = np.asarray(adata.obsm["patches"])
    for i, name in enumerate(adata.obs_names):
        _, bc = name.split("_")
        np.testing.assert_array_equal(patches[i, 4, 4], COLOURS[int(bc[2:])])


def test_read_hest_subset_and_round_trip(hest_root, tmp_path):
    adata = sthist.io.read_hest(hest_root, ids="NCBIB", progress=False)
    assert list(adata.uns["spatial"]) == ["NCBIB"] and adata.n_obs == 3
    adata.write_h5ad(tmp_path / "back.h5ad")
    back = ad.read_h5ad(tmp_path / "back.h5ad")
    assert back.uns["spatial"]["NCBIB"]["scalefactors"][C.MPP] == MPP


def test_read_hest_errors(hest_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        sthist.io.read_hest(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"sub-folder\(s\) \['st', 'wsis', 'metadata'\].*datasets.hest"):
        sthist.io.read_hest(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"'XYZ' \(st/XYZ.h5ad, wsis/XYZ.tif, metadata/XYZ.json\).*TENXA"):
        sthist.io.read_hest(hest_root, ids=["XYZ"])
    with pytest.raises(ValueError, match="more than once"):
        sthist.io.read_hest(hest_root, ids=["TENXA", "TENXA"])

    # metadata without a pixel size: the error computes one from the spot pitch and inter_spot_dist
    meta_path = hest_root / "metadata" / "NCBIB.json"
    meta = json.loads(meta_path.read_text())
    meta.pop("pixel_size_um_estimated")
    meta["pixel_size_um_embedded"] = None
    meta_path.write_text(json.dumps(meta))
    centres = np.asarray(SAMPLES["NCBIB"][0], dtype=float)
    d = np.sort(np.linalg.norm(centres[:, None] - centres[None], axis=-1), axis=1)[:, 1]
    expected = 100.0 / float(np.median(d))
    with pytest.raises(ValueError, match=rf"no pixel size.*{expected:.4f} µm/px.*pixel_size_um_estimated"):
        sthist.io.read_hest(hest_root, progress=False)


def test_read_hest_spots_outside_the_slide(tmp_path):
    root = tmp_path / "hest"
    _write_sample(root, "TENXA", centres=[(x + 5000, y) for x, y in SAMPLES["TENXA"][0]])
    with pytest.raises(ValueError, match=r"None of the 4 spots.*lies in.*640 x 512 px"):
        sthist.io.read_hest(root, progress=False)
    _write_sample(root, "TENXA", centres=[*SAMPLES["TENXA"][0][:3], (9000, 9000)])
    adata = sthist.io.read_hest(root, progress=False)
    assert adata.n_obs == 3  # the spot outside is dropped


# ---------------------------------------------------------------------------------------------------------------
# sthist.datasets.hest: download with huggingface_hub (mocked: no network in tests)
# ---------------------------------------------------------------------------------------------------------------


def test_hest_reads_complete_samples_without_a_connection(hest_root, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")

    def no_network(*args, **kwargs):
        raise AssertionError("complete samples must not be downloaded again")

    monkeypatch.setattr(hub, "snapshot_download", no_network)
    adata = sthist.datasets.hest(["TENXA"], root=hest_root, progress=False)
    assert adata.n_obs == 4


def test_hest_downloads_missing_samples(hest_root, tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    calls = []

    def fake_download(repo_id, *, repo_type, local_dir, allow_patterns, token=None, **kwargs):
        calls.append((repo_id, repo_type, sorted(allow_patterns)))
        for sample in SAMPLES:
            if f"st/{sample}.h5ad" in allow_patterns:
                _write_sample(Path(local_dir), sample)
        return str(local_dir)

    monkeypatch.setattr(hub, "snapshot_download", fake_download)
    root = tmp_path / "cache"
    adata = sthist.datasets.hest(["TENXA", "NCBIB"], root=root, progress=False)
    assert adata.n_obs == 7
    assert calls == [
        (
            "MahmoodLab/hest",
            "dataset",
            sorted(f"{d}/{s}.{e}" for s in SAMPLES for d, e in (("st", "h5ad"), ("wsis", "tif"), ("metadata", "json"))),
        )
    ]
    # the default root is the cache under $STHIST_DATA_DIR
    monkeypatch.setenv("STHIST_DATA_DIR", str(tmp_path / "data"))
    assert sthist.datasets.hest("TENXA", progress=False).n_obs == 4
    assert (tmp_path / "data" / "hest" / "st" / "TENXA.h5ad").is_file()
    # an id HEST does not have: nothing arrives
    with pytest.raises(ValueError, match=r"HEST-1k has no sample\(s\) \['NOPE'\].*HEST_v1_1_0.csv"):
        sthist.datasets.hest("NOPE", root=root)


def test_hest_gated_and_offline_errors(tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    import requests
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError

    def gated(*args, **kwargs):
        raise GatedRepoError("Access to dataset MahmoodLab/hest is restricted", response=requests.Response())

    monkeypatch.setattr(hub, "snapshot_download", gated)
    with pytest.raises(PermissionError, match=r"gated.*accept its terms.*hf auth login.*HF_TOKEN"):
        sthist.datasets.hest("TENXA", root=tmp_path / "a")

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("An error happened while trying to locate the files on the Hub")

    monkeypatch.setattr(hub, "snapshot_download", offline)
    with pytest.raises(ConnectionError, match=r"huggingface.co cannot be reached.*offline"):
        sthist.datasets.hest("TENXA", root=tmp_path / "b")

    with pytest.raises(TypeError, match="sample id"):
        sthist.datasets.hest([1, 2], root=tmp_path)
    with pytest.raises(ValueError, match="ids is empty"):
        sthist.datasets.hest([], root=tmp_path)


def test_hest_without_huggingface_hub_says_which_extra(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ImportError, match=r"pip install 'sthist\[hest\]'"):
        sthist.datasets.hest("TENXA", root=tmp_path)
