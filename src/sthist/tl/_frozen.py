"""Inputs of the predictors that read frozen image features (the controls and ``dual_knn``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._anndata import image_features, patch_geometry

if TYPE_CHECKING:
    from anndata import AnnData

    from .._anndata import Features
    from .._engine.base import ModelInputs


def seed_of(random_state: Any) -> int | None:
    """``random_state`` (an int, a numpy Generator or ``None``) as the int seed the engine takes."""
    if random_state is None:
        return None
    if isinstance(random_state, np.random.Generator):
        return int(random_state.integers(2**31 - 1))
    if isinstance(random_state, bool) or not isinstance(random_state, int | np.integer):
        raise TypeError(f"random_state must be an int, a numpy Generator or None, got {type(random_state).__name__}.")
    return int(random_state)


def frozen_inputs(
    adata: AnnData,
    *,
    features_key: str | None,
    encoder: str,
    pretrained: bool,
    checkpoint: str | Path | None,
    patches_key: str,
    device: str | None,
    progress: bool,
    targets: dict[str, Any] | None = None,
    **fields: Any,
) -> tuple[Features, ModelInputs]:
    """Features of a frozen encoder (given by ``features_key``, cached, or computed) and the inputs they record.

    ``targets`` is the record of the expression the model is fitted on (``sthist._anndata.fit_expression``);
    ``fields`` sets more :class:`~sthist._engine.base.ModelInputs` fields (e.g. ``needs_neighbors=True``).
    """
    from .._engine.base import ModelInputs

    feats = image_features(
        adata,
        encoder="" if features_key is not None else encoder,
        pretrained=pretrained,
        checkpoint=checkpoint,
        patches_key=patches_key,
        features_key=features_key,
        device=device,
        progress=progress,
    )
    p = feats.params
    size, mpp = patch_geometry(adata, patches_key if feats.computed else feats.key)
    inputs = ModelInputs(
        encoder=str(p.get("encoder") or ""),
        pretrained=bool(p.get("pretrained")),
        checkpoint=p.get("checkpoint") or None,
        weights_sha256=p.get("weights_sha256") or None,
        feature_dim=int(feats.values.shape[1]),
        patch_size=size,
        mpp=mpp,
        targets=targets,
    )
    return feats, dataclasses.replace(inputs, **fields) if fields else inputs
