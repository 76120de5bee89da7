"""Plots: read what :mod:`sthist.tl` wrote; never compute into or modify ``adata``."""

from __future__ import annotations

__all__: list[str] = []
