"""`predicted`: the predicted genes as their own AnnData, ready for scanpy and squidpy."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import numpy as np

from .. import _constants as C
from .. import _logging as logg
from .._docs import inject_docs
from .._validate import check_adata

if TYPE_CHECKING:
    from anndata import AnnData


@inject_docs
def predicted(adata: AnnData, *, key: str = C.PREDICTED_KEY, drop_unpredicted: bool = True) -> AnnData:
    """The predicted expression of the modelled genes as a new AnnData that scanpy and squidpy take directly.

    :func:`sthist.tl.predict_expression` writes ``layers[key]`` as wide as ``adata``, with NaN for every gene the
    model does not cover (so that genes keep their columns): ``sc.pp.pca(adata, layer=key)`` then fails on the NaN.
    This returns the ``n_obs x n_modelled`` matrix instead, in ``X``, with the spots' ``obs``, ``obsm`` (the
    coordinates for squidpy; arrays are shared, not copied) and ``uns`` (the H&E images and the prediction's
    record), so that ``sc.pp.pca``, ``sc.pp.neighbors``, ``sq.gr.spatial_neighbors`` and
    ``sq.gr.spatial_autocorr`` run on it as on measured data. It reads ``adata`` and never modifies it.

    Parameters
    ----------
    {adata}
        With a prediction written by :func:`sthist.tl.predict_expression` (or the out-of-fold predictions of
        :func:`sthist.tl.cross_validate`) under ``key``. A slide without genes, predicted in place, holds them in
        ``obsm[key]``; that works too.
    key
        ``key_added`` of the prediction.
    drop_unpredicted
        Leave out spots without a prediction (NaN in every modelled gene, e.g. spots outside the folds of
        ``cross_validate``); ``False`` keeps them and raises when there are any, since scanpy refuses NaN.

    Returns
    -------
    A new AnnData of ``n_obs x n_modelled`` spots and genes with

    ``X`` and ``layers[key]``
        float32 predictions (dense), on the scale of the model's training targets: already normalised and
        log-transformed when the model was trained on :func:`sthist.pp.normalize_expression` targets, so skip
        ``sc.pp.normalize_total`` and ``sc.pp.log1p``.
    ``layers[key + '_lower']``, ``layers[key + '_upper']``
        the prediction intervals, when :func:`sthist.tl.predict_expression` wrote them.
    ``var``
        ``adata.var`` of the modelled genes.
    ``obs``, ``obsm``, ``uns``
        those of ``adata`` (``obsm`` arrays shared with ``adata``, ``uns`` copied).

    Examples
    --------
    >>> sthist.tl.predict_expression(query, model)  # doctest: +SKIP
    >>> pred = sthist.get.predicted(query)  # doctest: +SKIP
    >>> sc.pp.pca(pred)  # doctest: +SKIP
    >>> sq.gr.spatial_neighbors(pred)  # doctest: +SKIP
    >>> sq.gr.spatial_autocorr(pred, mode="moran")  # doctest: +SKIP
    """
    import anndata as ad
    import pandas as pd

    fn = "sthist.get.predicted"
    check_adata(adata, fn=fn)
    if not isinstance(key, str):
        raise TypeError(f"{fn}: key must be the name of a prediction (a string), got {key!r}.")
    bounds = {}
    if key in adata.layers and adata.n_vars > 0:
        layer = np.asarray(adata.layers[key].toarray() if hasattr(adata.layers[key], "toarray") else adata.layers[key])
        col = C.Key.modelled(key)
        modelled = adata.var[col].to_numpy(dtype=bool) if col in adata.var else np.isfinite(layer).any(axis=0)
        values = layer[:, modelled]
        var = adata.var.loc[modelled].copy()
        for side in ("lower", "upper"):
            name = C.Key.interval(key, side)
            if name in adata.layers:
                bounds[name] = np.asarray(adata.layers[name], dtype=np.float32)[:, modelled]
    elif key in adata.obsm and isinstance(adata.obsm[key], pd.DataFrame):
        frame = adata.obsm[key]
        values = frame.to_numpy()
        var = pd.DataFrame(index=pd.Index([str(g) for g in frame.columns]))
        entry = adata.uns.get(key, {})
        per_gene = entry.get("calibration", {}).get("per_gene") if isinstance(entry, dict) else None
        if isinstance(per_gene, pd.DataFrame):  # a calibrated prediction's per-gene reliability
            var = per_gene.reindex(var.index)

        for side in ("lower", "upper"):
            name = C.Key.interval(key, side)
            if name in adata.obsm and isinstance(adata.obsm[name], pd.DataFrame):
                bounds[name] = adata.obsm[name].to_numpy(dtype=np.float32)
    else:
        raise KeyError(
            f"{fn}: no prediction {key!r} in this AnnData (neither adata.layers[{key!r}] nor a spots x genes "
            f"DataFrame in adata.obsm[{key!r}]); run `sthist.tl.predict_expression(adata, model, key_added={key!r})` "
            f"first. Layers: {list(adata.layers.keys())}."
        )
    values = np.asarray(values, dtype=np.float32)
    if values.shape[1] == 0:
        raise ValueError(f"{fn}: the prediction {key!r} covers none of adata's genes; check the model's genes.")
    unpredicted = ~np.isfinite(values).all(axis=1)
    if unpredicted.any() and not drop_unpredicted:
        raise ValueError(
            f"{fn}: {int(unpredicted.sum())} spot(s) have no prediction (NaN), which scanpy refuses; pass "
            "drop_unpredicted=True to leave them out."
        )
    keep = ~unpredicted
    if not keep.any():
        raise ValueError(f"{fn}: no spot has a prediction in {key!r}.")
    if unpredicted.any():
        logg.info(f"    {int(unpredicted.sum())} spot(s) without a prediction in {key!r} left out")
    rows = np.flatnonzero(keep)
    obsm = {}
    for name, val in adata.obsm.items():
        if name in (key, C.Key.interval(key, "lower"), C.Key.interval(key, "upper")):
            continue  # the prediction itself: it becomes X and the layers

        obsm[name] = val if rows.size == adata.n_obs else (val.iloc[rows] if hasattr(val, "iloc") else val[rows])
    out = ad.AnnData(
        X=values[rows],
        obs=adata.obs.iloc[rows].copy(),
        var=var,
        obsm=obsm,
        uns=copy.deepcopy(dict(adata.uns)),
    )
    out.layers[key] = out.X.copy()
    for name, vals in bounds.items():
        out.layers[name] = vals[rows]
    return out
