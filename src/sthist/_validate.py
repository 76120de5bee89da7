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
        raise ValueError(
            f"adata.obsm[{key!r}] must have shape (n_obs, 2) with x, y pixel coordinates; got {coords.shape}."
        )
    coords = coords[:, :2]
    if not np.isfinite(coords).all():
        bad = adata.obs_names[~np.isfinite(coords).all(axis=1)][:5].tolist()
        raise ValueError(
            f"adata.obsm[{key!r}] has NaN or infinite coordinates (e.g. spots {bad}); drop these spots first."
        )
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


def resolve_genes(adata: AnnData, genes: Any) -> np.ndarray:
    """Resolve a gene selection to a boolean mask over ``adata.var_names``.

    Parameters
    ----------
    adata
        The AnnData whose genes are selected.
    genes
        ``None`` (all genes); the name of a boolean column of ``adata.var``; a path (``str`` or
        :class:`os.PathLike`) to a text file with one gene name per line (blank lines and lines starting
        with ``#`` are skipped); a list-like of gene names; or a boolean array of length ``n_vars``.
        A string is looked up as a ``var`` column first, then as a file.

    Returns
    -------
    Boolean array of shape ``(n_vars,)``.

    Raises
    ------
    KeyError
        Unknown ``var`` column, or none of the listed genes is in ``adata.var_names``.
    FileNotFoundError
        A path-like string that names no file.
    TypeError, ValueError
        Malformed input (non-boolean column, wrong mask length, empty list or file, selection of no gene).

    Warns
    -----
    UserWarning
        Some, but not all, listed genes are absent from ``adata.var_names`` (how many, and a few names).
    """
    import os
    import warnings
    from pathlib import Path

    import pandas as pd

    n_vars = adata.n_vars
    if genes is None:
        return np.ones(n_vars, dtype=bool)

    if isinstance(genes, str) and genes in adata.var.columns:
        col = adata.var[genes]
        if not pd.api.types.is_bool_dtype(col.dtype):
            raise TypeError(
                f"adata.var[{genes!r}] has dtype {col.dtype}, but a gene selection column must be boolean. "
                f"Convert it, e.g. `adata.var[{genes!r}] = adata.var[{genes!r}] == 1`, or pass a list of gene names."
            )
        if col.isna().any():
            raise ValueError(f"adata.var[{genes!r}] has missing values; fill them, e.g. `.fillna(False)`.")
        mask = np.array(col, dtype=bool)  # a copy, never a view of adata.var
        if not mask.any():
            raise ValueError(f"adata.var[{genes!r}] selects no gene (all False).")
        return mask

    if isinstance(genes, str | os.PathLike):
        path = Path(genes)
        if path.is_file():
            with path.open(encoding="utf-8") as fh:
                names = [s.strip() for s in fh]
            names = [s for s in names if s and not s.startswith("#")]
            if not names:
                raise ValueError(f"Gene file {str(path)!r} lists no gene: write one gene name per line.")
            source = f"gene file {str(path)!r}"
        elif isinstance(genes, os.PathLike) or os.sep in genes or "/" in genes or path.suffix in {".txt", ".tsv"}:
            raise FileNotFoundError(
                f"Gene file {str(path)!r} does not exist; pass an existing text file with one gene per line."
            )
        else:
            bool_cols = [c for c in adata.var.columns if pd.api.types.is_bool_dtype(adata.var[c].dtype)]
            in_var = genes in adata.var_names
            hint = f" To select the one gene {genes!r}, pass a list: genes=[{genes!r}]." if in_var else ""
            raise KeyError(
                f"genes={genes!r} is neither a column of adata.var nor an existing file. Boolean columns of "
                f"adata.var: {bool_cols}.{hint} Pass a column name (e.g. one written by `sthist.pp.select_genes`), "
                "a list of gene names or a path to a text file with one gene per line."
            )
    else:
        if isinstance(genes, pd.Series | pd.Index):
            genes = genes.to_numpy()
        elif isinstance(genes, set | frozenset):
            genes = sorted(genes, key=str)
        if isinstance(genes, np.ndarray) and genes.dtype == bool:
            if genes.ndim != 1 or genes.shape[0] != n_vars:
                raise ValueError(f"A boolean gene mask must have shape ({n_vars},) (adata.n_vars), got {genes.shape}.")
            if not genes.any():
                raise ValueError("The boolean gene mask selects no gene (all False).")
            return genes.copy()
        try:
            names = list(genes)
        except TypeError:
            raise TypeError(
                f"genes must be None, a var column name, a file path, a list of gene names or a boolean mask; "
                f"got {type(genes).__name__}."
            ) from None
        if not names:
            raise ValueError("genes is an empty list: pass at least one gene name, or None for all genes.")
        bad = [g for g in names if not isinstance(g, str)]
        if bad:
            raise TypeError(f"Gene names must be strings; got {bad[:3]!r} ({type(bad[0]).__name__}).")
        names = [str(g) for g in names]
        source = "genes"

    present = adata.var_names.isin(names)
    wanted = list(dict.fromkeys(names))
    var_set = set(adata.var_names)
    missing = [g for g in wanted if g not in var_set]
    if not present.any():
        lower = {v.lower() for v in adata.var_names}
        case_hint = (
            " Some match when case is ignored: check the spelling of the names."
            if any(g.lower() in lower for g in wanted)
            else ""
        )
        raise KeyError(
            f"None of the {len(wanted)} genes of {source} is in adata.var_names (e.g. {wanted[:3]} vs "
            f"{adata.var_names[:3].tolist()}).{case_hint} If your gene symbols are in a column of adata.var, "
            "set `adata.var_names = adata.var[column]` (then `adata.var_names_make_unique()`)."
        )
    if missing:
        warnings.warn(
            f"{len(missing)} of {len(wanted)} genes of {source} are not in adata.var_names and are skipped, "
            f"e.g. {missing[:5]}.",
            UserWarning,
            stacklevel=3,
        )
    return np.asarray(present, dtype=bool)
