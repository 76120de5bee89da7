"""Data sets: a synthetic Visium-layout generator and a reader for the HER2+ breast cancer ST data."""

from __future__ import annotations

from ._her2st import her2st
from ._toy import toy

__all__ = ["her2st", "toy"]
