"""The HEST-Benchmark linear probe as an sthist model: standardise features, PCA, ridge regression to expression.

On disk a ridge model is a folder: ``config.json`` (format ``"sthist.RidgeModel"``, genes, inputs, settings) and
``ridge_model.npz`` (the arrays, read with ``allow_pickle=False``, so loading never executes code).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._utils import jsonable
from .base import (
    CONFIG_FILE,
    BaseModel,
    ModelFileError,
    ModelInputs,
    Prediction,
    check_save_target,
    read_config,
    write_config,
)
from .calibration import attach_calibration, save_calibration

FORMAT = "sthist.RidgeModel"
FORMAT_VERSION = 2
NPZ_FILE = "ridge_model.npz"
#: Penalties searched with ``alpha="gcv"`` (the grid of the no-model baseline in ``../shared/baselines``).
GCV_ALPHAS = np.logspace(-1, 4, 12)
_ARRAYS = ("scaler_mean", "scaler_scale", "pca_mean", "pca_components", "coef", "intercept")


class RidgeModel(BaseModel):
    """A fitted linear probe from image features to gene expression (see :func:`sthist.tl.fit_ridge`).

    Prediction is ``((features - scaler_mean) / scaler_scale - pca_mean) @ pca_components.T @ coef.T + intercept``.

    Attributes
    ----------
    genes
        The genes predicted, in the column order of :meth:`predict`.
    inputs
        The :class:`~sthist._engine.base.ModelInputs` recorded at fit time (encoder, patch geometry).
    alpha
        Ridge penalty.
    n_components
        Number of principal components used.
    """

    format = FORMAT
    prediction = "regression"

    def __init__(
        self,
        *,
        genes: Sequence[str],
        inputs: ModelInputs,
        scaler_mean: np.ndarray,
        scaler_scale: np.ndarray,
        pca_mean: np.ndarray,
        pca_components: np.ndarray,
        coef: np.ndarray,
        intercept: np.ndarray,
        alpha: float,
        settings: dict[str, Any] | None = None,
    ) -> None:
        self.genes = [str(g) for g in genes]
        self.inputs = inputs
        self.scaler_mean = np.asarray(scaler_mean, dtype=np.float64)
        self.scaler_scale = np.asarray(scaler_scale, dtype=np.float64)
        self.pca_mean = np.asarray(pca_mean, dtype=np.float64)
        self.pca_components = np.asarray(pca_components, dtype=np.float64)
        self.coef = np.asarray(coef, dtype=np.float64)
        self.intercept = np.asarray(intercept, dtype=np.float64)
        self.alpha = float(alpha)
        self.settings = dict(settings or {})
        self._check_shapes()

    @property
    def method(self) -> str:
        return "ridge"

    @property
    def n_features(self) -> int:
        """Dimension of the input features."""
        return int(self.scaler_mean.shape[0])

    @property
    def n_components(self) -> int:
        """Number of principal components."""
        return int(self.pca_components.shape[0])

    @property
    def n_genes(self) -> int:
        """Number of genes predicted."""
        return len(self.genes)

    def __repr__(self) -> str:
        return (
            f"RidgeModel(encoder={self.inputs.encoder!r}, n_features={self.n_features}, "
            f"n_components={self.n_components}, n_genes={self.n_genes}, alpha={self.alpha:.3g})"
        )

    def _check_shapes(self, source: str = "RidgeModel") -> None:
        d = self.scaler_mean.shape[0] if self.scaler_mean.ndim == 1 else -1
        k = self.pca_components.shape[0] if self.pca_components.ndim == 2 else -1
        g = len(self.genes)
        expected = {
            "scaler_mean": (d,),
            "scaler_scale": (d,),
            "pca_mean": (d,),
            "pca_components": (k, d),
            "coef": (g, k),
            "intercept": (g,),
        }
        for name, shape in expected.items():
            arr = getattr(self, name)
            if arr.shape != shape or d <= 0 or k <= 0:
                raise ValueError(
                    f"{source}: parameter {name!r} has shape {arr.shape}, expected {shape} for {d} features, "
                    f"{k} components and {g} genes; the model files are inconsistent, refit with "
                    "`sthist.tl.fit_ridge`."
                )
            if not np.isfinite(arr).all():
                raise ValueError(f"{source}: parameter {name!r} holds NaN or infinite values; refit the model.")

    # ---- prediction ----------------------------------------------------------------------------------------------
    def transform(self, features: np.ndarray) -> np.ndarray:
        """Standardise and project features on the principal components, shape ``(n, n_components)``."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(
                f"features must have shape (n, {self.n_features}) like the features the model was fitted on; got "
                f"{x.shape}. Embed the patches with the same encoder ({self.inputs.encoder!r})."
            )
        if not np.isfinite(x).all():
            bad = np.flatnonzero(~np.isfinite(x).all(1))
            raise ValueError(f"features hold NaN or infinite values in {bad.size} row(s) (e.g. {bad[:5].tolist()}).")
        return ((x - self.scaler_mean) / self.scaler_scale - self.pca_mean) @ self.pca_components.T

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
        **options: Any,
    ) -> Prediction:
        """Predict expression (n, n_genes) from patches (encoded with the fit-time encoder) or features.

        ``coords``, ``groups`` and retrieval ``options`` (``k``, ``weighting``, ...) do not apply to a linear
        probe and are ignored. The spread is ``None``.
        """
        feats = self._features(images, features, device=device, progress=progress, batch_size=min(batch_size, 64))
        z = self.transform(feats)
        return Prediction((z @ self.coef.T + self.intercept).astype(np.float32), None)

    def refit_options(self) -> tuple[str, dict[str, Any]]:
        """``("ridge_gcv", ...)`` for a GCV penalty, else ``("ridge", ...)`` with HEST's rule or the penalty given."""
        rule = self.settings.get("alpha_rule", "hest")
        options: dict[str, Any] = {"n_components": int(self.settings.get("n_components_requested", self.n_components))}
        if rule == "given":
            options["alpha"] = self.alpha
        return ("ridge_gcv" if rule == "gcv" else "ridge"), options

    # ---- persistence ---------------------------------------------------------------------------------------------
    def save(self, dir_path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Write ``config.json`` and ``ridge_model.npz`` to the folder ``dir_path``."""
        path = check_save_target(dir_path, overwrite=overwrite)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "genes": self.genes,
            "inputs": self.inputs.to_dict(),
            "alpha": self.alpha,
            "n_features": self.n_features,
            "n_components": self.n_components,
            "settings": jsonable(self.settings),
        }
        np.savez(path / NPZ_FILE, **{name: getattr(self, name) for name in _ARRAYS})
        save_calibration(self, path)
        write_config(path, meta)

    @classmethod
    def load(cls, dir_path: str | os.PathLike, *, device: str | None = None) -> RidgeModel:
        """Read a model written by :meth:`save` (no code is executed: ``allow_pickle=False``); ``device`` is unused."""
        path = Path(dir_path)
        where = f"model folder {str(path)!r}"
        meta = read_config(path, expect=FORMAT)
        version = meta.get("format_version", meta.get("version"))
        if version not in (1, FORMAT_VERSION):
            raise ModelFileError(
                f"{where} has version {version!r}; this sthist reads versions 1 and {FORMAT_VERSION}. Refit the model."
            )
        missing_keys = [k for k in ("genes", "alpha") if k not in meta]
        if missing_keys:
            raise ModelFileError(f"{where}: {CONFIG_FILE} lacks {missing_keys}; the saved model is incomplete.")
        if not (path / NPZ_FILE).is_file():
            raise ModelFileError(f"{where} lacks {NPZ_FILE}; copy the whole folder.")
        try:
            with np.load(path / NPZ_FILE, allow_pickle=False) as npz:
                missing = [a for a in _ARRAYS if a not in npz.files]
                if missing:
                    raise ModelFileError(
                        f"{where}: {NPZ_FILE} lacks the arrays {missing}; the saved model is incomplete."
                    )
                arrays = {a: np.array(npz[a]) for a in _ARRAYS}
        except ModelFileError:
            raise
        except ValueError as err:
            raise ModelFileError(
                f"{where}: {NPZ_FILE} holds object arrays or is malformed ({err}); it was not written by sthist."
            ) from err
        except OSError as err:
            raise ModelFileError(f"{where}: {NPZ_FILE} is not a readable .npz file ({err}).") from err
        for a, arr in arrays.items():
            if arr.dtype.kind not in "fiu":
                raise ModelFileError(f"{where}: array {a!r} of {NPZ_FILE} has dtype {arr.dtype}, expected numbers.")
        if version == 1:  # written before models recorded their inputs
            enc = meta.get("encoder_params") or {}
            inputs = ModelInputs(
                encoder=str(enc.get("encoder") or ""),
                pretrained=bool(enc.get("pretrained")),
                checkpoint=enc.get("checkpoint") or None,
                feature_dim=int(arrays["scaler_mean"].shape[0]),
                patch_size=enc.get("patch_size"),
                mpp=enc.get("mpp"),
            )
        else:
            try:
                inputs = ModelInputs.from_dict(meta["inputs"])
            except (KeyError, TypeError, ValueError) as err:
                raise ModelFileError(f"{where}: {CONFIG_FILE} holds invalid model inputs ({err}).") from err
        try:
            model = cls(
                genes=meta["genes"],
                inputs=inputs,
                alpha=meta["alpha"],
                settings=meta.get("settings") or {},
                **{a: arr.astype(np.float64) for a, arr in arrays.items()},
            )
        except ValueError as err:
            raise ModelFileError(f"{where}: {err}") from err
        return attach_calibration(model, path)


def fit_ridge(
    features: np.ndarray,
    expression: np.ndarray,
    genes: Sequence[str],
    *,
    inputs: ModelInputs,
    n_components: int = 256,
    alpha: float | str | None = None,
    random_state: int | None = 0,
) -> RidgeModel:
    """Fit the HEST linear probe (see :func:`sthist.tl.fit_ridge` for the recipe) on numpy arrays.

    ``alpha="gcv"`` chooses one penalty for all genes from :data:`GCV_ALPHAS` by generalised (efficient
    leave-one-out) cross-validation (scikit-learn's ``RidgeCV``) instead of HEST's rule.

    Returns the model and logs nothing; ``n_components`` is clipped to ``min(n, d)`` (``settings`` records the
    value used).
    """
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge, RidgeCV

    from ._utils import check_int
    from .data import check_genes

    y = np.asarray(expression.toarray() if hasattr(expression, "toarray") else expression, dtype=np.float64)
    x = np.asarray(features, dtype=np.float64)
    if y.ndim != 2 or x.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"features (n, d) and expression (n, g) must be 2-d with the same rows, got {x.shape} and {y.shape}."
        )
    for name, arr in (("features", x), ("expression", y)):
        bad = ~np.isfinite(arr).all(1)
        if bad.any():
            raise ValueError(
                f"{name} hold NaN or infinite values for {int(bad.sum())} spot(s) (e.g. rows "
                f"{np.flatnonzero(bad)[:5].tolist()}); drop those spots or recompute them."
            )
    n, g = y.shape
    genes = check_genes(list(genes), g)
    n_components = check_int("n_components", n_components)
    gcv = isinstance(alpha, str) and alpha == "gcv"
    if (
        alpha is not None
        and not gcv
        and (
            isinstance(alpha, bool | str)
            or not isinstance(alpha, int | float | np.number)
            or not np.isfinite(alpha)
            or alpha < 0
        )
    ):
        raise ValueError(
            f"alpha must be a finite non-negative number, None (HEST's rule) or 'gcv' (chosen by generalised "
            f"cross-validation), got {alpha!r}."
        )
    if n < 2:
        raise ValueError(f"need at least 2 spots to fit the ridge probe, got {n}.")
    d = x.shape[1]
    k = min(n_components, n, d)
    mean = x.mean(0)
    scale = x.std(0)
    scale[scale <= np.finfo(np.float64).eps * np.maximum(np.abs(mean), 1.0)] = 1.0
    xs = (x - mean) / scale
    pca = PCA(n_components=k, random_state=random_state).fit(xs)
    z = (xs - pca.mean_) @ pca.components_.T
    y_mean = y.mean(0)
    if gcv:
        ridge = RidgeCV(alphas=GCV_ALPHAS, fit_intercept=False).fit(z, y - y_mean)
        alpha_ = float(ridge.alpha_)
    else:
        alpha_ = 100.0 / (k * g) if alpha is None else float(alpha)
        ridge = Ridge(alpha=alpha_, solver="lsqr", fit_intercept=False, max_iter=1000, random_state=random_state)
        ridge.fit(z, y - y_mean)
    coef = np.atleast_2d(ridge.coef_).reshape(g, k)
    return RidgeModel(
        genes=genes,
        inputs=inputs,
        scaler_mean=mean,
        scaler_scale=scale,
        pca_mean=pca.mean_,
        pca_components=pca.components_,
        coef=coef,
        intercept=y_mean,
        alpha=alpha_,
        settings={
            "n_components": k,
            "n_components_requested": n_components,
            "random_state": random_state,
            "alpha_rule": "gcv" if gcv else "hest" if alpha is None else "given",
        },
    )
