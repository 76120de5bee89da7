"""mclSTExp: multimodal contrastive learning with a Transformer over spots (Min et al., Brief. Bioinform. 2024).

Idea
    Spots are "words" and a set of spots is a "sentence". The expression side adds learnable
    x and y position embeddings to each spot's expression profile and runs a Transformer encoder over the set,
    so that every spot's embedding carries the context of the other spots; a projection head maps it into the
    joint space. The image side is the image encoder's features through a projection head (no positions, no
    context). A standard CLIP loss aligns the two.

Loss
    With ``logits = spot_emb @ img_emb.T / T`` over a batch and the diagonal as the only positive
    pairs (hard labels): ``(CE(logits, diag) + CE(logits.T, diag)) / 2``, mean over spots.

Prediction (retrieval)
    The query spot's image embedding is compared (cosine) with the expression embeddings of the reference bank;
    the expression of the top ``k`` reference spots is averaged with weights proportional to ``1 / d**2``, d the
    L1 distance between the raw query and key embeddings: ``k=200`` (authors' ``evel_*.py``; all of a smaller bank)
    and ``weighting="distance"`` are the defaults of ``predict_expression``. Query spots need no coordinates: the
    image side does not use them.

Positions
    The authors index ``nn.Embedding(65536, n_genes)`` tables with the ST array coordinates (her2st, cSCC: integer
    spot grid indices) or with full-resolution pixel coordinates (10x Visium). Here the indices come from the
    full-resolution pixel coordinates of the spots by :func:`grid_positions`, once per whole section
    (:meth:`MclSTExp.prepare_coords`, so a spot has the same index whichever spots share its batch): the spot pitch is
    measured in the section, coordinates are quantised in units of about half a pitch (so the spacing of the indices does
    not depend on the image resolution, and the shifted rows of Visium's hexagonal grid stay apart), counted from the image
    origin (so a spot has the same index in every batch) and wrapped modulo ``n_positions`` (256: more than the
    about 135 half-pitches that a 6.5 mm Visium or ST capture area spans, so no two spots of a section share an
    index on either axis). Sections of a single spot get index 0.

Defaults and their sources (authors' code, github.com/ZhicengShi/mclSTExp)
    * ``model.py`` (``mclSTExp_Attention``): ``x_embed``/``y_embed`` = ``nn.Embedding(65536, n_genes)`` added to the
      expression; ``spot_encoder`` = ``head_layers`` pre-norm blocks (LayerNorm -> 8-head self-attention with
      64-d heads, no qkv bias, output Linear -> residual; LayerNorm -> Linear(g, mlp_dim) -> GELU ->
      Linear(mlp_dim, g) -> residual) over the whole batch as one sequence; BLEEP-style projection heads (dropout
      0) into 256 dims for both sides; hard-label symmetric CLIP loss.
    * ``train.py``: temperature 1.0, projection_dim 256, heads 8, head dim 64, 2 layers, ``mlp_dim`` = number of
      genes, dropout 0; Adam(lr=1e-4, weight_decay=1e-3), batch size 128, 90 epochs; DenseNet-121 (1024-d, fine-
      tuned) on 224 x 224 patches with colour jitter, flips and rotations.
    * ``evel_her2st.py``: the bank's expression embeddings are computed in batches (sets) of 32 spots; cosine top
      200; weights ``1 / (L1 distance)**2``.

Training recipe (``recipe``, the authors' ``train.py``): Adam (lr 1e-4, L2 weight decay 1e-3), batches of 128 spots
shuffled over all training sections (the authors' ``DataLoader``; the paper's text speaks of "a sentence of spots of
a slice", the code mixes slices: sthist follows the code), 90 epochs, no validation, the last epoch kept. The bank is
embedded in sets of 32 consecutive spots (``expression_set_size``). Batches are split evenly (at most 128 spots,
e.g. 3 x 110 of 330) rather than 128 + a remainder.

Departures: the position tables have ``n_positions`` (256) rows instead of 65536 (the authors' tables hold 2 x 65536
x g weights, about 400 MB for 785 genes, almost all never used), see ``docs/methods/mclstexp.md``.
``mclstexp_section`` (sthist's variant) holds one section per set, embeds the bank in sets of up to 256 spots of
one section, trains with AdamW and early stopping and caps a default ``k`` at a third of the bank.

Citation: Min W, Shi Z, Zhang J, Wan J, Wang C. Multimodal contrastive learning for spatial gene expression
prediction using histology images. Briefings in Bioinformatics 25(6), bbae551 (2024). arXiv:2407.08216.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..plan import Augment, Optim, TrainPlan
from . import register
from ._base import Batch, Method, ProjectionHead, check_positive_ints

RECOMMENDED_K = 200
"""Reference spots retrieved per query in the authors' evaluation (``evel_*.py``: ``top_k=200``)."""

RECOMMENDED_WEIGHTING = "distance"
"""Aggregation of the retrieved profiles in the authors' evaluation: weights proportional to 1 / d^2."""


def recommended_k(n_reference: int) -> int:
    """Return the number of reference spots to retrieve: 200 (the paper), at most the bank.

    The authors retrieve 200 of the ~10,000 spots of 31 her2st sections (2 %); sthist's ``mclstexp`` keeps 200 on any
    bank of at least 200 spots. (The ``mclstexp_section`` variant caps a default ``k`` at a third of small banks.)
    """
    n_reference = int(n_reference)
    if n_reference < 1:
        raise ValueError(f"the reference bank is empty (n_reference={n_reference}); fit a model first.")
    return max(1, min(RECOMMENDED_K, n_reference))


def clip_loss(img_emb: torch.Tensor, spot_emb: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Standard (hard-label, symmetric) CLIP loss of mclSTExp.

    Parameters
    ----------
    img_emb, spot_emb
        (B, p) embeddings of the same B spots; row i of both is the positive pair.
    temperature
        Softmax temperature T (1.0 in the authors' ``train.py``).

    Returns
    -------
    Scalar ``(CE(logits, diag) + CE(logits.T, diag)) / 2`` with ``logits = spot @ img.T / T``.
    """
    logits = spot_emb @ img_emb.T / temperature
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def grid_positions(coords: torch.Tensor, n_positions: int = 256) -> torch.Tensor:
    """Integer grid positions (B, 2) of a set of spots from their pixel coordinates, for the position embeddings.

    1. The spot pitch p (centre-to-centre distance of adjacent spots) is measured in the set: the median of the
       pairwise distances up to 1.4 times the third smallest one (the adjacent pairs: the next lattice distances
       are 1.41 p on square ST and 1.73 p on hexagonal Visium grids; the third smallest rather than the smallest
       distance so that two stray close pairs do not matter; duplicated coordinates are ignored). The distribution
       of pairwise distances keeps its shape in random subsets of a section, so sets of a few hundred spots of a
       large section measure the same pitch; a set without any adjacent pair overestimates it.
    2. The unit is half the pitch rounded down to a power of 2**(1/8) (:func:`quantized_unit`): half a pitch keeps
       the shifted rows of a hexagonal grid on distinct x indices; the rounding gives every set of a section the
       same unit although the measured pitch varies slightly from set to set.
    3. Indices are ``round(coordinate / unit)`` on each axis, from the image origin (not from the set), so a spot
       gets the same index in every set it belongs to (about two indices per pitch at any image resolution), wrapped
       modulo
       ``n_positions`` so that any image fits the table (spots less than ``n_positions / 2`` pitches apart never
       share an index).

    On the her2st sections (about 290 px pitch, positions jittered by up to 15 %), the indices of 100 % of the
    spots are the same in random subsets of 50 % of a section as in the whole section (about 90 % in subsets of
    20 %); on a synthetic 4,992-spot Visium grid, 80-100 % in random sets of 128-256 spots.

    Sets of fewer than two distinct spots have no pitch and get index 0.

    Parameters
    ----------
    coords
        (B, 2) x, y coordinates (full-resolution pixels; any unit works).
    n_positions
        Rows of the position embedding tables.

    Returns
    -------
    int64 tensor (B, 2) of x and y indices in ``[0, n_positions)``.
    """
    c = coords.detach().float()
    out = torch.zeros(c.shape, dtype=torch.int64, device=c.device)
    if c.shape[0] < 2:
        return out
    c0 = c - c.mean(dim=0)  # distances are exact (no matrix-product shortcut), duplicates give exactly 0
    d = torch.cdist(c0, c0, compute_mode="donot_use_mm_for_euclid_dist")
    d = d[torch.ones_like(d, dtype=torch.bool).triu(diagonal=1)]
    d = d[d > 0]  # duplicated coordinates are not neighbours
    if d.numel() == 0:  # all spots at one point
        return out
    d0 = torch.kthvalue(d, min(3, d.numel())).values  # third smallest distance: robust to two stray close pairs
    pitch = d[d <= 1.4 * d0].median()  # the adjacent pairs (next lattice distances: 1.41 p square, 1.73 p hex)
    unit = quantized_unit(float(pitch))
    idx = torch.round(c / unit).to(torch.int64)
    return torch.remainder(idx, int(n_positions))


def quantized_unit(pitch: float) -> float:
    """Half the pitch, rounded down to a power of 2**(1/8) (steps of 9 %).

    The pitch measured in different sets of spots of one section differs slightly (jittered spot positions); a
    continuous unit would move spots far from the image origin to other indices from one set to the next. Rounding
    the unit to a coarse geometric grid gives every set of a section the same unit (unless the pitch lies within
    the measurement noise of a grid step), and rounding *down* keeps spots half a pitch apart on distinct indices.
    """
    return float(2.0 ** (math.floor(8.0 * math.log2(pitch / 2.0) + 1e-9) / 8.0))


class _Attention(nn.Module):
    """Multi-head self-attention over a set: qkv without bias, output projection and dropout."""

    def __init__(self, dim: int, heads: int, head_dim: int, dropout: float):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.head_dim = head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head_dim)) v
        return self.out(h.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


class _Block(nn.Module):
    """Pre-norm Transformer block: x + Attn(LN(x)), then x + FFN(LN(x)) with FFN = Linear -> GELU -> Linear."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads, head_dim, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(
            nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, dim), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ff(self.norm2(x))


@register("mclstexp")
class MclSTExp(Method):
    """mclSTExp: position embeddings + a Transformer over a set of spots on the expression side, CLIP loss.

    Prediction is by retrieval (cosine similarity, top ``k``); the paper weights the retrieved profiles by
    1 / d^2 (``weighting="distance"``) over the top 200 (:func:`recommended_k`). Expression
    embeddings need the spots' coordinates (``coords=``); image embeddings, hence predictions, do not.
    """

    prediction = "retrieval"
    needs_neighbors = False
    # the expression side (position embeddings) needs coordinates in training; query images do not
    needs_coords = True
    batch_by_group = False
    similarity = "cosine"
    expression_set_size: ClassVar[int | None] = 32
    """``evel_her2st.py``: the bank's expression embeddings are computed in sets of 32 consecutive spots."""
    recipe: ClassVar[TrainPlan] = TrainPlan(
        optimizer=Optim("adam", lr=1e-4, weight_decay=1e-3),
        batch_size=128,
        max_epochs=90,
        validation_fraction=0.0,
        early_stopping_patience=None,
        drop_last=False,
        augmentation=Augment(hflip=True, vflip=False, rotation="any", jitter=(0.5, 0.5, 0.5)),
        normalisation="unit",
    )
    """The authors' ``train.py``: Adam (lr 1e-4, L2 weight decay 1e-3), shuffled batches of 128 spots of all training
    sections, 90 epochs, no validation (the last epoch is saved). Fine-tuning inputs of their ``dataset.py``
    (her2st): ``ColorJitter(0.5, 0.5, 0.5)``, horizontal flips, rotation by any angle, values in [0, 1] without
    ImageNet normalisation."""
    prediction_defaults: ClassVar[dict[str, Any]] = {
        "k": RECOMMENDED_K,
        "weighting": RECOMMENDED_WEIGHTING,
        "max_k_fraction": 1.0,
    }
    """The authors' evaluation: top 200 reference spots (all of a bank of fewer), weights 1/d^2."""

    @classmethod
    def prepare_coords(cls, coords, groups):
        """Grid indices (n, 2) of the spots, from each section's pixel coordinates (see :func:`grid_positions`).

        The pitch is measured on whole sections, so a spot has the same index in any batch, also when batches mix
        sections as the authors' do; the indices are returned as floats (exact below 2**24), not yet wrapped
        modulo ``n_positions`` (that is the model's :meth:`embed_expression`, with its own configuration).
        """
        if coords is None:
            return None
        c = np.asarray(coords, dtype=np.float64)
        out = np.zeros(c.shape, dtype=np.float32)
        codes = np.zeros(c.shape[0], dtype=np.int64) if groups is None else np.asarray(groups)
        for g in np.unique(codes):
            rows = np.flatnonzero(codes == g)
            # unwrapped (2**24: exact in float32); embed_expression wraps them modulo the model's n_positions
            out[rows] = grid_positions(torch.as_tensor(c[rows]), 2**24).numpy()
        return out

    @dataclass
    class Config:
        """mclSTExp hyper-parameters (defaults = the authors' ``train.py`` / ``model.py``).

        Attributes
        ----------
        projection_dim
            Joint embedding width (256).
        temperature
            Temperature of the CLIP loss (1.0).
        n_layers
            Transformer blocks of the spot encoder (``heads_layers`` = 2).
        n_heads
            Attention heads (``heads_num`` = 8).
        head_dim
            Width of each head (``heads_dim`` = 64).
        mlp_dim
            Hidden width of the feed-forward layers; ``None`` = the number of genes (as the authors' code).
        dropout
            Dropout in the attention, feed-forward layers and projection heads (0).
        n_positions
            Rows of the x and y position embedding tables (256; the authors: 65536), see :func:`grid_positions`.

        Training settings of the published code (Adam with lr 1e-4 and weight decay 1e-3, batch size 128, 90
        epochs) are the class's ``recipe``; its DenseNet-121 fine-tuned on 224 x 224 patches is
        ``encoder="densenet121", pretrained=True, finetune=True``.
        """

        projection_dim: int = 256
        temperature: float = 1.0
        n_layers: int = 2
        n_heads: int = 8
        head_dim: int = 64
        mlp_dim: int | None = None
        dropout: float = 0.0
        n_positions: int = 256

        def __post_init__(self):
            check_positive_ints(self, "projection_dim", "n_layers", "n_heads", "head_dim", "n_positions")
            if self.mlp_dim is not None:
                check_positive_ints(self, "mlp_dim")
            if isinstance(self.dropout, bool) or not isinstance(self.dropout, int | float) or not 0 <= self.dropout < 1:
                raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}.")
            if (
                isinstance(self.temperature, bool)
                or not isinstance(self.temperature, int | float)
                or not float(self.temperature) > 0.0
            ):
                raise ValueError(f"temperature must be > 0, got {self.temperature!r}.")

    def __init__(self, image_dim: int, n_genes: int, config: Config | None = None):
        super().__init__(image_dim, n_genes, config)
        cfg = self.config
        g = self.n_genes
        mlp_dim = g if cfg.mlp_dim is None else cfg.mlp_dim
        self.x_embed = nn.Embedding(cfg.n_positions, g)
        self.y_embed = nn.Embedding(cfg.n_positions, g)
        self.spot_encoder = nn.Sequential(
            *[_Block(g, cfg.n_heads, cfg.head_dim, mlp_dim, cfg.dropout) for _ in range(cfg.n_layers)]
        )
        self.image_projection = ProjectionHead(image_dim, cfg.projection_dim, cfg.dropout)
        self.spot_projection = ProjectionHead(g, cfg.projection_dim, cfg.dropout)

    def embed_image(self, img_feats: torch.Tensor, batch: Batch | None = None) -> torch.Tensor:
        return self.image_projection(img_feats)

    def embed_expression(self, expr: torch.Tensor, batch: Batch | None = None) -> torch.Tensor:
        if batch is None or batch.coords is None:
            raise ValueError(
                f"method {self.name!r} adds position embeddings to the expression and needs the spots' coordinates: "
                "pass coords= (x, y per spot in full-resolution pixels; `sthist.tl.fit_contrastive` reads "
                "adata.obsm['spatial'], see `spatial_key`)."
            )
        pos = torch.remainder(batch.coords.round().long(), self.config.n_positions)  # from prepare_coords
        h = expr + self.x_embed(pos[:, 0]) + self.y_embed(pos[:, 1])
        h = self.spot_encoder(h.unsqueeze(0)).squeeze(0)  # the set of spots is one sequence
        return self.spot_projection(h)

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        img = self.embed_image(batch.img_feats, batch).float()
        spot = self.embed_expression(batch.expression, batch).float()
        return {"clip": clip_loss(img, spot, self.config.temperature)}


@register("mclstexp_section")
class MclSTExpSection(MclSTExp):
    """mclSTExp whose sets of spots are single sections, with sthist's early stopping and a bank-relative ``k``.

    sthist's mclSTExp before its recipe was made faithful (except that grid positions now come from whole sections,
    as in ``mclstexp``): every training batch (a "sentence" of spots) holds spots of one section, as the paper's text
    describes, the bank is embedded in sets of up to 256 spots of one section,
    AdamW (lr 1e-4, weight decay 1e-3) with early stopping on 10 % of the spots, and a default ``k`` of 200 capped at
    a third of small banks. The fidelity table of the method page compares the two on her2st.
    """

    variant_of: ClassVar[str | None] = "mclstexp"

    batch_by_group = True
    expression_set_size: ClassVar[int | None] = None
    recipe: ClassVar[TrainPlan] = TrainPlan(
        optimizer=Optim("adamw", lr=1e-4, weight_decay=1e-3), batch_size=128, max_epochs=90
    )
    prediction_defaults: ClassVar[dict[str, Any]] = {"k": RECOMMENDED_K, "weighting": RECOMMENDED_WEIGHTING}
