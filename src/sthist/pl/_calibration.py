"""`calibration`: do the intervals hold what they promise, and where on the tissue can the prediction be believed."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .. import _constants as C
from .._constants import Key
from .._validate import check_adata
from ._plots import _finish, _image_and_scale, _plot_docs, _select_library, _spots

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def _dense_rows(mat, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    block = mat[rows][:, cols]
    return np.asarray(block.toarray() if hasattr(block, "toarray") else block, dtype=np.float64)


@_plot_docs
def calibration(
    adata: AnnData,
    *,
    layer: str = C.PREDICTED_KEY,
    scores_key: str | None = None,
    library_id: str | None = None,
    library_key: str | None = None,
    img_key: str | None = C.HIRES,
    spot_size: float | None = None,
    show: bool | None = None,
    return_fig: bool = False,
) -> Figure | list[Axes] | None:
    """The prediction intervals of a calibrated model on a slide: their coverage, their width and the shift flag.

    Four panels. (1) **Coverage against nominal level**: the fraction of measured values inside their interval at every
    calibrated level, over all modelled genes and over the top-50 highly expressed genes (HEG), against the diagonal
    of perfect calibration (from :func:`sthist.tl.score_prediction`, so it needs measured expression). (2) **Width
    against error**: per spot, the mean interval width against the mean absolute error over the HEG, with their
    Spearman correlation (do wider intervals mark worse predictions?). (3) **Map of the interval width**: the mean
    width over the HEG on the tissue (over every modelled gene when there are no scores). (4) **Map of the shift**:
    how unlike the calibration tissue each spot is, flagged spots ringed in red. Panels (1) and (2) are left empty
    without scores; the maps need only :func:`sthist.tl.predict_expression` with a calibrated model.

    Parameters
    ----------
    {adata}
    layer
        The prediction (``key_added`` of :func:`sthist.tl.predict_expression`), with its interval layers.
    scores_key
        ``key_added`` of :func:`sthist.tl.score_prediction`; defaults to ``layer`` followed by ``'_scores'``.
    {library_id}
    {library_key}
    img_key
        Image under the maps (``None``: none).
    spot_size
        Spot diameter in full-resolution pixels; ``None`` uses ``scalefactors['spot_diameter_fullres']``.
    {show}
    {return_fig}

    Returns
    -------
    With ``return_fig=True`` the :class:`~matplotlib.figure.Figure`; else, when not shown, the four
    :class:`~matplotlib.axes.Axes`; else ``None``.
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize
    from scipy.stats import spearmanr

    fn = "sthist.pl.calibration"
    check_adata(adata, fn=fn)
    lower_key, upper_key = Key.interval(layer, "lower"), Key.interval(layer, "upper")
    if lower_key not in adata.layers or upper_key not in adata.layers:
        raise KeyError(
            f"{fn}: adata.layers[{lower_key!r}] / [{upper_key!r}] are missing: predict with a calibrated model "
            f"(`sthist.tl.calibrate(reference, model)`, then `sthist.tl.predict_expression(adata, model, "
            f"key_added={layer!r})`)."
        )
    if Key.shift(layer) not in adata.obs:
        raise KeyError(f"{fn}: adata.obs[{Key.shift(layer)!r}] is missing; predict with a calibrated model.")
    scores_key = Key.scores(layer) if scores_key is None else scores_key
    scores = adata.uns.get(scores_key)
    scored = isinstance(scores, dict) and "coverage_curve" in scores
    modelled = adata.var[Key.modelled(layer)].to_numpy(dtype=bool) if Key.modelled(layer) in adata.var else None
    if scored:
        heg_names = list(scores[Key.gene_corr("genes")])
        cols = adata.var_names.get_indexer(heg_names)
    else:
        cols = np.flatnonzero(modelled) if modelled is not None else np.arange(adata.n_vars)
    lib, mask = _select_library(adata, library_id=library_id, library_key=library_key, fn=fn)
    img, scalef, diameter = _image_and_scale(adata, lib, img_key, spot_size, fn)
    rows = np.flatnonzero(mask)
    xy = np.asarray(adata.obsm[C.SPATIAL_KEY], dtype=np.float64)[rows, :2] * scalef
    d = diameter * scalef
    lo = _dense_rows(adata.layers[lower_key], rows, cols)
    hi = _dense_rows(adata.layers[upper_key], rows, cols)
    width = np.nanmean(hi - lo, axis=1)

    fig, axes = plt.subplots(1, 4, figsize=(17, 4.2), layout="constrained")
    ax_cov, ax_we, ax_w, ax_s = axes
    if scored:
        curve = scores["coverage_curve"]
        levels = np.asarray(curve["level"], dtype=float)
        ax_cov.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="nominal")
        ax_cov.plot(levels, curve["coverage_all"], "o-", label="all genes")
        ax_cov.plot(levels, curve["coverage_heg"], "s-", label=f"top {len(heg_names)} HEG")
        lowest = min(float(np.min(levels)), float(np.min(curve["coverage_all"])), float(np.min(curve["coverage_heg"])))
        lim = (max(0.0, min(0.4, lowest - 0.05)), 1.0)

        ax_cov.set(
            xlim=lim, ylim=(lim[0], 1.02), xlabel="nominal level", ylabel="coverage", title="coverage vs nominal"
        )
        ax_cov.legend(loc="lower right", fontsize=8)
        truth_key = scores.get("params", {}).get("true_layer", "X")
        truth = adata.X if truth_key == "X" else adata.layers[truth_key]
        err = np.abs(_dense_rows(truth, rows, cols) - _dense_rows(adata.layers[layer], rows, cols)).mean(1)
        rho = spearmanr(width, err).statistic if rows.size > 2 else np.nan
        ax_we.scatter(err, width, s=8, alpha=0.6)
        ax_we.set(
            xlabel="mean |error|, top HEG",
            ylabel="mean interval width, top HEG",
            title=f"width vs error (Spearman {rho:.2f})",
        )
    else:
        for ax in (ax_cov, ax_we):
            ax.text(0.5, 0.5, "no scores:\nrun sthist.tl.score_prediction", ha="center", va="center")
            ax.set_axis_off()
    pad = 0.75 * d
    x0, x1 = xy[:, 0].min() - pad, xy[:, 0].max() + pad
    y0, y1 = xy[:, 1].min() - pad, xy[:, 1].max() + pad
    shift = adata.obs[Key.shift(layer)].to_numpy(dtype=float)[rows]
    ood = adata.obs[Key.ood(layer)].to_numpy(dtype=bool)[rows] if Key.ood(layer) in adata.obs else np.zeros_like(shift)
    for ax, values, cmap, norm, title in (
        (ax_w, width, "viridis", Normalize(float(np.nanmin(width)), float(np.nanmax(width)) + 1e-12), "interval width"),
        (ax_s, shift, "magma", Normalize(0.0, 1.0), f"shift ({int(ood.sum())} of {ood.size} spots flagged)"),
    ):
        if img is not None:
            ax.imshow(img, origin="upper")
        coll = _spots(ax, xy, values, d, cmap, norm)
        ax.set_xlim(x0, x1)
        ax.set_ylim(y1, y0)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(title)
        fig.colorbar(coll, ax=ax, shrink=0.8)
    if ood.any():
        from matplotlib.collections import EllipseCollection

        flagged = xy[ood]
        dd = np.full(len(flagged), d * 1.15)
        ring = EllipseCollection(
            dd, dd, np.zeros(len(flagged)), units="xy", offsets=flagged, offset_transform=ax_s.transData
        )
        ring.set_facecolor("none")
        ring.set_edgecolor("red")
        ring.set_linewidth(0.8)
        ax_s.add_collection(ring)
    return _finish(fig, list(axes), show, return_fig)
