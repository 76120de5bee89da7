"""sthist.datasets.her2st() without a root: the Zenodo download into a cache (pooch mocked: no network in tests)."""

from __future__ import annotations

import gzip
import io
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import sthist
from sthist.datasets import _her2st_fetch as fetch

pyzipper = pytest.importorskip("pyzipper")
pooch = pytest.importorskip("pooch")

SECTIONS = ("A1", "B2")
GENES = ["HPS6", "TNC", "ERBB2"]  # two of them are in the shipped 785-gene panel
SPOTS = [(x, y) for x in range(2, 5) for y in range(3, 5)]


def _counts(section: str) -> bytes:
    rng = np.random.default_rng(len(section))
    table = pd.DataFrame(
        rng.integers(0, 9, (len(SPOTS), len(GENES))), index=[f"{x}x{y}" for x, y in SPOTS], columns=GENES
    )
    return gzip.compress(table.to_csv(sep="\t").encode())


def _selection() -> bytes:
    px = 200 / 0.7
    sel = pd.DataFrame(
        {
            "x": [x for x, _ in SPOTS],
            "y": [y for _, y in SPOTS],
            "new_x": [x for x, _ in SPOTS],
            "new_y": [y for _, y in SPOTS],
            "pixel_x": [50 + x * px for x, _ in SPOTS],
            "pixel_y": [40 + y * px for _, y in SPOTS],
            "selected": 1,
        }
    )
    return gzip.compress(sel.to_csv(sep="\t", index=False).encode())


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((1600, 1500, 3), 200, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _zip(path: Path, members: dict[str, bytes], password: str) -> Path:
    with pyzipper.AESZipFile(path, "w", compression=pyzipper.ZIP_DEFLATED, encryption=pyzipper.WZ_AES) as zf:
        zf.setpassword(password.encode())
        for name, data in members.items():
            zf.writestr(name, data)
    return path


@pytest.fixture(scope="module")
def zenodo_archives(tmp_path_factory) -> dict[str, Path]:
    """The three archives of the Zenodo record, in its layout, encrypted with the published passwords."""
    folder = tmp_path_factory.mktemp("zenodo")
    members = {
        "count-matrices.zip": {f"count-matrices/{s}.tsv.gz": _counts(s) for s in SECTIONS},
        "spot-selections.zip": {f"{s}_selection.tsv.gz": _selection() for s in SECTIONS},
        "images.zip": {
            **{f"images/HE/{s}.jpg": _jpeg() for s in SECTIONS},
            "images/annotation/A1_annotated.jpg": _jpeg(),  # not an H&E image: ignored
        },
    }
    return {name: _zip(folder / name, members[name], fetch.ARCHIVES[name]) for name in fetch.ARCHIVES}


class FakePooch:
    """What ``pooch.create`` returns: ``registry``, ``load_registry_from_doi`` and ``fetch`` (from local files)."""

    calls: ClassVar[list[str]] = []

    def __init__(self, archives, *, fail=None):
        self.archives, self.fail, self.registry = archives, fail, {}

    def load_registry_from_doi(self):
        FakePooch.calls.append("registry")
        if self.fail is not None:
            raise self.fail
        self.registry.update({name: "md5:0" for name in self.archives})

    def fetch(self, name, progressbar=False):
        FakePooch.calls.append(name)
        return str(self.archives[name])


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("STHIST_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("STHIST_HER2ST", raising=False)  # a local copy named there would be read instead
    FakePooch.calls = []
    return tmp_path / "data" / "her2st"


def _use(monkeypatch, archives, **kwargs):
    seen = {}

    def create(*, path, base_url, registry, **kw):
        seen.update(path=Path(path), base_url=base_url, registry=registry)
        return FakePooch(archives, **kwargs)

    monkeypatch.setattr(pooch, "create", create)
    return seen


def test_her2st_downloads_into_the_cache_once(cache, zenodo_archives, monkeypatch):
    seen = _use(monkeypatch, zenodo_archives)
    adata = sthist.datasets.her2st(progress=False)
    assert seen["base_url"] == "doi:10.5281/zenodo.4751624/" and seen["path"] == cache / "downloads"
    assert FakePooch.calls == ["registry", *fetch.ARCHIVES]  # checksums from Zenodo's API, then the three files
    assert adata.obs["section"].cat.categories.tolist() == list(SECTIONS)
    assert adata.n_obs == len(SECTIONS) * len(SPOTS) and adata.var_names.tolist() == GENES
    assert adata.var["genes_785"].tolist() == [True, True, False]  # the shipped panel, written next to the data
    lib = adata.uns["spatial"]["B2"]
    assert Path(lib["metadata"]["source_image_path"]) == cache / "data" / "ST-imgs" / "B" / "B2" / "B2.jpg"
    assert lib["scalefactors"]["microns_per_pixel"] == pytest.approx(0.7)
    assert not (cache / "data" / "ST-imgs" / "A" / "A1" / "A1_annotated.jpg").exists()

    # a second call reads the cache and never touches the network, even offline
    def offline(**kwargs):
        raise AssertionError("the cache is complete: pooch must not be used")

    monkeypatch.setattr(pooch, "create", offline)
    again = sthist.datasets.her2st(sections=["A1"], progress=False)
    assert again.n_obs == len(SPOTS)


def test_her2st_offline_without_cache_says_so(cache, zenodo_archives, monkeypatch):
    import requests

    _use(monkeypatch, zenodo_archives, fail=requests.exceptions.ConnectionError("Failed to resolve 'zenodo.org'"))
    with pytest.raises(ConnectionError, match=r"cannot be reached \(offline.*her2st\(root=\.\.\.\)"):
        sthist.datasets.her2st(progress=False)
    assert not (cache / "data").exists()


def test_her2st_checksum_mismatch_and_bad_archive(cache, zenodo_archives, monkeypatch, tmp_path):
    class BadHash(FakePooch):
        def fetch(self, name, progressbar=False):
            raise ValueError(f"MD5 hash of downloaded file ({name}) does not match the known hash: expected 0")

    monkeypatch.setattr(pooch, "create", lambda **kw: BadHash(zenodo_archives))
    with pytest.raises(ValueError, match=r"does not match its checksum.*delete"):
        sthist.datasets.her2st(progress=False)

    # archives encrypted with another password: a clear error, no half-unpacked data left
    wrong = {name: _zip(tmp_path / name, {"count-matrices/A1.tsv.gz": b"x"}, "wrong") for name in fetch.ARCHIVES}
    _use(monkeypatch, wrong)
    with pytest.raises(ValueError, match="Cannot decrypt"):
        sthist.datasets.her2st(progress=False)
    assert not (cache / "data").exists() and not (cache / "data.partial").exists()


def test_her2st_download_needs_the_extra(cache, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pyzipper", None)
    with pytest.raises(ImportError, match=r"pip install 'sthist\[download\]'"):
        sthist.datasets.her2st(progress=False)
