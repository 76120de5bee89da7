"""Read HEST-1k samples (``st/<id>.h5ad``, ``wsis/<id>.tif``, ``metadata/<id>.json``) into sthist's AnnData layout."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import _constants as C
from .._anndata import spot_pitch_px
from .._docs import inject_docs
from .._logging import info, warning

if TYPE_CHECKING:
    from anndata import AnnData

HEST_URL = "https://huggingface.co/datasets/MahmoodLab/hest"
#: The metadata keys read into ``obs`` (categorical columns, one value per sample).
OBS_FIELDS = ("patient", "organ", "species", "st_technology")
#: Pixel size keys of ``metadata/<id>.json``, in the order they are used.
PIXEL_SIZE_KEYS = ("pixel_size_um_estimated", "pixel_size_um_embedded")
#: Spot diameter (µm) when the metadata has no ``spot_diameter`` (the Visium capture spot, as HEST uses it).
DEFAULT_SPOT_DIAMETER_UM = 55.0
LIBRARY_ID_KEY = "library_id"  # obs column naming each spot's sample (squidpy's library_key convention)


def _layout(root: Path, sample: str) -> dict[str, Path]:
    return {
        "st": root / "st" / f"{sample}.h5ad",
        "wsi": root / "wsis" / f"{sample}.tif",
        "metadata": root / "metadata" / f"{sample}.json",
    }


def hest_root(root: Any) -> Path:
    """``root`` as a Path, raising with the fix unless it holds the HEST-1k folders."""
    if not isinstance(root, str | os.PathLike):
        raise TypeError(f"root must be the path of a HEST-1k folder, got {type(root).__name__}.")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"HEST root {str(root)!r} is not a folder. Download samples with `sthist.datasets.hest(ids, root=...)` "
            f"(or from {HEST_URL}) and pass the folder that holds st/, wsis/ and metadata/."
        )
    missing = [sub for sub in ("st", "wsis", "metadata") if not (root / sub).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{str(root)!r} lacks the sub-folder(s) {missing} of the HEST-1k layout (st/<id>.h5ad, wsis/<id>.tif, "
            f"metadata/<id>.json). Download samples with `sthist.datasets.hest(ids, root={str(root)!r})`."
        )
    return root


def available_ids(root: Path) -> list[str]:
    """Sample ids with a table in ``root/st``."""
    return sorted(p.name[: -len(".h5ad")] for p in (root / "st").glob("*.h5ad"))


def _check_ids(root: Path, ids: Any) -> list[str]:
    available = available_ids(root)
    if ids is None:
        if not available:
            raise FileNotFoundError(
                f"{str(root / 'st')!r} holds no sample table (<id>.h5ad). Download samples with "
                f"`sthist.datasets.hest(ids, root={str(root)!r})`."
            )
        return available
    wanted = [ids] if isinstance(ids, str) else [str(i) for i in ids]
    if not wanted:
        raise ValueError(f"ids is empty; pass None for every sample in {str(root)!r}, or some of {available}.")
    dups = sorted({i for i in wanted if wanted.count(i) > 1})
    if dups:
        raise ValueError(f"ids lists {dups} more than once; list every sample once.")
    missing = {i: [k for k, p in _layout(root, i).items() if not p.is_file()] for i in wanted}
    missing = {i: m for i, m in missing.items() if m}
    if missing:
        parts = ", ".join(
            f"{i!r} ({', '.join(str(_layout(root, i)[k].relative_to(root)) for k in m)})" for i, m in missing.items()
        )
        raise FileNotFoundError(
            f"HEST sample(s) incomplete in {str(root)!r}: {parts} missing. Samples with a table: {available}. "
            "Download them with `sthist.datasets.hest(ids, root=...)`."
        )
    return wanted


def _pixel_size(meta: dict, sample: str, path: Path, coords: np.ndarray | None) -> float:
    for key in PIXEL_SIZE_KEYS:
        value = meta.get(key)
        try:
            value = float(value)
        except (TypeError, ValueError):
            continue
        if np.isfinite(value) and value > 0:
            return value
    hint = ""
    pitch = spot_pitch_px(coords)
    dist = meta.get("inter_spot_dist")
    if pitch is not None and isinstance(dist, int | float) and dist > 0:
        hint = (
            f" Its spots are {pitch:.1f} px apart and inter_spot_dist is {dist} µm, which gives "
            f"{dist / pitch:.4f} µm/px."
        )
    raise ValueError(
        f"{str(path)!r} (sample {sample!r}) has no pixel size: none of {list(PIXEL_SIZE_KEYS)} is a positive number."
        f'{hint} Add it to the file, e.g. `"pixel_size_um_estimated": <µm per pixel of wsis/{sample}.tif>`, or '
        "download the metadata again. Nothing was read."
    )


def _uns_scalar_metadata(meta: dict) -> dict[str, Any]:
    """The JSON metadata fields that h5ad can store (numbers, strings, booleans)."""
    out = {}
    for k, v in meta.items():
        if isinstance(v, bool | int | float | str) and not (isinstance(v, float) and not np.isfinite(v)):
            out[str(k)] = v
    return out


def _hires_from_table(table: Any, max_side: int) -> tuple[np.ndarray, float] | None:
    """The downscaled image HEST stores in its table (``downscaled_fullres``), at most ``max_side`` px long."""
    spatial = table.uns.get(C.SPATIAL_KEY)
    if not isinstance(spatial, dict) or not spatial:
        return None
    entry = next(iter(spatial.values()))
    if not isinstance(entry, dict):
        return None
    images, sf = entry.get(C.IMAGES, {}) or {}, entry.get(C.SCALEFACTORS, {}) or {}
    for img_key, sf_key in (("downscaled_fullres", "tissue_downscaled_fullres_scalef"), (C.HIRES, C.HIRES_SCALEF)):
        if img_key in images and sf_key in sf:
            img, scalef = np.asarray(images[img_key]), float(sf[sf_key])
            if img.ndim == 3 and img.shape[-1] in (3, 4) and scalef > 0:
                from ._spatialdata import _resize

                img = img[..., :3]
                if img.dtype != np.uint8:
                    img = np.clip(img * (255.0 if img.max() <= 1.0 else 1.0), 0, 255).round().astype(np.uint8)
                factor = min(1.0, max_side / max(img.shape[:2]))
                size = (max(1, round(img.shape[1] * factor)), max(1, round(img.shape[0] * factor)))
                return _resize(img, size), scalef * factor
    return None


def _hires_from_wsi(src: Any, max_side: int) -> tuple[np.ndarray, float]:
    """A view of the slide at most ``max_side`` px long, from its coarsest pyramid level that is large enough."""
    from ._spatialdata import _resize

    H0, W0 = src.shape
    levels = src.levels()
    big = [lv for lv in levels if max(lv.shape) >= max_side] or levels[:1]
    level = min(big, key=lambda lv: max(lv.shape))
    view = level.read(0, level.shape[0])
    scale = min(1.0, max_side / max(H0, W0))
    size = (max(1, round(W0 * scale)), max(1, round(H0 * scale)))
    return _resize(np.ascontiguousarray(view), size), float(scale)


@inject_docs
def read_hest(
    root: str | os.PathLike[str],
    *,
    ids: str | Sequence[str] | None = None,
    hires_max_size: int = 2000,
    progress: bool = True,
) -> AnnData:
    """Read HEST-1k samples into one AnnData.

    HEST-1k (Jaume et al., "HEST-1k: A Dataset for Spatial Transcriptomics and Histology Image Analysis",
    NeurIPS 2024; https://huggingface.co/datasets/MahmoodLab/hest) pairs spatial transcriptomics of many
    technologies (Visium, Visium HD, Xenium, the original ST, ...) with whole-slide H&E images. Its layout::

        <root>/st/<id>.h5ad          expression; obsm['spatial'] = spot centres in pixels of the slide
        <root>/wsis/<id>.tif         the H&E slide, a pyramidal TIFF at full resolution
        <root>/metadata/<id>.json    pixel_size_um_estimated, spot_diameter, inter_spot_dist, st_technology,
                                     patient, organ, species, ...

    The pixel size comes from the metadata (``pixel_size_um_estimated``, else ``pixel_size_um_embedded``), never
    from the table's ``spot_diameter_fullres`` (HEST's is a 55 µm spot, not 10x's 65 µm circle). The slide is not
    decoded: its path is recorded, and :func:`sthist.pp.extract_patches` cuts patches of any physical size
    (``mpp=``) from it tile by tile. Download samples with :func:`sthist.datasets.hest`.

    Parameters
    ----------
    root
        The HEST folder, holding ``st/``, ``wsis/`` and ``metadata/``.
    ids
        Sample ids to read, e.g. ``["TENX96", "NCBI783"]``; ``None`` reads every sample with a table in ``st/``.
    hires_max_size
        Longest side, in pixels, of the downscaled image stored as ``'hires'`` (from the table's
        ``downscaled_fullres`` image, else from the slide's pyramid).
    {progress}

    Returns
    -------
    AnnData with the samples' counts in ``X`` (:class:`scipy.sparse.csr_matrix`, float32; the genes are the union
    of the samples' genes, 0 where a sample lacks a gene), obs_names ``'<id>_<barcode>'``, and

    ``obs``
        the tables' own columns (``in_tissue``, ``array_row``, ``array_col``, ...) and, categorical,
        ``'library_id'`` and ``'section'`` (the sample id), ``'patient'``, ``'organ'``, ``'species'`` and
        ``'st_technology'`` from the metadata (``'unknown'`` where absent).
    ``obsm['spatial']``
        spot centres in full-resolution pixels of ``wsis/<id>.tif`` (x = column, y = row), float64.
    ``uns['spatial'][id]``
        ``'images'``: ``'hires'`` (uint8); ``'scalefactors'``: ``'tissue_hires_scalef'``,
        ``'microns_per_pixel'`` (from the metadata) and ``'spot_diameter_fullres'`` (the metadata's
        ``spot_diameter`` in µm, 55 when absent, in pixels); ``'metadata'``: ``'source_image_path'`` (absolute path
        of the slide), ``'obs_kind'`` (``'spots'``) and ``'hest'`` (the JSON metadata's scalar fields).

    Spots whose centre lies outside the slide are dropped with a warning.

    Raises
    ------
    FileNotFoundError
        If ``root`` lacks the HEST folders or a sample lacks one of its three files.
    ValueError
        If a sample's metadata has no pixel size, its table has no spot coordinates, or none of its spots lies in
        the slide. Nothing is read then.

    Examples
    --------
    >>> adata = sthist.io.read_hest("hest_data", ids=["TENX96"])  # doctest: +SKIP
    >>> sthist.pp.extract_patches(adata, patch_size=224, mpp=0.5, library_key="library_id")  # doctest: +SKIP
    """
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp
    from anndata.utils import make_index_unique

    from .._validate import check_positive_int
    from ..pp._image import open_image

    hires_max_size = check_positive_int("hires_max_size", hires_max_size)
    root = hest_root(root)
    samples = _check_ids(root, ids)
    start = info(f"reading {len(samples)} HEST-1k sample(s) from {str(root)!r}")

    # every metadata file first: a missing pixel size raises before any table is read
    metas = {}
    for sample in samples:
        path = _layout(root, sample)["metadata"]
        try:
            metas[sample] = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{str(path)!r} is not valid JSON ({e}); download the metadata again.") from None
        if not isinstance(metas[sample], dict):
            raise ValueError(f"{str(path)!r} must hold a JSON object of metadata fields.")

    from .._engine._utils import progress_bar

    parts, spatial = [], {}
    for sample in progress_bar(samples, enabled=progress, desc="HEST", unit="sample"):
        files = _layout(root, sample)
        meta = metas[sample]
        table = ad.read_h5ad(files["st"])
        coords = _table_coords(table, files["st"])
        mpp = _pixel_size(meta, sample, files["metadata"], coords)
        with open_image(files["wsi"], what=f"the slide of HEST sample {sample!r}") as src:
            H, W = src.shape
            inside = (
                (coords[:, 0] >= -0.5) & (coords[:, 0] < W - 0.5) & (coords[:, 1] >= -0.5) & (coords[:, 1] < H - 0.5)
            )
            if not inside.any():
                raise ValueError(
                    f"None of the {len(coords)} spots of {str(files['st'])!r} lies in {str(files['wsi'])!r} ({W} x {H} "
                    f"px): their centres span x {coords[:, 0].min():.1f} .. {coords[:, 0].max():.1f}, y "
                    f"{coords[:, 1].min():.1f} .. {coords[:, 1].max():.1f}. The table and the slide do not belong "
                    "together; download the sample again. Nothing was read."
                )
            hires = _hires_from_table(table, hires_max_size)
            if hires is None:
                hires = _hires_from_wsi(src, hires_max_size)
        if not inside.all():
            warning(f"    {sample}: dropping {int((~inside).sum())} spots whose centre lies outside the slide")
            table, coords = table[inside].copy(), coords[inside]
        X = table.X
        X = (
            sp.csr_matrix(X, dtype=np.float32)
            if X is not None
            else sp.csr_matrix((table.n_obs, table.n_vars), dtype=np.float32)
        )
        obs = table.obs.copy()
        obs.index = pd.Index([f"{sample}_{b}" for b in table.obs_names])
        var = pd.DataFrame(index=pd.Index(make_index_unique(pd.Index(table.var_names.astype(str)))))
        part = ad.AnnData(X=X, obs=obs, var=var)
        part.obsm[C.SPATIAL_KEY] = coords
        for key, value in ((LIBRARY_ID_KEY, sample), (C.SECTION_KEY, sample)):
            part.obs[key] = value
        for field in OBS_FIELDS:
            value = meta.get(field)
            part.obs[field] = "unknown" if value is None or value == "" else str(value)
        diameter_um = meta.get("spot_diameter")
        diameter_um = (
            float(diameter_um) if isinstance(diameter_um, int | float) and diameter_um > 0 else DEFAULT_SPOT_DIAMETER_UM
        )
        spatial[sample] = {
            C.IMAGES: {C.HIRES: hires[0]},
            C.SCALEFACTORS: {C.HIRES_SCALEF: float(hires[1]), C.SPOT_DIAMETER: diameter_um / mpp, C.MPP: float(mpp)},
            C.METADATA: {
                C.SOURCE_IMAGE_PATH: str(files["wsi"].resolve()),
                C.OBS_KIND: "spots",
                "hest": _uns_scalar_metadata(meta),
            },
        }
        parts.append(part)
        info(f"    {sample}: {part.n_obs} spots x {part.n_vars} genes, slide {W} x {H} px at {mpp:.4f} µm/px")

    adata = ad.concat(parts, join="outer", fill_value=0, merge="first") if len(parts) > 1 else parts[0]
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    for key in (LIBRARY_ID_KEY, C.SECTION_KEY):
        adata.obs[key] = pd.Categorical(adata.obs[key].astype(str), categories=samples)
    for field in OBS_FIELDS:
        adata.obs[field] = pd.Categorical(adata.obs[field].astype(str))
    adata.uns[C.SPATIAL_KEY] = spatial
    info(f"    finished: {adata.n_obs} spots x {adata.n_vars} genes", time=start)
    return adata


def _table_coords(table: Any, path: Path) -> np.ndarray:
    if C.SPATIAL_KEY in table.obsm:
        coords = np.asarray(table.obsm[C.SPATIAL_KEY], dtype=np.float64)[:, :2]
    elif {"pxl_col_in_fullres", "pxl_row_in_fullres"} <= set(table.obs.columns):
        coords = table.obs[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)
    else:
        raise ValueError(
            f"{str(path)!r} has no spot coordinates: neither obsm['spatial'] nor obs['pxl_col_in_fullres'] / "
            "obs['pxl_row_in_fullres']. Download the sample again."
        )
    if coords.ndim != 2 or coords.shape[1] != 2 or len(coords) == 0:
        raise ValueError(
            f"{str(path)!r}: obsm['spatial'] must hold (n_spots, 2) pixel coordinates, got {coords.shape}."
        )
    if not np.isfinite(coords).all():
        raise ValueError(f"{str(path)!r} has NaN or infinite spot coordinates; drop those spots or download it again.")
    return coords
