"""Neighbour-context retrieval in two spaces: sthist's recommended predictor on small cohorts (``"dual_knn"``).

A spot is described by its frozen image features next to the mean features of its ``n_neighbors`` nearest spots of
the same section (the tissue around it). Its prediction is the average of two retrievals of measured training
profiles:

1. the ``k`` nearest training spots in that context space (standardised features, as the raw-feature kNN);
2. the ``k`` nearest training spots in a learnt space aligned with expression: the context features projected
   linearly onto the first ``n_expression_components`` principal components of the training expression
   (standardise, PCA to at most ``n_components``, ridge with its penalty chosen by generalised cross-validation).

The second space is what a contrastive method learns (image features mapped where similar expression lies close),
fitted in closed form; the first keeps what the projection discards. Both return measured profiles, so the
prediction keeps the gene-gene structure of real spots. Nothing is random but the seeded PCA.

On disk: ``config.json`` (format ``"sthist.DualKNNModel"``) and ``dual_knn_model.npz`` (read with
``allow_pickle=False``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from .base import (
    BaseModel,
    ModelInputs,
    Prediction,
    check_save_target,
    load_npz_model,
    write_config,
)
from .calibration import attach_calibration, save_calibration

FORMAT = "sthist.DualKNNModel"
FORMAT_VERSION = 1
NPZ_FILE = "dual_knn_model.npz"
_ARRAYS = ("mean", "scale", "bank", "projection", "offset", "bank_learnt", "expression")

#: The two retrieval spaces, in the order their names are recorded.
SPACES = ("raw", "learnt")

#: Ridge penalties searched by generalised cross-validation (the grid of the no-model baseline of ``../shared``).
GCV_ALPHAS = np.logspace(-1, 4, 12)


def context_features(features: np.ndarray, coords: np.ndarray, groups: np.ndarray | None, n_neighbors: int):
    """``[features, mean features of the n_neighbors nearest spots of the same group]`` (n, 2 d).

    A spot alone in its group (no neighbour) gets its own features as context.
    """
    from .data import spatial_neighbors

    x = np.asarray(features, dtype=np.float64)
    nb = spatial_neighbors(coords, groups, n_neighbors)
    valid = nb >= 0
    count = valid.sum(1, keepdims=True)
    ctx = np.where(valid[..., None], x[np.where(valid, nb, 0)], 0.0).sum(1)
    ctx = np.where(count > 0, ctx / np.maximum(count, 1), x)
    return np.concatenate([x, ctx], axis=1)


def check_spaces(spaces: Any) -> tuple[str, ...]:
    """``spaces`` as a tuple of distinct names of :data:`SPACES` (at least one), in :data:`SPACES` order."""
    names = [spaces] if isinstance(spaces, str) else list(spaces) if isinstance(spaces, Sequence) else None
    if not names or any(not isinstance(n, str) or n not in SPACES for n in names) or len(set(names)) != len(names):
        raise ValueError(
            f"spaces must name one or both of {list(SPACES)} (each once), e.g. spaces=('raw', 'learnt'); got {spaces!r}."
        )
    return tuple(n for n in SPACES if n in names)


class DualKNNModel(BaseModel):
    """A fitted neighbour-context, two-space retrieval model (see :func:`sthist.tl.fit_dual_knn`).

    Attributes
    ----------
    genes
        The genes predicted, in the column order of :meth:`predict`.
    inputs
        The :class:`~sthist._engine.base.ModelInputs` recorded at fit time (``needs_neighbors`` is true).
    k
        Neighbours averaged per query in each space.
    n_neighbors
        Spatial neighbours whose mean features form a spot's context.
    spaces
        The retrievals averaged: ``("raw", "learnt")`` (the default), or one of them alone (an ablation).
    settings
        What the fit chose (ridge penalty, components).
    """

    format = FORMAT
    prediction = "retrieval"

    def __init__(
        self,
        *,
        genes: Sequence[str],
        inputs: ModelInputs,
        mean: np.ndarray,
        scale: np.ndarray,
        bank: np.ndarray,
        projection: np.ndarray,
        offset: np.ndarray,
        bank_learnt: np.ndarray,
        expression: np.ndarray,
        k: int = 50,
        n_neighbors: int = 12,
        spaces: Sequence[str] = SPACES,
        settings: dict[str, Any] | None = None,
    ) -> None:
        self.genes = [str(g) for g in genes]
        self.inputs = inputs
        self.mean = np.asarray(mean, dtype=np.float64)
        self.scale = np.asarray(scale, dtype=np.float64)
        self.bank = np.asarray(bank, dtype=np.float64)
        self.projection = np.asarray(projection, dtype=np.float64)
        self.offset = np.asarray(offset, dtype=np.float64)
        self.bank_learnt = np.asarray(bank_learnt, dtype=np.float64)
        self.expression = np.asarray(expression, dtype=np.float32)
        for name, v in (("k", k), ("n_neighbors", n_neighbors)):
            if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}.")
        self.k, self.n_neighbors = int(k), int(n_neighbors)
        self.spaces = check_spaces(spaces)
        self.settings = dict(settings or {})
        d, n, g, q = self.mean.shape[0], self.bank.shape[0], len(self.genes), self.offset.shape[0]
        if (
            self.scale.shape != (d,)
            or self.bank.shape != (n, d)
            or self.projection.shape != (d, q)
            or self.bank_learnt.shape != (n, q)
            or self.expression.shape != (n, g)
            or n == 0
        ):
            raise ValueError(
                f"DualKNNModel arrays are inconsistent: mean {self.mean.shape}, scale {self.scale.shape}, bank "
                f"{self.bank.shape}, projection {self.projection.shape}, bank_learnt {self.bank_learnt.shape}, "
                f"expression {self.expression.shape} for {g} genes."
            )

    @property
    def method(self) -> str:
        return "dual_knn"

    def __repr__(self) -> str:
        return (
            f"DualKNNModel(encoder={self.inputs.encoder!r}, k={self.k}, n_neighbors={self.n_neighbors}, "
            f"spaces={self.spaces!r}, "
            f"n_bank={self.bank.shape[0]}, n_genes={len(self.genes)})"
        )

    def prediction_settings(self, *, k: int | None = None, **_: Any) -> dict[str, Any]:
        """``k`` per space (the model's when ``None``, at most the bank size) and the ``"average"`` weighting."""
        k = self.k if k is None else k
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}.")
        return {
            "k": int(min(k, self.bank.shape[0])),
            "weighting": "average",
            "n_neighbors": self.n_neighbors,
            "spaces": list(self.spaces),
        }

    def embed(self, features: np.ndarray, coords: np.ndarray, groups: np.ndarray | None):
        """The standardised context features and their learnt (expression-aligned) coordinates of query spots."""
        from .data import check_coords, group_codes

        n = features.shape[0]
        coords = check_coords(coords, n)
        if coords is None:
            raise ValueError(
                "method 'dual_knn' reads each spot's spatial neighbours: pass coords= (and groups=, the section of "
                "each spot), e.g. through `sthist.tl.predict_expression(adata, model, library_key=...)`."
            )
        x = (context_features(features, coords, group_codes(groups, n), self.n_neighbors) - self.mean) / self.scale
        return x, x @ self.projection + self.offset

    def predict(
        self,
        *,
        images: Any = None,
        features: np.ndarray | None = None,
        coords: np.ndarray | None = None,
        groups: np.ndarray | None = None,
        batch_size: int = 256,
        device: str | None = None,
        progress: bool = False,
        k: int | None = None,
        chunk_size: int = 4096,
        gene_spread: bool = False,
        **options: Any,
    ) -> Prediction:
        """The average of the retrievals (both spaces by default), and the spread of the retrieved profiles.

        The spread per spot is the mean over genes of the standard deviation of the ``k`` profiles retrieved in
        each space, all spaces together (with ``gene_spread=True`` also that standard deviation per gene). Other
        retrieval options (``weighting``, ``index``) do not apply and are ignored.
        """
        k = self.prediction_settings(k=k)["k"]
        x = self._features(images, features, device=device, progress=progress, batch_size=min(batch_size, 64))
        q_raw, q_learnt = self.embed(np.asarray(x, dtype=np.float64), coords, groups)
        from .knn import RetrievedProfiles, iter_nearest

        queries = {"raw": (q_raw, self.bank), "learnt": (q_learnt, self.bank_learnt)}
        spaces = [iter_nearest(*queries[name], k, chunk_size) for name in self.spaces]
        result = RetrievedProfiles(q_raw.shape[0], len(self.genes), gene_spread)
        for chunk in zip(*spaces, strict=True):  # the same query rows in every space
            mean = sum(self.expression[idx].mean(1).astype(np.float64) for _, idx in chunk) / len(chunk)
            result.add(chunk[0][0], self.expression[np.concatenate([idx for _, idx in chunk], axis=1)], mean)
        return result.prediction()

    def embed_spots(
        self,
        *,
        images: Any = None,
        features: np.ndarray | None = None,
        coords: np.ndarray | None = None,
        groups: np.ndarray | None = None,
        batch_size: int = 256,
        device: str | None = None,
        progress: bool = False,
    ) -> np.ndarray:
        """The spots' standardised context features (their features next to their neighbours'): the raw space."""
        x = self._features(images, features, device=device, progress=progress, batch_size=min(batch_size, 64))
        return self.embed(np.asarray(x, dtype=np.float64), coords, groups)[0]

    def refit_options(self) -> tuple[str, dict[str, Any]]:
        """``("dual_knn", {...})``: ``k``, ``n_neighbors``, the components used and ``spaces``."""
        options: dict[str, Any] = {"k": self.k, "n_neighbors": self.n_neighbors, "spaces": self.spaces}
        for name in ("n_components", "n_expression_components"):
            if name in self.settings:
                options[name] = int(self.settings[name])
        return "dual_knn", options

    def save(self, dir_path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Write ``config.json`` and ``dual_knn_model.npz`` (and the calibration, if any) to the folder ``dir_path``."""
        path = check_save_target(dir_path, overwrite=overwrite)
        np.savez(path / NPZ_FILE, **{a: getattr(self, a) for a in _ARRAYS})
        save_calibration(self, path)
        write_config(
            path,
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "method": self.method,
                "genes": self.genes,
                "inputs": self.inputs.to_dict(),
                "k": self.k,
                "n_neighbors": self.n_neighbors,
                "spaces": list(self.spaces),
                "settings": self.settings,
            },
        )

    @classmethod
    def load(cls, dir_path: str | os.PathLike, *, device: str | None = None) -> DualKNNModel:
        """Read a model written by :meth:`save` (``allow_pickle=False``); ``device`` is unused."""
        model = load_npz_model(
            dir_path,
            expect=FORMAT,
            version=FORMAT_VERSION,
            npz_file=NPZ_FILE,
            names=_ARRAYS,
            what="dual_knn",
            build=lambda meta, arrays: cls(
                genes=meta["genes"],
                inputs=ModelInputs.from_dict(meta["inputs"]),
                k=int(meta["k"]),
                n_neighbors=int(meta["n_neighbors"]),
                spaces=meta.get("spaces", SPACES),
                settings=meta.get("settings") or {},
                **arrays,
            ),
        )
        return attach_calibration(model, dir_path)


def fit_dual_knn(
    features: np.ndarray,
    expression: np.ndarray,
    genes: Sequence[str],
    *,
    coords: np.ndarray,
    groups: np.ndarray | None,
    inputs: ModelInputs,
    k: int = 50,
    n_neighbors: int = 12,
    n_components: int = 64,
    n_expression_components: int = 32,
    spaces: Sequence[str] = SPACES,
    random_state: int | None = 0,
) -> DualKNNModel:
    """Fit :class:`DualKNNModel` on numpy arrays (see the module docstring); logs nothing."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import RidgeCV

    from .data import check_coords, check_features, check_genes, group_codes

    y = np.asarray(expression.toarray() if hasattr(expression, "toarray") else expression, dtype=np.float64)
    if y.ndim != 2 or not np.isfinite(y).all():
        raise ValueError(f"expression must be a finite 2-d array (n, g), got shape {y.shape} or non-finite values.")
    n, g = y.shape
    x = np.asarray(check_features(features, n), dtype=np.float64)
    genes = check_genes(list(genes), g)
    coords = check_coords(coords, n)
    if coords is None:
        raise ValueError("method 'dual_knn' reads each spot's spatial neighbours: pass coords= (spot centres).")
    counts = {"k": k, "n_neighbors": n_neighbors, "n_components": n_components}
    counts["n_expression_components"] = n_expression_components
    for name, v in counts.items():
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}.")
    if n < 3:
        raise ValueError(f"need at least 3 training spots to fit dual_knn, got {n}.")
    ctx = context_features(x, coords, group_codes(groups, n), int(n_neighbors))
    mean = ctx.mean(0)
    scale = ctx.std(0)
    scale[scale <= np.finfo(np.float64).eps * np.maximum(np.abs(mean), 1.0)] = 1.0
    bank = (ctx - mean) / scale
    # the learnt space: ridge from the feature components to the expression components, composed into one map
    n_pc = min(int(n_components), n - 1, bank.shape[1])
    n_ec = min(int(n_expression_components), n - 1, g)
    pca = PCA(n_components=n_pc, random_state=random_state).fit(bank)
    z = pca.transform(bank)
    ypca = PCA(n_components=n_ec, random_state=random_state).fit(y)
    t = ypca.transform(y)
    ridge = RidgeCV(alphas=GCV_ALPHAS).fit(z, t)
    coef = np.atleast_2d(ridge.coef_).reshape(n_ec, n_pc)
    projection = pca.components_.T @ coef.T  # (d, q)
    offset = np.asarray(ridge.intercept_, dtype=np.float64).reshape(n_ec) - pca.mean_ @ projection
    return DualKNNModel(
        genes=genes,
        inputs=inputs,
        mean=mean,
        scale=scale,
        bank=bank,
        projection=projection,
        offset=offset,
        bank_learnt=bank @ projection + offset,
        expression=y,
        k=int(k),
        n_neighbors=int(n_neighbors),
        spaces=spaces,
        settings={
            "alpha": float(ridge.alpha_),
            "n_components": n_pc,
            "n_expression_components": n_ec,
            "random_state": random_state,
        },
    )
