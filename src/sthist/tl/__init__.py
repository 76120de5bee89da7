"""Tools: fit contrastive models, predict expression, score predictions."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._cv import cross_validate
from ._fit import fit_contrastive
from ._predict import predict_expression
from ._ridge import RidgeModel, fit_ridge
from ._score import score_prediction
from ._slide import predict_slide

if TYPE_CHECKING:
    from .._engine.model import ContrastiveModel


def __getattr__(name: str):
    # the model class lives in the torch engine: import it only when asked for
    if name == "ContrastiveModel":
        from .._engine.model import ContrastiveModel

        return ContrastiveModel
    raise AttributeError(f"module 'sthist.tl' has no attribute {name!r}")


__all__ = [
    "ContrastiveModel",
    "RidgeModel",
    "cross_validate",
    "fit_contrastive",
    "fit_ridge",
    "predict_expression",
    "predict_slide",
    "score_prediction",
]
