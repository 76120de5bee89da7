"""Embed H&E patches with an image encoder."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import _constants as C
from .._dask import check_client, is_lazy, resolve_client
from .._docs import inject_docs
from .._logging import info
from .._validate import check_adata, check_positive_int
from . import _store
from ._patches import check_n_jobs

if TYPE_CHECKING:
    from anndata import AnnData

DEFAULT_ENCODER = C.DEFAULT_ENCODER
_FN = "sthist.pp.embed_patches"


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

    enc = _build(encoder, pretrained, checkpoint)
    n = int(patches.shape[0])
    out = np.empty((n, int(enc.out_dim)), dtype=np.float32) if out is None else out(int(enc.out_dim))
    rows = block_rows(batch_size)

    def place(s: int, emb: np.ndarray) -> None:
        out[s : s + emb.shape[0]] = emb

    with progress_bar(total=n, enabled=progress, desc=f"encoding ({encoder})", unit="spot", leave=False) as bar:
        blocks = [(s, min(s + rows, n)) for s in range(0, n, rows)]
        _encode_here(enc, patches, blocks, rows, place, batch_size, device, bar)
    return out, _params(adata, enc, encoder, patches_key)


def _build(encoder: str, pretrained: bool, checkpoint: str | None) -> Any:
    from .._engine.encoders import build_image_encoder

    return build_image_encoder(encoder, pretrained=pretrained, checkpoint=checkpoint)


def _params(adata: AnnData, enc: Any, encoder: str, patches_key: str) -> dict:
    from .._engine.base import state_sha256

    return {
        "encoder": encoder,
        "pretrained": bool(enc.pretrained),
        "checkpoint": "" if enc.checkpoint is None else str(enc.checkpoint),
        "weights_sha256": state_sha256(enc) or "",
        "out_dim": int(enc.out_dim),
        "patches_key": patches_key,
        **_patch_geometry(adata, patches_key),
    }


def _runs(blocks: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Consecutive blocks merged into runs ``(start, stop)``."""
    runs: list[list[int]] = []
    for s, e in blocks:
        if runs and runs[-1][1] == s:
            runs[-1][1] = e
        else:
            runs.append([s, e])
    return [(s, e) for s, e in runs]


def _encode_here(
    enc: Any,
    patches: Any,
    blocks: list[tuple[int, int]],
    rows: int,
    place: Any,
    batch_size: int,
    device: Any,
    bar: Any,
) -> None:
    """Encode ``blocks`` (``(start, stop)`` rows, each a multiple of the block size from 0) in this process.

    Consecutive blocks are read together with :func:`~sthist._engine.data.iter_row_blocks` (each storage chunk
    once), with dask's local threads (never through a distributed client that happens to be the default).
    ``place(start, embeddings)`` receives each block.
    """
    import dask

    from .._engine.data import iter_row_blocks
    from .._engine.encoders import encode_patches

    with dask.config.set(scheduler="threads"):
        for a, b in _runs(blocks):
            for s, block in iter_row_blocks(patches[a:b], rows):
                emb = encode_patches(
                    enc, np.ascontiguousarray(block), batch_size=batch_size, device=device, progress=False
                )
                place(a + s, emb)
                bar.update(block.shape[0])


def _embed_unit(
    rows: Any, start: int, store: Any, unit: str, sha: str | None, *, encoder: Any, batch_size: int, device: Any
) -> np.ndarray | None:
    """One block of rows, one task (on a worker): read the patches, encode them, write or return the embeddings.

    ``rows`` is a :class:`~sthist._dask.LazyRows` (the worker reads the rows itself, e.g. from the patch store by
    path) or the patches. With a ``store`` the block goes to its rows of the embedding array (one chunk, written by
    this task only), then the block's completion marker is written, and nothing is returned.
    """
    from .._engine.encoders import encode_patches

    block = rows.read() if hasattr(rows, "read") else np.asarray(rows)
    emb = encode_patches(encoder, np.ascontiguousarray(block), batch_size=batch_size, device=device, progress=False)
    if store is None:
        return emb
    _store.write_rows(store, "embeddings", start, emb)
    _store.mark_done(store, unit, sha, rows=[int(start), int(start + emb.shape[0])])
    return None


def block_rows(batch_size: int) -> int:
    """Spots encoded per block: about ``ENCODE_BLOCK``, a multiple of ``batch_size``."""
    return batch_size * max(1, _store.ENCODE_BLOCK // batch_size)


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
    resume: bool = False,
    client: Any = None,
    n_jobs: int = 1,
    progress: bool = True,
    copy: bool = False,
) -> AnnData | None:
    """Embed the H&E patch of every spot with an image encoder.

    The patches are read and encoded a block of about 512 spots at a time, so patches held lazily
    (``extract_patches(store=...)``: a dask array over a zarr store) are never loaded whole. The embeddings are
    small (n_obs x out_dim float32) and are kept in memory unless ``store`` is given.

    On a cluster (``client=`` or ``n_jobs``), every block of rows is one task: the worker reads its block of patches
    itself (from the patch store, by path), encodes it, writes its rows of the embedding store (or returns them when
    there is no store) and returns nothing big, so a worker holds one block at a time. With a store, every finished
    block is recorded atomically, and ``resume=True`` encodes only the blocks an interrupted run did not finish.
    The weight-free encoders give identical embeddings with and without a cluster, as do the others on the same
    kind of device (the batches are the same).

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
        (Blosc-zstd), one chunk and one completion marker per block of rows; ``obsm[key_added]`` is then a dask
        array over it. ``None`` keeps them in memory. If encoding fails or is killed, the store is **kept** with the
        blocks finished so far, for ``resume=True``; :func:`sthist.pp.read_store` refuses it until it is complete.
    overwrite
        Replace an existing zarr store at ``store``.
    resume
        Finish the store an interrupted run left at ``store``: check that the encoder (name, weights hash), the
        patches (their store, spots and size), ``batch_size`` and the block size are those the store was started
        with, raising a ``ValueError`` that names every difference, then encode only the blocks without a
        completion marker. A complete store is opened as it is; a missing one is created. Not with ``overwrite``.
    client
        A :class:`dask.distributed.Client` to encode on: one task per block of about 512 rows. The encoder is
        built here and sent to every worker once. Patches in a store (``extract_patches(store=...)``) are read by
        each worker from the store, which must be readable there (a shared file system); patches held in memory
        (a numpy ``obsm``) are encoded in this process, with a log message. ``None``: here (or see ``n_jobs``).
    n_jobs
        Shorthand for a local cluster when ``client=None``: ``n_jobs > 1`` starts a
        :class:`dask.distributed.LocalCluster` of that many single-threaded worker processes for this call
        (``-1``: one per core); only for patches in a store. Ignored with ``client=``.
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
    check_adata(adata, fn=_FN)
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
    n_jobs = check_n_jobs(n_jobs)
    check_client(client, fn=_FN)
    store_path = _store.check_store(store, overwrite=overwrite, resume=resume, kind="embeddings")
    source = None
    if isinstance(adata.uns.get(patches_key), dict):
        source = (adata.uns[patches_key].get("params") or {}).get("store")
    if store_path is not None and source and os.path.abspath(str(source)) == str(store_path):
        raise ValueError(
            f"store={str(store)!r} holds the patches being embedded; write the embeddings to another store."
        )

    if key_added is None:
        key_added = default_key(encoder)
    start = info(f"embedding {patches.shape[0]} patches with {encoder!r}")
    # build and run the encoder before touching adata, so that errors leave it unchanged
    enc = _build(encoder, pretrained, checkpoint)
    params = _params(adata, enc, encoder, patches_key)
    n, d, rows = int(patches.shape[0]), int(enc.out_dim), block_rows(batch_size)
    blocks = [(s, min(s + rows, n)) for s in range(0, n, rows)]
    units = [_store.block_name(k) for k in range(len(blocks))]
    done: set[str] = set()
    sha = None
    lazy = is_lazy(patches)
    if store_path is not None:
        spec = _spec(adata, patches, params, batch_size, rows, source if lazy else None)
        if resume and store_path.exists():
            done = _store.check_resume(store_path, kind="embeddings", spec=spec, fn=_FN)
            sha = _store.spec_sha256(spec)
            info(f"    resuming {str(store_path)!r}: {len(done)} of {len(blocks)} blocks finished before")
        else:
            sha = _store.create_embedding_store(store_path, n=n, d=d, rows=rows, spec=spec)
    todo = [k for k, unit in enumerate(units) if unit not in done]
    emb = None if store_path is not None else np.empty((n, d), dtype=np.float32)

    def place(s: int, values: np.ndarray) -> None:
        if store_path is None:
            emb[s : s + values.shape[0]] = values
            return
        _store.write_rows(store_path, "embeddings", s, values)
        k = s // rows
        _store.mark_done(store_path, units[k], sha, rows=list(blocks[k]))

    if not lazy and (client is not None or n_jobs > 1):
        info(
            "    the patches are in memory, which workers cannot read by path: encoded in this process (extract them "
            "with store= to encode on a cluster)"
        )
    try:
        with resolve_client(client if lazy else None, n_jobs if lazy and len(todo) > 1 else 1, fn=_FN) as run_on:
            if run_on is None:
                from .._engine._utils import progress_bar

                total = sum(blocks[k][1] - blocks[k][0] for k in todo)
                with progress_bar(total=total, enabled=progress, desc=f"encoding ({encoder})", unit="spot") as bar:
                    _encode_here(enc, patches, [blocks[k] for k in todo], rows, place, batch_size, device, bar)
            else:
                from .._dask import LazyRows, run_tasks

                info(f"    {len(todo)} blocks of up to {rows} patches as tasks on the dask cluster")
                tasks = [(LazyRows(patches, *blocks[k]), blocks[k][0], store_path, units[k], sha) for k in todo]
                results = run_tasks(
                    run_on,
                    _embed_unit,
                    tasks,
                    weights=[blocks[k][1] - blocks[k][0] for k in todo],
                    progress=progress,
                    desc=f"encoding ({encoder})",
                    unit="spot",
                    shared={"encoder": enc, "batch_size": batch_size, "device": device},
                )
                if store_path is None:
                    for k, values in zip(todo, results, strict=True):
                        emb[blocks[k][0] : blocks[k][1]] = values
    except BaseException as err:
        _store.note_kept(err, store_path, fn="embed_patches", rest="encode only the rest")
        raise
    if store_path is not None:
        emb = _store.open_embeddings(store_path)
        params["store"] = str(store_path)

    adata = adata.copy() if copy else adata
    adata.obsm[key_added] = emb
    adata.uns[key_added] = {"params": params}
    info(
        "    finished",
        time=start,
        deep=f"added\n    {key_added!r}, embeddings (adata.obsm)\n    {key_added!r}, parameters (adata.uns)",
    )
    return adata if copy else None


def _spec(adata: AnnData, patches: Any, params: dict, batch_size: int, rows: int, source: str | None) -> dict:
    """The parameters that define an embedding store's content (compared on ``resume=True``).

    The patches are identified by the spots (a hash of ``obs_names``), their shape and, when lazy, the patch store
    they come from (its path and parameter fingerprint); in-memory patches by a hash of their bytes.
    """
    patches_id: dict[str, Any] = {"key": params["patches_key"], "store": None}
    if source is not None:
        status = _store.store_status(source) if os.path.isdir(str(source)) else None
        patches_id = {
            "key": params["patches_key"],
            "store": os.path.abspath(str(source)),
            "store_spec_sha256": None if status is None else status.spec_sha256,
        }
    elif not hasattr(patches, "__dask_graph__"):
        patches_id["sha256"] = _store.sha256_of(np.asarray(patches))
    return {
        "format": _store.FORMAT,
        "kind": "embeddings",
        "encoder": params["encoder"],
        "pretrained": params["pretrained"],
        "checkpoint": params["checkpoint"],
        "weights_sha256": params["weights_sha256"],
        "out_dim": params["out_dim"],
        "batch_size": int(batch_size),
        "block_rows": int(rows),
        "n_obs": int(patches.shape[0]),
        "patch_shape": [int(v) for v in patches.shape[1:]],
        "obs_names_sha256": _store.sha256_of("\n".join(map(str, adata.obs_names))),
        "patches": patches_id,
    }
