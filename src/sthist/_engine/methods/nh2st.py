"""NH2ST: dual-scale contrastive learning with a query and a neighbour branch (Qu et al., MICCAI 2025).

Idea
----
A spot is seen at two scales. The *query branch* encodes the target spot's image features and its expression with
two shared encoders (pathology ``phi_p``, expression ``phi_g``); a cross-attention module refines each modality by
the other, and an InfoNCE loss aligns the refined pair. The *neighbour branch* takes the target and its nearest
spots, links them in a hypergraph (one hyperedge per node: the node and the ``hyperedge_size`` nodes whose image
features are most similar to it), runs two hypergraph convolutions over the image encodings and, separately, over
the expression encodings, mean-pools the nodes, refines the two pooled vectors by the same cross-attention module
and aligns them with a second InfoNCE loss. A decoder regresses expression from image features.

Loss
----
``MSE(decoder(image), expression) + weight_query * InfoNCE_query + weight_neighbor * InfoNCE_neighbor``, where each
InfoNCE is the authors' variant: cosine similarities / temperature, off-diagonal logits scaled by
``negative_weight`` (0.1), cross-entropy towards the diagonal (``NGHist2ST.contrastive_loss``).

Prediction
----------
By regression: ``predict`` = decoder(``h_p``) where ``h_p = phi_p(target features)``, as in the authors' code; the
neighbour branch shapes ``phi_p`` in training only. With ``neighbor_context=True`` (the ``nh2st_ctx`` variant) the
decoder reads ``h_p + n_p``, ``n_p`` the image-only neighbour-branch vector (hypergraph over the image encodings of
the target and its neighbours). Only image features are used: neither the target's nor the neighbours' expression
enters :meth:`NH2ST.predict` or :meth:`NH2ST.embed_image`.

Sources of the defaults (the authors' repository github.com/MCPathology/NH2ST)
------------------------------------------------------------------------------
* ``README.md`` (model config): ``emb_dim`` 512, ``depth1`` 1, ``num_heads1`` 8, ``mlp_ratio1`` 1, ``dropout1`` 0.5,
  ``temperature1 = temperature2 = 0.05``, ``loss_ratio1`` 1.0, ``loss_ratio2`` 0.5; training: Adam lr 5e-4, batch 8,
  200 epochs, early stopping on validation PCC (patience 20).
* ``datasets/st_data_git_ready.py`` (``create_hypergraph``): the neighbourhood is the 9 spots nearest to the target,
  the target included, i.e. ``n_neighbors = 8`` others (a 3 x 3 window on a square grid; the config's
  ``res_neighbor: (5, 5)`` is not used by the hypergraph code).
* ``models/NGHist2ST.py``: ``build_hypergraph`` (top-3 cosine-similar nodes + the node itself per hyperedge, computed
  on the encoder features), ``contrastive_loss`` (``negative_weight`` 0.1), the expression encoder
  Linear(g, 512) -> Linear(512, 512), one cross-attention module shared by the four refinements (refined image =
  attention(query image, key/value expression), then refined expression = attention(query expression, key/value
  refined image)), loss = MSE + 1.0 * query InfoNCE + 0.5 * neighbour InfoNCE.
* ``models/module.py``: ``HGNN`` / ``EXPNN`` = two ``HypergraphConv`` layers (hidden 1024, output 512) with ReLU and a
  mean over nodes; ``CrossEncoder`` = pre-norm multi-head cross-attention + feed-forward (GELU) with residuals, then a
  LayerNorm; ``Decoder`` = Linear(512, 256) -> Linear(256, g) with no activation in between; the decoder reads the
  query branch's image encoding (``forward``: ``self.decoder(x)`` with ``x`` the target's fc output).

Training recipe (``recipe``, the authors' ``configure_optimizers`` and ``README.md`` config)
-------------------------------------------------------------------------------------------------
Adam (lr 5e-4, no weight decay) with ``StepLR(step_size=50, gamma=0.9)`` stepped per epoch, batch 8 (so the InfoNCE
terms contrast each spot with 7 negatives), at most 200 epochs, early stopping after 20 epochs without a higher
validation ``R`` (``monitor: R``: the mean Pearson r of the 50 best-predicted genes) and the best of them kept
(``select_on="val_pearson_top50"``). The authors validate on the held-out test section; sthist validates on 10 % of
the training spots, so that the test section is never seen. Fine-tuning inputs: flips and quarter turns, no colour
jitter, ImageNet's mean and standard deviation.

Departures (frozen encoder features instead of a fine-tuned ResNet-18)
----------------------------------------------------------------------
* ``phi_p`` is the frozen encoder followed by one trainable Linear(d, ``embed_dim``) (the authors' ``fc`` on the
  flattened ResNet map). It is shared by the target and its neighbours, so the neighbour branch trains the image
  encoding the decoder reads, as the shared ResNet does in the paper; the hypergraph layers then map
  ``embed_dim -> hidden_dim -> embed_dim``. With ``encoder="resnet18", finetune=True`` the ResNet-18 trains end to
  end through this layer.
* Each branch holds one token per modality, so the cross-attention's softmax runs over a single key: the refined
  image vector is ``h_p`` plus a function of the expression, and the InfoNCE terms can be solved through the
  expression side. Kept as published.
* The authors smooth the targets (``smooth_exp``), which sthist leaves to the user.

``nh2st_ctx`` (sthist's variant) decodes ``h_p + n_p`` (the image-only neighbour context) and trains with sthist's
frozen-feature recipe (AdamW 1e-3, batch 256, early stopping on the validation loss).

Reference: Qu, Wu, Di, Gao, Su, Song, Fan. Spatially Gene Expression Prediction using Dual-Scale Contrastive Learning.
MICCAI 2025, arXiv:2506.23827.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from ..plan import Augment, Optim, Schedule, TrainPlan
from . import register
from ._base import Batch, Method, check_positive_ints


def weighted_info_nce(
    a: torch.Tensor, b: torch.Tensor, temperature: float = 0.05, negative_weight: float = 0.1
) -> torch.Tensor:
    """NH2ST's InfoNCE: rows of ``a`` must pick their own row of ``b`` among the batch.

    Parameters
    ----------
    a, b
        (B, p) embeddings of the same B spots (L2-normalised here).
    temperature
        Divides the cosine similarities (0.05 in NH2ST).
    negative_weight
        Factor on the off-diagonal (negative) logits (0.1 in the authors' ``contrastive_loss``).

    Returns
    -------
    Scalar: mean over rows of ``-log softmax(l_i)[i]`` with ``l_ij = cos(a_i, b_j) / T`` for ``j == i`` and
    ``negative_weight * cos(a_i, b_j) / T`` otherwise.
    """
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / temperature
    eye = torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)
    logits = torch.where(eye, logits, logits * negative_weight)
    return F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device))


def neighbourhood_hypergraph(feats: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Incidence matrices of NH2ST's feature-similarity hypergraphs, one per neighbourhood.

    Parameters
    ----------
    feats
        (B, n, d) features of the n nodes of each neighbourhood (the target first, then its neighbours).
    mask
        (B, n) True where a node exists.
    k
        Nodes joined to each node's hyperedge: its ``k`` most cosine-similar other existing nodes.

    Returns
    -------
    (B, n, n) float incidence ``H[b, v, e] = 1`` when node v belongs to hyperedge e; hyperedge e holds node e and
    its ``k`` most similar nodes; missing nodes belong to no hyperedge and have none of their own.
    """
    b, n, _ = feats.shape
    with torch.autocast(device_type=feats.device.type, enabled=False):  # float32 similarities in training and inference
        x = F.normalize(feats.detach().float(), dim=-1)
        sim = x @ x.transpose(1, 2)  # (B, n, n): sim[b, e, v] of hyperedge owner e and candidate v
    eye = torch.eye(n, dtype=torch.bool, device=feats.device)
    valid = mask.unsqueeze(1) & mask.unsqueeze(2) & ~eye
    sim = sim.masked_fill(~valid, float("-inf"))
    k = min(int(k), n - 1)
    inc = torch.zeros(b, n, n, device=feats.device)  # inc[b, e, v] (transposed below)
    if k > 0:
        top, idx = torch.topk(sim, k, dim=-1)
        inc.scatter_(-1, idx, torch.isfinite(top).float())
    inc = inc + (eye.unsqueeze(0) & mask.unsqueeze(-1)).float()  # the owner belongs to its hyperedge
    return inc.transpose(1, 2).contiguous()


class HypergraphConv(nn.Module):
    """Hypergraph convolution ``X' = D_v^-1 H B_e^-1 H^T X Theta + bias`` (unit hyperedge weights).

    The operator of Bai et al. (2021) as in PyTorch Geometric's ``HypergraphConv`` used by NH2ST, written densely for
    small batched hypergraphs; nodes in no hyperedge get ``bias``. ``lin`` (Theta) acts on each node alone, so it can
    be applied before :meth:`propagate` once per distinct spot.
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.lin = nn.Linear(in_dim, out_dim, bias=False)
        self.bias = nn.Parameter(torch.zeros(out_dim))

    def propagate(self, xw: torch.Tensor, inc: torch.Tensor) -> torch.Tensor:
        """Aggregate node values ``xw`` (B, V, c) = X Theta: nodes -> hyperedges (mean) -> nodes (mean), plus bias."""
        inc = inc.to(xw.dtype)
        edge_deg = inc.sum(dim=1).clamp_min(1.0)  # (B, E)
        node_deg = inc.sum(dim=2).clamp_min(1.0)  # (B, V)
        edges = inc.transpose(1, 2) @ xw / edge_deg.unsqueeze(-1)
        return inc @ edges / node_deg.unsqueeze(-1) + self.bias

    def forward(self, x: torch.Tensor, inc: torch.Tensor) -> torch.Tensor:
        return self.propagate(self.lin(x), inc)


class HypergraphEncoder(nn.Module):
    """Two hypergraph convolutions with ReLU, then the mean over the existing nodes (NH2ST's HGNN / EXPNN).

    :meth:`forward` takes ``xw = conv1.lin(x)``, the first layer's per-node linear map, so that callers can compute it
    once per distinct spot.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.conv1 = HypergraphConv(in_dim, hidden_dim)
        self.conv2 = HypergraphConv(hidden_dim, out_dim)

    def forward(self, xw: torch.Tensor, inc: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1.propagate(xw, inc))
        x = F.relu(self.conv2(x, inc))
        m = mask.unsqueeze(-1).to(x.dtype)
        return (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


class CrossAttention(nn.Module):
    """Pre-norm multi-head cross-attention and feed-forward layers with residuals, then a LayerNorm.

    Queries come from ``x_q`` (B, Tq, p), keys and values from ``x_kv`` (B, Tk, p); one LayerNorm per layer
    normalises both, as in NH2ST's ``CrossEncoder`` / ``TWOFusionEncoder``.
    """

    def __init__(self, dim: int, depth: int = 1, heads: int = 8, mlp_dim: int = 512, dropout: float = 0.5):
        super().__init__()
        if dim % heads:
            raise ValueError(f"embed_dim={dim} must be a multiple of n_heads={heads}.")
        self.heads = heads
        self.layers = nn.ModuleList()
        for _ in range(depth):
            self.layers.append(
                nn.ModuleDict(
                    {
                        "norm_attn": nn.LayerNorm(dim),
                        "to_q": nn.Linear(dim, dim, bias=False),
                        "to_kv": nn.Linear(dim, 2 * dim, bias=False),
                        "to_out": nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout)),
                        "norm_ff": nn.LayerNorm(dim),
                        "ff": nn.Sequential(
                            nn.Linear(dim, mlp_dim),
                            nn.GELU(),
                            nn.Dropout(dropout),
                            nn.Linear(mlp_dim, dim),
                            nn.Dropout(dropout),
                        ),
                    }
                )
            )
        self.norm = nn.LayerNorm(dim)

    def _attend(self, layer: nn.ModuleDict, q_in: torch.Tensor, kv_in: torch.Tensor) -> torch.Tensor:
        b, tq, p = q_in.shape
        h = self.heads
        q = layer["to_q"](q_in).view(b, tq, h, p // h).transpose(1, 2)
        k, v = layer["to_kv"](kv_in).chunk(2, dim=-1)
        k = k.view(b, -1, h, p // h).transpose(1, 2)
        v = v.view(b, -1, h, p // h).transpose(1, 2)
        w = torch.softmax(q @ k.transpose(-1, -2) * (p // h) ** -0.5, dim=-1)
        return layer["to_out"]((w @ v).transpose(1, 2).reshape(b, tq, p))

    def forward(self, x_q: torch.Tensor, x_kv: torch.Tensor) -> torch.Tensor:
        squeeze = x_q.dim() == 2
        if squeeze:
            x_q = x_q.unsqueeze(1)
        if x_kv.dim() == 2:
            x_kv = x_kv.unsqueeze(1)
        for layer in self.layers:
            norm = layer["norm_attn"]
            x_q = x_q + self._attend(layer, norm(x_q), norm(x_kv))
            x_q = x_q + layer["ff"](layer["norm_ff"](x_q))
        x_q = self.norm(x_q)
        return x_q.squeeze(1) if squeeze else x_q


@register("nh2st")
class NH2ST(Method):
    """NH2ST: query and neighbour branches, cross-attention, dual-scale InfoNCE, regression decoder.

    See the module docstring for the architecture, the loss, the defaults and their sources.
    """

    prediction = "regression"
    needs_neighbors = True
    needs_coords = False
    batch_by_group = False
    similarity = "cosine"
    recipe: ClassVar[TrainPlan] = TrainPlan(
        optimizer=Optim("adam", lr=5e-4, weight_decay=0.0),
        schedule=Schedule("step", step_size=50, gamma=0.9),
        batch_size=8,
        max_epochs=200,
        validation_fraction=0.1,
        early_stopping_patience=20,
        select_on="val_pearson_top50",
        drop_last=False,
        augmentation=Augment(jitter=(0.0, 0.0, 0.0)),
        normalisation="imagenet",
    )
    """The authors' recipe: Adam 5e-4, StepLR(50, 0.9), batch 8, <= 200 epochs, early stopping (patience 20) and
    model selection on the mean Pearson r of the 50 best-predicted genes (the ``R`` of ``NGHist2ST.py``; the authors
    compute it on the held-out fold, sthist on 10 % of the training spots). Fine-tuning inputs of their data set:
    flips and a 90 degree turn with probability 0.5 (the same distribution over the eight flips and quarter turns as
    sthist's quarter turns with flips), no colour jitter, ImageNet's mean and standard deviation."""

    @dataclass
    class Config:
        """NH2ST hyper-parameters (defaults from the authors' repository, see the module docstring).

        Attributes
        ----------
        n_neighbors
            Spatial neighbours joined to the target in the neighbour branch (8: the 9 nearest spots with the target,
            ``create_hypergraph``).
        hyperedge_size
            Most image-similar nodes joined to each node's hyperedge (3, ``build_hypergraph``).
        embed_dim
            Width of the shared encodings and of the cross-attention (512, ``emb_dim``).
        hidden_dim
            Hidden width of the hypergraph encoders (1024, ``HGNN(.., 1024, 512)``).
        decoder_dim
            Hidden width of the linear decoder (256, ``Decoder``).
        depth, n_heads, mlp_ratio, dropout
            Cross-attention layers (1), heads (8), feed-forward width / ``embed_dim`` (1.0) and dropout (0.5)
            (``depth1``, ``num_heads1``, ``mlp_ratio1``, ``dropout1``).
        temperature_query, temperature_neighbor
            InfoNCE temperatures of the two scales (0.05, 0.05; ``temperature1``, ``temperature2``).
        weight_query, weight_neighbor
            Weights of the two InfoNCE terms next to the MSE (1.0, 0.5; ``loss_ratio1``, ``loss_ratio2``).
        negative_weight
            Factor on the negative logits of the InfoNCE (0.1, ``contrastive_loss``).
        neighbor_context
            Add the image-only neighbour-branch vector to the decoder input (False: the authors' code decodes the
            target's encoding alone; True in sthist's ``nh2st_ctx`` variant).
        """

        n_neighbors: int = 8
        hyperedge_size: int = 3
        embed_dim: int = 512
        hidden_dim: int = 1024
        decoder_dim: int = 256
        depth: int = 1
        n_heads: int = 8
        mlp_ratio: float = 1.0
        dropout: float = 0.5
        temperature_query: float = 0.05
        temperature_neighbor: float = 0.05
        weight_query: float = 1.0
        weight_neighbor: float = 0.5
        negative_weight: float = 0.1
        neighbor_context: bool = False

        def __post_init__(self):
            check_positive_ints(
                self, "n_neighbors", "hyperedge_size", "embed_dim", "hidden_dim", "decoder_dim", "depth", "n_heads"
            )
            if self.embed_dim % self.n_heads:
                raise ValueError(
                    f"embed_dim={self.embed_dim} must be a multiple of n_heads={self.n_heads}; "
                    f"e.g. embed_dim={self.n_heads * max(1, round(self.embed_dim / self.n_heads))}."
                )
            if not float(self.mlp_ratio) > 0:
                raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio!r}.")
            if not 0.0 <= float(self.dropout) < 1.0:
                raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}.")
            for name in ("temperature_query", "temperature_neighbor"):
                if not float(getattr(self, name)) > 0.0:
                    raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}.")
            for name in ("weight_query", "weight_neighbor", "negative_weight"):
                if not float(getattr(self, name)) >= 0.0:
                    raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}.")
            if not isinstance(self.neighbor_context, bool):
                raise TypeError(f"neighbor_context must be True or False, got {self.neighbor_context!r}.")

    def __init__(self, image_dim: int, n_genes: int, config: Config | None = None):
        super().__init__(image_dim, n_genes, config)
        cfg = self.config
        p = cfg.embed_dim
        # shared encoders of both branches: phi_p (trainable tail of the frozen image encoder) and phi_g
        self.image_encoder = nn.Linear(image_dim, p)
        self.expression_encoder = nn.Sequential(nn.Linear(n_genes, p), nn.Linear(p, p))
        # neighbour branch: hypergraph encoders of the image and of the expression encodings
        self.neighbor_image_encoder = HypergraphEncoder(p, cfg.hidden_dim, p)
        self.neighbor_expression_encoder = HypergraphEncoder(p, cfg.hidden_dim, p)
        # one cross-attention module shared by the four refinements
        self.cross_attention = CrossAttention(
            p, depth=cfg.depth, heads=cfg.n_heads, mlp_dim=max(1, int(p * cfg.mlp_ratio)), dropout=cfg.dropout
        )
        self.decoder = nn.Sequential(nn.Linear(p, cfg.decoder_dim), nn.Linear(cfg.decoder_dim, n_genes))

    # ---- the neighbourhood -----------------------------------------------------------------------------------------
    @staticmethod
    def _nodes(target: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
        """(B, 1 + K, c) node values: the target first, then its K neighbours."""
        return torch.cat([target.unsqueeze(1), neighbours.to(target.dtype)], dim=1)

    def _neighbourhood(self, img_feats: torch.Tensor, batch: Batch):
        """Node mask (B, 1 + K), hypergraph incidence (B, 1 + K, 1 + K) and a per-distinct-spot mapper.

        Everything here comes from image features and spot indices only.
        """
        if batch is None or batch.neighbor_img_feats is None or batch.neighbor_mask is None:
            raise ValueError(
                "NH2ST needs the spatial neighbours of every spot: pass coords= (x, y per spot) so that batches "
                "carry neighbor_img_feats and neighbor_mask."
            )
        b = img_feats.shape[0]
        ones = torch.ones(b, 1, dtype=torch.bool, device=img_feats.device)
        mask = torch.cat([ones, batch.neighbor_mask.to(img_feats.device).bool()], dim=1)
        inc = neighbourhood_hypergraph(
            self._nodes(img_feats, batch.neighbor_img_feats), mask, self.config.hyperedge_size
        )
        return mask, inc, _spot_mapper(batch, mask)

    def _image_side(self, img_feats: torch.Tensor, batch: Batch):
        """Target encoding h_p (B, p), neighbour-branch image vector n_p (B, p), node mask, incidence, mapper."""
        mask, inc, per_spot = self._neighbourhood(img_feats, batch)
        nodes = self._nodes(img_feats, batch.neighbor_img_feats)
        enc = self.neighbor_image_encoder
        h_nodes, xw = per_spot(_encode(self.image_encoder, enc.conv1.lin), nodes)
        return h_nodes[:, 0], enc(xw, inc, mask), mask, inc, per_spot

    def _decoder_input(self, h_p: torch.Tensor, n_p: torch.Tensor) -> torch.Tensor:
        return h_p + n_p if self.config.neighbor_context else h_p

    # ---- hooks ---------------------------------------------------------------------------------------------------
    def embed_image(self, img_feats: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The decoder's input: ``h_p`` (or ``h_p + n_p``), from image features of the spot and its neighbours only."""
        if not self.config.neighbor_context:
            return self.image_encoder(img_feats)  # the authors' decoder input; the neighbour branch trains phi_p only
        h_p, n_p, *_ = self._image_side(img_feats, batch)
        return self._decoder_input(h_p, n_p)

    def embed_expression(self, expr: torch.Tensor, batch: Batch | None = None) -> torch.Tensor:
        """The shared expression encoding ``h_g = phi_g(expression)`` of the spots."""
        return self.expression_encoder(expr)

    def predict(self, img_feats: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Expression (B, g) regressed from the image features of the spots and of their neighbours."""
        return self.decoder(self.embed_image(img_feats, batch))

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        cfg = self.config
        if batch.expression is None or batch.neighbor_expression is None:
            raise ValueError("NH2ST trains on the expression of the spots and of their neighbours; none was given.")
        h_p, n_p, mask, inc, per_spot = self._image_side(batch.img_feats, batch)
        pred = self.decoder(self._decoder_input(h_p, n_p))
        mse = F.mse_loss(pred.float(), batch.expression.float())

        # the shared expression encoder phi_g on the target and its neighbours (once per distinct spot)
        enc = self.neighbor_expression_encoder
        nodes = self._nodes(batch.expression, batch.neighbor_expression)
        g_nodes, xw = per_spot(_encode(self.expression_encoder, enc.conv1.lin), nodes)

        # query branch: refine the image by the expression, then the expression by the refined image; align the pair
        h_g = g_nodes[:, 0]
        z_p = self.cross_attention(h_p, h_g)
        z_g = self.cross_attention(h_g, z_p)
        loss_query = weighted_info_nce(z_p.float(), z_g.float(), cfg.temperature_query, cfg.negative_weight)

        # neighbour branch: hypergraph over the expression encodings of the same nodes, with the same hyperedges
        n_g = enc(xw, inc, mask)
        zn_p = self.cross_attention(n_p, n_g)
        zn_g = self.cross_attention(n_g, zn_p)
        loss_neighbor = weighted_info_nce(zn_p.float(), zn_g.float(), cfg.temperature_neighbor, cfg.negative_weight)

        return {"mse": mse, "query": cfg.weight_query * loss_query, "neighbor": cfg.weight_neighbor * loss_neighbor}


def _encode(encoder: nn.Module, lin: nn.Module):
    """``x -> (encoder(x), lin(encoder(x)))``: a node's encoding and its first hypergraph layer's linear map."""

    def fn(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = encoder(x)
        return h, lin(h)

    return fn


def _spot_mapper(batch: Batch, mask: torch.Tensor):
    """A function ``per_spot(fn, nodes)`` applying a per-node map ``fn`` once per distinct spot of the neighbourhoods.

    A spot is often the neighbour of several spots of a batch; the engine gives every copy the same features and
    expression, so the per-node layers (``phi_p``, ``phi_g`` and the first hypergraph layer's linear map) are computed
    once per distinct spot and gathered back: the same values and gradients as computing every copy, several times
    faster. ``fn`` maps (n, c) rows to a tuple of (n, .) tensors; ``per_spot`` returns them as (B, 1 + K, .).
    Without spot indices (hand-made batches) every node is computed.
    """
    inv = first = None
    if batch.index is not None and batch.neighbor_index is not None:
        ids = torch.cat([batch.index.reshape(-1, 1), batch.neighbor_index], dim=1).to(mask.device)
        ids = torch.where(mask, ids, torch.full_like(ids, -1))  # missing neighbours: one all-zero "spot"
        _, inv = torch.unique(ids.reshape(-1), return_inverse=True)
        order = torch.arange(inv.numel(), device=inv.device)
        first = torch.full((int(inv.max()) + 1,), inv.numel(), dtype=torch.long, device=inv.device)
        first = first.scatter_reduce(0, inv, order, reduce="amin")  # the first copy of every distinct spot

    def per_spot(fn, nodes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b, n, c = nodes.shape
        flat = nodes.reshape(b * n, c)
        outs = fn(flat) if inv is None else tuple(o[inv] for o in fn(flat[first]))
        return tuple(o.reshape(b, n, -1) for o in outs)

    return per_spot


@register("nh2st_ctx")
class NH2STContext(NH2ST):
    """NH2ST whose decoder also reads the image-only neighbour context, trained with sthist's frozen-feature recipe.

    The decoder input is ``h_p + n_p`` (the target's encoding plus the hypergraph vector of its neighbourhood's image
    encodings) and training uses AdamW 1e-3, batch 256, early stopping on the validation loss. sthist's NH2ST before
    its recipe was made faithful; the fidelity table of the method page compares the two on
    her2st.
    """

    variant_of: ClassVar[str | None] = "nh2st"

    recipe: ClassVar[TrainPlan] = TrainPlan()

    @dataclass
    class Config(NH2ST.Config):
        """NH2ST's hyper-parameters with ``neighbor_context=True``."""

        neighbor_context: bool = True
