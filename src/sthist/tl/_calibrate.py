"""`calibrate`: prediction intervals, per-gene reliability and a shift detector for any fitted model."""

from __future__ import annotations

import datetime
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import _constants as C
from .._anndata import check_scale, layer_matrix, spot_coords
from .._docs import inject_docs
from .._logging import info
from .._validate import check_adata, check_positive_int
from ._utils import resolve_model

if TYPE_CHECKING:
    from anndata import AnnData

    from .._engine.base import BaseModel

#: Name of the groups when a single section is cut into spatial blocks.
BLOCKS = "spatial block"


def _check_fraction(name: str, value: Any, *, low: float = 0.0, high: float = 1.0) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"{name} must be a number, got {value!r}.")
    value = float(value)
    if not low < value < high:
        raise ValueError(f"{name} must lie strictly between {low} and {high}, got {value}.")
    return value


def spatial_blocks(coords: np.ndarray, n_blocks: int, random_state: int = 0) -> np.ndarray:
    """Contiguous blocks of one section: k-means clusters of the spot coordinates, labelled ``'block0'``, ...."""
    from sklearn.cluster import KMeans

    labels = KMeans(n_clusters=int(n_blocks), n_init=10, random_state=random_state).fit_predict(coords)
    return np.array([f"block{v}" for v in labels])


def _groups(
    adata: AnnData, *, groupby: str | None, library_key: str | None, spatial_key: str, n_blocks: int, seed: int, fn: str
) -> tuple[str, np.ndarray | None, str]:
    """The group column (or block labels) to leave out, and how they were made."""
    from .._anndata import LIBRARY_COLUMNS

    if groupby is not None:
        if not isinstance(groupby, str) or groupby not in adata.obs:
            raise KeyError(f"{fn}: groupby={groupby!r} is not a column of adata.obs (columns: {list(adata.obs)}).")
        n = adata.obs[groupby].nunique()
        if n < 2:
            raise ValueError(
                f"{fn}: adata.obs[{groupby!r}] has {n} group; leaving one group out needs at least two. Pass another "
                "groupby (e.g. 'section'), or groupby=None on a single section to calibrate on spatial blocks of it."
            )
        return groupby, None, f"adata.obs[{groupby!r}]"
    candidates = [library_key] if library_key is not None else [c for c in LIBRARY_COLUMNS if c in adata.obs]
    for column in candidates:
        if column in adata.obs and adata.obs[column].nunique() >= 2:
            return column, None, f"sections (adata.obs[{column!r}])"
    coords = spot_coords(adata, spatial_key=spatial_key, required_by=f"{fn} on a single section (spatial blocks)")
    if adata.n_obs < 2 * n_blocks:
        raise ValueError(
            f"{fn}: a single section of {adata.n_obs} spots is too small for {n_blocks} spatial blocks; pass fewer "
            "n_blocks or calibrate on several sections."
        )
    labels = spatial_blocks(coords, n_blocks, seed)
    return BLOCKS, labels, f"{n_blocks} spatial blocks of one section (k-means clusters of the spot coordinates)"


def leave_group_out_folds(
    adata: AnnData,
    *,
    groupby: str | None,
    library_key: str | None,
    spatial_key: str,
    n_blocks: int,
    random_state: int,
    layer: str | None,
    genes: Any,
    patches_key: str,
    features_key: str | None,
    encoder: str,
    fit_kwargs: dict[str, Any],
    nonnegative: bool,
    keep_patches: bool,
    progress: bool,
    fn: str,
) -> tuple[Any, str]:
    """The folds of a calibration: every group of ``groupby`` (or section, or spatial block) left out once."""
    from ._cv import prepare_folds

    groupby, labels, how = _groups(
        adata,
        groupby=groupby,
        library_key=library_key,
        spatial_key=spatial_key,
        n_blocks=n_blocks,
        seed=random_state,
        fn=fn,
    )
    if library_key is None and groupby != BLOCKS:
        library_key = C.SECTION_KEY if C.SECTION_KEY in adata.obs else groupby
    with warnings.catch_warnings():  # within-patient groups are the point here, not a mislabelled benchmark
        warnings.filterwarnings("ignore", message=".*labelled 'within\\s+patient'")
        prep = prepare_folds(
            adata,
            groupby=groupby,
            labels=labels,
            layer=layer,
            genes=genes,
            patches_key=patches_key,
            features_key=features_key,
            encoder=encoder,
            spatial_key=spatial_key,
            library_key=library_key,
            n_top=50,
            fit_kwargs=fit_kwargs,
            progress=progress,
            nonnegative=nonnegative,
            keep_patches=keep_patches,
        )
    return prep, how


@inject_docs
def calibrate(
    adata: AnnData,
    model: Any = None,
    *,
    groupby: str | None = None,
    level: float = 0.9,
    min_r: float = 0.2,
    layer: str | None = None,
    n_blocks: int = 5,
    library_key: str | None = None,
    patches_key: str = C.PATCHES_KEY,
    features_key: str | None = None,
    spatial_key: str = C.SPATIAL_KEY,
    ood_alpha: float = 0.01,
    random_state: int = 0,
    progress: bool = True,
) -> BaseModel:
    """Calibrate a fitted model on its training data: prediction intervals, reliable genes and a shift detector.

    The model's own configuration (:meth:`~sthist.tl.BaseModel.refit_options`) is refitted once per group of
    ``groupby`` without that group, through the folds of :func:`~sthist.tl.cross_validate`, and predicts it. From these
    out-of-group predictions the calibration learns, and attaches to the model (``model.calibration``, saved and
    loaded with it):

    - **intervals** (split conformal, normalised): for every gene the quantile of ``|truth - prediction| / d`` at
      ``level``, where the per-spot, per-gene difficulty ``d`` is the geometric mean of the spread of the profiles
      the model retrieved for the spot (retrieval models) and the mean absolute out-of-group residual of the gene over
      the 30 calibration spots nearest to it in the model's space (regression models use the latter alone). The
      interval of a new spot is ``prediction ± quantile * d`` (clipped at 0 for non-negative targets);
    - **per-gene reliability**: the cross-validated Pearson r of every gene with a 90 % interval; a gene is
      *reliable* when the interval lies above ``min_r``;
    - **a shift detector**: how far a spot lies from the calibration spots in the model's space, as a conformal
      p-value against the distance of every calibration spot to the *other* groups;
    - **provenance**: the groups, their spots, how they were made, the level, the model's configuration.

    What the intervals promise: under exchangeability of new spots with the calibration spots (e.g. another section
    of a patient, stain and sequencing depth seen in training), each gene's interval covers its measured value with
    probability at least ``level``, on average over spots. They do not promise it for a new patient, another stain,
    scanner or sequencing depth; the shift detector and the slide-level warning of
    :func:`~sthist.tl.predict_expression` are there for that (``docs/uncertainty.md``).

    Parameters
    ----------
    {adata}
        The training data the model was fitted on (patches or the model's features, the expression, and spot
        coordinates for spatial methods or spatial blocks).
    model
        A fitted model, a saved model folder, or ``None`` for the one a fit recorded in ``adata``.
    groupby
        Column of ``adata.obs`` whose groups are left out one at a time (``'section'`` or ``'patient'``). ``None``:
        the sections (``library_key``, else the ``'section'`` column) when there are at least two, else
        ``n_blocks`` spatial blocks of the one section (k-means clusters of the coordinates: contiguous pieces of
        tissue, so that a block is predicted by a model that did not see its spots or their close neighbours).
    level
        Coverage of the intervals predicted by default (quantiles are also stored at 0.5, 0.6, 0.7, 0.8, 0.9, 0.95
        and 0.99, so ``predict_expression(level=...)`` can choose another).
    min_r
        Genes whose cross-validated r is reliably above this (the lower end of its 90 % interval) are *reliable*.
    layer
        The expression the model was fitted on; ``None``: the layer the model records (``model.inputs.targets``).
        It must be on the model's scale.
    n_blocks
        Spatial blocks of a single section.
    {library_key}
        Spatial methods take neighbours within a section.
    patches_key, features_key, spatial_key
        Where the patches, the model's features and the coordinates are (as in :func:`~sthist.tl.cross_validate`).
    ood_alpha
        A spot is flagged as unlike the calibration tissue when its shift p-value is at most this (so about this
        fraction of spots like the calibration's is flagged).
    {random_state}
        Of the refits (and of the spatial blocks).
    {progress}

    Returns
    -------
    The model, with ``model.calibration`` (:class:`~sthist.tl.Calibration`) attached; ``model.save(dir)`` keeps it.
    ``adata`` is not modified. The cost is one refit per group: a second for ``dual_knn``, ``knn`` or the ridge
    probes, one training per group for a contrastive method.

    Examples
    --------
    >>> model = sthist.tl.fit_dual_knn(ref, layer="targets", library_key="section")  # doctest: +SKIP
    >>> sthist.tl.calibrate(ref, model, groupby="section")  # doctest: +SKIP
    >>> sthist.tl.predict_expression(new, model)  # doctest: +SKIP
    >>> new.layers["predicted_lower"], new.var["predicted_reliable"], new.obs["predicted_ood"]  # doctest: +SKIP
    """
    from .._engine.methods import METHODS
    from ._cv import _reads_tokens, run_folds

    fn = "sthist.tl.calibrate"
    check_adata(adata, fn=fn)
    model = resolve_model(adata, model)
    level = _check_fraction("level", level)
    min_r = _check_fraction("min_r", min_r, low=-1.0)
    ood_alpha = _check_fraction("ood_alpha", ood_alpha)
    n_blocks = check_positive_int("n_blocks", n_blocks)
    if n_blocks < 2:
        raise ValueError(f"n_blocks must be at least 2 (one block is left out at a time), got {n_blocks}.")
    if isinstance(random_state, bool) or not isinstance(random_state, int | np.integer):
        raise TypeError(f"random_state must be an integer, got {random_state!r}.")
    name, options = model.refit_options()
    missing = [g for g in model.genes if g not in adata.var_names]
    if missing:
        raise KeyError(
            f"{fn}: {len(missing)} of the model's genes are not in adata.var_names (e.g. {missing[:5]}); calibrate on "
            "the data the model was fitted on."
        )
    record = model.inputs.targets
    if layer is None:
        if not record:
            raise ValueError(
                f"{fn}: the model does not record which expression it was fitted on; pass layer= naming it (the "
                "layer of the training targets, e.g. 'targets')."
            )
        layer = None if record["layer"] == "X" else record["layer"]
    mat = layer_matrix(adata, layer, fn=fn, what="the expression the model was fitted on")
    if record:
        check_scale(adata, layer, mat, record, fn=fn, what="the model's predictions")
    inputs = model.inputs
    fit_kwargs = {**options}
    if not inputs.finetuned:
        fit_kwargs.update(pretrained=inputs.pretrained, checkpoint=inputs.checkpoint)
    prep, how = leave_group_out_folds(
        adata,
        groupby=groupby,
        library_key=library_key,
        spatial_key=spatial_key,
        n_blocks=n_blocks,
        random_state=int(random_state),
        layer=layer,
        genes=list(model.genes),
        patches_key=patches_key,
        features_key=features_key,
        encoder=inputs.encoder,
        fit_kwargs=fit_kwargs,
        nonnegative=name in METHODS,
        keep_patches=_reads_tokens([name]),
        progress=progress,
        fn=fn,
    )
    n_groups = len(prep.folds)
    kind = "a training" if name in METHODS else "a fit"
    start = info(f"calibrating {model.method!r}: {kind} per group, {n_groups} groups of {how}")
    runs = run_folds(
        prep, name, random_state=int(random_state), fit_kwargs=fit_kwargs, progress=progress, gene_spread=True
    )
    model.calibration = calibration_from_folds(
        model,
        prep,
        runs,
        refit={"method": name, **options},
        how=how,
        layer=layer,
        level=level,
        min_r=min_r,
        ood_alpha=ood_alpha,
        random_state=int(random_state),
    )
    info(
        f"    finished: {int(model.calibration.reliable.sum())} of {len(model.genes)} genes reliable (cross-validated "
        f"r above {min_r} with 90 % confidence), intervals at {level:g}",
        time=start,
    )
    return model


def calibration_from_folds(
    model: BaseModel,
    prep: Any,
    runs: Any,
    *,
    refit: dict[str, Any],
    how: str,
    layer: str | None,
    level: float,
    min_r: float,
    ood_alpha: float,
    random_state: int,
    provenance: dict[str, Any] | None = None,
) -> Any:
    """The :class:`~sthist.tl.Calibration` of ``model`` from the out-of-group predictions ``runs`` of its folds."""
    from .. import __version__
    from .._engine.calibration import fit_calibration

    work = prep.work
    cols = work.var_names.get_indexer(list(model.genes))  # the folds' gene order is adata's; the model's may differ
    reads_patches = model.inputs.finetuned or model.inputs.tokens or prep.features_key is None
    source: dict[str, Any] = (
        {"images": work.obsm[C.PATCHES_KEY]}
        if reads_patches
        else {"features": np.asarray(work.obsm[prep.features_key])}
    )

    embedding = model.embed_spots(
        **source, coords=spot_coords(work), groups=work.obs["_library"].astype(str).to_numpy(), progress=False
    )
    folds = list(runs.per_gene)
    per_group_r = np.stack([runs.per_gene[f].reindex(model.genes).to_numpy(dtype=float) for f in folds])
    per_group_n = np.array([prep.held_out_spots[f] for f in folds])
    use_spread = model.prediction == "retrieval" and runs.gene_spread is not None
    return fit_calibration(
        genes=list(model.genes),
        expression=np.asarray(work.X, dtype=np.float64)[:, cols],
        prediction=runs.oof[:, cols],
        gene_spread=runs.gene_spread[:, cols] if use_spread else None,
        embedding=embedding,
        groups=prep.labels,
        per_group_r=per_group_r,
        per_group_n=per_group_n,
        level=level,
        min_r=min_r,
        ood_alpha=ood_alpha,
        random_state=random_state,
        provenance={
            "groupby": prep.groupby,
            "groups": folds,
            "spots_per_group": [int(v) for v in per_group_n],
            "how": how,
            "layer": "X" if layer is None else layer,
            "refit": {k: _plain(v) for k, v in refit.items()},
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "sthist": __version__,
            **(provenance or {}),
        },
    )


def _plain(value: Any) -> Any:
    """A JSON-friendly form of a fit option (plans as dicts, tuples as lists)."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, tuple):
        return list(value)
    return value
