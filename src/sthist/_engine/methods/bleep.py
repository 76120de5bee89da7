"""BLEEP: Bi-modaL Embedding for Expression Prediction (Xie et al., NeurIPS 2023).

Architecture and defaults follow the authors' code (github.com/bowang-lab/BLEEP):

* ``modules.py``: ``ProjectionHead`` = Linear(in, 256) -> GELU -> Linear(256, 256) -> Dropout(0.1) -> residual
  (+ the first projection) -> LayerNorm; one head for image features, one for the expression profile
  (no separate expression encoder: ``spot_features = batch["reduced_expression"]`` in ``models.py``).
* ``models.py`` (``CLIPModel``): logits = expr_emb @ img_emb.T / T; soft targets =
  softmax((img_emb @ img_emb.T + expr_emb @ expr_emb.T) / 2 / T) row-wise; loss = mean over spots of the average
  of the cross-entropy of the expression rows and of the image rows (the transposes). The other encoder variants in
  ``models.py`` multiply by T inside the target softmax instead of dividing; with the published T = 1.0 both agree.
* ``config.py``: temperature 1.0, projection_dim 256, dropout 0.1, lr 1e-3, weight_decay 1e-3, image encoder
  timm ``resnet50`` (pretrained, trainable, global average pooling, 2048-d), 224 x 224 patches.
* ``BLEEP_main.py``: AdamW(lr=1e-3, weight_decay=1e-3), batch size 256, ``--max_epochs`` default 4, random 80/20
  train/validation split (seed 42), ``drop_last=True``, the weights with the lowest validation loss are kept.
* ``dataset.py``: training augmentation = random horizontal / vertical flips and rotations by multiples of 90
  degrees; ImageNet mean/std normalisation.
* ``BLEEP_inference.ipynb``: the query image embeddings and the reference expression embeddings are L2-normalised,
  cosine similarity, top-50 reference spots, prediction = plain average of their expression ("average").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch.nn import functional as F

from ..plan import Augment, Optim, TrainPlan
from . import register
from ._base import Batch, Method, ProjectionHead, check_positive_ints

#: sthist's frozen-feature recipe (the engine's default plan): up to 100 epochs, 10 % validation, early stopping.
FROZEN_FEATURE_RECIPE = TrainPlan()


def soft_clip_loss(img_emb: torch.Tensor, expr_emb: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """BLEEP's CLIP loss with soft targets from the within-modality similarities.

    Parameters
    ----------
    img_emb, expr_emb
        (B, p) embeddings of the same B spots.
    temperature
        Softmax temperature T (1.0 in BLEEP).

    Returns
    -------
    Scalar loss: mean over spots of ``(CE(expr rows) + CE(image rows)) / 2`` with
    ``logits = expr @ img.T / T`` and ``targets = softmax((img @ img.T + expr @ expr.T) / 2 / T)``.
    """
    logits = expr_emb @ img_emb.T / temperature
    targets = F.softmax((img_emb @ img_emb.T + expr_emb @ expr_emb.T) / 2 / temperature, dim=-1)
    spots_loss = -(targets * F.log_softmax(logits, dim=-1)).sum(dim=1)
    images_loss = -(targets.T * F.log_softmax(logits.T, dim=-1)).sum(dim=1)
    return ((spots_loss + images_loss) / 2).mean()


@register("bleep")
class BLEEP(Method):
    """BLEEP: two projection heads into a 256-d joint space, trained with a soft-target CLIP loss.

    Prediction is by retrieval: cosine similarity between a query image embedding and the expression embeddings
    of the reference spots, average of the top-k (k = 50 in the paper's code).
    """

    prediction = "retrieval"
    needs_neighbors = False
    similarity = "cosine"
    recipe: ClassVar[TrainPlan] = TrainPlan(
        optimizer=Optim("adamw", lr=1e-3, weight_decay=1e-3),
        batch_size=256,
        max_epochs=4,
        validation_fraction=0.2,
        early_stopping_patience=None,
        select_on="val_loss",
        augmentation=Augment(jitter=(0.0, 0.0, 0.0)),
        normalisation="imagenet",
    )
    """The authors' ``BLEEP_main.py``: AdamW (lr 1e-3, weight decay 1e-3), batch 256, 4 epochs on a random 80/20
    train/validation split, the epoch with the lowest validation loss kept (``bleep_es`` trains up to 100 epochs
    with early stopping instead). Fine-tuning inputs of their ``dataset.py``: flips and quarter turns, no colour
    jitter, ImageNet's mean and standard deviation."""
    prediction_defaults: ClassVar[dict[str, Any]] = {"k": 50, "weighting": "average"}
    """``BLEEP_inference.ipynb``: the plain average of the 50 most similar reference spots."""

    @dataclass
    class Config:
        """BLEEP hyper-parameters (defaults = the authors' ``config.py``).

        Attributes
        ----------
        projection_dim
            Joint embedding width (256).
        dropout
            Dropout in the projection heads (0.1).
        temperature
            Softmax temperature of the loss (1.0).

        Training settings of the published code (AdamW with lr 1e-3 and weight decay 1e-3, batch size 256,
        ``max_epochs`` 4 (``BLEEP_main.py`` default), 80/20 split, the best validation epoch kept) are the class's
        ``recipe``; the paper's ResNet-50 image encoder fine-tuned end to end on 224 x 224 patches with flips / 90
        degree rotations is ``encoder="resnet50", pretrained=True, finetune=True``.
        """

        projection_dim: int = 256
        dropout: float = 0.1
        temperature: float = 1.0

        def __post_init__(self):
            check_positive_ints(self, "projection_dim")
            if not 0.0 <= float(self.dropout) < 1.0:
                raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}.")
            if not float(self.temperature) > 0.0:
                raise ValueError(f"temperature must be > 0, got {self.temperature!r}.")

    def __init__(self, image_dim: int, n_genes: int, config: Config | None = None):
        super().__init__(image_dim, n_genes, config)
        cfg = self.config
        self.image_projection = ProjectionHead(image_dim, cfg.projection_dim, cfg.dropout)
        self.spot_projection = ProjectionHead(n_genes, cfg.projection_dim, cfg.dropout)

    def embed_image(self, img_feats: torch.Tensor, batch: Batch | None = None) -> torch.Tensor:
        return self.image_projection(img_feats)

    def embed_expression(self, expr: torch.Tensor, batch: Batch | None = None) -> torch.Tensor:
        return self.spot_projection(expr)

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        img = self.embed_image(batch.img_feats, batch).float()
        spot = self.embed_expression(batch.expression, batch).float()
        return {"clip": soft_clip_loss(img, spot, self.config.temperature)}


@register("bleep_es")
class BLEEPEarlyStopping(BLEEP):
    """BLEEP trained with sthist's frozen-feature recipe: up to 100 epochs, early stopping on 10 % of the spots.

    The same model, loss and retrieval as ``bleep``; only the training plan differs. The authors' 4 epochs fine-tune
    a pretrained ResNet-50 on about 9,000 spots (about 140 optimiser steps); on the few hundred training spots of a
    her2st fold, 4 epochs of batch 256 are 4 steps (see the fidelity table of the method page).
    """

    variant_of: ClassVar[str | None] = "bleep"

    recipe: ClassVar[TrainPlan] = FROZEN_FEATURE_RECIPE
