"""Token grids from timm backbones: a fixed ``grid x grid`` raster of feature vectors per image.

ViT-like models (``forward_features`` gives (B, N, D)) lose their prefix tokens (class, register, distillation:
``num_prefix_tokens``); the patch tokens are laid out on their spatial grid. CNNs (``forward_features`` gives
(B, C, h, w), or (B, h, w, C) for models with ``output_fmt == "NHWC"``) give their last feature map directly. Either
map is average-pooled to ``grid x grid`` cells (``adaptive_avg_pool2d``) and flattened in row-major order.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


def check_grid(grid: Any) -> int:
    """Return ``grid`` as int, raising a :class:`ValueError` unless it is a positive integer."""
    if isinstance(grid, bool) or not isinstance(grid, int | np.integer) or grid < 1:
        raise ValueError(
            f"grid must be a positive integer (the tokens of a patch form a grid x grid raster, e.g. grid=7 gives 49 "
            f"tokens), got {grid!r}."
        )
    return int(grid)


def _patch_grid(model: nn.Module, x: torch.Tensor, n_tokens: int, spec: str) -> tuple[int, int]:
    """Rows and columns of the ``n_tokens`` patch tokens a ViT-like ``model`` gives for the images ``x``."""
    pe = getattr(model, "patch_embed", None)
    size = (int(x.shape[-2]), int(x.shape[-1]))
    candidates = []
    if pe is not None and hasattr(pe, "dynamic_feat_size") and getattr(pe, "patch_size", None) is not None:
        candidates.append(tuple(int(v) for v in pe.dynamic_feat_size(size)))
    if pe is not None and getattr(pe, "grid_size", None) is not None:
        candidates.append(tuple(int(v) for v in pe.grid_size))
    side = math.isqrt(n_tokens)
    candidates.append((side, side))
    for rows, cols in candidates:
        if rows * cols == n_tokens:
            return rows, cols
    raise ValueError(
        f"the {n_tokens} patch tokens of encoder {spec!r} (after {int(getattr(model, 'num_prefix_tokens', 0) or 0)} "
        f"prefix tokens) for {size[0]} x {size[1]} pixel inputs do not form a rectangular grid, so they cannot be "
        "pooled to a token grid."
    )


def feature_map(model: nn.Module, x: torch.Tensor, spec: str) -> torch.Tensor:
    """The last feature map (B, C, h, w) of a timm ``model`` for normalised images ``x`` (B, 3, H, W).

    Raises
    ------
    TypeError
        ``model`` has no ``forward_features`` (not a timm model) or it does not return a tensor.
    ValueError
        Its output is neither a token sequence (B, N, D) nor a feature map (B, C, h, w).
    """
    forward_features = getattr(model, "forward_features", None)
    if not callable(forward_features):
        raise TypeError(
            f"encoder {spec!r} has no forward_features, so it cannot give token grids; token grids need a timm model "
            "or 'hed-texture'."
        )
    return as_feature_map(model, forward_features(x), x, spec)


def as_feature_map(model: nn.Module, feats: Any, x: torch.Tensor, spec: str) -> torch.Tensor:
    """The output ``feats`` of ``model.forward_features(x)`` as a feature map (B, C, h, w); see :func:`feature_map`."""
    if not isinstance(feats, torch.Tensor):
        raise TypeError(
            f"forward_features of encoder {spec!r} returned {type(feats).__name__}, not a tensor, so it cannot give "
            "token grids."
        )
    if feats.ndim == 4:
        if getattr(model, "output_fmt", "NCHW") == "NHWC":
            feats = feats.permute(0, 3, 1, 2)
        return feats
    if feats.ndim == 3:
        n_prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
        patch_tokens = feats[:, n_prefix:]
        rows, cols = _patch_grid(model, x, int(patch_tokens.shape[1]), spec)
        b, _, d = patch_tokens.shape
        return patch_tokens.transpose(1, 2).reshape(b, d, rows, cols)
    raise ValueError(
        f"forward_features of encoder {spec!r} gave shape {tuple(feats.shape)}; token grids need a token sequence "
        "(B, N, D) or a feature map (B, C, h, w)."
    )


def grid_tokens(model: nn.Module, x: torch.Tensor, grid: int, spec: str, *, feats: Any = None) -> torch.Tensor:
    """Tokens (B, grid * grid, C) of a timm ``model``: its feature map average-pooled to ``grid x grid``, row-major.

    Parameters
    ----------
    model
        A timm model.
    x
        Normalised images (B, 3, H, W) at the model's input size.
    grid
        Cells per side (a positive integer, already checked); at most the feature map's height and width.
    spec
        The encoder spec, for messages.
    feats
        ``model.forward_features(x)`` when the caller has it already (one forward pass for pooled features and
        tokens).

    Raises
    ------
    ValueError
        ``grid`` is finer than the feature map (the tokens would only repeat each other).
    """
    fmap = feature_map(model, x, spec) if feats is None else as_feature_map(model, feats, x, spec)
    rows, cols = int(fmap.shape[-2]), int(fmap.shape[-1])
    if grid > rows or grid > cols:
        raise ValueError(
            f"grid={grid} is finer than the {rows} x {cols} feature map that encoder {spec!r} gives for "
            f"{int(x.shape[-2])} x {int(x.shape[-1])} pixel inputs; use grid <= {min(rows, cols)} "
            "(or larger patches, for encoders that take any input size)."
        )
    return F.adaptive_avg_pool2d(fmap, grid).flatten(2).transpose(1, 2)
