"""BLEEP with tissue context: sthist's combination of BLEEP retrieval with neighbour context.

The seed methods that beat BLEEP on her2st under sthist's protocol (ST-GCHB, and NH2ST on some genes) all let a
spot's image embedding see its spatial neighbours. ``bleep_ctx`` isolates that ingredient: it is BLEEP (the same
projection heads, soft-target CLIP loss and top-k retrieval) whose image head reads the spot's own image features
concatenated with the mean image features of its ``n_neighbors`` nearest spots in the same section. The expression
side is BLEEP's, so the reference bank is unchanged; queries need coordinates (their neighbours' patches).
Evidence and the comparison with every method are on the docs page and in the README's benchmark table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..plan import TrainPlan
from . import register
from ._base import Batch, ProjectionHead, check_positive_ints
from .bleep import BLEEP, FROZEN_FEATURE_RECIPE


@register("bleep_ctx")
class BLEEPContext(BLEEP):
    """BLEEP whose image embedding sees the spot and the mean of its spatial neighbours' image features."""

    needs_neighbors = True
    recipe: ClassVar[TrainPlan] = FROZEN_FEATURE_RECIPE
    """sthist's frozen-feature recipe (as ``bleep_es``): up to 100 epochs, early stopping on 10 % of the spots."""

    @dataclass
    class Config(BLEEP.Config):
        """BLEEP's hyper-parameters plus the size of the neighbourhood.

        Attributes
        ----------
        n_neighbors
            Spatial neighbours whose mean image features join the spot's own (6: the first ring of a hexagonal
            Visium grid; on the square ST grid the 4 direct and 2 of the diagonal neighbours).
        """

        n_neighbors: int = 6

        def __post_init__(self):
            super().__post_init__()
            check_positive_ints(self, "n_neighbors")

    def __init__(self, image_dim: int, n_genes: int, config: Config | None = None):
        super().__init__(image_dim, n_genes, config)
        cfg = self.config
        self.image_projection = ProjectionHead(2 * image_dim, cfg.projection_dim, cfg.dropout)

    def embed_image(self, img_feats: torch.Tensor, batch: Batch | None = None) -> torch.Tensor:
        if batch is None or batch.neighbor_img_feats is None or batch.neighbor_mask is None:
            raise ValueError("method 'bleep_ctx' needs the spatial neighbours of each spot: pass coords=.")
        mask = batch.neighbor_mask.unsqueeze(-1).to(img_feats.dtype)
        context = (batch.neighbor_img_feats.to(img_feats.dtype) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.image_projection(torch.cat([img_feats, context], dim=-1))
