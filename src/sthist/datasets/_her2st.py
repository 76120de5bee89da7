"""Reader for the HER2-positive breast cancer spatial transcriptomics data of Andersson et al. (2021)."""

from __future__ import annotations

import gzip
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .. import _constants as C
from .._docs import inject_docs
from .._logging import info
from .._validate import check_positive_int

if TYPE_CHECKING:
    from anndata import AnnData

REPO_URL = "https://github.com/almaan/her2st"
PITCH_UM = 200.0  # centre-to-centre distance of neighbouring spots on the original ST array
SPOT_DIAMETER_UM = 100.0
PANEL_FILE = "genes_785.txt"
PANEL_KEY = "genes_785"
#: Environment variable naming a local copy that ``her2st()`` reads when ``root`` is None (instead of downloading).
ROOT_ENV = "STHIST_HER2ST"
_IMAGE_SUFFIXES = (".jpg", ".jpeg")
_SPOT_COLUMNS = ("x", "y", "pixel_x", "pixel_y")


@inject_docs
def her2st(
    root: str | Path | None = None,
    *,
    sections: Sequence[str] | None = None,
    hires_max_size: int = 2000,
    progress: bool = True,
) -> AnnData:
    """Read sections of the HER2+ breast cancer spatial transcriptomics data set.

    The data of Andersson et al., "Spatial deconvolution of HER2-positive breast cancer delineates
    tumor-associated cell type interactions", Nature Communications 12, 6012 (2021): 36 sections of
    8 patients (A-H) on the original ST platform (100 µm spots on a 200 µm pitch).

    With no ``root``, the folder named by the environment variable ``STHIST_HER2ST`` is read when that variable is
    set (see ``root`` below). Otherwise the public data are downloaded once from Zenodo
    (https://doi.org/10.5281/zenodo.4751624, about 650 MB; each archive checked against the checksum Zenodo
    publishes) with :mod:`pooch` into
    ``$STHIST_DATA_DIR/her2st`` (default ``~/.cache/sthist/her2st``), unpacked into the layout below, and read from
    there; later calls read the cache without a connection. This needs the optional packages ``pooch`` and
    ``pyzipper`` (the archives are AES-encrypted with passwords their authors publish): ``pip install
    'sthist[download]'``. The 785-gene panel ships with sthist and is written next to the data.

    With ``root``, reads the layout of the data repository https://github.com/almaan/her2st (a full clone, after
    unpacking its data as its README describes, or a subset with the same layout)::

        <root>/data/ST-cnts/<section>.tsv.gz              spots x genes raw counts, row index "<x>x<y>"
        <root>/data/ST-spotfiles/<section>_selection.tsv  x, y, new_x, new_y, pixel_x, pixel_y, ...
        <root>/data/ST-imgs/<patient>/<section>/*.jpg     full-resolution H&E image

    (uncompressed ``<section>.tsv`` count files are read as well; ``root`` may also be the ``data`` folder
    itself). Count rows are joined with the spot file on ``"<x>x<y>"``; spots present in only one of the two
    are dropped. The images are not decoded at full resolution: a downscaled copy is stored, and the path of
    the full-resolution image is recorded so that :func:`sthist.pp.extract_patches` can read patches from it.

    Parameters
    ----------
    root
        Folder of the repository (holding ``data/``), or its ``data`` folder. ``None`` reads the folder named by the
        environment variable ``STHIST_HER2ST`` (same layout) when it is set and not empty; that folder must exist
        and hold ``data/ST-cnts`` (or ``ST-cnts``), else a :class:`FileNotFoundError` names the variable (nothing is
        downloaded then). With ``root=None`` and the variable unset, the data are downloaded into the cache (or read
        from there). An explicit ``root`` wins over the variable. The folder read is logged.
    sections
        Sections to read, e.g. ``["B4", "C2"]``. ``None`` reads every section that has a count file.
    hires_max_size
        Longest side, in pixels, of the downscaled image stored as ``'hires'``.
    {progress}

    Returns
    -------
    AnnData with raw counts in ``X`` (:class:`scipy.sparse.csr_matrix`, float32). The genes are the union of
    the genes of all sections read; a gene absent from the count table of a section has count 0 in that
    section's spots. Duplicated gene names within a table are made unique (``'GENE'``, ``'GENE-1'``).

    ``obs``
        ``'section'`` and ``'patient'`` (categorical; the patient is the letter of the section name),
        ``'array_col'`` (= x) and ``'array_row'`` (= y) array coordinates. obs_names are
        ``'<section>_<x>x<y>'``.
    ``obsm['spatial']``
        Spot centres in full-resolution pixels: ``pixel_x`` (column), ``pixel_y`` (row).
    ``var['genes_785']``
        Only when ``<root>/genes_785.txt`` exists: whether the gene is in that 785-gene panel (the panel of
        HisToGene, Hist2ST, THItoGene and mclSTExp on this data set); pass ``genes='genes_785'`` to sthist.
    ``uns['spatial'][section]``
        ``'images'``: ``'hires'`` (uint8 (h, w, 3), longest side at most ``hires_max_size``);
        ``'scalefactors'``: ``'tissue_hires_scalef'``, ``'microns_per_pixel'`` (estimated by least squares
        from pixel against array positions on the 200 µm pitch of the ST array, about 0.688) and
        ``'spot_diameter_fullres'`` (100 µm in pixels, about 145); ``'metadata'``:
        ``'source_image_path'`` (absolute path of the full-resolution JPEG).

    Examples
    --------
    >>> import sthist
    >>> adata = sthist.datasets.her2st(sections=["B4", "C2"])  # doctest: +SKIP
    >>> adata = sthist.datasets.her2st("her2st", sections=["B4", "C2"])  # a clone  # doctest: +SKIP

    Raises
    ------
    FileNotFoundError
        If ``root``, or with no ``root`` the folder named by ``STHIST_HER2ST``, lacks the layout above.
    ConnectionError
        With no ``root`` and no ``STHIST_HER2ST``, if the data are not cached yet and Zenodo cannot be reached.
    ImportError
        With no ``root`` and no ``STHIST_HER2ST``, if ``pooch`` or ``pyzipper`` is missing
        (``pip install 'sthist[download]'``).
    """
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp
    from anndata.utils import make_index_unique

    hires_max_size = check_positive_int("hires_max_size", hires_max_size)
    if root is None:
        root = _root_from_env()
    if root is None:
        from ._her2st_fetch import fetch_her2st

        root = fetch_her2st(progress=progress)
    data_dir = _data_dir(root)
    files = _section_files(data_dir, sections)

    start = info(f"reading {len(files)} her2st section(s) from {data_dir}")
    from .._engine._utils import progress_bar

    it = progress_bar(files.items(), enabled=progress, desc="her2st", unit="section")

    genes: dict[str, int] = {}  # union of gene names, in order of first appearance
    blocks, obs_frames, coords, spatial = [], [], [], {}
    for section, paths in it:
        index, gene_names, counts = _read_counts(paths["counts"])
        gene_names = list(make_index_unique(pd.Index(gene_names)))
        spots = _read_spots(paths["spots"])
        key = pd.Index(spots["x"].astype(str) + "x" + spots["y"].astype(str))
        if key.has_duplicates:
            dup = key[key.duplicated()].unique()[:5].tolist()
            raise ValueError(f"{paths['spots']} lists the spots {dup} more than once; remove the duplicated rows.")
        pos = key.get_indexer(pd.Index(index))
        keep = np.flatnonzero(pos >= 0)
        if keep.size == 0:
            raise ValueError(
                f"No spot of {paths['counts'].name} ('<x>x<y>', e.g. {index[:3]}) is in {paths['spots'].name} "
                f"(e.g. {key[:3].tolist()}): the count table and the spot file of section {section!r} do not match."
            )
        sel = spots.iloc[pos[keep]]
        cols = np.array([genes.setdefault(g, len(genes)) for g in gene_names], dtype=np.int64)
        block = sp.coo_matrix(counts[keep])
        blocks.append((block.row, cols[block.col], block.data.astype(np.float32), keep.size))
        obs_frames.append(
            pd.DataFrame(
                {
                    C.SECTION_KEY: section,
                    C.PATIENT_KEY: paths["patient"],
                    C.ARRAY_COL: sel["x"].to_numpy(np.int64),
                    C.ARRAY_ROW: sel["y"].to_numpy(np.int64),
                },
                index=[f"{section}_{x}x{y}" for x, y in zip(sel["x"], sel["y"], strict=True)],
            )
        )
        coords.append(sel[["pixel_x", "pixel_y"]].to_numpy(np.float64))
        mpp = _microns_per_pixel(spots, paths["spots"])
        hires, scalef, size = _read_hires(paths["image"], hires_max_size)
        spatial[section] = {
            C.IMAGES: {C.HIRES: hires},
            C.SCALEFACTORS: {
                C.HIRES_SCALEF: scalef,
                C.SPOT_DIAMETER: SPOT_DIAMETER_UM / mpp,
                C.MPP: mpp,
            },
            C.METADATA: {C.SOURCE_IMAGE_PATH: os.path.abspath(paths["image"])},
        }
        info(
            f"    {section}: {keep.size} spots ({len(index) - keep.size} count rows without a spot-file row, "
            f"{len(spots) - keep.size} spot-file rows without counts), {len(gene_names)} genes, "
            f"image {size[0]} x {size[1]} px, {mpp:.4f} µm/px"
        )

    n_genes = len(genes)
    mats = []
    for rows, cols, vals, n in blocks:
        mats.append(sp.csr_matrix((vals, (rows, cols)), shape=(n, n_genes), dtype=np.float32))
    X = sp.vstack(mats, format="csr")
    X.sort_indices()
    obs = pd.concat(obs_frames)
    obs[C.SECTION_KEY] = pd.Categorical(obs[C.SECTION_KEY], categories=list(files))
    obs[C.PATIENT_KEY] = pd.Categorical(obs[C.PATIENT_KEY], categories=sorted({p["patient"] for p in files.values()}))
    var = pd.DataFrame(index=pd.Index(list(genes)))
    panel = data_dir.parent / PANEL_FILE if data_dir.name == "data" else data_dir / PANEL_FILE
    if panel.is_file():
        names = {line.strip() for line in panel.read_text().splitlines() if line.strip()}
        var[PANEL_KEY] = var.index.isin(list(names))
    adata = ad.AnnData(X=X, obs=obs, var=var)
    adata.obsm[C.SPATIAL_KEY] = np.concatenate(coords, axis=0)
    adata.uns[C.SPATIAL_KEY] = spatial
    info(f"    finished: {adata.n_obs} spots x {adata.n_vars} genes", time=start)
    return adata


# ---------------------------------------------------------------------------------------------------------
def _root_from_env() -> Path | None:
    """The folder named by ``$STHIST_HER2ST`` (None when unset or empty); raises if it is not a her2st copy."""
    value = os.environ.get(ROOT_ENV)
    if not value:
        return None
    path = Path(value).expanduser()
    fix = (
        f"Point {ROOT_ENV} at a copy of {REPO_URL} holding data/ST-cnts, data/ST-spotfiles and data/ST-imgs, "
        f"pass `root=` explicitly, or unset {ROOT_ENV} to download the public data into the cache."
    )
    data = path / "data" if (path / "data").is_dir() else path
    if not path.is_dir() or not (data / "ST-cnts").is_dir():
        what = "is not a folder" if not path.is_dir() else "holds no data/ST-cnts folder"
        raise FileNotFoundError(
            f"sthist.datasets.her2st(root=None) reads the environment variable {ROOT_ENV}, which is set to "
            f"{value!r}, but {str(path)!r} {what}. {fix}"
        )
    try:
        _data_dir(path)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"The environment variable {ROOT_ENV}={value!r} names no complete her2st copy: {err} {fix}"
        ) from None
    info(f"root=None: reading the her2st copy named by ${ROOT_ENV}: {path}")
    return path


def _data_dir(root: str | Path) -> Path:
    """Return the folder holding ST-cnts, ST-spotfiles and ST-imgs (``root/data`` or ``root`` itself)."""
    if not isinstance(root, str | os.PathLike):
        raise TypeError(f"root must be a path to a copy of {REPO_URL}, got {type(root).__name__}.")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"her2st root {str(root)!r} is not a folder. Clone {REPO_URL} (and unpack its data as its README "
            "describes) and pass the folder of the clone."
        )
    data_dir = root / "data" if (root / "data").is_dir() else root
    missing = [sub for sub in ("ST-cnts", "ST-spotfiles", "ST-imgs") if not (data_dir / sub).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{str(data_dir)!r} lacks the sub-folder(s) {missing} of the her2st layout "
            "(data/ST-cnts, data/ST-spotfiles, data/ST-imgs). Pass the folder of a clone of "
            f"{REPO_URL} whose data are unpacked."
        )
    return data_dir


def _count_files(data_dir: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted((data_dir / "ST-cnts").iterdir()):
        name = path.name
        for suffix in (".tsv.gz", ".tsv"):
            if name.endswith(suffix) and path.is_file():
                found.setdefault(name[: -len(suffix)], path)  # .tsv.gz sorts before .tsv: preferred
    return dict(sorted(found.items()))


def _section_files(data_dir: Path, sections: Sequence[str] | None) -> dict[str, dict]:
    """Count file, spot file, image and patient of each requested section; raises before reading anything."""
    counts = _count_files(data_dir)
    available = list(counts)
    if not available:
        raise FileNotFoundError(
            f"{str(data_dir / 'ST-cnts')!r} holds no count file (<section>.tsv.gz). Unpack the counts of "
            f"{REPO_URL} there."
        )
    if sections is None:
        wanted = available
    else:
        if isinstance(sections, str):
            sections = [sections]
        wanted = [str(s) for s in sections]
        if not wanted:
            raise ValueError(f"sections is empty; pass None for all, or some of {available}.")
        dups = sorted({s for s in wanted if wanted.count(s) > 1})
        if dups:
            raise ValueError(f"sections lists {dups} more than once; list every section once.")
        unknown = [s for s in wanted if s not in counts]
        if unknown:
            raise ValueError(
                f"Unknown her2st section(s) {unknown}: no count file in {str(data_dir / 'ST-cnts')!r}. "
                f"Available sections: {available}."
            )
    out, no_spots, no_image, several = {}, [], [], {}
    for s in wanted:
        patient = re.match(r"[A-Za-z]+", s)
        patient = patient.group(0) if patient else s
        spots = data_dir / "ST-spotfiles" / f"{s}_selection.tsv"
        img_dir = data_dir / "ST-imgs" / patient / s
        images = (
            sorted(p for p in img_dir.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)
            if img_dir.is_dir()
            else []
        )
        if not spots.is_file():
            no_spots.append(s)
        if not images:
            no_image.append(s)
        elif len(images) > 1:
            several[s] = [p.name for p in images]
        else:
            out[s] = {"counts": counts[s], "spots": spots, "image": images[0], "patient": patient}
    if no_spots:
        raise FileNotFoundError(
            f"Section(s) {no_spots} have no spot file ST-spotfiles/<section>_selection.tsv in {str(data_dir)!r}. "
            f"Sections with a spot file: {_with_spot_files(data_dir, available)}."
        )
    if no_image:
        raise FileNotFoundError(
            f"Section(s) {no_image} have no H&E image (ST-imgs/<patient>/<section>/*.jpg) in {str(data_dir)!r}. "
            f"Sections with an image: {_with_images(data_dir, available)}; pass some of them as `sections=`."
        )
    if several:
        raise ValueError(
            f"Several images in the folder of section(s) {several}; keep only the full-resolution H&E JPEG in "
            "ST-imgs/<patient>/<section>/."
        )
    return out


def _with_spot_files(data_dir: Path, available: list[str]) -> list[str]:
    return [s for s in available if (data_dir / "ST-spotfiles" / f"{s}_selection.tsv").is_file()]


def _with_images(data_dir: Path, available: list[str]) -> list[str]:
    out = []
    for s in available:
        m = re.match(r"[A-Za-z]+", s)
        d = data_dir / "ST-imgs" / (m.group(0) if m else s) / s
        if d.is_dir() and any(p.suffix.lower() in _IMAGE_SUFFIXES for p in d.iterdir()):
            out.append(s)
    return out


def _read_counts(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """Spot ids, gene names and the (spots, genes) count array of one ST-cnts table."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt") as fh:
        text = fh.read()
    head, _, body = text.partition("\n")
    header = head.rstrip("\r").split("\t")
    rows = [line for line in body.splitlines() if line.strip()]
    if len(header) < 2 or not rows:
        raise ValueError(f"{path} is not a spots x genes count table (tab-separated, genes in the header).")
    index = [line.split("\t", 1)[0] for line in rows]
    genes = header[1:]
    usecols = range(1, len(header))
    try:  # integer parsing is several times faster than float parsing
        counts = np.loadtxt(rows, delimiter="\t", usecols=usecols, dtype=np.int32, comments=None, ndmin=2)
    except ValueError:
        try:
            counts = np.loadtxt(rows, delimiter="\t", usecols=usecols, dtype=np.float32, comments=None, ndmin=2)
        except ValueError as err:
            raise ValueError(f"Could not parse the counts of {path}: {err}") from err
    return index, genes, counts


def _read_spots(path: Path):
    import pandas as pd

    spots = pd.read_csv(path, sep="\t")
    missing = [c for c in _SPOT_COLUMNS if c not in spots.columns]
    if missing:
        raise ValueError(f"{path} lacks the column(s) {missing}; a her2st spot file has {list(_SPOT_COLUMNS)}.")
    spots = spots.dropna(subset=list(_SPOT_COLUMNS)).reset_index(drop=True)
    spots["x"] = np.rint(spots["x"].to_numpy(float)).astype(np.int64)
    spots["y"] = np.rint(spots["y"].to_numpy(float)).astype(np.int64)
    return spots


def _microns_per_pixel(spots, path: Path) -> float:
    """Least-squares affine fit of pixel against array position; the array pitch is 200 µm."""
    cols = ["new_x", "new_y"] if {"new_x", "new_y"} <= set(spots.columns) else ["x", "y"]
    arr = spots[cols].to_numpy(np.float64)
    pix = spots[["pixel_x", "pixel_y"]].to_numpy(np.float64)
    design = np.column_stack([arr, np.ones(len(arr))])
    if len(arr) < 3 or np.linalg.matrix_rank(design) < 3:
        raise ValueError(f"{path} has too few spots off one line to estimate the pixel size; it needs at least 3.")
    coef, *_ = np.linalg.lstsq(design, pix, rcond=None)
    px_per_pitch = float(np.sqrt(abs(np.linalg.det(coef[:2]))))
    if not np.isfinite(px_per_pitch) or px_per_pitch <= 0:
        raise ValueError(f"Could not estimate the pixel size from {path}: pixel and array positions do not fit.")
    return PITCH_UM / px_per_pitch


def _read_hires(path: Path, max_size: int) -> tuple[np.ndarray, float, tuple[int, int]]:
    """Downscaled uint8 RGB copy of a JPEG (DCT scaling while decoding), its scale factor and the full size."""
    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # the H&E images are ~90 megapixels; restored below
    try:
        with Image.open(path) as im:
            full = im.size  # (width, height)
            scale = min(1.0, max_size / max(full))
            target = (max(1, round(full[0] * scale)), max(1, round(full[1] * scale)))
            if scale < 1.0:
                im.draft("RGB", target)  # decode at 1/2, 1/4 or 1/8 size, no smaller than target
            im = im.convert("RGB")
            if im.size != target:
                im = im.resize(target, Image.Resampling.LANCZOS)
            hires = np.asarray(im, dtype=np.uint8).copy()
    finally:
        Image.MAX_IMAGE_PIXELS = old
    return hires, scale, full
