"""Input checks that raise with the fix in the message. Never ``assert`` for validation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _constants as C

if TYPE_CHECKING:
    from anndata import AnnData


def check_adata(adata: Any, *, fn: str = "this function") -> None:
    """Raise if ``adata`` is not a non-empty AnnData."""
    from anndata import AnnData

    if not isinstance(adata, AnnData):
        raise TypeError(f"{fn} expects an AnnData as first argument, got {type(adata).__name__}.")
    if adata.n_obs == 0:
        raise ValueError(
            f"{fn} got an empty AnnData (0 observations). Check the filtering that produced it, "
            "e.g. `adata[adata.obs['in_tissue'] == 1]` on a table without in-tissue spots."
        )


def check_spatial(adata: AnnData, *, key: str = C.SPATIAL_KEY) -> np.ndarray:
    """Return ``adata.obsm[key]`` as float64 (n, 2), raising with the fix if it is missing or malformed."""
    if key not in adata.obsm:
        raise KeyError(
            f"adata.obsm[{key!r}] is missing: sthist needs the spot centres in full-resolution pixels "
            "(x = column, y = row), as scanpy/squidpy's Visium readers write them. Read your data with "
            "`sthist.io.read_visium`, `sthist.io.from_spatialdata` or `sthist.datasets.her2st`, or set "
            f"`adata.obsm[{key!r}] = coords` yourself."
        )
    coords = np.asarray(adata.obsm[key], dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] < 2:
        raise ValueError(f"adata.obsm[{key!r}] must have shape (n_obs, 2) with x, y pixel coordinates; got {coords.shape}.")
    coords = coords[:, :2]
    if not np.isfinite(coords).all():
        bad = adata.obs_names[~np.isfinite(coords).all(axis=1)][:5].tolist()
        raise ValueError(f"adata.obsm[{key!r}] has NaN or infinite coordinates (e.g. spots {bad}); drop these spots first.")
    return coords


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """Raise if ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {list(choices)}.")


def check_positive_int(name: str, value: Any) -> int:
    """Return ``value`` as int, raising unless it is a positive integer."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def resolve_library(adata: AnnData, *, library_id: str | None = None) -> str:
    """Resolve one library id in ``adata.uns['spatial']``; ambiguity raises with the list of choices."""
    libs = list(adata.uns.get(C.SPATIAL_KEY, {}).keys())
    if library_id is not None:
        if library_id not in libs:
            raise KeyError(f"library_id={library_id!r} is not in adata.uns['spatial']; available: {libs}.")
        return library_id
    if len(libs) == 1:
        return libs[0]
    if not libs:
        raise KeyError(
            "adata.uns['spatial'] holds no library: sthist needs the image and its scale factors there, "
            "as written by the Visium readers (`sthist.io.read_visium`, `squidpy.read.visium`)."
        )
    raise ValueError(
        f"adata.uns['spatial'] holds several libraries {libs}: pass `library_id=` for one, or "
        "`library_key=` naming the obs column that says which library each spot belongs to."
    )
