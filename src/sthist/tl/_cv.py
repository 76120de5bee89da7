"""`cross_validate`: leave-one-group-out evaluation of any method, with out-of-fold predictions."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import _constants as C
from .._anndata import get_matrix, get_patches, image_features, record
from .._docs import inject_docs
from .._logging import info
from .._validate import check_adata
from ._fit import DEFAULT_ENCODER

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
    inplace: bool = True,
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
        A registered method or baseline (:func:`sthist.tl.methods`): a contrastive method of
        :func:`sthist.tl.fit_contrastive` (``'bleep'``, ...) or ``'ridge'`` (the HEST linear probe,
        :func:`sthist.tl.fit_ridge`).
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
        More keyword arguments for the method's fit function (:func:`sthist.tl.fit_contrastive`,
        :func:`sthist.tl.fit_ridge`), e.g. ``dict(max_epochs=50)``; one it does not take raises, unless unset.
    inplace
        Write the out-of-fold predictions and the scores into ``adata`` (below); ``False`` leaves ``adata``
        unchanged and only returns the table.

    Returns
    -------
    A tidy :class:`~pandas.DataFrame` with one row per held-out group (``fold``) and the metrics of
    :func:`sthist.tl.score_prediction` (``pcc_all``, ``pcc_heg``, ``pcc_hvg``, ``gene_corr``, ``mse``, ``mae``),
    ``n_obs``, ``seconds`` and ``method``. With ``inplace=True`` (the default) also writes

    ``adata.layers['cv_predicted' | key_added]``
        out-of-fold predictions (each spot predicted by the model that did not see its group).
    ``adata.var['cv_predicted_modelled']``
        genes that were modelled.
    ``adata.uns['cv_predicted']``
        ``params`` and ``scores`` (the returned table as a dict of columns).
    """
    import anndata as ad
    import pandas as pd

    from ._predict import predict_expression
    from ._registry import fit_predictor, get_predictor
    from ._score import score_prediction

    check_adata(adata, fn="sthist.tl.cross_validate")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be True or False, got {inplace!r}.")
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
    predictor = get_predictor(method)
    expr, gene_names = get_matrix(adata, layer=layer, genes=genes, nonnegative=predictor.kind == "contrastive")
    fit_kwargs = dict(fit_kwargs or {})
    finetune = bool(fit_kwargs.get("finetune", False))

    # one lightweight AnnData holding just what the folds need; features computed once
    obsm: dict[str, Any] = {}
    uns: dict[str, Any] = {}
    if spatial_key in adata.obsm:
        obsm[C.SPATIAL_KEY] = np.asarray(adata.obsm[spatial_key])
    if finetune:
        obsm[C.PATCHES_KEY] = get_patches(adata, patches_key=patches_key)
        if isinstance(adata.uns.get(patches_key), dict):
            uns[C.PATCHES_KEY] = adata.uns[patches_key]
    else:
        feats = image_features(
            adata,
            encoder=encoder,
            pretrained=fit_kwargs.get("pretrained", False),
            checkpoint=fit_kwargs.get("checkpoint"),
            patches_key=patches_key,
            features_key=features_key,
            progress=progress,
        )
        obsm[feats.key] = feats.values
        uns[feats.key] = {"params": feats.params}
        fit_kwargs["features_key"] = feats.key
    work = ad.AnnData(
        X=expr,
        obs=pd.DataFrame({groupby: labels, "_library": libraries}, index=adata.obs_names.copy()),
        var=pd.DataFrame(index=pd.Index(gene_names)),
        obsm=obsm,
        uns=uns,
    )
    defaults = {"library_key": "_library", "progress": progress, "random_state": random_state}
    if not finetune:
        defaults["encoder"] = encoder
    for key, value in defaults.items():
        if predictor.accepts(key):
            fit_kwargs.setdefault(key, value)
    oof = np.full(expr.shape, np.nan, dtype=np.float32)
    seconds: dict[str, float] = {}
    start = info(f"cross-validating {method!r} over {len(folds)} groups of {groupby!r}")
    for fold in folds:
        t0 = time.perf_counter()
        test = labels == fold
        train_ad = work[~test].copy()
        test_ad = work[test].copy()
        model = fit_predictor(train_ad, method, **fit_kwargs)
        predict_expression(
            test_ad,
            model,
            k=k,
            weighting=weighting,
            features_key=fit_kwargs.get("features_key"),
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
    if not inplace:
        info("    finished", time=start)
        return table

    full = np.full((adata.n_obs, adata.n_vars), np.nan, dtype=np.float32)
    cols = adata.var_names.get_indexer(gene_names)
    full[:, cols] = oof
    adata.layers[key_added] = full
    modelled = np.zeros(adata.n_vars, dtype=bool)
    modelled[cols] = True
    adata.var[C.Key.modelled(key_added)] = modelled
    record(
        adata,
        key_added,
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
        },
    )
    info("    finished", time=start)
    return table
