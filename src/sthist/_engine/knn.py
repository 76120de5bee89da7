"""Raw-feature kNN: the no-training control for every retrieval method.

A query spot's expression is the average expression of its ``k`` nearest training spots in the frozen encoder's
own feature space (Euclidean distance after standardising every feature with the training mean and standard
deviation, so that no feature dominates by its scale). Nothing is learnt: a retrieval method that does not beat
this has gained nothing from its training.

On disk: ``config.json`` (format ``"sthist.KNNModel"``) and ``knn_model.npz`` (the standardised bank and its
expression, read with ``allow_pickle=False``).
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

FORMAT = "sthist.KNNModel"
FORMAT_VERSION = 1
NPZ_FILE = "knn_model.npz"
_ARRAYS = ("mean", "scale", "bank", "expression")


class KNNModel(BaseModel):
    """The raw-feature kNN baseline (see :func:`sthist.tl.fit_knn`).

    Attributes
    ----------
    genes
        The genes predicted, in the column order of :meth:`predict`.
    inputs
        The :class:`~sthist._engine.base.ModelInputs` recorded at fit time.
    k
        Neighbours averaged per query.
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
        expression: np.ndarray,
        k: int = 50,
    ) -> None:
        self.genes = [str(g) for g in genes]
        self.inputs = inputs
        self.mean = np.asarray(mean, dtype=np.float32)
        self.scale = np.asarray(scale, dtype=np.float32)
        self.bank = np.asarray(bank, dtype=np.float32)
        self.expression = np.asarray(expression, dtype=np.float32)
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}.")
        self.k = int(k)
        d, n, g = self.mean.shape[0], self.bank.shape[0], len(self.genes)
        if self.scale.shape != (d,) or self.bank.shape != (n, d) or self.expression.shape != (n, g) or n == 0:
            raise ValueError(
                f"KNNModel arrays are inconsistent: mean {self.mean.shape}, scale {self.scale.shape}, bank "
                f"{self.bank.shape}, expression {self.expression.shape} for {g} genes."
            )

    @property
    def method(self) -> str:
        return "knn"

    def __repr__(self) -> str:
        return f"KNNModel(encoder={self.inputs.encoder!r}, k={self.k}, n_bank={self.bank.shape[0]}, n_genes={len(self.genes)})"

    def prediction_settings(self, *, k: int | None = None, **_: Any) -> dict[str, Any]:
        """``k`` (the model's when ``None``, at most the bank size) and the ``"average"`` weighting."""
        k = self.k if k is None else k
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}.")
        return {"k": int(min(k, self.bank.shape[0])), "weighting": "average"}

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
        """Average expression of the ``k`` nearest bank spots of every query, and their spread.

        The spread per spot is the mean over genes of the standard deviation of the ``k`` retrieved profiles (with
        ``gene_spread=True`` also that standard deviation per gene). ``coords``, ``groups`` and other retrieval
        options do not apply and are ignored.
        """
        k = self.prediction_settings(k=k)["k"]
        q = self.embed_spots(images=images, features=features, batch_size=batch_size, device=device, progress=progress)
        q = q.astype(np.float32)
        result = RetrievedProfiles(q.shape[0], len(self.genes), gene_spread)
        for rows, idx in iter_nearest(q, self.bank, k, chunk_size):
            result.add(rows, self.expression[idx])
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
        """The spots' features standardised with the training mean and standard deviation (the retrieval space)."""
        x = self._features(images, features, device=device, progress=progress, batch_size=min(batch_size, 64))
        return (np.asarray(x, dtype=np.float32) - self.mean) / self.scale

    def refit_options(self) -> tuple[str, dict[str, Any]]:
        """``("knn", {"k": k})``."""
        return "knn", {"k": self.k}

    def save(self, dir_path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Write ``config.json`` and ``knn_model.npz`` (and the calibration, if any) to the folder ``dir_path``."""
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
            },
        )

    @classmethod
    def load(cls, dir_path: str | os.PathLike, *, device: str | None = None) -> KNNModel:
        """Read a model written by :meth:`save` (``allow_pickle=False``); ``device`` is unused."""
        model = load_npz_model(
            dir_path,
            expect=FORMAT,
            version=FORMAT_VERSION,
            npz_file=NPZ_FILE,
            names=_ARRAYS,
            what="kNN",
            build=lambda meta, arrays: cls(
                genes=meta["genes"], inputs=ModelInputs.from_dict(meta["inputs"]), k=int(meta["k"]), **arrays
            ),
        )
        return attach_calibration(model, dir_path)


class RetrievedProfiles:
    """A :class:`Prediction` filled chunk by chunk from the expression profiles retrieved for the query spots."""

    def __init__(self, n: int, n_genes: int, gene_spread: bool):
        self.expression = np.empty((n, n_genes), dtype=np.float32)
        self.spread = np.empty(n, dtype=np.float32)
        self.gene_spread = np.empty_like(self.expression) if gene_spread else None

    def add(self, rows: slice, profiles: np.ndarray, mean: np.ndarray | None = None) -> None:
        """``profiles`` (rows, k, g): those retrieved for these rows; ``mean``: their prediction (default: the average).

        The spread per spot is the mean over genes of the profiles' standard deviation per gene.
        """
        self.expression[rows] = profiles.mean(1) if mean is None else mean
        sd = profiles.std(1)
        self.spread[rows] = sd.mean(1)
        if self.gene_spread is not None:
            self.gene_spread[rows] = sd

    def prediction(self) -> Prediction:
        return Prediction(self.expression, self.spread, self.gene_spread)


def iter_nearest(query: np.ndarray, bank: np.ndarray, k: int, chunk_size: int):
    """Exact Euclidean ``k`` nearest bank rows of the query rows, ``chunk_size`` queries at a time.

    Yields ``(rows, idx)``: the slice of query rows and their bank indices (len(rows), k), in no particular order
    within a row (all bank rows when ``k`` is at least the bank size).
    """
    bank_sq = (bank * bank).sum(1)
    chunk = max(1, int(chunk_size))
    for s in range(0, query.shape[0], chunk):
        q = query[s : s + chunk]
        d2 = bank_sq[None, :] - 2.0 * q @ bank.T  # + |q|^2, the same for a row: not needed to rank
        if k < bank.shape[0]:
            idx = np.argpartition(d2, k - 1, axis=1)[:, :k]
        else:
            idx = np.tile(np.arange(bank.shape[0]), (q.shape[0], 1))
        yield slice(s, s + q.shape[0]), idx


def fit_knn(
    features: np.ndarray, expression: np.ndarray, genes: Sequence[str], *, inputs: ModelInputs, k: int = 50
) -> KNNModel:
    """The kNN bank of the training spots: standardised features and their expression (nothing is learnt)."""
    from .data import check_features, check_genes

    y = np.asarray(expression.toarray() if hasattr(expression, "toarray") else expression, dtype=np.float32)
    if y.ndim != 2 or not np.isfinite(y).all():
        raise ValueError(f"expression must be a finite 2-d array (n, g), got shape {y.shape} or non-finite values.")
    x = check_features(features, y.shape[0])
    genes = check_genes(list(genes), y.shape[1])
    mean = x.mean(0)
    scale = x.std(0)
    scale[scale <= 1e-8] = 1.0
    bank = (x - mean) / scale
    return KNNModel(genes=genes, inputs=inputs, mean=mean, scale=scale, bank=bank, expression=y, k=k)
