"""On-disk (zarr) storage of patches and embeddings, read back lazily as dask arrays.

Layout of a store written by :func:`sthist.pp.extract_patches` (``store="patches.zarr"``)::

    patches.zarr/               zarr v3 group, attrs {"sthist": "patches", "libraries": [...], "arrays": [...],
                                "n_obs": n, "obs_order": "grouped" | "permuted"}
        lib_0000/               uint8 (n_spots of library 0, S, S, 3), chunks (512, S, S, 3), Blosc-zstd
        lib_0001/               ...
        obs_index               int64 (n_obs,): row of each obs in the concatenation of the library arrays
                                (only when the spots of a library are not contiguous in obs)

and by :func:`sthist.pp.embed_patches` (``store="embeddings.zarr"``)::

    embeddings.zarr/            attrs {"sthist": "embeddings", "n_obs": n}
        embeddings              float32 (n_obs, d), chunks (rows, d), Blosc-zstd with byte shuffle

One array per library means that processes extracting different libraries never write the same chunk.
:func:`open_patches` and :func:`open_embeddings` return the dask arrays that ``obsm`` holds.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import dask.array as da

#: Spots per chunk of a patch array.
PATCH_CHUNK = 512
#: Bytes of patches one extraction pass keeps in memory (several chunks filled in one tile-order visit).
BUFFER_BYTES = 256 * 2**20
#: Spots read and encoded at a time by ``embed_patches`` (rounded to a multiple of the batch size).
ENCODE_BLOCK = 512

_KIND = "sthist"


def compressor(kind: str = "patches") -> Any:
    """Blosc-zstd (ships with zarr/numcodecs); byte shuffle helps float32 embeddings, is a no-op on uint8."""
    import zarr

    return zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="shuffle" if kind == "embeddings" else "noshuffle")


def check_store(store: Any, *, overwrite: bool, param: str = "store") -> Path | None:
    """Validate a store path (``None`` passes); raise with the fix, touching nothing on disk."""
    if store is None:
        return None
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be True or False, got {overwrite!r}.")
    if not isinstance(store, str | os.PathLike):
        raise TypeError(f"{param} must be a path ending in '.zarr' (str or pathlib.Path), got {type(store).__name__}.")
    path = Path(store).expanduser()
    if path.suffix.lower() != ".zarr":
        raise ValueError(f"{param}={str(store)!r} must end in '.zarr' (a folder zarr creates), e.g. 'patches.zarr'.")
    if path.exists():
        if not overwrite:
            raise ValueError(
                f"{param}={str(path)!r} already exists; pass overwrite=True to replace it, or choose another path."
            )
        if not path.is_dir() or not ((path / "zarr.json").is_file() or (path / ".zgroup").is_file()):
            raise ValueError(
                f"{param}={str(path)!r} exists and is not a zarr store; overwrite=True only replaces zarr stores. "
                "Remove it yourself or choose another path."
            )
    parent = path.absolute().parent
    if not parent.is_dir():
        raise FileNotFoundError(f"{param}={str(path)!r}: the folder {str(parent)!r} does not exist; create it first.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{param}={str(path)!r}: the folder {str(parent)!r} is not writable; choose another path.")
    return path.absolute()


def remove_store(path: Path) -> None:
    """Delete a store this module created (after a failure, or before ``overwrite``)."""
    if path.exists():
        shutil.rmtree(path)


def library_order(codes: np.ndarray, n_libs: int) -> tuple[list[int], np.ndarray | None]:
    """Libraries in order of first appearance in obs, and the obs permutation (``None`` when grouped).

    Concatenating the library arrays in that order gives rows ``concat(flatnonzero(codes == li))``; the returned
    index maps obs position -> row of that concatenation, and is ``None`` when it is the identity.
    """
    _, first = np.unique(codes, return_index=True)
    order = [int(codes[i]) for i in np.sort(first)]
    order += [li for li in range(n_libs) if li not in set(order)]  # libraries without spots (cannot happen, safe)
    rows = np.concatenate([np.flatnonzero(codes == li) for li in order]) if len(codes) else np.zeros(0, np.intp)
    if np.array_equal(rows, np.arange(len(codes))):
        return order, None
    inverse = np.empty(len(codes), dtype=np.int64)
    inverse[rows] = np.arange(len(codes), dtype=np.int64)
    return order, inverse


def array_name(li: int) -> str:
    return f"lib_{li:04d}"


def create_patch_store(
    path: Path, *, libs: list[str], counts: list[int], order: list[int], inverse: np.ndarray | None, S: int
) -> None:
    """Create the group and one empty uint8 array per library (metadata only; workers fill the chunks)."""
    import zarr

    group = zarr.open_group(path, mode="w")
    for li, n in enumerate(counts):
        group.create_array(
            array_name(li),
            shape=(n, S, S, 3),
            chunks=(min(PATCH_CHUNK, max(n, 1)), S, S, 3),
            dtype="uint8",
            compressors=compressor("patches"),
            fill_value=0,
            attributes={"library_id": libs[li]},
        )
    if inverse is not None:
        arr = group.create_array("obs_index", shape=inverse.shape, chunks=(max(len(inverse), 1),), dtype="int64")
        arr[:] = inverse
    group.attrs.update(
        {
            _KIND: "patches",
            "libraries": list(libs),
            "arrays": [array_name(li) for li in order],
            "n_obs": int(sum(counts)),
            "patch_size": int(S),
            "obs_order": "grouped" if inverse is None else "permuted",
        }
    )


def write_rows(path: Path, name: str, start: int, block: np.ndarray) -> None:
    """Write ``block`` into rows ``start:start + len(block)`` of array ``name`` of the store at ``path``."""
    import zarr

    arr = zarr.open_array(path / name, mode="r+")
    arr[start : start + block.shape[0]] = block


def open_patches(path: str | os.PathLike) -> Any:
    """The patches of a store written by ``extract_patches(store=...)`` as one dask array in obs order."""
    import dask.array as da
    import zarr

    path = Path(path)
    group = zarr.open_group(path, mode="r")
    attrs = dict(group.attrs)
    if attrs.get(_KIND) != "patches":
        raise ValueError(f"{str(path)!r} is not a patch store written by `sthist.pp.extract_patches(store=...)`.")
    parts = [da.from_zarr(group[name]) for name in attrs["arrays"]]
    out = parts[0] if len(parts) == 1 else da.concatenate(parts, axis=0)
    if attrs.get("obs_order") == "permuted":
        out = out[np.asarray(group["obs_index"][:])]
    return out


def create_embedding_store(path: Path, *, n: int, d: int, rows: int) -> Any:
    """Create the group and the (n, d) float32 embedding array; return the array."""
    import zarr

    group = zarr.open_group(path, mode="w")
    arr = group.create_array(
        "embeddings",
        shape=(n, d),
        chunks=(min(rows, max(n, 1)), d),
        dtype="float32",
        compressors=compressor("embeddings"),
        fill_value=0.0,
    )
    group.attrs.update({_KIND: "embeddings", "n_obs": int(n)})
    return arr


def open_embeddings(path: str | os.PathLike) -> Any:
    """The embeddings of a store written by ``embed_patches(store=...)`` as a dask array."""
    import dask.array as da
    import zarr

    path = Path(path)
    group = zarr.open_group(path, mode="r")
    if dict(group.attrs).get(_KIND) != "embeddings":
        raise ValueError(f"{str(path)!r} is not an embedding store written by `sthist.pp.embed_patches(store=...)`.")
    return da.from_zarr(group["embeddings"])


def read_store(path: str | os.PathLike) -> da.Array:
    """Open a patch or embedding store written by sthist as a lazy dask array in ``obs`` order.

    Use it to reattach a store to an AnnData read back from disk, e.g.
    ``adata.obsm["patches"] = sthist.pp.read_store(adata.uns["patches"]["params"]["store"])``.

    Parameters
    ----------
    path
        A ``.zarr`` folder written by :func:`sthist.pp.extract_patches` or :func:`sthist.pp.embed_patches` with
        ``store=``.

    Returns
    -------
    A dask array: uint8 ``(n_obs, S, S, 3)`` patches or float32 ``(n_obs, d)`` embeddings. Nothing is read until
    it is computed.
    """
    import zarr

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(
            f"no store at {str(p)!r}; pass the folder that `extract_patches(store=...)` or `embed_patches(store=...)` "
            "wrote (recorded in `adata.uns[key]['params']['store']`)."
        )
    try:
        kind = dict(zarr.open_group(p, mode="r").attrs).get(_KIND)
    except Exception as err:  # zarr raises several types for folders that are not groups
        raise ValueError(f"{str(p)!r} is not a zarr store written by sthist ({err}).") from None
    if kind == "patches":
        return open_patches(p)
    if kind == "embeddings":
        return open_embeddings(p)
    raise ValueError(
        f"{str(p)!r} is a zarr group but not a store written by `sthist.pp.extract_patches(store=...)` or "
        "`sthist.pp.embed_patches(store=...)`."
    )
