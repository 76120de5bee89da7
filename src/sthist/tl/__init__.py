"""Tools: fit models, predict expression, score predictions."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._engine.plan import Optim, Schedule, Stage, TrainPlan
from ._benchmark import BenchmarkResult, benchmark
from ._calibrate import calibrate
from ._cv import cross_validate
from ._dual_knn import fit_dual_knn
from ._fit import fit_contrastive
from ._knn import fit_knn
from ._predict import predict_expression
from ._recommended import fit_recommended
from ._registry import methods
from ._ridge import fit_ridge
from ._score import score_prediction
from ._slide import predict_slide
from ._utils import load_model

if TYPE_CHECKING:
    from .._engine.base import BaseModel, ModelInputs
    from .._engine.calibration import Calibration, ShiftWarning
    from .._engine.dual_knn import DualKNNModel
    from .._engine.knn import KNNModel
    from .._engine.model import ContrastiveModel
    from .._engine.ridge import RidgeModel

_LAZY = {
    "BaseModel": "base",
    "Calibration": "calibration",
    "ShiftWarning": "calibration",
    "ModelInputs": "base",
    "Prediction": "base",
    "ContrastiveModel": "model",
    "DualKNNModel": "dual_knn",
    "KNNModel": "knn",
    "RidgeModel": "ridge",
}


def __getattr__(name: str):
    # the model classes live in the engine (the contrastive one needs torch): import them only when asked for
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"sthist._engine.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'sthist.tl' has no attribute {name!r}")


__all__ = [
    "BaseModel",
    "BenchmarkResult",
    "Calibration",
    "ContrastiveModel",
    "DualKNNModel",
    "KNNModel",
    "ModelInputs",
    "Optim",
    "Prediction",
    "RidgeModel",
    "Schedule",
    "ShiftWarning",
    "Stage",
    "TrainPlan",
    "benchmark",
    "calibrate",
    "cross_validate",
    "fit_contrastive",
    "fit_dual_knn",
    "fit_knn",
    "fit_recommended",
    "fit_ridge",
    "load_model",
    "methods",
    "predict_expression",
    "predict_slide",
    "score_prediction",
]
