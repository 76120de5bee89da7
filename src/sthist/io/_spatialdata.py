"""Bring a SpatialData object (image + table + the spots, bins or cells it annotates) into sthist's AnnData layout."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

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
    kind: Literal["spots", "bins", "cells"] | None = None,
    bin_size: float | None = None,
    aggregate_to: float | None = None,
    microns_per_unit: float | None = None,
    mpp: float | None = None,
) -> AnnData:
    """Convert a SpatialData object (a table, the spots, bins or cells it annotates, and an H&E image) to AnnData.

    The table that annotates a shapes element (circles: Visium spots or cells; polygons: Visium HD square bins or
    cell boundaries) or a points element is copied; its rows are matched to the element by the table's region and
    instance keys, and each element's centre (circle centre, polygon centroid, point) is transformed into the pixel
    grid of the image (element -> common coordinate system -> inverse of the image's transformation), so that the
    result follows the Visium convention of :func:`sthist.io.read_visium` and every ``sthist.pp`` / ``sthist.tl``
    function works on it: patches of any physical size with ``extract_patches(..., mpp=)``, and predictions per
    spot, bin or cell in ``layers['predicted']`` with :func:`sthist.tl.predict_expression`. The SpatialData object
    is not modified.

    What is read as what (``kind=None``): square polygons of one size are bins (spatialdata-io's Visium HD output,
    ``<dataset>_square_002um``, ``_008um``, ``_016um``); other polygons and points are cells; circles are Visium
    spots unless the element's name says they are cells (``cell_circles`` of spatialdata-io's Xenium reader) or bins
    (Visium HD read with ``bins_as_squares=False``).

    Parameters
    ----------
    sdata
        A :class:`spatialdata.SpatialData`, or the path of a SpatialData ``.zarr`` store (read lazily: no pixel
        data is loaded except what the downscaled ``hires`` image needs).
    table_key
        Table to convert. ``None`` works when exactly one table annotates a shapes or points element.
    image_key
        Image element that holds the full-resolution H&E image. ``None`` works when exactly one image shares a
        coordinate system with the element.
    shapes_key
        Shapes (circles or polygons) or points element the table annotates. ``None`` works when the table annotates
        exactly one such element.
    library_id
        Name of the library (section) in ``uns['spatial']`` and ``obs['section']``; ``None`` uses ``shapes_key``.
    kind
        ``'spots'``, ``'bins'`` or ``'cells'``; ``None`` decides as described above.
    bin_size
        Side of the bins in µm (bins only); ``None`` reads it from the element's or the table's name
        (``square_008um``: 8 µm). Bins set the image's µm per pixel: ``bin_size`` / (bin side in image pixels).
    aggregate_to
        Side in µm of coarser square bins to sum the bins into before anything else (bins only), a multiple of
        ``bin_size``; e.g. 2 µm bins aggregated to 16 or 112 µm. Uses ``obs['array_row']`` and ``obs['array_col']``
        of the table (spatialdata-io writes them), else the bin centres.
    microns_per_unit
        Microns per unit of the element's own (intrinsic) coordinates, e.g. ``1.0`` for Xenium read with
        spatialdata-io (cell boundaries and circles in µm); sets the image's µm per pixel through the
        transformations.
    mpp
        Microns per pixel of the full-resolution image, when known otherwise (overrides the above).

    Returns
    -------
    A copy of the table holding its rows that annotate the element (in the table's order; rows whose instance is not
    in the element, or whose centre is NaN, infinite or outside the image, are dropped with a warning; no
    ``in_tissue`` filtering is done), or with ``aggregate_to`` one row per coarse bin, and

    - ``obsm['spatial']``: centres in pixels of the full-resolution image (x = column, y = row), float64.
      Centres are mapped with the affine transformations alone; no half-pixel shift is applied, as in
      :func:`spatialdata_io.visium`;
    - ``obs['section']`` = ``library_id`` (categorical); with ``aggregate_to`` also ``obs['array_row']``,
      ``obs['array_col']`` (indices of the coarse bins) and ``obs['n_bins']`` (bins summed into each);
    - ``uns['spatial'][library_id]['images']['hires']``: the image downscaled to a longest side of at most 2000
      pixels (from the coarsest pyramid level that still has >= 2000 pixels), uint8 (y, x, 3), and ``'lowres'``
      (longest side at most 600);
    - ``uns['spatial'][library_id]['scalefactors']``: ``'tissue_hires_scalef'``, ``'tissue_lowres_scalef'``,
      ``'spot_diameter_fullres'`` (the median circle diameter, bin side or cell equivalent diameter in
      full-resolution pixels; not for points) and ``'microns_per_pixel'`` where it can be known: from ``mpp``, the
      bin size, ``microns_per_unit``, or, for spots, a table that already carries ``uns['spatial'][...]
      ['scalefactors']`` with both ``microns_per_pixel`` and ``spot_diameter_fullres`` (rescaled to the image used
      here). For Visium spots without it, :func:`sthist.pp.extract_patches` derives it with 10x's rule
      (65 / ``spot_diameter_fullres``);
    - ``uns['spatial'][library_id]['metadata']``: ``'obs_kind'`` (``'spots'``, ``'bins'`` or ``'cells'``), for bins
      ``'bin_size_um'`` (and ``'aggregated_from_um'``); when the image is stored in the zarr store that backs
      ``sdata``, ``'source_image_path'`` (the store) and ``'source_image_key'`` (``image_key``), and no pixel data is
      copied; otherwise the full-resolution image as uint8 (y, x, 3) under
      ``uns['spatial'][library_id]['images']['fullres']``.

    A previous ``uns['spatial']`` and ``obsm['spatial']`` of the table are replaced in the copy.

    Raises
    ------
    KeyError
        If a named table, image or element does not exist.
    ValueError
        If the choice of table, image or element is ambiguous (the message lists the choices), or no element fits
        (no table, no annotated shapes or points, no image aligned with them, no table row matching the element, no
        centre inside the image), or bins have no known size.
    """
    import pandas as pd
    from spatialdata.models import get_table_keys

    kind = _check_kind(kind)
    bin_size = _optional_positive("bin_size", bin_size, "µm")
    aggregate_to = _optional_positive("aggregate_to", aggregate_to, "µm")
    microns_per_unit = _optional_positive("microns_per_unit", microns_per_unit, "µm per unit")
    mpp = _optional_positive("mpp", mpp, "µm per pixel")
    sdata = _as_spatialdata(sdata)
    table_key, shapes_key = _pick_table_and_shapes(sdata, table_key=table_key, shapes_key=shapes_key)
    image_key, coordinate_system = _pick_image(sdata, image_key=image_key, shapes_key=shapes_key)
    if library_id is None:
        library_id = shapes_key
    table = sdata.tables[table_key]
    element = _element(sdata, shapes_key)
    image = sdata.images[image_key]
    _, region_key, instance_key = get_table_keys(table)
    geometry = _geometry_kind(element)
    kind = kind or _guess_kind(geometry, element, shapes_key)
    if kind == "bins" and bin_size is None:
        bin_size = _bin_size_from_name(shapes_key, table_key)
    if aggregate_to is not None and kind != "bins":
        raise ValueError(
            f"aggregate_to={aggregate_to} sums bins into coarser bins, but {shapes_key!r} holds {kind}; pass kind='bins' "
            "if they are bins, or leave aggregate_to out."
        )
    start = info(f"converting table {table_key!r}, {kind} {shapes_key!r} and image {image_key!r} to AnnData")

    # rows of the table that annotate the element, matched to it by the instance key
    in_region = (table.obs[region_key].astype(str) == shapes_key).to_numpy()
    instances = table.obs[instance_key].to_numpy()[in_region]
    index = _element_index(element, geometry)
    position = _match_instances(index, instances)
    found = position >= 0
    noun = {"circles": "circle", "polygons": "polygon", "points": "point"}[geometry]
    if not found.any():
        raise ValueError(
            f"No row of table {table_key!r} matches a {noun} of {shapes_key!r} through "
            f"obs[{instance_key!r}] (e.g. {list(instances[:3])}) and the element's index (e.g. {list(index[:3])}). "
            f"Make obs[{instance_key!r}] hold the index values of sdata[{shapes_key!r}]."
        )
    if not found.all():
        warning(f"dropping {int((~found).sum())} table rows whose instance is not a {noun} of {shapes_key!r}")
    rows = np.flatnonzero(in_region)[found]
    position = position[found]

    # centres -> pixel grid of the image (scale0 for a multiscale image)
    matrix = _shapes_to_image_matrix(element, image, coordinate_system)
    px_per_unit = float(np.sqrt(abs(np.linalg.det(matrix[:2, :2]))))
    centres, sizes = _centres_and_sizes(element, geometry, kind)
    centres, sizes = centres[position], (None if sizes is None else sizes[position])
    coords = centres @ matrix[:2, :2].T + matrix[:2, 2]
    finite = np.isfinite(coords).all(axis=1)
    if not finite.any():
        raise ValueError(f"All {kind} of {shapes_key!r} that the table annotates have NaN or infinite centres.")
    full_shape = _image_levels(image)[0].shape[-2:]
    H, W = int(full_shape[0]), int(full_shape[1])
    inside = (
        finite & (coords[:, 0] >= -0.5) & (coords[:, 0] < W - 0.5) & (coords[:, 1] >= -0.5) & (coords[:, 1] < H - 0.5)
    )
    if not inside.any():
        c = coords[finite]
        raise ValueError(
            f"None of the {int(finite.sum())} {kind} of {shapes_key!r} that table {table_key!r} annotates lies inside "
            f"image {image_key!r} ({W} x {H} px): their centres span x {c[:, 0].min():.1f} .. {c[:, 0].max():.1f}, "
            f"y {c[:, 1].min():.1f} .. {c[:, 1].max():.1f} in its pixels (coordinate system {coordinate_system!r}). "
            "Pass `image_key=` naming the full-resolution H&E image of these data, or fix the transformations with "
            "`spatialdata.transformations.set_transformation`. Nothing was changed."
        )
    if not finite.all():
        warning(f"dropping {int((~finite).sum())} table rows whose {noun} has a NaN or infinite centre")
    if not (inside | ~finite).all():
        warning(f"dropping {int((finite & ~inside).sum())} table rows whose centre lies outside image {image_key!r}")
    rows, position, coords = rows[inside], position[inside], coords[inside]
    sizes = None if sizes is None else sizes[inside]
    diameter = None if sizes is None else float(np.median(sizes) * px_per_unit)

    mpp, mpp_origin = _element_mpp(
        kind, mpp=mpp, bin_size=bin_size, diameter=diameter, microns_per_unit=microns_per_unit, px_per_unit=px_per_unit
    )
    if kind == "bins" and mpp is None:
        raise ValueError(
            f"The size of the bins of {shapes_key!r} is unknown: neither its name nor the table's ({table_key!r}) says "
            f"it (spatialdata-io names Visium HD bins '<dataset>_square_008um'). Their side is {diameter:.2f} px in "
            f"image {image_key!r}: pass `bin_size=` in µm (e.g. bin_size=8 for 8 µm bins, which would be "
            f"{8.0 / diameter:.4f} µm/px), or `mpp=` with the image's µm per pixel. Nothing was changed."
        )

    adata = table[rows].copy()
    adata.obsm[C.SPATIAL_KEY] = coords.astype(np.float64)
    metadata: dict[str, Any] = {C.OBS_KIND: kind}
    if kind == "bins":
        metadata["bin_size_um"] = float(bin_size if bin_size is not None else mpp * diameter)
    if aggregate_to is not None:
        adata, diameter = _aggregate_bins(adata, metadata["bin_size_um"], aggregate_to, diameter, library_id)
        metadata["aggregated_from_um"] = metadata["bin_size_um"]
        metadata["bin_size_um"] = float(aggregate_to)
    if kind != "spots" or mpp_origin != "table":
        mpp_known = mpp
    else:
        mpp_known = _known_mpp(table, diameter)
    adata.obs[C.SECTION_KEY] = pd.Categorical([library_id] * adata.n_obs)

    backed = _backing_store(sdata, image_key, image)
    fullres = None if backed is not None else _to_uint8_hwc(_image_levels(image)[0].data.compute(), image_key)
    hires, hires_scalef = _downscale(image, image_key, HIRES_MAX_SIDE, fullres=fullres)
    lowres, lowres_scalef = _resize_longest(hires, hires_scalef, LOWRES_MAX_SIDE)
    scalefactors: dict[str, Any] = {C.HIRES_SCALEF: hires_scalef, C.LOWRES_SCALEF: lowres_scalef}
    if diameter is not None:
        scalefactors[C.SPOT_DIAMETER] = diameter
    if mpp_known is not None:
        scalefactors[C.MPP] = float(mpp_known)
    images: dict[str, np.ndarray] = {C.HIRES: hires, C.LOWRES: lowres}
    if backed is not None:
        metadata[C.SOURCE_IMAGE_PATH] = backed
        metadata[C.SOURCE_IMAGE_KEY] = image_key
    else:
        images[C.FULLRES] = fullres
    adata.uns[C.SPATIAL_KEY] = {library_id: {C.IMAGES: images, C.SCALEFACTORS: scalefactors, C.METADATA: metadata}}
    info(
        f"    {adata.n_obs} {kind} in a {W} x {H} pixel image (coordinate system {coordinate_system!r})"
        + (f", {mpp_known:.4f} µm/px ({mpp_origin})" if mpp_known is not None else "")
        + "; finished",
        time=start,
    )
    return adata


# ---------------------------------------------------------------------------------------------------------------
_KINDS = ("spots", "bins", "cells")
_BIN_NAME = re.compile(r"square_0*(\d+(?:\.\d+)?)um")


def _check_kind(kind: Any) -> str | None:
    if kind is not None and kind not in _KINDS:
        raise ValueError(f"kind={kind!r} is not valid; choose one of {list(_KINDS)} or None (decided from the data).")
    return kind


def _optional_positive(name: str, value: Any, unit: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"{name} must be a number ({unit}) or None, got {type(value).__name__}.")
    value = float(value)
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number ({unit}) or None, got {value!r}.")
    return value


def _element(sdata: SpatialData, name: str) -> Any:
    return sdata.shapes[name] if name in sdata.shapes else sdata.points[name]


def _geometry_kind(element: Any) -> str:
    """``'circles'``, ``'polygons'`` or ``'points'`` (a points element)."""
    if not hasattr(element, "geometry"):
        return "points"
    return "circles" if _is_circles(element) else "polygons"


def _is_squares(shapes: Any) -> bool:
    """Axis-aligned squares of one size (spatialdata-io's Visium HD bins)."""
    geoms = shapes.geometry
    if len(geoms) == 0 or not (geoms.geom_type == "Polygon").all():
        return False
    b = geoms.bounds.to_numpy(dtype=np.float64)
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    area = geoms.area.to_numpy(dtype=np.float64)
    return bool(
        np.allclose(w, h, rtol=1e-6) and np.allclose(area, w * h, rtol=1e-6) and np.ptp(w) <= 1e-3 * float(np.median(w))
    )


def _guess_kind(geometry: str, element: Any, name: str) -> str:
    lowered = name.lower()
    if geometry == "points":
        return "cells"
    if geometry == "polygons":
        return "bins" if _is_squares(element) else "cells"
    if _BIN_NAME.search(lowered):
        return "bins"
    return "cells" if ("cell" in lowered or "nucle" in lowered) else "spots"


def _bin_size_from_name(*names: str) -> float | None:
    for name in names:
        m = _BIN_NAME.search(str(name).lower())
        if m:
            return float(m.group(1))
    return None


def _element_index(element: Any, geometry: str) -> Any:
    import pandas as pd

    if geometry == "points":
        return pd.Index(element.index.compute())
    return element.index


def _centres_and_sizes(element: Any, geometry: str, kind: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Centres (n, 2) in the element's intrinsic coordinates, and sizes in the same units.

    Sizes: circle diameter, bin side or cell equivalent diameter; ``None`` for points.
    """
    if geometry == "points":
        df = element[["x", "y"]].compute()
        return df.to_numpy(dtype=np.float64), None
    geoms = element.geometry
    if geometry == "circles":
        centres = np.column_stack([geoms.x.to_numpy(), geoms.y.to_numpy()]).astype(np.float64)
        return centres, 2.0 * np.asarray(element["radius"], dtype=np.float64)
    centroids = geoms.centroid
    centres = np.column_stack([centroids.x.to_numpy(), centroids.y.to_numpy()]).astype(np.float64)
    area = geoms.area.to_numpy(dtype=np.float64)
    sizes = np.sqrt(area) if kind == "bins" else 2.0 * np.sqrt(area / np.pi)
    return centres, sizes


def _element_mpp(
    kind: str,
    *,
    mpp: float | None,
    bin_size: float | None,
    diameter: float | None,
    microns_per_unit: float | None,
    px_per_unit: float,
) -> tuple[float | None, str | None]:
    if mpp is not None:
        return mpp, "mpp="
    if kind == "bins" and bin_size is not None and diameter:
        return bin_size / diameter, "bin size"
    if microns_per_unit is not None and px_per_unit > 0:
        return microns_per_unit / px_per_unit, "microns_per_unit"
    if kind == "spots":
        return None, "table"
    return None, None


def _aggregate_bins(
    adata: AnnData, bin_size: float, aggregate_to: float, diameter: float | None, library_id: str
) -> tuple[AnnData, float | None]:
    """Sum bins into squares of ``aggregate_to`` µm; returns the new AnnData and its bin side in pixels."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    factor = aggregate_to / bin_size
    f = round(factor)
    if f < 1 or abs(factor - f) > 1e-6:
        raise ValueError(
            f"aggregate_to={aggregate_to:g} µm must be a whole multiple of the bin size {bin_size:g} µm, e.g. "
            f"{2 * bin_size:g}, {4 * bin_size:g} or {8 * bin_size:g}."
        )
    if C.ARRAY_ROW in adata.obs and C.ARRAY_COL in adata.obs:
        row = pd.to_numeric(adata.obs[C.ARRAY_ROW], errors="coerce").to_numpy()
        col = pd.to_numeric(adata.obs[C.ARRAY_COL], errors="coerce").to_numpy()
        if not (np.isfinite(row).all() and np.isfinite(col).all()):
            raise ValueError(
                "obs['array_row'] / obs['array_col'] of the bins have missing values; drop those bins first."
            )
        row, col = row.astype(np.int64), col.astype(np.int64)
    else:
        if not diameter:
            raise ValueError("aggregate_to needs the bins' side in pixels or obs['array_row'] / obs['array_col'].")
        xy = np.asarray(adata.obsm[C.SPATIAL_KEY], dtype=np.float64)
        col = np.rint((xy[:, 0] - xy[:, 0].min()) / diameter).astype(np.int64)
        row = np.rint((xy[:, 1] - xy[:, 1].min()) / diameter).astype(np.int64)
    r0, c0 = row.min(), col.min()
    keys = np.column_stack([(row - r0) // f, (col - c0) // f])
    uniq, group = np.unique(keys, axis=0, return_inverse=True)
    group = np.asarray(group).ravel()
    n = len(uniq)
    member = sp.csr_matrix(
        (np.ones(adata.n_obs, dtype=np.float32), (group, np.arange(adata.n_obs))), shape=(n, adata.n_obs)
    )
    counts = np.asarray(member.sum(axis=1)).ravel()
    X = member @ (adata.X if sp.issparse(adata.X) else sp.csr_matrix(np.asarray(adata.X)))
    X = sp.csr_matrix(X, dtype=np.float32)
    xy = np.asarray(member @ np.asarray(adata.obsm[C.SPATIAL_KEY], dtype=np.float64)) / counts[:, None]
    tag = f"{aggregate_to:g}um"
    obs = pd.DataFrame(
        {C.ARRAY_ROW: uniq[:, 0], C.ARRAY_COL: uniq[:, 1], "n_bins": counts.astype(np.int64)},
        index=pd.Index([f"{library_id}_{tag}_r{r}_c{c}" for r, c in uniq]),
    )
    out = ad.AnnData(X=X, obs=obs, var=adata.var.copy(), obsm={C.SPATIAL_KEY: xy})
    info(f"    aggregated {adata.n_obs} bins of {bin_size:g} µm into {n} bins of {aggregate_to:g} µm")
    return out, (None if diameter is None else float(diameter * f))


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


def _spatial_elements(sdata: SpatialData) -> dict[str, str]:
    """Shapes and points elements sthist can read, with their geometry (``'circles'``, ``'polygons'``, ``'points'``)."""
    out = {}
    for name, shapes in sdata.shapes.items():
        if _is_circles(shapes):
            out[name] = "circles"
        elif len(shapes) and shapes.geometry.geom_type.isin(["Polygon", "MultiPolygon"]).all():
            out[name] = "polygons"
    for name in sdata.points:
        out[name] = "points"
    return out


def _pick_table_and_shapes(sdata: SpatialData, *, table_key: str | None, shapes_key: str | None) -> tuple[str, str]:
    elements = _spatial_elements(sdata)
    if shapes_key is not None:
        if shapes_key not in sdata.shapes and shapes_key not in sdata.points:
            raise KeyError(
                f"shapes_key={shapes_key!r} is not a shapes or points element; available: shapes "
                f"{list(sdata.shapes)}, points {list(sdata.points)}."
            )
        if shapes_key not in elements:
            raise ValueError(
                f"Shapes element {shapes_key!r} is neither a set of circles (points with a 'radius' column) nor of "
                f"polygons; sthist reads circles, polygons and points. Readable elements: {list(elements)}. Convert "
                "it with `spatialdata.to_circles` or `spatialdata.to_polygons`."
            )
    if not sdata.tables:
        raise ValueError("The SpatialData object has no table: sthist needs the expression in a table.")
    if table_key is not None and table_key not in sdata.tables:
        raise KeyError(f"table_key={table_key!r} is not a table; available: {list(sdata.tables)}.")
    if not elements:
        raise ValueError(
            f"The SpatialData object has no circles, polygons or points element; shapes elements: "
            f"{list(sdata.shapes)}, labels: {list(sdata.labels)}. Convert labels with `spatialdata.to_polygons`."
        )

    wanted = [shapes_key] if shapes_key is not None else list(elements)
    names = [table_key] if table_key is not None else list(sdata.tables)
    candidates = {name: [r for r in _regions(sdata.tables[name]) if r in wanted] for name in names}
    candidates = {name: regions for name, regions in candidates.items() if regions}
    if not candidates:
        target = f"{shapes_key!r}" if shapes_key is not None else f"a shapes or points element {list(elements)}"
        which = f"Table {table_key!r}" if table_key is not None else "No table"
        raise ValueError(
            f"{which} annotates {target} ({_describe_tables(sdata)}). Pass `table_key=`/`shapes_key=` naming a "
            "table and the element it annotates, or link them with `sdata.set_table_annotates_spatialelement`."
        )
    if len(candidates) > 1:
        raise ValueError(
            f"Several tables annotate spots, bins or cells: {', '.join(f'{k!r} -> {v}' for k, v in candidates.items())}. "
            f"Pass `table_key=` (one of {list(candidates)})."
        )
    ((table_key, regions),) = candidates.items()
    if len(regions) > 1:
        kinds = {elements[r] for r in regions}
        noun = f"{kinds.pop()} " if len(kinds) == 1 else ""
        raise ValueError(
            f"Table {table_key!r} annotates several {noun}elements {regions}: pass `shapes_key=` (one of {regions})."
        )
    return table_key, regions[0]


def _pick_image(sdata: SpatialData, *, image_key: str | None, shapes_key: str) -> tuple[str, str]:
    from spatialdata.transformations import get_transformation

    shapes_cs = set(get_transformation(_element(sdata, shapes_key), get_all=True))

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
            f"No image shares a coordinate system with {shapes_key!r} (coordinate systems "
            f"{sorted(shapes_cs)}); images and theirs: {images}. Set a transformation of the image or the spots to a "
            "common coordinate system with `spatialdata.transformations.set_transformation`."
        )
    if len(names) > 1:
        sizes = ", ".join(f"{n!r} {tuple(_image_levels(sdata.images[n])[0].shape)}" for n in names)
        raise ValueError(
            f"Several images lie in the coordinate system of {shapes_key!r}: {sizes} (c, y, x). "
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
