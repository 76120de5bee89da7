"""Full-resolution image sources for patch extraction: one small reader class per backend.

Every source exposes ``shape`` (height, width), ``description`` (for the record in ``uns``), ``mpp`` (microns
per pixel found in the file itself, or ``None``), ``block_shape`` (the block it reads and caches, used to visit
spots in tile order; ``None`` for in-memory images) and ``read_region(x0, y0, w, h)``, which returns uint8
``(h, w, 3)`` and pads whatever lies outside the image with ``pad_value``.

Backends

- :class:`ArraySource`: an in-memory numpy array (H, W, 3).
- :class:`PILSource`: JPEG / PNG files. JPEG cannot be decoded region by region, so the file is decoded once,
  on the first read, and kept (as a PIL image, cropped per spot) for all spots of the library.
- :class:`TiffSource`: TIFF / OME-TIFF / BigTIFF through :mod:`tifffile` as a zarr store at level 0. Only the
  tiles (or strips) a patch touches are decoded; decoded blocks are kept in a small LRU cache, so visiting spots
  in row-major tile order decodes each tile about once. A gigapixel slide is never decoded whole.
- :class:`OpenSlideSource`: whole-slide formats (.svs, .ndpi, .mrxs, .scn, ...) through openslide at level 0.
- :class:`DaskSource`: a dask array (H, W, 3), also what spatialdata images (``xarray`` (c, y, x)) become;
  reads block by block, with the same LRU cache.

:func:`open_image` picks the backend for an object or a path.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

#: Memory budget of the decoded-block cache of tiled sources (bytes).
CACHE_BYTES = 128 * 2**20
#: A non-tiled (strip) TIFF up to this size (decoded bytes) is read whole; larger ones strip band by band.
SMALL_TIFF_BYTES = 64 * 2**20
#: Blocks are at least this many pixels high and wide (multiples of the file's own tiles / strips / chunks).
MIN_BLOCK = 256

PIL_SUFFIXES = (".jpg", ".jpeg", ".png")
TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8", ".tf2")
OPENSLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".dcm")
# whole-slide formats that are TIFF inside: tifffile can read them when openslide cannot
_TIFF_LIKE_SLIDES = (".svs", ".ndpi", ".scn", ".bif", ".svslide")

_CONVERT_HINT = (
    "sthist needs an 8-bit RGB image (H, W, 3) uint8. Convert it once, e.g. for an array "
    "`img8 = (img / img.max() * 255).round().astype(np.uint8)` (16-bit: `(img // 257).astype(np.uint8)`; "
    "float in [0, 1]: `(np.clip(img, 0, 1) * 255).round().astype(np.uint8)`), and for a large file write a tiled "
    "8-bit RGB TIFF, e.g. `vips cast in.tif out.tif uchar` or `tifffile.imwrite('out.tif', img8, tile=(256, 256), "
    "compression='jpeg')`."
)


class Level:
    """One resolution level of a source.

    ``shape`` (H, W), ``downsample`` (dy, dx) from level 0, a ``name``, and ``read(y0, y1)``, which returns the
    uint8 rows ``y0:y1`` of the level as ``(y1 - y0, W, 3)``.
    """

    def __init__(self, shape: tuple[int, int], downsample: tuple[float, float], read: Callable, name: str):
        self.shape = (int(shape[0]), int(shape[1]))
        self.downsample = (float(downsample[0]), float(downsample[1]))
        self.read = read
        self.name = name


class ImageSource:
    """Base class: a full-resolution RGB image that can be read region by region.

    Subclasses set ``shape`` (height, width) and implement ``_read(x0, y0, x1, y1)`` for regions inside the image.
    """

    shape: tuple[int, int]
    description: str = "image"
    mpp: float | None = None
    block_shape: tuple[int, int] | None = None
    pad_value: int = 255

    def read_region(self, x0: int, y0: int, w: int, h: int, *, pad_value: int | None = None) -> np.ndarray:
        """Read the ``w`` x ``h`` region whose top-left pixel is column ``x0``, row ``y0``.

        Returns uint8 ``(h, w, 3)``; pixels outside the image are ``pad_value`` (default: the source's).
        """
        pad = self.pad_value if pad_value is None else pad_value
        H, W = self.shape
        x0, y0, w, h = int(x0), int(y0), int(w), int(h)
        x1, y1 = x0 + w, y0 + h
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, W), min(y1, H)
        if (cx0, cy0, cx1, cy1) == (x0, y0, x1, y1):
            return np.ascontiguousarray(self._read(x0, y0, x1, y1, pad), dtype=np.uint8)
        out = np.full((h, w, 3), pad, dtype=np.uint8)
        if cx0 < cx1 and cy0 < cy1:
            out[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = self._read(cx0, cy0, cx1, cy1, pad)
        return out

    def _read(self, x0: int, y0: int, x1: int, y1: int, pad: int) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def release_above(self, y: int) -> None:
        """Forget cached pixels of rows above ``y``: the caller will not read them again (row-major visits)."""

    def levels(self) -> list[Level]:
        """The resolution levels, finest first; a source without a pyramid has level 0 only (read in row bands)."""
        H, W = self.shape

        def read(y0: int, y1: int) -> np.ndarray:
            return self.read_region(0, y0, W, y1 - y0, pad_value=255)

        return [Level((H, W), (1.0, 1.0), read, f"level 0 ({W} x {H} px, {self.description})")]

    def close(self) -> None:
        """Release files held open by the source."""

    def __enter__(self) -> ImageSource:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.shape[1]} x {self.shape[0]} px: {self.description}>"


# --------------------------------------------------------------------------------------------- validation


def check_pixels(shape: tuple[int, ...], dtype: Any, *, what: str, channel_last: bool = True) -> None:
    """Raise unless an image of ``shape`` / ``dtype`` is 8-bit RGB (the fix is in the message)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 2 or (len(shape) == 3 and shape[-1 if channel_last else 0] == 1):
        raise ValueError(
            f"{what} is grayscale (shape {shape}); patches for H&E models must be RGB. Convert it, e.g. "
            "`np.repeat(img.reshape(img.shape[0], img.shape[1], 1), 3, axis=-1)` for an array or "
            "`PIL.Image.open(path).convert('RGB').save('rgb.png')` for a file."
        )
    if len(shape) != 3:
        raise ValueError(f"{what} has shape {shape}; expected a 2-D RGB image (height, width, 3).")
    n_channels = shape[-1] if channel_last else shape[0]
    if channel_last and shape[0] in (3, 4) and shape[-1] not in (3, 4):
        raise ValueError(
            f"{what} has shape {shape}, which looks channel-first (c, y, x); pass `img.transpose(1, 2, 0)` "
            "to get (height, width, 3)."
        )
    if n_channels == 4:
        raise ValueError(
            f"{what} has 4 channels (RGBA, shape {shape}); sthist needs RGB. Drop the alpha channel, e.g. "
            "`img[..., :3]` for an array, `PIL.Image.open(path).convert('RGB').save('rgb.png')` for a small file, "
            "or `vips extract_band in.tif out.tif 0 --n 3` for a large one."
        )
    if n_channels != 3:
        raise ValueError(f"{what} has {n_channels} channels (shape {shape}); sthist needs an RGB image with 3.")
    dtype = np.dtype(dtype)
    if dtype != np.uint8:
        raise TypeError(f"{what} has dtype {dtype}. {_CONVERT_HINT}")


# --------------------------------------------------------------------------------------------- in memory


class ArraySource(ImageSource):
    """An in-memory numpy array (H, W, 3) uint8."""

    def __init__(self, array: np.ndarray, *, description: str = "numpy array", what: str = "the image"):
        array = np.asarray(array)
        check_pixels(array.shape, array.dtype, what=what)
        self._array = array
        self.shape = (int(array.shape[0]), int(array.shape[1]))
        self.description = description

    def _read(self, x0: int, y0: int, x1: int, y1: int, pad: int) -> np.ndarray:
        return self._array[y0:y1, x0:x1]


# --------------------------------------------------------------------------------------------- block cache


class _BlockSource(ImageSource):
    """A source read in aligned blocks (``block_shape``), with an LRU cache bounded in bytes."""

    cache_bytes: int = CACHE_BYTES

    def _init_cache(self, block_shape: tuple[int, int], cache_bytes: int | None = None) -> None:
        self.block_shape = (max(1, int(block_shape[0])), max(1, int(block_shape[1])))
        if cache_bytes is not None:
            self.cache_bytes = int(cache_bytes)
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cached = 0
        self.blocks_read = 0  # how many blocks were decoded (tests and benchmarks look at it)

    def _load(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _block(self, by: int, bx: int) -> np.ndarray:
        key = (by, bx)
        blk = self._cache.get(key)
        if blk is not None:
            self._cache.move_to_end(key)
            return blk
        bh, bw = self.block_shape
        H, W = self.shape
        blk = self._load(bx * bw, by * bh, min((bx + 1) * bw, W), min((by + 1) * bh, H))
        self.blocks_read += 1
        self._cache[key] = blk
        self._cached += blk.nbytes
        while self._cached > self.cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached -= old.nbytes
        return blk

    def _read(self, x0: int, y0: int, x1: int, y1: int, pad: int) -> np.ndarray:
        bh, bw = self.block_shape
        by0, by1 = y0 // bh, (y1 - 1) // bh
        bx0, bx1 = x0 // bw, (x1 - 1) // bw
        if by0 == by1 and bx0 == bx1:
            blk = self._block(by0, bx0)
            return blk[y0 - by0 * bh : y1 - by0 * bh, x0 - bx0 * bw : x1 - bx0 * bw]
        out = np.empty((y1 - y0, x1 - x0, 3), dtype=np.uint8)
        for by in range(by0, by1 + 1):
            ty0, ty1 = max(y0, by * bh), min(y1, (by + 1) * bh)
            for bx in range(bx0, bx1 + 1):
                tx0, tx1 = max(x0, bx * bw), min(x1, (bx + 1) * bw)
                blk = self._block(by, bx)
                out[ty0 - y0 : ty1 - y0, tx0 - x0 : tx1 - x0] = blk[
                    ty0 - by * bh : ty1 - by * bh, tx0 - bx * bw : tx1 - bx * bw
                ]
        return out

    def release_above(self, y: int) -> None:
        bh = self.block_shape[0]
        for key in [k for k in self._cache if (k[0] + 1) * bh <= y]:
            self._cached -= self._cache.pop(key).nbytes

    def close(self) -> None:
        self._cache.clear()
        self._cached = 0


def _block_from_chunks(chunk_h: int, chunk_w: int) -> tuple[int, int]:
    """Smallest multiple of the chunk shape that is at least ``MIN_BLOCK`` in both directions."""
    return chunk_h * math.ceil(MIN_BLOCK / chunk_h), chunk_w * math.ceil(MIN_BLOCK / chunk_w)


class DaskSource(_BlockSource):
    """A dask array (H, W, 3) uint8, read block by block along its chunks (each chunk computed about once)."""

    def __init__(self, array: Any, *, description: str = "dask array", what: str = "the image", cache_bytes=None):
        check_pixels(array.shape, array.dtype, what=what)
        self._array = array
        self.shape = (int(array.shape[0]), int(array.shape[1]))
        self.description = description
        chunk_h, chunk_w = int(array.chunks[0][0]), int(array.chunks[1][0])
        block = _block_from_chunks(chunk_h, chunk_w)
        block = (min(block[0], self.shape[0]), min(block[1], self.shape[1]))
        # a chunk is computed whole anyway: keep at least two blocks so that no chunk is computed per spot
        budget = max(CACHE_BYTES if cache_bytes is None else int(cache_bytes), 2 * block[0] * block[1] * 3)
        self._init_cache(block, budget)

    def _load(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        return np.asarray(self._array[y0:y1, x0:x1, :].compute(scheduler="synchronous"), dtype=np.uint8)


# --------------------------------------------------------------------------------------------- files


@contextmanager
def _no_pil_bomb_limit():
    """Let PIL open large slides: the decompression-bomb guard is meant for untrusted web images."""
    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


class PILSource(ImageSource):
    """A JPEG or PNG file, decoded once (on the first read) with PIL and kept in memory."""

    _OK = ("RGB",)
    _CONVERT = ("P", "CMYK", "YCbCr", "LAB", "HSV", "RGBX")
    _GRAY = ("1", "L", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")
    _ALPHA = ("RGBA", "RGBa", "LA", "La", "PA")

    def __init__(self, path: str | os.PathLike, *, what: str = "the image"):
        from PIL import Image

        self.path = Path(path)
        with _no_pil_bomb_limit():
            self._im = Image.open(self.path)
        mode = self._im.mode
        self.shape = (int(self._im.height), int(self._im.width))
        what = f"{what} ({self.path.name}, PIL mode {mode!r})"
        if mode in self._GRAY:
            self._im.close()
            if mode not in ("1", "L"):
                raise TypeError(f"{what} is a grayscale image with more than 8 bits. {_CONVERT_HINT}")
            check_pixels(self.shape, np.uint8, what=what)
        if mode in self._ALPHA:
            self._im.close()
            check_pixels((*self.shape, 4), np.uint8, what=what)
        if mode not in self._OK + self._CONVERT:
            self._im.close()
            raise TypeError(f"{what} is not 8-bit RGB. {_CONVERT_HINT}")
        self._mode = mode
        self._loaded: Any = None
        fmt = (self._im.format or self.path.suffix.lstrip(".")).upper()
        self.description = f"{fmt} file {self.path} (PIL, decoded once)"

    def load(self) -> Any:
        """Decode the whole file (once) and return the decoded RGB ``PIL.Image``."""
        if self._loaded is None:
            with _no_pil_bomb_limit():
                self._im.load()
                self._loaded = self._im if self._mode == "RGB" else self._im.convert("RGB")
        return self._loaded

    def _read(self, x0: int, y0: int, x1: int, y1: int, pad: int) -> np.ndarray:
        # crop the decoded image in PIL: converting only the crop to numpy avoids copying the whole slide
        return np.asarray(self.load().crop((x0, y0, x1, y1)))

    def close(self) -> None:
        if self._loaded is not None and self._loaded is not self._im:
            self._loaded.close()
        self._loaded = None
        self._im.close()


def _ome_mpp(tif: Any) -> float | None:
    """Microns per pixel from the OME-XML ``PhysicalSizeX`` of the first image, if present."""
    xml = getattr(tif, "ome_metadata", None)
    if not xml:
        return None
    try:
        import xml.etree.ElementTree as ET

        root = ET.fromstring(xml)
        for el in root.iter():
            if el.tag.endswith("Pixels") and "PhysicalSizeX" in el.attrib:
                size = float(el.attrib["PhysicalSizeX"])
                unit = el.attrib.get("PhysicalSizeXUnit", "µm")
                factor = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}.get(unit)
                return size * factor if factor and size > 0 else None
    except Exception:  # broken metadata only means "unknown"
        return None
    return None


class TiffSource(_BlockSource):
    """A TIFF / OME-TIFF / BigTIFF read at level 0 through tifffile's zarr store, block by block.

    Tiled and pyramidal files decode only the tiles a patch touches. Strip (non-tiled) files up to
    ``SMALL_TIFF_BYTES`` are read whole; larger ones in bands of whole strips.
    """

    def __init__(self, path: str | os.PathLike, *, what: str = "the image", cache_bytes: int | None = None):
        import tifffile

        self.path = Path(path)
        self._tif = tifffile.TiffFile(self.path)
        try:
            self._setup(what, cache_bytes)
        except Exception:
            self._tif.close()
            raise

    def _setup(self, what: str, cache_bytes: int | None) -> None:
        import zarr

        series = self._tif.series[0]
        level = series.levels[0] if getattr(series, "levels", None) else series
        axes, shape, dtype = level.axes, tuple(int(s) for s in level.shape), level.dtype
        what = f"{what} ({self.path.name}, axes {axes!r})"
        if "Y" not in axes or "X" not in axes:
            raise ValueError(f"{what} has no Y and X axes; expected a 2-D RGB image.")
        chan = [a for a in ("S", "C") if a in axes and shape[axes.index(a)] > 1]
        if len(chan) > 1:
            raise ValueError(f"{what} has both samples and channels {shape}; expected one RGB image.")
        chan_axis = chan[0] if chan else next((a for a in ("S", "C") if a in axes), None)
        H, W = shape[axes.index("Y")], shape[axes.index("X")]
        n_channels = shape[axes.index(chan_axis)] if chan_axis else 1
        check_pixels((H, W, n_channels) if n_channels > 1 else (H, W), dtype, what=what)
        self.shape = (H, W)
        index: list[Any] = []
        kept: list[str] = []
        for a, n in zip(axes, shape, strict=True):
            if a in ("Y", "X") or a == chan_axis:
                index.append(slice(None))
                kept.append(a)
            else:
                if n > 1:
                    warnings.warn(f"{what}: using index 0 of axis {a!r} (size {n}).", stacklevel=3)
                index.append(0)
        self._index = index
        self._pos = {a: i for i, a in enumerate(axes)}
        self._order = [kept.index(a) for a in ("Y", "X", chan_axis)]
        self.mpp = _ome_mpp(self._tif)
        kind = "OME-TIFF" if self._tif.is_ome else "TIFF"
        page = level.keyframe if hasattr(level, "keyframe") else level.pages[0]
        n_levels = len(getattr(series, "levels", [])) or 1
        self._zarr = zarr.open_array(series.aszarr(level=0), mode="r")
        chunk_h, chunk_w = self._zarr.chunks[self._pos["Y"]], self._zarr.chunks[self._pos["X"]]
        layout = f"tiles {chunk_w} x {chunk_h}" if page.is_tiled else f"strips of {chunk_h} rows"
        if not page.is_tiled and H * W * 3 <= SMALL_TIFF_BYTES:
            self._init_cache((H, W), max(CACHE_BYTES, H * W * 3))
            self.description = f"{kind} file {self.path} ({layout}, small: read whole with tifffile)"
            return
        block = _block_from_chunks(chunk_h, chunk_w)
        self._init_cache((min(block[0], H), min(block[1], W)), cache_bytes)
        self.description = f"{kind} file {self.path} (level 0 of {n_levels}, {layout}, tifffile zarr store)"
        if self.block_shape[0] * self.block_shape[1] * 3 > self.cache_bytes:
            # one block (e.g. a single giant strip) does not fit in the cache: read the file once, whole
            warnings.warn(
                f"{self.path.name} is stored as blocks of {chunk_w} x {chunk_h} px, too large to read in parts; "
                "reading it whole. Re-save it as a tiled TIFF (e.g. `vips tiffsave in.tif out.tif --tile "
                "--pyramid --compression jpeg`) to read large slides with little memory.",
                stacklevel=3,
            )
            self._init_cache((H, W), max(self.cache_bytes, H * W * 3))

    def _select(self, z: Any, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """The region of a level's zarr array as uint8 (h, w, channels) (levels share level 0's axes)."""
        index = list(self._index)
        index[self._pos["Y"]] = slice(y0, y1)
        index[self._pos["X"]] = slice(x0, x1)
        return np.ascontiguousarray(np.transpose(z[tuple(index)], self._order), dtype=np.uint8)

    def _load(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        return self._select(self._zarr, x0, y0, x1, y1)

    def levels(self) -> list[Level]:
        """The 8-bit RGB pyramid levels of the file (level 0 first), each read through its own zarr store.

        Levels with other axes, another dtype or not 3 channels are skipped; without any, the base class's
        level 0.
        """
        import zarr

        series = self._tif.series[0]
        first = series.levels[0] if getattr(series, "levels", None) else series
        H0, W0 = self.shape
        out = []
        for k, lvl in enumerate(getattr(series, "levels", None) or [series]):
            axes, shape = lvl.axes, tuple(int(s) for s in lvl.shape)
            chan = next((a for a in ("S", "C") if a in axes and shape[axes.index(a)] == 3), None)
            if axes != first.axes or chan is None or np.dtype(lvl.dtype) != np.uint8:
                continue
            H, W = shape[axes.index("Y")], shape[axes.index("X")]

            def read(y0: int, y1: int, k=k, W=W) -> np.ndarray:
                return self._select(zarr.open_array(series.aszarr(level=k), mode="r"), 0, y0, W, y1)

            out.append(Level((H, W), (H0 / H, W0 / W), read, f"TIFF level {k} ({W} x {H} px)"))
        return out or super().levels()

    def close(self) -> None:
        super().close()
        self._tif.close()


class OpenSlideSource(ImageSource):
    """A whole-slide image (.svs, .ndpi, .mrxs, .scn, generic tiled TIFF, ...) read at level 0 with openslide."""

    def __init__(self, path: str | os.PathLike, *, what: str = "the image"):
        import openslide

        self.path = Path(path)
        self._slide = openslide.OpenSlide(str(self.path))
        w, h = self._slide.dimensions
        self.shape = (int(h), int(w))
        props = self._slide.properties
        try:
            mpp = float(props.get(openslide.PROPERTY_NAME_MPP_X, "nan"))
        except ValueError:
            mpp = float("nan")
        self.mpp = mpp if math.isfinite(mpp) and mpp > 0 else None
        vendor = props.get(openslide.PROPERTY_NAME_VENDOR, "unknown")
        self.block_shape = (512, 512)
        self.description = f"whole-slide file {self.path} (openslide, vendor {vendor}, level 0)"

    def _read(self, x0: int, y0: int, x1: int, y1: int, pad: int) -> np.ndarray:
        rgba = np.asarray(self._slide.read_region((x0, y0), 0, (x1 - x0, y1 - y0)))
        rgb = np.array(rgba[..., :3])
        rgb[rgba[..., 3] == 0] = pad  # openslide returns transparent black where the slide has no data
        return rgb

    def levels(self) -> list[Level]:
        """The levels of the slide (``level_dimensions`` / ``level_downsamples``), level 0 first."""
        H0, W0 = self.shape
        out = []
        for k, (W, H) in enumerate(self._slide.level_dimensions):
            ds = float(self._slide.level_downsamples[k])

            def read(y0: int, y1: int, k=k, W=W, ds=ds) -> np.ndarray:
                rgba = np.asarray(self._slide.read_region((0, round(y0 * ds)), k, (W, y1 - y0)))
                rgb = np.array(rgba[..., :3])
                rgb[rgba[..., 3] == 0] = 255  # no data: background
                return rgb

            out.append(Level((H, W), (H0 / H, W0 / W), read, f"openslide level {k} ({W} x {H} px)"))
        return out

    def close(self) -> None:
        self._slide.close()


# --------------------------------------------------------------------------------------------- dispatch


def _is_instance_by_name(obj: Any, module: str, names: tuple[str, ...]) -> bool:
    """``isinstance`` without importing ``module`` (only objects of loaded modules can match)."""
    for cls in type(obj).__mro__:
        if cls.__module__.split(".")[0] == module and cls.__name__ in names:
            return True
    return False


def _from_xarray(obj: Any, *, description: str, what: str) -> ImageSource:
    """Open a spatialdata image element: ``DataArray`` (c, y, x) or multiscale ``DataTree`` (level ``scale0``)."""
    if _is_instance_by_name(obj, "xarray", ("DataTree",)):
        names = sorted(obj.children)
        if not names:
            raise ValueError(f"{what} is an empty DataTree; expected a spatialdata multiscale image.")
        node = obj[names[0]]
        arrays = list(node.ds.data_vars.values())
        if len(arrays) != 1:
            raise ValueError(f"{what}: scale {names[0]!r} holds {len(arrays)} arrays; expected one image.")
        obj = arrays[0]
        description = f"{description}, scale {names[0]}"
    dims = tuple(obj.dims)
    if "y" not in dims or "x" not in dims:
        raise ValueError(f"{what} has dims {dims}; expected a spatialdata image with dims ('c', 'y', 'x').")
    if "c" not in dims:
        check_pixels((obj.sizes["y"], obj.sizes["x"]), obj.dtype, what=what)
    extra = [d for d in dims if d not in ("c", "y", "x")]
    if extra:
        raise ValueError(f"{what} has dims {dims}; expected a 2-D image with dims ('c', 'y', 'x').")
    arr = obj.transpose("y", "x", "c").data
    if _is_instance_by_name(arr, "dask", ("Array",)):
        return DaskSource(arr, description=description, what=what)
    return ArraySource(np.asarray(arr), description=description, what=what)


def _from_spatialdata(sdata: Any, image_key: str | None, *, description: str, what: str) -> ImageSource:
    keys = list(sdata.images.keys())
    if image_key is None:
        if len(keys) != 1:
            raise ValueError(
                f"{what} is a SpatialData object with {len(keys)} images {keys}: pass `image_key=` naming the "
                "full-resolution H&E image."
            )
        image_key = keys[0]
    if image_key not in sdata.images:
        raise KeyError(f"image_key={image_key!r} is not an image of {what}; available images: {keys}.")
    return _from_xarray(
        sdata.images[image_key], description=f"{description}, image {image_key!r}", what=f"{what} image {image_key!r}"
    )


def open_path(path: str | os.PathLike, *, image_key: str | None = None, what: str = "the image") -> ImageSource:
    """Open an image file (or a spatialdata ``.zarr`` store) with the backend that suits its format."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{what}: the file {str(p)!r} does not exist.")
    suffix = p.suffix.lower()
    if p.is_dir() or suffix == ".zarr":
        import spatialdata

        try:
            sdata = spatialdata.read_zarr(p, selection=("images",))
        except Exception as e:
            raise ValueError(
                f"{what}: {str(p)!r} is a folder but could not be read as a SpatialData zarr store ({e})."
            ) from e
        return _from_spatialdata(sdata, image_key, description=f"SpatialData store {p}", what=f"{what} ({p.name})")
    if suffix in PIL_SUFFIXES:
        return PILSource(p, what=what)
    if suffix in TIFF_SUFFIXES:
        return TiffSource(p, what=what)
    if suffix in OPENSLIDE_SUFFIXES:
        try:
            return OpenSlideSource(p, what=what)
        except Exception as e:
            if suffix not in _TIFF_LIKE_SLIDES:
                raise ValueError(f"{what}: openslide could not open {p.name} ({e}).") from e
            return TiffSource(p, what=what)
    # unknown suffix: ask openslide, then PIL
    import openslide

    if openslide.OpenSlide.detect_format(str(p)) is not None:
        return OpenSlideSource(p, what=what)
    try:
        return PILSource(p, what=what)
    except (ValueError, TypeError):
        raise
    except Exception as e:
        raise ValueError(
            f"{what}: cannot read {p.name}. Supported: JPEG/PNG {PIL_SUFFIXES}, TIFF/OME-TIFF {TIFF_SUFFIXES}, "
            f"whole-slide formats {OPENSLIDE_SUFFIXES} and SpatialData '.zarr' stores."
        ) from e


def open_image(
    image: Any, *, image_key: str | None = None, pad_value: int = 255, what: str = "the image", description=None
) -> ImageSource:
    """Return an :class:`ImageSource` for a path, an array, an xarray image, a SpatialData object or a source.

    Parameters
    ----------
    image
        A path (JPEG, PNG, TIFF/OME-TIFF, a whole-slide format or a SpatialData ``.zarr`` store), a numpy or
        dask array (H, W, 3) uint8, an ``xarray.DataArray`` / ``DataTree`` (c, y, x) from spatialdata, a
        ``spatialdata.SpatialData`` (with ``image_key``), a ``PIL.Image`` or an :class:`ImageSource`.
    image_key
        Name of the image element in a SpatialData object or store.
    pad_value
        Value of the pixels :meth:`ImageSource.read_region` returns outside the image.
    what
        How error messages name the image.
    description
        How the source is described in the record; default: from the backend.
    """
    if isinstance(image, ImageSource):
        src = image
    elif isinstance(image, str | os.PathLike):
        src = open_path(image, image_key=image_key, what=what)
    elif _is_instance_by_name(image, "spatialdata", ("SpatialData",)):
        src = _from_spatialdata(image, image_key, description=description or "SpatialData object", what=what)
    elif _is_instance_by_name(image, "xarray", ("DataArray", "DataTree")):
        src = _from_xarray(image, description=description or "xarray image", what=what)
    elif _is_instance_by_name(image, "dask", ("Array",)):
        src = DaskSource(image, description=description or "dask array", what=what)
    elif _is_instance_by_name(image, "PIL", ("Image",)):
        src = ArraySource(np.asarray(image), description=description or "PIL image", what=what)
    elif isinstance(image, np.ndarray):
        src = ArraySource(image, description=description or "numpy array", what=what)
    elif isinstance(image, Mapping):
        raise TypeError(f"{what}: got a mapping; expected one image (a path, an array or a SpatialData image).")
    else:
        raise TypeError(
            f"{what} has unsupported type {type(image).__name__}: pass a file path, a numpy or dask array "
            "(H, W, 3) uint8, a spatialdata image (xarray DataArray/DataTree) or a SpatialData object with image_key."
        )
    src.pad_value = int(pad_value)
    return src
