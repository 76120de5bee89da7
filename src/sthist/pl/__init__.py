"""Plots: read what :mod:`sthist.tl` wrote; never compute into or modify ``adata``."""

from __future__ import annotations

from ._benchmark import benchmark
from ._calibration import calibration
from ._plots import gene_correlation, predicted_vs_true, scores, training_history

__all__ = ["benchmark", "calibration", "gene_correlation", "predicted_vs_true", "scores", "training_history"]
