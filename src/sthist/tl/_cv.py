"""`cross_validate`: leave-one-group-out evaluation of any method, with out-of-fold predictions.

The folds are prepared once (:func:`prepare_folds`: expression, image features computed once, group labels) and
run by :func:`run_folds` for one method and seed; :func:`sthist.tl.benchmark` runs the same folds for several
methods and seeds, so there is one protocol. In every fold the gene sets of the metrics (top HEG and HVG, the
genes of the gene-gene correlation) are chosen on the **training** groups, and the held-out spots are scored per
section (the mean over sections, the primary numbers) and pooled over all held-out sections (``*_pooled``).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from .. import _constants as C
from .._anndata import CountsWarning, fit_expression, get_patches, image_features, record, uns_params
from .._constants import DEFAULT_ENCODER
from .._docs import inject_docs
from .._logging import info
from .._validate import check_adata, check_positive_int

if TYPE_CHECKING:
    import pandas as pd
    from anndata import AnnData

#: Metrics of every fold: per section (mean over the held-out sections) and pooled over them.
FOLD_METRICS = ("pcc_all", "pcc_heg", "pcc_hvg", "gene_corr", "mse", "mae")


@dataclass
class Folds:
    """The folds of a leave-one-group-out evaluation, prepared once for any number of methods and seeds."""

    work: AnnData
    groupby: str
    labels: np.ndarray
    folds: list[str]
    gene_names: list[str]
    splits: dict[str, str]
    fit_kwargs: dict[str, Any]
    features_key: str | None
    normalisation: str
    library_key: str
    n_top: int
    targets: dict[str, Any] | None = None
    """The layer and scale of the expression every fold is fitted on and scored against (the user's)."""
    held_out_spots: dict[str, int] = field(default_factory=dict)
    gene_sets: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    """Per fold, the HEG / HVG / gene-gene genes chosen on its training groups (the same for every method and seed)."""


def _split_labels(adata: AnnData, labels: np.ndarray, folds: list[str], groupby: str) -> dict[str, str]:
    """``'across patients'`` or ``'within patient'`` for every held-out group (a patient on both sides)."""
    if groupby == C.PATIENT_KEY or C.PATIENT_KEY not in adata.obs:
        return dict.fromkeys(folds, "across patients" if groupby == C.PATIENT_KEY else "unknown patients")
    patients = adata.obs[C.PATIENT_KEY].astype(str).to_numpy()
    out = {}
    for fold in folds:
        test = labels == fold
        shared = set(patients[test]) & set(patients[~test])
        out[fold] = "within patient" if shared else "across patients"
    if any(v == "within patient" for v in out.values()):
        warnings.warn(
            f"groupby={groupby!r} puts spots of one patient in the training and the held-out groups "
            f"({sorted(f for f, v in out.items() if v == 'within patient')}): these folds are labelled 'within "
            f"patient'. To measure generalisation to new patients, use groupby={C.PATIENT_KEY!r}.",
            UserWarning,
            stacklevel=4,
        )
    return out


def prepare_folds(
    adata: AnnData,
    *,
    groupby: str,
    folds: Any = None,
    layer: str | None,
    genes: Any,
    patches_key: str,
    features_key: str | None,
    encoder: str,
    spatial_key: str,
    library_key: str | None,
    n_top: int,
    fit_kwargs: dict[str, Any] | None,
    progress: bool,
    nonnegative: bool = True,
    keep_patches: bool = False,
    labels: np.ndarray | None = None,
) -> Folds:
    """Check the input and prepare the folds (features of a frozen encoder are computed once, here).

    ``keep_patches`` also hands the patches to the folds (methods that read encoder tokens encode them per fit).
    ``labels`` gives every spot's group directly (e.g. spatial blocks), named ``groupby``, instead of an obs column.
    """
    import anndata as ad
    import pandas as pd

    if labels is not None:
        labels = np.asarray(labels).astype(str)
        if labels.shape != (adata.n_obs,):
            raise ValueError(f"labels must give one group per spot ({adata.n_obs}), got shape {labels.shape}.")
    elif not isinstance(groupby, str) or groupby not in adata.obs:
        raise KeyError(f"groupby={groupby!r} is not a column of adata.obs (columns: {list(adata.obs)}).")
    else:
        labels = adata.obs[groupby].astype(str).to_numpy()

    groups = list(dict.fromkeys(labels))
    if len(groups) < 2:
        raise ValueError(
            f"adata.obs[{groupby!r}] has {len(groups)} group(s) ({groups}); leave-one-out needs at least two."
        )
    if folds is None:
        folds = groups
    else:
        folds = [folds] if isinstance(folds, str) else [str(f) for f in folds]
        unknown = [f for f in folds if f not in groups]
        if unknown or not folds:
            raise ValueError(f"folds={folds!r} must name groups of adata.obs[{groupby!r}]: {groups}.")
    counts = {f: int((labels == f).sum()) for f in folds}
    small = {f: c for f, c in counts.items() if c < 2}
    if small:
        raise ValueError(f"held-out group(s) {small} have fewer than the 2 spots a score needs; drop them first.")
    if library_key is None and groupby not in adata.obs:  # groups given as labels, one section
        library = np.zeros(adata.n_obs, dtype=np.int64).astype(str)
    else:
        library_key = groupby if library_key is None else library_key
        if library_key not in adata.obs:
            raise KeyError(f"library_key={library_key!r} is not a column of adata.obs (columns: {list(adata.obs)}).")
        library = adata.obs[library_key].astype(str).to_numpy()
    n_top = check_positive_int("n_top", n_top)
    expr, gene_names, targets = fit_expression(
        adata, layer=layer, genes=genes, fn="sthist.tl.cross_validate / benchmark", nonnegative=nonnegative
    )
    fit_kwargs = dict(fit_kwargs or {})
    finetune = bool(fit_kwargs.get("finetune", False))
    auto: dict[str, Any] = {}  # what every fold's fit gets besides the caller's fit_kwargs

    # one lightweight AnnData holding just what the folds need; features computed once
    obsm: dict[str, Any] = {}
    uns: dict[str, Any] = {}
    if spatial_key in adata.obsm:
        obsm[C.SPATIAL_KEY] = np.asarray(adata.obsm[spatial_key])
    used_features = None
    if finetune or keep_patches:
        obsm[C.PATCHES_KEY] = get_patches(adata, patches_key=patches_key)
        if isinstance(adata.uns.get(patches_key), dict):
            uns[C.PATCHES_KEY] = adata.uns[patches_key]
    if not finetune:
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
        used_features = feats.key
        auto["features_key"] = feats.key
        auto["encoder"] = feats.params.get("encoder") or encoder
    work = ad.AnnData(
        X=expr,
        obs=pd.DataFrame({groupby: labels, "_library": library}, index=adata.obs_names.copy()),
        var=pd.DataFrame(index=pd.Index(gene_names)),
        obsm=obsm,
        uns=uns,
    )
    norm = uns_params(adata, layer) if layer is not None else {}
    normalisation = str(norm.get("flavor", "")) or ("X" if layer is None else f"layers[{layer!r}]")
    gene_sets = {fold: _train_gene_sets(work[labels != fold], n_top) for fold in folds}
    return Folds(
        work=work,
        groupby=groupby,
        labels=labels,
        folds=folds,
        gene_names=gene_names,
        splits=_split_labels(adata, labels, folds, groupby),
        fit_kwargs=auto,
        features_key=used_features,
        normalisation=normalisation,
        library_key=library_key or "",
        n_top=n_top,
        targets=targets,
        held_out_spots=counts,
        gene_sets=gene_sets,
    )


def _train_gene_sets(train: AnnData, n_top: int) -> dict[str, list[str]]:
    """Top ``n_top`` genes by mean (HEG, also the gene-gene correlation genes) and by variance (HVG) on ``train``."""
    x = np.asarray(train.X, dtype=np.float64)
    names = np.asarray(train.var_names)
    heg = names[np.argsort(-x.mean(0), kind="stable")[:n_top]].tolist()
    hvg = names[np.argsort(-x.var(0), kind="stable")[:n_top]].tolist()
    return {"heg": heg, "hvg": hvg, "gene_corr": heg}


def _model_config(model: Any, settings: dict[str, Any]) -> dict[str, Any]:
    """What a fold's model ran with: recipe, retrieval settings, encoder and patch geometry."""
    inputs = model.inputs
    cfg: dict[str, Any] = {
        "encoder": inputs.encoder,
        "frozen": not inputs.finetuned,
        "patch_size": inputs.patch_size,
        "mpp": inputs.mpp,
        "k": settings.get("k"),
        "weighting": settings.get("weighting"),
    }
    plan = getattr(model, "config", {}).get("plan") if hasattr(model, "config") else None
    if plan:
        stages = plan["stages"]
        cfg.update(
            optimizer=plan["optimizer"]["name"],
            lr=plan["optimizer"]["lr"],
            schedule=plan["schedule"]["name"],
            batch_size=plan["batch_size"],
            epochs=sum(s["epochs"] for s in stages),
            stages=len(stages),
            select_on=plan["select_on"],
        )
    return cfg


class FoldResults(NamedTuple):
    """What :func:`run_folds` returns."""

    table: pd.DataFrame
    """One row per fold: metrics and the configuration of the fold's model."""
    oof: np.ndarray
    """Out-of-fold predictions (n_obs, n_genes); NaN outside the folds."""
    per_gene: dict[str, pd.Series]
    """Per fold, the per-gene Pearson r averaged over the held-out sections."""
    gene_spread: np.ndarray | None = None
    """With ``gene_spread=True`` and a retrieval method: the per-gene spread of the profiles retrieved out of fold."""


def run_folds(
    prep: Folds,
    method: str,
    *,
    random_state: int = 0,
    k: int | None = None,
    weighting: str | None = None,
    fit_kwargs: dict[str, Any] | None = None,
    strict: bool = True,
    progress: bool = False,
    gene_spread: bool = False,
) -> FoldResults:
    """Fit ``method`` on every fold's training groups and score the held-out group.

    ``fit_kwargs`` go to the method's fit function; one it does not take raises (``strict``) or is dropped (the
    benchmark gives one set of options to methods and baselines alike). ``gene_spread`` also collects the per-gene
    spread of the profiles that retrieval models retrieve for the held-out spots (what a calibration needs).
    """
    import pandas as pd

    from ._predict import predict_expression
    from ._registry import fit_predictor, get_predictor
    from ._score import score_prediction

    predictor = get_predictor(method)
    auto = {**prep.fit_kwargs, "library_key": "_library", "progress": progress, "random_state": random_state}
    kwargs = dict(fit_kwargs or {})
    if not strict:
        kwargs = {key: val for key, val in kwargs.items() if predictor.accepts(key)}
    for key, value in auto.items():
        if predictor.accepts(key):
            kwargs.setdefault(key, value)
    work, labels = prep.work, prep.labels
    oof = np.full(work.shape, np.nan, dtype=np.float32)
    oof_spread = np.full(work.shape, np.nan, dtype=np.float32) if gene_spread else None
    rows, per_gene = [], {}
    for fold in prep.folds:
        t0 = time.perf_counter()
        test = labels == fold
        train_ad, test_ad = work[~test].copy(), work[test].copy()
        with warnings.catch_warnings():  # prepare_folds warned once about raw counts; not again for every fold
            warnings.simplefilter("ignore", CountsWarning)
            model = fit_predictor(train_ad, method, **kwargs)
        predict_expression(
            test_ad,
            model,
            k=k,
            weighting=weighting,
            features_key=prep.features_key,
            library_key="_library",
            key_added="oof",
            progress=False,
        )
        settings = test_ad.uns["oof"]["params"]  # what predict_expression used (k after capping, weighting)
        oof[test] = test_ad.layers["oof"]
        if oof_spread is not None and model.prediction == "retrieval":
            oof_spread[test] = _fold_gene_spread(model, test_ad, prep, settings)

        with _quiet():  # genes constant in a held-out section are expected here; the table says how many
            score_prediction(
                test_ad,
                layer="oof",
                true_layer=None,  # what the fold's model was fitted on: the fold's expression (its X)
                groupby="_library",
                gene_sets=prep.gene_sets[fold],
                n_top=prep.n_top,
                key_added="s",
            )
        scores = test_ad.uns["s"]
        sections = pd.DataFrame.from_dict(dict(scores["per_group"]), orient="index")
        row: dict[str, Any] = {"fold": fold, "method": method, "seed": int(random_state), "split": prep.splits[fold]}
        for metric in FOLD_METRICS:
            row[metric] = float(sections[metric].mean()) if metric in sections else float("nan")
        for metric in FOLD_METRICS:
            row[f"{metric}_pooled"] = float(scores["summary"][metric])
        row.update(
            n_obs=int(test.sum()),
            n_sections=len(sections),
            seconds=round(time.perf_counter() - t0, 3),
            **_model_config(model, settings),
        )
        rows.append(row)
        r = test_ad.varm["s_pearson"]
        with warnings.catch_warnings():  # a gene constant in every held-out section has no r: NaN, not a warning
            warnings.simplefilter("ignore", RuntimeWarning)
            per_gene[fold] = pd.Series(np.nanmean(r.to_numpy(), axis=1) if r.shape[1] else np.nan, index=r.index)

        info(f"    {method!r} seed {random_state}, held out {fold!r}: {int(test.sum())} spots in {row['seconds']} s")
    has_spread = oof_spread is not None and np.isfinite(oof_spread).any()
    return FoldResults(pd.DataFrame(rows), oof, per_gene, oof_spread if has_spread else None)


@contextlib.contextmanager
def _quiet():
    """Scanpy's log at errors only, for the duration (the folds' scoring logs per-fold warnings)."""
    from scanpy import settings

    before = settings.verbosity
    settings.verbosity = 0
    try:
        yield
    finally:
        settings.verbosity = before


def _fold_gene_spread(model: Any, test_ad: AnnData, prep: Folds, settings: dict[str, Any]) -> np.ndarray:
    """The per-gene spread of the profiles ``model`` retrieves for the held-out spots (the settings it predicted with)."""
    from .._anndata import spot_coords

    if prep.features_key is not None and not (model.inputs.finetuned or model.inputs.tokens):
        source = {"features": np.asarray(test_ad.obsm[prep.features_key])}
    else:  # fine-tuned models and those that read token grids take the patches
        source = {"images": test_ad.obsm[C.PATCHES_KEY]}

    result = model.predict(
        **source,
        coords=spot_coords(test_ad),
        groups=test_ad.obs["_library"].astype(str).to_numpy(),
        k=settings.get("k"),
        weighting=settings.get("weighting"),
        gene_spread=True,
    )
    return np.asarray(result.gene_spread, dtype=np.float32)


@inject_docs
def cross_validate(
    adata: AnnData,
    *,
    groupby: str = C.SECTION_KEY,
    method: str = "bleep",
    folds: Any = None,
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

    Use ``groupby="patient"`` to hold out patients (the honest choice when claiming generalisation to new
    patients) or ``groupby="section"`` to hold out sections; a split that puts spots of one patient on both sides
    is labelled ``'within patient'`` in the ``split`` column, with a warning. Image features of a frozen encoder are
    computed once and shared by all folds. In every fold the genes of the HEG, HVG and gene-gene correlation
    metrics are chosen on the training groups (never on the held-out truth); the held-out group is scored per
    section (the mean over its sections) and pooled over its sections (``*_pooled``): papers differ on this, and
    it moves numbers. For several methods and seeds with paired statistics, use :func:`sthist.tl.benchmark`.

    Parameters
    ----------
    {adata}
    groupby
        Column of ``adata.obs`` whose values define the folds (at least two groups).
    method
        A registered method or baseline (:func:`sthist.tl.methods`): a contrastive method of
        :func:`sthist.tl.fit_contrastive` (``'bleep'``, ...), ``'ridge'`` (:func:`sthist.tl.fit_ridge`) or
        ``'knn'`` (:func:`sthist.tl.fit_knn`).
    folds
        The groups to hold out, one fold each (e.g. ``['B']`` with ``groupby='patient'``: train on the other
        patients, test on B); ``None``: every group.
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
        Column of ``adata.obs`` with each spot's section: neighbour-based methods never join spots of different
        sections, and held-out groups are scored per section. ``None`` uses ``groupby`` (right when holding out
        sections; pass ``"section"`` when ``groupby="patient"``).
    n_top
        Size of the highly expressed / highly variable gene sets, chosen on the training groups of each fold.
    {random_state}
    {progress}
    key_added
        Name of the out-of-fold prediction layer and of the ``uns`` entry.
    fit_kwargs
        More keyword arguments for the method's fit function (:func:`sthist.tl.fit_contrastive`,
        :func:`sthist.tl.fit_ridge`, ...), e.g. ``dict(max_epochs=50)``; one it does not take raises, unless unset.
    inplace
        Write the out-of-fold predictions and the scores into ``adata`` (below); ``False`` leaves ``adata``
        unchanged and only returns the table.

    Returns
    -------
    A tidy :class:`~pandas.DataFrame` with one row per held-out group (``fold``): ``method``, ``seed``, ``split``
    (``'within patient'`` or ``'across patients'``), the metrics of :func:`sthist.tl.score_prediction` per section
    (``pcc_all``, ``pcc_heg``, ``pcc_hvg``, ``gene_corr``, ``mse``, ``mae``: means over the held-out sections) and
    pooled (the same names with ``_pooled``), ``n_obs``, ``n_sections``, ``seconds`` and the configuration of the
    fold's model (encoder, frozen, patch size, µm/px, retrieval ``k`` and ``weighting``, and for contrastive
    methods the optimiser, lr, schedule, batch size, epochs, stages and model selection). With ``inplace=True``
    (the default) also writes

    ``adata.layers['cv_predicted' | key_added]``
        out-of-fold predictions (each spot predicted by the model that did not see its group; NaN outside
        ``folds``).
    ``adata.var['cv_predicted_modelled']``
        genes that were modelled.
    ``adata.uns['cv_predicted']``
        ``params`` and ``scores`` (the returned table as a dict of columns).
    """
    from ._registry import get_predictor

    check_adata(adata, fn="sthist.tl.cross_validate")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be True or False, got {inplace!r}.")
    predictor = get_predictor(method)
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
        nonnegative=predictor.kind == "contrastive",
        keep_patches=_reads_tokens([method]),
    )
    start = info(f"cross-validating {method!r} over {len(prep.folds)} held-out groups of {groupby!r}")
    table, oof, *_ = run_folds(
        prep, method, random_state=random_state, k=k, weighting=weighting, fit_kwargs=fit_kwargs, progress=progress
    )
    if not inplace:
        info("    finished", time=start)
        return table

    full = np.full((adata.n_obs, adata.n_vars), np.nan, dtype=np.float32)
    cols = adata.var_names.get_indexer(prep.gene_names)
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
                "folds": prep.folds,
                "library_key": prep.library_key,
                "method": method,
                "layer": layer,
                "encoder": encoder,
                "k": k,
                "weighting": weighting,
                "random_state": random_state,
                "n_top": prep.n_top,
                "gene_sets": "top n_top HEG / HVG chosen on the training groups of each fold",
                "targets": prep.targets,
            },
            "scores": {c: table[c].to_numpy() for c in table.columns if table[c].dtype.kind in "fiub"}
            | {c: table[c].astype(str).tolist() for c in table.columns if table[c].dtype.kind not in "fiub"},
        },
    )
    info("    finished", time=start)
    return table


def _reads_tokens(names) -> bool:
    """Whether any of the registered contrastive methods ``names`` reads encoder tokens (and so needs the patches)."""
    from .._engine.methods import METHODS

    return any(n in METHODS and "tokens" in METHODS[n].consumes for n in names)
