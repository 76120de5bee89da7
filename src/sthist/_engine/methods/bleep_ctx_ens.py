"""An ensemble of ``bleep_ctx`` heads that retrieves by the mean cosine similarity of its members (sthist's).

``n_members`` independently initialised pairs of projection heads (each ``bleep_ctx``'s: the image head reads the
spot's features and the mean features of its spatial neighbours; the expression head reads the profile) are trained
side by side on the same batches, the loss being the mean of their soft-target CLIP losses. The joint-space embedding
of a spot is the concatenation of the members' L2-normalised embeddings divided by ``sqrt(n_members)``, so the
cosine similarity of a query and a reference spot is the mean of the members' cosine similarities, and retrieval
ranks reference spots by that mean. Averaging members removes the part of each member's ranking that depends on its
random initialisation. Evidence (her2st, 3 seeds): on the docs page of ``bleep_ctx``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from . import register
from ._base import Batch, ProjectionHead, check_positive_ints
from .bleep import soft_clip_loss
from .bleep_ctx import BLEEPContext


@register("bleep_ctx_ens")
class BLEEPContextEnsemble(BLEEPContext):
    """An ensemble of bleep_ctx heads; retrieval by the mean of the members' cosine similarities."""

    @dataclass
    class Config(BLEEPContext.Config):
        """``bleep_ctx``'s hyper-parameters plus the number of members.

        Attributes
        ----------
        n_members
            Pairs of projection heads trained side by side (5).
        """

        n_members: int = 5

        def __post_init__(self):
            super().__post_init__()
            check_positive_ints(self, "n_members")

    def __init__(self, image_dim: int, n_genes: int, config: Config | None = None):
        super().__init__(image_dim, n_genes, config)
        cfg = self.config
        del self.image_projection, self.spot_projection  # the members' heads replace the single pair
        self.image_heads = nn.ModuleList(
            [ProjectionHead(2 * image_dim, cfg.projection_dim, cfg.dropout) for _ in range(cfg.n_members)]
        )
        self.spot_heads = nn.ModuleList(
            [ProjectionHead(n_genes, cfg.projection_dim, cfg.dropout) for _ in range(cfg.n_members)]
        )

    def _image_inputs(self, img_feats: torch.Tensor, batch: Batch | None) -> torch.Tensor:
        if batch is None or batch.neighbor_img_feats is None or batch.neighbor_mask is None:
            raise ValueError("method 'bleep_ctx_ens' needs the spatial neighbours of each spot: pass coords=.")
        mask = batch.neighbor_mask.unsqueeze(-1).to(img_feats.dtype)
        context = (batch.neighbor_img_feats.to(img_feats.dtype) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return torch.cat([img_feats, context], dim=-1)

    @staticmethod
    def _joint(embeddings: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([F.normalize(e, dim=-1) for e in embeddings], dim=-1) / len(embeddings) ** 0.5

    def embed_image(self, img_feats: torch.Tensor, batch: Batch | None = None) -> torch.Tensor:
        x = self._image_inputs(img_feats, batch)
        return self._joint([h(x) for h in self.image_heads])

    def embed_expression(self, expr: torch.Tensor, batch: Batch | None = None) -> torch.Tensor:
        return self._joint([h(expr) for h in self.spot_heads])

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        x = self._image_inputs(batch.img_feats, batch)
        t = self.config.temperature
        losses = [
            soft_clip_loss(hi(x).float(), hs(batch.expression).float(), t)
            for hi, hs in zip(self.image_heads, self.spot_heads, strict=True)
        ]
        return {"clip": torch.stack(losses).mean()}
