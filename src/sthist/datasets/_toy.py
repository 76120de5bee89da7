"""A synthetic Visium-layout data set whose H&E-like image drives part of the expression.

The generator draws, for every section, a tissue layout from smooth random fields (four tissue
classes), renders an H&E-like image from it with a Beer-Lambert stain model (haematoxylin-stained
nuclei drawn as anti-aliased ellipses, eosin-stained stroma fibres, near-white fat with thin membranes),
places Visium spots on a hexagonal grid over it and draws negative-binomial counts in which a set of
"informative" genes follow the tissue composition and nucleus density under each spot. Everything is
vectorised numpy/scipy; the same ``seed`` gives bit-identical output.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import _constants as C
from .._validate import check_positive_int

if TYPE_CHECKING:
    from anndata import AnnData

# ---------------------------------------------------------------------------------------------------------
# geometry of the Visium layout (micrometres)
PITCH_UM = 100.0  # centre-to-centre distance of neighbouring spots
SPOT_DIAMETER_UM = 55.0
ROW_STEP_UM = PITCH_UM * math.sqrt(3.0) / 2.0  # vertical distance between rows of a hexagonal grid
MARGIN_UM = 150.0  # tissue around the outermost spot centres, so that 224 um patches fit in the image
HIRES_MAX = 2000  # longest side of the hires image (Space Ranger convention)
MAX_PIXELS = 400_000_000  # refuse to render larger images (about 1.2 GB of uint8 RGB)

# tissue classes, in the order of the categories of obs["region"]
REGIONS = ("tumour", "stroma", "immune", "fat")
REGION_COLORS = ("#e41a1c", "#4daf4a", "#377eb8", "#ff7f00")
GENE_PREFIX = {"tumour": "TUM", "stroma": "STR", "immune": "IMM", "fat": "FAT"}
# target share of the tissue area (approximately met by thresholding standardised random fields)
_FAT_SHARE, _TUMOUR_SHARE, _IMMUNE_SHARE = 0.15, 0.35, 0.15

# nuclei per class: (spacing of the jittered grid in um, ellipse semi-axes range in um (long, short),
# haematoxylin density range). Spacing sets the densest packing; a smooth density field thins it.
_NUCLEI = {
    "tumour": {"spacing": 10.5, "a": (4.6, 6.6), "ratio": (0.7, 1.0), "h": (0.85, 1.25)},
    "stroma": {"spacing": 22.0, "a": (4.5, 7.5), "ratio": (0.25, 0.4), "h": (1.0, 1.35)},
    "immune": {"spacing": 6.6, "a": (2.4, 3.3), "ratio": (0.85, 1.0), "h": (1.45, 1.85)},
    "fat": {"spacing": 60.0, "a": (3.5, 5.0), "ratio": (0.3, 0.45), "h": (0.9, 1.2)},
}
# optical density of one unit of each stain in R, G, B (haematoxylin: blue-purple; eosin: pink)
_H_OD = np.array([1.0, 1.30, 0.50], dtype=np.float32)
_E_OD = np.array([0.085, 0.62, 0.30], dtype=np.float32)
_GLASS_OD = np.array([0.015, 0.025, 0.015], dtype=np.float32)


# ---------------------------------------------------------------------------------------------------------
# public function
def toy(
    *,
    n_rows: int = 24,
    n_cols: int = 24,
    n_genes: int = 100,
    n_sections: int = 1,
    mpp: float = 1.0,
    seed: int = 0,
    n_informative: int | None = None,
) -> AnnData:
    """Synthetic Visium-layout data set with an H&E-like image that drives part of the expression.

    Each section is a hexagonal Visium grid of ``n_rows`` x ``n_cols`` spots (100 µm pitch, 55 µm spots,
    odd rows shifted by half a pitch) over a rendered H&E-like image. Tissue is drawn from four classes
    laid out as smooth random fields:

    ``"tumour"``
        tumour epithelium: densely packed, large, pleomorphic dark-purple nuclei on pale purple cytoplasm;
    ``"stroma"``
        pink eosin-stained collagen fibres with sparse, elongated nuclei aligned with the fibres;
    ``"immune"``
        immune infiltrate: many small, round, very dark nuclei;
    ``"fat"``
        adipose tissue: near-white with thin pink membranes and very few nuclei.

    A smooth random field also modulates the local nucleus density. Counts are negative binomial
    (Poisson-Gamma). The first ``n_informative`` genes are *informative*: their mean follows the tissue
    under the spot, so that a model can learn them from image patches. Genes of a tumour or immune class
    follow the number of nuclei of that class inside the spot (composition times local density); stroma
    and fat genes follow the area fraction of their class. They are named by their class, ``"TUM_01"``,
    ``"STR_01"``, ``"IMM_01"``, ``"FAT_01"``, ``"TUM_02"``, ... (assigned round-robin). The remaining genes,
    ``"GENE0001"``, ``"GENE0002"``, ..., are housekeeping/noise genes whose mean is a per-gene constant
    times the library size of the spot. Library sizes vary log-normally between spots and grow with the
    number of nuclei under the spot, as in real data.

    Parameters
    ----------
    n_rows
        Rows of spots per section.
    n_cols
        Spots per row.
    n_genes
        Number of genes (informative ones included).
    n_sections
        Number of sections; every section has its own tissue layout and image.
    mpp
        Micrometres per full-resolution pixel. The image of one section measures about
        ``((n_cols - 0.5) * 100 + 300) / mpp`` by ``((n_rows - 1) * 86.6 + 300) / mpp`` pixels
        (width by height); the default call renders 2650 x 2292 pixels.
    seed
        Non-negative integer seed. The same seed gives bit-identical output; section ``i`` of a
        multi-section call does not depend on ``n_sections``.
    n_informative
        Number of informative genes; ``None`` uses ``min(20, n_genes // 2)``.

    Returns
    -------
    AnnData with raw counts in ``X`` (:class:`scipy.sparse.csr_matrix`, float32) and

    ``obs``
        ``'array_row'``, ``'array_col'`` (Visium convention: ``array_col`` counts half pitches, so it is
        even on even rows and odd on odd rows), ``'in_tissue'`` (1), ``'section'`` (categorical library
        id), ``'region'`` (categorical dominant tissue class under the spot), ground truth
        ``'fraction_tumour'``, ``'fraction_stroma'``, ``'fraction_immune'``, ``'fraction_fat'`` (area
        fractions of each class inside the spot) and ``'n_nuclei'`` (nuclei centred inside the spot).
        obs_names are ``'<library id>_<array_col>x<array_row>'``.
    ``obsm['spatial']``
        Spot centres in full-resolution pixels, x (column) then y (row), float64.
    ``var``
        ``'informative'`` (bool) and ``'driver'`` (categorical: the tissue class driving the gene,
        ``'none'`` for noise genes).
    ``uns['spatial'][library_id]``
        ``'images'``: ``'hires'`` (uint8, longest side at most 2000 px) and ``'fullres'`` (the
        full-resolution uint8 (H, W, 3) image); ``'scalefactors'``: ``'tissue_hires_scalef'``,
        ``'spot_diameter_fullres'`` (55 µm / mpp), ``'microns_per_pixel'``; ``'metadata'``: ``{}``.
        The library id is ``'toy'`` for one section and ``'toy_0'``, ``'toy_1'``, ... for several.
    ``uns['region_colors']``
        Colours of the tissue classes for scanpy plots.
    ``uns['toy']['params']``
        The arguments of the call.

    Examples
    --------
    >>> import scanpy as sc
    >>> import sthist
    >>> adata = sthist.datasets.toy()
    >>> sc.pl.spatial(adata, color="region")  # doctest: +SKIP
    """
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    n_rows = check_positive_int("n_rows", n_rows)
    n_cols = check_positive_int("n_cols", n_cols)
    n_genes = check_positive_int("n_genes", n_genes)
    n_sections = check_positive_int("n_sections", n_sections)
    mpp = _check_mpp(mpp)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    if n_informative is None:
        n_informative = min(20, n_genes // 2)
    elif isinstance(n_informative, bool) or not isinstance(n_informative, int | np.integer):
        raise ValueError(f"n_informative must be an integer or None, got {n_informative!r}.")
    n_informative = int(n_informative)
    if not 0 <= n_informative <= n_genes:
        raise ValueError(
            f"n_informative={n_informative} must lie between 0 and n_genes={n_genes}; "
            "raise n_genes or lower n_informative."
        )
    width_um = (n_cols - 1) * PITCH_UM + (PITCH_UM / 2 if n_rows > 1 else 0.0) + 2 * MARGIN_UM
    height_um = (n_rows - 1) * ROW_STEP_UM + 2 * MARGIN_UM
    shape = (math.ceil(height_um / mpp), math.ceil(width_um / mpp))
    if shape[0] * shape[1] > MAX_PIXELS:
        raise ValueError(
            f"toy(n_rows={n_rows}, n_cols={n_cols}, mpp={mpp}) would render a {shape[1]} x {shape[0]} px "
            f"image per section (more than {MAX_PIXELS:,} pixels); use fewer spots or a larger mpp."
        )

    seeds = np.random.SeedSequence(int(seed)).spawn(1 + n_sections)
    genes = _gene_model(np.random.default_rng(seeds[0]), n_genes, n_informative)
    lib_ids = ["toy"] if n_sections == 1 else [f"toy_{i}" for i in range(n_sections)]

    blocks, obs_frames, coords, spatial = [], [], [], {}
    for lib, ss in zip(lib_ids, seeds[1:], strict=True):
        rng = np.random.default_rng(ss)
        sec = _section(rng, n_rows=n_rows, n_cols=n_cols, mpp=mpp, shape=shape)
        counts = _counts(rng, sec, genes)
        obs = sec["obs"]
        obs.index = [f"{lib}_{c}x{r}" for c, r in zip(obs[C.ARRAY_COL], obs[C.ARRAY_ROW], strict=True)]
        obs[C.SECTION_KEY] = lib
        obs_frames.append(obs)
        blocks.append(sp.csr_matrix(counts))
        coords.append(sec["xy"])
        spatial[lib] = {
            C.IMAGES: {C.HIRES: sec["hires"], C.FULLRES: sec["image"]},
            C.SCALEFACTORS: {
                C.HIRES_SCALEF: sec["hires_scalef"],
                C.SPOT_DIAMETER: SPOT_DIAMETER_UM / mpp,
                C.MPP: mpp,
            },
            C.METADATA: {},
        }

    obs = pd.concat(obs_frames)
    obs[C.SECTION_KEY] = pd.Categorical(obs[C.SECTION_KEY], categories=lib_ids)
    obs["region"] = pd.Categorical.from_codes(obs["region"].to_numpy(), categories=list(REGIONS))
    obs = obs[
        [
            C.ARRAY_ROW,
            C.ARRAY_COL,
            "in_tissue",
            C.SECTION_KEY,
            "region",
            *[f"fraction_{r}" for r in REGIONS],
            "n_nuclei",
        ]
    ]
    var = pd.DataFrame(
        {
            "informative": genes["informative"],
            "driver": pd.Categorical(genes["driver"], categories=[*REGIONS, "none"]),
        },
        index=pd.Index(genes["names"]),
    )
    X = sp.vstack(blocks, format="csr").astype(np.float32)
    adata = ad.AnnData(X=X, obs=obs, var=var)
    adata.obsm[C.SPATIAL_KEY] = np.concatenate(coords, axis=0)
    adata.uns[C.SPATIAL_KEY] = spatial
    adata.uns["region_colors"] = list(REGION_COLORS)
    adata.uns["toy"] = {
        "params": {
            "n_rows": n_rows,
            "n_cols": n_cols,
            "n_genes": n_genes,
            "n_sections": n_sections,
            "mpp": mpp,
            "seed": int(seed),
            "n_informative": n_informative,
        }
    }
    return adata


def _check_mpp(mpp: Any) -> float:
    if isinstance(mpp, bool) or not isinstance(mpp, int | float | np.integer | np.floating):
        raise ValueError(f"mpp (micrometres per pixel) must be a positive number, got {mpp!r}.")
    mpp = float(mpp)
    if not math.isfinite(mpp) or mpp <= 0:
        raise ValueError(f"mpp (micrometres per pixel) must be a positive finite number, got {mpp!r}.")
    return mpp


# ---------------------------------------------------------------------------------------------------------
# random fields
def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Standardised Gaussian random field (zero mean, unit sd) with correlation length ``sigma`` cells.

    White noise smoothed in the Fourier domain (periodic boundaries), so the cost does not grow with sigma.
    """
    from scipy import fft, ndimage

    spectrum = fft.rfft2(rng.standard_normal(shape), workers=1)
    f = fft.irfft2(ndimage.fourier_gaussian(spectrum, sigma, n=shape[1]), s=shape, workers=1)
    f -= f.mean()
    sd = f.std()
    return (f / sd if sd > 0 else f).astype(np.float32)


def _upsample(coarse: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Bilinear interpolation of a coarse grid at fractional (rows[:, None], cols[None, :]) positions."""
    r0 = np.clip(np.floor(rows).astype(np.int64), 0, coarse.shape[0] - 2)
    c0 = np.clip(np.floor(cols).astype(np.int64), 0, coarse.shape[1] - 2)
    wr = np.clip(rows - r0, 0, 1).astype(np.float32)[:, None]
    wc = np.clip(cols - c0, 0, 1).astype(np.float32)[None, :]
    tmp = coarse[r0] * (1 - wr) + coarse[r0 + 1] * wr
    return tmp[:, c0] * (1 - wc) + tmp[:, c0 + 1] * wc


def _sample(coarse: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Bilinear interpolation of a coarse grid at scattered points."""
    r0 = np.clip(np.floor(rows).astype(np.int64), 0, coarse.shape[0] - 2)
    c0 = np.clip(np.floor(cols).astype(np.int64), 0, coarse.shape[1] - 2)
    wr = np.clip(rows - r0, 0, 1)
    wc = np.clip(cols - c0, 0, 1)
    top = coarse[r0, c0] * (1 - wc) + coarse[r0, c0 + 1] * wc
    bottom = coarse[r0 + 1, c0] * (1 - wc) + coarse[r0 + 1, c0 + 1] * wc
    return top * (1 - wr) + bottom * wr


# ---------------------------------------------------------------------------------------------------------
# one section: layout, image, spots
_COARSE_UM = 6.0  # cell size of the coarse grid of the random fields


def _section(rng: np.random.Generator, *, n_rows: int, n_cols: int, mpp: float, shape: tuple[int, int]) -> dict:
    from scipy import ndimage
    from scipy.spatial import cKDTree
    from scipy.stats import norm

    H, W = shape
    cs = _COARSE_UM
    cshape = (math.ceil(H * mpp / cs) + 2, math.ceil(W * mpp / cs) + 2)
    # tissue classes from thresholded smooth fields: fat lobules, tumour nests, immune aggregates, stroma
    f_fat = _smooth_field(rng, cshape, 200.0 / cs)
    f_tum = _smooth_field(rng, cshape, 110.0 / cs)
    f_imm = _smooth_field(rng, cshape, 55.0 / cs)
    f_den = _smooth_field(rng, cshape, 90.0 / cs)  # local nucleus density
    f_ori = _smooth_field(rng, cshape, 120.0 / cs)  # stroma fibre orientation
    f_stain = _smooth_field(rng, cshape, 400.0 / cs)  # slow staining variation
    t_fat = norm.ppf(1 - _FAT_SHARE)
    t_tum = norm.ppf(1 - _TUMOUR_SHARE / (1 - _FAT_SHARE))
    t_imm = norm.ppf(1 - _IMMUNE_SHARE / (1 - _FAT_SHARE - _TUMOUR_SHARE))

    # slowly varying quantities on a grid of about 2 um, repeated up to full resolution
    f = max(1, round(2.0 / mpp))
    mh, mw = math.ceil(H / f), math.ceil(W / f)
    rows_m = (np.arange(mh) + 0.5) * f * mpp / cs
    cols_m = (np.arange(mw) + 0.5) * f * mpp / cs
    orient_m = _upsample(f_ori, rows_m, cols_m)
    stain_m = 1.0 + 0.08 * _upsample(f_stain, rows_m, cols_m)

    def full(a: np.ndarray) -> np.ndarray:
        return a if f == 1 else np.repeat(np.repeat(a, f, axis=0), f, axis=1)[:H, :W]

    # the tissue class of every pixel, at full resolution so that the borders stay smooth
    rows_f = (np.arange(H) + 0.5) * mpp / cs
    cols_f = (np.arange(W) + 0.5) * mpp / cs
    label = np.ones((H, W), dtype=np.int8)  # stroma
    label[_upsample(f_imm, rows_f, cols_f) > t_imm] = 2
    label[_upsample(f_tum, rows_f, cols_f) > t_tum] = 0
    label[_upsample(f_fat, rows_f, cols_f) > t_fat] = 3

    # ---- nuclei: jittered hexagonal grids thinned by class and local density --------------------------
    nuc = {k: [] for k in ("x", "y", "a", "b", "theta", "h", "cls")}
    for ci, name in enumerate(REGIONS):
        p = _NUCLEI[name]
        s = p["spacing"]
        xx, yy = _hex_points(s, W * mpp, H * mpp)
        xx = xx + rng.uniform(-0.35, 0.35, xx.size) * s
        yy = yy + rng.uniform(-0.35, 0.35, yy.size) * s
        u = rng.random(xx.size)
        inside = (xx >= 0) & (xx < W * mpp) & (yy >= 0) & (yy < H * mpp)
        xx, yy, u = xx[inside], yy[inside], u[inside]
        px = np.minimum((xx / mpp).astype(np.int64), W - 1)
        py = np.minimum((yy / mpp).astype(np.int64), H - 1)
        dens = _sample(f_den, yy / cs, xx / cs)
        keep_p = 0.45 + 0.5 / (1.0 + np.exp(-1.6 * dens))  # 0.45 .. 0.95, smooth in space
        keep = (label[py, px] == ci) & (u < keep_p)
        xx, yy, n = xx[keep], yy[keep], int(keep.sum())
        a = rng.uniform(*p["a"], n)
        b = a * rng.uniform(*p["ratio"], n)
        if name == "stroma":  # aligned with the fibres
            theta = np.where(_sample(f_ori, yy / cs, xx / cs) > 0, 0.0, np.pi / 2) + rng.normal(0, 0.12, n)
        else:
            theta = rng.uniform(0, np.pi, n)
        for key, val in zip(("x", "y", "a", "b", "theta"), (xx, yy, a, b, theta), strict=True):
            nuc[key].append(val)
        nuc["h"].append(rng.uniform(*p["h"], n))
        nuc["cls"].append(np.full(n, ci, dtype=np.int8))
    nuc = {k: np.concatenate(v) for k, v in nuc.items()}
    hema = _render_nuclei(nuc, shape=shape, mpp=mpp)

    # ---- eosin and diffuse haematoxylin -------------------------------------------------------------
    # fine chromatin/cytoplasm texture
    grain = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), max(0.6, 0.8 / mpp))
    grain *= np.float32(1.0 / max(float(grain.std()), 1e-6))
    # stroma fibres: noise smeared along x or along y (box filters), the direction set by a smooth field
    long_px = max(3, round(22.0 / mpp)) | 1
    across = max(0.6, 0.9 / mpp)
    noise = ndimage.gaussian_filter1d(rng.standard_normal(shape, dtype=np.float32), across, axis=0)
    fib_h = ndimage.uniform_filter1d(ndimage.uniform_filter1d(noise, long_px, axis=1), long_px, axis=1)
    noise = ndimage.gaussian_filter1d(rng.standard_normal(shape, dtype=np.float32), across, axis=1)
    fib_v = ndimage.uniform_filter1d(ndimage.uniform_filter1d(noise, long_px, axis=0), long_px, axis=0)
    del noise
    fib_h *= np.float32(1.0 / max(float(fib_h.std()), 1e-6))
    fib_v *= np.float32(1.0 / max(float(fib_v.std()), 1e-6))
    w = full((1.0 / (1.0 + np.exp(-6.0 * orient_m))).astype(np.float32))  # 1: along x, 0: along y
    fib_h -= fib_v
    fib_h *= w
    fib_h += fib_v  # w * fib_h + (1 - w) * fib_v
    del fib_v, w
    fibres = 1.0 / (1.0 + np.exp(-2.0 * (fib_h + 0.4)))  # 0..1, mostly high with pale gaps between bundles
    del fib_h
    # fat: adipocytes as Voronoi cells (about 70 um across); membranes where the two nearest seeds tie
    membrane = _membranes(rng, label, mpp=mpp, spacing_um=70.0)

    lut = lambda *v: np.array(v, dtype=np.float32)[label]  # noqa: E731  (per class: tumour, stroma, immune, fat)
    eosin = lut(0.42, 0.18, 0.30, 0.02)
    eosin += lut(0.06, 0.0, 0.05, 0.0) * grain
    eosin += lut(0.0, 0.75, 0.0, 0.0) * fibres
    del fibres
    eosin.ravel()[membrane[0]] += membrane[1]
    del membrane
    stain = full(stain_m.astype(np.float32))
    hema *= 1.0 + 0.18 * grain  # chromatin texture
    hema += lut(0.10, 0.02, 0.08, 0.0)
    hema *= stain
    eosin *= stain
    del stain
    img = np.empty((H, W, 3), dtype=np.uint8)
    grain *= np.float32(0.012)  # reuse the texture as faint camera noise in optical density
    for c in range(3):
        od = hema * _H_OD[c]
        od += eosin * _E_OD[c]
        od += grain
        od += _GLASS_OD[c]
        np.negative(od, out=od)
        np.exp(od, out=od)
        od *= 255.0
        od += 0.5
        np.clip(od, 0.0, 255.0, out=od)
        img[..., c] = od  # the cast truncates: with the +0.5 above, this rounds
    del hema, eosin, grain, od

    # ---- spots --------------------------------------------------------------------------------------
    r_idx, c_idx = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    r_idx, c_idx = r_idx.ravel(), c_idx.ravel()
    array_col = 2 * c_idx + (r_idx % 2)
    x_um = MARGIN_UM + array_col * (PITCH_UM / 2)
    y_um = MARGIN_UM + r_idx * ROW_STEP_UM
    xy = np.column_stack([x_um, y_um]) / mpp

    # area fractions of each class inside each spot, from a fixed set of sample points in the disk
    radius = SPOT_DIAMETER_UM / 2
    step = 2.5
    g = np.arange(-radius, radius + 1e-9, step)
    ox, oy = np.meshgrid(g, g)
    inner = ox**2 + oy**2 <= radius**2
    ox, oy = ox[inner], oy[inner]
    sx = np.clip(((x_um[:, None] + ox[None, :]) / mpp).astype(np.int64), 0, W - 1)
    sy = np.clip(((y_um[:, None] + oy[None, :]) / mpp).astype(np.int64), 0, H - 1)
    lab = label[sy, sx]
    fractions = np.stack([(lab == k).mean(axis=1) for k in range(len(REGIONS))], axis=1)
    # nuclei centred inside each spot, per class (spots do not overlap: 55 um disks on a 100 um pitch)
    dist, nearest = cKDTree(np.column_stack([x_um, y_um])).query(
        np.column_stack([nuc["x"], nuc["y"]]), k=1, distance_upper_bound=radius
    )
    hit = np.isfinite(dist)
    n_spots = x_um.size
    nuclei = np.zeros((n_spots, len(REGIONS)), dtype=np.int64)
    np.add.at(nuclei, (nearest[hit], nuc["cls"][hit].astype(np.int64)), 1)

    import pandas as pd

    obs = pd.DataFrame(
        {
            C.ARRAY_ROW: r_idx.astype(np.int64),
            C.ARRAY_COL: array_col.astype(np.int64),
            "in_tissue": np.ones(n_spots, dtype=np.int64),
            "region": fractions.argmax(axis=1).astype(np.int8),
            **{f"fraction_{name}": fractions[:, k] for k, name in enumerate(REGIONS)},
            "n_nuclei": nuclei.sum(axis=1),
        }
    )
    hires, scalef = _downscale(img, HIRES_MAX)
    return {
        "obs": obs,
        "xy": xy,
        "image": img,
        "hires": hires,
        "hires_scalef": scalef,
        "fractions": fractions,
        "nuclei": nuclei,
    }


def _hex_points(spacing: float, width: float, height: float) -> tuple[np.ndarray, np.ndarray]:
    """Points of a hexagonal grid with the given spacing covering [0, width] x [0, height] (um)."""
    gx = np.arange(-spacing, width + spacing, spacing)
    gy = np.arange(-spacing, height + spacing, spacing * math.sqrt(3) / 2)
    xx, yy = np.meshgrid(gx, gy)
    xx[1::2] += spacing / 2
    return xx.ravel(), yy.ravel()


def _membranes(
    rng: np.random.Generator, label: np.ndarray, *, mpp: float, spacing_um: float
) -> tuple[np.ndarray, np.ndarray]:
    """Eosin of adipocyte membranes: (flat pixel indices inside fat, values).

    Adipocytes are the Voronoi cells of jittered seeds; a fat pixel lies on a membrane when its distances to
    the two nearest seeds almost tie. The candidates for the nearest seeds of a pixel are the four seeds
    nearest to the centre of its 10 um block, which are exact for blocks much smaller than the cells.
    """
    from scipy.spatial import cKDTree

    H, W = label.shape
    sx, sy = _hex_points(spacing_um, W * mpp, H * mpp)
    sx = sx + rng.uniform(-0.3, 0.3, sx.size) * spacing_um
    sy = sy + rng.uniform(-0.3, 0.3, sy.size) * spacing_um
    flat = np.flatnonzero(label.ravel() == 3)
    if flat.size == 0:
        return flat, np.zeros(0, dtype=np.float32)
    py, px = np.divmod(flat, W)
    x = ((px + 0.5) * mpp).astype(np.float32)
    y = ((py + 0.5) * mpp).astype(np.float32)
    block = 10.0
    bw = math.ceil(W * mpp / block)
    bid = (y // block).astype(np.int64) * bw + (x // block).astype(np.int64)
    blocks, inverse = np.unique(bid, return_inverse=True)
    centres = np.column_stack([(blocks % bw + 0.5) * block, (blocks // bw + 0.5) * block])
    _, cand = cKDTree(np.column_stack([sx, sy])).query(centres, k=4)
    cand = cand[inverse]  # (n_pixels, 4)
    d = np.hypot(x[:, None] - sx[cand].astype(np.float32), y[:, None] - sy[cand].astype(np.float32))
    d.sort(axis=1)
    gap = (d[:, 1] - d[:, 0]) * 0.5  # distance to the cell border (exact for a straight border)
    width = 1.1  # um, half-width of the membrane
    return flat, (0.55 * np.exp(-np.square(gap / width))).astype(np.float32)


def _render_nuclei(nuc: dict, *, shape: tuple[int, int], mpp: float) -> np.ndarray:
    """Haematoxylin density of anti-aliased elliptical nuclei, accumulated with np.bincount.

    Nuclei are drawn in groups of equal stamp size (one per class), a few million stamp pixels at a time.
    """
    H, W = shape
    out = np.zeros(H * W, dtype=np.float64)
    for ci in np.unique(nuc["cls"]):
        sel = np.flatnonzero(nuc["cls"] == ci)
        half = math.ceil(float(nuc["a"][sel].max()) / mpp) + 1
        off = np.arange(-half, half + 1, dtype=np.float32)
        oy, ox = np.meshgrid(off, off, indexing="ij")
        oy, ox = oy.ravel(), ox.ravel()
        oxi, oyi = ox.astype(np.int64), oy.astype(np.int64)
        chunk = max(1, 2_000_000 // ox.size)
        for s in range(0, sel.size, chunk):
            idx = sel[s : s + chunk]
            cx, cy = nuc["x"][idx] / mpp, nuc["y"][idx] / mpp
            bx, by = np.floor(cx).astype(np.int64), np.floor(cy).astype(np.int64)
            # pixel centres relative to the nucleus centre
            dx = (bx - cx + 0.5).astype(np.float32)[:, None] + ox[None, :]
            dy = (by - cy + 0.5).astype(np.float32)[:, None] + oy[None, :]
            ct = np.cos(nuc["theta"][idx]).astype(np.float32)[:, None]
            st = np.sin(nuc["theta"][idx]).astype(np.float32)[:, None]
            a = (nuc["a"][idx] / mpp).astype(np.float32)[:, None]
            b = (nuc["b"][idx] / mpp).astype(np.float32)[:, None]
            u = (dx * ct + dy * st) / a
            v = (dy * ct - dx * st) / b
            r = np.sqrt(u * u + v * v)
            # anti-aliased edge about one pixel wide, slightly darker rim (nuclear membrane)
            val = np.clip((1.0 - r) * np.minimum(b, 4.0) + 0.5, 0.0, 1.0) * (0.85 + 0.25 * r * r)
            val *= nuc["h"][idx].astype(np.float32)[:, None]
            px = bx[:, None] + oxi[None, :]
            py = by[:, None] + oyi[None, :]
            ok = (val > 0) & (px >= 0) & (px < W) & (py >= 0) & (py < H)
            flat = py[ok] * W + px[ok]
            if flat.size:  # nuclei come in raster order: add into the band of rows they cover
                lo = int(flat.min())
                band = np.bincount(flat - lo, weights=val[ok])
                out[lo : lo + band.size] += band
    return np.minimum(out, 2.2).astype(np.float32).reshape(shape)


def _downscale(img: np.ndarray, max_size: int) -> tuple[np.ndarray, float]:
    """Downscale an (H, W, 3) uint8 image so that its longest side is at most ``max_size``."""
    from PIL import Image

    H, W = img.shape[:2]
    scale = min(1.0, max_size / max(H, W))
    if scale >= 1.0:
        return img.copy(), 1.0
    size = (max(1, round(W * scale)), max(1, round(H * scale)))
    small = np.asarray(Image.fromarray(img).resize(size, Image.Resampling.BOX))
    return small, scale


# ---------------------------------------------------------------------------------------------------------
# expression
def _gene_model(rng: np.random.Generator, n_genes: int, n_informative: int) -> dict:
    """Names, drivers, baseline means and dispersions of the genes (shared by all sections)."""
    driver = [REGIONS[i % len(REGIONS)] for i in range(n_informative)]
    counter = dict.fromkeys(REGIONS, 0)
    names = []
    for d in driver:
        counter[d] += 1
        names.append(f"{GENE_PREFIX[d]}_{counter[d]:02d}")
    n_noise = n_genes - n_informative
    names += [f"GENE{i + 1:04d}" for i in range(n_noise)]
    driver += ["none"] * n_noise
    informative = np.arange(n_genes) < n_informative
    # baseline mean counts at a library size factor of 1
    base = np.where(
        informative,
        rng.lognormal(np.log(25.0), 0.5, n_genes),
        rng.lognormal(np.log(6.0), 1.1, n_genes),
    )
    # weak secondary class per informative gene (e.g. a tumour gene also expressed a little by immune cells)
    secondary = rng.integers(0, len(REGIONS), n_genes)
    secondary_w = rng.uniform(0.0, 0.15, n_genes)
    theta = rng.uniform(4.0, 20.0, n_genes)  # NB dispersion (size); variance = mu + mu^2 / theta
    return {
        "names": names,
        "driver": driver,
        "informative": informative,
        "base": base,
        "secondary": secondary,
        "secondary_w": secondary_w,
        "theta": theta,
    }


def _counts(rng: np.random.Generator, sec: dict, genes: dict) -> np.ndarray:
    """Negative binomial counts (n_spots, n_genes) for one section."""
    fractions, nuclei = sec["fractions"], sec["nuclei"].astype(np.float64)
    n_spots = fractions.shape[0]
    disk = math.pi * (SPOT_DIAMETER_UM / 2) ** 2
    # expected nuclei of a spot fully covered by one class at average density (keep rate ~0.7)
    full = np.array([0.7 * disk / (_NUCLEI[r]["spacing"] ** 2 * math.sqrt(3) / 2) for r in REGIONS])
    # per-class signal in [0, ~1.5]: nuclei count for cellular classes, area fraction for stroma and fat
    signal = np.empty_like(fractions)
    for k, name in enumerate(REGIONS):
        signal[:, k] = nuclei[:, k] / full[k] if name in ("tumour", "immune") else fractions[:, k]
    total = nuclei.sum(axis=1)
    libsize = rng.lognormal(0.0, 0.3, n_spots) * (0.6 + 0.4 * total / max(total.mean(), 1e-9))
    region_index = {r: k for k, r in enumerate(REGIONS)}
    mean = np.empty((n_spots, len(genes["names"])))
    for g, d in enumerate(genes["driver"]):
        if d == "none":
            level = np.ones(n_spots)
        else:
            level = 0.03 + signal[:, region_index[d]] + genes["secondary_w"][g] * signal[:, genes["secondary"][g]]
        mean[:, g] = genes["base"][g] * level
    mean *= libsize[:, None]
    theta = genes["theta"][None, :]
    lam = rng.gamma(theta, mean / theta)
    return rng.poisson(lam).astype(np.float32)
