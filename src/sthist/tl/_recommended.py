"""`fit_recommended`: the configuration chosen on the user's own data by grouped cross-validation, calibrated."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import _constants as C
from .._anndata import record
from .._constants import DEFAULT_ENCODER
from .._docs import inject_docs
from .._logging import info
from .._validate import check_adata, check_positive_int
from ._calibrate import _check_fraction, calibration_from_folds, leave_group_out_folds
from ._utils import model_record

if TYPE_CHECKING:
    from anndata import AnnData

    from .._engine.base import BaseModel

RECOMMENDED_KEY = "recommended"

#: The candidates of :func:`fit_recommended` (label -> (registered predictor, fit options)), fast on a CPU, from the
#: one that learns least to the one that learns most: the order in which a tie is broken (the one-standard-error rule).
CANDIDATES: dict[str, tuple[str, dict[str, Any]]] = {
    "knn": ("knn", {}),
    "dual_knn[raw]": ("dual_knn", {"spaces": ("raw",)}),
    "ridge_gcv": ("ridge_gcv", {}),
    "dual_knn[learnt]": ("dual_knn", {"spaces": ("learnt",)}),
    "dual_knn": ("dual_knn", {}),
}
#: The metrics the choice averages (mean over held-out groups of each, then their mean).
CRITERION = ("pcc_all", "pcc_heg")


#: Held-out groups from which the one-standard-error rule takes a standard error (fewer: the best mean is chosen).
MIN_GROUPS_FOR_SE = 3
CRITERION_TEXT = (
    "the mean over held-out groups of (pcc_all + pcc_heg) / 2; with at least 3 groups, the first candidate (from the "
    "one that learns least) whose paired shortfall from the best is within one standard error of the per-group "
    "differences, else the best"
)


def choose(per_fold: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """The candidate chosen from each candidate's score per held-out group (the one-standard-error rule).

    ``per_fold`` maps the candidates, in order of preference (least learnt first), to a Series of their score per
    held-out group. The best is the highest mean; a candidate whose mean shortfall from the best, paired by group, is
    at most the standard error of those differences is as good as the best within the noise of the groups, and the
    first such candidate is chosen (Breiman et al.'s rule: the simplest model within one standard error).
    """
    labels = list(per_fold)
    means = {c: float(per_fold[c].mean()) for c in labels}
    best = max(labels, key=lambda c: means[c])
    rows, chosen = [], None
    for c in labels:
        diff = (per_fold[best] - per_fold[c]).to_numpy(dtype=float)
        # two groups give one degree of freedom: no standard error to speak of, and the best mean is taken
        se = float(diff.std(ddof=1) / np.sqrt(diff.size)) if diff.size >= MIN_GROUPS_FOR_SE else None
        within = bool(diff.mean() <= (0.0 if se is None else se))

        if within and chosen is None:
            chosen = c
        rows.append(
            {
                "candidate": c,
                "score": means[c],
                "shortfall": float(diff.mean()),
                "se": se,
                "within_one_se": within,
                "best": c == best,
            }
        )
    return str(chosen), rows


def _candidates(candidates: Any) -> dict[str, tuple[str, dict[str, Any]]]:
    from ._registry import get_predictor

    if candidates is None:
        return dict(CANDIDATES)
    if isinstance(candidates, str) or not isinstance(candidates, Mapping | list | tuple):
        raise TypeError(
            "candidates must be a list of registered names (e.g. ['dual_knn', 'knn']) or a mapping label -> "
            f"(name, fit options), got {candidates!r}."
        )
    items = candidates.items() if isinstance(candidates, Mapping) else ((c, c) for c in candidates)
    out = {}
    for label, spec in items:
        name, options = (spec, {}) if isinstance(spec, str) else tuple(spec)
        pred = get_predictor(name)  # unknown names raise with the registered ones
        if pred.kind == "recommended":
            raise ValueError(f"candidates cannot hold {name!r} itself.")
        out[str(label)] = (name, dict(options))
    if not out:
        raise ValueError("candidates is empty; give at least one registered predictor.")
    return out


@inject_docs
def fit_recommended(
    adata: AnnData,
    *,
    layer: str | None = None,
    genes: Any = None,
    library_key: str | None = None,
    groupby: str | None = None,
    candidates: Any = None,
    features_key: str | None = None,
    encoder: str = DEFAULT_ENCODER,
    pretrained: bool = False,
    checkpoint: str | Path | None = None,
    patches_key: str = C.PATCHES_KEY,
    spatial_key: str = C.SPATIAL_KEY,
    level: float = 0.9,
    min_r: float = 0.2,
    n_blocks: int = 5,
    random_state: int = 0,
    save_dir: str | Path | None = None,
    key_added: str = RECOMMENDED_KEY,
    device: str | None = None,
    progress: bool = True,
) -> BaseModel:
    """Fit sthist's recommended predictor: the best of a few fast configurations on *your* data, calibrated.

    A default tuned on someone else's tissue is not safe on every data set (trained on her2st patient B alone,
    ``dual_knn`` loses to raw-feature kNN on patient C). So the candidates, by default ``dual_knn`` (both retrieval
    spaces), ``dual_knn`` with the raw or the learnt space alone, raw-feature ``knn`` and the GCV ridge
    (``ridge_gcv``), are cross-validated on the training data, leaving one group out at a time (its sections, or
    spatial blocks of a single section; as :func:`sthist.tl.calibrate`). Each is scored per held-out group by the mean
    of ``pcc_all`` and ``pcc_heg`` (the mean Pearson r over all genes and over the top-50 highly expressed genes,
    chosen on the fold's training groups). The choice follows the one-standard-error rule: of the candidates whose
    mean shortfall from the best, paired by group, is within one standard error of those differences, the one that
    learns least (in the order knn, dual_knn[raw], ridge_gcv, dual_knn[learnt], dual_knn): a difference the held-out
    groups cannot resolve does not buy a more flexible model (with two groups, which give no standard error to speak
    of, the best mean is chosen). The choice is refitted on all spots and calibrated

    with its own out-of-group predictions (no further fits): the returned model gives prediction intervals, reliable
    genes and the shift flag (:func:`sthist.tl.predict_expression`). Every candidate fits in about a second on a CPU.


    Parameters
    ----------
    {adata}
        The training spots: patches or embeddings, expression, and ``obsm['spatial']`` with the sections.
    {layer}
        Recommended: the ``'targets'`` layer of :func:`sthist.pp.normalize_expression`.
    {genes}
    {library_key}
    groupby
        Column of ``adata.obs`` whose groups are left out (``None``: the sections, or spatial blocks of one section).
    candidates
        Registered names (``['dual_knn', 'knn']``) or a mapping label -> ``(name, fit options)``; ``None`` for the
        five above.
    {frozen_features}
    spatial_key
        ``adata.obsm`` key of the spot centres.
    level, min_r, n_blocks
        Of the calibration (:func:`sthist.tl.calibrate`).
    {random_state}
    {baseline_record}
    {progress}

    Returns
    -------
    The chosen model, calibrated (``model.calibration``; its ``provenance['selection']`` records every candidate's
    cross-validated ``pcc_all``, ``pcc_heg`` and score, the choice and the criterion). Also writes

    ``adata.uns['recommended' | key_added]``
        ``params`` (the choice, the criterion, the groups and every candidate's scores) and the ``model_id`` /
        ``model_dir`` that :func:`~sthist.tl.predict_expression` finds.
    ``adata.obsm['X_<encoder>']``
        the embeddings, when they were computed here.

    Examples
    --------
    >>> model = sthist.tl.fit_recommended(ref, layer="targets", library_key="section")  # doctest: +SKIP
    >>> model.calibration.provenance["selection"]["chosen"]  # doctest: +SKIP
    'dual_knn'
    >>> sthist.tl.predict_expression(new, model, library_key="section")  # doctest: +SKIP
    """
    import pandas as pd

    from ._cv import run_folds
    from ._registry import fit_predictor

    fn = "sthist.tl.fit_recommended"
    check_adata(adata, fn=fn)
    level = _check_fraction("level", level)
    min_r = _check_fraction("min_r", min_r, low=-1.0)
    n_blocks = check_positive_int("n_blocks", n_blocks)
    if n_blocks < 2:
        raise ValueError(f"n_blocks must be at least 2 (one block is left out at a time), got {n_blocks}.")
    if isinstance(random_state, bool) or not isinstance(random_state, int | np.integer):
        raise TypeError(f"random_state must be an integer, got {random_state!r}.")
    cands = _candidates(candidates)
    shared = {"pretrained": pretrained, "checkpoint": None if checkpoint is None else str(checkpoint)}
    prep, how = leave_group_out_folds(
        adata,
        groupby=groupby,
        library_key=library_key,
        spatial_key=spatial_key,
        n_blocks=n_blocks,
        random_state=int(random_state),
        layer=layer,
        genes=genes,
        patches_key=patches_key,
        features_key=features_key,
        encoder=encoder,
        fit_kwargs=shared,
        nonnegative=False,
        keep_patches=False,
        progress=progress,
        fn=fn,
    )
    start = info(f"choosing among {list(cands)} by leaving out each of {len(prep.folds)} groups of {how}")
    runs, per_fold = {}, {}
    for label, (name, options) in cands.items():
        runs[label] = run_folds(
            prep, name, random_state=int(random_state), fit_kwargs={**shared, **options}, gene_spread=True
        )
        per_fold[label] = runs[label].table.set_index("fold")[list(CRITERION)].mean(axis=1)
    chosen, rows = choose(per_fold)
    scores = pd.DataFrame(rows).set_index("candidate")
    name, options = cands[chosen]
    info(f"    chose {chosen!r}: " + ", ".join(f"{c} {v:.3f}" for c, v in scores["score"].items()))

    if features_key is None and prep.features_key is not None and prep.features_key not in adata.obsm:
        # cache the features computed for the folds, as every fit does
        adata.obsm[prep.features_key] = prep.work.obsm[prep.features_key]
        adata.uns[prep.features_key] = prep.work.uns[prep.features_key]
    fit_kw = {
        "layer": layer,
        "genes": genes,
        "features_key": features_key if features_key is not None else prep.features_key,
        "key_added": key_added,
        "encoder": encoder,
        "patches_key": patches_key,
        "library_key": library_key,
        "spatial_key": spatial_key,
        "random_state": int(random_state),
        "device": device,
        "progress": progress,
        **shared,
        **options,
    }
    from ._registry import get_predictor

    pred = get_predictor(name)
    model = fit_predictor(adata, name, **{k: v for k, v in fit_kw.items() if pred.accepts(k)})
    selection = {
        "chosen": chosen,
        "method": name,
        "criterion": CRITERION_TEXT,
        "candidates": {row["candidate"]: {k: v for k, v in row.items() if k != "candidate"} for row in rows},
        "per_group": {c: {str(f): float(v) for f, v in s.items()} for c, s in per_fold.items()},
    }
    model.calibration = calibration_from_folds(
        model,
        prep,
        runs[chosen],
        refit={"method": name, **options},
        how=how,
        layer=layer,
        level=level,
        min_r=min_r,
        ood_alpha=0.01,
        random_state=int(random_state),
        provenance={"selection": selection},
    )
    if save_dir is not None:
        model.save(save_dir, overwrite=True)
    params = {
        "method": "recommended",
        "chosen": chosen,
        "chosen_method": name,
        "criterion": selection["criterion"],
        "groups": list(prep.folds),
        "how": how,
        "layer": layer,
        "scores": {
            c: {m: scores.loc[c, m] for m in ("score", "shortfall", "se", "within_one_se")} for c in scores.index
        },
        "level": level,
        "n_reliable": int(model.calibration.reliable.sum()),
        "inputs": model.inputs.to_dict(),
    }
    record(adata, key_added, {"params": params, **model_record(model, save_dir=save_dir)})
    info(f"    finished: {chosen!r}, calibrated at {level:g}", time=start)
    return model
