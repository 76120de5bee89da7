"""Download the public her2st data from Zenodo into a cache, in the layout :func:`sthist.datasets.her2st` reads.

The record https://doi.org/10.5281/zenodo.4751624 (Andersson et al., version 3.0 of the data of
github.com/almaan/her2st, CC BY 4.0) holds ``count-matrices.zip`` (``count-matrices/<section>.tsv.gz``),
``spot-selections.zip`` (``<section>_selection.tsv.gz``), ``images.zip`` (``images/HE/<section>.jpg``) and
``meta.zip``. The archives are AES-encrypted zip files; the depositors publish the passwords in the her2st
repository's README ("Data access"): one for the count matrices and images, one for the metadata and spot
selections. Python's :mod:`zipfile` cannot decrypt AES, so they are read with ``pyzipper``.

Checksums: this module does not hard-code them, because they could not be verified when it was written (no
network). Unless :data:`KNOWN_HASHES` holds a value, pooch takes the MD5 checksum that Zenodo's API publishes for each
file (:meth:`pooch.Pooch.load_registry_from_doi`) and checks every downloaded archive against it. That guards
against corrupt or truncated downloads, not against a changed record; pin the values in :data:`KNOWN_HASHES`
(``"md5:<hex>"`` or ``"sha256:<hex>"``) once they are verified.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
from importlib import resources
from pathlib import Path

from .._logging import info
from ._cache import data_dir, is_connection_error, optional_import

ZENODO_DOI = "10.5281/zenodo.4751624"
ZENODO_URL = "https://zenodo.org/records/4751624"
#: archive -> password, as published in the README of https://github.com/almaan/her2st ("Data access")
ARCHIVES = {
    "count-matrices.zip": "zNLXkYk3Q9znUseS",
    "spot-selections.zip": "yUx44SzG6NdB32gY",
    "images.zip": "zNLXkYk3Q9znUseS",
}
#: Verified checksums of the archives (``"md5:..."`` / ``"sha256:..."``); ``None``: Zenodo's published MD5 is used.
KNOWN_HASHES: dict[str, str | None] = dict.fromkeys(ARCHIVES)
PANEL_RESOURCE = "her2st_genes_785.txt"
COMPLETE_MARKER = ".sthist_complete.json"

_SECTION = r"([A-Za-z]+\d+)"
_COUNTS = re.compile(rf"^{_SECTION}\.tsv(\.gz)?$")
_SPOTS = re.compile(rf"^{_SECTION}_selection\.tsv(\.gz)?$")
_IMAGE = re.compile(rf"^{_SECTION}\.jpe?g$", re.IGNORECASE)


def cache_root() -> Path:
    """The folder the downloaded her2st data live in (``$STHIST_DATA_DIR/her2st`` or ``~/.cache/sthist/her2st``)."""
    return data_dir("her2st")


def _is_complete(root: Path) -> bool:
    marker = root / COMPLETE_MARKER
    if not marker.is_file():
        return False
    try:
        sections = json.loads(marker.read_text()).get("sections", [])
    except (json.JSONDecodeError, AttributeError):
        return False
    return bool(sections) and all((root / "data" / "ST-cnts" / f"{s}.tsv.gz").is_file() for s in sections)


def fetch_her2st(*, progress: bool = True) -> Path:
    """Return the cached her2st root, downloading and unpacking the Zenodo archives the first time.

    Raises
    ------
    ImportError
        If ``pooch`` or ``pyzipper`` is not installed (``pip install 'sthist[download]'``).
    ConnectionError
        If the data are not cached and Zenodo cannot be reached.
    ValueError
        If a downloaded archive does not match its checksum or does not hold the expected files.
    """
    root = cache_root()
    if _is_complete(root):
        return root
    pooch = optional_import("pooch", extra="download", purpose="Downloading her2st (sthist.datasets.her2st())")
    pyzipper = optional_import("pyzipper", extra="download", purpose="Unpacking her2st's encrypted archives")
    downloads = root / "downloads"
    start = info(f"downloading the her2st data from {ZENODO_URL} into {str(root)!r} (about 650 MB, once)")
    try:
        fetcher = pooch.create(path=downloads, base_url=f"doi:{ZENODO_DOI}/", registry=None, retry_if_failed=2)
        if any(h is None for h in KNOWN_HASHES.values()):
            fetcher.load_registry_from_doi()  # file names and the MD5 checksums Zenodo publishes
        for name, known in KNOWN_HASHES.items():
            if known is not None:
                fetcher.registry[name] = known
        missing = [name for name in ARCHIVES if name not in fetcher.registry]
        if missing:
            raise ValueError(
                f"Zenodo record {ZENODO_URL} no longer lists {missing}; download the data by hand (see "
                "https://github.com/almaan/her2st) and pass `sthist.datasets.her2st(root=...)`."
            )
        files = {name: Path(fetcher.fetch(name, progressbar=progress)) for name in ARCHIVES}
    except Exception as e:
        if is_connection_error(e):
            raise ConnectionError(
                f"Cannot download her2st: {ZENODO_URL} cannot be reached (offline or behind a proxy). Connect and call "
                "`sthist.datasets.her2st()` again (the data are then cached), or unpack the data of "
                "https://github.com/almaan/her2st yourself and pass `sthist.datasets.her2st(root=...)`. "
                f"({type(e).__name__}: {e})"
            ) from None
        if isinstance(e, ValueError) and "hash" in str(e).lower():
            raise ValueError(
                f"A her2st archive from {ZENODO_URL} does not match its checksum ({e}). The download was corrupted, "
                f"or the record changed: delete {str(downloads)!r} and call again."
            ) from None
        raise
    sections = _unpack(files, root, pyzipper)
    panel = resources.files("sthist.datasets").joinpath(PANEL_RESOURCE)
    (root / "genes_785.txt").write_text(panel.read_text())
    (root / COMPLETE_MARKER).write_text(json.dumps({"sections": sections, "doi": ZENODO_DOI}))
    info(f"    finished: {len(sections)} sections in {str(root / 'data')!r}", time=start)
    return root


def _unpack(files: dict[str, Path], root: Path, pyzipper) -> list[str]:
    """Extract the archives into ``root/data`` in the layout of github.com/almaan/her2st; return the sections."""
    partial = root / "data.partial"
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "ST-cnts").mkdir(parents=True)
    (partial / "ST-spotfiles").mkdir()
    (partial / "ST-imgs").mkdir()
    counts, spots, images = set(), set(), set()
    try:
        for name, path in files.items():
            with pyzipper.AESZipFile(path) as zf:
                zf.setpassword(ARCHIVES[name].encode())
                for member in zf.infolist():
                    if member.is_dir():
                        continue
                    parts = Path(member.filename).parts
                    base = parts[-1]
                    try:
                        if name == "count-matrices.zip" and (m := _COUNTS.match(base)):
                            data = zf.read(member)
                            data = data if m.group(2) else gzip.compress(data)
                            (partial / "ST-cnts" / f"{m.group(1)}.tsv.gz").write_bytes(data)
                            counts.add(m.group(1))
                        elif name == "spot-selections.zip" and (m := _SPOTS.match(base)):
                            data = zf.read(member)
                            data = gzip.decompress(data) if m.group(2) else data
                            (partial / "ST-spotfiles" / f"{m.group(1)}_selection.tsv").write_bytes(data)
                            spots.add(m.group(1))
                        elif (
                            name == "images.zip" and len(parts) >= 2 and parts[-2] == "HE" and (m := _IMAGE.match(base))
                        ):
                            section = m.group(1)
                            patient = re.match(r"[A-Za-z]+", section).group(0)
                            folder = partial / "ST-imgs" / patient / section
                            folder.mkdir(parents=True, exist_ok=True)
                            (folder / f"{section}.jpg").write_bytes(zf.read(member))
                            images.add(section)
                    except RuntimeError as e:  # pyzipper: "Bad password for file ..."
                        raise ValueError(
                            f"Cannot decrypt {member.filename!r} of {path.name} with the password the her2st README "
                            f"publishes ({e}). Delete {str(path)!r} and call again, or unpack the data yourself and "
                            "pass `sthist.datasets.her2st(root=...)`."
                        ) from None
        sections = sorted(counts & spots & images)
        if not sections:
            raise ValueError(
                f"The her2st archives hold no section with counts, spot selection and image (counts: "
                f"{sorted(counts)[:5]}, spots: {sorted(spots)[:5]}, images: {sorted(images)[:5]}): the Zenodo record's "
                "layout changed. Unpack the data yourself and pass `sthist.datasets.her2st(root=...)`."
            )
        target = root / "data"
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return sections
