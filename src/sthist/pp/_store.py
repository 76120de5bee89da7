"""On-disk (zarr) storage of patches and embeddings, read back lazily as dask arrays; crash-safe and resumable.

Layout of a store written by :func:`sthist.pp.extract_patches` (``store="patches.zarr"``)::

    patches.zarr/               zarr v3 group, attrs {"sthist": "patches", "format": 2, "libraries": [...],
                                "arrays": [...], "n_obs": n, "patch_size": S, "obs_order": "grouped" | "permuted",
                                "units": ["lib_0000", ...], "spec": {...}, "spec_sha256": "..."}
        lib_0000/               uint8 (n_spots of library 0, S, S, 3), chunks (512, S, S, 3), Blosc-zstd
        lib_0001/               ...
        obs_index               int64 (n_obs,): row of each obs in the concatenation of the library arrays
                                (only when the spots of a library are not contiguous in obs)
        _done/                  completion markers, one zarr group per finished unit
            lib_0000/zarr.json  attrs {"unit": "lib_0000", "spec_sha256": ..., "finished": ..., ...}

and by :func:`sthist.pp.embed_patches` (``store="embeddings.zarr"``)::

    embeddings.zarr/            attrs {"sthist": "embeddings", "format": 2, "n_obs": n, "block_rows": rows,
                                "units": ["block_000000", ...], "spec": {...}, "spec_sha256": "..."}
        embeddings              float32 (n_obs, d), chunks (rows, d), Blosc-zstd with byte shuffle
        _done/block_000000/zarr.json, ...

Crash safety. A store is created in a hidden sibling folder (``.patches.zarr.<id>.creating``) and renamed into
place once its metadata (every array, the attrs with the parameters ``spec`` that define it) is written, so a store
either exists with all its metadata or not at all. The work is split into units, one library (patches) or one
block of ``block_rows`` rows = one chunk row (embeddings); each unit is written by one task only, which writes all
its chunks (zarr writes each chunk file to a temporary name and renames it) and then, last, its marker
``_done/<unit>/zarr.json``, written to a temporary name, flushed to disk and renamed (:func:`os.replace`). A unit
counts as finished when its marker exists and names the store's ``spec_sha256``; the store is complete when every
unit in ``attrs["units"]`` is finished. :func:`open_patches`, :func:`open_embeddings` and :func:`read_store`
refuse an incomplete store. A run that dies leaves finished units finished; ``resume=True`` checks the parameters
against ``attrs["spec"]`` and redoes only the other units, whose chunks are overwritten whole, so the final store is
the same, byte for byte, as that of an uninterrupted run.

One array per library means that processes extracting different libraries never write the same chunk.
:func:`open_patches` and :func:`open_embeddings` return the dask arrays that ``obsm`` holds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
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
#: Version of the store layout: 2 adds ``units``, ``spec`` and the ``_done`` markers (1: no completion records).
FORMAT = 2
#: Group of the completion markers inside a store.
DONE = "_done"

_KIND = "sthist"
_WHAT = {"patches": ("library", "libraries"), "embeddings": ("block", "blocks")}
_CALL = {"patches": "sthist.pp.extract_patches", "embeddings": "sthist.pp.embed_patches"}


def compressor(kind: str = "patches") -> Any:
    """Blosc-zstd (ships with zarr/numcodecs); byte shuffle helps float32 embeddings, is a no-op on uint8."""
    import zarr

    return zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="shuffle" if kind == "embeddings" else "noshuffle")


# ------------------------------------------------------------------------------------------------ parameters


def sha256_of(*parts: Any) -> str:
    """SHA-256 of numpy arrays (their dtype, shape and bytes) and strings, in order."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.ndarray):
            a = np.ascontiguousarray(part)
            h.update(f"{a.dtype.str}{a.shape}".encode())
            flat = a.reshape(-1).view(np.uint8) if a.size else a.reshape(-1)
            step = 64 * 2**20
            for s in range(0, flat.nbytes, step):
                h.update(memoryview(flat[s : s + step]))
        else:
            h.update(str(part).encode())
    return h.hexdigest()


def _json(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists, numpy scalars numbers)."""

    def default(o: Any) -> Any:
        if isinstance(o, np.integer):
            return int(o)
        if isinstance(o, np.floating):
            return float(o)
        if isinstance(o, np.bool_):
            return bool(o)
        if isinstance(o, np.ndarray):
            return o.tolist()
        return str(o)

    return json.loads(json.dumps(obj, default=default))


def spec_sha256(spec: dict) -> str:
    """The fingerprint of a store's parameters, recorded in its attrs and in every completion marker."""
    return hashlib.sha256(json.dumps(_json(spec), sort_keys=True).encode()).hexdigest()


def _short(value: Any) -> str:
    text = repr(value)
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12] + "…"  # a hash
    return text if len(text) <= 80 else text[:77] + "..."


def spec_differences(stored: Any, call: Any, prefix: str = "") -> list[str]:
    """Every parameter that differs between a store's ``spec`` and a call's, as ``"name: store X, call Y"``."""
    stored, call = _json(stored), _json(call)
    if isinstance(stored, dict) and isinstance(call, dict):
        out: list[str] = []
        for key in list(stored) + [k for k in call if k not in stored]:
            name = f"{prefix}[{key!r}]" if prefix else str(key)
            if key not in call:
                out.append(f"{name}: store {_short(stored[key])}, call (not set)")
            elif key not in stored:
                out.append(f"{name}: store (not set), call {_short(call[key])}")
            else:
                out += spec_differences(stored[key], call[key], name)
        return out
    return [] if stored == call else [f"{prefix}: store {_short(stored)}, call {_short(call)}"]


# ------------------------------------------------------------------------------------------------ status


@dataclass
class StoreStatus:
    """What a store on disk is and how far its writing got."""

    kind: str | None  # "patches", "embeddings", or None (not a store written by sthist)
    format: int = 1
    units: list[str] = field(default_factory=list)
    done: set[str] = field(default_factory=set)
    spec: dict | None = None
    spec_sha256: str | None = None

    @property
    def complete(self) -> bool:
        return self.format < 2 or not (set(self.units) - self.done)

    def progress(self) -> str:
        one, many = _WHAT.get(self.kind or "", ("unit", "units"))
        n = len(self.units)
        return f"{len(set(self.units) & self.done)} of {n} {one if n == 1 else many} finished"


def done_units(path: str | os.PathLike, sha: str | None) -> set[str]:
    """The units of the store at ``path`` whose completion marker exists and names the store's ``spec_sha256``."""
    folder = Path(path) / DONE
    done: set[str] = set()
    if not folder.is_dir():
        return done
    for entry in os.scandir(folder):
        marker = Path(entry.path) / "zarr.json"
        if entry.name.startswith(".") or not marker.is_file():
            continue
        try:
            attrs = json.loads(marker.read_text()).get("attributes", {})
        except (OSError, ValueError):
            continue
        if attrs.get("spec_sha256") == sha and attrs.get("unit") == entry.name:
            done.add(entry.name)
    return done


def store_status(path: str | os.PathLike) -> StoreStatus:
    """Read a store's kind, units and finished units (``kind=None`` for a folder that is no sthist store)."""
    import zarr

    try:
        attrs = dict(zarr.open_group(Path(path), mode="r").attrs)
    except Exception:  # zarr raises several types for folders that are not groups
        return StoreStatus(kind=None)
    kind = attrs.get(_KIND)
    if kind not in _WHAT:
        return StoreStatus(kind=None)
    fmt = int(attrs.get("format", 1))
    if fmt < 2:
        return StoreStatus(kind=kind, format=fmt)
    sha = attrs.get("spec_sha256")
    return StoreStatus(
        kind=kind,
        format=fmt,
        units=list(attrs.get("units", [])),
        done=done_units(path, sha),
        spec=attrs.get("spec"),
        spec_sha256=sha,
    )


def mark_done(path: str | os.PathLike, unit: str, sha: str, **info: Any) -> None:
    """Record that ``unit`` of the store at ``path`` is fully written: its marker, written atomically.

    Call it after the unit's last chunk is written. The marker is a zarr group ``_done/<unit>`` whose ``zarr.json``
    is written to a temporary name, flushed to disk and renamed, so it exists whole or not at all.
    """
    folder = Path(path) / DONE / unit
    folder.mkdir(parents=True, exist_ok=True)
    attrs = {
        "unit": unit,
        "spec_sha256": sha,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        **_json(info),
    }
    doc = {"zarr_format": 3, "node_type": "group", "attributes": attrs}
    tmp = folder / f".zarr.json.{uuid.uuid4().hex}.partial"
    try:
        with open(tmp, "w") as f:
            json.dump(doc, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / "zarr.json")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def incomplete_message(path: Path, status: StoreStatus, param: str = "store") -> str:
    fn = _CALL.get(status.kind or "", "sthist")
    return (
        f"{param}={str(path)!r} is an unfinished {status.kind} store ({status.progress()}; a run was interrupted, "
        f"failed or is still running). Finish it with `{fn}(..., {param}={str(path)!r}, resume=True)` and the same "
        "parameters, or start over with overwrite=True."
    )


def note_kept(err: BaseException, path: Path | None, *, fn: str, rest: str) -> None:
    """Tell a failed ``fn(store=...)`` call's user that the unfinished store is kept, and how to finish or restart it.

    The note goes on ``err`` (shown with its traceback) and to the log; ``rest`` says what resuming does, e.g.
    ``"extract only the rest"``. Nothing when no store was created.
    """
    from .._logging import info

    if path is None or not path.exists():
        return
    note = (
        f"The store {str(path)!r} is kept ({store_status(path).progress()}): call {fn} again with the same "
        f"parameters and resume=True to {rest}, or overwrite=True to start over."
    )
    err.add_note(note)
    info("    " + note)


def check_resume(path: Path, *, kind: str, spec: dict, fn: str) -> set[str]:
    """The finished units of the existing store at ``path``; raise when it cannot be resumed with ``spec``."""
    status = store_status(path)
    if status.kind != kind:
        what = "is not a store written by sthist" if status.kind is None else f"holds {status.kind}"
        raise ValueError(
            f"{fn}: resume=True but store={str(path)!r} {what}, not {kind}; choose another path, or overwrite=True to "
            "replace it."
        )
    if status.format < 2:
        raise ValueError(
            f"{fn}: store={str(path)!r} was written by an older sthist without completion records and cannot be "
            "resumed; pass overwrite=True to write it again."
        )
    diffs = spec_differences(status.spec, spec)
    if diffs:
        raise ValueError(
            f"{fn}: resume=True, but store={str(path)!r} was started with other parameters: "
            + "; ".join(diffs)
            + ". Call with the parameters the store was started with to finish it, or pass overwrite=True (or "
            "another path) to start over."
        )
    remove_partial(path)
    return status.done


def remove_partial(path: str | os.PathLike) -> int:
    """Delete the temporary files (``*.partial``) that writers killed mid-write left in a store; return how many.

    Called when a run resumes (one run per store at a time): the units they belonged to are not finished and are
    written again.
    """
    n = 0
    for f in Path(path).rglob("*.partial"):
        f.unlink(missing_ok=True)
        n += 1
    return n


def check_store(
    store: Any, *, overwrite: bool, param: str = "store", resume: bool = False, kind: str | None = None
) -> Path | None:
    """Validate a store path (``None`` passes); raise with the fix, touching nothing on disk.

    An existing path needs ``overwrite=True`` (a zarr store only) or ``resume=True`` (its parameters are checked
    later, by :func:`check_resume`); an unfinished sthist store without either says how to resume or start over.
    """
    if not isinstance(resume, bool):
        raise TypeError(f"resume must be True or False, got {resume!r}.")
    if store is None:
        if resume:
            raise ValueError(
                f"resume=True needs {param}=: only a zarr store records which work is finished; pass "
                f"{param}='....zarr'."
            )
        return None
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be True or False, got {overwrite!r}.")
    if resume and overwrite:
        raise ValueError(
            "Pass resume=True (finish the work an interrupted run left in the store) or overwrite=True (delete the "
            "store and start over), not both."
        )
    if not isinstance(store, str | os.PathLike):
        raise TypeError(f"{param} must be a path ending in '.zarr' (str or pathlib.Path), got {type(store).__name__}.")
    path = Path(store).expanduser()
    if path.suffix.lower() != ".zarr":
        raise ValueError(f"{param}={str(store)!r} must end in '.zarr' (a folder zarr creates), e.g. 'patches.zarr'.")
    if path.exists():
        is_zarr = path.is_dir() and ((path / "zarr.json").is_file() or (path / ".zgroup").is_file())
        if not overwrite and not resume:
            status = store_status(path) if is_zarr else StoreStatus(kind=None)
            if status.kind is not None and (kind is None or status.kind == kind) and not status.complete:
                raise ValueError(incomplete_message(path, status, param))
            raise ValueError(
                f"{param}={str(path)!r} already exists; pass overwrite=True to replace it, or choose another path."
            )
        if not is_zarr:
            raise ValueError(
                f"{param}={str(path)!r} exists and is not a zarr store; "
                + ("overwrite=True only replaces zarr stores" if overwrite else "resume=True needs a store of sthist")
                + ". Remove it yourself or choose another path."
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


def _staging(path: Path) -> Path:
    """A hidden sibling of ``path`` to build a new store in before it is renamed into place."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.creating")


def _publish(tmp: Path, path: Path) -> None:
    """Move the store built at ``tmp`` to ``path`` (replacing a store there: ``overwrite=True`` was checked)."""
    try:
        remove_store(path)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def _building(path: Path, kind: str, spec: dict | None) -> Iterator[tuple[Any, dict[str, Any]]]:
    """Build a new store of ``kind`` in a hidden sibling of ``path`` and rename it into place when the body ends.

    Yields the new zarr group and its attrs (kind, format, ``spec`` and ``spec_sha256`` set; the body adds its own),
    which are written last. A body that raises leaves nothing behind.
    """
    import zarr

    spec = dict(spec or {})
    attrs: dict[str, Any] = {_KIND: kind, "format": FORMAT, "spec": _json(spec), "spec_sha256": spec_sha256(spec)}
    tmp = _staging(path)
    try:
        group = zarr.open_group(tmp, mode="w")
        group.create_group(DONE, attributes={"about": "one group per finished unit; see sthist.pp._store"})
        yield group, attrs
        group.attrs.update(attrs)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, path)


def create_patch_store(
    path: Path,
    *,
    libs: list[str],
    counts: list[int],
    order: list[int],
    inverse: np.ndarray | None,
    S: int,
    spec: dict | None = None,
) -> str:
    """Create the store: one empty uint8 array per library and the attrs (metadata only; tasks fill the chunks).

    Built in a hidden sibling folder and renamed to ``path`` when complete (replacing a store there). Returns the
    store's ``spec_sha256``, which every completion marker names.
    """
    with _building(path, "patches", spec) as (group, attrs):
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
        attrs.update(
            {
                "libraries": list(libs),
                "arrays": [array_name(li) for li in order],
                "n_obs": int(sum(counts)),
                "patch_size": int(S),
                "obs_order": "grouped" if inverse is None else "permuted",
                "units": [array_name(li) for li in range(len(counts))],
            }
        )
    return attrs["spec_sha256"]


def write_rows(path: Path, name: str, start: int, block: np.ndarray) -> None:
    """Write ``block`` into rows ``start:start + len(block)`` of array ``name`` of the store at ``path``."""
    import zarr

    arr = zarr.open_array(Path(path) / name, mode="r+")
    arr[start : start + block.shape[0]] = block


def _open_complete(path: Path, kind: str) -> Any:
    """The zarr group of a complete store of ``kind``; raise when it is another kind or unfinished."""
    import zarr

    group = zarr.open_group(path, mode="r")
    if dict(group.attrs).get(_KIND) != kind:
        raise ValueError(f"{str(path)!r} is not a {kind} store written by `{_CALL[kind]}(store=...)`.")
    status = store_status(path)
    if not status.complete:
        raise ValueError(incomplete_message(path, status))
    return group


def open_patches(path: str | os.PathLike) -> Any:
    """The patches of a store written by ``extract_patches(store=...)`` as one dask array in obs order."""
    import dask.array as da

    path = Path(path)
    group = _open_complete(path, "patches")
    attrs = dict(group.attrs)
    parts = [da.from_zarr(group[name]) for name in attrs["arrays"]]
    out = parts[0] if len(parts) == 1 else da.concatenate(parts, axis=0)
    if attrs.get("obs_order") == "permuted":
        out = out[np.asarray(group["obs_index"][:])]
    return out


def block_name(k: int) -> str:
    return f"block_{k:06d}"


def create_embedding_store(path: Path, *, n: int, d: int, rows: int, spec: dict | None = None) -> str:
    """Create the store with its (n, d) float32 array, one chunk per block of ``rows`` rows; return ``spec_sha256``.

    Built in a hidden sibling folder and renamed to ``path`` when complete (replacing a store there).
    """
    rows = min(int(rows), max(int(n), 1))
    with _building(path, "embeddings", spec) as (group, attrs):
        group.create_array(
            "embeddings",
            shape=(n, d),
            chunks=(rows, d),
            dtype="float32",
            compressors=compressor("embeddings"),
            fill_value=0.0,
        )
        attrs.update({"n_obs": int(n), "block_rows": rows, "units": [block_name(k) for k in range(-(-int(n) // rows))]})
    return attrs["spec_sha256"]


def open_embeddings(path: str | os.PathLike) -> Any:
    """The embeddings of a store written by ``embed_patches(store=...)`` as a dask array."""
    import dask.array as da

    group = _open_complete(Path(path), "embeddings")
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

    Raises
    ------
    ValueError
        If the store is unfinished (a run that wrote it was interrupted or failed: finish it with ``resume=True``),
        or the folder is not a store written by sthist.
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
