"""Preprocessing: H&E patches around spots, pseudo-spots on whole slides, expression targets and gene selection."""

from __future__ import annotations

from ._embed import embed_patches
from ._patches import extract_patches
from ._store import read_store
from ._targets import normalize_expression, select_genes
from ._tiles import tile_tissue

__all__ = ["embed_patches", "extract_patches", "normalize_expression", "read_store", "select_genes", "tile_tissue"]
