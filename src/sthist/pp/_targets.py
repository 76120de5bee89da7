"""Expression targets: gene selection (:func:`select_genes`) and normalisation (:func:`normalize_expression`).

What the literature does, checked in the published code (the choices below are explained against it):

- HisToGene, Hist2ST and THItoGene on her2st read the raw counts of the gene panel only
  (``m[gene_set]``) and apply ``scprep.transform.log(scprep.normalize.library_size_normalize(m))``:
  each spot is divided by its library size *over the panel*, multiplied by 10,000 (scprep's default
  ``rescale=10000``; scprep releases before 1.0 rescaled to the median library size instead) and
  transformed with ``log10(1 + x)`` (scprep's default ``base=10``). See ``dataset.py`` in
  github.com/maxpmx/HisToGene (commit 63249e9f) and github.com/biomed-AI/Hist2ST (commit a8e00a58).
  This is ``flavor="hist2st"`` of :func:`normalize_expression`. Their 785-gene her2st panel is the
  per-section top-1000 highly variable genes, cut to genes detected in at least 1,000 spots (HisToGene paper).
- BLEEP (github.com/bowang-lab/BLEEP, ``preprocess.ipynb``) runs ``scanpy.pp.normalize_total`` (default
  target: the median library size) and natural ``log1p`` per slide, then takes the union over slides of
  the top-1,000 ``highly_variable_genes`` (scanpy's default ``flavor="seurat"`` dispersion).
- HEST-Benchmark (github.com/mahmoodlab/HEST, ``get_k_genes``) keeps genes detected in at least 10% of the
  spots of every sample, stacks the raw counts of all samples, applies ``log1p`` *without* library-size
  normalisation and takes ``highly_variable_genes(n_top_genes=50)`` (``flavor="seurat"``): the shipped
  ``var_50genes.json`` lists. Its ``"mean"`` criterion ranks genes by the mean of the raw counts. Its
  targets are ``log1p`` of the raw counts of those genes.
- ST-Net predicts the 250 genes of highest mean expression.
"""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .. import _constants as C
from .._anndata import layer_matrix
from .._docs import inject_docs
from .._logging import info
from .._validate import check_adata, check_choice, check_positive_int, resolve_genes

if TYPE_CHECKING:
    from anndata import AnnData

_SELECT_FLAVORS = ("heg", "hvg", "list")
_NORM_FLAVORS = ("log1p", "hist2st", "none")
_DEFAULT_N_TOP = 50
_SELECT_TARGET_SUM = 1e4


def _as_matrix(X):
    """Return ``X`` as a numpy array or a scipy CSR matrix (float64 not forced)."""
    from scipy import sparse

    if sparse.issparse(X):
        return sparse.csr_matrix(X)
    return np.asarray(X)


def _check_counts(X, *, fn: str, where: str) -> None:
    """Raise on NaN/inf/negative values; warn when the values look already log-transformed.

    Counts are what library-size normalisation needs. Non-integer values with a maximum below 20 are most
    likely log-transformed (a log1p of 1e4-normalised counts rarely exceeds 12); they only warn, as some users
    keep normalised, not logged, counts.
    """
    from scipy import sparse

    values = X.data if sparse.issparse(X) else np.asarray(X).ravel()
    if values.size == 0:
        return
    if np.issubdtype(values.dtype, np.floating):
        if not np.isfinite(values).all():
            raise ValueError(
                f"{fn}: {where} has NaN or infinite values; it needs raw counts. Pass the layer with the raw "
                "counts via `layer=`, or fill the gaps first (e.g. `np.nan_to_num`)."
            )
    vmin = values.min()
    if vmin < 0:
        raise ValueError(
            f"{fn}: {where} has negative values (min {vmin:.3g}), so it is not counts (scaled or centred data?). "
            "Pass the layer with the raw counts via `layer=`, e.g. after `adata.layers['counts'] = adata.X.copy()` "
            "was saved before scaling."
        )
    if np.issubdtype(values.dtype, np.floating):
        vmax = values.max()
        if vmax < 20 and not np.array_equal(values, np.round(values)):
            warnings.warn(
                f"{fn}: {where} holds non-integer values with maximum {vmax:.3g}: it looks log-transformed, but "
                "library-size normalisation expects counts. Pass the raw counts via `layer=` (or use "
                "`normalize_expression(..., flavor='none')` to take the values as they are).",
                UserWarning,
                stacklevel=3,
            )


def _library_normalize(X, lib_mask: np.ndarray, target_sum: float):
    """Scale each row to ``target_sum`` over the columns in ``lib_mask``; rows with zero library become 0.

    Returns the scaled matrix (float64, dense or CSR like the input) and the boolean mask of zero-library rows.
    """
    from scipy import sparse

    if sparse.issparse(X):
        X = sparse.csr_matrix(X, dtype=np.float64, copy=True)
        lib = (
            np.asarray(X[:, lib_mask].sum(axis=1)).ravel() if not lib_mask.all() else np.asarray(X.sum(axis=1)).ravel()
        )
    else:
        X = np.array(X, dtype=np.float64, copy=True)
        lib = X[:, lib_mask].sum(axis=1) if not lib_mask.all() else X.sum(axis=1)
    zero = lib <= 0
    scale = np.zeros_like(lib)
    scale[~zero] = target_sum / lib[~zero]
    if sparse.issparse(X):
        X.data *= np.repeat(scale, np.diff(X.indptr))
        X.eliminate_zeros()
    else:
        X *= scale[:, None]
    return X, zero


def _log1p_normalized(X, target_sum: float = _SELECT_TARGET_SUM):
    """``log1p(normalize_total(X, target_sum))`` with the library over all genes (float64, dense or CSR)."""
    from scipy import sparse

    Xn, _ = _library_normalize(X, np.ones(X.shape[1], dtype=bool), target_sum)
    if sparse.issparse(Xn):
        np.log1p(Xn.data, out=Xn.data)
    else:
        np.log1p(Xn, out=Xn)
    return Xn


def _gene_stat(Xn, stat: Literal["mean", "var"]) -> np.ndarray:
    """Per-gene mean or population variance (ddof=0) of a dense or CSR matrix."""
    from scipy import sparse

    n = Xn.shape[0]
    if sparse.issparse(Xn):
        mean = np.asarray(Xn.sum(axis=0)).ravel() / n
        if stat == "mean":
            return mean
        sq = np.asarray(Xn.multiply(Xn).sum(axis=0)).ravel() / n
        return np.maximum(sq - mean**2, 0.0)
    return Xn.mean(axis=0) if stat == "mean" else Xn.var(axis=0)


def _read_gene_file(path) -> list[str]:
    with open(path, encoding="utf-8") as fh:
        names = [s.strip() for s in fh]
    return [s for s in names if s and not s.startswith("#")]


def _listed_names(adata: AnnData, genes: Any, mask: np.ndarray) -> list[str]:
    """Return the genes of a ``flavor='list'`` selection in the order given (var order for masks and columns)."""
    import pandas as pd

    if isinstance(genes, str) and genes in adata.var.columns:
        return adata.var_names[mask].tolist()
    if isinstance(genes, str | os.PathLike):
        names = _read_gene_file(genes)
    elif isinstance(genes, np.ndarray | pd.Series) and np.asarray(genes).dtype == bool:
        return adata.var_names[mask].tolist()
    elif isinstance(genes, set | frozenset):
        names = sorted(genes, key=str)
    else:
        names = [str(g) for g in genes]
    return list(dict.fromkeys(names))


@inject_docs
def select_genes(
    adata: AnnData,
    *,
    flavor: Literal["heg", "hvg", "list"] = "heg",
    n_top: int | None = None,
    genes: Any = None,
    layer: str | None = None,
    groupby: str | None = None,
    key_added: str = C.GENES_KEY,
    copy: bool = False,
) -> AnnData | None:
    """Choose the genes to predict: highly expressed, highly variable, or a given list.

    The ranking statistics are computed on ``log1p(normalize_total(counts, target_sum=1e4))``: each spot is
    divided by its total counts over all genes, multiplied by 10,000 and transformed with the natural
    ``log1p``, i.e. scanpy's standard preprocessing. This differs in detail from the published pipelines:
    HEST-Benchmark ranks ``"var"`` genes by scanpy's ``seurat`` dispersion on ``log1p`` of un-normalised
    counts and its ``"mean"`` genes by the mean raw count; BLEEP uses ``seurat`` dispersion after
    ``normalize_total`` (median target) and ``log1p``, per slide, taking the union; HisToGene/Hist2ST's
    785-gene her2st panel is per-section HVGs cut to genes detected in at least 1,000 spots (use
    ``flavor="list"`` with that file to reproduce them).

    Parameters
    ----------
    {adata}
    flavor
        ``"heg"``: the ``n_top`` highly expressed genes, ranked by the mean over spots of the normalised
        expression above (ST-Net style, but on normalised log expression so a few deep spots do not dominate).
        ``"hvg"``: the ``n_top`` highly variable genes, ranked by the variance over spots (population variance)
        of that same normalised expression. This plain variance is chosen over scanpy's ``seurat``/``seurat_v3``
        dispersions on purpose: the prediction target is this log expression and models are scored by its
        per-gene correlation, which needs variance *in the target*; dispersion-normalised rankings favour
        lowly expressed genes whose ST counts are mostly zeros, ``seurat_v3`` needs integer counts and the
        optional ``scikit-misc``. To use scanpy's selection instead, run
        ``scanpy.pp.highly_variable_genes`` and pass ``flavor="list", genes="highly_variable"``.
        ``"list"``: the genes given by ``genes``, kept in the order given.
    n_top
        Number of genes to select. ``None`` means 50 for ``"heg"``/``"hvg"`` and every listed gene present for
        ``"list"``; for ``"list"`` an integer keeps the first ``n_top`` present genes in list order.
    genes
        For ``"list"`` (required): the genes to select, as a list of gene names, the name of a boolean column
        of ``adata.var`` or a path to a text file with one gene per line (e.g. the 785-gene her2st panel).
        For ``"heg"``/``"hvg"``: the candidate genes to rank, in the same forms; ``None`` ranks all genes.
        Listed genes absent from ``adata`` are skipped with a warning (an error if none is present).
    {layer} It must hold counts for ``"heg"``/``"hvg"``; unused for ``"list"``.
    groupby
        Column of ``adata.obs`` (e.g. ``"section"``) for ``"heg"``/``"hvg"``: the statistic is computed within
        each group and genes are ranked by its unweighted mean across groups, so one large or deep section
        does not dominate the choice. For ``"hvg"`` this ranks by within-group variance, so differences
        between sections (batch effects) do not count as variability. ``None`` pools all spots.
    key_added
        Name of the ``var`` column and the ``uns`` entry written.
    {copy}

    Returns
    -------
    ``None`` or a copy of ``adata`` (when ``copy=True``), with

    ``adata.var['sthist_genes' | key_added]``
        Boolean, ``True`` for the selected genes.
    ``adata.uns['sthist_genes' | key_added]['genes']``
        The selected gene names, ranked (best first) for ``"heg"``/``"hvg"``, in list order for ``"list"``.
    ``adata.uns['sthist_genes' | key_added]['scores']``
        For ``"heg"``/``"hvg"``: the ranking statistic of the selected genes, in the same order.
    ``adata.uns['sthist_genes' | key_added]['missing']``
        For ``"list"``, when some listed genes are absent: their names.
    ``adata.uns['sthist_genes' | key_added]['params']``
        ``flavor``, ``n_top`` (the number selected), ``layer`` (``"X"`` for ``adata.X``), and where used
        ``groupby``, ``target_sum``, ``statistic``, ``n_candidates`` and ``genes`` (the source when given
        as a column name or a file path).

    Examples
    --------
    >>> import sthist
    >>> adata = sthist.datasets.toy()  # doctest: +SKIP
    >>> sthist.pp.select_genes(adata, flavor="hvg", n_top=50, groupby="section")  # doctest: +SKIP
    >>> sthist.pp.select_genes(adata, flavor="list", genes="genes_785.txt", key_added="her2st_785")  # doctest: +SKIP
    """
    fn = "select_genes"
    check_adata(adata, fn=fn)
    check_choice("flavor", flavor, _SELECT_FLAVORS)
    if n_top is not None:
        n_top = check_positive_int("n_top", n_top)
    if not isinstance(key_added, str) or not key_added:
        raise ValueError(f"key_added must be a non-empty string, got {key_added!r}.")
    if flavor == "list":
        if genes is None:
            raise ValueError(
                "flavor='list' needs `genes=`: a list of gene names, a boolean adata.var column or a path to a text "
                "file with one gene per line. Use flavor='heg' or 'hvg' to rank genes instead."
            )
        if groupby is not None:
            raise ValueError("groupby= only applies to flavor='heg' or 'hvg'; drop it for flavor='list'.")
    groups = None
    if groupby is not None:
        if groupby not in adata.obs.columns:
            raise KeyError(f"groupby={groupby!r} is not a column of adata.obs; available: {list(adata.obs.columns)}.")
        groups = adata.obs[groupby]
        if groups.isna().any():
            raise ValueError(
                f"adata.obs[{groupby!r}] has {int(groups.isna().sum())} missing values; fill them or subset the spots first."
            )
    X = layer_matrix(adata, layer, fn=fn, what="counts") if flavor != "list" else None

    start = info(f"selecting genes ({flavor!r})")
    mask = resolve_genes(adata, genes)
    params: dict[str, Any] = {"flavor": flavor}
    if flavor != "list":
        params["layer"] = "X" if layer is None else layer
    if isinstance(genes, str | os.PathLike):
        params["genes"] = str(genes)
    result: dict[str, Any] = {}

    if flavor == "list":
        names = _listed_names(adata, genes, mask)
        var_set = set(adata.var_names)
        present = [g for g in names if g in var_set]
        missing = [g for g in names if g not in var_set]
        selected = present if n_top is None else present[:n_top]
        if missing:
            result["missing"] = missing
    else:
        X = _as_matrix(X)
        _check_counts(X, fn=fn, where="adata.X" if layer is None else f"adata.layers[{layer!r}]")
        n_top = _DEFAULT_N_TOP if n_top is None else n_top
        n_cand = int(mask.sum())
        if n_top > n_cand:
            raise ValueError(
                f"n_top={n_top} exceeds the {n_cand} candidate genes; pass n_top <= {n_cand} "
                "(or flavor='list' to take given genes)."
            )
        stat = "mean" if flavor == "heg" else "var"
        Xn = _log1p_normalized(X)
        if groups is None:
            scores = _gene_stat(Xn, stat)
        else:
            import pandas as pd

            codes, uniques = pd.factorize(groups)
            per_group = [_gene_stat(Xn[codes == k], stat) for k in range(len(uniques))]
            scores = np.mean(per_group, axis=0)
            params["groupby"] = groupby
            params["n_groups"] = len(uniques)
        cand_idx = np.flatnonzero(mask)
        order = cand_idx[np.argsort(-scores[cand_idx], kind="stable")][:n_top]
        selected = adata.var_names[order].tolist()
        result["scores"] = scores[order].astype(np.float64)
        params.update(
            target_sum=_SELECT_TARGET_SUM,
            statistic=f"{stat} of log1p(normalize_total(counts, 1e4))"
            + (f" per {groupby}, averaged" if groupby else ""),
            n_candidates=n_cand,
        )
    params["n_top"] = len(selected)

    adata = adata.copy() if copy else adata
    adata.var[key_added] = adata.var_names.isin(selected)
    adata.uns[key_added] = {"genes": np.asarray(selected, dtype=object), **result, "params": params}
    if "missing" in adata.uns[key_added]:
        adata.uns[key_added]["missing"] = np.asarray(result["missing"], dtype=object)
    info(
        f"    finished: {len(selected)} genes",
        time=start,
        deep=f"added\n    'var[{key_added!r}]', boolean gene selection\n    'uns[{key_added!r}]', genes and params",
    )
    return adata if copy else None


@inject_docs
def normalize_expression(
    adata: AnnData,
    *,
    flavor: Literal["log1p", "hist2st", "none"] = "log1p",
    target_sum: float = 1e4,
    genes: Any = None,
    layer: str | None = None,
    key_added: str = C.TARGETS_KEY,
    copy: bool = False,
) -> AnnData | None:
    """Normalise counts into the expression targets that models learn and are scored on.

    The layer is written for all genes (so gene indices stay those of ``adata``); ``genes`` only says which
    genes make up each spot's library size.

    Parameters
    ----------
    {adata}
    flavor
        ``"log1p"``: ``ln(1 + target_sum * x / library)``, scanpy's ``normalize_total`` + ``log1p``.
        ``"hist2st"``: ``log10(1 + target_sum * x / library)``, the targets of HisToGene, Hist2ST and
        THItoGene (``scprep`` ``library_size_normalize`` with its default rescale of 10,000, then ``log``
        with base 10, on the count matrix of the gene panel only). Pass the panel as ``genes`` (or give
        an ``adata`` already subset to it) to reproduce them.
        ``"none"``: the values of ``X``/``layer`` as they are (float32), for data normalised elsewhere or
        count-based losses; no checks, ``genes`` and ``target_sum`` are unused.
    target_sum
        Library size every spot is scaled to before the log.
    genes
        Genes whose counts are summed into each spot's library size: a list of gene names, the name of a
        boolean column of ``adata.var`` (e.g. the one :func:`select_genes` writes) or a path to a text file
        with one gene per line. ``None`` uses all genes (scanpy's convention). Values are written for all
        genes either way; those outside ``genes`` are scaled by the same per-spot factor.
    {layer} It must hold counts unless ``flavor="none"``.
    key_added
        Name of the layer and the ``uns`` entry written.
    {copy}

    Returns
    -------
    ``None`` or a copy of ``adata`` (when ``copy=True``), with

    ``adata.layers['targets' | key_added]``
        float32, shape ``(n_obs, n_vars)``; sparse (CSR) when the input is sparse, dense otherwise (both
        transforms map 0 to 0, so sparsity is kept). Spots whose library size is zero get 0 everywhere
        (with a warning), never NaN.
    ``adata.uns['targets' | key_added]['params']``
        ``flavor``, ``target_sum``, ``log_base`` (``"e"``, ``10`` or ``"none"``), ``layer`` (``"X"`` for
        ``adata.X``), ``genes`` (``"all"`` or the library gene names), ``n_library_genes`` and
        ``n_zero_library`` (spots set to 0).

    Examples
    --------
    >>> import sthist
    >>> sthist.pp.select_genes(adata, flavor="list", genes="genes_785.txt")  # doctest: +SKIP
    >>> sthist.pp.normalize_expression(adata, flavor="hist2st", genes="sthist_genes")  # doctest: +SKIP
    """
    fn = "normalize_expression"
    check_adata(adata, fn=fn)
    check_choice("flavor", flavor, _NORM_FLAVORS)
    if (
        isinstance(target_sum, bool)
        or not isinstance(target_sum, int | float | np.integer | np.floating)
        or not np.isfinite(target_sum)
        or target_sum <= 0
    ):
        raise ValueError(f"target_sum must be a positive finite number (e.g. 1e4), got {target_sum!r}.")
    if not isinstance(key_added, str) or not key_added:
        raise ValueError(f"key_added must be a non-empty string, got {key_added!r}.")
    X = _as_matrix(layer_matrix(adata, layer, fn=fn, what="counts"))
    lib_mask = resolve_genes(adata, genes)
    where = "adata.X" if layer is None else f"adata.layers[{layer!r}]"

    start = info(f"normalizing expression ({flavor!r})")
    n_zero = 0
    if flavor == "none":
        out = X.astype(np.float32, copy=True)
    else:
        _check_counts(X, fn=fn, where=where)
        out, zero_rows = _library_normalize(X, lib_mask, float(target_sum))
        n_zero = int(zero_rows.sum())
        from scipy import sparse

        data = out.data if sparse.issparse(out) else out
        np.log1p(data, out=data)
        if flavor == "hist2st":
            data /= np.log(10.0)
        out = out.astype(np.float32)
        if n_zero:
            warnings.warn(
                f"{fn}: {n_zero} of {adata.n_obs} spots (e.g. {adata.obs_names[zero_rows][:5].tolist()}) have a "
                f"library size of zero over the {int(lib_mask.sum())} library genes; their targets are set to 0. "
                "Consider removing these spots before training.",
                UserWarning,
                stacklevel=2,
            )

    params: dict[str, Any] = {
        "flavor": flavor,
        "target_sum": float(target_sum),
        "log_base": {"log1p": "e", "hist2st": 10, "none": "none"}[flavor],
        "layer": "X" if layer is None else layer,
        "genes": "all" if genes is None else np.asarray(adata.var_names[lib_mask].tolist(), dtype=object),
        "n_library_genes": int(lib_mask.sum()),
        "n_zero_library": n_zero,
    }
    if isinstance(genes, str | os.PathLike):
        params["genes_source"] = str(genes)

    adata = adata.copy() if copy else adata
    adata.layers[key_added] = out
    adata.uns[key_added] = {"params": params}
    info(
        "    finished",
        time=start,
        deep=f"added\n    'layers[{key_added!r}]', normalised expression\n    'uns[{key_added!r}]', params",
    )
    return adata if copy else None
