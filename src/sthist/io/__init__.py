"""Readers that bring 10x Visium folders and SpatialData objects into the common AnnData layout."""

from __future__ import annotations

from ._spatialdata import from_spatialdata
from ._visium import read_visium

__all__ = ["from_spatialdata", "read_visium"]
