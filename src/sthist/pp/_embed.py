"""Embed H&E patches with an image encoder."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import _constants as C
from .._docs import inject_docs
from .._logging import info
from .._validate import check_adata, check_positive_int
from ._store import ENCODE_BLOCK, check_store, create_embedding_store, open_embeddings, remove_store

if TYPE_CHECKING:
    from anndata import AnnData

DEFAULT_ENCODER = C.DEFAULT_ENCODER


def _patch_geometry(adata: AnnData, patches_key: str) -> dict:
    """Patch size and resolution the patches were extracted at (recorded so predictions reuse them)."""
    from .._anndata import patch_geometry

    size, mpp = patch_geometry(adata, patches_key)
    return {k: v for k, v in (("patch_size", size), ("mpp", mpp)) if v is not None}


def default_key(encoder: str) -> str:
    """``obsm`` key of an encoder's embeddings: ``'X_<encoder name>'``."""
    from .._engine.encoders import encoder_key

    return f"X_{encoder_key(encoder)}"


def encode(
    adata: AnnData,
    patches: Any,
    *,
    encoder: str,
    pretrained: bool,
    checkpoint: str | None,
    patches_key: str,
    batch_size: int = 64,
    device: str | None = None,
    progress: bool = True,
    out: Any = None,
) -> tuple[Any, dict]:
    """Embed ``patches`` with an encoder; return the embeddings and the params recorded in ``uns``.

    ``patches`` may be a numpy array or a lazy one (dask, zarr): it is read and encoded a block of
    :data:`~sthist.pp._store.ENCODE_BLOCK` spots (a multiple of ``batch_size``) at a time, so the forward passes
    see the same batches whatever the storage. ``out``, a function of the encoder's output width ``d`` returning an
    (n, d) float32 array-like (e.g. a zarr array), receives the embeddings block by block; by default a numpy array
    is allocated.
    """
    from .._engine._utils import progress_bar
    from .._engine.data import iter_row_blocks
    from .._engine.encoders import build_image_encoder, encode_patches

    enc = build_image_encoder(encoder, pretrained=pretrained, checkpoint=checkpoint)
    n = int(patches.shape[0])
    out = np.empty((n, int(enc.out_dim)), dtype=np.float32) if out is None else out(int(enc.out_dim))
    rows = block_rows(batch_size)
    with progress_bar(total=n, enabled=progress, desc=f"encoding ({encoder})", unit="spot", leave=False) as bar:
        for s, block in iter_row_blocks(patches, rows):
            out[s : s + block.shape[0]] = encode_patches(
                enc, np.ascontiguousarray(block), batch_size=batch_size, device=device, progress=False
            )
            bar.update(block.shape[0])
    from .._engine.base import state_sha256

    params = {
        "encoder": encoder,
        "pretrained": bool(enc.pretrained),
        "checkpoint": "" if enc.checkpoint is None else str(enc.checkpoint),
        "weights_sha256": state_sha256(enc) or "",
        "out_dim": int(enc.out_dim),
        "patches_key": patches_key,
        **_patch_geometry(adata, patches_key),
    }
    return out, params


def block_rows(batch_size: int) -> int:
    """Spots encoded per block: about ``ENCODE_BLOCK``, a multiple of ``batch_size``."""
    return batch_size * max(1, ENCODE_BLOCK // batch_size)


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
    store: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
    copy: bool = False,
) -> AnnData | None:
    """Embed the H&E patch of every spot with an image encoder.

    The patches are read and encoded a block of about 512 spots at a time, so patches held lazily
    (``extract_patches(store=...)``: a dask array over a zarr store) are never loaded whole. The embeddings are
    small (n_obs x out_dim float32) and are kept in memory unless ``store`` is given.

    Parameters
    ----------
    {adata}
    encoder
        ``"hed-fast"`` (default, the encoder of the recommended configuration): the ``"hed-texture"`` descriptor
        of a 56 px antialiased thumbnail of each patch, several times faster on 224 px patches. ``"hed-texture"``:
        a weight-free, deterministic descriptor of stain densities, texture and nucleus density at up to 128 px
        that needs no download and runs fast on a CPU. ``"hed-texture-ctx"``: the same descriptor of the whole
        patch and of its central half, side by side (extract a wider field, e.g. 224 px at 1 µm/px, so that the
        centre is the spot and the rest its surrounding tissue). Or a
        timm model name (``"resnet50"``, ``"vit_small_patch16_224"``, ...), or ``"hf-hub:<org>/<name>"`` for
        models on the Hugging Face hub such as UNI (``"hf-hub:MahmoodLab/uni"``; gated: accept the licence and
        log in first).
    pretrained
        Download pretrained weights of a timm / hf-hub model. ``False`` gives a deterministic random
        initialisation. Without internet, use ``checkpoint=`` or a weight-free encoder.
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
    store
        A path ending in ``.zarr`` (created) to write the embeddings to, as float32 array ``'embeddings'``
        (Blosc-zstd); ``obsm[key_added]`` is then a dask array over it. ``None`` keeps them in memory.
    overwrite
        Replace an existing zarr store at ``store``.
    {progress}
    {copy}

    Returns
    -------
    ``None``, or a copy of ``adata`` if ``copy=True``, with

    ``adata.obsm['X_<encoder>' | key_added]``
        float32 (n_obs, out_dim) embeddings: numpy, or with ``store`` a dask array.
    ``adata.uns['X_<encoder>' | key_added]['params']``
        ``encoder``, ``pretrained``, ``checkpoint`` (``""`` when none), ``weights_sha256`` (of the encoder's
        weights; ``""`` for the weight-free encoders), ``out_dim``, ``patches_key``, the patch geometry
        (``patch_size``, ``mpp``) and ``store`` (only with ``store``).

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
    patches = adata.obsm[patches_key]
    if not hasattr(patches, "dtype") or not hasattr(patches, "shape"):
        patches = np.asarray(patches)
    if len(patches.shape) != 4 or patches.shape[-1] != 3 or patches.dtype != np.uint8:
        raise ValueError(
            f"adata.obsm[{patches_key!r}] must hold uint8 RGB patches of shape (n_obs, S, S, 3), got "
            f"{patches.dtype} {patches.shape}; recreate them with `sthist.pp.extract_patches(adata)`."
        )
    store_path = check_store(store, overwrite=overwrite)
    if store_path is not None:
        source = (
            (adata.uns.get(patches_key) or {}).get("params", {}).get("store")
            if isinstance(adata.uns.get(patches_key), dict)
            else None
        )
        if source and os.path.abspath(str(source)) == str(store_path):
            raise ValueError(
                f"store={str(store)!r} holds the patches being embedded; write the embeddings to another store."
            )

    if key_added is None:
        key_added = default_key(encoder)
    start = info(f"embedding {patches.shape[0]} patches with {encoder!r}")
    # build and run the encoder before touching adata, so that errors leave it unchanged
    kwargs = dict(
        encoder=encoder,
        pretrained=pretrained,
        checkpoint=checkpoint,
        patches_key=patches_key,
        batch_size=batch_size,
        device=device,
        progress=progress,
    )
    if store_path is None:
        emb, params = encode(adata, patches, **kwargs)
    else:
        emb, params = _encode_to_store(adata, patches, store_path, kwargs)

    adata = adata.copy() if copy else adata
    adata.obsm[key_added] = emb
    adata.uns[key_added] = {"params": params}
    info(
        "    finished",
        time=start,
        deep=f"added\n    {key_added!r}, embeddings (adata.obsm)\n    {key_added!r}, parameters (adata.uns)",
    )
    return adata if copy else None


def _encode_to_store(adata: AnnData, patches: Any, path: Any, kwargs: dict) -> tuple[Any, dict]:
    """Encode into a new zarr store at ``path`` (removed again on failure); return a dask array over it."""
    rows = block_rows(kwargs["batch_size"])
    remove_store(path)  # check_store allowed it (overwrite=True) or it does not exist
    try:
        _, params = encode(
            adata,
            patches,
            out=lambda d: create_embedding_store(path, n=int(patches.shape[0]), d=d, rows=rows),
            **kwargs,
        )
    except BaseException:
        remove_store(path)
        raise
    params["store"] = str(path)
    return open_embeddings(path), params
