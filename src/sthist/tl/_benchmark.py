"""`benchmark`: several methods, repeated seeds, paired statistics against a reference.

It runs on the folds of :func:`sthist.tl.cross_validate` (one protocol).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import _constants as C
from .._docs import inject_docs
from .._logging import info
from .._validate import check_adata, check_positive_int
from ._cv import FOLD_METRICS, _reads_tokens, prepare_folds, run_folds
from ._fit import DEFAULT_ENCODER

if TYPE_CHECKING:
    import pandas as pd
    from anndata import AnnData

#: Metrics of the paired comparison: the per-gene r over all genes and over the fold's top HEG.
PAIRED_METRICS = ("pcc_all", "pcc_heg")
#: Columns of the table that describe the configuration of a row (everything but the metric and its value).
CONFIG_COLUMNS = (
    "optimizer",
    "lr",
    "schedule",
    "batch_size",
    "epochs",
    "stages",
    "select_on",
    "k",
    "weighting",
    "encoder",
    "frozen",
    "patch_size",
    "mpp",
    "normalisation",
    "gene_sets",
)


@dataclass
class BenchmarkResult:
    """What :func:`sthist.tl.benchmark` measured.

    Attributes
    ----------
    table
        Tidy: one row per method x held-out group (``fold``) x seed x metric, with ``split`` (``'within patient'``
        or ``'across patients'``), ``value`` and the configuration of the row (recipe, retrieval, encoder, patch
        geometry, normalisation, where the gene sets were chosen).
    summary
        Mean and standard deviation over seeds of every metric, per method and held-out group, and over all
        groups (``fold == 'all'``: the mean over groups of each seed, then mean and sd over seeds).
    comparison
        Every method against ``reference``: per metric (``pcc_all``, ``pcc_heg``), the mean paired per-gene
        difference of Pearson r over folds and seeds, its two-level bootstrap confidence interval (the folds x
        seeds resampled, then the genes within each), and in how many of the folds x seeds the method's mean r
        is higher (``wins`` of ``n``).
    per_gene
        ``{(method, fold, seed): Series of per-gene r}`` (averaged over the held-out sections), for further tests.
    gene_sets
        ``{fold: {'heg': [...], 'hvg': [...], 'gene_corr': [...]}}``, the sets chosen on the training groups of
        each fold (the same for every method and seed).
    reference, seeds, groupby, level
        The reference method, the seeds, the group column and the confidence level of the intervals.
    seconds
        Wall time of the whole benchmark.
    """

    table: pd.DataFrame
    summary: pd.DataFrame
    comparison: pd.DataFrame
    per_gene: dict[tuple[str, str, int], pd.Series] = field(repr=False)
    gene_sets: dict[str, dict[str, list[str]]] = field(repr=False)
    reference: str
    seeds: list[int]
    groupby: str
    level: float
    seconds: float

    def __repr__(self) -> str:
        methods = list(dict.fromkeys(self.table["method"]))
        return (
            f"BenchmarkResult({len(methods)} methods, {self.table['fold'].nunique()} held-out groups of "
            f"{self.groupby!r}, seeds {self.seeds}, reference {self.reference!r}, {self.seconds:.0f} s)"
        )

    def compare(self, reference: str, *, n_boot: int = 1000, random_state: int = 0) -> pd.DataFrame:
        """The paired comparison of every other method against ``reference`` (any benchmarked method).

        The same statistics as :attr:`comparison`, at :attr:`level`, e.g. ``result.compare("knn")``.
        """
        methods = list(dict.fromkeys(m for m, _, _ in self.per_gene))
        if reference not in methods:
            raise ValueError(f"reference={reference!r} was not benchmarked; choose one of {methods}.")
        return paired_comparison(
            self.per_gene,
            self.gene_sets,
            [m for m in methods if m != reference],
            reference,
            n_boot=check_positive_int("n_boot", n_boot),
            level=self.level,
            random_state=random_state,
        )

    def save(self, dir_path: str | Path) -> None:
        """Write ``table.csv``, ``table.json``, ``summary.csv``, ``summary.json`` and ``comparison.csv`` / ``.json``."""
        path = Path(dir_path)
        path.mkdir(parents=True, exist_ok=True)
        for name in ("table", "summary", "comparison"):
            frame = getattr(self, name)
            frame.to_csv(path / f"{name}.csv", index=False)
            (path / f"{name}.json").write_text(frame.to_json(orient="records", indent=1))
        meta = {
            "reference": self.reference,
            "seeds": self.seeds,
            "groupby": self.groupby,
            "level": self.level,
            "seconds": self.seconds,
        }
        (path / "benchmark.json").write_text(json.dumps(meta, indent=1))


def _seeds(seeds: Any) -> list[int]:
    if isinstance(seeds, bool):
        raise ValueError(f"seeds must be a positive integer or a list of integer seeds, got {seeds!r}.")
    if isinstance(seeds, int | np.integer):
        return list(range(check_positive_int("seeds", seeds)))
    try:
        out = [s for s in seeds]
    except TypeError:
        raise ValueError(f"seeds must be a positive integer or a list of integer seeds, got {seeds!r}.") from None
    if not out or any(isinstance(s, bool) or not isinstance(s, int | np.integer) for s in out):
        raise ValueError(f"seeds must be a positive integer or a non-empty list of integer seeds, got {seeds!r}.")
    if len(set(out)) != len(out):
        raise ValueError(f"seeds must be distinct, got {out}.")
    return [int(s) for s in out]


def paired_comparison(
    per_gene: dict[tuple[str, str, int], pd.Series],
    gene_sets: dict[str, dict[str, list[str]]],
    methods: Sequence[str],
    reference: str,
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    random_state: int = 0,
) -> pd.DataFrame:
    """Paired per-gene differences of Pearson r of every method against ``reference`` (see :class:`BenchmarkResult`)."""
    import pandas as pd

    rng = np.random.default_rng(random_state)
    rows = []
    pairs = sorted({(fold, seed) for (m, fold, seed) in per_gene if m == reference})
    for method in methods:
        for metric in PAIRED_METRICS:
            diffs, wins = [], 0
            for fold, seed in pairs:
                if (method, fold, seed) not in per_gene:
                    continue
                d = per_gene[(method, fold, seed)] - per_gene[(reference, fold, seed)]
                if metric == "pcc_heg":
                    d = d.reindex(gene_sets[fold]["heg"])
                d = d.to_numpy(dtype=float)
                d = d[np.isfinite(d)]
                if d.size:
                    diffs.append(d)
                    wins += int(d.mean() > 0)
            if not diffs:
                continue
            observed = float(np.mean([d.mean() for d in diffs]))
            # two-level bootstrap: the folds x seeds with replacement (their spread is part of the uncertainty),
            # then the genes with replacement within each drawn fold x seed
            per_pair = np.stack([d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(1) for d in diffs])
            drawn = rng.integers(0, len(diffs), size=(n_boot, len(diffs)))
            boot = per_pair[drawn, np.arange(n_boot)[:, None]].mean(1)
            lo, hi = np.quantile(boot, [(1 - level) / 2, 1 - (1 - level) / 2])
            rows.append(
                {
                    "method": method,
                    "reference": reference,
                    "metric": metric,
                    "mean_diff": observed,
                    "ci_low": float(lo),
                    "ci_high": float(hi),
                    "wins": wins,
                    "n": len(diffs),
                    "verdict": "better" if lo > 0 else ("worse" if hi < 0 else "no difference shown"),
                }
            )
    return pd.DataFrame(rows)


@inject_docs
def benchmark(
    adata: AnnData,
    *,
    methods: Sequence[str] | str = "all",
    groupby: str = C.PATIENT_KEY,
    folds: Sequence[str] | str | None = None,
    seeds: int | Sequence[int] = 3,
    baselines: Sequence[str] = ("ridge", "knn"),
    reference: str = "ridge",
    encoder: str = DEFAULT_ENCODER,
    layer: str | None = None,
    genes: Any = None,
    n_top: int = 50,
    library_key: str | None = None,
    patches_key: str = C.PATCHES_KEY,
    features_key: str | None = None,
    spatial_key: str = C.SPATIAL_KEY,
    fit_kwargs: dict[str, Any] | None = None,
    n_boot: int = 1000,
    level: float = 0.95,
    progress: bool = True,
) -> BenchmarkResult:
    """Compare methods under one protocol: the same folds, repeated seeds, paired statistics, no leakage.

    Every method and baseline runs on the folds of :func:`sthist.tl.cross_validate` (hold out each group of
    ``groupby``, or the groups in ``folds``) once per seed; image features of the frozen encoder are computed once
    for all. In every fold the gene sets of the metrics are chosen on the training groups, and the held-out spots
    are scored per section and pooled. Each method is then compared with ``reference`` gene by gene: the paired
    difference of Pearson r, averaged over folds and seeds, with a bootstrap interval over genes and the number of
    folds x seeds it wins. The interval comes from a two-level bootstrap (folds x seeds, then genes within each),
    so the spread between seeds and folds is part of it: a difference whose interval contains 0 is not a result.

    Parameters
    ----------
    {adata}
        It needs patches or embeddings, expression, and for spatial methods coordinates and sections.
    methods
        Registered names (:func:`sthist.tl.methods`), or ``'all'`` for every contrastive method.
    groupby
        Column of ``adata.obs`` whose groups are held out; ``'patient'`` measures generalisation to new patients.
        Folds that put one patient on both sides are labelled ``'within patient'`` (with a warning).
    folds
        Groups to hold out (``None``: every group), e.g. ``['B']``: train on the other patients, test on B.
    seeds
        Number of seeds (``0 .. seeds - 1``) or a list of seeds; each fits every method anew.
    baselines
        Predictors without contrastive training run beside the methods: ``'ridge'`` (HEST linear probe) and
        ``'knn'`` (raw-feature kNN, the control for retrieval methods).
    reference
        The method every other one is compared with (one of ``methods`` or ``baselines``).
    encoder
        Frozen image encoder whose features all methods share.
    {layer}
        The training targets and the truth, e.g. ``'targets'`` of :func:`sthist.pp.normalize_expression`.
    {genes}
    n_top
        Size of the HEG / HVG gene sets (chosen on the training groups of every fold).
    library_key
        Column of each spot's section (neighbours, per-section scores); ``None`` uses ``'section'`` when present,
        else ``groupby``.
    patches_key, features_key, spatial_key
        Where the patches, cached embeddings and coordinates are.
    fit_kwargs
        Options for every fit (e.g. ``dict(max_epochs=20)``); options a method's fit does not take are not given
        to it (so baselines ignore training settings).
    n_boot, level
        Bootstrap resamples and confidence level of the paired intervals.
    {progress}

    Returns
    -------
    A :class:`~sthist.tl.BenchmarkResult` (``table``, ``summary``, ``comparison``; ``result.save(dir)`` writes
    them as CSV and JSON; :func:`sthist.pl.benchmark` plots them). ``adata`` is not modified.

    Examples
    --------
    >>> res = sthist.tl.benchmark(adata, methods=["bleep"], groupby="patient", layer="targets")  # doctest: +SKIP
    >>> res.comparison  # doctest: +SKIP
    """
    import pandas as pd

    from .._engine.methods import METHODS
    from ._registry import get_predictor

    check_adata(adata, fn="sthist.tl.benchmark")
    t_start = time.perf_counter()
    if isinstance(methods, str):
        methods = list(METHODS) if methods == "all" else [methods]
    baselines = [baselines] if isinstance(baselines, str) else list(baselines or ())
    names = list(dict.fromkeys([*methods, *baselines]))
    if not names:
        raise ValueError("benchmark needs at least one method or baseline.")
    for name in names:
        get_predictor(name)  # unknown names raise with the registered ones
    if reference not in names:
        raise ValueError(f"reference={reference!r} is not among the benchmarked methods {names}; add it or pick one.")
    seed_list = _seeds(seeds)
    n_boot = check_positive_int("n_boot", n_boot)
    if not 0 < float(level) < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}.")
    if library_key is None:
        library_key = C.SECTION_KEY if C.SECTION_KEY in adata.obs else groupby
    prep = prepare_folds(
        adata,
        groupby=groupby,
        folds=folds,
        layer=layer,
        genes=genes,
        patches_key=patches_key,
        features_key=features_key,
        encoder=encoder,
        spatial_key=spatial_key,
        library_key=library_key,
        n_top=n_top,
        fit_kwargs=fit_kwargs,
        progress=progress,
        keep_patches=_reads_tokens(names),
    )
    start = info(
        f"benchmarking {len(names)} methods x {len(prep.folds)} held-out groups of {groupby!r} x {len(seed_list)} seeds"
    )
    tables, per_gene = [], {}
    for seed in seed_list:
        for name in names:
            table, _, genes_r = run_folds(
                prep, name, random_state=seed, fit_kwargs=fit_kwargs, strict=False, progress=False
            )
            tables.append(table)
            per_gene.update({(name, fold, seed): r for fold, r in genes_r.items()})
    wide = pd.concat(tables, ignore_index=True)
    for col in ("batch_size", "epochs", "stages", "k", "patch_size"):
        if col in wide:
            wide[col] = wide[col].astype("Int64")  # integers, with <NA> where a method has none
    wide["normalisation"] = prep.normalisation
    wide["gene_sets"] = f"top {prep.n_top} HEG / HVG chosen on the training groups of each fold"
    metrics = [*FOLD_METRICS, *(f"{m}_pooled" for m in FOLD_METRICS)]
    config = [c for c in CONFIG_COLUMNS if c in wide]
    long = wide.melt(
        id_vars=["method", "fold", "seed", "split", "n_obs", "n_sections", "seconds", *config],
        value_vars=metrics,
        var_name="metric",
        value_name="value",
    )
    long = long[["method", "fold", "seed", "split", "metric", "value", "n_obs", "n_sections", "seconds", *config]]
    summary = _summary(wide, metrics)
    comparison = paired_comparison(
        per_gene, prep.gene_sets, [n for n in names if n != reference], reference, n_boot=n_boot, level=level
    )
    info("    finished", time=start)
    return BenchmarkResult(
        table=long,
        summary=summary,
        comparison=comparison,
        per_gene=per_gene,
        gene_sets=prep.gene_sets,
        reference=reference,
        seeds=seed_list,
        groupby=groupby,
        level=float(level),
        seconds=round(time.perf_counter() - t_start, 1),
    )


def _summary(wide: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Mean and sd over seeds per method and fold, and over all folds (each seed's mean over folds)."""
    import pandas as pd

    per_fold = wide.groupby(["method", "fold", "split"], sort=False)[metrics].agg(["mean", "std"])
    overall_seed = wide.groupby(["method", "seed"], sort=False)[metrics].mean()
    overall = overall_seed.groupby("method", sort=False).agg(["mean", "std"])
    splits = wide.groupby("method", sort=False)["split"].agg(lambda s: ", ".join(sorted(set(s))))
    overall.index = pd.MultiIndex.from_arrays(
        [overall.index, ["all"] * len(overall), splits.reindex(overall.index).to_numpy()],
        names=["method", "fold", "split"],
    )
    out = pd.concat([per_fold, overall])
    out.columns = [f"{m}_{stat}" for m, stat in out.columns]
    return out.reset_index()
