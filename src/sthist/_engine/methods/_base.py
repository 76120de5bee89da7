"""The base class of contrastive methods and the batch they receive.

A method is one small ``torch.nn.Module`` that maps image features and expression into a joint space and defines
its training loss. The training loop (:mod:`sthist._engine.train`) and the model (:mod:`sthist._engine.model`) are
shared: they build :class:`Batch` objects holding everything a method may need (image features of the spots,
their expression, coordinates, section codes and spatial neighbours) and call the hooks below.

Class attributes that steer the shared machinery:

``name``
    Registry name (set by :func:`sthist._engine.methods.register`).
``prediction``
    ``"retrieval"``: expression is predicted by retrieving the nearest reference spots in the joint space
    (BLEEP, mclSTExp, ST-GCHB, CMRCNet); ``"regression"``: the method's :meth:`Method.predict` returns expression
    directly (NH2ST).
``needs_neighbors``
    Batches carry the ``n_neighbors`` spatial neighbours of every spot (indices, image features and, in training,
    expression); ``coords`` are then required.
``needs_coords``
    Training batches must carry coordinates (e.g. position embeddings of the expression side, graphs built inside a
    batch). Prediction needs coordinates only when ``needs_neighbors`` is set: query image embeddings of other
    methods must not depend on positions.
``batch_by_group``
    Every batch holds spots of one section only (set-level models such as mclSTExp's Transformer over spots, or
    graphs built inside a batch).
``similarity``
    ``"cosine"`` or ``"dot"``: how query image embeddings are compared with the bank of expression embeddings.
``recipe``
    The method's published training recipe, a :class:`~sthist._engine.plan.TrainPlan` (optimiser, schedule, batch,
    epochs, stages, model selection); the engine runs it, with the caller's overrides.
``prediction_defaults``
    The paper's retrieval settings (``k``, ``weighting``); used when the caller leaves them unset.
``consumes``
    The image inputs the method reads: ``("features",)`` (default) and/or ``"tokens"`` (encoder token grids, see
    :meth:`~sthist._engine.encoders.ImageEncoder.tokens`; the side of the grid is ``config.token_grid``).
``description``
    One line for the public registry (``sthist.tl.methods()``); by default the first line of the class docstring.

The training hook :meth:`Method.loss` returns a dict of named, weighted loss terms; the engine sums the terms
of the current stage (all of them in a single-stage plan).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn

from ..plan import TrainPlan


@dataclass
class Batch:
    """Everything a method may use for one batch of spots; tensors live on the training device.

    Attributes
    ----------
    img_feats
        (B, d) image features (encoder output, standardised in frozen mode).
    expression
        (B, g) expression; ``None`` at prediction time.
    index
        (B,) positions of the spots in the data set.
    coords
        (B, 2) float coordinates (x, y) or ``None``.
    groups
        (B,) int64 section codes or ``None``.
    neighbor_index
        (B, K) positions of spatial neighbours in the data set, ``-1`` where a spot has fewer than K.
    neighbor_img_feats
        (B, K, d) image features of the neighbours (zeros where missing).
    neighbor_expression
        (B, K, g) expression of the neighbours (training only, zeros where missing).
    neighbor_mask
        (B, K) True where a neighbour exists.
    neighbor_coords
        (B, K, 2) coordinates of the neighbours.
    img_tokens
        (B, T, D) encoder tokens of the spots' patches (a ``grid x grid`` raster, standardised in frozen mode), for
        methods that consume ``"tokens"``; ``None`` otherwise.
    """

    img_feats: torch.Tensor
    expression: torch.Tensor | None = None
    index: torch.Tensor | None = None
    coords: torch.Tensor | None = None
    groups: torch.Tensor | None = None
    neighbor_index: torch.Tensor | None = None
    neighbor_img_feats: torch.Tensor | None = None
    neighbor_expression: torch.Tensor | None = None
    neighbor_mask: torch.Tensor | None = None
    neighbor_coords: torch.Tensor | None = None
    img_tokens: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.img_feats.shape[0])


class Method(nn.Module):
    """Base class of a contrastive method; subclasses define ``Config``, the modules and the hooks."""

    name: ClassVar[str] = ""
    prediction: ClassVar[Literal["retrieval", "regression"]] = "retrieval"
    needs_neighbors: ClassVar[bool] = False
    needs_coords: ClassVar[bool] = False
    batch_by_group: ClassVar[bool] = False
    similarity: ClassVar[Literal["cosine", "dot"]] = "cosine"
    recipe: ClassVar[TrainPlan] = TrainPlan()
    """The published training recipe (default: the engine's, BLEEP's: AdamW 1e-3, batch 256, <= 100 epochs)."""
    consumes: ClassVar[tuple[str, ...]] = ("features",)
    """Image inputs the method reads: ``"features"`` (one pooled vector per patch, ``Batch.img_feats``) and/or
    ``"tokens"`` (a grid of ``config.token_grid`` x ``config.token_grid`` encoder tokens, ``Batch.img_tokens``).
    A method that consumes tokens is built as ``cls(image_dim, n_genes, config, token_dim=D)``."""
    description: ClassVar[str] = ""
    """One line for the registry (default: the first line of the class docstring)."""
    prediction_defaults: ClassVar[dict[str, Any]] = {}
    """The paper's retrieval ``k`` and ``weighting``, used by ``predict_expression`` when the caller gives none, and
    ``max_k_fraction``: the largest share of the bank a default ``k`` may retrieve (1/3 when absent)."""
    variant_of: ClassVar[str | None] = None
    """sthist's variants: the registered published method whose recipe this one departs from (``None`` otherwise)."""
    expression_set_size: ClassVar[int | None] = None
    """Spots per batch when expression embeddings are computed outside training (the reference bank, validation
    retrieval): ``None`` takes the caller's batch size; set-level methods declare the authors' (mclSTExp: 32)."""

    @dataclass
    class Config:
        """Hyper-parameters of the method (subclasses document the paper's values)."""

    def __init__(self, image_dim: int, n_genes: int, config: Any | None = None, *, token_dim: int = 0):
        super().__init__()
        self.token_dim = int(token_dim)  # width of the encoder tokens, for methods that consume them
        if config is None:
            config = self.Config()
        if not isinstance(config, self.Config):
            raise TypeError(
                f"config of method {self.name!r} must be a {self.Config.__qualname__}, got {type(config).__name__}."
            )
        self.config = config
        self.image_dim = int(image_dim)
        self.n_genes = int(n_genes)

    # ---- configuration -------------------------------------------------------------------------------------------
    @classmethod
    def make_config(cls, kwargs: dict[str, Any] | None = None):
        """Build ``cls.Config`` from keyword arguments, raising with the valid names on unknown ones."""
        kwargs = dict(kwargs or {})
        fields = {f.name for f in dataclasses.fields(cls.Config)}
        unknown = sorted(set(kwargs) - fields)
        if unknown:
            raise ValueError(
                f"method_kwargs {unknown} are not options of method {cls.name!r}; valid: {sorted(fields)}."
            )
        return cls.Config(**kwargs)

    @property
    def token_grid(self) -> int:
        """Side of the token grid batches must carry (``config.token_grid`` for methods that consume tokens)."""
        return int(getattr(self.config, "token_grid", 0)) if "tokens" in self.consumes else 0

    @property
    def n_neighbors(self) -> int:
        """Number of spatial neighbours a batch must carry (``config.n_neighbors`` for methods that need them)."""
        return int(getattr(self.config, "n_neighbors", 0)) if self.needs_neighbors else 0

    # ---- hooks ---------------------------------------------------------------------------------------------------
    @classmethod
    def prepare_coords(cls, coords: np.ndarray | None, groups: np.ndarray | None) -> np.ndarray | None:
        """The coordinates batches carry (``Batch.coords``), computed once from all spots of a data set.

        ``coords`` are the (n, 2) pixel coordinates, ``groups`` the (n,) section codes (or ``None``). The default
        returns them unchanged; a method whose spot representation depends on a per-section property (e.g.
        mclSTExp's grid indices, which need the section's spot pitch) computes it here from whole sections, so that
        it does not depend on which spots share a batch. Spatial neighbours are always found on the pixel
        coordinates.
        """
        return coords

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Named, weighted scalar loss terms of a batch; the engine sums those of the current training stage."""
        raise NotImplementedError

    def embed_image(self, img_feats: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Joint-space embeddings (B, p) of image features (``batch`` gives context: coords, neighbours ...)."""
        raise NotImplementedError

    def embed_expression(self, expr: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Joint-space embeddings (B, p) of expression profiles."""
        raise NotImplementedError

    def predict(self, img_feats: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Predicted expression (B, g); only regression methods implement it."""
        raise NotImplementedError(f"method {self.name!r} predicts by retrieval, not regression.")


def check_positive_ints(config: Any, *names: str) -> None:
    """Raise unless each named field of a method ``Config`` is a positive ``int`` (``bool`` is not an integer here)."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")


class ProjectionHead(nn.Module):
    """BLEEP's projection head: Linear -> GELU -> Linear -> Dropout -> residual -> LayerNorm."""

    def __init__(self, in_dim: int, projection_dim: int = 256, dropout: float = 0.1):
        super().__init__()
        self.projection = nn.Linear(in_dim, projection_dim)
        self.gelu = nn.GELU()
        self.fc = nn.Linear(projection_dim, projection_dim)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(projection_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected = self.projection(x)
        h = self.dropout(self.fc(self.gelu(projected)))
        return self.layer_norm(h + projected)
