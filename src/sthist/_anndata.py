"""The one place where sthist's tools read from and record into an AnnData.

* :func:`get_matrix`: ``X`` or a layer, for a gene selection, as a checked dense float32 matrix;
* :func:`resolve_libraries`: which section each spot belongs to (``library_key``, or the one ``obs`` column that
  names sections), never guessed silently;
* :func:`find_features` / :func:`image_features`: encoder embeddings of the spots for an encoder spec, cached in
  ``obsm`` or computed from the patches;
* :func:`patch_geometry`: the patch size and µm/px recorded by :func:`sthist.pp.extract_patches`;
* :func:`resolve_mpp`: the one rule for the microns per pixel of an image (used by ``extract_patches``,
  ``tile_tissue`` and ``predict_slide``);
* :func:`record` and :func:`to_uns`: the single serialiser for everything written into ``adata.uns``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _constants as C
from ._validate import resolve_genes

if TYPE_CHECKING:
    from anndata import AnnData

#: ``obs`` columns that name sections when ``library_key`` is not given.
LIBRARY_COLUMNS = (C.SECTION_KEY, "library_id")


# ---- uns ---------------------------------------------------------------------------------------------------------
def to_uns(obj: Any) -> Any:
    """Make a nested structure writable to h5ad: plain containers, str keys, no ``None``.

    Lists and tuples of numbers (or of booleans) become numpy arrays, empty ones empty arrays, numpy scalars Python
    scalars, ``None`` the empty string; numpy arrays, data frames, strings and numbers (NaN included) are kept, other
    objects become their ``str``.

    """
    if isinstance(obj, dict):
        return {str(k): to_uns(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        vals = [to_uns(v) for v in obj]
        if not vals:
            return np.zeros(0)
        numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in vals)
        if numbers or all(isinstance(v, bool) for v in vals):
            return np.asarray(vals)
        return vals
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None:
        return ""
    if isinstance(obj, np.ndarray | str | int | float | bool):
        return obj
    import pandas as pd

    if isinstance(obj, pd.DataFrame):  # h5ad stores data frames in uns
        return obj
    return str(obj)


def record(adata: AnnData, key_added: str, entry: dict[str, Any]) -> None:
    """Write ``entry`` (``params`` and whatever a tool records) to ``adata.uns[key_added]`` through :func:`to_uns`."""
    adata.uns[key_added] = to_uns(entry)


def uns_params(adata: AnnData, key: str | None) -> dict[str, Any]:
    """``adata.uns[key]['params']`` as a dict (empty when absent)."""
    entry = adata.uns.get(key) if key is not None else None
    params = entry.get("params", {}) if isinstance(entry, dict) else {}
    return dict(params) if isinstance(params, dict) else {}


# ---- matrices ----------------------------------------------------------------------------------------------------
def layer_matrix(adata: AnnData, layer: str | None, *, fn: str, what: str = "expression", hint: str = "") -> Any:
    """``adata.X`` or ``adata.layers[layer]`` as stored (dense or sparse), raising with the available layers."""
    if layer is None:
        if adata.X is None:
            raise ValueError(
                f"{fn}: adata.X is empty, so there is no {what} there; pass layer= naming the layer that holds it "
                f"(available layers: {list(adata.layers.keys())})."
            )
        return adata.X
    if not isinstance(layer, str) or layer not in adata.layers:
        raise KeyError(
            f"{fn}: adata.layers[{layer!r}] ({what}) is missing; available layers: {list(adata.layers.keys())}. "
            f"Use layer=None for adata.X.{hint}"
        )
    return adata.layers[layer]


def get_matrix(
    adata: AnnData,
    *,
    layer: str | None = None,
    genes: Any = None,
    nonnegative: bool = True,
    what: str = "expression",
) -> tuple[np.ndarray, list[str]]:
    """Dense float32 ``X`` or ``layers[layer]`` of the selected genes, checked for NaN / inf (and negatives).

    Returns the matrix and the names of its genes.
    """
    mat = layer_matrix(
        adata,
        layer,
        fn="sthist",
        what=what,
        hint=" Run `sthist.pp.normalize_expression(adata)` to write `layers['targets']`.",
    )
    if adata.n_vars == 0:
        raise ValueError(f"adata has no genes, so it holds no {what}. Predict on such a slide with a fitted model.")
    mask = resolve_genes(adata, genes)
    mat = mat[:, mask]
    mat = mat.toarray() if hasattr(mat, "toarray") else np.asarray(mat)
    mat = np.asarray(mat, dtype=np.float32)
    where = f"adata.layers[{layer!r}]" if layer is not None else "adata.X"
    if not np.isfinite(mat).all():
        bad = np.flatnonzero(~np.isfinite(mat).all(1))
        raise ValueError(
            f"{where} holds NaN or infinite values for {bad.size} spot(s), e.g. {adata.obs_names[bad[:5]].tolist()}; "
            "remove those spots/genes or fill them first."
        )
    if mat.shape[0] > 1 and mat.shape[1] > 0 and bool((mat.max(axis=0) == mat.min(axis=0)).all()):
        values = np.unique(mat[0])[:3].tolist()
        raise ValueError(
            f"{where} has no variance in any of its {mat.shape[1]} selected genes over the {mat.shape[0]} spots "
            f"(every gene takes one value, e.g. {values}): there is nothing to learn or score. Check that "
            f"layer={layer!r} holds the expression (run `sthist.pp.normalize_expression(adata)` on the counts), that "
            "the gene selection is not only empty genes (`sthist.pp.select_genes(adata, flavor='heg')`), and that "
            "the spots are not all empty (e.g. aggregate small bins to a coarser size first)."
        )
    if nonnegative and (mat < 0).any():
        raise ValueError(
            f"{where} holds negative values; contrastive targets must be non-negative expression "
            "(counts, or `sthist.pp.normalize_expression(adata)` which writes layers['targets'])."
        )
    return mat, adata.var_names[mask].tolist()


# ---- the scale of expression: what a model is fitted on and what it is scored against ---------------------------
class CountsWarning(UserWarning):
    """A model is being fitted on raw counts (non-negative integers) instead of normalised expression."""


#: Scale labels that say nothing about the values (no comparison is made with them).
UNKNOWN_SCALE = "unknown"
COUNTS_SCALE = "counts"
#: ``obs`` values sampled when checking whether a matrix holds counts.
_COUNT_SAMPLE = 1_000_000


def is_count_like(mat: Any) -> bool:
    """Whether a (dense or sparse) matrix holds counts: non-negative integers, not all zero (a sample is checked)."""
    from scipy import sparse

    values = mat.data if sparse.issparse(mat) else np.asarray(mat).ravel()
    if values.size > _COUNT_SAMPLE:
        values = values[np.linspace(0, values.size - 1, _COUNT_SAMPLE).astype(np.int64)]
    values = np.asarray(values)
    if values.size == 0 or not np.issubdtype(values.dtype, np.number):
        return False
    if not np.isfinite(values).all() or (values < 0).any() or not (values > 0).any():
        return False
    return bool(np.array_equal(values, np.round(values)))


def _library_label(genes: Any) -> str:
    """``'all'``, or the number of library genes and a short hash of their sorted names (to compare two scales)."""
    import hashlib

    if isinstance(genes, str):
        return genes
    names = sorted(str(g) for g in np.asarray(genes).ravel())
    digest = hashlib.sha256("\n".join(names).encode()).hexdigest()[:12]
    return f"{len(names)} genes ({digest})"


def expression_scale(adata: AnnData, layer: str | None, mat: Any = None) -> dict[str, Any]:
    """The record of the scale of ``X`` (``layer=None``) or ``layers[layer]``: what a model is fitted on.

    ``{'layer': 'X' | name, 'scale': ...}`` where ``scale`` is the ``flavor`` that
    :func:`sthist.pp.normalize_expression` recorded for the layer (with its ``target_sum``, the library genes and,
    when given by name, ``library_genes_source``), ``'scanpy log1p'`` for an ``X`` that :func:`scanpy.pp.log1p`
    marked, ``'counts'`` for non-negative integers, else ``'unknown'``. ``mat`` is the matrix when already read.
    """
    name = "X" if layer is None else str(layer)
    params = uns_params(adata, layer) if layer is not None else {}
    if "flavor" in params and "log_base" in params:  # written by normalize_expression
        record: dict[str, Any] = {"layer": name, "scale": str(params["flavor"])}
        if params["flavor"] != "none":
            record["target_sum"] = float(params.get("target_sum", 1e4))
            record["library_genes"] = _library_label(params.get("genes", "all"))
            if params.get("genes_source"):
                record["library_genes_source"] = str(params["genes_source"])
        return record
    if layer is None and isinstance(adata.uns.get("log1p"), dict):
        base = adata.uns["log1p"].get("base")
        return {"layer": name, "scale": "scanpy log1p", "log_base": "e" if base in (None, "") else str(base)}
    if mat is None:
        mat = adata.X if layer is None else adata.layers.get(layer)
    if mat is not None and is_count_like(mat):
        return {"layer": name, "scale": COUNTS_SCALE}
    return {"layer": name, "scale": UNKNOWN_SCALE}


def _scale_key(record: dict[str, Any]) -> tuple:
    return tuple(record.get(k) for k in ("scale", "target_sum", "library_genes", "log_base"))


def describe_scale(record: dict[str, Any]) -> str:
    """``record`` in words, e.g. ``"layers['targets'] (normalize_expression flavor='hist2st', ...)"``."""
    where = "adata.X" if record.get("layer") == "X" else f"layers[{record.get('layer')!r}]"
    scale = record.get("scale", UNKNOWN_SCALE)
    if scale in (COUNTS_SCALE, UNKNOWN_SCALE):
        return f"{where} ({'raw counts' if scale == COUNTS_SCALE else 'scale not recorded'})"
    if scale == "scanpy log1p":
        return f"{where} (scanpy's log1p, base {record.get('log_base', 'e')})"
    extra = "" if scale == "none" else f", target_sum={record.get('target_sum', 1e4):g}, library genes: "
    if scale != "none":
        extra += str(record.get("library_genes_source") or record.get("library_genes", "all"))
    return f"{where} (normalize_expression flavor={scale!r}{extra})"


def normalize_call(record: dict[str, Any], target: str = "adata") -> str:
    """The :func:`sthist.pp.normalize_expression` call that writes a layer on the scale of ``record``."""
    scale = record.get("scale")
    args = [target, f"flavor={scale!r}"]
    genes = record.get("library_genes_source") or record.get("library_genes")
    if scale not in ("none",) and genes not in (None, "all"):
        args.append(f"genes={genes!r}" if record.get("library_genes_source") else "genes=<the model's library genes>")
    if scale not in ("none",) and record.get("target_sum") not in (None, 1e4):
        args.append(f"target_sum={record['target_sum']:g}")
    if record.get("layer") not in (None, "X", "targets"):
        args.append(f"key_added={record['layer']!r}")
    return f"sthist.pp.normalize_expression({', '.join(args)})"


def fit_expression(
    adata: AnnData, *, layer: str | None, genes: Any, fn: str, nonnegative: bool = True, what: str = "target"
) -> tuple[np.ndarray, list[str], dict[str, Any]]:
    """:func:`get_matrix` for a fit, with the record of its scale; raw counts warn (:class:`CountsWarning`)."""
    import warnings

    mat, names = get_matrix(adata, layer=layer, genes=genes, nonnegative=nonnegative, what=what)
    record = expression_scale(adata, layer, mat)
    if record["scale"] == COUNTS_SCALE:
        where = "adata.X" if layer is None else f"adata.layers[{layer!r}]"
        warnings.warn(
            f"{fn}: {where} holds raw counts (non-negative integers): the model will predict counts, on the scale of "
            "the training data's sequencing depth, and be scored against counts. Normalise first, e.g. "
            "`sthist.pp.normalize_expression(adata, flavor='log1p')` (or flavor='hist2st'), and fit with "
            "layer='targets'.",
            CountsWarning,
            stacklevel=3,
        )
    return mat, names, record


def resolve_truth(
    adata: AnnData, *, layer: str, true_layer: str | None, fn: str
) -> tuple[Any, str | None, dict[str, Any] | None]:
    """The measured expression a prediction ``layer`` is scored against, checked to be on the model's scale.

    ``true_layer=None`` takes the layer the prediction's model was fitted on (``uns[layer]['params']['targets']``,
    written by :func:`sthist.tl.predict_expression` and :func:`sthist.tl.cross_validate`); ``'X'`` names
    ``adata.X``. A truth on another recorded scale than the model's (another normalisation, or raw counts against
    normalised predictions) raises. Returns the matrix as stored, the layer name (``None`` for ``X``) and the
    model's record (``None`` when the prediction records none).
    """
    entry = adata.uns.get(layer) if isinstance(layer, str) else None
    params = entry.get("params", {}) if isinstance(entry, dict) else {}
    model_rec = params.get("targets") if isinstance(params, dict) else None
    model_rec = dict(model_rec) if isinstance(model_rec, dict) and model_rec.get("layer") else None
    if true_layer is None:
        if model_rec is None:
            raise ValueError(
                f"{fn}: adata.uns[{layer!r}] does not record which expression the model behind layers[{layer!r}] was "
                "fitted on, so the truth to score against is not known. Pass true_layer= naming the layer on the "
                "prediction's scale (true_layer='X' for adata.X), e.g. true_layer='targets'."
            )
        true_layer = model_rec["layer"]
        if true_layer != "X" and true_layer not in adata.layers:
            how = (
                f"make it with `{normalize_call(model_rec)}` (the normalisation the model was fitted with)"
                if model_rec.get("scale") not in (COUNTS_SCALE, UNKNOWN_SCALE, "scanpy log1p")
                else "add it"
            )
            raise KeyError(
                f"{fn}: the model behind layers[{layer!r}] was fitted on {describe_scale(model_rec)}, which this "
                f"AnnData lacks: {how}, or pass true_layer= naming a layer on that scale. Available layers: "
                f"{list(adata.layers.keys())}."
            )
    name = None if true_layer == "X" and "X" not in adata.layers else true_layer
    mat = layer_matrix(adata, name, fn=fn, what="true expression")
    if model_rec is not None:
        check_scale(adata, name, mat, model_rec, fn=fn, what=f"the prediction layers[{layer!r}]")
    return mat, name, model_rec


def check_scale(adata: AnnData, layer: str | None, mat: Any, model_rec: dict[str, Any], *, fn: str, what: str) -> None:
    """Raise when ``X`` / ``layers[layer]`` is on another recorded scale than the model's record ``model_rec``."""
    truth_rec = expression_scale(adata, layer, mat)
    known = UNKNOWN_SCALE not in (truth_rec["scale"], model_rec.get("scale", UNKNOWN_SCALE))
    if known and _scale_key(truth_rec) != _scale_key(model_rec):
        fix = (
            f"`{normalize_call(model_rec)}` and use that layer"
            if model_rec.get("scale") not in (COUNTS_SCALE, "scanpy log1p")
            else "a layer on the model's scale"
        )
        raise ValueError(
            f"{fn}: the truth {describe_scale(truth_rec)} is on another scale than {what}, whose model was fitted on "
            f"{describe_scale(model_rec)}: the numbers would compare different scales. Use {fix}, or pass a layer on "
            "the model's scale."
        )


# ---- libraries and coordinates -----------------------------------------------------------------------------------
def resolve_libraries(adata: AnnData, *, library_key: str | None = None, purpose: str = "") -> np.ndarray | None:
    """The section label of every spot, or ``None`` when the spots come from one section.

    ``library_key`` names the ``obs`` column; without it, an ``obs`` column of :data:`LIBRARY_COLUMNS` with more
    than one value means several sections and raises with the choices (``purpose`` says why it matters).
    """
    if library_key is not None:
        if library_key not in adata.obs:
            raise KeyError(f"library_key={library_key!r} is not a column of adata.obs (columns: {list(adata.obs)}).")
        return adata.obs[library_key].astype(str).to_numpy()
    several = [c for c in LIBRARY_COLUMNS if c in adata.obs and adata.obs[c].nunique() > 1]
    if several:
        why = f" {purpose}" if purpose else ""
        raise ValueError(
            f"adata holds several sections (adata.obs[{several[0]!r}] has {adata.obs[several[0]].nunique()} values):"
            f" pass library_key= naming the obs column of each spot's section, e.g. library_key={several[0]!r}.{why}"
        )
    return None


def spot_coords(adata: AnnData, *, spatial_key: str = C.SPATIAL_KEY, required_by: str | None = None):
    """``obsm[spatial_key]`` as float64 (n, 2), or ``None`` when absent (``required_by`` makes absence an error)."""
    if spatial_key in adata.obsm:
        return np.asarray(adata.obsm[spatial_key], dtype=np.float64)[:, :2]
    if required_by is not None:
        raise KeyError(
            f"{required_by} uses the spots' positions, but adata.obsm[{spatial_key!r}] is missing: add the spot "
            "centres in full-resolution pixels (see `sthist.io`)."
        )
    return None


def spatial_inputs(
    adata: AnnData, *, spatial_key: str, library_key: str | None, needs_space: bool, method: str
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Coordinates and section labels for a method; a method that uses spatial neighbours requires both."""
    required = f"method {method!r}" if needs_space else None
    coords = spot_coords(adata, spatial_key=spatial_key, required_by=required)
    if library_key is None and not needs_space:
        return coords, None
    purpose = f"Method {method!r} uses spatial neighbours, which must not join spots of different sections."
    return coords, resolve_libraries(adata, library_key=library_key, purpose=purpose)


# ---- microns per pixel --------------------------------------------------------------------------------------------
#: 10x Genomics defines ``spot_diameter_fullres`` as "the number of pixels that span the diameter of a theoretical
#: 65µm spot in the original, full-resolution image" (Space Ranger 1.3 documentation, "Spatial outputs" /
#: scalefactors_json.json). The capture spots are 55 µm wide on a 100 µm pitch; the 65 µm circle is the one the
#: pixel diameter refers to, hence ``microns_per_pixel = 65 / spot_diameter_fullres``.
VISIUM_SPOT_DIAMETER_UM = 65.0

MPP_FROM_ARGUMENT = "mpp="
MPP_FROM_SCALEFACTORS = "scalefactors['microns_per_pixel']"
MPP_FROM_SPOT_DIAMETER = "65 / scalefactors['spot_diameter_fullres'] (10x Visium definition)"
MPP_FROM_FILE = "image file metadata (OME PhysicalSizeX / openslide mpp-x)"
#: ``uns['spatial'][lib]['metadata'][C.OBS_KIND]`` values for which ``spot_diameter_fullres`` is not a Visium spot
_NOT_VISIUM_SPOTS = ("bins", "cells")


def _positive_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) and value > 0 else None


def _is_hest_library(entry: Any) -> bool:
    """A HEST-1k ``st/<id>.h5ad`` library: its ``spot_diameter_fullres`` is 55 µm in pixels, not 10x's 65 µm."""
    sf = entry.get(C.SCALEFACTORS, {}) if isinstance(entry, dict) else {}
    return isinstance(sf, dict) and "tissue_downscaled_fullres_scalef" in sf


def library_mpp(entry: Any) -> tuple[float | None, str | None]:
    """µm/px of one library entry ``uns['spatial'][lib]`` from its scale factors, and where the value comes from.

    ``scalefactors['microns_per_pixel']`` when present; otherwise, when ``spot_diameter_fullres`` is present, 10x's
    definition ``65 / spot_diameter_fullres`` (the rule of :func:`sthist.io.read_visium`), except for libraries whose
    ``metadata['obs_kind']`` says they hold bins or cells and for HEST-1k tables (whose diameter is 55 µm); else
    ``(None, None)``.
    """
    if not isinstance(entry, dict):
        return None, None
    sf = entry.get(C.SCALEFACTORS, {}) or {}
    if not isinstance(sf, dict):
        return None, None
    mpp = _positive_float(sf.get(C.MPP))
    if mpp is not None:
        return mpp, MPP_FROM_SCALEFACTORS
    diameter = _positive_float(sf.get(C.SPOT_DIAMETER))
    meta = entry.get(C.METADATA, {}) or {}
    kind = meta.get(C.OBS_KIND) if isinstance(meta, dict) else None
    if diameter is None or kind in _NOT_VISIUM_SPOTS or _is_hest_library(entry):
        return None, None
    return VISIUM_SPOT_DIAMETER_UM / diameter, MPP_FROM_SPOT_DIAMETER


def spot_pitch_px(coords: np.ndarray | None) -> float | None:
    """Median distance of each spot to its nearest neighbour (pixels), from at most 2,000 spots."""
    if coords is None or len(coords) < 2:
        return None
    from scipy.spatial import cKDTree

    pts = np.asarray(coords, dtype=np.float64)[:, :2]
    pts = pts[np.isfinite(pts).all(axis=1)]
    if len(pts) > 2000:
        pts = pts[np.linspace(0, len(pts) - 1, 2000).astype(np.int64)]
    if len(pts) < 2:
        return None
    dist, _ = cKDTree(pts).query(pts, k=2)
    d = float(np.median(dist[:, 1]))
    return d if d > 0 else None


def mpp_unknown_message(
    what: str,
    *,
    shape: tuple[int, int] | None = None,
    coords: np.ndarray | None = None,
    entry: Any = None,
    fix: str,
) -> str:
    """Why the µm/px of ``what`` is unknown, with values computed from the data (spot pitch, image size)."""
    parts = [f"the microns per pixel of {what} are unknown"]
    sf = entry.get(C.SCALEFACTORS, {}) if isinstance(entry, dict) else {}
    if _is_hest_library(entry):
        parts.append(
            "(this looks like a HEST-1k table, whose spot_diameter_fullres is a 55 µm spot, not 10x's 65 µm: read the "
            "sample with `sthist.io.read_hest(root)`, which takes the pixel size from metadata/<id>.json)"
        )
    elif isinstance(sf, dict) and C.SPOT_DIAMETER in sf:
        meta = entry.get(C.METADATA, {}) or {}
        kind = meta.get(C.OBS_KIND) if isinstance(meta, dict) else None
        if kind in _NOT_VISIUM_SPOTS:
            parts.append(f"(its observations are {kind}, so spot_diameter_fullres is not a 65 µm Visium spot)")
    pitch = spot_pitch_px(coords)
    hints = []
    if pitch is not None:
        hints.append(
            f"its spots are {pitch:.1f} px apart (median nearest neighbour): on a Visium array (100 µm pitch) that "
            f"is {100.0 / pitch:.4f} µm/px, on the original ST array (200 µm) {200.0 / pitch:.4f} µm/px"
        )
    if shape is not None:
        H, W = shape
        hints.append(
            f"the image is {W} x {H} px, i.e. {W * 0.25 / 1000:.2f} x {H * 0.25 / 1000:.2f} mm at 0.25 µm/px (40x) "
            f"or {W * 0.5 / 1000:.2f} x {H * 0.5 / 1000:.2f} mm at 0.5 µm/px (20x)"
        )
    msg = " ".join(parts) + "."
    if hints:
        msg += " For orientation: " + "; ".join(hints) + "."
    return msg + " " + fix


def resolve_mpp(
    *,
    given: float | None = None,
    entry: Any = None,
    source_mpp: float | None = None,
) -> tuple[float | None, str | None]:
    """The one rule for the µm per pixel of a full-resolution image, and where the value comes from.

    In this order: ``given`` (an explicit ``mpp=``); the library's scale factors (:func:`library_mpp`:
    ``microns_per_pixel``, else ``65 / spot_diameter_fullres`` for Visium spots); the image file's own metadata
    (``source_mpp``). ``(None, None)`` when none is known.
    """
    value = _positive_float(given)
    if value is not None:
        return value, MPP_FROM_ARGUMENT
    value, origin = library_mpp(entry)
    if value is not None:
        return value, origin
    value = _positive_float(source_mpp)
    if value is not None:
        return value, MPP_FROM_FILE
    return None, None


# ---- patches and features ----------------------------------------------------------------------------------------
def patch_geometry(adata: AnnData, key: str) -> tuple[int | None, float | None]:
    """``(patch_size, mpp)`` recorded in ``adata.uns[key]['params']`` (patches or features), ``None`` where unknown."""
    params = uns_params(adata, key)
    size, mpp = params.get("patch_size"), params.get("mpp")
    size = int(size) if isinstance(size, int | float | np.integer | np.floating) and size > 0 else None
    mpp = float(mpp) if isinstance(mpp, int | float | np.integer | np.floating) and mpp > 0 else None
    return size, mpp


def get_patches(adata: AnnData, *, patches_key: str) -> Any:
    """``obsm[patches_key]`` as stored (numpy, or a lazy dask / zarr array that is never loaded whole), checked."""
    if patches_key not in adata.obsm:
        raise KeyError(
            f"adata.obsm[{patches_key!r}] is missing: run `sthist.pp.extract_patches(adata, key_added={patches_key!r})` "
            "first (or pass features_key= naming embeddings from `sthist.pp.embed_patches`)."
        )
    patches = adata.obsm[patches_key]
    if not (hasattr(patches, "shape") and hasattr(patches, "dtype") and hasattr(patches, "__getitem__")):
        patches = np.asarray(patches)
    if len(patches.shape) != 4 or patches.shape[-1] != 3 or patches.dtype != np.uint8:
        raise ValueError(
            f"adata.obsm[{patches_key!r}] must be uint8 patches of shape (n_obs, S, S, 3) as written by "
            f"`sthist.pp.extract_patches`; got {patches.dtype} {patches.shape}."
        )
    return patches


def _load_features(adata: AnnData, key: str) -> np.ndarray:
    feats = np.asarray(adata.obsm[key], dtype=np.float32)
    if feats.ndim != 2:
        raise ValueError(f"adata.obsm[{key!r}] must be 2-d (n_obs, n_features), got shape {feats.shape}.")
    if not np.isfinite(feats).all():
        bad = np.flatnonzero(~np.isfinite(feats).all(1))
        raise ValueError(
            f"adata.obsm[{key!r}] holds NaN or infinite values for {bad.size} spot(s), e.g. "
            f"{adata.obs_names[bad[:5]].tolist()}; drop them or recompute the embeddings (`sthist.pp.embed_patches`)."
        )
    return feats


@dataclass
class Features:
    """Image features of the spots.

    The values, the ``obsm`` key they are (or will be) stored under, the encoder params of
    ``sthist.pp.embed_patches``, and whether they were computed now (and are not yet in ``adata``).
    """

    values: np.ndarray
    key: str
    params: dict[str, Any]
    computed: bool = False

    def store(self, adata: AnnData) -> None:
        """Cache features computed now in ``adata.obsm[key]`` / ``adata.uns[key]`` (as :func:`embed_patches`)."""
        if self.computed:
            adata.obsm[self.key] = self.values
            record(adata, self.key, {"params": self.params})


def find_features(
    adata: AnnData,
    *,
    encoder: str,
    pretrained: bool = False,
    checkpoint: str | None = None,
    features_key: str | None = None,
) -> Features | None:
    """Embeddings of the spots made by this encoder, or ``None``.

    ``obsm[features_key]`` (checked against the encoder when its params say which made them), else the cache of
    :func:`sthist.pp.embed_patches` for the encoder, else ``None``.
    """
    from .pp._embed import default_key

    if features_key is not None:
        if features_key not in adata.obsm:
            raise KeyError(
                f"adata.obsm[{features_key!r}] is missing (obsm keys: {list(adata.obsm.keys())}); run "
                f"`sthist.pp.embed_patches(adata, key_added={features_key!r})` first, or pass features_key=None to "
                "compute features from the patches."
            )
        params = uns_params(adata, features_key)
        made_by = params.get("encoder")
        if encoder and made_by and made_by != encoder:
            raise ValueError(
                f"adata.obsm[{features_key!r}] was made with encoder {made_by!r}, but {encoder!r} is wanted here; run "
                f"`sthist.pp.embed_patches(adata, encoder={encoder!r})` or pass features_key=None to encode the "
                "patches with it."
            )
        return Features(_load_features(adata, features_key), features_key, params)
    if not encoder:
        return None
    key = default_key(encoder)
    params = uns_params(adata, key)
    same = (
        key in adata.obsm
        and params.get("encoder") == encoder
        and bool(params.get("pretrained")) == bool(pretrained)
        and (params.get("checkpoint") or "") == (str(checkpoint) if checkpoint else "")
    )
    return Features(_load_features(adata, key), key, params) if same else None


def image_features(
    adata: AnnData,
    *,
    encoder: str,
    pretrained: bool = False,
    checkpoint: str | None = None,
    patches_key: str = C.PATCHES_KEY,
    features_key: str | None = None,
    device: str | None = None,
    progress: bool = True,
) -> Features:
    """:func:`find_features`, else the patches encoded now (``computed=True``; :meth:`Features.store` caches them)."""
    from .pp._embed import default_key, encode

    found = find_features(
        adata, encoder=encoder, pretrained=pretrained, checkpoint=checkpoint, features_key=features_key
    )
    if found is not None:
        return found
    patches = get_patches(adata, patches_key=patches_key)
    values, params = encode(
        adata,
        patches,
        encoder=encoder,
        pretrained=pretrained,
        checkpoint=None if checkpoint is None else str(checkpoint),
        patches_key=patches_key,
        device=device,
        progress=progress,
    )
    return Features(values, default_key(encoder), params, computed=True)
