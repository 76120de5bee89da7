"""Embed H&E patches with an image encoder."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .. import _constants as C
from .._docs import inject_docs
from .._logging import info
from .._validate import check_adata, check_positive_int

if TYPE_CHECKING:
    from anndata import AnnData

DEFAULT_ENCODER = "hed-texture"  # kept equal to sthist._engine.encoders.DEFAULT_ENCODER (not imported: no torch here)


def _patch_geometry(adata: AnnData, patches_key: str) -> dict:
    """Patch size and resolution the patches were extracted at (recorded so predictions reuse them)."""
    entry = adata.uns.get(patches_key)
    params = entry.get("params", {}) if isinstance(entry, dict) else {}
    return {k: params[k] for k in ("patch_size", "mpp") if k in params and params[k] is not None}


def default_key(encoder: str) -> str:
    """``obsm`` key of an encoder's embeddings: ``'X_<encoder name>'``."""
    from .._engine.encoders import encoder_key

    return f"X_{encoder_key(encoder)}"


def encode(
    adata: AnnData,
    patches: np.ndarray,
    *,
    encoder: str,
    pretrained: bool,
    checkpoint: str | None,
    patches_key: str,
    batch_size: int = 64,
    device: str | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, dict]:
    """Embed ``patches`` with an encoder; return the embeddings and the params recorded in ``uns``."""
    from .._engine.encoders import build_image_encoder, encode_patches

    enc = build_image_encoder(encoder, pretrained=pretrained, checkpoint=checkpoint)
    emb = encode_patches(enc, patches, batch_size=batch_size, device=device, progress=progress)
    params = {
        "encoder": encoder,
        "pretrained": bool(enc.pretrained),
        "checkpoint": "" if enc.checkpoint is None else str(enc.checkpoint),
        "out_dim": int(enc.out_dim),
        "patches_key": patches_key,
        **_patch_geometry(adata, patches_key),
    }
    return emb, params


@inject_docs
def embed_patches(
    adata: AnnData,
    *,
    encoder: str = DEFAULT_ENCODER,
    pretrained: bool = False,
    checkpoint: str | None = None,
    patches_key: str = C.PATCHES_KEY,
    key_added: str | None = None,
    batch_size: int = 64,
    device: str | None = None,
    progress: bool = True,
    copy: bool = False,
) -> AnnData | None:
    """Embed the H&E patch of every spot with an image encoder.

    Parameters
    ----------
    {adata}
    encoder
        ``"hed-texture"`` (default): a weight-free, deterministic descriptor of stain densities, texture and
        nucleus density that needs no download and runs fast on a CPU. Or a timm model name (``"resnet50"``,
        ``"vit_small_patch16_224"``, ...), or ``"hf-hub:<org>/<name>"`` for models on the Hugging Face hub such as
        UNI (``"hf-hub:MahmoodLab/uni"``; gated: accept the licence and log in first).
    pretrained
        Download pretrained weights of a timm / hf-hub model. ``False`` gives a deterministic random
        initialisation. Without internet, use ``checkpoint=`` or the weight-free encoder.
    checkpoint
        Local weight file (``.safetensors`` preferred, or ``.pth`` / ``.bin`` read without executing code) for the
        timm architecture named by ``encoder``.
    patches_key
        Key of ``adata.obsm`` holding uint8 patches (n_obs, S, S, 3), written by :func:`sthist.pp.extract_patches`.
    key_added
        Key of the embeddings in ``adata.obsm`` and of the parameters in ``adata.uns``; default
        ``"X_<encoder name>"``, e.g. ``"X_hed_texture"`` or ``"X_resnet50"``.
    batch_size
        Patches per forward pass.
    device
        Torch device; ``None`` picks cuda, then mps, then cpu.
    {progress}
    {copy}

    Returns
    -------
    ``None``, or a copy of ``adata`` if ``copy=True``, with

    ``adata.obsm['X_<encoder>' | key_added]``
        float32 (n_obs, out_dim) embeddings.
    ``adata.uns['X_<encoder>' | key_added]['params']``
        ``encoder``, ``pretrained``, ``checkpoint`` (``""`` when none), ``out_dim`` and ``patches_key``.

    Examples
    --------
    >>> import sthist
    >>> adata = sthist.datasets.toy()
    >>> sthist.pp.extract_patches(adata)
    >>> sthist.pp.embed_patches(adata)
    >>> adata.obsm["X_hed_texture"].shape  # doctest: +SKIP
    """
    check_adata(adata, fn="sthist.pp.embed_patches")
    if patches_key not in adata.obsm:
        raise KeyError(
            f"adata.obsm[{patches_key!r}] is missing: run `sthist.pp.extract_patches(adata)` first"
            + (f" (with key_added={patches_key!r})" if patches_key != C.PATCHES_KEY else "")
            + "."
        )
    batch_size = check_positive_int("batch_size", batch_size)
    if not isinstance(encoder, str) or not encoder.strip():
        raise ValueError(
            f"encoder must be a non-empty string such as {DEFAULT_ENCODER!r} or 'resnet50', got {encoder!r}."
        )
    patches = np.asarray(adata.obsm[patches_key])
    if patches.ndim != 4 or patches.shape[-1] != 3 or patches.dtype != np.uint8:
        raise ValueError(
            f"adata.obsm[{patches_key!r}] must hold uint8 RGB patches of shape (n_obs, S, S, 3), got "
            f"{patches.dtype} {patches.shape}; recreate them with `sthist.pp.extract_patches(adata)`."
        )

    if key_added is None:
        key_added = default_key(encoder)
    start = info(f"embedding {patches.shape[0]} patches with {encoder!r}")
    # build and run the encoder before touching adata, so that errors leave it unchanged
    emb, params = encode(
        adata,
        patches,
        encoder=encoder,
        pretrained=pretrained,
        checkpoint=checkpoint,
        patches_key=patches_key,
        batch_size=batch_size,
        device=device,
        progress=progress,
    )

    adata = adata.copy() if copy else adata
    adata.obsm[key_added] = emb
    adata.uns[key_added] = {"params": params}
    info(
        "    finished",
        time=start,
        deep=f"added\n    {key_added!r}, embeddings (adata.obsm)\n    {key_added!r}, parameters (adata.uns)",
    )
    return adata if copy else None
