"""CMRCNet: cross-modal mask reconstruction and contrastive learning (Liu et al., Medical Image Analysis 2025).

Idea
    A BLEEP-style contrastive model (two projection heads, soft-target CLIP loss) gets a second, auxiliary task:
    the image tokens are randomly masked, the masked tokens attend to tokens made from the spot's expression, and
    the result must reconstruct the spot's (unmasked) image embedding. Reconstructing image content from half of
    it plus the expression forces the image embedding to carry what the expression can explain, which sharpens the
    alignment of the two modalities. Only the contrastive branch is used for prediction.

Loss (the authors' ``model/models.py``, ``CLIPModel_ViT_itm_v14_MSE.forward``)
    ``L = mean_i log(1 + l_i) + log(1 + MSE)`` where ``l_i`` is spot i's soft-target CLIP loss (BLEEP's: the mean
    of the cross-entropies of its expression row and its image row against targets
    ``softmax((img @ img.T + expr @ expr.T) / 2 * T)``; the authors multiply by T inside the target softmax, BLEEP
    divides, identical at the default T = 1) and MSE is the mean squared error between the reconstruction and the
    image embedding (no stop-gradient: both sides learn, as in the authors' code).

Reconstruction branch
    1. image tokens: ``n_image_tokens`` tokens of width ``projection_dim``; each element is kept with probability
       ``1 - mask_ratio`` and zeroed otherwise (element-wise masking, ``torch.rand(b, n, c) < mask_prob``);
    2. gene tokens: a self-normalising block Linear(g, n_gene_tokens * projection_dim) -> ELU -> AlphaDropout(0.25)
       (``SNN_Block(spot_embedding, 2048)`` in ``modules.py``), reshaped to ``n_gene_tokens`` tokens;
    3. multi-head cross-attention (``attention_heads`` heads) with the masked image tokens as queries and the
       gene tokens as keys and values, without residual (``first_attention``);
    4. ``fusion_layers`` passes through one fusion block (``Block_fusion_MCFN_2`` in ``vit_model.py``):
       pre-norm self-attention (``fusion_heads`` heads, qkv bias, output dropout 0.1) and MLP (ratio 4, GELU,
       dropout 0.1) with residuals, then a residual cross-modal unit (``cross_attention_MCFN_2``:
       q = Dropout(ReLU(Linear(x))), k = Dropout(ReLU(Linear(y))) with dropout 0.25, per head
       ``Linear(q) + softmax(q k^T / sqrt(d_h)) Linear(k)``). The authors' ``ModuleList`` holds the same block
       instance twice, so the two passes share their weights; so do they here;
    5. the mean over image tokens is the reconstruction of the image embedding.

Image tokens
    The paper's encoder is a ViT-B/32 (8 layers, 8 heads, trained from scratch) whose 50 output tokens (7 x 7
    patches + class token, 768-d) are mapped to 256-d by a linear layer (``latent_linear_768_2_256``) before masking,
    while the image embedding is the projection of their mean. sthist reads the encoder's ``token_grid x token_grid``
    tokens (:meth:`~sthist._engine.encoders.ImageEncoder.tokens`: the 49 patch tokens of a ViT-B/32 at 224 px without
    the class token; the last feature map of a CNN; the per-cell descriptors of ``hed-texture``), standardised in
    frozen mode, and follows the same path: image embedding = projection of their mean, reconstruction from the
    masked, linearly mapped tokens. The paper's encoder is ``encoder="vit_base_patch32_224(depth=8, num_heads=8)",
    pretrained=False, finetune=True``; the tokens then come from the same forward pass as the training step.
    ``cmrcnet_pooled`` (sthist's variant for encoders or cached features without token grids) makes its tokens
    from the pooled vector by a learned linear map.

Prediction
    Retrieval, as BLEEP (``inference.py``): image embeddings of the query patches against the bank of expression
    embeddings of the reference spots, cosine similarity, average of the top 50.

Defaults (sources in the authors' repository github.com/ngfufdrdh/CMRCNet)
    projection_dim 256, dropout 0.1, temperature 1.0 (``config.py``); mask_ratio 0.5 (``mask_prob=0.5``: the
    elements with ``rand < 0.5`` are kept), 8 gene tokens (2048 / 256), 4 heads in the first cross-attention, 8 heads
    and 2 passes in the fusion block (``models.py``), a 7 x 7 token grid (the ViT-B/32's patch tokens). Training
    (``recipe``): AdamW lr 1e-4, weight decay 1e-3, cosine decay to 1e-5 over 60 epochs (``WarmupCosineLR`` with no
    warm-up, i.e. ``CosineAnnealingLR``), batch 64, the epoch with the lowest validation loss kept (``train.py``);
    both hold out a random 20 % of every training section's spots for validation (``splits.py``; sthist's draw is
    seeded). The paper trains its ViT-B/32 from scratch on 224 x 224 patches with flips and 90 degree rotations and
    ImageNet normalisation (``dataset.py``), the fine-tuning inputs of sthist's recipe; sthist's default is frozen
    ``hed-fast`` tokens.

Citation
    Liu, J., Eckstein, M., Wang, Z., Feuerhake, F., Merhof, D. Spatial transcriptomics expression prediction from
    histopathology based on cross-modal mask reconstruction and contrastive learning. Medical Image Analysis (2025),
    arXiv:2506.08854.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from ..plan import Augment, Optim, Schedule, TrainPlan
from . import register
from ._base import Batch, Method, ProjectionHead, check_positive_ints


def soft_clip_loss_per_spot(img_emb: torch.Tensor, expr_emb: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """CMRCNet's soft-target CLIP loss of every spot, before the mean.

    Parameters
    ----------
    img_emb, expr_emb
        (B, p) embeddings of the same B spots.
    temperature
        T; logits are divided by T and the target similarities multiplied by T (the authors' ``models.py``).

    Returns
    -------
    (B,) losses ``(CE(expr row i) + CE(image row i)) / 2`` with ``logits = expr @ img.T / T`` and
    ``targets = softmax((img @ img.T + expr @ expr.T) / 2 * T)``.
    """
    logits = expr_emb @ img_emb.T / temperature
    targets = F.softmax((img_emb @ img_emb.T + expr_emb @ expr_emb.T) / 2 * temperature, dim=-1)
    spots_loss = -(targets * F.log_softmax(logits, dim=-1)).sum(dim=1)
    images_loss = -(targets.T * F.log_softmax(logits.T, dim=-1)).sum(dim=1)
    return (spots_loss + images_loss) / 2


class CrossModalUnit(nn.Module):
    """The authors' ``cross_attention_MCFN_2``: image tokens read gene tokens, output ``V1(q) + A V2(k)`` per head."""

    def __init__(self, dim: int, n_heads: int, dropout: float = 0.25):
        super().__init__()
        self.n_heads = n_heads
        self.fc_q = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout))
        self.fc_k = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout))
        self.fc_v1 = nn.Linear(dim, dim)
        self.fc_v2 = nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.view(b, n, self.n_heads, c // self.n_heads).transpose(1, 2)  # (B, h, n, c/h)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        q, k = self.fc_q(x), self.fc_k(y)
        v1, v2 = self._heads(self.fc_v1(q)), self._heads(self.fc_v2(k))
        qh, kh = self._heads(q), self._heads(k)
        attn = torch.softmax(qh @ kh.transpose(-2, -1) / (qh.shape[-1] ** 0.5), dim=-1)
        out = v1 + attn @ v2  # (B, h, n_img, c/h)
        return out.transpose(1, 2).reshape(x.shape)


class FusionBlock(nn.Module):
    """The authors' ``Block_fusion_MCFN_2``: pre-norm self-attention and MLP over image tokens, then cross-modal fusion."""

    def __init__(self, dim: int, n_heads: int, mlp_ratio: int = 4, dropout: float = 0.1):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, n_heads, bias=True, batch_first=True)
        self.attn_drop = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, dim * mlp_ratio),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(dim * mlp_ratio, dim),
            nn.Dropout(dropout),
        )
        self.cross = CrossModalUnit(dim, n_heads)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn_drop(self.attn(h, h, h, need_weights=False)[0])
        x = x + self.mlp(self.norm2(x))
        return x + self.cross(x, y)


@register("cmrcnet")
class CMRCNet(Method):
    """CMRCNet: BLEEP-style contrastive heads plus cross-modal masked reconstruction of the encoder's image tokens.

    The image embedding is the projection of the mean of the encoder's ``token_grid x token_grid`` tokens; the
    reconstruction branch masks those tokens, lets them read gene tokens and must reconstruct the image embedding.
    Prediction is by retrieval (cosine similarity, top-50 average in the authors' ``inference.py``); the
    reconstruction branch is used in training only. See the module docstring for the loss and the defaults.
    """

    prediction = "retrieval"
    needs_neighbors = False
    similarity = "cosine"
    consumes: ClassVar[tuple[str, ...]] = ("features", "tokens")
    recipe: ClassVar[TrainPlan] = TrainPlan(
        optimizer=Optim("adamw", lr=1e-4, weight_decay=1e-3),
        schedule=Schedule("cosine", min_lr=1e-5),
        batch_size=64,
        max_epochs=60,
        validation_fraction=0.2,
        validation_by_group=True,
        early_stopping_patience=None,
        select_on="val_loss",
        augmentation=Augment(jitter=(0.0, 0.0, 0.0)),
        normalisation="imagenet",
    )
    """The authors' ``config.py`` / ``train.py`` / ``splits.py``: AdamW (lr 1e-4, weight decay 1e-3), cosine decay to
    1e-5 over 60 epochs, batch 64, a random 20 % of every training section's spots held out for validation and the
    epoch with the lowest validation loss kept (no early stopping). Fine-tuning inputs of their ``dataset.py``: flips
    and quarter turns, no colour jitter, ImageNet's mean and standard deviation."""
    prediction_defaults: ClassVar[dict[str, Any]] = {"k": 50, "weighting": "average"}
    """The authors' ``inference.py``: plain average of the top 50 reference spots."""

    @dataclass
    class Config:
        """CMRCNet hyper-parameters (defaults from the authors' code; see the module docstring).

        Attributes
        ----------
        projection_dim
            Width of the joint space and of every token (256, ``config.py`` / ``models.py``).
        dropout
            Dropout in the projection heads (0.1, ``config.py``).
        temperature
            Temperature of the contrastive loss (1.0, ``config.py``).
        token_grid
            Side of the grid of encoder tokens (7: the 7 x 7 patch tokens of a ViT-B/32 at 224 px).
        n_gene_tokens
            Gene tokens made by the self-normalising block (8 = 2048 / 256, ``models.py``).
        mask_ratio
            Fraction of image-token elements zeroed in the reconstruction branch (0.5, ``mask_prob``).
        attention_heads
            Heads of the first image-to-gene cross-attention (4, ``models.py``).
        fusion_heads
            Heads of the fusion block (8, ``models.py``).
        fusion_layers
            Passes through the (weight-shared) fusion block (2, ``models.py``).
        """

        projection_dim: int = 256
        dropout: float = 0.1
        temperature: float = 1.0
        token_grid: int = 7
        n_gene_tokens: int = 8
        mask_ratio: float = 0.5
        attention_heads: int = 4
        fusion_heads: int = 8
        fusion_layers: int = 2

        def __post_init__(self):
            check_positive_ints(
                self, "projection_dim", "token_grid", "n_gene_tokens", "attention_heads", "fusion_heads"
            )
            if (
                isinstance(self.fusion_layers, bool)
                or not isinstance(self.fusion_layers, int)
                or self.fusion_layers < 0
            ):
                raise ValueError(f"fusion_layers must be a non-negative integer, got {self.fusion_layers!r}.")
            for name in ("attention_heads", "fusion_heads"):
                heads = getattr(self, name)
                if self.projection_dim % heads:
                    raise ValueError(
                        f"projection_dim={self.projection_dim} must be divisible by {name}={heads}; "
                        f"choose a projection_dim that is a multiple of {heads}."
                    )
            if isinstance(self.dropout, bool) or not 0.0 <= float(self.dropout) < 1.0:
                raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}.")
            if isinstance(self.mask_ratio, bool) or not 0.0 <= float(self.mask_ratio) < 1.0:
                raise ValueError(
                    f"mask_ratio must be in [0, 1) (the fraction of image-token values zeroed), got {self.mask_ratio!r}."
                )
            if isinstance(self.temperature, bool) or not float(self.temperature) > 0.0:
                raise ValueError(f"temperature must be > 0, got {self.temperature!r}.")

    def __init__(self, image_dim: int, n_genes: int, config: Config | None = None, *, token_dim: int = 0):
        super().__init__(image_dim, n_genes, config, token_dim=token_dim)
        cfg = self.config
        dim = cfg.projection_dim
        width = self._token_width()
        # contrastive branch (the only one used at prediction time)
        self.image_projection = ProjectionHead(width, dim, cfg.dropout)
        self.spot_projection = ProjectionHead(n_genes, dim, cfg.dropout)
        # reconstruction branch
        self._build_image_tokenizer(width, dim)
        self.gene_tokenizer = nn.Sequential(
            nn.Linear(n_genes, cfg.n_gene_tokens * dim), nn.ELU(), nn.AlphaDropout(p=0.25)
        )
        self.first_attention = nn.MultiheadAttention(dim, cfg.attention_heads, bias=True, batch_first=True)
        self.fusion = FusionBlock(dim, cfg.fusion_heads)

    def _token_width(self) -> int:
        if self.token_dim < 1:
            raise ValueError("method 'cmrcnet' reads encoder tokens: build it with token_dim= (the tokens' width).")
        return self.token_dim

    def _build_image_tokenizer(self, width: int, dim: int) -> None:
        # the authors' latent_linear_768_2_256: encoder tokens to the width of the fusion tokens
        self.token_projection = nn.Linear(width, dim)

    def _encoder_tokens(self, batch: Batch | None) -> torch.Tensor:
        if batch is None or batch.img_tokens is None:
            raise ValueError(
                "method 'cmrcnet' reads the encoder's token grid of each patch; the batch has none (pass images=, or "
                "tokens= with features=)."
            )
        return batch.img_tokens

    # ---- hooks ---------------------------------------------------------------------------------------------------
    def embed_image(self, img_feats: torch.Tensor, batch: Batch | None = None) -> torch.Tensor:
        return self.image_projection(self._encoder_tokens(batch).mean(dim=1))

    def embed_expression(self, expr: torch.Tensor, batch: Batch | None = None) -> torch.Tensor:
        return self.spot_projection(expr)

    def image_tokens(self, img_feats: torch.Tensor, batch: Batch | None = None) -> torch.Tensor:
        """(B, T, projection_dim) image tokens of the reconstruction branch (before masking)."""
        return self.token_projection(self._encoder_tokens(batch))

    def gene_tokens(self, expr: torch.Tensor) -> torch.Tensor:
        """(B, n_gene_tokens, projection_dim) tokens of the expression profile."""
        return self.gene_tokenizer(expr).view(expr.shape[0], self.config.n_gene_tokens, -1)

    def reconstruct(self, img_feats: torch.Tensor, expr: torch.Tensor, batch: Batch | None = None) -> torch.Tensor:
        """(B, projection_dim) reconstruction of the image embedding from masked image tokens and gene tokens."""
        tokens = self.image_tokens(img_feats, batch)
        keep = torch.rand(tokens.shape, device=tokens.device) >= self.config.mask_ratio
        tokens = tokens * keep.to(tokens.dtype)
        genes = self.gene_tokens(expr)
        latent = self.first_attention(tokens, genes, genes, need_weights=False)[0]
        for _ in range(self.config.fusion_layers):
            latent = self.fusion(latent, genes)
        return latent.mean(dim=1)

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        img = self.embed_image(batch.img_feats, batch)
        spot = self.embed_expression(batch.expression, batch)
        contrastive = torch.log1p(soft_clip_loss_per_spot(img.float(), spot.float(), self.config.temperature)).mean()
        recon = self.reconstruct(batch.img_feats, batch.expression, batch)
        reconstruction = torch.log1p(F.mse_loss(recon.float(), img.float()))
        return {"contrastive": contrastive, "reconstruction": reconstruction}


@register("cmrcnet_pooled")
class CMRCNetPooled(CMRCNet):
    """CMRCNet on one pooled feature vector per patch: image tokens are learned linear views of it.

    sthist's CMRCNet before its recipe was made faithful, for encoders or cached features without token grids: a
    learned linear tokeniser maps the pooled encoder output to ``n_image_tokens`` tokens, the image embedding is the
    projection of the pooled output, and training keeps the lr constant with early stopping after 10 epochs
    without a lower validation loss. The fidelity table of the method page compares the two on her2st.
    """

    variant_of: ClassVar[str | None] = "cmrcnet"

    consumes: ClassVar[tuple[str, ...]] = ("features",)
    recipe: ClassVar[TrainPlan] = TrainPlan(
        optimizer=Optim("adamw", lr=1e-4, weight_decay=1e-3), batch_size=64, max_epochs=60
    )

    @dataclass
    class Config(CMRCNet.Config):
        """CMRCNet's hyper-parameters plus the number of image tokens made from the pooled vector.

        Attributes
        ----------
        n_image_tokens
            Image tokens made from the encoder output by a learned linear tokeniser (8).
        """

        n_image_tokens: int = 8

        def __post_init__(self):
            super().__post_init__()
            check_positive_ints(self, "n_image_tokens")

    def _token_width(self) -> int:
        return self.image_dim

    def _build_image_tokenizer(self, width: int, dim: int) -> None:
        self.image_tokenizer = nn.Linear(width, self.config.n_image_tokens * dim)

    def embed_image(self, img_feats: torch.Tensor, batch: Batch | None = None) -> torch.Tensor:
        return self.image_projection(img_feats)

    def image_tokens(self, img_feats: torch.Tensor, batch: Batch | None = None) -> torch.Tensor:
        """(B, n_image_tokens, projection_dim) tokens of the encoder output."""
        return self.image_tokenizer(img_feats).view(img_feats.shape[0], self.config.n_image_tokens, -1)
