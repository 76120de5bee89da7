"""`benchmark`: several methods, repeated seeds, paired statistics against a reference.

It runs on the folds of :func:`sthist.tl.cross_validate` (one protocol).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import _constants as C
from .._constants import DEFAULT_ENCODER
from .._docs import inject_docs
from .._logging import info
from .._validate import check_adata, check_positive_int
from ._cv import FOLD_METRICS, _reads_tokens, prepare_folds, run_folds

if TYPE_CHECKING:
    import pandas as pd
    from anndata import AnnData

#: Metrics of the paired comparison: the per-gene r over all genes and over the fold's top HEG.
PAIRED_METRICS = ("pcc_all", "pcc_heg")
#: Seed of the bootstrap of the paired comparison (stored on the result, so that ``compare`` reproduces it).
_COMPARISON_SEED = 0
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
    n_boot, random_state
        Bootstrap resamples and seed that :attr:`comparison` was computed with (and :meth:`compare`'s defaults).

    ``result.save(dir)`` writes all of it to a folder and ``BenchmarkResult.load(dir)`` reads it back, so that
    :meth:`compare` and :func:`sthist.pl.benchmark` work later without fitting again.
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
    n_boot: int = 1000
    random_state: int = 0

    def __repr__(self) -> str:
        methods = list(dict.fromkeys(self.table["method"]))
        return (
            f"BenchmarkResult({len(methods)} methods, {self.table['fold'].nunique()} held-out groups of "
            f"{self.groupby!r}, seeds {self.seeds}, reference {self.reference!r}, {self.seconds:.0f} s)"
        )

    def compare(self, reference: str, *, n_boot: int | None = None, random_state: int | None = None) -> pd.DataFrame:
        """The paired comparison of every other method against ``reference`` (any benchmarked method).

        The same statistics as :attr:`comparison`, at :attr:`level`, e.g. ``result.compare("knn")``. ``n_boot`` and
        ``random_state`` default to those :attr:`comparison` was made with, so that
        ``result.compare(result.reference)`` reproduces it exactly.
        """
        methods = list(dict.fromkeys(m for m, _, _ in self.per_gene))
        if reference not in methods:
            raise ValueError(f"reference={reference!r} was not benchmarked; choose one of {methods}.")
        return paired_comparison(
            self.per_gene,
            self.gene_sets,
            [m for m in methods if m != reference],
            reference,
            n_boot=check_positive_int("n_boot", self.n_boot if n_boot is None else n_boot),
            level=self.level,
            random_state=self.random_state if random_state is None else random_state,
        )

    def save(self, dir_path: str | Path) -> None:
        """Write the result to the folder ``dir_path`` (created if needed), for :meth:`load`.

        Files: ``table``, ``summary`` and ``comparison`` as ``.csv`` and ``.json`` (records; the JSON holds every
        float exactly), ``per_gene.csv`` (long: ``method``, ``fold``, ``seed``, ``gene``, ``r``), ``gene_sets.json``
        and ``benchmark.json`` (reference, seeds, groupby, level, seconds, n_boot, random_state, the columns and
        dtypes of the tables and a format version). These files are overwritten, each one atomically and
        ``benchmark.json`` last; other files in the folder are left alone.
        """
        import pandas as pd

        path = Path(dir_path)
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(f"{str(path)!r} is a file; `BenchmarkResult.save` writes a folder.")
        manifest = path / _MANIFEST
        if manifest.is_file():
            try:
                old = json.loads(manifest.read_text())
            except ValueError:
                old = None
            ours = isinstance(old, dict) and (old.get("format") == _FORMAT or {"reference", "seeds"} <= set(old))
            if not ours:
                raise FileExistsError(
                    f"{str(manifest)!r} exists and is not the record of a saved benchmark; save into another folder."
                )
        if isinstance(self.random_state, bool) or not isinstance(self.random_state, int | np.integer):
            raise ValueError(
                f"random_state={self.random_state!r} cannot be saved; set an integer seed "
                "(`dataclasses.replace(result, random_state=0, comparison=result.compare(ref, random_state=0))`)."
            )
        files: dict[str, str] = {}
        tables: dict[str, Any] = {}
        for name in _TABLES:
            frame = getattr(self, name)
            files[f"{name}.csv"] = frame.to_csv(index=False)
            records, tables[name] = _encode_frame(frame)
            files[f"{name}.json"] = json.dumps(records, indent=1)
        keys = [(str(m), str(f), int(s)) for m, f, s in self.per_gene]
        series = list(self.per_gene.values())
        counts = [len(r) for r in series]
        long = pd.DataFrame(
            {
                "method": np.repeat(np.array([k[0] for k in keys], dtype=object), counts),
                "fold": np.repeat(np.array([k[1] for k in keys], dtype=object), counts),
                "seed": np.repeat(np.array([k[2] for k in keys], dtype=np.int64), counts),
                "gene": [str(g) for r in series for g in r.index],
                "r": np.concatenate([r.to_numpy(dtype=float) for r in series] or [np.zeros(0)]),
            },
            columns=list(_PER_GENE_COLUMNS),
        )
        # pandas writes the shortest repr of every float; read back with float_precision="round_trip" it is exact
        files[_PER_GENE] = long.to_csv(index=False)
        files[_GENE_SETS] = json.dumps(
            {str(f): {k: [str(g) for g in v] for k, v in sets.items()} for f, sets in self.gene_sets.items()}, indent=1
        )
        meta = {
            "format": _FORMAT,
            "version": _VERSION,
            "reference": self.reference,
            "seeds": [int(s) for s in self.seeds],
            "groupby": self.groupby,
            "level": float(self.level),
            "seconds": float(self.seconds),
            "n_boot": int(self.n_boot),
            "random_state": int(self.random_state),
            "tables": tables,
            "per_gene": {"keys": [list(k) for k in keys], "rows": len(long)},
        }
        path.mkdir(parents=True, exist_ok=True)
        for name, text in [*files.items(), (_MANIFEST, json.dumps(meta, indent=1))]:
            tmp = path / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, path / name)

    @classmethod
    def load(cls, dir_path: str | Path) -> BenchmarkResult:
        """Read a result that :meth:`save` wrote; :meth:`compare`, :func:`sthist.pl.benchmark` work on it.

        Parameters
        ----------
        dir_path
            The folder ``result.save(dir_path)`` wrote.

        Returns
        -------
        The :class:`BenchmarkResult`, with the tables (same columns and dtypes), the per-gene r, the gene sets and
        the settings it was saved with. ``result.compare(result.reference)`` reproduces ``result.comparison``.

        Examples
        --------
        >>> res = sthist.tl.BenchmarkResult.load("results/")  # doctest: +SKIP
        >>> res.compare("ridge_gcv")  # doctest: +SKIP
        """
        import pandas as pd

        path = Path(dir_path)
        if not path.is_dir():
            raise FileNotFoundError(
                f"no benchmark folder at {str(path)!r}; pass the folder that `BenchmarkResult.save(dir)` wrote."
            )
        rerun = (
            "results saved by older sthist versions (table, summary and comparison only) lack the per-gene "
            "results and cannot be loaded: run `sthist.tl.benchmark` again and save it"
        )
        needed = [_MANIFEST, *(f"{n}.json" for n in _TABLES), _PER_GENE, _GENE_SETS]
        missing = [f for f in needed if not (path / f).is_file()]
        if missing:
            raise FileNotFoundError(f"the benchmark folder {str(path)!r} lacks {missing}; {rerun}.")
        try:
            meta = json.loads((path / _MANIFEST).read_text())
        except ValueError as err:
            raise ValueError(f"{str(path / _MANIFEST)!r} is not valid JSON ({err}); save the result again.") from None
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            raise ValueError(f"{str(path / _MANIFEST)!r} is not the record of a saved benchmark; {rerun}.")
        if not isinstance(meta.get("version"), int) or meta["version"] > _VERSION:
            raise ValueError(
                f"{str(path)!r} was saved in format version {meta.get('version')!r}; this sthist reads up to "
                f"{_VERSION}: update sthist."
            )
        lacking = [k for k in _META_KEYS if k not in meta]
        lacking += [t for t in _TABLES if not isinstance(meta.get("tables"), dict) or t not in meta["tables"]]
        if not isinstance(meta.get("per_gene"), dict) or not {"keys", "rows"} <= set(meta["per_gene"]):
            lacking.append("per_gene keys and rows")
        if lacking:
            raise ValueError(f"{str(path / _MANIFEST)!r} lacks {lacking}; save the result again.")
        mixed = f"the files in {str(path)!r} do not match its {_MANIFEST} (written by different saves?); save again"
        frames = {}
        for name in _TABLES:
            try:
                records = json.loads((path / f"{name}.json").read_text())
                frames[name] = _decode_frame(records, meta["tables"][name])
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{name}.json: {err}; {mixed}.") from None
        try:
            # names stay strings ('NA', '1'); floats are read exactly
            long = pd.read_csv(
                path / _PER_GENE,
                dtype={"method": str, "fold": str, "seed": "int64", "gene": str, "r": "float64"},
                keep_default_na=False,
                na_values={"r": [""]},
                float_precision="round_trip",
            )
        except (ValueError, TypeError) as err:  # pandas' parser errors are ValueErrors
            raise ValueError(f"{_PER_GENE} cannot be read ({err}); {mixed}.") from None
        if list(long.columns) != list(_PER_GENE_COLUMNS) or len(long) != meta["per_gene"]["rows"]:
            raise ValueError(f"{_PER_GENE} has columns {list(long.columns)} and {len(long)} rows; {mixed}.")
        stored = {(m, f, int(s)): g for (m, f, s), g in long.groupby(["method", "fold", "seed"], sort=False)}
        keys = [(str(m), str(f), int(s)) for m, f, s in meta["per_gene"]["keys"]]
        if not set(stored) <= set(keys):
            raise ValueError(f"{_PER_GENE} holds {sorted(set(stored) - set(keys))[:3]} ...; {mixed}.")
        per_gene = {}
        for key in keys:
            g = stored.get(key)
            genes, r = ([], []) if g is None else (g["gene"].to_list(), g["r"].to_numpy())
            per_gene[key] = pd.Series(r, index=pd.Index(genes, dtype=object), dtype=float)
        try:
            gene_sets = json.loads((path / _GENE_SETS).read_text())
        except ValueError as err:
            raise ValueError(f"{_GENE_SETS} is not valid JSON ({err}); {mixed}.") from None
        return cls(
            table=frames["table"],
            summary=frames["summary"],
            comparison=frames["comparison"],
            per_gene=per_gene,
            gene_sets=gene_sets,
            reference=meta["reference"],
            seeds=[int(s) for s in meta["seeds"]],
            groupby=meta["groupby"],
            level=float(meta["level"]),
            seconds=float(meta["seconds"]),
            n_boot=int(meta["n_boot"]),
            random_state=int(meta["random_state"]),
        )


#: What ``BenchmarkResult.save`` writes: the format of ``benchmark.json`` and its version.
_FORMAT = "sthist.BenchmarkResult"
_VERSION = 1
_MANIFEST = "benchmark.json"
_TABLES = ("table", "summary", "comparison")
_PER_GENE = "per_gene.csv"
_PER_GENE_COLUMNS = ("method", "fold", "seed", "gene", "r")
_GENE_SETS = "gene_sets.json"
#: What ``benchmark.json`` holds besides the format, version and schemas.
_META_KEYS = ("reference", "seeds", "groupby", "level", "seconds", "n_boot", "random_state", "tables", "per_gene")


def _null_kind(value: Any) -> str | None:
    """``'none'``, ``'nan'`` or ``'na'`` for the missing values pandas keeps in object columns, else ``None``."""
    import pandas as pd

    if value is None:
        return "none"
    if value is pd.NA:
        return "na"
    if isinstance(value, float | np.floating) and np.isnan(value):
        return "nan"
    return None


def _plain(value: Any) -> Any:
    """A JSON value: numpy scalars as Python ones, every missing value as ``None`` (floats keep all digits)."""
    if _null_kind(value) is not None:
        return None
    return value.item() if isinstance(value, np.generic) else value


def _encode_frame(frame: pd.DataFrame) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """JSON records of ``frame`` and its schema (columns, dtypes, which missing value each object cell held)."""
    columns = [str(c) for c in frame.columns]
    schema: dict[str, Any] = {"columns": columns, "dtypes": [str(t) for t in frame.dtypes], "rows": len(frame)}
    nulls = {}
    for col, dtype in zip(columns, frame.dtypes, strict=True):
        if dtype == np.dtype(object):
            kinds = [k for k in map(_null_kind, frame[col]) if k is not None]
            if kinds:
                nulls[col] = kinds[0] if len(set(kinds)) == 1 else kinds
    if nulls:
        schema["nulls"] = nulls
    cells = [[_plain(v) for v in frame[c].tolist()] for c in frame.columns]
    return [dict(zip(columns, row, strict=True)) for row in zip(*cells, strict=True)], schema


def _decode_frame(records: list[dict[str, Any]], schema: dict[str, Any]) -> pd.DataFrame:
    """The DataFrame that :func:`_encode_frame` wrote, with its dtypes."""
    import pandas as pd

    if not isinstance(records, list) or len(records) != schema["rows"]:
        raise ValueError(f"{len(records) if isinstance(records, list) else 'no'} rows, not {schema['rows']}")
    missing = {None: None, "none": None, "nan": np.nan, "na": pd.NA}
    data = {}
    for col, dtype in zip(schema["columns"], schema["dtypes"], strict=True):
        values = [r[col] for r in records]
        kind = pd.api.types.pandas_dtype(dtype)
        if kind == np.dtype(object):
            nulls = schema.get("nulls", {}).get(col)
            order = iter(nulls if isinstance(nulls, list) else [])
            out = np.empty(len(values), dtype=object)
            out[:] = [v if v is not None else missing[nulls if isinstance(nulls, str) else next(order)] for v in values]
            data[col] = out
        elif isinstance(kind, np.dtype) and kind.kind in "fc":
            data[col] = np.array([np.nan if v is None else v for v in values], dtype=kind)
        elif isinstance(kind, np.dtype):
            data[col] = np.array(values, dtype=kind)
        else:
            data[col] = pd.array(values, dtype=kind)
    return pd.DataFrame(data, columns=schema["columns"])


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
    baselines: Sequence[str] = ("ridge_gcv", "knn", "dual_knn"),
    reference: str = "knn",
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
        Predictors without contrastive training run beside the methods (:func:`sthist.tl.methods`, kind
        ``'baseline'``): ``'ridge'`` (the HEST-Benchmark linear probe; its penalty is nearly zero on small cohorts,
        so it over-fits and flatters whatever is compared with it; run only when asked for), ``'ridge_gcv'`` (the
        same probe with its penalty chosen by generalised cross-validation, the fair linear control), ``'knn'``
        (raw-feature kNN, no training: the control for retrieval methods) and ``'dual_knn'`` (sthist's recommended
        predictor, not a control: what a method should beat to be worth its cost).
    reference
        The method every other one is compared with (one of ``methods`` or ``baselines``). The default, ``'knn'``,
        asks whether training helped at all; compare with others later from the same fits, e.g.
        ``result.compare("ridge_gcv")``.
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
    A :class:`~sthist.tl.BenchmarkResult` (``table``, ``summary``, ``comparison``, ``per_gene``, ``gene_sets``;
    ``result.save(dir)`` writes them as CSV and JSON and :meth:`~sthist.tl.BenchmarkResult.load` reads them back;
    :func:`sthist.pl.benchmark` plots them). ``adata`` is not modified.

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
            table, _, genes_r, _ = run_folds(
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
        per_gene,
        prep.gene_sets,
        [n for n in names if n != reference],
        reference,
        n_boot=n_boot,
        level=level,
        random_state=_COMPARISON_SEED,
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
        n_boot=n_boot,
        random_state=_COMPARISON_SEED,
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
