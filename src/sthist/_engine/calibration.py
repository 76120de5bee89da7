"""Calibration of a fitted model: conformal prediction intervals, per-gene reliability and a shift detector.

What :func:`sthist.tl.calibrate` attaches to a model (``model.calibration``), from leave-one-group-out predictions of
the training spots (each group predicted by the model's configuration refitted without it):

Intervals (split conformal, normalised scores; Lei et al. 2018, MAPIE's ``"residual_normalized"`` score)
    For spot ``i`` and gene ``g`` the interval is ``prediction ± q_g(level) * d_ig``. The difficulty ``d_ig`` is the
    geometric mean of two local scales: ``s_ig``, the spread (standard deviation) of the profiles the model retrieved
    for the spot (retrieval models; regression models have none and use ``h_ig`` alone), and ``h_ig``, the mean
    absolute out-of-group residual of gene ``g`` over the ``k_local`` calibration spots nearest to the spot in the
    model's own space (for the calibration spots themselves: the nearest spots of the *other* groups). ``q_g`` is
    the ``ceil((n + 1) level) / n`` empirical quantile of the calibration scores ``|y_ig - prediction_ig| / d_ig``
    of gene ``g``. Under exchangeability of the new spots with the calibration spots, the interval of every gene
    covers its measured value with probability at least ``level`` (marginally over spots; nothing more).
Per-gene reliability
    The cross-validated Pearson r of every gene (the mean over held-out groups of the within-group r), a 90 %
    interval from Fisher's z with the spread between groups and the number of spots, and ``reliable``: genes whose
    interval lies above ``min_r``.
Shift
    The mean distance of a spot to its ``k_shift`` nearest calibration spots in the model's standardised space, turned
    into a conformal p-value against the same distance of every calibration spot to the spots of the *other* groups
    (a new section seen by a model that never saw it). ``shift = 1 - p``; ``p <= ood_alpha`` flags the spot.

On disk, next to the model's own files: ``calibration.json`` (format, version, settings, provenance, genes) and
``calibration.npz`` (the arrays; read with ``allow_pickle=False``).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "sthist.Calibration"
FORMAT_VERSION = 1
JSON_FILE = "calibration.json"
NPZ_FILE = "calibration.npz"

#: Levels whose quantiles are always stored, so that a calibrated model gives intervals at any of them.
LEVELS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
#: The level of the interval of the cross-validated r whose lower end decides ``reliable``.
R_INTERVAL_LEVEL = 0.9
_ARRAYS = (
    "levels",
    "quantiles",
    "cv_r",
    "cv_r_low",
    "cv_r_high",
    "bank",
    "bank_residual",
    "emb_mean",
    "emb_scale",
    "shift_reference",
    "floor_spread",
    "floor_residual",
    "train_low",
    "train_high",
)


class ShiftWarning(UserWarning):
    """A slide, as a whole, is unlike the tissue a model was calibrated on: its intervals may not hold."""


def conformal_quantile(scores: np.ndarray, level: float) -> np.ndarray:
    """Per column, the ``ceil((n + 1) level) / n`` empirical quantile of ``scores`` (n, g); ``inf`` when n is too small.

    NaN scores (spots without a prediction) are left out of their column.
    """
    scores = np.asarray(scores, dtype=np.float64)
    out = np.full(scores.shape[1], np.inf)
    s = np.sort(np.where(np.isfinite(scores), scores, np.inf), axis=0)
    n = np.isfinite(scores).sum(0)
    rank = np.ceil((n + 1) * float(level)).astype(np.int64)  # 1-based rank of the order statistic
    ok = (rank <= n) & (n > 0)
    cols = np.flatnonzero(ok)
    out[cols] = s[rank[cols] - 1, cols]
    return out


def _neighbors(bank: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distances and indices of the ``k`` nearest bank rows of every query row (exact)."""
    from sklearn.neighbors import NearestNeighbors

    k = int(min(k, bank.shape[0]))
    nn = NearestNeighbors(n_neighbors=k).fit(bank)
    return nn.kneighbors(query, return_distance=True)


def _out_of_group(bank: np.ndarray, bank_groups: np.ndarray, query_groups: np.ndarray, query: np.ndarray, k: int):
    """For every query row, distances and bank indices of its ``k`` nearest bank rows of *other* groups."""
    k = int(k)
    dist = np.full((query.shape[0], k), np.nan)
    idx = np.full((query.shape[0], k), -1, dtype=np.int64)
    for g in np.unique(query_groups):
        rows = np.flatnonzero(query_groups == g)
        other = np.flatnonzero(bank_groups != g)
        if other.size == 0:
            continue
        d, i = _neighbors(bank[other], query[rows], k)
        dist[rows, : d.shape[1]] = d
        idx[rows, : i.shape[1]] = other[i]
    return dist, idx


def _local_mean(values: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Mean of ``values`` (n_bank, g) over the neighbour indices ``idx`` (n, k); -1 entries are ignored."""
    out = np.zeros((idx.shape[0], values.shape[1]), dtype=np.float64)
    count = np.zeros((idx.shape[0], 1))
    for j in range(idx.shape[1]):
        ok = idx[:, j] >= 0
        out[ok] += values[idx[ok, j]]
        count[ok] += 1
    return out / np.maximum(count, 1)


@dataclass
class Calibration:
    """What :func:`sthist.tl.calibrate` attached to a model; see the module docstring.

    Attributes
    ----------
    level
        The default level of the intervals.
    genes
        The model's genes, in the column order of every per-gene array.
    levels, quantiles
        The levels stored and the conformal quantile of every gene at each (levels x genes).
    cv_r, cv_r_low, cv_r_high
        Cross-validated Pearson r of every gene and its 90 % interval.
    min_r
        Genes whose interval lies above ``min_r`` are ``reliable``.
    uses_spread
        Whether the difficulty uses the spread of the model's retrieved profiles (retrieval models).
    nonnegative
        The training targets are non-negative: lower bounds are clipped at 0.
    train_low, train_high
        The 5 % and 95 % quantiles of every gene over the training spots (its training range).
    bank, bank_residual, emb_mean, emb_scale
        The calibration spots in the model's standardised space and their absolute out-of-group residuals.
    shift_reference
        Sorted out-of-group shift distances of the calibration spots.
    k_local, k_shift, ood_alpha
        Neighbours of the local residual scale and of the shift distance; the p-value under which a spot is flagged.
    provenance
        Groups, spots per group, how the groups were made, the model's configuration, the level and the date.
    """

    level: float
    genes: list[str]
    levels: np.ndarray
    quantiles: np.ndarray
    cv_r: np.ndarray
    cv_r_low: np.ndarray
    cv_r_high: np.ndarray
    min_r: float
    uses_spread: bool
    nonnegative: bool
    train_low: np.ndarray
    train_high: np.ndarray
    bank: np.ndarray
    bank_residual: np.ndarray
    emb_mean: np.ndarray
    emb_scale: np.ndarray
    shift_reference: np.ndarray
    floor_spread: np.ndarray
    floor_residual: np.ndarray
    k_local: int = 30
    k_shift: int = 10
    ood_alpha: float = 0.01
    provenance: dict[str, Any] = field(default_factory=dict)

    # ---- derived ------------------------------------------------------------------------------------------------
    @property
    def reliable(self) -> np.ndarray:
        """Genes whose cross-validated r is reliably above :attr:`min_r` (the lower end of its 90 % interval)."""
        return np.asarray(self.cv_r_low > self.min_r)

    def quantile(self, level: float | None = None) -> np.ndarray:
        """The per-gene conformal quantile at ``level`` (one of :attr:`levels`; ``None``: :attr:`level`)."""
        level = self.level if level is None else float(level)
        hit = np.flatnonzero(np.isclose(self.levels, level))
        if hit.size == 0:
            raise ValueError(
                f"level={level} was not calibrated; choose one of {[float(v) for v in self.levels]} or calibrate again "
                "with `sthist.tl.calibrate(adata, model, level=...)`."
            )
        return self.quantiles[hit[0]]

    def standardise(self, embedding: np.ndarray) -> np.ndarray:
        """``embedding`` (n, p) in the calibration's standardised space."""
        emb = np.asarray(embedding, dtype=np.float64)
        if emb.ndim != 2 or emb.shape[1] != self.emb_mean.shape[0]:
            raise ValueError(
                f"the spots' embedding has shape {emb.shape}, the calibration's space has {self.emb_mean.shape[0]} "
                "dimensions; was the model refitted after calibrating it? Calibrate it again."
            )
        return (emb - self.emb_mean) / self.emb_scale

    def difficulty(self, embedding: np.ndarray, gene_spread: np.ndarray | None) -> np.ndarray:
        """The difficulty ``d`` (n, g) of new spots: see the module docstring."""
        x = self.standardise(embedding)
        _, idx = _neighbors(self.bank, x, self.k_local)
        h = _local_mean(self.bank_residual.astype(np.float64), idx) + self.floor_residual
        if not self.uses_spread:
            return h
        if gene_spread is None:
            raise ValueError("this calibration uses the spread of the retrieved profiles: pass gene_spread=.")
        return np.sqrt((np.asarray(gene_spread, dtype=np.float64) + self.floor_spread) * h)

    def intervals(
        self, prediction: np.ndarray, embedding: np.ndarray, gene_spread: np.ndarray | None, level: float | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Lower and upper bounds (n, g) float32 at ``level`` around ``prediction`` (n, g)."""
        half = self.quantile(level) * self.difficulty(embedding, gene_spread)
        pred = np.asarray(prediction, dtype=np.float64)
        lower, upper = pred - half, pred + half
        if self.nonnegative:
            lower = np.maximum(lower, 0.0)
        return lower.astype(np.float32), upper.astype(np.float32)

    def shift(self, embedding: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per spot: ``shift`` in [0, 1] (1 - the conformal p-value) and the ``ood`` flag (p <= :attr:`ood_alpha`)."""
        x = self.standardise(embedding)
        d, _ = _neighbors(self.bank, x, self.k_shift)
        score = d.mean(1)
        ref = self.shift_reference
        above = ref.size - np.searchsorted(ref, score, side="left")  # calibration scores >= the spot's
        p = (1.0 + above) / (ref.size + 1.0)
        return (1.0 - p).astype(np.float32), p <= self.ood_alpha

    def summary(self) -> dict[str, Any]:
        """JSON-friendly description: level, genes, reliable genes, settings and provenance."""
        return {
            "level": self.level,
            "levels": [float(v) for v in self.levels],
            "n_genes": len(self.genes),
            "n_reliable": int(self.reliable.sum()),
            "min_r": self.min_r,
            "uses_spread": self.uses_spread,
            "nonnegative": self.nonnegative,
            "k_local": self.k_local,
            "k_shift": self.k_shift,
            "ood_alpha": self.ood_alpha,
            "n_bank": int(self.bank.shape[0]),
            **self.provenance,
        }

    def __repr__(self) -> str:
        p = self.provenance
        return (
            f"Calibration(level={self.level}, {len(self.genes)} genes ({int(self.reliable.sum())} reliable at r > "
            f"{self.min_r}), {p.get('n_spots', '?')} spots in {len(p.get('groups', []))} groups of "
            f"{p.get('groupby', '?')!r})"
        )

    # ---- files --------------------------------------------------------------------------------------------------
    def save(self, dir_path: str | os.PathLike) -> None:
        """Write ``calibration.json`` and ``calibration.npz`` into the model folder ``dir_path``."""
        path = Path(dir_path)
        np.savez(path / NPZ_FILE, **{name: np.asarray(getattr(self, name)) for name in _ARRAYS})
        doc = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "level": self.level,
            "genes": list(self.genes),
            "min_r": self.min_r,
            "uses_spread": self.uses_spread,
            "nonnegative": self.nonnegative,
            "k_local": self.k_local,
            "k_shift": self.k_shift,
            "ood_alpha": self.ood_alpha,
            "provenance": self.provenance,
        }
        tmp = path / (JSON_FILE + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(path / JSON_FILE)

    @classmethod
    def load(cls, dir_path: str | os.PathLike) -> Calibration | None:
        """The calibration saved in the model folder ``dir_path``, or ``None`` when it holds none."""
        from .base import ModelFileError

        path = Path(dir_path)
        if not (path / JSON_FILE).is_file():
            return None
        where = f"model folder {str(path)!r}"
        try:
            doc = json.loads((path / JSON_FILE).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ModelFileError(f"{where}: {JSON_FILE} is not valid JSON ({err}).") from err
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ModelFileError(f"{where}: {JSON_FILE} is not an sthist calibration.")
        if doc.get("format_version") != FORMAT_VERSION:
            raise ModelFileError(
                f"{where}: calibration format version {doc.get('format_version')!r} is not {FORMAT_VERSION}; calibrate "
                "the model again with `sthist.tl.calibrate`."
            )
        if not (path / NPZ_FILE).is_file():
            raise ModelFileError(f"{where} lacks {NPZ_FILE}; copy the whole folder, or calibrate again.")
        try:
            with np.load(path / NPZ_FILE, allow_pickle=False) as npz:
                arrays = {name: np.array(npz[name]) for name in _ARRAYS}
            return cls(
                level=float(doc["level"]),
                genes=[str(g) for g in doc["genes"]],
                min_r=float(doc["min_r"]),
                uses_spread=bool(doc["uses_spread"]),
                nonnegative=bool(doc["nonnegative"]),
                k_local=int(doc["k_local"]),
                k_shift=int(doc["k_shift"]),
                ood_alpha=float(doc["ood_alpha"]),
                provenance=dict(doc.get("provenance") or {}),
                **arrays,
            )
        except (KeyError, TypeError, ValueError, OSError) as err:
            raise ModelFileError(f"{where}: the saved calibration is incomplete or invalid ({err}).") from err


def save_calibration(model: Any, dir_path: str | os.PathLike) -> None:
    """Write ``model.calibration`` next to the model's files, or remove a stale one when the model has none."""
    path = Path(dir_path)
    cal = getattr(model, "calibration", None)
    if cal is None:
        for name in (JSON_FILE, NPZ_FILE):
            (path / name).unlink(missing_ok=True)
        return
    cal.save(path)


def attach_calibration(model: Any, dir_path: str | os.PathLike) -> Any:
    """``model`` with the calibration saved in ``dir_path`` attached (checked against its genes)."""
    cal = Calibration.load(dir_path)
    if cal is not None and list(cal.genes) != list(model.genes):
        from .base import ModelFileError

        raise ModelFileError(
            f"model folder {str(dir_path)!r}: its calibration is for other genes than the model's; calibrate again."
        )
    model.calibration = cal
    return model


def _cv_r(per_group_r: np.ndarray, per_group_n: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean over groups of the per-gene r, and its 90 % interval (Fisher's z, between-group spread and spots)."""
    from scipy.stats import norm

    r = np.asarray(per_group_r, dtype=np.float64)
    n_groups = np.isfinite(r).sum(0)
    z = np.arctanh(np.clip(r, -0.999999, 0.999999))
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # genes without a finite r in two groups: handled below
        mean_r = np.nanmean(r, 0)
        zbar = np.nanmean(z, 0)
        between = np.where(n_groups >= 2, np.nanvar(z, 0, ddof=1), 0.0) if r.shape[0] >= 2 else np.zeros(r.shape[1])
        n_spots = float(np.sum(per_group_n))
        within = 1.0 / max(n_spots - 3.0 * r.shape[0], 1.0)
        se = np.sqrt(np.nan_to_num(between) / np.maximum(n_groups, 1) + within)
    zq = norm.ppf(0.5 + R_INTERVAL_LEVEL / 2)
    low, high = np.tanh(zbar - zq * se), np.tanh(zbar + zq * se)
    return mean_r, np.where(np.isfinite(low), low, -1.0), np.where(np.isfinite(high), high, 1.0)


def fit_calibration(
    *,
    genes: Sequence[str],
    expression: np.ndarray,
    prediction: np.ndarray,
    gene_spread: np.ndarray | None,
    embedding: np.ndarray,
    groups: np.ndarray,
    per_group_r: np.ndarray,
    per_group_n: np.ndarray,
    level: float = 0.9,
    min_r: float = 0.2,
    k_local: int = 30,
    k_shift: int = 10,
    ood_alpha: float = 0.01,
    max_bank: int = 20_000,
    random_state: int = 0,
    provenance: dict[str, Any] | None = None,
) -> Calibration:
    """A :class:`Calibration` from out-of-group predictions of the training spots.

    ``expression`` (n, g) are the measured targets, ``prediction`` the out-of-group predictions (n, g),
    ``gene_spread`` the spread of the profiles retrieved for them (``None`` for regression models), ``embedding`` the
    spots in the *final* model's space (n, p), ``groups`` their group (n,), and ``per_group_r`` / ``per_group_n`` the
    per-gene r and spots of every held-out group.
    """
    y = np.asarray(expression, dtype=np.float64)
    pred = np.asarray(prediction, dtype=np.float64)
    n, g = y.shape
    if pred.shape != (n, g) or len(genes) != g:
        raise ValueError(f"prediction {pred.shape} and expression {y.shape} must match, with {len(genes)} genes.")
    groups = np.asarray(groups).astype(str)
    keep = np.isfinite(pred).all(1)
    if keep.sum() < 10:
        raise ValueError(
            f"only {int(keep.sum())} spots have an out-of-group prediction; calibration needs at least 10."
        )
    y, pred, groups = y[keep], pred[keep], groups[keep]
    emb = np.asarray(embedding, dtype=np.float64)[keep]
    spread = None if gene_spread is None else np.asarray(gene_spread, dtype=np.float64)[keep]
    residual = np.abs(y - pred)

    emb_mean = emb.mean(0)
    emb_scale = emb.std(0)
    emb_scale[emb_scale <= 1e-12 * np.maximum(np.abs(emb_mean), 1.0)] = 1.0
    x = (emb - emb_mean) / emb_scale
    floor_residual = 0.05 * residual.mean(0) + 1e-8
    floor_spread = np.zeros(g) if spread is None else 0.05 * spread.mean(0) + 1e-8

    # cross-fitted local residual scale of the calibration spots: their nearest spots of the other groups
    _, idx = _out_of_group(x, groups, groups, x, k_local)
    h = _local_mean(residual, idx) + floor_residual
    d = h if spread is None else np.sqrt((spread + floor_spread) * h)
    scores = residual / d
    levels = np.unique(np.round([*LEVELS, float(level)], 6))
    quantiles = np.stack([conformal_quantile(scores, lv) for lv in levels])

    dist, _ = _out_of_group(x, groups, groups, x, k_shift)
    shift_reference = np.sort(np.nanmean(dist, 1))

    bank_rows = np.arange(x.shape[0])
    if bank_rows.size > max_bank:
        bank_rows = np.sort(np.random.default_rng(random_state).choice(bank_rows, max_bank, replace=False))
    cv_r, cv_low, cv_high = _cv_r(per_group_r, per_group_n)
    prov = dict(provenance or {})
    prov.update(n_spots=int(keep.sum()), n_unpredicted=int((~keep).sum()))
    return Calibration(
        level=float(level),
        genes=[str(v) for v in genes],
        levels=levels,
        quantiles=quantiles,
        cv_r=cv_r,
        cv_r_low=cv_low,
        cv_r_high=cv_high,
        min_r=float(min_r),
        uses_spread=spread is not None,
        nonnegative=bool((y >= 0).all()),
        train_low=np.quantile(y, 0.05, axis=0),
        train_high=np.quantile(y, 0.95, axis=0),
        bank=x[bank_rows].astype(np.float32),
        bank_residual=residual[bank_rows].astype(np.float32),
        emb_mean=emb_mean,
        emb_scale=emb_scale,
        shift_reference=shift_reference,
        floor_spread=floor_spread,
        floor_residual=floor_residual,
        k_local=int(k_local),
        k_shift=int(k_shift),
        ood_alpha=float(ood_alpha),
        provenance=prov,
    )
