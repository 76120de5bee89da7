"""Plots of predictions and scores. They read what :mod:`sthist.tl` wrote and never modify ``adata``."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from scipy import sparse

from .. import _constants as C
from .._anndata import resolve_truth
from .._constants import Key
from .._docs import inject_docs
from .._validate import check_adata, check_positive_int, resolve_library

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from .._engine.model import ContrastiveModel

_SCORES_HINT = "run `sthist.tl.score_prediction(adata)` first"

# the parameters every plot shares (scanpy's semantics), injected by ``_plot_docs``
_PLOT_DOCS = {
    "show": """show
    Show the figure with :func:`matplotlib.pyplot.show`; ``None`` follows ``scanpy.settings.autoshow``.""",
    "return_fig": """return_fig
    Return the :class:`~matplotlib.figure.Figure` (and do not show it).""",
    "ax": """ax
    Axes to draw into; ``None`` makes a new figure.""",
}

F = TypeVar("F", bound=Callable[..., Any])


def _plot_docs(fn: F) -> F:
    """Shared docs (``{adata}``, ...) and the plot parameters ``{show}``, ``{return_fig}``, ``{ax}``."""
    fn = inject_docs(fn)
    doc = fn.__doc__ or ""
    for name, text in _PLOT_DOCS.items():
        placeholder = "{" + name + "}"
        if placeholder in doc:
            indent = doc[: doc.index(placeholder)].rsplit("\n", 1)[-1]
            doc = doc.replace(placeholder, text.replace("\n", "\n" + indent))
    fn.__doc__ = doc
    return fn


# --------------------------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------------------------- #
def _finish(fig: Figure, axes: Any, show: bool | None, return_fig: bool) -> Any:
    """Scanpy's return rules: ``return_fig`` -> Figure; else shown -> None; else the Axes.

    ``show=None`` follows ``scanpy.settings.autoshow``; ``return_fig=True`` never shows.
    """
    import matplotlib.pyplot as plt

    if return_fig:
        return fig
    if show is None:
        from scanpy import settings

        show = bool(settings.autoshow)
    if show:
        plt.show()
        return None
    return axes


def _root_figure(ax: Axes) -> Figure:
    """The top-level Figure of ``ax``, also when it sits in a SubFigure (``SubFigure.figure`` is the root)."""
    fig = ax.figure
    root = getattr(fig, "figure", None)
    return root if root is not None else fig


def _column(mat: Any, rows: np.ndarray, col: int) -> np.ndarray:
    block = mat[rows][:, [col]] if not sparse.issparse(mat) else mat[rows][:, col]
    if sparse.issparse(block):
        block = block.toarray()
    return np.asarray(block, dtype=np.float64).ravel()


def _layer(adata: AnnData, layer: str | None, what: str, fn: str) -> Any:
    if layer is None:
        if adata.X is None:
            raise ValueError(f"{fn}: adata.X is empty; pass the layer holding the {what} expression.")
        return adata.X
    if layer not in adata.layers:
        hint = " Run `sthist.tl.predict_expression(adata, model=...)` first." if layer == C.PREDICTED_KEY else ""
        raise KeyError(
            f"{fn}: adata.layers[{layer!r}] ({what} expression) is missing; available layers: "
            f"{list(adata.layers.keys())}.{hint}"
        )
    return adata.layers[layer]


def _select_library(
    adata: AnnData, *, library_id: str | None, library_key: str | None, fn: str
) -> tuple[str, np.ndarray]:
    """Library id and boolean spot mask; ambiguity raises with the choices.

    Without ``library_key`` on an object whose ``uns['spatial']`` holds several libraries, the one obs column whose
    values all name libraries (e.g. ``'section'``) is used, so a one-section subset plots without more arguments.
    """
    libraries = set(adata.uns.get(C.SPATIAL_KEY, {}))
    if library_key is None and len(libraries) > 1:
        columns = [
            c
            for c in adata.obs.columns
            if adata.obs[c].dtype.kind in "OUSb" or str(adata.obs[c].dtype) == "category"
            if adata.obs[c].astype(str).isin(libraries).all()
        ]
        if len(columns) == 1:
            library_key = columns[0]
    if library_key is not None:
        if library_key not in adata.obs.columns:
            raise KeyError(
                f"{fn}: library_key={library_key!r} is not a column of adata.obs; available: {list(adata.obs.columns)}."
            )
        values = adata.obs[library_key].astype(str).to_numpy()
        present = list(dict.fromkeys(values))
        if library_id is None:
            if len(present) != 1:
                raise ValueError(
                    f"{fn}: adata.obs[{library_key!r}] holds several libraries {present}; pass `library_id=` "
                    "to pick one."
                )
            library_id = present[0]
        elif str(library_id) not in present:
            raise KeyError(
                f"{fn}: library_id={library_id!r} is not in adata.obs[{library_key!r}]; available: {present}."
            )
        lib = resolve_library(adata, library_id=str(library_id))
        return lib, values == lib
    lib = resolve_library(adata, library_id=library_id)
    if len(adata.uns[C.SPATIAL_KEY]) > 1:
        candidates = [
            c for c in adata.obs.columns if (adata.obs[c].astype(str) == lib).any() and adata.obs[c].nunique() > 1
        ]
        raise ValueError(
            f"{fn}: adata.uns['spatial'] holds several libraries, so sthist needs `library_key=` (the obs column "
            f"saying which library each spot belongs to) to find the spots of {lib!r}; candidates: {candidates}."
        )
    return lib, np.ones(adata.n_obs, dtype=bool)


def _image_and_scale(
    adata: AnnData, lib: str, img_key: str | None, spot_size: float | None, fn: str
) -> tuple[np.ndarray | None, float, float]:
    """Image (or None), scale factor full-res -> image pixels, and the spot diameter in full-res pixels."""
    info = adata.uns[C.SPATIAL_KEY][lib]
    scalefactors = info.get(C.SCALEFACTORS, {})
    img = None
    scalef = 1.0
    if img_key is not None:
        images = info.get(C.IMAGES, {})
        if img_key not in images:
            raise KeyError(
                f"{fn}: adata.uns['spatial'][{lib!r}]['images'] has no {img_key!r} image; available: "
                f"{list(images.keys())}. Pass `img_key=` one of them, or None to draw the spots without image."
            )
        img = np.asarray(images[img_key])
        if img_key != C.FULLRES:
            sf_key = Key.scalefactor(img_key)
            if sf_key not in scalefactors:
                raise KeyError(
                    f"{fn}: adata.uns['spatial'][{lib!r}]['scalefactors'] lacks {sf_key!r}, needed to place the "
                    f"spots on the {img_key!r} image; available: {list(scalefactors.keys())}."
                )
            scalef = float(scalefactors[sf_key])
    if spot_size is None:
        if C.SPOT_DIAMETER not in scalefactors:
            raise KeyError(
                f"{fn}: adata.uns['spatial'][{lib!r}]['scalefactors'] lacks {C.SPOT_DIAMETER!r}; pass "
                "`spot_size=` (spot diameter in full-resolution pixels)."
            )
        diameter = float(scalefactors[C.SPOT_DIAMETER])
    else:
        diameter = float(spot_size)
    if not diameter > 0:
        raise ValueError(f"{fn}: the spot diameter must be positive, got {diameter}.")
    return img, scalef, diameter


def _spots(ax: Axes, xy: np.ndarray, values: np.ndarray, diameter: float, cmap: Any, norm: Any):
    """Draw spots as true-size circles (diameter in data units) coloured by ``values``."""
    from matplotlib.collections import EllipseCollection

    d = np.full(len(xy), diameter)
    coll = EllipseCollection(
        d, d, np.zeros(len(xy)), units="xy", offsets=xy, offset_transform=ax.transData, cmap=cmap, norm=norm
    )
    coll.set_array(np.ma.masked_invalid(values))
    coll.set_edgecolor("none")
    ax.add_collection(coll)
    return coll


def _genes_list(genes: str | Sequence[str]) -> list[str]:
    if isinstance(genes, str):
        return [genes]
    genes = [str(g) for g in genes]
    if not genes:
        raise ValueError("genes is empty; pass at least one gene name.")
    return genes


# --------------------------------------------------------------------------------------------- #
# public
# --------------------------------------------------------------------------------------------- #
@_plot_docs
def predicted_vs_true(
    adata: AnnData,
    genes: str | Sequence[str],
    *,
    layer: str = C.PREDICTED_KEY,
    true_layer: str | None = None,
    scores_key: str | None = None,
    library_id: str | None = None,
    library_key: str | None = None,
    img_key: str | None = C.HIRES,
    spot_size: float | None = None,
    cmap: str = "viridis",
    ncols: int = 2,
    show: bool | None = None,
    return_fig: bool = False,
) -> Figure | list[Axes] | None:
    """Measured and predicted expression of genes side by side on the H&E image.

    For each gene, two panels share one colour scale (minimum to maximum of the true and predicted values of
    the section) and one colour bar: ``'GENE (true)'`` and ``'GENE (predicted, r = 0.xx)'``, with the per-gene
    r written by :func:`sthist.tl.score_prediction` when present (computed over all the spots it scored, so over
    all sections when it scored several; score the section alone for a per-section r). Spots are true-size
    circles (diameter ``spot_diameter_fullres`` times the image scale factor); the view is cropped to the spots.

    Parameters
    ----------
    {adata}
    genes
        One gene or a list of genes.
    layer
        Layer holding the prediction.
    true_layer
        Layer holding the measured expression; ``'X'`` for ``adata.X``. ``None``: the layer the prediction's model
        was fitted on, as :func:`sthist.tl.score_prediction` takes it (the same rule and the same errors).
    scores_key
        ``key_added`` of :func:`sthist.tl.score_prediction`; defaults to the value of ``layer`` followed by
        ``'_scores'``. Its per-gene r (``adata.var[scores_key + '_pearson']``) goes into the titles.
    {library_id}
    {library_key}
    img_key
        Image in ``adata.uns['spatial'][library_id]['images']``; ``None`` draws the spots without image in
        full-resolution pixel coordinates.
    spot_size
        Spot diameter in full-resolution pixels; ``None`` uses ``scalefactors['spot_diameter_fullres']``.
    cmap
        Colour map.
    ncols
        Genes per row (each gene takes two panels).
    {show}
    {return_fig}

    Returns
    -------
    With ``return_fig=True`` the :class:`~matplotlib.figure.Figure`; else, when not shown, the list of
    :class:`~matplotlib.axes.Axes` ``[gene1 true, gene1 predicted, gene2 true, ...]``; else ``None``.
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    fn = "sthist.pl.predicted_vs_true"
    check_adata(adata, fn=fn)
    ncols = check_positive_int("ncols", ncols)
    genes = _genes_list(genes)
    unknown = [g for g in genes if g not in adata.var_names]
    if unknown:
        raise KeyError(f"{fn}: gene(s) {unknown[:10]} are not in adata.var_names.")
    pred = _layer(adata, layer, "predicted", fn)
    true = resolve_truth(adata, layer=layer, true_layer=true_layer, fn=fn)[0]
    if img_key is None and spot_size is not None and not adata.uns.get(C.SPATIAL_KEY) and library_key is None:
        lib, mask, img, scalef, diameter = None, np.ones(adata.n_obs, dtype=bool), None, 1.0, float(spot_size)
    else:
        lib, mask = _select_library(adata, library_id=library_id, library_key=library_key, fn=fn)
        img, scalef, diameter = _image_and_scale(adata, lib, img_key, spot_size, fn)
    rows = np.flatnonzero(mask)
    if rows.size == 0:
        raise ValueError(f"{fn}: no spot belongs to library {lib!r}.")
    if C.SPATIAL_KEY not in adata.obsm:
        raise KeyError(f"{fn}: adata.obsm['spatial'] (spot centres in full-resolution pixels) is missing.")
    xy = np.asarray(adata.obsm[C.SPATIAL_KEY], dtype=np.float64)[rows, :2] * scalef
    d = diameter * scalef

    cols = adata.var_names.get_indexer(genes)
    true_vals, pred_vals = [], []
    for gene, col in zip(genes, cols, strict=True):
        p = _column(pred, rows, col)
        if not np.isfinite(p).any():
            raise ValueError(
                f"{fn}: gene {gene!r} has no finite prediction in adata.layers[{layer!r}] for these spots: the "
                "model did not cover it. Pick modelled genes (a finite prediction)."
            )
        pred_vals.append(p)
        true_vals.append(_column(true, rows, col))
    scores_key = Key.scores(layer) if scores_key is None else scores_key
    r_col = Key.pearson(scores_key)
    rs = adata.var[r_col].to_numpy()[cols] if r_col in adata.var.columns else np.full(len(genes), np.nan)

    pad = 0.75 * d
    x0, x1 = xy[:, 0].min() - pad, xy[:, 0].max() + pad
    y0, y1 = xy[:, 1].min() - pad, xy[:, 1].max() + pad
    aspect = (y1 - y0) / max(x1 - x0, 1e-9)
    panel = 3.4
    n = len(genes)
    n_c = min(ncols, n)
    n_r = math.ceil(n / n_c)
    fig = plt.figure(
        figsize=(n_c * (2 * panel + 0.9), n_r * (panel * min(max(aspect, 0.4), 2.5) + 0.6)), layout="constrained"
    )
    subfigs = np.atleast_1d(fig.subfigures(n_r, n_c, squeeze=False).ravel())
    axes: list[Axes] = []
    for i, (gene, t, p, r) in enumerate(zip(genes, true_vals, pred_vals, rs, strict=True)):
        sub = subfigs[i]
        ax_t, ax_p = sub.subplots(1, 2)
        both = np.concatenate([t[np.isfinite(t)], p[np.isfinite(p)]])
        vmin, vmax = float(both.min()), float(both.max())
        if vmax <= vmin:
            vmax = vmin + 1e-9
        norm = Normalize(vmin=vmin, vmax=vmax)
        colls = []
        for ax, vals in ((ax_t, t), (ax_p, p)):
            if img is not None:
                ax.imshow(img, origin="upper")
            colls.append(_spots(ax, xy, vals, d, cmap, norm))
            ax.set_xlim(x0, x1)
            ax.set_ylim(y1, y0)  # image rows grow downwards
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
        ax_t.set_title(f"{gene} (true)")
        ax_p.set_title(f"{gene} (predicted, r = {r:.2f})" if np.isfinite(r) else f"{gene} (predicted)")
        sub.colorbar(colls[1], ax=[ax_t, ax_p], shrink=0.8, pad=0.02)
        axes.extend([ax_t, ax_p])
    for sub in subfigs[n:]:
        sub.set_visible(False)
    return _finish(fig, axes, show, return_fig)


def _scores_entry(adata: AnnData, key: str | None, fn: str) -> tuple[str, Mapping[str, Any]]:
    key = Key.scores(C.PREDICTED_KEY) if key is None else key
    entry = adata.uns.get(key)
    marker = Key.gene_corr("true")
    if not isinstance(entry, Mapping) or marker not in entry:
        found = [k for k, v in adata.uns.items() if isinstance(v, Mapping) and marker in v]
        raise KeyError(
            f"{fn}: adata.uns[{key!r}] holds no scores; {_SCORES_HINT} (or pass `key=` its key_added; "
            f"scores found: {found})."
        )
    return key, entry


@_plot_docs
def gene_correlation(
    adata: AnnData,
    *,
    key: str | None = None,
    genes: Sequence[str] | None = None,
    cmap: str = "RdBu_r",
    show: bool | None = None,
    return_fig: bool = False,
) -> Figure | list[Axes] | None:
    """Gene-gene correlation of the measured vs. the predicted expression.

    Left, the gene-gene Pearson correlation matrix of the true expression; middle, that of the prediction, in
    the same gene order (hierarchical clustering of the true matrix, average linkage on ``1 - r``); right, the
    scatter of their upper-triangle entries with the preservation r (``gene_corr`` of
    :func:`sthist.tl.score_prediction`) in the title.

    Parameters
    ----------
    adata
        AnnData scored by :func:`sthist.tl.score_prediction`.
    key
        Its ``key_added``; ``None`` means ``'predicted_scores'``.
    genes
        Subset of the stored genes (``adata.uns[key]['gene_corr_genes']``) to show; ``None`` shows all.
    cmap
        Colour map of the heatmaps (range -1 to 1).
    {show}
    {return_fig}

    Returns
    -------
    With ``return_fig=True`` the :class:`~matplotlib.figure.Figure`; else, when not shown, the list of
    :class:`~matplotlib.axes.Axes` ``[true heatmap, predicted heatmap, scatter]``; else ``None``.
    """
    import matplotlib.pyplot as plt
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    fn = "sthist.pl.gene_correlation"
    check_adata(adata, fn=fn)
    key, entry = _scores_entry(adata, key, fn)
    ct = np.asarray(entry[Key.gene_corr("true")], dtype=np.float64)
    cp = np.asarray(entry[Key.gene_corr("pred")], dtype=np.float64)
    names = [str(g) for g in np.asarray(entry[Key.gene_corr("genes")]).tolist()]
    if genes is not None:
        genes = _genes_list(genes)
        unknown = [g for g in genes if g not in names]
        if unknown:
            raise KeyError(
                f"{fn}: gene(s) {unknown[:10]} are not among the genes of the stored gene-gene correlation "
                f"(adata.uns[{key!r}][{Key.gene_corr('genes')!r}], {len(names)} genes); rerun score_prediction with "
                "`genes=` or a larger `n_top`."
            )
        idx = np.array([names.index(g) for g in genes])
        ct, cp, names = ct[np.ix_(idx, idx)], cp[np.ix_(idx, idx)], genes
    k = len(names)
    if k < 2:
        raise ValueError(f"{fn}: need at least 2 genes for a gene-gene correlation, got {k}.")
    if k > 2:
        dist = 1.0 - np.nan_to_num(ct, nan=0.0)
        dist = (dist + dist.T) / 2
        np.fill_diagonal(dist, 0.0)
        order = leaves_list(linkage(squareform(np.clip(dist, 0, 2), checks=False), method="average"))
    else:
        order = np.arange(k)
    ct, cp = ct[np.ix_(order, order)], cp[np.ix_(order, order)]
    names = [names[i] for i in order]
    iu = np.triu_indices(k, 1)
    a, b = ct[iu], cp[iu]
    ok = np.isfinite(a) & np.isfinite(b)
    r = float(np.corrcoef(a[ok], b[ok])[0, 1]) if ok.sum() > 2 else float("nan")

    fig, axs = plt.subplots(1, 3, figsize=(15, 5), layout="constrained", gridspec_kw={"width_ratios": [1, 1, 0.9]})
    for ax, mat, title in ((axs[0], ct, "true"), (axs[1], cp, "predicted")):
        im = ax.imshow(mat, cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
        ax.set_title(f"gene-gene correlation ({title})")
        if k <= 60:
            fs = max(4.0, min(9.0, 360.0 / k))
            ax.set_xticks(np.arange(k), names, rotation=90, fontsize=fs)
            ax.set_yticks(np.arange(k), names, fontsize=fs)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(f"{k} genes")
    fig.colorbar(im, ax=list(axs[:2]), shrink=0.8, label="Pearson r")
    ax = axs[2]
    ax.scatter(a[ok], b[ok], s=8, alpha=0.5, edgecolor="none", color="C0")
    ax.plot([-1, 1], [-1, 1], ls="--", color="0.5", lw=1)
    ax.set_xlim(-1.05, 1.05)
    ax.set_ylim(-1.05, 1.05)
    ax.set_aspect("equal")
    ax.set_xlabel("gene-gene r (true)")
    ax.set_ylabel("gene-gene r (predicted)")
    ax.set_title(f"preservation r = {r:.2f} ({ok.sum()} pairs)")
    return _finish(fig, list(axs), show, return_fig)


@_plot_docs
def scores(
    adata: AnnData,
    *,
    key: str | None = None,
    n_genes: int = 30,
    show: bool | None = None,
    return_fig: bool = False,
    ax: Axes | None = None,
) -> Figure | Axes | None:
    """Per-gene Pearson r of a prediction, ranked: the best and the worst genes, with the mean as a line.

    Parameters
    ----------
    adata
        AnnData scored by :func:`sthist.tl.score_prediction`.
    key
        Its ``key_added``; ``None`` means ``'predicted_scores'``. Reads ``adata.var[key + '_pearson']``.
    n_genes
        Number of top and of bottom genes shown; all genes when there are at most ``2 * n_genes``.
    {show}
    {return_fig}
    {ax}

    Returns
    -------
    With ``return_fig=True`` the :class:`~matplotlib.figure.Figure`; else, when not shown, the
    :class:`~matplotlib.axes.Axes`; else ``None``.
    """
    import matplotlib.pyplot as plt

    fn = "sthist.pl.scores"
    check_adata(adata, fn=fn)
    n_genes = check_positive_int("n_genes", n_genes)
    key = Key.scores(C.PREDICTED_KEY) if key is None else key
    col = Key.pearson(key)
    if col not in adata.var.columns:
        suffix = C.PEARSON_SUFFIX
        found = [str(c)[: -len(suffix)] for c in adata.var.columns if str(c).endswith(suffix)]
        raise KeyError(f"{fn}: adata.var[{col!r}] is missing; {_SCORES_HINT} (or pass `key=`; found: {found}).")
    r = adata.var[col].to_numpy(dtype=np.float64)
    ok = np.isfinite(r)
    if not ok.any():
        raise ValueError(f"{fn}: adata.var[{col!r}] has no finite value; no gene could be scored.")
    names = adata.var_names[ok].astype(str).to_numpy()
    r = r[ok]
    order = np.argsort(-r, kind="stable")
    r, names = r[order], names[order]
    mean = float(r.mean())
    total = r.size
    if total > 2 * n_genes:
        vals = np.concatenate([r[:n_genes], [np.nan], r[-n_genes:]])
        labels = [*names[:n_genes], "…", *names[-n_genes:]]
    else:
        vals, labels = r, list(names)
    if ax is None:
        width = min(max(4.0, 0.22 * len(vals) + 1.5), 20.0)
        fig, ax = plt.subplots(figsize=(width, 4.0), layout="constrained")
    else:
        fig = _root_figure(ax)
    x = np.arange(len(vals))
    colors = np.where(np.nan_to_num(vals) >= 0, "C0", "C3")
    ax.bar(x, np.nan_to_num(vals), color=colors, width=0.8)
    ax.axhline(mean, ls="--", color="k", lw=1, label=f"mean r = {mean:.2f} ({total} genes)")
    ax.axhline(0, color="0.6", lw=0.8)
    ax_width_pt = ax.get_position().width * fig.get_figwidth() * 72.0
    fs = float(np.clip(0.6 * ax_width_pt / max(len(vals), 1), 4.0, 9.0))  # fit the rotated labels in their slots
    ax.set_xticks(x, labels, rotation=90, fontsize=fs)
    ax.set_xlim(-0.7, len(vals) - 0.3)
    lo = min(0.0, float(np.nanmin(vals)))
    hi = max(0.0, float(np.nanmax(vals)))
    span = max(hi - lo, 0.1)
    ax.set_ylim(max(lo - 0.05 * span, -1.05), min(hi + 0.12 * span, 1.05))
    ax.set_ylabel("Pearson r (predicted vs true)")
    shown = f"top and bottom {n_genes} of {total}" if total > 2 * n_genes else f"all {total}"
    ax.set_title(f"per-gene r, {shown} genes ({key})")
    ax.legend(loc="upper right", fontsize=8, frameon=False)
    return _finish(fig, ax, show, return_fig)


def _history_dict(adata: Any, key: str) -> Mapping[str, Any]:
    """The loss history of an AnnData's ``uns[key]``, of a fitted model, or a history dict itself."""
    from anndata import AnnData

    fn = "sthist.pl.training_history"
    if isinstance(adata, AnnData):
        if key not in adata.uns:
            found = [
                k for k, v in adata.uns.items() if isinstance(v, Mapping) and isinstance(v.get(C.HISTORY), Mapping)
            ]
            raise KeyError(
                f"{fn}: adata.uns[{key!r}] is missing; run `sthist.tl.fit_contrastive(adata, key_added={key!r})` "
                f"first, or pass `key=` its key_added (entries with a loss history: {found})."
            )
        h = adata.uns[key]
    else:
        h = adata
    if not isinstance(h, Mapping) and hasattr(h, "history"):
        h = h.history
    if isinstance(h, Mapping) and "train_loss" not in h and isinstance(h.get(C.HISTORY), Mapping):
        h = h[C.HISTORY]
    if not isinstance(h, Mapping) or "train_loss" not in h:
        where = f"adata.uns[{key!r}]" if isinstance(adata, AnnData) else type(adata).__name__
        raise TypeError(
            f"{fn}: pass an AnnData fitted by `sthist.tl.fit_contrastive` (with `key=` its key_added), a fitted "
            "model (with `.history`), its history dict {'train_loss': [...], 'val_loss': [...], 'best_epoch': int}, "
            f"or the adata.uns entry holding it; got {where} without 'train_loss'."
        )
    return h


@_plot_docs
def training_history(
    adata: AnnData | ContrastiveModel | Mapping[str, Any],
    *,
    key: str = C.CONTRASTIVE_KEY,
    show: bool | None = None,
    return_fig: bool = False,
    ax: Axes | None = None,
) -> Figure | Axes | None:
    """Training and validation loss per epoch, with the best epoch marked.

    Parameters
    ----------
    adata
        AnnData fitted by :func:`sthist.tl.fit_contrastive`, which reads ``adata.uns[key]['history']``. A fitted
        model (with a ``history`` attribute), the history dict itself or the ``adata.uns`` entry holding it work
        too. The history holds ``'train_loss'`` (one value per epoch), optionally ``'val_loss'`` and
        ``'best_epoch'`` (0-based index into the loss lists; epochs are drawn from 1).
    key
        ``key_added`` of :func:`sthist.tl.fit_contrastive`; used only when ``adata`` is an AnnData.
    {show}
    {return_fig}
    {ax}

    Returns
    -------
    With ``return_fig=True`` the :class:`~matplotlib.figure.Figure`; else, when not shown, the
    :class:`~matplotlib.axes.Axes`; else ``None``.
    """
    import matplotlib.pyplot as plt

    h = _history_dict(adata, key)
    train = np.asarray(h["train_loss"], dtype=np.float64).ravel()
    if train.size == 0:
        raise ValueError("sthist.pl.training_history: the history holds no epoch ('train_loss' is empty).")
    val = h.get("val_loss")
    val = None if val is None else np.asarray(val, dtype=np.float64).ravel()
    if val is not None and (val.size == 0 or not np.isfinite(val).any()):
        val = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(5.5, 3.8), layout="constrained")
    else:
        fig = _root_figure(ax)
    epochs = np.arange(1, train.size + 1)
    marker = "o" if train.size <= 30 else None
    ax.plot(epochs, train, color="C0", marker=marker, ms=3, label="train")
    if val is not None:
        ax.plot(np.arange(1, val.size + 1), val, color="C1", marker=marker, ms=3, label="validation")
    best = h.get("best_epoch")
    if (
        best is not None
        and np.isfinite(float(best))
        and 0 <= int(best) < max(train.size, 0 if val is None else val.size)
    ):
        best = int(best)
        ref = val if val is not None and best < val.size else train
        ax.axvline(best + 1, color="0.5", ls=":", lw=1)
        ax.plot(
            [best + 1],
            [ref[best]],
            marker="*",
            ms=12,
            color="C3",
            ls="none",
            label=f"best epoch {best + 1} ({ref[best]:.3g})",
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title("training history")
    if train.size < 15:
        ax.set_xticks(epochs)
    ax.legend(frameon=False)
    return _finish(fig, ax, show, return_fig)
