"""`sthist.pl.benchmark`: the methods of a benchmark over folds and seeds, and their paired differences."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ._plots import _finish, _plot_docs

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from ..tl._benchmark import BenchmarkResult


@_plot_docs
def benchmark(
    result: BenchmarkResult,
    *,
    metric: str = "pcc_all",
    figsize: tuple[float, float] | None = None,
    show: bool | None = None,
    return_fig: bool = False,
) -> Figure | list[Axes] | None:
    """Plot a :func:`sthist.tl.benchmark` result: every method over folds and seeds, and against the reference.

    Left: one point per held-out group and seed (colour: the group), the method's mean as a black line, the
    reference's mean as a dashed line. Right: the mean paired per-gene difference of Pearson r against the
    reference with its bootstrap confidence interval (filled: the interval excludes 0), and the folds x seeds won.

    Parameters
    ----------
    result
        The :class:`~sthist.tl.BenchmarkResult` of :func:`sthist.tl.benchmark`.
    metric
        A metric of ``result.table`` (``'pcc_all'``, ``'pcc_heg'``, ``'pcc_hvg'``, ``'gene_corr'``, ...,
        ``'*_pooled'``); the right panel needs one of the paired metrics (``'pcc_all'``, ``'pcc_heg'``).
    figsize
        Figure size in inches; ``None`` scales with the number of methods.
    {show}
    {return_fig}

    Returns
    -------
    The Figure with ``return_fig=True``; the two Axes with ``show=False``; else ``None``.
    """
    import matplotlib.pyplot as plt

    from ..tl._benchmark import BenchmarkResult

    if not isinstance(result, BenchmarkResult):
        raise TypeError(f"result must be the BenchmarkResult of `sthist.tl.benchmark`, got {type(result).__name__}.")
    table = result.table[result.table["metric"] == metric]
    if table.empty:
        raise ValueError(
            f"metric={metric!r} is not in the benchmark; choose one of {sorted(result.table['metric'].unique())}."
        )
    methods = list(dict.fromkeys(table["method"]))
    folds = list(dict.fromkeys(table["fold"]))
    comp = result.comparison[result.comparison["metric"] == metric] if len(result.comparison) else result.comparison
    n = len(methods)
    fig, (left, right) = plt.subplots(
        1, 2, figsize=figsize or (4.0 + 0.9 * n, 3.6), gridspec_kw={"width_ratios": [max(n, 2), max(n - 1, 2)]}
    )
    colours = plt.get_cmap("tab10")
    rng = np.random.default_rng(0)
    for i, method in enumerate(methods):
        rows = table[table["method"] == method]
        left.hlines(rows["value"].mean(), i - 0.3, i + 0.3, color="0.1", lw=2, zorder=4)
        for j, fold in enumerate(folds):
            vals = rows.loc[rows["fold"] == fold, "value"].to_numpy()
            x = i + rng.uniform(-0.18, 0.18, size=vals.size)
            left.scatter(x, vals, s=18, color=colours(j % 10), zorder=3, label=fold if i == 0 else None)
    ref_mean = table.loc[table["method"] == result.reference, "value"].mean()
    left.axhline(ref_mean, color="0.25", ls="--", lw=1, label=f"{result.reference} (mean)")
    left.set_xticks(range(n), methods, rotation=35, ha="right")
    left.set_ylabel(metric)
    left.set_title(f"{metric}: {len(folds)} held-out groups x {len(result.seeds)} seeds", fontsize=9)
    left.legend(fontsize=7, frameon=False, loc="best", ncol=2 if len(folds) > 3 else 1)
    left.grid(axis="y", color="0.92", zorder=0)

    others = [m for m in methods if m != result.reference]
    right.axvline(0.0, color="0.25", lw=1)
    if metric in ("pcc_all", "pcc_heg") and len(comp):
        comp = comp.set_index("method").reindex(others)
        ys = np.arange(len(others))[::-1]
        for y, (_, row) in zip(ys, comp.iterrows(), strict=True):
            if not np.isfinite(row["mean_diff"]):
                continue
            sig = row["ci_low"] > 0 or row["ci_high"] < 0
            right.errorbar(
                row["mean_diff"],
                y,
                xerr=[[row["mean_diff"] - row["ci_low"]], [row["ci_high"] - row["mean_diff"]]],
                fmt="o",
                color="C3" if row["ci_high"] < 0 else "C2" if sig else "0.4",
                mfc=None if sig else "white",
                capsize=3,
            )
            right.annotate(
                f"{int(row['wins'])}/{int(row['n'])}",
                (row["ci_high"], y),
                xytext=(4, 0),
                textcoords="offset points",
                va="center",
                fontsize=7,
            )
        right.set_yticks(ys, others)
        right.set_ylim(-0.6, len(others) - 0.4)
        right.set_xlabel(f"paired Δ {metric} vs {result.reference} ({int(result.level * 100)}% CI)")
    else:
        right.text(0.5, 0.5, f"no paired comparison for {metric}", ha="center", va="center", transform=right.transAxes)
        right.set_yticks([])
    right.set_title("Δr per gene vs reference (wins)", fontsize=9)
    fig.tight_layout()
    return _finish(fig, [left, right], show, return_fig)
