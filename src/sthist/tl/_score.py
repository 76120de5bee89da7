"""Score predicted against measured expression: per-gene Pearson r, summaries, gene-gene correlation."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import sparse

from .. import _constants as C
from .. import _logging as logg
from .._anndata import layer_matrix, resolve_truth, to_uns
from .._constants import Key
from .._docs import inject_docs
from .._validate import check_adata, check_positive_int, resolve_genes

if TYPE_CHECKING:
    from anndata import AnnData

_CHUNK = 8192  # spots per dense block when streaming over (possibly sparse) matrices
_METRICS = ("pcc_all", "pcc_heg", "pcc_hvg", "pcc_markers", "mse", "mae", "gene_corr")
#: Metrics of prediction intervals, when the prediction has them (calibrated models).
_INTERVAL_METRICS = (
    "coverage_all",
    "coverage_heg",
    "width_all",
    "width_heg",
    "width_rel_all",
    "width_rel_heg",
    "adaptivity_heg",
)


# --------------------------------------------------------------------------------------------- #
# helpers (``_get_matrix`` is also used by ``_ridge``)
# --------------------------------------------------------------------------------------------- #
def _rows_dense(mat, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Dense float64 block ``mat[rows][:, cols]`` for dense, sparse or backed matrices."""
    block = mat[rows] if not isinstance(mat, pd.DataFrame) else mat.to_numpy()[rows]
    block = block[:, cols]
    if sparse.issparse(block):
        block = block.toarray()
    return np.asarray(block, dtype=np.float64)


def _chunks(rows: np.ndarray, size: int = _CHUNK) -> Iterator[np.ndarray]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


# --------------------------------------------------------------------------------------------- #
# the numbers
# --------------------------------------------------------------------------------------------- #
def _corr_from_cov(cov: np.ndarray) -> np.ndarray:
    sd = np.sqrt(np.clip(np.diag(cov), 0, None))
    with np.errstate(divide="ignore", invalid="ignore"):
        out = cov / np.outer(sd, sd)
    out[~np.isfinite(out)] = np.nan
    np.fill_diagonal(out, np.where(sd > 0, 1.0, np.nan))
    return np.clip(out, -1.0, 1.0)


def _preservation(corr_true: np.ndarray, corr_pred: np.ndarray) -> float:
    """Pearson r between the strict upper triangles of two gene-gene correlation matrices."""
    k = corr_true.shape[0]
    if k < 3:
        return float("nan")
    iu = np.triu_indices(k, 1)
    a, b = corr_true[iu], corr_pred[iu]
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3:
        return float("nan")
    a, b = a[ok] - a[ok].mean(), b[ok] - b[ok].mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else float("nan")


def _stats(true, pred, rows: np.ndarray, cols: np.ndarray, gc_cols: np.ndarray | None) -> dict[str, Any]:
    """Per-gene moments over ``rows`` in two streamed passes (means, then centred sums); no per-gene loop."""
    n, g = len(rows), len(cols)
    sum_t = np.zeros(g)
    sum_p = np.zeros(g)
    for r in _chunks(rows):
        sum_t += _rows_dense(true, r, cols).sum(0)
        sum_p += _rows_dense(pred, r, cols).sum(0)
    mean_t, mean_p = sum_t / n, sum_p / n
    stt, spp, stp = np.zeros(g), np.zeros(g), np.zeros(g)
    sse, sae = np.zeros(g), np.zeros(g)
    k = 0 if gc_cols is None else len(gc_cols)
    cov_t, cov_p = np.zeros((k, k)), np.zeros((k, k))
    for r in _chunks(rows):
        t = _rows_dense(true, r, cols)
        p = _rows_dense(pred, r, cols)
        diff = p - t
        sse += (diff * diff).sum(0)
        sae += np.abs(diff).sum(0)
        t -= mean_t
        p -= mean_p
        stt += (t * t).sum(0)
        spp += (p * p).sum(0)
        stp += (t * p).sum(0)
        if k:
            tg, pg = t[:, gc_cols], p[:, gc_cols]
            cov_t += tg.T @ tg
            cov_p += pg.T @ pg
    sd_t, sd_p = np.sqrt(stt / n), np.sqrt(spp / n)
    # a gene is constant when its spread is negligible relative to its level (exact zero after centring
    # is not guaranteed in floating point)
    const_t = sd_t <= 1e-10 * np.maximum(np.abs(mean_t), 1.0)
    const_p = sd_p <= 1e-10 * np.maximum(np.abs(mean_p), 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = stp / np.sqrt(stt * spp)
    r[const_t | const_p] = np.nan
    r = np.clip(r, -1.0, 1.0)
    out = {
        "n": n,
        "mean_true": mean_t,
        "var_true": stt / n,
        "r": r,
        "const_true": const_t,
        "const_pred": const_p,
        "mse": float(sse.sum() / (n * g)),
        "mae": float(sae.sum() / (n * g)),
    }
    if k:
        out["corr_true"] = _corr_from_cov(cov_t)
        out["corr_pred"] = _corr_from_cov(cov_p)
    return out


def _mean_finite(values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else float("nan")


def _top(score: np.ndarray, n_top: int, eligible: np.ndarray | None = None) -> np.ndarray:
    """Positions of the ``n_top`` largest scores (ties keep ``var`` order), optionally among ``eligible``."""
    cand = np.arange(score.size) if eligible is None else np.flatnonzero(eligible)
    order = cand[np.argsort(-score[cand], kind="stable")]
    return np.sort(order[:n_top])


def _gene_sets(gene_sets: Mapping[str, Sequence[str]] | None, scored: pd.Index, *, fn: str) -> dict[str, np.ndarray]:
    """Positions among the scored genes of the sets named in ``gene_sets`` (unscored names are left out)."""
    if gene_sets is None:
        return {}
    if not isinstance(gene_sets, Mapping):
        raise TypeError(f"{fn}: gene_sets must be a mapping such as {{'heg': [...], 'hvg': [...]}}, got {gene_sets!r}.")
    unknown = sorted(set(gene_sets) - {"heg", "hvg", "gene_corr"})
    if unknown:
        raise ValueError(f"{fn}: gene_sets names {unknown}; valid: ['heg', 'hvg', 'gene_corr'].")
    out = {}
    for name, genes in gene_sets.items():
        if isinstance(genes, str):
            raise TypeError(f"{fn}: gene_sets[{name!r}] must be a list of gene names, not a string.")
        pos = scored.get_indexer([str(g) for g in genes])
        if (pos >= 0).sum() == 0:
            raise ValueError(f"{fn}: none of the genes of gene_sets[{name!r}] is scored; check the names.")
        out[name] = np.sort(np.unique(pos[pos >= 0]))
    return out


class _Intervals:
    """The interval layers of a prediction (``<layer>_lower`` / ``_upper``) and what scoring them needs."""

    def __init__(self, adata: AnnData, layer: str, cols: np.ndarray):
        self.lower = adata.layers[Key.interval(layer, "lower")]
        self.upper = adata.layers[Key.interval(layer, "upper")]
        rng = (
            adata.var[Key.train_range(layer)].to_numpy(dtype=float)[cols]
            if Key.train_range(layer) in adata.var
            else None
        )
        self.range = None if rng is None else np.where(rng > 0, rng, np.nan)
        scale = adata.varm.get(Key.interval_scale(layer)) if Key.interval_scale(layer) in adata.varm else None
        self.scale = None if scale is None else scale.iloc[cols]
        entry = adata.uns.get(layer, {})
        cal = entry.get("calibration", {}) if isinstance(entry, dict) else {}
        self.level = float(cal["level"]) if isinstance(cal, dict) and "level" in cal else float("nan")

    @staticmethod
    def present(adata: AnnData, layer: str) -> bool:
        return Key.interval(layer, "lower") in adata.layers and Key.interval(layer, "upper") in adata.layers

    def stats(self, true, pred, rows: np.ndarray, cols: np.ndarray, heg: np.ndarray) -> dict[str, Any]:
        """Per-gene coverage and width, their summaries, adaptivity, and the coverage at every calibrated level."""
        from scipy.stats import spearmanr

        t = _rows_dense(true, rows, cols)
        p = _rows_dense(pred, rows, cols)
        lo = _rows_dense(self.lower, rows, cols)
        hi = _rows_dense(self.upper, rows, cols)
        inside = (t >= lo) & (t <= hi)
        width = hi - lo
        out: dict[str, Any] = {"coverage": inside.mean(0), "width": width.mean(0)}
        err = np.abs(t - p)
        spot_w, spot_e = width[:, heg].mean(1), err[:, heg].mean(1)
        adapt = spearmanr(spot_w, spot_e).statistic if rows.size > 2 and np.ptp(spot_w) > 0 else np.nan
        rel = out["width"] / self.range if self.range is not None else np.full(len(cols), np.nan)
        out["summary"] = {
            "coverage_all": float(inside.mean()),
            "coverage_heg": float(inside[:, heg].mean()),
            "width_all": float(width.mean()),
            "width_heg": float(width[:, heg].mean()),
            "width_rel_all": _mean_finite(rel),
            "width_rel_heg": _mean_finite(rel[heg]),
            "adaptivity_heg": float(adapt),
        }
        if self.scale is not None:
            half = hi - p  # the upper bound is never clipped: it gives the half-width at the calibrated level
            clipped = bool((lo >= 0).all())
            curve = {"level": [], "coverage_all": [], "coverage_heg": []}
            for name in self.scale.columns:
                h = half * self.scale[name].to_numpy(dtype=float)[None, :]
                low = np.maximum(p - h, 0.0) if clipped else p - h
                cov = (t >= low) & (t <= p + h)
                curve["level"].append(float(name))
                curve["coverage_all"].append(float(cov.mean()))
                curve["coverage_heg"].append(float(cov[:, heg].mean()))
            out["curve"] = curve
        return out


def _summarise(st: dict[str, Any], sets: dict[str, np.ndarray | None]) -> dict[str, Any]:
    r = st["r"]
    row: dict[str, Any] = {
        "pcc_all": _mean_finite(r),
        "pcc_heg": _mean_finite(r[sets["heg"]]),
        "pcc_hvg": _mean_finite(r[sets["hvg"]]),
    }
    if sets["markers"] is not None:
        row["pcc_markers"] = _mean_finite(r[sets["markers"]])
    row["mse"] = st["mse"]
    row["mae"] = st["mae"]
    row["gene_corr"] = _preservation(st["corr_true"], st["corr_pred"]) if "corr_true" in st else float("nan")
    row["n_obs"] = int(st["n"])
    row["n_genes"] = int(np.isfinite(r).sum())
    row["n_constant"] = int((st["const_true"] | st["const_pred"]).sum())
    return row


# --------------------------------------------------------------------------------------------- #
# public
# --------------------------------------------------------------------------------------------- #
@inject_docs
def score_prediction(
    adata: AnnData,
    *,
    layer: str = C.PREDICTED_KEY,
    true_layer: str | None = None,
    genes: Sequence[str] | str | None = None,
    groupby: str | None = None,
    markers: Sequence[str] | None = None,
    n_top: int = 50,
    gene_sets: Mapping[str, Sequence[str]] | None = None,
    key_added: str | None = None,
    inplace: bool = True,
) -> pd.DataFrame | None:
    r"""Score a predicted expression layer against the measured expression.

    The truth (one rule, the same on the command line)
        By default the prediction is scored against the expression its model was **fitted on**: the layer and
        normalisation that :func:`sthist.tl.predict_expression` (or :func:`sthist.tl.cross_validate`) recorded in
        ``adata.uns[layer]['params']['targets']``, e.g. ``layers['targets']`` written by
        :func:`sthist.pp.normalize_expression` with ``flavor='hist2st'``. When this AnnData lacks that layer, the
        error gives the :func:`~sthist.pp.normalize_expression` call that makes it. A truth on another recorded
        scale than the model's (another ``flavor``, ``target_sum`` or library genes, or raw counts against
        normalised predictions) raises instead of giving a number on another scale: Pearson r is invariant to a
        per-gene shift and scale, but not to another library size per spot, and MSE and MAE are invariant to
        neither.

    Which genes and spots are evaluated
        A gene is *modelled* when its predicted column has at least one finite value; genes whose prediction is
        all-NaN (not covered by the model) are left out everywhere. A spot is evaluated when the predicted and
        the true values of every modelled gene are finite there; other spots are dropped (and counted in the log).

    Definitions (the HEST-Benchmark and BLEEP conventions)
        - **per-gene r**: Pearson correlation over the evaluated spots between true and predicted expression of
          one gene, :math:`r_g = \sum_i (t_{ig}-\bar t_g)(p_{ig}-\bar p_g) /
          \sqrt{\sum_i (t_{ig}-\bar t_g)^2 \sum_i (p_{ig}-\bar p_g)^2}`. It is NaN for a gene that is
          constant in the true or the predicted values (counted as ``n_constant``), as ``scipy.stats.pearsonr``
          would give. HEST-Benchmark averages :math:`r_g` over its 50 most variable genes per split
          (``pearson_mean``); BLEEP averages it over all genes after removing NaN, and over the 50 most highly
          expressed genes (HEG) and 50 most variable genes (HVG) of the ground truth.
        - ``pcc_all``: mean of the finite :math:`r_g` over the modelled genes.
        - ``pcc_heg``: mean of the finite :math:`r_g` over the ``n_top`` modelled genes with the highest mean
          true expression.
        - ``pcc_hvg``: same over the ``n_top`` modelled genes with the highest variance of the true expression.
        - ``pcc_markers``: same over the modelled genes of ``markers`` (only when ``markers`` is given).
        - ``mse``, ``mae``: mean over spots and modelled genes of :math:`(p-t)^2` and :math:`|p-t|`.
        - ``gene_corr`` (gene-gene correlation preservation): take the ``n_top`` modelled genes with the highest
          mean true expression among those with a finite :math:`r_g`; compute the gene-gene Pearson
          correlation matrix of the true and of the predicted expression over the spots; ``gene_corr`` is the
          Pearson r between the strict upper-triangle entries of the two matrices (BLEEP's heatmap genes).

    Prediction intervals (calibrated models, :func:`sthist.tl.calibrate`)
        When ``layers[layer + '_lower']`` and ``layers[layer + '_upper']`` exist: ``coverage_all`` /
        ``coverage_heg``, the fraction of (spot, gene) values inside their interval over all modelled genes / the
        HEG; ``width_all`` / ``width_heg``, the mean width; ``width_rel_all`` / ``width_rel_heg``, the mean over genes
        of the mean width divided by the gene's 5-95 % range over the training spots
        (``var[layer + '_train_range']``); ``adaptivity_heg``, the Spearman correlation over spots between the mean
        width and the mean absolute error over the HEG (do wider intervals mark worse predictions?). With
        ``varm[layer + '_interval_scale']``, the coverage at every calibrated level is in
        ``uns[key_added]['coverage_curve']`` (what :func:`sthist.pl.calibration` draws).

    The gene sets (HEG, HVG, gene-gene genes) are chosen once on all evaluated spots and kept for the groups, so
    the per-group numbers compare like with like; the per-gene r and all means are recomputed within each group.
    Choosing them on the spots being scored uses the truth of the test data; an honest benchmark chooses them on
    the training data and passes them as ``gene_sets`` (as :func:`sthist.tl.cross_validate` does per fold).

    Parameters
    ----------
    {adata}
    layer
        Layer holding the prediction, shape ``(n_obs, n_vars)``, NaN where a gene was not modelled.
    true_layer
        Layer holding the measured expression, dense or sparse; ``'X'`` for ``adata.X``. ``None``: the layer the
        prediction's model was fitted on (see above); a prediction that does not record it needs ``true_layer``.
    {genes}
    groupby
        Column of ``adata.obs`` (e.g. ``'section'``) to score each group separately as well.
    markers
        Marker genes for ``pcc_markers``.
    n_top
        Number of genes in the HEG, HVG and gene-gene correlation sets.
    gene_sets
        The sets chosen elsewhere, e.g. on training data: a mapping with any of ``'heg'``, ``'hvg'`` and
        ``'gene_corr'`` to gene names (genes that are not scored are left out; ``'gene_corr'`` defaults to
        ``'heg'``). Sets not given are chosen on the evaluated spots as above.
    key_added
        Name of the outputs; defaults to the value of ``layer`` followed by ``'_scores'``.
    inplace
        Write the results into ``adata`` and return ``None``; ``False`` writes nothing and returns the table.

    Returns
    -------
    With ``inplace=False``, a :class:`~pandas.DataFrame` with one row ``'all'`` and one per group and columns
    ``pcc_all``, ``pcc_heg``, ``pcc_hvg`` (``pcc_markers``), ``mse``, ``mae``, ``gene_corr``, ``n_obs``,
    ``n_genes`` (genes with a finite r), ``n_constant``, and the interval metrics when the prediction has intervals.
    Otherwise ``None``, and writes (names built by
    ``sthist._constants.Key``; with the default ``layer``, ``key_added`` is ``'predicted_scores'``)

    ``adata.var[key_added + '_pearson']``
        per-gene r over all evaluated spots (NaN where not evaluated).
    ``adata.varm[key_added + '_pearson']``
        with ``groupby``: a genes x groups DataFrame of the per-gene r within each group.
    ``adata.var[key_added + '_coverage']``, ``adata.var[key_added + '_width']``
        with intervals: per-gene coverage and mean width over the scored spots.

    ``adata.uns[key_added]``
        ``'summary'`` (the ``'all'`` row as a dict), ``'per_group'`` (dict of dicts, empty without ``groupby``),
        ``'gene_corr_true'`` and ``'gene_corr_pred'`` (the two gene-gene correlation matrices),
        ``'gene_corr_genes'`` (their genes, in matrix order) and ``'params'``.
    """
    fn = "sthist.tl.score_prediction"
    check_adata(adata, fn=fn)
    n_top = check_positive_int("n_top", n_top)
    key_added = Key.scores(layer) if key_added is None else str(key_added)
    hint = " Run `sthist.tl.predict_expression(adata, model=...)` first." if layer == C.PREDICTED_KEY else ""
    pred = layer_matrix(adata, layer, fn=fn, what="predicted expression", hint=hint)
    true, true_layer, _ = resolve_truth(adata, layer=layer, true_layer=true_layer, fn=fn)

    if tuple(pred.shape) != tuple(adata.shape) or tuple(true.shape) != tuple(adata.shape):
        raise ValueError(
            f"{fn}: shape mismatch: predicted {tuple(pred.shape)}, true {tuple(true.shape)}, adata {adata.shape}; "
            "both must be (n_obs, n_vars)."
        )
    if sparse.issparse(pred):
        pred = pred.toarray()  # a prediction holds NaN; keep it dense
    if groupby is not None and groupby not in adata.obs.columns:
        raise KeyError(f"{fn}: groupby={groupby!r} is not a column of adata.obs; available: {list(adata.obs.columns)}.")
    cols = np.flatnonzero(resolve_genes(adata, genes))
    start = logg.info(f"scoring adata.layers[{layer!r}] against {'X' if true_layer is None else repr(true_layer)}")

    # modelled genes: any finite prediction
    finite_pred = np.zeros(len(cols), dtype=bool)
    all_rows = np.arange(adata.n_obs)
    for r in _chunks(all_rows):
        finite_pred |= np.isfinite(_rows_dense(pred, r, cols)).any(0)
    if not finite_pred.any():
        raise ValueError(
            f"{fn}: adata.layers[{layer!r}] has no finite value for the {len(cols)} selected gene(s), so no gene "
            "overlaps between prediction and truth. Check `genes=` and that the model covered these genes "
            "(genes the model did not see are NaN)."
        )
    cols = cols[finite_pred]
    n_unmodelled = int((~finite_pred).sum())
    # evaluated spots: every modelled gene finite in prediction and truth
    keep = np.ones(adata.n_obs, dtype=bool)
    for r in _chunks(all_rows):
        keep[r] = np.isfinite(_rows_dense(pred, r, cols)).all(1) & np.isfinite(_rows_dense(true, r, cols)).all(1)
    rows = np.flatnonzero(keep)
    if rows.size < 2:
        raise ValueError(
            f"{fn}: fewer than 2 spots have finite predicted and true values for all modelled genes; "
            "predict the spots you want to score, or fill the NaN in the true expression."
        )
    if rows.size < adata.n_obs:
        logg.info(f"    {adata.n_obs - rows.size} spot(s) with NaN in the prediction or the truth are not scored")
    if n_unmodelled:
        logg.info(f"    {n_unmodelled} gene(s) not modelled (all-NaN prediction) are left out")

    marker_pos = None
    if markers is not None:
        markers = [str(m) for m in markers]
        unknown = [m for m in markers if m not in adata.var_names]
        if unknown:
            raise KeyError(f"{fn}: marker gene(s) {unknown[:10]} are not in adata.var_names; fix `markers=`.")
        evaluated = pd.Index(adata.var_names[cols])
        pos = evaluated.get_indexer(markers)
        if (pos < 0).any():
            logg.warning(
                f"{fn}: marker gene(s) {[m for m, p in zip(markers, pos, strict=True) if p < 0][:10]} are not "
                "scored (not selected by `genes=` or not modelled)"
            )
        marker_pos = np.unique(pos[pos >= 0])

    overall = _stats(true, pred, rows, cols, None)
    given = _gene_sets(gene_sets, pd.Index(adata.var_names[cols]), fn=fn)
    heg = given.get("heg", _top(overall["mean_true"], n_top))
    hvg = given.get("hvg", _top(overall["var_true"], n_top))
    if "gene_corr" in given or "heg" in given:
        gc = given.get("gene_corr", given.get("heg"))
        gc = gc[np.isfinite(overall["r"][gc])]
    else:
        gc = _top(overall["mean_true"], n_top, eligible=np.isfinite(overall["r"]))
    # gene-gene matrices in the order of the genes' means (highest first); plots reorder by clustering
    gc = gc[np.argsort(-overall["mean_true"][gc], kind="stable")]
    sets = {"heg": heg, "hvg": hvg, "markers": marker_pos}
    overall = _stats(true, pred, rows, cols, gc)
    summary = _summarise(overall, sets)
    intervals = _Intervals(adata, layer, cols) if _Intervals.present(adata, layer) else None
    if intervals is not None:
        interval_stats = intervals.stats(true, pred, rows, cols, heg)
        summary.update(interval_stats["summary"])
    n_const = summary["n_constant"]
    if n_const:
        logg.warning(
            f"{fn}: {n_const} gene(s) are constant in the true ({int(overall['const_true'].sum())}) or predicted "
            f"({int(overall['const_pred'].sum())}) expression over the scored spots; their r is NaN and they are "
            "left out of the means"
        )

    per_group: dict[str, dict[str, Any]] = {}
    group_r: dict[str, np.ndarray] = {}
    if groupby is not None:
        labels = adata.obs[groupby]
        groups = labels.cat.categories if isinstance(labels.dtype, pd.CategoricalDtype) else pd.unique(labels)
        lab = labels.to_numpy()[rows]
        for grp in groups:
            g_rows = rows[lab == grp]
            if g_rows.size < 2:
                logg.info(f"    group {grp!r} has {g_rows.size} scored spot(s); skipped")
                continue
            g_stats = _stats(true, pred, g_rows, cols, gc)
            per_group[str(grp)] = _summarise(g_stats, sets)
            if intervals is not None:
                per_group[str(grp)].update(intervals.stats(true, pred, g_rows, cols, heg)["summary"])
            group_r[str(grp)] = g_stats["r"]

    table = pd.DataFrame.from_dict({"all": summary, **per_group}, orient="index")
    metric_cols = [m for m in (*_METRICS, *_INTERVAL_METRICS) if m in table.columns]
    table = table[[*metric_cols, "n_obs", "n_genes", "n_constant"]]
    table.index.name = groupby if groupby is not None else "group"
    logg.info(
        f"    pcc_all = {summary['pcc_all']:.3f}, pcc_heg = {summary['pcc_heg']:.3f}, "
        f"pcc_hvg = {summary['pcc_hvg']:.3f} over {summary['n_genes']} genes and {summary['n_obs']} spots"
        + (
            ""
            if intervals is None
            else f"; intervals at {intervals.level:g}: coverage {summary['coverage_all']:.3f} (top HEG "
            f"{summary['coverage_heg']:.3f})"
        ),
        time=start,
    )
    if not inplace:
        return table

    pearson = np.full(adata.n_vars, np.nan)
    pearson[cols] = overall["r"]
    adata.var[Key.pearson(key_added)] = pearson
    if groupby is not None:
        frame = pd.DataFrame(np.nan, index=adata.var_names.copy(), columns=list(group_r), dtype=float)
        for grp, r in group_r.items():
            frame.iloc[cols, frame.columns.get_loc(grp)] = r
        adata.varm[Key.pearson(key_added)] = frame
    if intervals is not None:
        for name, column in (("coverage", Key.coverage(key_added)), ("width", Key.width(key_added))):
            values = np.full(adata.n_vars, np.nan)
            values[cols] = interval_stats[name]
            adata.var[column] = values
    adata.uns[key_added] = {
        **(
            {"coverage_curve": to_uns(interval_stats["curve"])}
            if intervals is not None and "curve" in interval_stats
            else {}
        ),
        "summary": to_uns(summary),
        "per_group": to_uns(per_group),
        Key.gene_corr("true"): overall["corr_true"],
        Key.gene_corr("pred"): overall["corr_pred"],
        Key.gene_corr("genes"): [str(g) for g in adata.var_names[cols[gc]]],
        "params": {
            "layer": layer,
            "true_layer": "X" if true_layer is None else true_layer,
            "genes": "all"
            if genes is None
            else (str(genes) if isinstance(genes, str | Path) else [str(g) for g in genes]),
            "groupby": "" if groupby is None else groupby,
            "n_top": n_top,
            "gene_sets": "chosen on the scored spots" if not given else f"given: {sorted(given)}",
            **({} if markers is None else {"markers": list(markers)}),
            "n_spots_scored": int(rows.size),
            "n_genes_modelled": int(cols.size),
        },
    }
    return None
