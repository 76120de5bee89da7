"""`cross_validate`: leave-one-group-out evaluation of any method, with out-of-fold predictions."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import _constants as C
from .._docs import inject_docs
from .._logging import info
from .._validate import check_adata
from ..pp._embed import encode
from ._fit import DEFAULT_ENCODER, _h5ad_safe, cached_features
from ._utils import expression_matrix, image_inputs

if TYPE_CHECKING:
    import pandas as pd
    from anndata import AnnData


@inject_docs
def cross_validate(
    adata: AnnData,
    *,
    groupby: str = C.SECTION_KEY,
    method: str = "bleep",
    layer: str | None = None,
    genes: Any = None,
    patches_key: str = C.PATCHES_KEY,
    features_key: str | None = None,
    encoder: str = DEFAULT_ENCODER,
    k: int | None = None,
    weighting: str | None = None,
    spatial_key: str = C.SPATIAL_KEY,
    library_key: str | None = None,
    n_top: int = 50,
    random_state: int = 0,
    progress: bool = True,
    key_added: str = C.CV_KEY,
    fit_kwargs: dict[str, Any] | None = None,
) -> pd.DataFrame:
    """Leave-one-group-out cross-validation: train on all groups but one, predict the held-out one.

    Use ``groupby="section"`` to hold out sections or ``groupby="patient"`` to hold out patients (the honest
    choice when claiming generalisation to new patients: serial sections of one patient share a lot).
    Image features of a frozen encoder are computed once and shared by all folds.

    Parameters
    ----------
    {adata}
    groupby
        Column of ``adata.obs`` whose values define the folds (at least two).
    method
        ``'ridge'`` (the HEST linear probe, :func:`sthist.tl.fit_ridge`) or a contrastive method of
        :func:`sthist.tl.fit_contrastive` (``'bleep'``).
    {layer}
        The same layer is the training target and the truth the predictions are scored against.
    {genes}
    patches_key, features_key, encoder
        As in :func:`sthist.tl.fit_contrastive`: where the patches or cached embeddings are, and the encoder.
    k, weighting
        Retrieval settings of :func:`sthist.tl.predict_expression` (``None``: the method's paper values).
    spatial_key
        ``adata.obsm`` key of the coordinates, for neighbour-based methods.
    library_key
        Column of ``adata.obs`` with each spot's section, so that neighbour-based methods never join spots of
        different sections; ``None`` uses ``groupby`` (right when holding out sections; pass ``"section"`` when
        ``groupby="patient"``).
    n_top
        Size of the highly expressed / highly variable gene sets of the scores.
    {random_state}
    {progress}
    key_added
        Name of the out-of-fold prediction layer and of the ``uns`` entry.
    fit_kwargs
        More keyword arguments for :func:`sthist.tl.fit_contrastive` or :func:`sthist.tl.fit_ridge`
        (e.g. ``dict(max_epochs=50)``).

    Returns
    -------
    A tidy :class:`~pandas.DataFrame` with one row per held-out group (``fold``) and the metrics of
    :func:`sthist.tl.score_prediction` (``pcc_all``, ``pcc_heg``, ``pcc_hvg``, ``gene_corr``, ``mse``, ``mae``),
    ``n_obs``, ``seconds`` and ``method``. Also writes

    ``adata.layers['cv_predicted' | key_added]``
        out-of-fold predictions (each spot predicted by the model that did not see its group).
    ``adata.var['cv_predicted_modelled']``
        genes that were modelled.
    ``adata.uns['cv_predicted']``
        ``params`` and ``scores`` (the returned table as a dict of columns).
    """
    import anndata as ad
    import pandas as pd

    from ._fit import fit_contrastive
    from ._predict import predict_expression
    from ._ridge import fit_ridge
    from ._score import score_prediction

    check_adata(adata, fn="sthist.tl.cross_validate")
    if groupby not in adata.obs:
        raise KeyError(f"groupby={groupby!r} is not a column of adata.obs (columns: {list(adata.obs)}).")
    labels = adata.obs[groupby].astype(str).to_numpy()
    library_key = groupby if library_key is None else library_key
    if library_key not in adata.obs:
        raise KeyError(f"library_key={library_key!r} is not a column of adata.obs (columns: {list(adata.obs)}).")
    libraries = adata.obs[library_key].astype(str).to_numpy()
    folds = list(dict.fromkeys(labels))
    if len(folds) < 2:
        raise ValueError(f"adata.obs[{groupby!r}] has {len(folds)} group(s); leave-one-out needs at least two.")
    if method != "ridge":
        from .._engine.methods import get_method

        get_method(method)
    expr, gene_names = expression_matrix(adata, layer=layer, genes=genes)
    fit_kwargs = dict(fit_kwargs or {})
    finetune = bool(fit_kwargs.get("finetune", False))

    # one lightweight AnnData holding just what the folds need; features computed once
    obsm: dict[str, np.ndarray] = {}
    if spatial_key in adata.obsm:
        obsm[C.SPATIAL_KEY] = np.asarray(adata.obsm[spatial_key])
    patches, feats = image_inputs(adata, patches_key=patches_key, features_key=features_key, need_patches=finetune)
    if finetune:
        obsm[C.PATCHES_KEY] = patches
    else:
        if feats is None:
            key = cached_features(
                adata, encoder=encoder, pretrained=fit_kwargs.get("pretrained", False), checkpoint=fit_kwargs.get("checkpoint")
            )
            if key is not None:
                feats = np.asarray(adata.obsm[key], dtype=np.float32)
            else:
                feats, _ = encode(
                    adata,
                    patches,
                    encoder=encoder,
                    pretrained=fit_kwargs.get("pretrained", False),
                    checkpoint=fit_kwargs.get("checkpoint"),
                    patches_key=patches_key,
                    progress=progress,
                )
        obsm["features"] = feats
    work = ad.AnnData(
        X=expr,
        obs=pd.DataFrame({groupby: labels, "_library": libraries}, index=adata.obs_names.copy()),
        var=pd.DataFrame(index=pd.Index(gene_names)),
        obsm=obsm,
    )
    oof = np.full(expr.shape, np.nan, dtype=np.float32)
    seconds: dict[str, float] = {}
    start = info(f"cross-validating {method!r} over {len(folds)} groups of {groupby!r}")
    for fold in folds:
        t0 = time.perf_counter()
        test = labels == fold
        train_ad = work[~test].copy()
        test_ad = work[test].copy()
        if method == "ridge":
            rkw = {kk: v for kk, v in fit_kwargs.items() if kk in {"n_components", "alpha"}}
            model = fit_ridge(train_ad, features_key="features", random_state=random_state, **rkw)
        else:
            fkw = {kk: v for kk, v in fit_kwargs.items() if kk not in {"encoder"}}
            if not finetune:
                fkw["features_key"] = "features"
            fkw.setdefault("library_key", "_library")
            model = fit_contrastive(
                train_ad, method=method, encoder=encoder, random_state=random_state, progress=progress, **fkw
            )
        predict_expression(
            test_ad,
            model,
            k=k,
            weighting=weighting,
            features_key=None if finetune else "features",
            library_key="_library",
            key_added="oof",
            progress=False,
        )
        oof[test] = test_ad.layers["oof"]
        seconds[fold] = round(time.perf_counter() - t0, 3)
        info(f"    held out {fold!r}: {int(test.sum())} spots in {seconds[fold]} s")

    work.layers["oof"] = oof
    table = score_prediction(work, layer="oof", true_layer=None, groupby=groupby, n_top=n_top, inplace=False)
    table = table.drop(index="all", errors="ignore").rename_axis("fold").reset_index()
    table.insert(1, "method", method)
    table["seconds"] = table["fold"].map(seconds)

    full = np.full((adata.n_obs, adata.n_vars), np.nan, dtype=np.float32)
    cols = adata.var_names.get_indexer(gene_names)
    full[:, cols] = oof
    adata.layers[key_added] = full
    modelled = np.zeros(adata.n_vars, dtype=bool)
    modelled[cols] = True
    adata.var[f"{key_added}{C.MODELLED_SUFFIX}"] = modelled
    adata.uns[key_added] = _h5ad_safe(
        {
            "params": {
                "groupby": groupby,
                "library_key": library_key,
                "method": method,
                "layer": layer,
                "encoder": encoder,
                "k": k,
                "weighting": weighting,
                "random_state": random_state,
            },
            "scores": {c: table[c].to_numpy() for c in table.columns if c not in {"fold", "method"}}
            | {"fold": table["fold"].astype(str).tolist()},
        }
    )
    info("    finished", time=start)
    return table
