"""Get: what sthist wrote into an AnnData, in the form scanpy and squidpy take (as :mod:`scanpy.get`)."""

from __future__ import annotations

from ._predicted import predicted

__all__ = ["predicted"]
