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
from pathlib import Path
from typing import Any

import numpy as np

from .base import (
    BaseModel,
    ModelFileError,
    ModelInputs,
    Prediction,
    check_save_target,
    read_config,
    write_config,
)

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
        **options: Any,
    ) -> Prediction:
        """Average expression of the ``k`` nearest bank spots of every query, and their spread.

        The spread per spot is the mean over genes of the standard deviation of the ``k`` retrieved profiles.
        ``coords``, ``groups`` and other retrieval options do not apply and are ignored.
        """
        k = self.prediction_settings(k=k)["k"]
        x = self._features(images, features, device=device, progress=progress, batch_size=min(batch_size, 64))
        q = ((np.asarray(x, dtype=np.float32) - self.mean) / self.scale).astype(np.float32)
        bank_sq = (self.bank * self.bank).sum(1)
        out = np.empty((q.shape[0], len(self.genes)), dtype=np.float32)
        spread = np.empty(q.shape[0], dtype=np.float32)
        for s in range(0, q.shape[0], max(1, int(chunk_size))):
            qc = q[s : s + chunk_size]
            d2 = bank_sq[None, :] - 2.0 * qc @ self.bank.T  # + |q|^2, the same for a row: not needed to rank
            idx = (
                np.argpartition(d2, k - 1, axis=1)[:, :k]
                if k < self.bank.shape[0]
                else np.tile(np.arange(self.bank.shape[0]), (qc.shape[0], 1))
            )
            nb = self.expression[idx]  # (q, k, g)
            out[s : s + qc.shape[0]] = nb.mean(1)
            spread[s : s + qc.shape[0]] = nb.std(1).mean(1)
        return Prediction(out, spread)

    def save(self, dir_path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Write ``config.json`` and ``knn_model.npz`` to the folder ``dir_path``."""
        path = check_save_target(dir_path, overwrite=overwrite)
        np.savez(path / NPZ_FILE, **{a: getattr(self, a) for a in _ARRAYS})
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
        path = Path(dir_path)
        where = f"model folder {str(path)!r}"
        meta = read_config(path, expect=FORMAT)
        if meta.get("format_version") != FORMAT_VERSION:
            raise ModelFileError(f"{where}: format version {meta.get('format_version')!r} is not {FORMAT_VERSION}.")
        if not (path / NPZ_FILE).is_file():
            raise ModelFileError(f"{where} lacks {NPZ_FILE}; copy the whole folder.")
        try:
            with np.load(path / NPZ_FILE, allow_pickle=False) as npz:
                arrays = {a: np.array(npz[a]) for a in _ARRAYS}
            return cls(genes=meta["genes"], inputs=ModelInputs.from_dict(meta["inputs"]), k=int(meta["k"]), **arrays)
        except (KeyError, TypeError, ValueError, OSError) as err:
            raise ModelFileError(f"{where}: the saved kNN model is incomplete or invalid ({err}).") from err


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
