"""Shared helpers of the AnnData-facing tools: expression matrices, features, model resolution."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._validate import resolve_genes

if TYPE_CHECKING:
    from anndata import AnnData

# Models fitted in this Python process, so that `predict_expression(adata)` finds the model that
# `fit_contrastive` recorded for this AnnData (`adata.uns[key]["model_id"]`).
_MODELS: dict[str, Any] = {}


def register_model(model: Any) -> str:
    """Keep ``model`` for this process and return its id."""
    model_id = uuid.uuid4().hex
    _MODELS[model_id] = model
    return model_id


def expression_matrix(adata: AnnData, *, layer: str | None, genes: Any) -> tuple[np.ndarray, list[str]]:
    """Dense float32 expression of the selected genes, checked for NaN, inf and negative values."""
    if layer is not None and layer not in adata.layers:
        raise KeyError(
            f"layer={layer!r} is not in adata.layers (available: {list(adata.layers)}). "
            "Run `sthist.pp.normalize_expression(adata)` to write `layers['targets']`, or pass layer=None for X."
        )
    if adata.n_vars == 0:
        raise ValueError("adata has no genes: fitting needs expression. Predict on such a slide with a fitted model.")
    mask = resolve_genes(adata, genes)
    mat = adata.layers[layer] if layer is not None else adata.X
    mat = mat[:, mask]
    mat = mat.toarray() if hasattr(mat, "toarray") else np.asarray(mat)
    mat = np.asarray(mat, dtype=np.float32)
    where = f"adata.layers[{layer!r}]" if layer is not None else "adata.X"
    if not np.isfinite(mat).all():
        raise ValueError(f"{where} holds NaN or infinite values; remove those spots/genes or fill them first.")
    if (mat < 0).any():
        raise ValueError(
            f"{where} holds negative values; contrastive targets must be non-negative expression "
            "(counts, or `sthist.pp.normalize_expression(adata)` which writes layers['targets'])."
        )
    return mat, adata.var_names[mask].tolist()


def image_inputs(
    adata: AnnData, *, patches_key: str, features_key: str | None, need_patches: bool = False
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Return (patches, features) from ``obsm``; exactly one of them is used downstream.

    Features are loaded into memory as float32 (n_obs x d is small even for millions of spots); patches are returned
    as stored: numpy, or a lazy array (dask, zarr) that is never loaded whole.
    """
    if features_key is not None and not need_patches:
        if features_key not in adata.obsm:
            raise KeyError(
                f"adata.obsm[{features_key!r}] is missing; run `sthist.pp.embed_patches(adata, key_added={features_key!r})` "
                "first, or pass features_key=None to compute features from the patches."
            )
        feats = np.asarray(adata.obsm[features_key], dtype=np.float32)
        if not np.isfinite(feats).all():
            raise ValueError(f"adata.obsm[{features_key!r}] holds NaN or infinite values.")
        return None, feats
    if patches_key not in adata.obsm:
        raise KeyError(
            f"adata.obsm[{patches_key!r}] is missing: run `sthist.pp.extract_patches(adata, key_added={patches_key!r})` "
            "first (or pass features_key= naming embeddings from `sthist.pp.embed_patches`)."
        )
    patches = adata.obsm[patches_key]
    if not (hasattr(patches, "shape") and hasattr(patches, "dtype") and hasattr(patches, "__getitem__")):
        patches = np.asarray(patches)
    # lazy patches (a dask array over a zarr store, from `extract_patches(store=...)`) stay lazy: they are read
    # chunk by chunk by the encoder; only the small features are loaded into memory
    if len(patches.shape) != 4 or patches.shape[-1] != 3 or patches.dtype != np.uint8:
        raise ValueError(
            f"adata.obsm[{patches_key!r}] must be uint8 patches of shape (n_obs, S, S, 3) as written by "
            f"`sthist.pp.extract_patches`; got {patches.dtype} {patches.shape}."
        )
    return patches, None


def load_model(path: str | Path) -> Any:
    """Load a saved model folder of any kind (contrastive or ridge)."""
    import json

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no model folder at {str(path)!r}; pass a fitted model or the folder `model.save(dir)` wrote.")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{str(path)!r} is not a saved sthist model: config.json is missing.")
    try:
        method = json.loads(cfg_file.read_text()).get("method")
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(path)!r}: config.json is corrupted ({e}); save the model again.") from None
    if method == "ridge":
        from ._ridge import RidgeModel

        return RidgeModel.load(path)
    from .._engine.model import ContrastiveModel

    return ContrastiveModel.load(path)


def resolve_model(adata: AnnData, model: Any) -> Any:
    """A model object, a saved folder, or the model `fit_contrastive` recorded for this AnnData."""
    if model is None:
        recorded = {k: v for k, v in adata.uns.items() if isinstance(v, dict) and ("model_id" in v or "model_dir" in v)}
        if not recorded:
            raise ValueError(
                "no model given and none recorded for this AnnData: pass a model "
                "(`model = sthist.tl.fit_contrastive(ref)`) or the folder it was saved to "
                "(`sthist.tl.predict_expression(adata, 'my_model/')`)."
            )
        if len(recorded) > 1:
            raise ValueError(f"several models are recorded in adata.uns {sorted(recorded)}: pass the one to use as `model=`.")
        key, entry = next(iter(recorded.items()))
        if entry.get("model_id") in _MODELS:
            return _MODELS[entry["model_id"]]
        if entry.get("model_dir") and Path(entry["model_dir"]).is_dir():
            return load_model(entry["model_dir"])
        raise ValueError(
            f"adata.uns[{key!r}] records a model that is no longer in memory and was not saved "
            "(fit it with `save_dir=` to keep it); pass the model or its folder as `model=`."
        )
    if isinstance(model, str | Path):
        return load_model(model)
    if not (hasattr(model, "predict") and hasattr(model, "genes")):
        raise TypeError(
            f"model must be a fitted sthist model or the folder it was saved to, got {type(model).__name__}."
        )
    return model
