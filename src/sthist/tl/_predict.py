"""`predict_expression`: expression of new tissue from its H&E, into an AnnData layer."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .. import _constants as C
from .._anndata import find_features, get_patches, patch_geometry, record, spatial_inputs
from .._dask import resolve_client
from .._docs import inject_docs
from .._logging import info
from .._validate import check_adata, check_choice, check_positive_int
from ._utils import resolve_model

#: A slide with at least this fraction of spots flagged as unlike the calibration tissue draws a ShiftWarning.
SLIDE_OOD_FRACTION = 0.1

if TYPE_CHECKING:
    from anndata import AnnData

    from .._engine.base import BaseModel


def model_inputs(adata: AnnData, model: BaseModel, *, patches_key: str, features_key: str | None) -> dict[str, Any]:
    """What ``model`` predicts from: its encoder's cached features when present, else the patches.

    The geometry of the patches (or of the patches the features were made from) must be the model's.
    """
    inputs = model.inputs
    feats = None
    if not (inputs.finetuned or inputs.tokens):
        feats = find_features(
            adata,
            encoder=inputs.encoder,
            pretrained=inputs.pretrained,
            checkpoint=inputs.checkpoint,
            features_key=features_key,
        )
    if feats is not None:
        inputs.check_geometry(*patch_geometry(adata, feats.key), where=f"the patches behind adata.obsm[{feats.key!r}]")
        return {"features": feats.values, "features_key": feats.key}
    patches = get_patches(adata, patches_key=patches_key)
    size, mpp = patch_geometry(adata, patches_key)
    inputs.check_geometry(size or int(patches.shape[1]), mpp, where=f"the patches in adata.obsm[{patches_key!r}]")
    return {"images": patches, "features_key": None}


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
    level: float | None = None,
    client: Any = None,
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
    level
        Calibrated models (:func:`sthist.tl.calibrate`): the coverage of the intervals, one of the calibrated levels
        (``None``: the calibration's, 0.9 by default).
    client
        A :class:`dask.distributed.Client`: predict on its workers, one task per section (models that read spatial
        neighbours) or per ``chunk_size`` spots, the model sent to every worker once; patches in a store written by
        ``extract_patches(store=...)`` are read by each worker from the store (the rows of its task only). ``None``
        predicts here. Results are those of ``client=None``.
    device
        Torch device; ``None`` picks cuda, then mps, then cpu.
    {progress}
    {copy}

    Returns
    -------
    ``None`` (``copy=False``: ``adata`` is modified), or a new AnnData (``copy=True``), with

    ``adata.layers['predicted' | key_added]``
        float32 (n_obs, n_vars), genes matched by name; NaN for genes the model does not cover.
    ``adata.var['predicted_modelled']``
        whether the model covers the gene.
    ``adata.obs['predicted_spread']``
        spread of the retrieved neighbours' expression (retrieval models): an uncertainty per spot.
    ``adata.layers['predicted_lower']``, ``adata.layers['predicted_upper']``
        calibrated models: the bounds of the prediction intervals at ``level`` (NaN where not modelled; lower bounds
        clipped at 0 for non-negative targets).
    ``adata.var['predicted_cv_r']``, ``['predicted_cv_r_low']``, ``['predicted_cv_r_high']``, ``['predicted_reliable']``
        calibrated models: each gene's cross-validated r, its 90 % interval, and whether the interval lies above the
        calibration's ``min_r``; ``['predicted_train_range']``: the gene's 5-95 % range over the training spots.
    ``adata.varm['predicted_interval_scale']``
        calibrated models: per gene, the half-width of the interval at each calibrated level relative to ``level``.
    ``adata.obs['predicted_shift']``, ``adata.obs['predicted_ood']``
        calibrated models: how unlike the calibration tissue a spot is (1 - its conformal p-value, in the model's
        space) and the flag (p at most the calibration's ``ood_alpha``). When at least 10 % of the spots are flagged,
        a :class:`~sthist.tl.ShiftWarning` names the fraction.
    ``adata.uns['predicted']['params']``
        the settings used (e.g. retrieval ``k`` after capping), the model's description and where it came from,
        and ``targets``: the layer and scale of the expression the model was fitted on, which
        :func:`sthist.tl.score_prediction` and :func:`sthist.pl.predicted_vs_true` take as the truth by default.
    ``adata.uns['predicted']['calibration']``
        calibrated models: the slide's summary (``level``, ``n_reliable``, ``fraction_ood`` and the fraction expected,
        ``median_shift``, ``unlike_calibration``) and the calibration's provenance.


    When ``adata`` has no genes at all (a new slide), ``copy=True`` returns a new AnnData whose genes are the
    model's and whose ``X`` and ``layers[key_added]`` both hold the predictions, ready for scanpy and squidpy;
    ``copy=False`` writes them in place as a DataFrame ``adata.obsm['predicted' | key_added]`` (spots x the
    model's genes), since the genes of an AnnData cannot be added in place.

    Examples
    --------
    >>> model = sthist.tl.fit_contrastive(reference, layer="targets")  # doctest: +SKIP
    >>> sthist.pp.extract_patches(new_slide)  # doctest: +SKIP
    >>> sthist.tl.predict_expression(new_slide, model)  # doctest: +SKIP
    """
    check_adata(adata, fn="sthist.tl.predict_expression")
    model_arg = model
    model = resolve_model(adata, model)
    if weighting is not None:
        check_choice("weighting", weighting, ["average", "distance", "softmax"])
    if k is not None:
        k = check_positive_int("k", k)
    check_choice("index", index, ["exact", "faiss-ivf"])
    n_probe = check_positive_int("n_probe", n_probe)
    batch_size = check_positive_int("batch_size", batch_size)
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
    if not new_slide and len(adata.var_names.intersection(model_genes)) == 0:
        raise ValueError(
            "none of the model's genes are in adata.var_names; predict on `adata[:, []]` (no genes) to get the "
            "model's genes, or check the gene naming (symbols vs Ensembl ids)."
        )
    inputs = model_inputs(adata, model, patches_key=patches_key, features_key=features_key)
    used_key = inputs.pop("features_key")
    coords, groups = spatial_inputs(
        adata,
        spatial_key=spatial_key,
        library_key=library_key,
        needs_space=model.needs_neighbors,
        method=model.method,
    )

    settings = model.prediction_settings(k=k, weighting=weighting, index=index, n_probe=n_probe)
    if settings.get("note"):
        info(f"    {settings['note']}")
    start = info(f"predicting {len(model_genes)} genes for {adata.n_obs} spots with {model.method!r}")
    cal = model.calibration
    if cal is not None:
        level = cal.level if level is None else float(level)
        cal.quantile(level)  # an uncalibrated level raises before any work
    elif level is not None:
        raise ValueError(
            f"level={level!r} asks for prediction intervals, but this {model.method!r} model is not calibrated: run "
            "`sthist.tl.calibrate(reference, model)` on its training data first (or fit it with "
            "`sthist.tl.fit_recommended`, which calibrates)."
        )

    options = {
        "k": settings.get("k", k),
        "weighting": settings.get("weighting", weighting),
        "chunk_size": chunk_size,
        "index": index,
        "n_probe": n_probe,
        "batch_size": batch_size,
        "device": device,
    }
    with resolve_client(client, 1, fn="sthist.tl.predict_expression") as run_on:
        out = _predict(model, inputs, coords, groups, options, level, client=run_on, progress=progress)
    layers = {key_added: out["expression"]}
    shift = None
    if cal is not None:
        layers[C.Key.interval(key_added, "lower")] = out["lower"]
        layers[C.Key.interval(key_added, "upper")] = out["upper"]
        shift = (out["shift"], out["ood"])
    cols = None if genes is None else [model_genes.index(g) for g in genes]
    if cols is not None:
        layers = {name: values[:, cols] for name, values in layers.items()}
        model_genes = genes

    params = {
        **model.describe(),
        "prediction": model.prediction,
        **{key: val for key, val in settings.items() if key != "note"},
        "n_model_genes": len(model_genes),
        "patches_key": patches_key if used_key is None else None,
        "features_key": used_key,
        "model_dir": str(Path(model_arg).resolve()) if isinstance(model_arg, str | Path) else None,
        # the expression the model was fitted on: the truth `score_prediction` compares with by default
        "targets": model.inputs.targets,
    }
    target, written, var_idx = _write_predictions(adata, layers, model_genes, key_added=key_added, copy=copy)
    if out["spread"] is not None and np.isfinite(out["spread"]).any():
        target.obs[C.Key.spread(key_added)] = out["spread"]
    entry: dict[str, Any] = {"params": params}
    if cal is not None:
        entry["calibration"] = _write_calibration(target, cal, shift, level, key_added, model_genes, cols, var_idx)
        written += "\n    interval bounds, per-gene reliability (var) and the shift score and flag (obs)"
    record(target, key_added, entry)
    info("    finished", time=start, deep=f"added\n    {written}")
    return target if copy else None


def predict_block(
    model: Any,
    source: tuple[str, Any],
    rows: np.ndarray | None,
    coords: np.ndarray | None,
    groups: np.ndarray | None,
    options: dict[str, Any],
    level: float | None,
    progress: bool = False,
) -> dict[str, np.ndarray | None]:
    """Predict the spots ``rows`` (all when ``None``) of one source: the unit of work, here or on a Dask worker.

    ``source`` is ``("features", array)`` or ``("images", array)`` (numpy, or a lazy array read block by block).
    Returns the expression, the spread and, for a calibrated model, the interval bounds, the shift score and the
    flag, all for ``rows``.
    """
    kind, data = source
    if rows is not None:
        data = data[rows]
        coords = None if coords is None else coords[rows]
        groups = None if groups is None else groups[rows]
    if hasattr(data, "compute") and not isinstance(data, np.ndarray):
        data = np.asarray(data.compute()) if rows is not None else data
    inputs = {kind: data}
    cal = model.calibration
    result = model.predict(
        **inputs,
        coords=coords,
        groups=groups,
        progress=progress,
        gene_spread=cal is not None and cal.uses_spread,
        **options,
    )
    expression = np.asarray(result.expression, dtype=np.float32)
    spread = None if result.spread is None else np.asarray(result.spread, dtype=np.float32)
    out: dict[str, Any] = {"expression": expression, "spread": spread}
    if cal is not None:
        emb = model.embed_spots(
            **inputs,
            coords=coords,
            groups=groups,
            batch_size=options.get("batch_size", 256),
            device=options.get("device"),
        )
        out["lower"], out["upper"] = cal.intervals(expression, emb, result.gene_spread, level)
        out["shift"], out["ood"] = cal.shift(emb)
    return out


def _blocks(n: int, groups: np.ndarray | None, by_group: bool, size: int) -> list[np.ndarray]:
    """Rows of every task: whole sections when the model reads spatial neighbours, else blocks of ``size`` rows."""
    if by_group and groups is not None:
        return [np.flatnonzero(groups == g) for g in dict.fromkeys(groups)]
    if by_group:
        return [np.arange(n)]
    return [np.arange(s, min(s + size, n)) for s in range(0, n, size)]


def _predict(
    model: Any,
    inputs: dict[str, Any],
    coords: np.ndarray | None,
    groups: np.ndarray | None,
    options: dict[str, Any],
    level: float | None,
    *,
    client: Any,
    progress: bool,
) -> dict[str, Any]:
    """Predict every spot: in this process, or as tasks on ``client`` (sections or row blocks), then assembled."""
    ((kind, data),) = inputs.items()
    if client is None:
        return predict_block(model, (kind, data), None, coords, groups, options, level, progress=progress)
    from .._dask import LazyTake, is_lazy, run_tasks

    n = int(data.shape[0])
    blocks = _blocks(n, groups, model.needs_neighbors, int(options.get("chunk_size", 4096)))
    lazy = is_lazy(data)  # e.g. patches in a store: every worker reads its own rows
    if not lazy:
        data = np.asarray(data)
    tasks = [
        (
            (kind, LazyTake(data, rows) if lazy else data[rows]),
            None if coords is None else coords[rows],
            None if groups is None else groups[rows],
        )
        for rows in blocks
    ]
    results = run_tasks(
        client,
        _block_task,
        tasks,
        weights=[len(r) for r in blocks],
        progress=progress,
        desc="predicting",
        unit="spot",
        shared={"model": model, "options": options, "level": level},
    )
    out: dict[str, Any] = {}
    for name in results[0]:
        first = results[0][name]
        if first is None:
            out[name] = None
            continue
        full = np.empty((n, *np.shape(first)[1:]), dtype=np.asarray(first).dtype)
        for rows, res in zip(blocks, results, strict=True):
            full[rows] = res[name]
        out[name] = full
    return out


def _block_task(source, coords, groups, *, model, options, level):
    """One task of :func:`_predict` on a worker (module level, so that it pickles); lazy rows are read here."""
    kind, data = source
    if hasattr(data, "read"):
        data = data.read()
    return predict_block(model, (kind, data), None, coords, groups, options, level)


def _write_predictions(
    adata: AnnData, layers: dict[str, np.ndarray], genes: list[str], *, key_added: str, copy: bool
) -> tuple[AnnData, str, np.ndarray]:
    """Write the predictions (and interval bounds) ``layers`` (spots x ``genes``) into ``adata`` or a new AnnData.

    Returns the AnnData written to, what was written (for the log) and, per model gene, its column in that AnnData.
    """
    import pandas as pd

    pred = layers[key_added]
    if adata.n_vars == 0 and copy:  # a new slide: a new AnnData whose genes are the model's
        import anndata as ad

        target = ad.AnnData(
            X=pred.copy(),
            obs=adata.obs.copy(),
            var=pd.DataFrame(index=pd.Index(genes, name=None)),
            obsm={key: val.copy() if hasattr(val, "copy") else val for key, val in adata.obsm.items()},
            uns=dict(adata.uns),
        )
        for name, values in layers.items():
            target.layers[name] = values
        target.var[C.Key.modelled(key_added)] = True
        return target, f"{key_added!r}, predictions (X and adata.layers)", np.arange(len(genes))
    if adata.n_vars == 0:  # in place: genes cannot be added to an AnnData, so spots x genes DataFrames in obsm
        for name, values in layers.items():
            adata.obsm[name] = pd.DataFrame(values, index=adata.obs_names.copy(), columns=list(genes))
        return adata, f"{key_added!r}, predictions as a spots x genes DataFrame (adata.obsm)", np.arange(len(genes))
    target = adata.copy() if copy else adata
    col = adata.var_names.get_indexer(genes)
    found = col >= 0
    if (~found).any():
        info(f"    {int((~found).sum())} of the model's genes are not in adata.var_names and were not written")
    for name, values in layers.items():
        full = np.full((adata.n_obs, adata.n_vars), np.nan, dtype=np.float32)
        full[:, col[found]] = values[:, found]
        target.layers[name] = full
    modelled = np.zeros(adata.n_vars, dtype=bool)
    modelled[col[found]] = True
    target.var[C.Key.modelled(key_added)] = modelled
    return target, f"{key_added!r}, predictions (adata.layers)\n    {C.Key.modelled(key_added)!r} (adata.var)", col


def _gene_column(values: np.ndarray, col: np.ndarray, n_vars: int, fill: Any) -> np.ndarray:
    """Per-model-gene ``values`` placed at their columns ``col`` of an AnnData with ``n_vars`` genes (``fill`` else)."""
    out = np.full(n_vars, fill, dtype=bool if isinstance(fill, bool) else np.float64)
    found = col >= 0
    out[col[found]] = np.asarray(values)[found]
    return out


def _write_calibration(
    target: AnnData,
    cal: Any,
    shift: tuple[np.ndarray, np.ndarray],
    level: float,
    key: str,
    genes: list[str],
    cols: list[int] | None,
    var_idx: np.ndarray,
) -> dict[str, Any]:
    """Per-gene reliability in ``var``, the shift score and flag in ``obs``, the slide summary (returned), a warning."""
    import pandas as pd

    from .._engine.calibration import ShiftWarning
    from .._logging import warn

    pick = (lambda v: np.asarray(v)) if cols is None else (lambda v: np.asarray(v)[cols])
    per_gene = {
        C.Key.cv_r(key): pick(cal.cv_r),
        C.Key.cv_r(key, "low"): pick(cal.cv_r_low),
        C.Key.cv_r(key, "high"): pick(cal.cv_r_high),
        C.Key.reliable(key): pick(cal.reliable).astype(bool),
        C.Key.train_range(key): pick(cal.train_high - cal.train_low),
    }
    quantiles = pick(cal.quantiles.T) / pick(cal.quantile(level))[:, None]  # half-width at each level / at `level`
    level_names = [f"{v:g}" for v in cal.levels]
    found = var_idx >= 0
    in_obsm = target.n_vars == 0  # a new slide predicted in place: its genes are not the AnnData's
    if in_obsm:
        per_gene_table = pd.DataFrame(per_gene, index=pd.Index(list(genes)))
    else:
        for column, values in per_gene.items():
            fill = False if values.dtype == bool else np.nan
            target.var[column] = _gene_column(values, var_idx, target.n_vars, fill)
        frame = pd.DataFrame(np.nan, index=target.var_names.copy(), columns=level_names)
        frame.iloc[var_idx[found], :] = quantiles[found]
        target.varm[C.Key.interval_scale(key)] = frame
    score, ood = shift
    target.obs[C.Key.shift(key)] = score
    target.obs[C.Key.ood(key)] = np.asarray(ood, dtype=bool)
    fraction = float(np.mean(ood))
    unlike = fraction >= SLIDE_OOD_FRACTION
    summary = {
        "level": float(level),
        "levels": [float(v) for v in cal.levels],
        "n_reliable": int(np.asarray(pick(cal.reliable))[found].sum()),
        "min_r": cal.min_r,
        "fraction_ood": fraction,
        "expected_fraction_ood": cal.ood_alpha,
        "median_shift": float(np.median(score)),
        "unlike_calibration": bool(unlike),
        "provenance": cal.provenance,
    }
    if in_obsm:  # the per-gene columns of var and varm, for the model's genes
        summary["per_gene"] = per_gene_table
        summary["interval_scale"] = pd.DataFrame(quantiles, index=pd.Index(list(genes)), columns=level_names)
    if unlike:
        warn(
            f"{100 * fraction:.0f} % of the {target.n_obs} spots are unlike the tissue the model was calibrated on "
            f"(obs[{C.Key.ood(key)!r}]; about {100 * cal.ood_alpha:g} % are expected of tissue like it): this slide as "
            "a whole differs (another organ, stain, scanner or patient?), so its intervals and reliable genes may not "
            "hold. Check the flagged regions, and calibrate on tissue like this one if you can.",
            ShiftWarning,
        )
    return summary
