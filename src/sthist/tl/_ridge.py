"""The HEST-Benchmark linear probe: standardise features, PCA, ridge regression to gene expression."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import _logging as logg
from .._docs import inject_docs
from .._engine._utils import jsonable
from .._validate import check_adata, check_positive_int, resolve_genes
from ._score import _get_matrix

if TYPE_CHECKING:
    from anndata import AnnData

_FORMAT = "sthist.RidgeModel"
_VERSION = 1
_JSON = "config.json"  # the name `sthist.tl` model loaders dispatch on (its "method" is "ridge")
_NPZ = "ridge_model.npz"
_ARRAYS = ("scaler_mean", "scaler_scale", "pca_mean", "pca_components", "coef", "intercept")


class RidgeModel:
    """A fitted linear probe from image features to gene expression (see :func:`sthist.tl.fit_ridge`).

    Prediction is ``((features - scaler_mean) / scaler_scale - pca_mean) @ pca_components.T @ coef.T + intercept``.
    All parameters are plain numpy arrays; :meth:`save` writes them to JSON + ``.npz`` and :meth:`load` reads
    them back without executing code (``allow_pickle=False``).

    Attributes
    ----------
    genes
        The genes predicted, in the column order of :meth:`predict`.
    features_key
        ``adata.obsm`` key of the features the model was fitted on.
    encoder_params
        ``adata.uns[features_key]['params']`` at fit time (the encoder that produced the features), or ``{}``.
    alpha
        Ridge penalty.
    n_components
        Number of principal components used.
    prediction
        ``'regression'``: the model predicts expression values directly.
    method
        ``'ridge'``.
    """

    prediction = "regression"
    method = "ridge"

    def __init__(
        self,
        *,
        genes: Sequence[str],
        features_key: str,
        scaler_mean: np.ndarray,
        scaler_scale: np.ndarray,
        pca_mean: np.ndarray,
        pca_components: np.ndarray,
        coef: np.ndarray,
        intercept: np.ndarray,
        alpha: float,
        layer: str | None = None,
        encoder_params: dict[str, Any] | None = None,
        random_state: int | None = None,
    ) -> None:
        self.genes = [str(g) for g in genes]
        self.features_key = str(features_key)
        self.scaler_mean = np.asarray(scaler_mean, dtype=np.float64)
        self.scaler_scale = np.asarray(scaler_scale, dtype=np.float64)
        self.pca_mean = np.asarray(pca_mean, dtype=np.float64)
        self.pca_components = np.asarray(pca_components, dtype=np.float64)
        self.coef = np.asarray(coef, dtype=np.float64)
        self.intercept = np.asarray(intercept, dtype=np.float64)
        self.alpha = float(alpha)
        self.layer = layer
        self.encoder_params = dict(encoder_params or {})
        self.random_state = random_state
        self._check_shapes()

    # ------------------------------------------------------------------ properties
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
            f"RidgeModel(features_key={self.features_key!r}, n_features={self.n_features}, "
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

    # ------------------------------------------------------------------ prediction
    def transform(self, features: np.ndarray) -> np.ndarray:
        """Standardise and project features on the principal components, shape ``(n, n_components)``."""
        x = self._check_features(features)
        return ((x - self.scaler_mean) / self.scaler_scale - self.pca_mean) @ self.pca_components.T

    def predict(self, features: np.ndarray | AnnData) -> np.ndarray:
        """Predict expression, shape ``(n, n_genes)`` float32, columns in the order of :attr:`genes`.

        Parameters
        ----------
        features
            Array ``(n, n_features)``, or an AnnData whose ``obsm[features_key]`` holds the features.
        """
        from anndata import AnnData

        if isinstance(features, AnnData):
            features = self._features_from_adata(features)
        z = self.transform(features)
        return (z @ self.coef.T + self.intercept).astype(np.float32)

    def _features_from_adata(self, adata: AnnData) -> np.ndarray:
        if self.features_key not in adata.obsm:
            raise KeyError(
                f"adata.obsm[{self.features_key!r}] is missing: the model was fitted on these features; run "
                "`sthist.pp.embed_patches(adata, ...)` with the same encoder first. "
                f"Available obsm keys: {list(adata.obsm.keys())}."
            )
        params = adata.uns.get(self.features_key, {})
        params = params.get("params", {}) if isinstance(params, dict) else {}
        if self.encoder_params and params and jsonable(params) != self.encoder_params:
            logg.warning(
                f"the encoder parameters in adata.uns[{self.features_key!r}]['params'] differ from those the model "
                "was fitted with; predictions are only meaningful with features from the same encoder"
            )
        return np.asarray(adata.obsm[self.features_key])

    def _check_features(self, features: Any) -> np.ndarray:
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(
                f"features must have shape (n, {self.n_features}) like adata.obsm[{self.features_key!r}] at fit "
                f"time; got {x.shape}. Embed the patches with the same encoder."
            )
        if not np.isfinite(x).all():
            bad = np.flatnonzero(~np.isfinite(x).all(1))
            raise ValueError(f"features hold NaN or infinite values in {bad.size} row(s) (e.g. {bad[:5].tolist()}).")
        return x

    # ------------------------------------------------------------------ persistence
    def save(self, dir_path: str | Path, *, overwrite: bool = False) -> None:
        """Write the model to ``dir_path``: ``config.json`` (metadata, ``method='ridge'``) and ``ridge_model.npz``."""
        path = Path(dir_path)
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(f"{path} exists and is not a directory; pass a directory path.")
        if not overwrite and ((path / _JSON).exists() or (path / _NPZ).exists()):
            raise FileExistsError(f"{path} already holds a saved model; pass `overwrite=True` to replace it.")
        path.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": _FORMAT,
            "version": _VERSION,
            "method": self.method,
            "prediction": self.prediction,
            "genes": self.genes,
            "features_key": self.features_key,
            "layer": self.layer,
            "alpha": self.alpha,
            "n_features": self.n_features,
            "n_components": self.n_components,
            "random_state": self.random_state,
            "encoder_params": jsonable(self.encoder_params),
        }
        np.savez(path / _NPZ, **{name: getattr(self, name) for name in _ARRAYS})
        (path / _JSON).write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, dir_path: str | Path) -> RidgeModel:
        """Read a model written by :meth:`save`; no code is executed (``allow_pickle=False``)."""
        path = Path(dir_path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is not a directory holding a saved RidgeModel (`model.save(dir)`).")
        for name in (_JSON, _NPZ):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path / name} is missing; {path} does not hold a complete RidgeModel.")
        try:
            meta = json.loads((path / _JSON).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path / _JSON} is not valid JSON ({err}); the saved model is corrupt.") from err
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            raise ValueError(f"{path / _JSON} is not a sthist RidgeModel file (format {meta.get('format')!r}).")
        if meta.get("version") != _VERSION:
            raise ValueError(
                f"{path / _JSON} has version {meta.get('version')!r}; this sthist reads version {_VERSION}. "
                "Refit the model with this version of sthist."
            )
        missing_keys = [k for k in ("genes", "features_key", "alpha") if k not in meta]
        if missing_keys:
            raise ValueError(f"{path / _JSON} lacks {missing_keys}; the saved model is incomplete.")
        try:
            with np.load(path / _NPZ, allow_pickle=False) as npz:
                missing = [a for a in _ARRAYS if a not in npz.files]
                if missing:
                    raise ValueError(f"{path / _NPZ} lacks the arrays {missing}; the saved model is incomplete.")
                arrays = {a: np.array(npz[a]) for a in _ARRAYS}
        except ValueError as err:
            if "pickle" in str(err).lower():
                raise ValueError(
                    f"{path / _NPZ} holds object arrays, which are refused (allow_pickle=False); the file was not "
                    "written by RidgeModel.save."
                ) from err
            raise
        except OSError as err:
            raise ValueError(f"{path / _NPZ} is not a readable .npz file ({err}).") from err
        for a, arr in arrays.items():
            if arr.dtype.kind not in "fiu":
                raise ValueError(f"{path / _NPZ}: array {a!r} has dtype {arr.dtype}, expected numbers.")
        model = cls.__new__(cls)
        model.genes = [str(g) for g in meta["genes"]]
        model.features_key = str(meta["features_key"])
        model.layer = meta.get("layer")
        model.alpha = float(meta["alpha"])
        model.encoder_params = dict(meta.get("encoder_params") or {})
        model.random_state = meta.get("random_state")
        for a, arr in arrays.items():
            setattr(model, a, arr.astype(np.float64))
        model._check_shapes(source=f"RidgeModel.load({str(path)!r})")
        return model


def _seed(random_state: Any) -> int | None:
    if random_state is None:
        return None
    if isinstance(random_state, np.random.Generator):
        return int(random_state.integers(2**31 - 1))
    if isinstance(random_state, bool) or not isinstance(random_state, int | np.integer):
        raise TypeError(f"random_state must be an int, a numpy Generator or None, got {type(random_state).__name__}.")
    return int(random_state)


@inject_docs
def fit_ridge(
    adata: AnnData,
    *,
    features_key: str,
    layer: str | None = None,
    genes: Sequence[str] | str | None = None,
    n_components: int = 256,
    alpha: float | None = None,
    random_state: int | np.random.Generator | None = 0,
) -> RidgeModel:
    """Fit the HEST-Benchmark linear probe from image features to gene expression.

    The recipe of HEST-Benchmark (Jaume et al., 2024) for scoring patch encoders:

    1. standardise each feature to zero mean and unit variance over the spots (constant features keep scale 1);
    2. project on the first ``n_components`` principal components (256 in HEST; scikit-learn's PCA, seeded);
    3. ridge regression of every gene on the components with ``alpha = 100 / (n_components * n_genes)`` and
       scikit-learn's ``lsqr`` solver (``max_iter=1000``), without a penalised intercept.

    HEST fits without intercept; because the components are centred, the coefficients are the same when the
    targets are centred first, so sthist fits on centred targets and adds their means back as intercept: the
    per-gene Pearson r equals HEST's (up to the lsqr tolerance), and the predictions are on the scale of the
    targets (so MSE is meaningful).

    Parameters
    ----------
    {adata}
    features_key
        ``adata.obsm`` key of the spot features, e.g. ``'X_<encoder>'`` written by :func:`sthist.pp.embed_patches`.
    {layer}
        Use the same scale you will score on, e.g. ``'targets'`` from :func:`sthist.pp.normalize_expression`.
    {genes}
    n_components
        Number of principal components; clipped (with a log message) to ``min(n_obs, n_features)``.
    alpha
        Ridge penalty; ``None`` uses HEST's rule ``100 / (n_components * n_genes)``.
    {random_state}

    Returns
    -------
    The fitted :class:`RidgeModel`; ``adata`` is not modified. Write predictions with
    ``model.predict(adata.obsm[features_key])``.
    """
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge

    fn = "sthist.tl.fit_ridge"
    check_adata(adata, fn=fn)
    n_components = check_positive_int("n_components", n_components)
    if alpha is not None and (not np.isfinite(alpha) or alpha < 0):
        raise ValueError(f"alpha must be a finite non-negative number or None (HEST's rule), got {alpha!r}.")
    seed = _seed(random_state)
    if features_key not in adata.obsm:
        raise KeyError(
            f"{fn}: adata.obsm[{features_key!r}] is missing; compute patch features with "
            "`sthist.pp.extract_patches(adata)` then `sthist.pp.embed_patches(adata, ...)`. "
            f"Available obsm keys: {list(adata.obsm.keys())}."
        )
    x = np.asarray(adata.obsm[features_key], dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{fn}: adata.obsm[{features_key!r}] must be 2-D (n_obs, n_features), got shape {x.shape}.")
    bad = ~np.isfinite(x).all(1)
    if bad.any():
        raise ValueError(
            f"{fn}: adata.obsm[{features_key!r}] has NaN or infinite features for {int(bad.sum())} spot(s), e.g. "
            f"{adata.obs_names[bad][:5].tolist()}; drop them (`adata[mask]`) or recompute the embeddings."
        )
    cols = np.flatnonzero(resolve_genes(adata, genes))
    mat = _get_matrix(adata, layer, fn=fn, what="target")
    y = mat[:, cols]
    y = np.asarray(y.toarray() if hasattr(y, "toarray") else y, dtype=np.float64)
    bad = ~np.isfinite(y).all(1)
    if bad.any():
        raise ValueError(
            f"{fn}: the expression in {'X' if layer is None else f'layers[{layer!r}]'} has NaN or infinite values "
            f"for {int(bad.sum())} spot(s), e.g. {adata.obs_names[bad][:5].tolist()}; drop them or fix the layer."
        )
    n, d = x.shape
    if n < 2:
        raise ValueError(f"{fn}: need at least 2 spots to fit, got {n}.")
    k = min(n_components, n, d)
    if k < n_components:
        logg.info(f"    n_components={n_components} clipped to {k} = min(n_obs={n}, n_features={d})")
    g = y.shape[1]
    alpha_ = 100.0 / (k * g) if alpha is None else float(alpha)
    start = logg.info(f"fitting ridge probe on obsm[{features_key!r}] ({d} features -> {k} PCs -> {g} genes)")

    mean = x.mean(0)
    scale = x.std(0)
    scale[scale <= np.finfo(np.float64).eps * np.maximum(np.abs(mean), 1.0)] = 1.0
    xs = (x - mean) / scale
    pca = PCA(n_components=k, random_state=seed).fit(xs)
    z = (xs - pca.mean_) @ pca.components_.T
    y_mean = y.mean(0)
    ridge = Ridge(alpha=alpha_, solver="lsqr", fit_intercept=False, max_iter=1000, random_state=seed)
    ridge.fit(z, y - y_mean)
    coef = np.atleast_2d(ridge.coef_).reshape(g, k)

    params = adata.uns.get(features_key, {})
    params = params.get("params", {}) if isinstance(params, dict) else {}
    model = RidgeModel(
        genes=adata.var_names[cols],
        features_key=features_key,
        scaler_mean=mean,
        scaler_scale=scale,
        pca_mean=pca.mean_,
        pca_components=pca.components_,
        coef=coef,
        intercept=y_mean,
        alpha=alpha_,
        layer=layer,
        encoder_params=jsonable(params),
        random_state=seed,
    )
    logg.info(f"    finished (alpha = {alpha_:.3g})", time=start)
    return model
