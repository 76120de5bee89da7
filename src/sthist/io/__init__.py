"""Readers: Visium folders, HEST-1k samples and SpatialData (spots, Visium HD bins, cells) into one AnnData layout."""

from __future__ import annotations

from ._hest import read_hest
from ._spatialdata import from_spatialdata
from ._visium import read_visium

__all__ = ["from_spatialdata", "read_hest", "read_visium"]
