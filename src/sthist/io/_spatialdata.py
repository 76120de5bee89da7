"""Bring a SpatialData object (image + circles shapes + table) into the common sthist AnnData layout."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import _constants as C
from .._logging import info, warning

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

HIRES_MAX_SIDE = 2000  # longest side of 10x's tissue_hires_image.png for 6.5 mm capture areas
LOWRES_MAX_SIDE = 600


def from_spatialdata(
    sdata: SpatialData | str | os.PathLike[str],
    *,
    table_key: str | None = None,
    image_key: str | None = None,
    shapes_key: str | None = None,
    library_id: str | None = None,
) -> AnnData:
    """Convert a SpatialData object with spots (circles), a table and an H&E image into sthist's AnnData layout.

    The table that annotates a circles shapes element (Visium spots) is copied; its rows are matched to the circles
    by the table's region and instance keys, and the circle centres are transformed into the pixel grid of the image
    (shapes -> common coordinate system -> inverse of the image's transformation), so that the result follows the
    Visium convention of :func:`sthist.io.read_visium`. The SpatialData object is not modified.

    Parameters
    ----------
    sdata
        A :class:`spatialdata.SpatialData`, or the path of a SpatialData ``.zarr`` store (read lazily: no pixel
        data is loaded except what the downscaled ``hires`` image needs).
    table_key
        Table to convert. ``None`` works when exactly one table annotates a circles shapes element.
    image_key
        Image element that holds the full-resolution H&E image. ``None`` works when exactly one image shares a
        coordinate system with the spots.
    shapes_key
        Circles shapes element with the spots. ``None`` works when the table annotates exactly one circles element.
    library_id
        Name of the library (section) in ``uns['spatial']`` and ``obs['section']``; ``None`` uses ``shapes_key``.

    Returns
    -------
    A copy of the table holding its rows that annotate the spots (in the table's order; rows whose instance is not a
    circle of the element, or whose circle has no finite centre, are dropped with a warning; no ``in_tissue``
    filtering is done) and

    - ``obsm['spatial']``: circle centres in pixels of the full-resolution image (x = column, y = row), float64.
      Centres are mapped with the affine transformations alone; no half-pixel shift is applied, as in
      :func:`spatialdata_io.visium`;
    - ``obs['section']`` = ``library_id`` (categorical);
    - ``uns['spatial'][library_id]['images']['hires']``: the image downscaled to a longest side of at most 2000
      pixels (from the coarsest pyramid level that still has >= 2000 pixels), uint8 (y, x, 3), and ``'lowres'``
      (longest side at most 600);
    - ``uns['spatial'][library_id]['scalefactors']``: ``'tissue_hires_scalef'``, ``'tissue_lowres_scalef'``,
      ``'spot_diameter_fullres'`` (twice the median circle radius, in full-resolution pixels) and
      ``'microns_per_pixel'`` only where it can be known: when the table already carries
      ``uns['spatial'][...]['scalefactors']`` with both ``microns_per_pixel`` and ``spot_diameter_fullres``, the pixel
      size is rescaled to the image used here. SpatialData does not record physical units reliably, so otherwise it is
      left out; set ``adata.uns['spatial'][library_id]['scalefactors']['microns_per_pixel']`` yourself
      (for 10x Visium: 65 / ``spot_diameter_fullres``);
    - ``uns['spatial'][library_id]['metadata']``: when the image is stored in the zarr store that backs ``sdata``,
      ``'source_image_path'`` (the store) and ``'source_image_key'`` (``image_key``), and no pixel data is copied;
      otherwise the full-resolution image as uint8 (y, x, 3) under ``uns['spatial'][library_id]['images']['fullres']``.

    A previous ``uns['spatial']`` and ``obsm['spatial']`` of the table are replaced in the copy.

    Raises
    ------
    KeyError
        If a named table, image or shapes element does not exist.
    ValueError
        If the choice of table, image or shapes element is ambiguous (the message lists the choices), or no element
        fits (no table, no circles, no image aligned with the spots, no table row matching a circle).
    """
    import pandas as pd
    from spatialdata.models import get_table_keys

    sdata = _as_spatialdata(sdata)
    table_key, shapes_key = _pick_table_and_shapes(sdata, table_key=table_key, shapes_key=shapes_key)
    image_key, coordinate_system = _pick_image(sdata, image_key=image_key, shapes_key=shapes_key)
    if library_id is None:
        library_id = shapes_key
    start = info(f"converting table {table_key!r}, spots {shapes_key!r} and image {image_key!r} to AnnData")

    table = sdata.tables[table_key]
    shapes = sdata.shapes[shapes_key]
    image = sdata.images[image_key]
    _, region_key, instance_key = get_table_keys(table)

    # rows of the table that annotate the spots, matched to the circles by the instance key
    in_region = (table.obs[region_key].astype(str) == shapes_key).to_numpy()
    instances = table.obs[instance_key].to_numpy()[in_region]
    position = _match_instances(shapes.index, instances)
    found = position >= 0
    if not found.any():
        raise ValueError(
            f"No row of table {table_key!r} matches a circle of {shapes_key!r} through "
            f"obs[{instance_key!r}] (e.g. {list(instances[:3])}) and the shapes index (e.g. {list(shapes.index[:3])}). "
            f"Make obs[{instance_key!r}] hold the index values of sdata[{shapes_key!r}]."
        )
    if not found.all():
        warning(f"dropping {int((~found).sum())} table rows whose instance is not a circle of {shapes_key!r}")
    rows = np.flatnonzero(in_region)[found]
    position = position[found]

    # circle centres -> pixel grid of the image (scale0 for a multiscale image)
    matrix = _shapes_to_image_matrix(shapes, image, coordinate_system)
    centres = np.column_stack([shapes.geometry.x.to_numpy(), shapes.geometry.y.to_numpy()])[position]
    coords = centres @ matrix[:2, :2].T + matrix[:2, 2]
    finite = np.isfinite(coords).all(axis=1)
    if not finite.any():
        raise ValueError(f"All circles of {shapes_key!r} that the table annotates have NaN or infinite centres.")
    if not finite.all():
        warning(f"dropping {int((~finite).sum())} table rows whose circle has a NaN or infinite centre")
        rows, position, coords = rows[finite], position[finite], coords[finite]
    radius = np.asarray(shapes["radius"], dtype=np.float64)[position]
    spot_diameter = float(2.0 * np.median(radius) * np.sqrt(abs(np.linalg.det(matrix[:2, :2]))))

    full_shape = _image_levels(image)[0].shape[-2:]
    backed = _backing_store(sdata, image_key, image)
    fullres = None if backed is not None else _to_uint8_hwc(_image_levels(image)[0].data.compute(), image_key)
    hires, hires_scalef = _downscale(image, image_key, HIRES_MAX_SIDE, fullres=fullres)
    lowres, lowres_scalef = _resize_longest(hires, hires_scalef, LOWRES_MAX_SIDE)

    adata = table[rows].copy()
    mpp = _known_mpp(table, spot_diameter)
    adata.obsm[C.SPATIAL_KEY] = coords.astype(np.float64)
    adata.obs[C.SECTION_KEY] = pd.Categorical([library_id] * adata.n_obs)
    scalefactors: dict[str, Any] = {
        C.HIRES_SCALEF: hires_scalef,
        C.LOWRES_SCALEF: lowres_scalef,
        C.SPOT_DIAMETER: spot_diameter,
    }
    if mpp is not None:
        scalefactors[C.MPP] = mpp
    images: dict[str, np.ndarray] = {C.HIRES: hires, C.LOWRES: lowres}
    metadata: dict[str, Any] = {}
    if backed is not None:
        metadata[C.SOURCE_IMAGE_PATH] = backed
        metadata[C.SOURCE_IMAGE_KEY] = image_key
    else:
        images[C.FULLRES] = fullres
    adata.uns[C.SPATIAL_KEY] = {library_id: {C.IMAGES: images, C.SCALEFACTORS: scalefactors, C.METADATA: metadata}}
    info(
        f"    {adata.n_obs} spots in a {full_shape[1]} x {full_shape[0]} pixel image "
        f"(coordinate system {coordinate_system!r}); finished",
        time=start,
    )
    return adata


def _as_spatialdata(sdata: Any) -> SpatialData:
    import spatialdata as sd

    if isinstance(sdata, sd.SpatialData):
        return sdata
    if isinstance(sdata, str | os.PathLike):
        path = Path(sdata)
        if not path.exists():
            raise FileNotFoundError(
                f"SpatialData store {str(path)!r} does not exist; pass the path of a `.zarr` store."
            )
        return sd.read_zarr(path)
    raise TypeError(
        f"from_spatialdata expects a spatialdata.SpatialData or the path of a `.zarr` store, got {type(sdata).__name__}."
    )


def _is_circles(shapes: Any) -> bool:
    if "radius" not in shapes.columns or len(shapes) == 0:
        return False
    return bool((shapes.geometry.geom_type == "Point").all())


def _regions(table: Any) -> list[str]:
    from spatialdata.models import get_table_keys

    try:
        region, _, _ = get_table_keys(table)
    except (KeyError, ValueError, TypeError):
        return []
    return [region] if isinstance(region, str) else list(region)


def _describe_tables(sdata: SpatialData) -> str:
    return "; ".join(f"{name!r} annotates {_regions(t)}" for name, t in sdata.tables.items()) or "no tables"


def _pick_table_and_shapes(sdata: SpatialData, *, table_key: str | None, shapes_key: str | None) -> tuple[str, str]:
    circles = [name for name, s in sdata.shapes.items() if _is_circles(s)]
    if shapes_key is not None:
        if shapes_key not in sdata.shapes:
            raise KeyError(f"shapes_key={shapes_key!r} is not a shapes element; available: {list(sdata.shapes)}.")
        if shapes_key not in circles:
            raise ValueError(
                f"Shapes element {shapes_key!r} is not a set of circles (points with a 'radius' column); sthist "
                f"needs the spots as circles. Circles elements: {circles}. Convert polygons with "
                "`sdata[name] = spatialdata.to_circles(sdata[name])` if they are spots."
            )
    if not sdata.tables:
        raise ValueError("The SpatialData object has no table: sthist needs the spot expression in a table.")
    if table_key is not None and table_key not in sdata.tables:
        raise KeyError(f"table_key={table_key!r} is not a table; available: {list(sdata.tables)}.")
    if not circles:
        raise ValueError(
            f"The SpatialData object has no circles shapes element (spots); shapes elements: {list(sdata.shapes)}. "
            "Convert spot polygons with `spatialdata.to_circles`."
        )

    wanted = [shapes_key] if shapes_key is not None else circles
    names = [table_key] if table_key is not None else list(sdata.tables)
    candidates = {name: [r for r in _regions(sdata.tables[name]) if r in wanted] for name in names}
    candidates = {name: regions for name, regions in candidates.items() if regions}
    if not candidates:
        target = f"shapes {shapes_key!r}" if shapes_key is not None else f"a circles shapes element {circles}"
        which = f"Table {table_key!r}" if table_key is not None else "No table"
        raise ValueError(
            f"{which} annotates {target} ({_describe_tables(sdata)}). Pass `table_key=`/`shapes_key=` naming a "
            "table and the spots it annotates, or link them with `sdata.set_table_annotates_spatialelement`."
        )
    if len(candidates) > 1:
        raise ValueError(
            f"Several tables annotate spots: {', '.join(f'{k!r} -> {v}' for k, v in candidates.items())}. "
            f"Pass `table_key=` (one of {list(candidates)})."
        )
    ((table_key, regions),) = candidates.items()
    if len(regions) > 1:
        raise ValueError(
            f"Table {table_key!r} annotates several circles elements {regions}: pass `shapes_key=` (one of {regions})."
        )
    return table_key, regions[0]


def _pick_image(sdata: SpatialData, *, image_key: str | None, shapes_key: str) -> tuple[str, str]:
    from spatialdata.transformations import get_transformation

    shapes_cs = set(get_transformation(sdata.shapes[shapes_key], get_all=True))

    def shared(name: str) -> list[str]:
        return sorted(shapes_cs & set(get_transformation(sdata.images[name], get_all=True)))

    if not sdata.images:
        raise ValueError(
            "The SpatialData object has no image: sthist needs the H&E image the spots lie on. Add it with "
            "`sdata['he'] = spatialdata.models.Image2DModel.parse(...)`."
        )
    if image_key is not None:
        if image_key not in sdata.images:
            raise KeyError(f"image_key={image_key!r} is not an image; available: {list(sdata.images)}.")
        names = [image_key]
    else:
        names = [name for name in sdata.images if shared(name)]
    if not names or not shared(names[0]):
        images = {name: sorted(get_transformation(im, get_all=True)) for name, im in sdata.images.items()}
        raise ValueError(
            f"No image shares a coordinate system with the spots {shapes_key!r} (coordinate systems "
            f"{sorted(shapes_cs)}); images and theirs: {images}. Set a transformation of the image or the spots to a "
            "common coordinate system with `spatialdata.transformations.set_transformation`."
        )
    if len(names) > 1:
        sizes = ", ".join(f"{n!r} {tuple(_image_levels(sdata.images[n])[0].shape)}" for n in names)
        raise ValueError(
            f"Several images lie in the coordinate system of the spots {shapes_key!r}: {sizes} (c, y, x). "
            f"Pass `image_key=` naming the full-resolution H&E image (one of {names})."
        )
    common = shared(names[0])
    coordinate_system = "global" if "global" in common else common[0]
    return names[0], coordinate_system


def _shapes_to_image_matrix(shapes: Any, image: Any, coordinate_system: str) -> np.ndarray:
    """Affine (3, 3) matrix from the shapes' intrinsic (x, y) to the image's (scale0) pixel (x, y)."""
    from spatialdata.transformations import Sequence, get_transformation

    to_cs = get_transformation(shapes, to_coordinate_system=coordinate_system)
    image_to_cs = get_transformation(image, to_coordinate_system=coordinate_system)
    chain = Sequence([to_cs, image_to_cs.inverse()])
    return np.asarray(chain.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=np.float64)


def _match_instances(index: Any, instances: np.ndarray) -> np.ndarray:
    """Position of each instance id in the shapes index, -1 where absent; tolerates int/str mismatches."""
    import pandas as pd

    index = pd.Index(index)
    position = index.get_indexer(pd.Index(instances))
    if (position < 0).all() and len(instances):
        position = pd.Index(index.astype(str)).get_indexer(pd.Index(pd.Index(instances).astype(str)))
    return position


def _image_levels(image: Any) -> list[Any]:
    """Pyramid levels (DataArray, c, y, x), finest first; one level for a single-scale image."""
    from spatialdata import get_pyramid_levels
    from xarray import DataTree

    if isinstance(image, DataTree):
        return list(get_pyramid_levels(image))
    return [image]


def _backing_store(sdata: SpatialData, image_key: str, image: Any) -> str | None:
    """Return the zarr store holding ``image_key`` if ``sdata`` is backed by one and the image lives there, else None."""
    if sdata.path is None:
        return None
    from spatialdata import get_dask_backing_files

    store = Path(sdata.path)
    try:
        on_disk = f"images/{image_key}" in sdata.elements_paths_on_disk()
    except Exception:  # a store we cannot list: treat the image as in memory
        return None
    if not on_disk:
        return None
    element_dir = (store / "images" / image_key).resolve()
    for file in get_dask_backing_files(image):
        file_path = Path(file).resolve()
        if file_path != element_dir and element_dir not in file_path.parents:
            return None  # the image in memory is read from elsewhere: the store's copy may differ
    return str(store.resolve()) if store.exists() else str(sdata.path)


def _to_uint8_hwc(array: np.ndarray, image_key: str, *, dtype: Any = None) -> np.ndarray:
    """(c, y, x) array -> uint8 (y, x, 3); ``dtype`` is the image's own dtype when ``array`` was averaged."""
    array = np.asarray(array)
    dtype = np.dtype(array.dtype if dtype is None else dtype)
    n_channels = array.shape[0]
    if n_channels == 1:
        array = np.repeat(array, 3, axis=0)
    elif n_channels == 4:
        array = array[:3]  # RGBA: drop alpha
    elif n_channels != 3:
        raise ValueError(
            f"Image {image_key!r} has {n_channels} channels; sthist needs an RGB (3 channels) H&E image. Pass "
            "`image_key=` naming the H&E image, or add an RGB version of it to the SpatialData object."
        )
    if array.dtype != np.uint8:
        array = np.nan_to_num(array.astype(np.float64))
        top = float(array.max()) if array.size else 0.0
        if np.issubdtype(dtype, np.floating) and top <= 1.0:
            array = array * 255.0  # float image in [0, 1]
        elif dtype != np.uint8 and top > 255.0:
            array = array * (255.0 / top)  # e.g. 16-bit: stretch the used range to 8 bits
        array = np.clip(array, 0, 255).round().astype(np.uint8)
    return np.ascontiguousarray(np.moveaxis(array, 0, -1))


def _downscale(image: Any, image_key: str, max_side: int, *, fullres: np.ndarray | None) -> tuple[np.ndarray, float]:
    """Image with longest side <= max_side, uint8 (y, x, 3), and its scale factor relative to the full resolution."""
    import dask.array as da

    levels = _image_levels(image)
    full_h, full_w = levels[0].shape[-2:]
    scale = min(1.0, max_side / max(full_h, full_w))
    if scale == 1.0:
        array = fullres if fullres is not None else _to_uint8_hwc(levels[0].data.compute(), image_key)
        return array.copy(), 1.0
    # coarsest pyramid level that still has >= max_side pixels on its longest side
    level = max(i for i, lev in enumerate(levels) if i == 0 or max(lev.shape[-2:]) >= max_side)
    data = levels[level].data
    dtype = data.dtype
    lev_h, lev_w = data.shape[-2:]
    # box-average by an integer factor on the lazy array first (little memory), then resize exactly
    factor = max(1, int(max(lev_h, lev_w) // max_side))
    if factor > 1:
        data = da.coarsen(np.mean, data.astype(np.float32), {1: factor, 2: factor}, trim_excess=True)
    small = _to_uint8_hwc(data.compute(), image_key, dtype=dtype)
    # the averaged image covers the first small * factor level pixels; levels are aligned at the origin and have
    # lev / full level pixels per full-resolution pixel
    covered_h = small.shape[0] * factor * full_h / lev_h
    covered_w = small.shape[1] * factor * full_w / lev_w
    size = (max(1, round(covered_w * scale)), max(1, round(covered_h * scale)))
    return _resize(small, size), float(scale)


def _resize(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize uint8 (y, x, 3) to (width, height) with a box filter, as Space Ranger does for its PNGs."""
    from PIL import Image

    if (array.shape[1], array.shape[0]) == tuple(size):
        return np.ascontiguousarray(array)
    return np.asarray(Image.fromarray(np.ascontiguousarray(array)).resize(size, Image.Resampling.BOX))


def _resize_longest(hires: np.ndarray, hires_scalef: float, max_side: int) -> tuple[np.ndarray, float]:
    factor = min(1.0, max_side / max(hires.shape[:2]))
    size = (max(1, round(hires.shape[1] * factor)), max(1, round(hires.shape[0] * factor)))
    return _resize(hires, size), float(hires_scalef * factor)


def _known_mpp(table: Any, spot_diameter: float) -> float | None:
    """Pixel size from the table's own Visium scale factors, rescaled to the pixels of the image used here."""
    libraries = table.uns.get(C.SPATIAL_KEY)
    if not isinstance(libraries, dict) or len(libraries) != 1:
        return None
    (lib,) = libraries.values()
    scalefactors = lib.get(C.SCALEFACTORS, {}) if isinstance(lib, dict) else {}
    mpp, diameter = scalefactors.get(C.MPP), scalefactors.get(C.SPOT_DIAMETER)
    if mpp is None or diameter is None or not spot_diameter > 0:
        return None
    # the same physical spot spans `diameter` of their pixels and `spot_diameter` of ours
    return float(mpp) * float(diameter) / spot_diameter
