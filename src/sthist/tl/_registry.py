"""The public registry of predictors: every contrastive method and every baseline, fitted through one entry."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._dual_knn import fit_dual_knn
from ._knn import fit_knn
from ._recommended import fit_recommended
from ._ridge import fit_ridge

if TYPE_CHECKING:
    import pandas as pd
    from anndata import AnnData

    from .._engine.base import BaseModel


@dataclass(frozen=True)
class Predictor:
    """A registered predictor: its name, kind, one-line description and the ``sthist.tl`` function that fits it."""

    name: str
    kind: str
    description: str
    fit: Callable[..., BaseModel]

    def accepts(self, option: str) -> bool:
        """Whether the fit function takes the keyword ``option``."""
        target = self.fit.func if isinstance(self.fit, functools.partial) else self.fit
        params = inspect.signature(target).parameters
        return option in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


#: The recommended call (kind ``"recommended"``): the best of fast candidates on the user's data, calibrated.
RECOMMENDED = "recommended"
#: sthist's closed-form predictors (kind ``"closed-form"``), the recommended call's strongest candidate.
CLOSED_FORM = ("dual_knn",)

#: Predictors without contrastive training (name -> (description, fit function)): the recommended call, the controls
#: every method must beat (kind ``"control"``) and ``dual_knn`` (kind ``"closed-form"``).
BASELINES: dict[str, tuple[str, Callable[..., Any]]] = {
    "recommended": (
        "sthist's recommended call: dual_knn (both spaces or one), knn or ridge_gcv, whichever cross-validates best "
        "on the training data, refitted and calibrated (intervals, reliable genes, shift flag)",
        fit_recommended,
    ),
    "ridge": ("HEST-Benchmark linear probe: standardise, PCA(256), ridge on frozen encoder features", fit_ridge),
    "ridge_gcv": (
        "The linear probe with its penalty chosen by generalised cross-validation (RidgeCV), not HEST's rule",
        functools.partial(fit_ridge, alpha="gcv"),
    ),
    "knn": (
        "Raw-feature kNN: average of the 50 nearest training spots in the frozen feature space, no training",
        fit_knn,
    ),
    "dual_knn": (
        "Neighbour-context retrieval in two spaces (the raw context features and their ridge map onto the "
        "expression's principal components), fitted in a second on a CPU: the recommended call's usual choice",
        fit_dual_knn,
    ),
}

#: The baselines that predict by retrieval of training profiles (the others regress; the recommended call depends).
_RETRIEVAL_BASELINES = ("knn", "dual_knn")
#: The baselines that read spatial neighbours (coordinates and sections) at prediction.
_SPATIAL_BASELINES = ("dual_knn", "recommended")


def predictors() -> dict[str, Predictor]:
    """Every registered predictor by name: the recommended one, the controls, then the contrastive methods."""
    from .. import tl
    from .._engine.methods import METHODS

    def kind(name: str) -> str:
        return "recommended" if name == RECOMMENDED else "closed-form" if name in CLOSED_FORM else "control"

    order = {"recommended": 0, "closed-form": 1, "control": 2}
    out = {
        name: Predictor(name, kind(name), desc, fn)
        for name, (desc, fn) in sorted(BASELINES.items(), key=lambda item: order[kind(item[0])])
    }
    # the public function, looked up now, is what fits every contrastive method
    out.update(
        {
            name: Predictor(name, "contrastive", cls.description, functools.partial(tl.fit_contrastive, method=name))
            for name, cls in METHODS.items()
        }
    )
    return out


def get_predictor(name: str) -> Predictor:
    """The predictor registered as ``name``; unknown names raise with the registered ones."""
    known = predictors()
    if not isinstance(name, str) or name not in known:
        raise ValueError(
            f"method={name!r} is not registered; choose one of {sorted(known)} (see `sthist.tl.methods()`)."
        )
    return known[name]


def fit_predictor(adata: AnnData, method: str, **kwargs: Any) -> BaseModel:
    """Fit the registered predictor ``method`` on ``adata``.

    Keyword arguments its fit function does not take are dropped when they are unset (``None`` or ``False``) and
    raise otherwise, so one set of options can serve contrastive methods and baselines alike.
    """
    pred = get_predictor(method)
    unknown = [k for k in kwargs if not pred.accepts(k)]
    bad = sorted(k for k in unknown if kwargs[k] is not None and kwargs[k] is not False)
    if bad:
        target = pred.fit.func if isinstance(pred.fit, functools.partial) else pred.fit
        valid = sorted(set(inspect.signature(target).parameters) - {"adata", "method"})
        raise TypeError(f"method {method!r} ({pred.kind}) does not take {bad}; it takes {valid}.")
    return pred.fit(adata, **{k: v for k, v in kwargs.items() if k not in unknown})


def methods() -> pd.DataFrame:
    """The registered predictors, one row each: the recommended one, the controls and the contrastive methods.

    Returns
    -------
    A :class:`~pandas.DataFrame` indexed by ``name`` (the recommended predictor first) with columns ``kind``
    (``'recommended'``: :func:`~sthist.tl.fit_recommended`; ``'closed-form'``: ``dual_knn``; ``'control'``: the
    predictors without training every method must beat, ``'ridge'``, ``'ridge_gcv'`` and ``'knn'``;
    ``'contrastive'``: the contrastive methods), ``description``, ``prediction`` (``'retrieval'`` or
    ``'regression'``; the recommended call's depends on its choice), ``needs_coords`` and, for contrastive

    methods, their published training recipe (``optimizer``, ``lr``, ``batch_size``, ``epochs``, ``select_on``)
    and retrieval defaults (``k``, ``weighting``). Pass a name as ``method=`` to :func:`sthist.tl.fit_contrastive`,
    :func:`sthist.tl.cross_validate` or the command line.

    Examples
    --------
    >>> import sthist
    >>> sthist.tl.methods().loc["bleep", "kind"]
    'contrastive'
    """
    import pandas as pd

    from .._engine.methods import METHODS

    rows = []
    for name, pred in predictors().items():
        row: dict[str, Any] = {"name": name, "kind": pred.kind, "description": pred.description}
        cls = METHODS.get(name)
        if cls is None:
            row.update(
                prediction="retrieval"
                if name in _RETRIEVAL_BASELINES
                else "chosen"
                if name == RECOMMENDED
                else "regression",
                needs_coords=name in _SPATIAL_BASELINES,
            )
        else:
            plan = cls.recipe
            stages = plan.resolved_stages()
            row.update(
                prediction=cls.prediction,
                needs_coords=bool(cls.needs_coords or cls.needs_neighbors),
                optimizer=plan.optimizer.name,
                lr=plan.optimizer.lr,
                batch_size=plan.batch_size,
                epochs=sum(s.epochs for s in stages),
                select_on=plan.select_on,
                k=cls.prediction_defaults.get("k", 50) if cls.prediction == "retrieval" else None,
                weighting=cls.prediction_defaults.get("weighting", "average")
                if cls.prediction == "retrieval"
                else None,
            )
        rows.append(row)
    table = pd.DataFrame(rows).set_index("name")
    return table.astype({c: "Int64" for c in ("batch_size", "epochs", "k") if c in table})
