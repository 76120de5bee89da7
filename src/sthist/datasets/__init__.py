"""Data sets: a synthetic Visium-layout generator, the HER2+ breast cancer ST data and HEST-1k samples."""

from __future__ import annotations

from ._her2st import her2st
from ._hest import hest
from ._toy import toy

__all__ = ["her2st", "hest", "toy"]
