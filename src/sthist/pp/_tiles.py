"""Pseudo-spots on a slide without spots: :func:`tile_tissue` (tissue detection, then a square grid).

Tissue is detected on a low-resolution view of the slide, never on level 0 as a whole:

- a pyramidal TIFF / OME-TIFF is read at the pyramid level closest to (and not coarser than) the wanted
  detection resolution, through :mod:`tifffile`'s zarr store, band by band;
- an openslide slide is read at the best ``level_downsamples`` entry with ``read_region``;
- anything else (a single-level TIFF, JPEG / PNG, a numpy or dask array) is read at full resolution in bands of
  rows, each band averaged down at once, so that memory stays bounded by one band.

The view is reduced by an integer factor so that a pseudo-spot is about :data:`DETECT_PX_PER_SPOT` pixels wide
(at least :data:`DETECT_MIN_SIDE` pixels on the long side, at most :data:`DETECT_MAX_SIDE`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import _constants as C
from .._anndata import mpp_unknown_message, resolve_mpp
from .._logging import info
from ._image import ImageSource, Level, open_image

if TYPE_CHECKING:
    from anndata import AnnData

#: Default pseudo-spot side (µm): HEST's 224 px patches at 0.5 µm/px.
DEFAULT_SPOT_DIAMETER = 112.0
#: Wanted width of one pseudo-spot in the detection image (pixels).
DETECT_PX_PER_SPOT = 8
#: The detection image is at least this many pixels on its long side (unless the slide is smaller) ...
DETECT_MIN_SIDE = 1024
#: ... and at most this many (bounds its memory: ~50 bytes per pixel while detecting).
DETECT_MAX_SIDE = 8192
#: Bytes of full-resolution pixels read at once when averaging a level down.
BAND_BYTES = 32 * 2**20
#: Saturation threshold: Otsu's value clipped to this range (glass < 0.04 < pale tissue; stained tissue > 0.15).
SATURATION_RANGE = (0.04, 0.15)
#: A pixel whose three channels are all at least this bright is background (glass).
WHITE_LEVEL = 220
#: A pixel whose brightest channel is at most this dark is background (pen marks, scanner borders).
BLACK_LEVEL = 50
#: Tissue components and holes smaller than this fraction of a pseudo-spot's area are removed / filled.
MIN_REGION_FRACTION = 0.25

_FN = "sthist.pp.tile_tissue"
TILES_KEY = "tile_tissue"  # uns[TILES_KEY]["params"]


# --------------------------------------------------------------------------------------------- low-res views


def _reduce(level: Level, f: int) -> np.ndarray:
    """Average ``level`` over ``f`` x ``f`` blocks, band by band; the last blocks are padded with white."""
    H, W = level.shape
    h, w = -(-H // f), -(-W // f)
    out = np.empty((h, w, 3), dtype=np.uint8)
    rows = max(1, BAND_BYTES // (f * W * 3))  # output rows per band
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)
        y0, y1 = r0 * f, min(H, r1 * f)
        band = level.read(y0, y1)
        if f == 1:
            out[r0:r1] = band
            continue
        padded = np.full(((r1 - r0) * f, w * f, 3), 255, dtype=np.uint8)
        padded[: y1 - y0, :W] = band
        del band
        sums = padded.reshape(r1 - r0, f, w, f, 3).sum(axis=(1, 3), dtype=np.uint32)
        out[r0:r1] = ((sums + f * f // 2) // (f * f)).astype(np.uint8)
    return out


def _low_res_view(src: ImageSource, spot_px: float) -> tuple[np.ndarray, tuple[float, float], dict]:
    """An RGB view of the whole slide for detection; returns it, its pixel size (dy, dx) in level-0 px, a record."""
    H0, W0 = src.shape
    longest = max(H0, W0)
    want = min(spot_px / DETECT_PX_PER_SPOT, longest / DETECT_MIN_SIDE)
    want = max(1.0, want, longest / DETECT_MAX_SIDE)
    levels = src.levels()
    # the coarsest level that is not coarser than wanted (level 0 always qualifies)
    fine_enough = [lv for lv in levels if max(lv.downsample) <= want * 1.01] or levels[:1]
    level = max(fine_enough, key=lambda lv: max(lv.downsample))
    f = max(1, round(want / max(level.downsample)))
    f = max(f, math.ceil(max(level.shape) / DETECT_MAX_SIDE))
    view = _reduce(level, f)
    pixel = (level.downsample[0] * f, level.downsample[1] * f)
    record = {
        "detection_level": level.name,
        "detection_reduction": int(f),
        "detection_shape": [int(view.shape[0]), int(view.shape[1])],
        "detection_pixel_size": [float(pixel[0]), float(pixel[1])],
    }
    return view, pixel, record


# --------------------------------------------------------------------------------------------- tissue mask


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1] (maximal between-class variance of a histogram)."""
    hist = np.bincount(np.minimum((values * bins).astype(np.int64), bins - 1).ravel(), minlength=bins).astype(float)
    centres = (np.arange(bins) + 0.5) / bins
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (m0 / w0 - (m0[-1] - m0) / w1) ** 2 * w0 * w1
    between = np.nan_to_num(between[:-1])
    return float((np.argmax(between) + 1) / bins) if between.max() > 0 else float(SATURATION_RANGE[0])


def _disk(r: int) -> np.ndarray:
    y, x = np.ogrid[-r : r + 1, -r : r + 1]
    return x * x + y * y <= r * r


def _drop_small(mask: np.ndarray, min_px: float) -> np.ndarray:
    """Remove connected components (8-connected) smaller than ``min_px`` pixels."""
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_px
    keep[0] = False
    return keep[labels]


def detect_tissue(rgb: np.ndarray, *, min_region_px: float = 0.0) -> tuple[np.ndarray, float]:
    """Tissue mask of an RGB (h, w, 3) uint8 view of a slide; returns the mask and the saturation threshold.

    Saturation (HSV, ``(max - min) / max``) above Otsu's threshold clipped to :data:`SATURATION_RANGE`, excluding
    near-white (all channels >= :data:`WHITE_LEVEL`) and near-black (max <= :data:`BLACK_LEVEL`) pixels; then a
    binary closing (disk of radius 2 px) and opening (radius 1 px), and removal of tissue components and filling
    of holes smaller than ``min_region_px`` pixels.
    """
    from scipy import ndimage

    mx = rgb.max(axis=-1)
    mn = rgb.min(axis=-1)
    sat = (mx - mn).astype(np.float32)
    sat /= np.maximum(mx, 1)
    threshold = float(np.clip(_otsu(sat), *SATURATION_RANGE))
    mask = sat > threshold
    del sat
    mask &= mn < WHITE_LEVEL
    mask &= mx > BLACK_LEVEL
    del mx, mn
    mask = ndimage.binary_closing(mask, structure=_disk(2), border_value=0)
    mask = ndimage.binary_opening(mask, structure=_disk(1), border_value=0)
    if min_region_px > 1:
        mask = _drop_small(mask, min_region_px)
        mask = ~_drop_small(~mask, min_region_px)
    return mask, threshold


def _check_mask(tissue_mask: Any, shape: tuple[int, int]) -> np.ndarray:
    """A user mask as bool (h, w) covering the slide of ``shape`` (H, W)."""
    mask = np.asarray(tissue_mask)
    if mask.ndim != 2:
        raise ValueError(
            f"tissue_mask must be a 2-D boolean array (height, width) covering the whole slide, got shape {mask.shape}."
        )
    if mask.dtype != bool:
        if not (np.issubdtype(mask.dtype, np.integer) and np.isin(mask, (0, 1)).all()):
            raise TypeError(
                f"tissue_mask must be boolean (True = tissue) or hold only 0 and 1; got dtype {mask.dtype}. "
                "Use e.g. `mask > 0`."
            )
        mask = mask.astype(bool)
    H, W = shape
    h, w = mask.shape
    if min(h, w) == 0 or abs((W / w) / (H / h) - 1) > 0.05:
        hint = " It looks transposed: pass `tissue_mask.T`." if abs((W / h) / (H / w) - 1) <= 0.05 else ""
        raise ValueError(
            f"tissue_mask has shape {mask.shape} but the slide is {W} x {H} px (height {H}, width {W}): the mask must "
            f"cover the whole slide at any resolution, with the slide's aspect ratio.{hint}"
        )
    return mask


def _tissue_fraction(
    mask: np.ndarray, pixel: tuple[float, float], cx: np.ndarray, cy: np.ndarray, side: float
) -> np.ndarray:
    """Exact fraction of each ``side`` x ``side`` square (level-0 px) that the mask covers (outside: no tissue).

    Mask pixel ``(i, j)`` covers level-0 edges ``[j * dx - 0.5, (j + 1) * dx - 0.5)`` (rows alike). The integral of
    the piecewise-constant mask over a rectangle is the bilinear interpolation of its summed-area table.
    """
    h, w = mask.shape
    dy, dx = pixel
    sat = np.zeros((h + 1, w + 1), dtype=np.float64)
    np.cumsum(np.cumsum(mask, axis=0, dtype=np.float64), axis=1, out=sat[1:, 1:])

    def integral(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        u, v = np.clip(u, 0, w), np.clip(v, 0, h)
        i, j = np.minimum(u.astype(np.int64), w - 1), np.minimum(v.astype(np.int64), h - 1)
        s, t = u - i, v - j
        return (
            sat[j, i] * (1 - s) * (1 - t)
            + sat[j, i + 1] * s * (1 - t)
            + sat[j + 1, i] * (1 - s) * t
            + sat[j + 1, i + 1] * s * t
        )

    u0, u1 = (cx - side / 2 + 0.5) / dx, (cx + side / 2 + 0.5) / dx
    v0, v1 = (cy - side / 2 + 0.5) / dy, (cy + side / 2 + 0.5) / dy
    area = integral(u1, v1) - integral(u0, v1) - integral(u1, v0) + integral(u0, v0)
    return np.clip(area / ((u1 - u0) * (v1 - v0)), 0.0, 1.0)


def _thumbnail(view: np.ndarray, pixel: tuple[float, float], shape: tuple[int, int], size: int):
    """The view resized to at most ``size`` px on the long side, cropped to the slide; returns it and its scale."""
    from PIL import Image

    H0, W0 = shape
    h, w = view.shape[:2]
    extent = (W0 / pixel[1], H0 / pixel[0])  # the slide in view pixels (the view may be padded beyond it)
    scale = min(size, max(extent)) / max(H0, W0)
    tw, th = max(1, round(W0 * scale)), max(1, round(H0 * scale))
    img = Image.fromarray(view).resize(
        (tw, th), resample=Image.Resampling.BOX, box=(0.0, 0.0, min(w, extent[0]), min(h, extent[1]))
    )
    return np.asarray(img, dtype=np.uint8), scale


# --------------------------------------------------------------------------------------------- public


def _positive(name: str, value: Any, unit: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"{name} must be a number ({unit}), got {type(value).__name__}.")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number of {unit}, got {value!r}.")
    return value


def tile_tissue(
    image: Any,
    *,
    spot_diameter: float = DEFAULT_SPOT_DIAMETER,
    spacing: float | None = None,
    mpp: float | None = None,
    min_tissue: float = 0.5,
    tissue_mask: Any = None,
    image_key: str | None = None,
    library_id: str = "slide",
    thumbnail_size: int = 2000,
) -> AnnData:
    """Cover the tissue of a slide without spots with a square grid of pseudo-spots.

    Tissue is detected on a low-resolution view of the slide (a pyramid level of a TIFF / OME-TIFF or openslide
    slide; for other inputs full-resolution rows averaged down band by band, so level 0 is never held whole):
    HSV saturation above Otsu's threshold (clipped to [0.04, 0.15]), not near-white (all channels >= 220) and not
    near-black (max <= 50, pen marks and scanner borders), then a binary closing (radius 2 px) and opening
    (radius 1 px) with :mod:`scipy.ndimage`, and removal of specks and filling of holes smaller than a quarter
    of a pseudo-spot. The view has about 8 pixels per pseudo-spot (1,024 to 8,192 px on its long side).

    The grid has a pitch of ``spacing / mpp`` level-0 pixels, starting at the image's top-left corner: cell
    ``(r, c)`` has its centre at ``x = (c + 0.5) * pitch - 0.5``, ``y = (r + 0.5) * pitch - 0.5`` (pixel ``i``
    covers ``[i - 0.5, i + 0.5)``). A pseudo-spot is the square of side ``spot_diameter`` around that centre; it is
    kept when at least ``min_tissue`` of its area is tissue (measured exactly on the mask; parts outside the
    slide count as background).

    Parameters
    ----------
    image
        The slide: a path (TIFF / OME-TIFF, .svs / .ndpi / ... through openslide, JPEG, PNG, or a SpatialData
        ``.zarr`` store with ``image_key``), a numpy or dask array (H, W, 3) uint8, a spatialdata image or a
        ``SpatialData`` object, as for :func:`sthist.pp.extract_patches`.
    spot_diameter
        Side of the square pseudo-spots in µm. Default 112 µm: HEST's patches of 224 px at 0.5 µm/px.
    spacing
        Centre-to-centre distance of the grid in µm; ``None``: ``spot_diameter`` (squares that tile the tissue
        without gaps or overlap).
    mpp
        Microns per pixel of the full-resolution image; ``None`` reads it from the file (OME-TIFF
        ``PhysicalSizeX``, openslide ``mpp-x``), by the rule :func:`sthist.pp.extract_patches` uses too. Needed
        for arrays and files without that metadata; the error then shows the slide's size at common resolutions.
    min_tissue
        Fraction of a pseudo-spot's square that must be tissue, in [0, 1]. ``0`` keeps the whole grid.
    tissue_mask
        A boolean array (True = tissue) covering the whole slide at any resolution (e.g. from QuPath or a
        thumbnail), used instead of the detection.
    image_key
        Name of the image element when ``image`` is a SpatialData object or store.
    library_id
        Library name in ``uns['spatial']``.
    thumbnail_size
        Longest side in pixels of the thumbnail stored as the ``'hires'`` image (smaller if the detection view is).

    Returns
    -------
    A new AnnData with no genes (``n_vars == 0``) and one observation per pseudo-spot, in row-major grid order:

    ``obs['array_row']``, ``obs['array_col']``
        int grid indices of the pseudo-spot.
    ``obs['tissue_fraction']``
        float32 fraction of the square that is tissue, in [``min_tissue``, 1].
    ``obs['in_tissue']``
        int 1 where at least half of the square is tissue, else 0 (Visium's flag).
    ``obsm['spatial']``
        float64 centres (x, y) in level-0 pixels.
    ``uns['spatial'][library_id]``
        ``images['hires']`` (uint8 thumbnail), ``scalefactors`` (``tissue_hires_scalef``,
        ``spot_diameter_fullres = spot_diameter / mpp``, ``microns_per_pixel``) and ``metadata``
        (``source_image_path`` for a file; for a numpy array ``images['fullres']`` holds the array itself). Other
        inputs (dask arrays, SpatialData objects) are not stored: pass ``image=`` to
        :func:`~sthist.pp.extract_patches`.
    ``uns['tile_tissue']['params']``
        the settings (with ``mpp_origin``: ``"mpp="`` or the file's metadata), the pitch in pixels, the detection
        view and the saturation threshold.

    :func:`sthist.pp.extract_patches` and ``squidpy.pl.spatial_scatter(tiles, library_id=library_id,
    shape='square')`` work directly on the result.

    Examples
    --------
    >>> tiles = sthist.pp.tile_tissue("slide.ome.tif", spot_diameter=112)  # doctest: +SKIP
    >>> sthist.pp.extract_patches(tiles, patch_size=224, mpp=0.5)  # doctest: +SKIP
    """
    spot_diameter = _positive("spot_diameter", spot_diameter, "µm (side of a pseudo-spot)")
    spacing = spot_diameter if spacing is None else _positive("spacing", spacing, "µm (centre-to-centre distance)")
    if mpp is not None:
        mpp = _positive("mpp", mpp, "microns per pixel")
    if isinstance(min_tissue, bool) or not isinstance(min_tissue, int | float | np.integer | np.floating):
        raise TypeError(f"min_tissue must be a fraction in [0, 1], got {type(min_tissue).__name__}.")
    if not 0 <= float(min_tissue) <= 1:
        raise ValueError(f"min_tissue must be a fraction in [0, 1] of the pseudo-spot's area, got {min_tissue!r}.")
    min_tissue = float(min_tissue)
    if isinstance(thumbnail_size, bool) or not isinstance(thumbnail_size, int | np.integer) or thumbnail_size < 16:
        raise ValueError(f"thumbnail_size must be an integer number of pixels >= 16, got {thumbnail_size!r}.")
    if not isinstance(library_id, str) or not library_id:
        raise ValueError(f"library_id must be a non-empty string, got {library_id!r}.")

    path = Path(image).expanduser() if isinstance(image, str | os.PathLike) else None
    with open_image(image, image_key=image_key, what="image") as src:
        H, W = src.shape
        mpp, mpp_origin = resolve_mpp(given=mpp, source_mpp=src.mpp)
        if mpp is None:
            raise ValueError(
                mpp_unknown_message(
                    f"{src.description} (no OME PhysicalSizeX or openslide mpp-x in the file)",
                    shape=src.shape,
                    fix="Pass mpp= with the scanner's µm per pixel (in the slide's metadata or the scanner report).",
                )
            )
        mask = None if tissue_mask is None else _check_mask(tissue_mask, (H, W))
        pitch, side = spacing / mpp, spot_diameter / mpp
        if side > min(H, W):
            raise ValueError(
                f"spot_diameter={spot_diameter} µm is {side:.0f} px at {mpp} µm/px, larger than the slide "
                f"({W} x {H} px): choose a smaller spot_diameter or check mpp."
            )
        start = info(f"tiling the tissue of a {W} x {H} px slide with {spot_diameter} µm pseudo-spots")
        view, pixel, record = _low_res_view(src, side)
        description = src.description
    threshold = None
    if mask is None:
        min_region = MIN_REGION_FRACTION * (side / pixel[0]) * (side / pixel[1])
        mask, threshold = detect_tissue(view, min_region_px=min_region)
        mask_pixel = pixel
    else:
        mask_pixel = (H / mask.shape[0], W / mask.shape[1])
    hires, scalef = _thumbnail(view, pixel, (H, W), int(thumbnail_size))
    del view

    cols = (np.arange(math.ceil(W / pitch)) + 0.5) * pitch - 0.5
    rows = (np.arange(math.ceil(H / pitch)) + 0.5) * pitch - 0.5
    cols, rows = cols[cols < W - 0.5], rows[rows < H - 0.5]
    rr, cc = np.meshgrid(np.arange(len(rows)), np.arange(len(cols)), indexing="ij")
    rr, cc = rr.ravel(), cc.ravel()
    cx, cy = cols[cc], rows[rr]
    fraction = _tissue_fraction(mask, mask_pixel, cx, cy, side)
    tissue_area = float(mask.mean())
    del mask
    keep = fraction >= min_tissue
    if not keep.any():
        raise ValueError(
            f"no pseudo-spot of {spot_diameter} µm has at least min_tissue={min_tissue} of its area on tissue "
            f"(best: {fraction.max():.2f}; {'the given tissue_mask' if tissue_mask is not None else 'the detected tissue'}"
            f" covers {tissue_area:.1%} of the slide). Lower min_tissue, pass a tissue_mask=, or check mpp={mpp} "
            "and that the image shows stained tissue on a bright background."
        )

    import anndata as ad
    import pandas as pd

    rr, cc, cx, cy, fraction = rr[keep], cc[keep], cx[keep], cy[keep], fraction[keep].astype(np.float32)
    obs = pd.DataFrame(
        {
            C.ARRAY_ROW: rr.astype(np.int64),
            C.ARRAY_COL: cc.astype(np.int64),
            "tissue_fraction": fraction,
            "in_tissue": (fraction >= 0.5).astype(np.int64),
        },
        index=pd.Index([f"tile_r{r}_c{c}" for r, c in zip(rr, cc, strict=True)]),
    )
    images: dict[str, Any] = {C.HIRES: hires}
    metadata: dict[str, Any] = {}
    if path is not None:
        metadata[C.SOURCE_IMAGE_PATH] = str(path.resolve())
        if image_key is not None:
            metadata[C.SOURCE_IMAGE_KEY] = image_key
    elif isinstance(image, np.ndarray):
        images[C.FULLRES] = image
    lib_entry = {
        C.IMAGES: images,
        C.SCALEFACTORS: {C.HIRES_SCALEF: float(scalef), C.SPOT_DIAMETER: float(side), C.MPP: float(mpp)},
        C.METADATA: metadata,
    }
    params = {
        "spot_diameter": spot_diameter,
        "spacing": spacing,
        "mpp": float(mpp),
        "mpp_origin": mpp_origin,
        "pitch_px": float(pitch),
        "spot_diameter_px": float(side),
        "min_tissue": min_tissue,
        "tissue_mask": tissue_mask is not None,
        "saturation_threshold": -1.0 if threshold is None else threshold,
        "tissue_area_fraction": tissue_area,
        "grid_shape": [len(rows), len(cols)],
        "library_id": library_id,
        "image_source": description,
        **record,
    }
    adata = ad.AnnData(
        obs=obs,
        obsm={C.SPATIAL_KEY: np.column_stack([cx, cy]).astype(np.float64)},
        uns={C.SPATIAL_KEY: {library_id: lib_entry}, TILES_KEY: {"params": params}},
    )
    info(
        "    finished",
        time=start,
        deep=(
            f"{adata.n_obs} pseudo-spots of {len(rows) * len(cols)} grid cells ({tissue_area:.1%} of the slide is "
            f"tissue)\nadded\n    'spatial' (adata.obsm), 'spatial' and {TILES_KEY!r} (adata.uns)"
        ),
    )
    return adata
