"""`predict_expression`: expression of new tissue from its H&E, into an AnnData layer."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .. import _constants as C
from .._docs import inject_docs
from .._logging import info
from .._validate import check_adata, check_choice, check_positive_int
from ..pp._embed import encode
from ._fit import _h5ad_safe, cached_features, spatial_inputs
from ._utils import image_inputs, resolve_model

if TYPE_CHECKING:
    from anndata import AnnData


def _model_inputs(adata: AnnData, model: Any, *, patches_key: str, features_key: str | None) -> dict[str, np.ndarray]:
    """What the model predicts from: encoder features when they match, else the patches."""
    if getattr(model, "method", None) == "ridge":
        key = features_key or model.features_key
        if key in adata.obsm:
            return {"features": image_inputs(adata, patches_key=patches_key, features_key=key)[1]}
        enc = model.encoder_params.get("encoder")
        if not enc:
            raise KeyError(
                f"adata.obsm[{key!r}] is missing and the ridge model does not record which encoder made its features; "
                f"run `sthist.pp.embed_patches(adata, key_added={key!r})` with the encoder used for fitting."
            )
        patches, _ = image_inputs(adata, patches_key=patches_key, features_key=None)
        feats, _ = encode(
            adata,
            patches,
            encoder=enc,
            pretrained=bool(model.encoder_params.get("pretrained")),
            checkpoint=model.encoder_params.get("checkpoint") or None,
            patches_key=patches_key,
            progress=False,
        )
        return {"features": feats}
    if model.finetuned:
        return {"images": image_inputs(adata, patches_key=patches_key, features_key=None, need_patches=True)[0]}
    enc = model.config["encoder"]
    if features_key is not None:
        made_by = (adata.uns.get(features_key) or {}).get("params", {}).get("encoder") if isinstance(
            adata.uns.get(features_key), dict
        ) else None
        if made_by is not None and made_by != enc["spec"]:
            raise ValueError(
                f"adata.obsm[{features_key!r}] was made with encoder {made_by!r}, but the model was trained on "
                f"{enc['spec']!r} features; run `sthist.pp.embed_patches(adata, encoder={enc['spec']!r})` or pass "
                "features_key=None to encode the patches with the model's encoder."
            )
    key = features_key or cached_features(
        adata, encoder=enc["spec"], pretrained=bool(enc.get("pretrained")), checkpoint=enc.get("checkpoint")
    )
    if key is not None:
        return {"features": image_inputs(adata, patches_key=patches_key, features_key=key)[1]}
    return {"images": image_inputs(adata, patches_key=patches_key, features_key=None)[0]}


def _retrieval_settings(model: Any, k: int | None, weighting: str | None) -> tuple[int, str]:
    """The caller's k and weighting, else the method's paper values (k capped at a third of the bank)."""
    config = getattr(model, "config", None)
    paper = config.get("prediction_defaults", {}) if isinstance(config, dict) else {}
    if weighting is None:
        weighting = paper.get("weighting", "average")
    check_choice("weighting", weighting, ["average", "distance", "softmax"])
    if k is not None:
        return check_positive_int("k", k), weighting
    k = int(paper.get("k", 50))
    bank = getattr(model, "bank_embeddings", None)
    if bank is not None and k > max(1, bank.shape[0] // 3):
        k = max(1, bank.shape[0] // 3)
        info(f"    k reduced to {k}, a third of the {bank.shape[0]} reference spots")
    return k, weighting


@inject_docs
def predict_expression(
    adata: AnnData,
    model: Any = None,
    *,
    k: int | None = None,
    weighting: Literal["average", "distance", "softmax"] | None = None,
    genes: Any = None,
    patches_key: str = C.PATCHES_KEY,
    features_key: str | None = None,
    spatial_key: str = C.SPATIAL_KEY,
    library_key: str | None = None,
    key_added: str = C.PREDICTED_KEY,
    batch_size: int = 256,
    chunk_size: int = 4096,
    index: Literal["exact", "faiss-ivf"] = "exact",
    n_probe: int = 32,
    device: str | None = None,
    progress: bool = True,
    copy: bool = False,
) -> AnnData | None:
    """Predict the expression of every spot from its H&E patch.

    Retrieval methods (BLEEP) embed each query patch, find its ``k`` nearest reference spots in the joint
    space and aggregate their expression; regression models (ridge, NH2ST) map image features to expression.
    The caller does not need to know which: the model says.

    Parameters
    ----------
    {adata}
        It needs patches (:func:`sthist.pp.extract_patches`) or the embeddings the model was trained on; it
        needs no counts: a new H&E slide works.
    model
        A fitted model (:func:`sthist.tl.fit_contrastive`, :func:`sthist.tl.fit_ridge`), the folder it was
        saved to, or ``None`` for the model that :func:`~sthist.tl.fit_contrastive` recorded for this AnnData.
    k
        Number of reference spots retrieved per query (retrieval models). ``None``: the method's paper value
        (BLEEP 50, mclSTExp 200), at most a third of the reference bank.
    weighting
        How retrieved profiles are combined: ``'average'`` (BLEEP), ``'distance'`` (weights ∝ 1/d², mclSTExp)
        or ``'softmax'`` over similarities. ``None``: the method's paper choice.
    genes
        Subset of the model's genes to write (list of names); ``None`` writes all of them. A gene the model
        does not cover raises an error.
    patches_key
        ``adata.obsm`` key of the uint8 patches.
    features_key
        ``adata.obsm`` key of encoder embeddings to use instead of the patches; ``None`` uses cached embeddings
        of the model's encoder when present, else encodes the patches.
    spatial_key
        ``adata.obsm`` key of coordinates, needed by methods that use spatial neighbours.
    {library_key}
    key_added
        Name of the output layer and of the ``obs``/``var``/``uns`` entries.
    batch_size, chunk_size
        Spots per forward pass; queries per retrieval chunk (retrieval is chunked over queries and the
        reference bank, so a bank of millions of spots fits in memory).
    index
        Search of the reference bank (retrieval models): ``'exact'`` (default) compares every query with every
        reference spot, chunked; ``'faiss-ivf'`` uses an approximate faiss inverted-file index, much faster on
        banks of millions of spots (``pip install faiss-cpu``; recall and speed in ``benchmarks/retrieval.py``).
    n_probe
        Inverted lists visited per query with ``index='faiss-ivf'``: more is slower and closer to exact.
    device
        Torch device; ``None`` picks cuda, then mps, then cpu.
    {progress}
    {copy}

    Returns
    -------
    ``None``, or a copy of ``adata`` if ``copy=True``, with

    ``adata.layers['predicted' | key_added]``
        float32 (n_obs, n_vars), genes matched by name; NaN for genes the model does not cover.
    ``adata.var['predicted_modelled']``
        whether the model covers the gene.
    ``adata.obs['predicted_spread']``
        spread of the retrieved neighbours' expression (retrieval models): an uncertainty per spot.
    ``adata.uns['predicted']['params']``
        the settings and the model's description.

    When ``adata`` has no genes at all (a new slide), a new AnnData is returned whose genes are the model's
    and whose ``X`` and ``layers[key_added]`` both hold the predictions, ready for scanpy and squidpy.

    Examples
    --------
    >>> model = sthist.tl.fit_contrastive(reference, layer="targets")  # doctest: +SKIP
    >>> sthist.pp.extract_patches(new_slide)  # doctest: +SKIP
    >>> sthist.tl.predict_expression(new_slide, model)  # doctest: +SKIP
    """
    check_adata(adata, fn="sthist.tl.predict_expression")
    model = resolve_model(adata, model)
    k, weighting = _retrieval_settings(model, k, weighting)
    check_choice("index", index, ["exact", "faiss-ivf"])
    n_probe = check_positive_int("n_probe", n_probe)
    model_genes = list(model.genes)
    if genes is not None:
        genes = [genes] if isinstance(genes, str) else list(genes)
        missing = [g for g in genes if g not in set(model_genes)]
        if missing:
            raise KeyError(
                f"{len(missing)} requested genes are not covered by the model (e.g. {missing[:5]}); "
                f"the model predicts {len(model_genes)} genes, see `model.genes`."
            )
    new_slide = adata.n_vars == 0
    if not new_slide:
        overlap = adata.var_names.intersection(model_genes)
        if len(overlap) == 0:
            raise ValueError(
                "none of the model's genes are in adata.var_names; predict on `adata[:, []]` (no genes) to get a new "
                "AnnData with the model's genes, or check the gene naming (symbols vs Ensembl ids)."
            )
    inputs = _model_inputs(adata, model, patches_key=patches_key, features_key=features_key)
    needs_space = bool(getattr(model, "needs_neighbors", False))
    coords, groups = spatial_inputs(
        adata, spatial_key=spatial_key, library_key=library_key, spatial_method=model.method if needs_space else None
    )

    start = info(f"predicting {len(model_genes)} genes for {adata.n_obs} spots with {model.method!r}")
    spread = None
    if getattr(model, "method", None) == "ridge":
        pred = model.predict(inputs["features"])
    else:
        pred, spread = model.predict(
            **inputs,
            coords=coords,
            groups=groups,
            k=k,
            weighting=weighting,
            chunk_size=chunk_size,
            index=index,
            n_probe=n_probe,
            batch_size=check_positive_int("batch_size", batch_size),
            device=device,
            progress=progress,
        )
    pred = np.asarray(pred, dtype=np.float32)
    if genes is not None:
        cols = [model_genes.index(g) for g in genes]
        pred, model_genes = pred[:, cols], genes

    params = _h5ad_safe(
        {
            "method": model.method,
            "prediction": getattr(model, "prediction", "regression"),
            "k": k,
            "weighting": weighting,
            "index": index if getattr(model, "prediction", "regression") == "retrieval" else None,
            "n_probe": n_probe if index == "faiss-ivf" else None,
            "n_model_genes": len(model_genes),
            "patches_key": patches_key,
            "features_key": features_key,
            "model_dir": str(Path(model).resolve()) if isinstance(model, str | Path) else None,
        }
    )
    if new_slide:
        import anndata as ad
        import pandas as pd

        out = ad.AnnData(
            X=pred.copy(),
            obs=adata.obs.copy(),
            var=pd.DataFrame(index=pd.Index(model_genes, name=None)),
            obsm={key: val.copy() for key, val in adata.obsm.items()},
            uns=dict(adata.uns),
        )
        out.layers[key_added] = pred
        out.var[f"{key_added}{C.MODELLED_SUFFIX}"] = True
        target = out
    else:
        target = adata.copy() if copy else adata
        layer = np.full((adata.n_obs, adata.n_vars), np.nan, dtype=np.float32)
        pos = {g: i for i, g in enumerate(model_genes)}
        var_idx = [i for i, g in enumerate(adata.var_names) if g in pos]
        layer[:, var_idx] = pred[:, [pos[adata.var_names[i]] for i in var_idx]]
        n_dropped = len(model_genes) - len(var_idx)
        if n_dropped:
            info(f"    {n_dropped} of the model's genes are not in adata.var_names and were not written")
        target.layers[key_added] = layer
        modelled = np.zeros(adata.n_vars, dtype=bool)
        modelled[var_idx] = True
        target.var[f"{key_added}{C.MODELLED_SUFFIX}"] = modelled
    if spread is not None and np.isfinite(spread).any():
        target.obs[f"{key_added}{C.SPREAD_SUFFIX}"] = np.asarray(spread, dtype=np.float32)
    target.uns[key_added] = {"params": params}
    info(
        "    finished",
        time=start,
        deep=f"added\n    {key_added!r}, predictions (adata.layers)\n    '{key_added}_modelled' (adata.var)",
    )
    if new_slide:
        return target
    return target if copy else None
