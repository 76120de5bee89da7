"""sthist: predict spatially resolved gene expression from H&E histology with contrastive learning.

The package follows scanpy's layout: :mod:`sthist.pp` (preprocessing), :mod:`sthist.tl` (tools),
:mod:`sthist.pl` (plots), :mod:`sthist.get` (predictions as AnnData for scanpy and squidpy), :mod:`sthist.datasets` and
:mod:`sthist.io`. Importing it is cheap: torch

and timm are imported only by the functions that need them.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from . import datasets, get, io, pl, pp, tl

try:
    __version__ = version("sthist")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = ["__version__", "datasets", "get", "io", "pl", "pp", "tl"]
