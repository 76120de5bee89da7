"""H&E patches centred on every spot: :func:`extract_patches`."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import _constants as C
from .._anndata import MPP_FROM_SPOT_DIAMETER, mpp_unknown_message, resolve_mpp
from .._dask import check_client, resolve_client, run_tasks
from .._docs import inject_docs
from .._logging import info
from .._validate import check_adata, check_positive_int, check_spatial, resolve_library
from . import _store
from ._image import ImageSource, open_image

if TYPE_CHECKING:
    from anndata import AnnData

_FN = "sthist.pp.extract_patches"
_NO_LIBRARY = "image"  # the record's library label when adata.uns['spatial'] has none and image= is given


def _three_ways(lib: str) -> str:
    return (
        "Give the full-resolution image one of three ways: (1) `extract_patches(adata, image=...)` with a path "
        "(JPEG, PNG, TIFF/OME-TIFF, .svs/.ndpi/... or a SpatialData .zarr store), an array (H, W, 3) uint8, a "
        "spatialdata image or a SpatialData object with `image_key=`; (2) an in-memory array in "
        f"`adata.uns['spatial'][{lib!r}]['images']['fullres']`; (3) a file path in "
        f"`adata.uns['spatial'][{lib!r}]['metadata']['source_image_path']` (for a SpatialData .zarr store, "
        "also `['metadata']['source_image_key']` naming the image element)."
    )


def _resolve_libraries(
    adata: AnnData, library_key: str | None, library_id: str | None, image: Any
) -> tuple[list[str], np.ndarray]:
    """Return the libraries in use and, for every spot, the index of its library in that list."""
    spatial = adata.uns.get(C.SPATIAL_KEY, {})
    if not isinstance(spatial, Mapping):
        raise TypeError(
            f"adata.uns['spatial'] must be a dict {{library_id: {{'images': ..., 'scalefactors': ...}}}}, "
            f"got {type(spatial).__name__}."
        )
    uns_libs = list(spatial.keys())
    if library_key is not None:
        if library_id is not None:
            raise ValueError(
                "Pass either `library_key=` (an obs column naming each spot's library) or `library_id=` "
                "(one library for all spots), not both."
            )
        if library_key not in adata.obs:
            raise KeyError(
                f"library_key={library_key!r} is not a column of adata.obs; available columns: {list(adata.obs)}."
            )
        col = adata.obs[library_key]
        if col.isna().any():
            bad = adata.obs_names[col.isna().to_numpy()][:5].tolist()
            raise ValueError(
                f"adata.obs[{library_key!r}] has missing values (e.g. spots {bad}); every spot needs a library."
            )
        labels = col.astype(str).to_numpy()
        libs, codes = np.unique(labels, return_inverse=True)
        libs = [str(lib) for lib in libs]
        if isinstance(image, dict):
            missing = [lib for lib in libs if lib not in image]
            if missing:
                raise KeyError(
                    f"image= has no entry for libraries {missing} of adata.obs[{library_key!r}]; it has {list(image)}."
                )
        elif image is not None:
            if len(libs) > 1:
                raise ValueError(
                    f"image= gives one image but adata.obs[{library_key!r}] holds {len(libs)} libraries {libs}: "
                    "pass a dict `image={library_id: image}`, or leave image=None to use adata.uns['spatial']."
                )
        else:
            missing = [lib for lib in libs if lib not in spatial]
            if missing:
                raise KeyError(
                    f"libraries {missing} of adata.obs[{library_key!r}] are not in adata.uns['spatial'], "
                    f"which holds {uns_libs}. The obs column must hold the library ids used in uns['spatial']."
                )
        return libs, codes.astype(np.intp)
    if isinstance(image, dict):
        keys = [str(k) for k in image]
        if library_id is not None:
            if library_id not in image:
                raise KeyError(f"library_id={library_id!r} is not a key of image=; it has {keys}.")
            lib = library_id
        elif len(keys) == 1:
            lib = keys[0]
        else:
            raise ValueError(
                f"image= is a dict of {len(keys)} images {keys}: pass `library_key=` naming the obs column that "
                "says which library each spot belongs to, or `library_id=` for one."
            )
    elif image is not None and not uns_libs:
        lib = _NO_LIBRARY if library_id is None else library_id
    elif image is not None and library_id is not None:
        lib = library_id
    else:
        lib = resolve_library(adata, library_id=library_id)
    return [lib], np.zeros(adata.n_obs, dtype=np.intp)


def _open_library(adata: AnnData, lib: str, image: Any, image_key: str | None, pad_value: int) -> ImageSource:
    """Open the image of one library: explicit ``image=``, else uns fullres, else uns source_image_path."""
    if isinstance(image, dict):
        image = image[lib]
    if image is not None:
        return open_image(image, image_key=image_key, pad_value=pad_value, what=f"image= (library {lib!r})")
    entry = adata.uns.get(C.SPATIAL_KEY, {}).get(lib, {})
    images = entry.get(C.IMAGES, {}) or {}
    if images.get(C.FULLRES) is not None:
        where = f"adata.uns['spatial'][{lib!r}]['images']['fullres']"
        return open_image(images[C.FULLRES], pad_value=pad_value, what=where, description=f"in-memory array in {where}")
    meta = entry.get(C.METADATA, {}) or {}
    path = meta.get(C.SOURCE_IMAGE_PATH)
    if path is not None and str(path) != "":
        where = f"adata.uns['spatial'][{lib!r}]['metadata']['source_image_path']"
        key = meta.get(C.SOURCE_IMAGE_KEY) or image_key
        try:
            return open_image(str(path), image_key=key, pad_value=pad_value, what=where)
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"{e} Fix the path (`{where} = '/path/to/image'`, relative paths are read from the working "
                f"directory) or pass the image with `image=`."
            ) from None
    found = sorted(images) if images else []
    extra = f" Only downscaled images {found} were found; patches need the full-resolution image." if found else ""
    raise KeyError(f"No full-resolution image for library {lib!r}.{extra} {_three_ways(lib)}")


def _outside_message(
    adata: AnnData, lib: str, idx: np.ndarray, coords: np.ndarray, shape: tuple[int, int], spatial_key: str
) -> str:
    H, W = shape
    cx, cy = np.floor(coords[idx, 0] + 0.5), np.floor(coords[idx, 1] + 0.5)
    bad = (cx < 0) | (cx >= W) | (cy < 0) | (cy >= H)
    bad_idx = idx[bad][:3]
    examples = ", ".join(f"{adata.obs_names[i]!r} at (x={coords[i, 0]:.1f}, y={coords[i, 1]:.1f})" for i in bad_idx)
    msg = (
        f"{int(bad.sum())} of {len(idx)} spot centres of library {lib!r} lie outside its image "
        f"(width {W} x height {H} px), e.g. {examples}. adata.obsm[{spatial_key!r}] must hold full-resolution "
        "pixel coordinates (x = column, y = row)."
    )
    swapped = (
        (coords[idx, 1] >= -0.5) & (coords[idx, 1] < W - 0.5) & (coords[idx, 0] >= -0.5) & (coords[idx, 0] < H - 0.5)
    )
    if swapped.all():
        msg += f" x and y look swapped: try `adata.obsm[{spatial_key!r}] = adata.obsm[{spatial_key!r}][:, ::-1]`."
    else:
        msg += (
            " If they are at hires or lowres scale, divide them by "
            f"adata.uns['spatial'][{lib!r}]['scalefactors']['tissue_hires_scalef'] (or ..._lowres_scalef); "
            "otherwise check that the image belongs to these spots."
        )
    return msg


@inject_docs
def extract_patches(
    adata: AnnData,
    *,
    patch_size: int = 224,
    mpp: float | None = None,
    library_key: str | None = None,
    library_id: str | None = None,
    image: Any = None,
    image_key: str | None = None,
    spatial_key: str = C.SPATIAL_KEY,
    pad_value: int = 255,
    key_added: str = C.PATCHES_KEY,
    store: str | os.PathLike | None = None,
    overwrite: bool = False,
    resume: bool = False,
    client: Any = None,
    n_jobs: int = 1,
    progress: bool = True,
    copy: bool = False,
) -> AnnData | None:
    """Crop an RGB patch centred on every spot from the full-resolution H&E image.

    Geometry: the spot centre ``(x, y)`` of ``obsm[spatial_key]`` (full-resolution pixels, x = column, y = row,
    pixel ``i`` covering ``[i - 0.5, i + 0.5)``) is rounded half up to the pixel ``(floor(x + 0.5),
    floor(y + 0.5))``, and that pixel is ``patch[S // 2, S // 2]`` for a patch of size ``S``: for odd ``S`` the
    exact centre, for even ``S`` the lower-right of the four central pixels. The patch covers columns
    ``floor(x + 0.5) - S // 2`` to ``floor(x + 0.5) - S // 2 + S - 1`` (rows alike). Parts outside the image
    are filled with ``pad_value`` and the spot is flagged in ``obs``.

    With ``mpp``, a square of ``R = round(S * mpp / source_mpp)`` source pixels is read around the centre (same
    convention, pixel ``S // 2`` of the output on the centre) and resized to ``S`` x ``S`` with PIL (area
    averaging when shrinking, bilinear when enlarging). ``mpp=0.5, patch_size=224`` gives HEST's 112 µm patches.

    The image of each library is taken from, in this order: ``image=``; the in-memory array
    ``uns['spatial'][library]['images']['fullres']``; the file ``uns['spatial'][library]['metadata']
    ['source_image_path']`` (a SpatialData ``.zarr`` store needs ``['metadata']['source_image_key']``).
    JPEG and PNG are decoded once per library; tiled / pyramidal TIFF and OME-TIFF are read tile by tile at
    level 0 (spots are visited in tile order), whole-slide formats through openslide, so large slides are never
    decoded whole. Nothing is written into ``adata`` unless every spot was extracted.

    Cohorts that do not fit in memory: with ``store="patches.zarr"`` the patches are written to a chunked,
    compressed zarr store (one uint8 array per library, chunks of 512 spots, Blosc-zstd) a few chunks at a time, and
    ``obsm[key_added]`` becomes a dask array over it (lazy; every sthist step reads it chunk by chunk). Memory stays
    at about 256 MB of patches plus the image reader's tile cache (128 MB) per process, whatever the number of spots.
    Keep the spots of a library contiguous in ``obs`` (e.g. concatenate sections): then the dask array is a plain
    concatenation of the library arrays; otherwise it is re-indexed into ``obs`` order, which reads more chunks.

    Cohorts on a cluster: with ``client=`` (or ``n_jobs``) every library is one task that opens its image by path on
    a worker, writes its own array of the store (or returns its patches when there is no store) and returns its
    border flags; a task whose worker dies is run again elsewhere. A store records, atomically and per library, which
    libraries are finished, and the parameters it was started with: after a crash, the same call with
    ``resume=True`` extracts only the libraries that were not finished, and the store ends up byte for byte the
    same as that of an uninterrupted run. Results are identical with and without a cluster.

    Parameters
    ----------
    {adata}
    patch_size
        Side ``S`` of the square patches in output pixels.
    mpp
        Microns per pixel of the patches. ``None`` crops at the image's own resolution. Otherwise the image's
        microns per pixel must be known, from the first of: ``uns['spatial'][library]['scalefactors']
        ['microns_per_pixel']``; ``65 / spot_diameter_fullres`` (10x's definition of ``spot_diameter_fullres``,
        the diameter in pixels of a 65 µm circle, which every Visium AnnData of scanpy, squidpy or spatialdata-io
        carries; logged, and not used for bins or cells); the file's metadata (OME-TIFF ``PhysicalSizeX``,
        openslide ``mpp-x``).
    {library_key}
    {library_id}
    image
        The full-resolution image, overriding ``uns['spatial']``: a path (JPEG, PNG, TIFF/OME-TIFF, .svs, .ndpi,
        .mrxs, .scn, ... or a SpatialData ``.zarr`` store), a numpy or dask array (H, W, 3) uint8, a spatialdata
        image (``xarray.DataArray`` or multiscale ``DataTree``, dims (c, y, x); full resolution is used), a
        ``spatialdata.SpatialData`` object (with ``image_key``), or a dict ``{library_id: image}`` together with
        ``library_key``. The coordinates in ``obsm[spatial_key]`` must be pixel coordinates of this image.
    image_key
        Name of the image element when ``image`` is a SpatialData object or store.
    spatial_key
        Key of the spot centres in ``adata.obsm``.
    pad_value
        Grey value (0-255) of the pixels of patches that reach beyond the image.
    key_added
        Name of the outputs (see Returns).
    store
        A path ending in ``.zarr`` (created) to write the patches to instead of memory; ``None`` keeps them in
        memory. Layout: one uint8 array per library, a completion marker per finished library (see the docs page
        "Cohorts that do not fit in memory"). If the extraction fails or is killed, the store is **kept**, holding
        the libraries finished so far, so that ``resume=True`` can finish it; :func:`sthist.pp.read_store` refuses
        it until then, and a call without ``resume`` or ``overwrite`` says how to go on.
    overwrite
        Replace an existing zarr store at ``store`` (otherwise an existing path raises).
    resume
        Finish the store an interrupted run left at ``store``: check that this call's parameters are those the store
        was started with (patch size, mpp and resampling, pad value, the libraries, their numbers of spots and
        coordinates, the images), raising a ``ValueError`` that names every difference, then extract only the
        libraries without a completion marker. A complete store is opened as it is; a missing one is created, so the
        same call can be run again after a killed job. Not together with ``overwrite``.
    client
        A :class:`dask.distributed.Client` to extract on (e.g. of a ``dask_jobqueue.SLURMCluster``): one task per
        library, each opening its image by path on a worker. The image paths (``image=`` paths or
        ``uns['spatial'][library]['metadata']['source_image_path']``) and ``store`` must be readable (and the store
        writable) on every worker, e.g. on a shared file system. Libraries whose image is held in memory (arrays,
        ``uns[...]['images']['fullres']``, spatialdata objects) cannot be read by path: they are extracted in this
        process, with a log message. ``None``: everything runs here (or on a local cluster, see ``n_jobs``).
    n_jobs
        Shorthand for a local cluster when ``client=None``: ``n_jobs > 1`` starts a :class:`dask.distributed.LocalCluster`
        of that many single-threaded worker processes for this call (``-1``: one per core) and extracts libraries
        on it as with ``client=``; only with two or more libraries that have image paths. Ignored with ``client=``.
    {progress}
        On a cluster it advances by whole libraries.
    {copy}

    Returns
    -------
    ``None`` if ``copy=False``, else a copy of ``adata`` holding:

    ``adata.obsm['patches' | key_added]``
        uint8 array (n_obs, S, S, 3) of RGB patches: numpy, or with ``store`` a dask array reading the store.
    ``adata.obs['patches_at_border' | key_added + '_at_border']``
        bool, whether the patch reached beyond the image edge and was padded with ``pad_value``.
    ``adata.uns['patches' | key_added]['params']``
        ``patch_size``, ``mpp``, ``library_key``, ``library_id`` (libraries used), ``pad_value``, ``spatial_key``,
        and per library: ``source_mpp`` (``None`` when unknown), ``source_mpp_origin`` (where it comes from:
        ``"scalefactors['microns_per_pixel']"``, ``"65 / scalefactors['spot_diameter_fullres'] (10x Visium
        definition)"`` or the file's metadata), ``source_patch_size`` (``R``), ``image_source``
        (which reader read which file or object), plus ``resample`` and ``centre`` (the conventions above), and
        ``store`` (the absolute path of the zarr store, ``None`` in memory).

    Examples
    --------
    >>> import sthist
    >>> adata = sthist.datasets.toy()
    >>> sthist.pp.extract_patches(adata, patch_size=224, mpp=0.5)  # doctest: +SKIP
    >>> adata.obsm["patches"].shape  # doctest: +SKIP
    (n_obs, 224, 224, 3)
    """
    check_adata(adata, fn=_FN)
    S = check_positive_int("patch_size", patch_size)
    if mpp is not None:
        if isinstance(mpp, bool) or not isinstance(mpp, int | float | np.integer | np.floating):
            raise TypeError(f"mpp must be a number (microns per pixel) or None, got {type(mpp).__name__}.")
        if not (math.isfinite(float(mpp)) and mpp > 0):
            raise ValueError(
                f"mpp must be a positive number of microns per pixel (e.g. 0.5 for HEST's 112 µm patches of 224 "
                f"px), or None to crop at the image's own resolution; got {mpp!r}."
            )
        mpp = float(mpp)
    if isinstance(pad_value, bool) or not isinstance(pad_value, int | np.integer) or not 0 <= pad_value <= 255:
        raise ValueError(f"pad_value must be an integer grey value in 0..255, got {pad_value!r}.")
    pad_value = int(pad_value)
    if not isinstance(key_added, str) or not key_added:
        raise ValueError(f"key_added must be a non-empty string, got {key_added!r}.")
    n_jobs = check_n_jobs(n_jobs)
    check_client(client, fn=_FN)
    store_path = _store.check_store(store, overwrite=overwrite, resume=resume, kind="patches")
    coords = check_spatial(adata, key=spatial_key)
    libs, codes = _resolve_libraries(adata, library_key, library_id, image)

    start = info(
        f"extracting {S} x {S} px patches around {adata.n_obs} spots"
        + (f" at {mpp} µm/px" if mpp is not None else "")
        + f" from {len(libs)} image{'s' if len(libs) > 1 else ''}"
    )
    opened: dict[int, ImageSource] = {}  # sources this call opened (closed at the end); one passed in stays open
    try:
        # open and check every library's image before reading any pixel
        plans = []
        origins: dict[str, str | None] = {}
        for li, lib in enumerate(libs):
            src = _open_library(adata, lib, image, image_key, pad_value)
            if src is not (image.get(lib) if isinstance(image, dict) else image):
                opened[li] = src
            idx = np.flatnonzero(codes == li)
            entry = adata.uns.get(C.SPATIAL_KEY, {}).get(lib)
            source_mpp, origin = resolve_mpp(entry=entry, source_mpp=src.mpp)
            if mpp is not None and source_mpp is None:
                raise ValueError(
                    f"mpp={mpp} needs the microns per pixel of library {lib!r}'s image ({src.description}): "
                    + mpp_unknown_message(
                        f"library {lib!r}'s image",
                        shape=src.shape,
                        coords=coords[idx],
                        entry=entry,
                        fix=(
                            "Set it with `adata.uns['spatial'][" + repr(lib) + "]['scalefactors']"
                            "['microns_per_pixel'] = <µm per full-resolution pixel>` (create the dicts if missing), "
                            "or pass mpp=None to crop at the image's own resolution. Nothing was changed."
                        ),
                    )
                )
            if origin == MPP_FROM_SPOT_DIAMETER and mpp is not None:
                diameter = float(entry[C.SCALEFACTORS][C.SPOT_DIAMETER])
                info(
                    f"    library {lib!r}: {source_mpp:.4f} µm/px = 65 / spot_diameter_fullres ({diameter:.2f} px), 10x's "
                    "definition of the spot diameter; set scalefactors['microns_per_pixel'] if the image is not "
                    "the one Space Ranger aligned"
                )
            origins[lib] = origin
            R = S if mpp is None else max(1, round(S * mpp / source_mpp))
            H, W = src.shape
            if R > min(H, W):
                raise ValueError(
                    f"patch_size={S}"
                    + (f" at mpp={mpp} ({R} source pixels)" if R != S else "")
                    + f" is larger than library {lib!r}'s image (width {W} x height {H} px): choose a smaller "
                    "patch_size" + (" or mpp" if mpp is not None else "") + "."
                )
            cx = np.floor(coords[idx, 0] + 0.5)
            cy = np.floor(coords[idx, 1] + 0.5)
            if ((cx < 0) | (cx >= W) | (cy < 0) | (cy >= H)).any():
                raise ValueError(_outside_message(adata, lib, idx, coords, (H, W), spatial_key))
            plans.append((lib, src, idx, source_mpp, R))

        paths = [_image_path(adata, lib, image, image_key) for lib in libs]
        descriptions = {lib: src.description for lib, src, _, _, _ in plans}
        run = _Run(plans, paths, coords, S, pad_value, store_path, progress)
        if store_path is not None:
            spec = _store_spec(S, mpp, pad_value, plans, paths, coords, codes)
            if resume and store_path.exists():
                run.done = _store.check_resume(store_path, kind="patches", spec=spec, fn=_FN)
                run.sha = _store.spec_sha256(spec)
                info(
                    f"    resuming {str(store_path)!r}: {len(run.done)} of {len(libs)} libraries finished before, "
                    f"{len(libs) - len(run.done)} to extract"
                )
            else:
                order, inverse = _store.library_order(codes, len(libs))
                run.sha = _store.create_patch_store(
                    store_path,
                    libs=libs,
                    counts=[len(idx) for _, _, idx, _, _ in plans],
                    order=order,
                    inverse=inverse,
                    S=S,
                    spec=spec,
                )
        remote = [li for li in run.todo() if paths[li] is not None]
        if client is None and n_jobs > 1 and len(remote) < len(run.todo()):
            in_memory = [libs[li] for li in run.todo() if paths[li] is None]
            info(
                f"    libraries {in_memory} have in-memory images, which worker processes cannot read by path: "
                "extracted in this process" + ("" if len(remote) > 1 else f" (n_jobs={n_jobs} unused)")
            )
        try:
            with resolve_client(client, n_jobs if len(remote) > 1 else 1, fn=_FN) as run_on:
                run.execute(run_on, remote, opened)
        except BaseException as err:
            _store.note_kept(err, store_path, fn="extract_patches", rest="extract only the rest")
            raise
    finally:
        for src in opened.values():
            src.close()
    patches = run.patches if store_path is None else _store.open_patches(store_path)
    border = run.border

    source_mpp = {lib: (None if m is None else float(m)) for lib, _, _, m, _ in plans}
    params = {
        "patch_size": S,
        "mpp": mpp,
        "library_key": library_key,
        "library_id": list(libs),
        "spatial_key": spatial_key,
        "pad_value": pad_value,
        "source_mpp": source_mpp,
        "source_mpp_origin": origins,
        "source_patch_size": {lib: int(R) for lib, _, _, _, R in plans},
        "image_source": descriptions,
        "resample": _resample(mpp),
        "centre": "patch[S // 2, S // 2] is pixel (floor(x + 0.5), floor(y + 0.5))",
        "store": None if store_path is None else str(store_path),
    }
    target = adata.copy() if copy else adata
    target.obsm[key_added] = patches
    target.obs[key_added + C.BORDER_SUFFIX] = border
    target.uns[key_added] = {"params": params}
    info(
        "    finished",
        time=start,
        deep=(
            f"added\n    {key_added!r}, uint8 patches (n_obs, {S}, {S}, 3) (adata.obsm"
            + ("" if store_path is None else f", dask array over {str(store_path)!r}")
            + ")\n"
            f"    {key_added + C.BORDER_SUFFIX!r}, patch padded at the image edge: {int(border.sum())} spots (adata.obs)\n"
            f"    {key_added!r}, ['params'] (adata.uns)"
        ),
    )
    return target if copy else None


def _resample(mpp: float | None) -> str:
    return "none" if mpp is None else "PIL area (shrink) / bilinear (enlarge)"


def _store_spec(S, mpp, pad_value, plans, paths, coords, codes) -> dict:
    """The parameters that define a patch store's content (compared on ``resume=True``)."""
    return {
        "format": _store.FORMAT,
        "kind": "patches",
        "patch_size": int(S),
        "mpp": mpp,
        "resample": _resample(mpp),
        "pad_value": int(pad_value),
        "libraries": [lib for lib, *_ in plans],
        "n_spots": {lib: len(idx) for lib, _, idx, _, _ in plans},
        "source_patch_size": {lib: int(R) for lib, _, _, _, R in plans},
        "coords_sha256": {
            lib: _store.sha256_of(np.asarray(coords[idx], dtype=np.float64)) for lib, _, idx, _, _ in plans
        },
        "obs_order_sha256": _store.sha256_of(np.asarray(codes, dtype=np.int64)),
        "image": {
            lib: (src.description if path is None else path[0] + ("" if path[1] is None else f" [{path[1]}]"))
            for (lib, src, _, _, _), path in zip(plans, paths, strict=True)
        },
        "image_shape": {lib: [int(v) for v in src.shape] for lib, src, _, _, _ in plans},
    }


def _origins(xy: np.ndarray, S: int, R: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-left source pixel of every patch: the edge at ``c + 0.5 - (S // 2 + 0.5) * R / S``, rounded half up.

    For ``R == S`` exactly ``floor(c + 0.5) - S // 2``.
    """
    if R == S:
        x0 = np.floor(xy[:, 0] + 0.5).astype(np.int64) - S // 2
        y0 = np.floor(xy[:, 1] + 0.5).astype(np.int64) - S // 2
    else:
        f = R / S
        x0 = np.floor(xy[:, 0] + 1.0 - (S // 2 + 0.5) * f).astype(np.int64)
        y0 = np.floor(xy[:, 1] + 1.0 - (S // 2 + 0.5) * f).astype(np.int64)
    return x0, y0


def _at_border(xy: np.ndarray, S: int, R: int, shape: tuple[int, int]) -> np.ndarray:
    """Whether each patch reaches beyond an image of ``shape`` (H, W): its border flag."""
    H, W = shape
    x0, y0 = _origins(xy, S, R)
    return (x0 < 0) | (y0 < 0) | (x0 + R > W) | (y0 + R > H)


def _extract_library(
    src: ImageSource,
    xy: np.ndarray,
    idx: np.ndarray,
    S: int,
    R: int,
    patches: np.ndarray,
    border: np.ndarray,
    bar: Any,
) -> None:
    """Fill ``patches[idx]`` and ``border[idx]`` from one source (``R`` source pixels resized to ``S``)."""
    x0, y0 = _origins(xy, S, R)
    border[idx] = _at_border(xy, S, R, src.shape)
    if src.block_shape is not None:
        bh, bw = src.block_shape
        order = np.lexsort((np.maximum(x0, 0) // bw, np.maximum(y0, 0) // bh))  # row-major block order
    else:
        order = np.arange(len(idx))
    if R != S:
        from PIL import Image

        method = Image.Resampling.BOX if R > S else Image.Resampling.BILINEAR
    top = -1
    for k in order:
        if y0[k] > top:  # visits go down the image: cached rows above this patch are not needed any more
            top = int(y0[k])
            src.release_above(top)
        region = src.read_region(x0[k], y0[k], R, R)
        if R != S:
            region = np.asarray(Image.fromarray(region).resize((S, S), resample=method))
        patches[idx[k]] = region
        bar.update(1)


# --------------------------------------------------------------------------------------------- chunked / on a cluster


def check_n_jobs(n_jobs: Any) -> int:
    """``n_jobs`` as a number of processes (``-1``: all cores)."""
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, int | np.integer):
        raise TypeError(f"n_jobs must be an integer (1: no parallelism, -1: all cores), got {n_jobs!r}.")
    n_jobs = int(n_jobs)
    if n_jobs == -1:
        return max(1, os.cpu_count() or 1)
    if n_jobs < 1:
        raise ValueError(f"n_jobs must be a positive number of processes or -1 for all cores, got {n_jobs}.")
    return n_jobs


def _image_path(adata: AnnData, lib: str, image: Any, image_key: str | None) -> tuple[str, str | None] | None:
    """The absolute file path (and element key) a worker can open for ``lib``, or ``None`` for an in-memory image.

    Follows the order of :func:`_open_library`.
    """
    if isinstance(image, dict):
        image = image[lib]
    if image is not None:
        return (_absolute(image), image_key) if isinstance(image, str | os.PathLike) else None
    entry = adata.uns.get(C.SPATIAL_KEY, {}).get(lib, {})
    if (entry.get(C.IMAGES, {}) or {}).get(C.FULLRES) is not None:
        return None
    meta = entry.get(C.METADATA, {}) or {}
    path = meta.get(C.SOURCE_IMAGE_PATH)
    if path is None or str(path) == "":
        return None
    return _absolute(path), meta.get(C.SOURCE_IMAGE_KEY) or image_key


def _absolute(path: str | os.PathLike) -> str:
    """A local path made absolute (workers may run elsewhere); a URL stays as it is."""
    text = os.fspath(path)
    return text if "://" in text else os.path.abspath(os.path.expanduser(text))


def _rows_per_pass(S: int) -> int:
    """Spots filled per tile-order pass with a store: whole chunks, about ``BUFFER_BYTES`` of patches."""
    per_chunk = _store.PATCH_CHUNK * S * S * 3
    return _store.PATCH_CHUNK * max(1, _store.BUFFER_BYTES // per_chunk)


def _extract_to_store(
    src: ImageSource, xy: np.ndarray, S: int, R: int, store: Any, name: str, bar: Any, step: int
) -> np.ndarray:
    """Extract one library into its array ``name`` of the store; return the library's border flags.

    A buffer of ``step`` spots (whole chunks) is filled at a time, each buffer in tile order.
    """
    border = np.zeros(len(xy), dtype=bool)
    buf = np.empty((min(step, len(xy)), S, S, 3), dtype=np.uint8)
    for s in range(0, len(xy), step):
        e = min(s + step, len(xy))
        _extract_library(src, xy[s:e], np.arange(e - s), S, R, buf, border[s:e], bar)
        _store.write_rows(store, name, s, buf[: e - s])
    return border


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass


def _extract_unit(
    source: Any,
    pad_value: int,
    lib: str,
    xy: np.ndarray,
    S: int,
    R: int,
    step: int,
    store: Any,
    name: str,
    sha: str | None,
    *,
    bar: Any = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """One library, one task: extract it from ``source`` and return ``(border flags, patches or None)``.

    ``source`` is ``("path", path, image_key)`` (a worker opens the file itself) or an open :class:`ImageSource`
    (in this process). With a ``store`` the patches go to the library's array ``name``, a pass of ``step`` spots at a
    time, and then its completion marker is written; nothing big is returned. Pure: run again, it writes the same
    bytes.
    """
    bar = _NoBar() if bar is None else bar
    with ExitStack() as stack:
        if isinstance(source, tuple):
            _, path, key = source
            what = f"the image of library {lib!r}"
            src = stack.enter_context(open_image(path, image_key=key, pad_value=pad_value, what=what))
        else:
            src = source
        if store is not None:
            border = _extract_to_store(src, xy, S, R, store, name, bar, step)
            _store.mark_done(store, name, sha, library_id=lib, n_spots=len(xy), at_border=int(border.sum()))
            return border, None
        border = np.zeros(len(xy), dtype=bool)
        out = np.empty((len(xy), S, S, 3), dtype=np.uint8)
        _extract_library(src, xy, np.arange(len(xy)), S, R, out, border, bar)
        return border, out


class _Run:
    """The libraries of one call, which of them are finished, and the outputs (border flags, in-memory patches)."""

    def __init__(self, plans, paths, coords, S, pad_value, store_path, progress):
        self.plans, self.paths, self.coords, self.S = plans, paths, coords, S
        self.pad_value, self.store_path, self.progress = pad_value, store_path, progress
        n = len(coords)
        self.border = np.zeros(n, dtype=bool)
        self.patches = None if store_path is not None else np.empty((n, S, S, 3), dtype=np.uint8)
        self.done: set[str] = set()
        self.sha: str | None = None
        self.step = _rows_per_pass(S)

    def todo(self) -> list[int]:
        return [li for li in range(len(self.plans)) if _store.array_name(li) not in self.done]

    def _task(self, li: int, source: Any) -> tuple:
        lib, _src, idx, _m, R = self.plans[li]
        store = self.store_path
        return (
            source,
            self.pad_value,
            lib,
            self.coords[idx],
            self.S,
            R,
            self.step,
            store,
            _store.array_name(li),
            self.sha,
        )

    def _place(self, li: int, result: tuple) -> None:
        idx = self.plans[li][2]
        self.border[idx] = result[0]
        if result[1] is not None:
            self.patches[idx] = result[1]

    def execute(self, client: Any, remote: list[int], opened: dict[int, ImageSource]) -> None:
        """Extract every library not finished: ``remote`` ones as tasks on ``client``, the others here."""
        from .._engine._utils import progress_bar

        for li in range(len(self.plans)):  # finished before (resume): the flags follow from the geometry
            if _store.array_name(li) in self.done:
                lib, src, idx, _m, R = self.plans[li]
                self.border[idx] = _at_border(self.coords[idx], self.S, R, src.shape)
        todo = self.todo()
        if client is None:
            remote = []
        elif todo:
            local = [self.plans[li][0] for li in todo if li not in remote]
            info(
                f"    {len(remote)} libraries as tasks on the dask cluster"
                + (
                    f"; libraries {local} have in-memory images, which workers cannot read by path: extracted in this "
                    "process (give image paths to extract them on the cluster)"
                    if local
                    else ""
                )
            )
            for li in remote:  # workers open their files themselves
                if li in opened:
                    opened.pop(li).close()
        if remote:
            tasks = [self._task(li, ("path", *self.paths[li])) for li in remote]
            run_tasks(
                client,
                _extract_unit,
                tasks,
                weights=[len(self.plans[li][2]) for li in remote],
                progress=self.progress,
                desc="patches",
                unit="spot",
                on_result=lambda i, res: self._place(remote[i], res),
            )
        local = [li for li in todo if li not in remote]
        if not local:
            return
        total = sum(len(self.plans[li][2]) for li in local)
        with progress_bar(total=total, enabled=self.progress, desc="patches", unit="spot") as bar:
            for li in local:
                lib, src, idx, _m, R = self.plans[li]
                if len(self.plans) > 1:
                    bar.set_postfix_str(f"library {lib}")
                if self.store_path is None:
                    _extract_library(src, self.coords[idx], idx, self.S, R, self.patches, self.border, bar)
                else:
                    self._place(li, _extract_unit(*self._task(li, src), bar=bar))
