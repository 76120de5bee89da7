"""Read a 10x Genomics Space Ranger output folder into the common sthist AnnData layout."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .. import _constants as C
from .._anndata import library_mpp
from .._logging import info

if TYPE_CHECKING:
    from anndata import AnnData

# the rule and its source (10x's definition of spot_diameter_fullres) live in sthist._anndata

_POSITIONS_FILES = ("tissue_positions.csv", "tissue_positions_list.csv")
_SCALEFACTORS_FILE = "scalefactors_json.json"
_IMAGE_FILES = {C.HIRES: "tissue_hires_image.png", C.LOWRES: "tissue_lowres_image.png"}


def read_visium(
    path: str | os.PathLike[str],
    *,
    counts_file: str = "filtered_feature_bc_matrix.h5",
    library_id: str | None = None,
    source_image_path: str | os.PathLike[str] | None = None,
    load_images: bool = True,
) -> AnnData:
    """Read a 10x Genomics Visium (Space Ranger) output folder.

    Wraps :func:`squidpy.read.visium` (or :func:`scanpy.read_visium` where squidpy is not installed) and brings the
    result into the layout every sthist function reads: in-tissue spots only, spot centres in full-resolution pixels,
    the physical pixel size, and the path of the full-resolution H&E image that
    :func:`sthist.pp.extract_patches` cuts patches from.

    Parameters
    ----------
    path
        Space Ranger ``outs`` folder: it holds the counts file and a ``spatial/`` folder with
        ``tissue_positions.csv`` (or the older ``tissue_positions_list.csv``), ``scalefactors_json.json``,
        ``tissue_hires_image.png`` and ``tissue_lowres_image.png``.
    counts_file
        Counts file inside ``path``, typically ``filtered_feature_bc_matrix.h5`` or ``raw_feature_bc_matrix.h5``
        (only in-tissue spots are kept either way).
    library_id
        Name of the library (section). ``None`` takes it from the ``library_ids`` attribute of the counts file, else
        from the folder name (the parent's name when the folder is called ``outs``).
    source_image_path
        The full-resolution image given to Space Ranger (e.g. a TIFF). Needed by
        :func:`sthist.pp.extract_patches` unless an image is passed to it directly.
    load_images
        Keep the downscaled ``hires`` and ``lowres`` images in ``uns``. With ``False`` the coordinates and scale
        factors are still read, and ``images`` is an empty dict.

    Returns
    -------
    AnnData with counts in ``X`` and

    - ``obsm['spatial']``: spot centres in full-resolution pixels, float (x = column, y = row);
    - ``obs['in_tissue']``, ``obs['array_row']``, ``obs['array_col']`` from the positions file, and
      ``obs['section']`` = ``library_id`` (categorical);
    - ``uns['spatial'][library_id]['images']``: ``'hires'`` and ``'lowres'`` (y, x, c) arrays;
    - ``uns['spatial'][library_id]['scalefactors']``: the content of ``scalefactors_json.json`` plus
      ``'microns_per_pixel'`` = 65 / ``spot_diameter_fullres`` (10x defines ``spot_diameter_fullres`` as the
      full-resolution pixel diameter of a 65 µm circle); a ``microns_per_pixel`` already in the file is kept;
    - ``uns['spatial'][library_id]['metadata']``: ``'source_image_path'`` (absolute) when given, plus the
      chemistry and software version from the counts file.

    Raises
    ------
    FileNotFoundError
        If the folder, the counts file, the ``spatial/`` folder or one of its files, or ``source_image_path`` does
        not exist.
    ValueError
        If no in-tissue spot of the counts file is listed in the positions file.
    """
    import pandas as pd

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"Visium folder {str(path)!r} does not exist or is not a folder. Pass the Space Ranger `outs` folder "
            "that holds the counts file and the `spatial/` folder."
        )
    counts_path = path / counts_file
    if not counts_path.exists():
        found = sorted(p.name for p in path.iterdir() if p.suffix == ".h5" or p.name.endswith("_bc_matrix"))
        raise FileNotFoundError(
            f"Counts file {str(counts_path)!r} does not exist. Pass `counts_file=` naming one of the counts files in "
            f"{str(path)!r}: {found or 'none found (expected e.g. filtered_feature_bc_matrix.h5)'}."
        )
    _check_spatial_folder(path)
    if source_image_path is not None:
        source_image_path = Path(source_image_path).absolute()
        if not source_image_path.exists():
            raise FileNotFoundError(
                f"source_image_path {str(source_image_path)!r} does not exist. Pass the full-resolution image that "
                "was given to Space Ranger (e.g. the H&E TIFF), or leave it out and pass `image=` to "
                "`sthist.pp.extract_patches` later."
            )
    if library_id is None:
        library_id = _library_id_from_counts(counts_path, folder=path)

    start = info(f"reading Visium folder {str(path)!r}")
    adata = _read_with_reader(path, counts_file=counts_file, library_id=library_id)

    # keep in-tissue spots; barcodes absent from the positions file (NaN) are dropped too
    if "in_tissue" in adata.obs:
        in_tissue = pd.to_numeric(adata.obs["in_tissue"], errors="coerce").to_numpy() == 1
        if not in_tissue.all():
            info(f"    kept {int(in_tissue.sum())} of {adata.n_obs} spots that are in tissue")
            adata = adata[in_tissue].copy()
    if adata.n_obs == 0:
        raise ValueError(
            f"No in-tissue spot of {str(counts_path)!r} is listed in the positions file. Check that the counts file "
            "and the `spatial/` folder come from the same Space Ranger run."
        )
    adata.var_names_make_unique()
    adata.obsm[C.SPATIAL_KEY] = np.asarray(adata.obsm[C.SPATIAL_KEY], dtype=np.float64)

    lib = adata.uns[C.SPATIAL_KEY][library_id]
    lib.setdefault(C.METADATA, {})
    scalefactors = lib[C.SCALEFACTORS]
    mpp, _ = library_mpp(lib)  # the one rule: a microns_per_pixel in the file is kept, else 65 / spot_diameter_fullres
    if mpp is not None:
        scalefactors[C.MPP] = mpp
    if source_image_path is not None:
        lib[C.METADATA][C.SOURCE_IMAGE_PATH] = str(source_image_path)
    if load_images:
        # squidpy reads the PNGs as uint8, scanpy as float in [0, 1]: give uint8 either way
        lib[C.IMAGES] = {key: _as_uint8(img) for key, img in lib.get(C.IMAGES, {}).items()}
    else:
        lib[C.IMAGES] = {}
    adata.obs[C.SECTION_KEY] = pd.Categorical([library_id] * adata.n_obs)
    info("    finished", time=start)
    return adata


def _check_spatial_folder(path: Path) -> None:
    spatial = path / "spatial"
    if not spatial.is_dir():
        raise FileNotFoundError(
            f"{str(path)!r} has no `spatial/` folder. Pass the Space Ranger `outs` folder of a Visium run; the "
            "`spatial/` folder holds the spot positions, scale factors and downscaled images."
        )
    if not any((spatial / name).exists() for name in _POSITIONS_FILES):
        raise FileNotFoundError(
            f"{str(spatial)!r} holds neither {_POSITIONS_FILES[0]!r} (Space Ranger >= 2) nor {_POSITIONS_FILES[1]!r} "
            "(Space Ranger 1): copy the positions file from the Space Ranger output."
        )
    # both readers load the two PNGs and the scale factors together with the positions
    for name in (_SCALEFACTORS_FILE, *_IMAGE_FILES.values()):
        if not (spatial / name).exists():
            raise FileNotFoundError(f"{str(spatial / name)!r} is missing: copy it from the Space Ranger output.")


def _library_id_from_counts(counts_path: Path, *, folder: Path) -> str:
    if counts_path.suffix == ".h5":
        import h5py

        with h5py.File(counts_path, "r") as f:
            ids = f.attrs.get("library_ids")
        if ids is not None and len(np.atleast_1d(ids)) > 0:
            lid = np.atleast_1d(ids)[0]
            return lid.decode("utf-8") if isinstance(lid, bytes) else str(lid)
    folder = folder.absolute()
    name = folder.parent.name if folder.name == "outs" and folder.parent.name else folder.name
    info(f"    no library id in the counts file; using the folder name {name!r} (pass `library_id=` to change it)")
    return name


def _as_uint8(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if np.issubdtype(image.dtype, np.floating) and image.size and float(np.nanmax(image)) <= 1.0:
        return np.clip(np.round(np.nan_to_num(image) * 255.0), 0, 255).astype(np.uint8)
    return image


def _read_with_reader(path: Path, *, counts_file: str, library_id: str) -> AnnData:
    # images are loaded in any case: both readers only read positions and scale factors together with them
    try:
        from squidpy.read import visium
    except ImportError:
        from scanpy import read_visium as _scanpy_read_visium

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecated in scanpy in favour of squidpy's reader
            return _scanpy_read_visium(path, count_file=counts_file, library_id=library_id, load_images=True)
    return visium(path, counts_file=counts_file, library_id=library_id, load_images=True)
