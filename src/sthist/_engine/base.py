"""One contract for every predictor sthist fits (the contrastive methods, the ridge probe and any later one).

scvi-tools keeps one base class for all its models; sthist does the same with :class:`BaseModel`:

* ``predict(*, images=None, features=None, coords=None, groups=None, ...) -> Prediction`` with one return type:
  the predicted expression and a per-spot spread (``None`` where a model has none); ``prediction_settings(...)``
  says which settings a call with those options uses (e.g. retrieval ``k`` after capping);
* ``save(dir_path, *, overwrite=False)`` and the classmethod ``load(dir_path, *, device=None)``;
* ``genes``, the modelled genes in the column order of predictions;
* ``inputs``, a read-only :class:`ModelInputs` record written by the engine at fit time: the image encoder and a
  hash of its weights, the patch geometry, and whether prediction needs coordinates or spatial neighbours.

:func:`load_model` reads any saved model folder, dispatching on the ``format`` in its ``config.json``; each
subclass names its format in the class attribute ``format`` and is registered by defining it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np

CONFIG_FILE = "config.json"


class ModelFileError(ValueError):
    """A saved model folder is missing, incomplete, corrupted, modified or inconsistent."""


class _Prediction(NamedTuple):
    expression: np.ndarray
    spread: np.ndarray | None


class Prediction(_Prediction):
    """What every model's ``predict`` returns: a pair ``(expression, spread)`` (it unpacks into two).

    Attributes
    ----------
    expression
        (n, g) float32 predictions in the order of the model's ``genes``.
    spread
        (n,) float32 uncertainty per spot (retrieval: the spread of the retrieved profiles), or ``None``.
    gene_spread
        (n, g) float32 standard deviation of every gene over the retrieved profiles, when ``predict`` was asked for it
        (``gene_spread=True``, retrieval models); else ``None``. An attribute, not a third item of the pair.
    """

    def __new__(cls, expression: np.ndarray, spread: np.ndarray | None, gene_spread: np.ndarray | None = None):
        self = super().__new__(cls, expression, spread)
        self.gene_spread = gene_spread
        return self


@dataclass(frozen=True)
class ModelInputs:
    """What a model was fitted on, written by the engine at fit time (read-only).

    Attributes
    ----------
    encoder
        The image encoder spec (``"hed-texture"``, a timm name, ``"hf-hub:..."``).
    pretrained
        Whether the encoder's pretrained weights were loaded.
    checkpoint
        The local weight file the encoder was loaded from, or ``None``.
    weights_sha256
        SHA-256 of the encoder's weights as used at fit time (of its state dict; ``None`` for a weight-free encoder
        or when only features were given). Predicting from patches rebuilds the encoder and checks it.
    finetuned
        Whether the encoder was trained with the model (its weights are then part of the model).
    feature_dim
        Width of the encoder's features.
    patch_size, mpp
        Side of the patches in pixels and their microns per pixel at fit time (``None`` where unknown). Predicting
        on patches of another geometry raises.
    needs_coords
        Prediction needs spot coordinates.
    needs_neighbors
        Prediction needs spatial neighbours (coordinates and sections).
    tokens
        Side of the grid of encoder tokens the model consumes (``None``: one pooled vector per patch).
    targets
        The expression the model was fitted on and its scale, ``{'layer': 'X' | name, 'scale': ...}`` (the
        normalisation :func:`sthist.pp.normalize_expression` recorded, ``'counts'`` or ``'unknown'``; see
        ``sthist._anndata.expression_scale``); :func:`sthist.tl.score_prediction` scores against that layer by
        default. ``None`` for a model fitted on arrays without a record.
    """

    encoder: str
    pretrained: bool = False
    checkpoint: str | None = None
    weights_sha256: str | None = None
    finetuned: bool = False
    feature_dim: int = 0
    patch_size: int | None = None
    mpp: float | None = None
    needs_coords: bool = False
    needs_neighbors: bool = False
    tokens: int | None = None
    targets: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelInputs:
        """Rebuild from :meth:`to_dict` (unknown keys are refused)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown model input fields {unknown}.")
        return cls(**d)

    def check_geometry(self, patch_size: int | None, mpp: float | None, *, where: str = "the patches") -> None:
        """Raise when ``patch_size`` / ``mpp`` (known ones) differ from the geometry the model was fitted on."""
        bad = []
        if self.patch_size is not None and patch_size is not None and int(patch_size) != int(self.patch_size):
            bad.append(f"{patch_size} px instead of {self.patch_size} px")
        if self.mpp is not None and mpp is not None and not np.isclose(float(mpp), float(self.mpp), rtol=1e-3):
            bad.append(f"{mpp} µm/px instead of {self.mpp} µm/px")
        if bad:
            call = f"sthist.pp.extract_patches(adata, patch_size={self.patch_size}" + (
                f", mpp={self.mpp})" if self.mpp is not None else ")"
            )
            raise ValueError(
                f"{where} have {' and '.join(bad)}: the model was fitted on patches of {self.patch_size} px"
                + (f" at {self.mpp} µm/px" if self.mpp is not None else "")
                + f". Re-extract them with `{call}` (then embed them again if you use cached features)."
            )


def state_sha256(module: Any) -> str | None:
    """SHA-256 over the names, shapes and bytes of a torch module's state dict (``None`` when it has none)."""
    state = module.state_dict()
    if not state:
        return None
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update((t.float() if t.is_floating_point() else t).numpy().tobytes())
    return h.hexdigest()


MODEL_FORMATS: dict[str, type[BaseModel]] = {}
"""Model classes by the ``format`` written in their ``config.json``."""


class BaseModel:
    """Base class of every fitted predictor; see the module docstring."""

    format: ClassVar[str] = ""
    prediction: ClassVar[str] = "regression"

    inputs: ModelInputs
    genes: list[str]
    calibration: Any = None
    """The :class:`~sthist._engine.calibration.Calibration` that :func:`sthist.tl.calibrate` attached (saved with the
    model), or ``None``."""

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        if cls.format:
            MODEL_FORMATS[cls.format] = cls

    # ---- description ---------------------------------------------------------------------------------------------
    @property
    def method(self) -> str:
        """Registry name of the method (``"bleep"``, ``"ridge"``, ...)."""
        raise NotImplementedError

    @property
    def needs_neighbors(self) -> bool:
        """Whether prediction needs coordinates and sections (spatial neighbours)."""
        return self.inputs.needs_neighbors

    @property
    def finetuned(self) -> bool:
        """Whether the image encoder was trained with the model."""
        return self.inputs.finetuned

    @property
    def encoder_spec(self) -> str:
        """The image encoder spec."""
        return self.inputs.encoder

    def describe(self) -> dict[str, Any]:
        """JSON-friendly summary recorded next to predictions: method, format, inputs and number of genes."""
        return {
            "method": self.method,
            "format": self.format,
            "n_genes": len(self.genes),
            "inputs": self.inputs.to_dict(),
        }

    # ---- the frozen image encoder --------------------------------------------------------------------------------
    def image_encoder(self) -> Any:
        """The image encoder that makes this model's input features from patches (frozen models).

        Rebuilt from :attr:`inputs`; a checkpoint that no longer exists, or weights that differ from those the model
        was fitted with (another checkpoint, other downloaded weights), raise.
        """
        if self.inputs.finetuned:
            raise ValueError(
                f"this {self.method!r} model fine-tuned its image encoder: it predicts from patches (images=) itself."
            )
        cached = getattr(self, "_encoder_cache", None)
        if cached is not None:
            return cached
        from .encoders import build_image_encoder

        inp = self.inputs
        if inp.checkpoint is not None and not Path(inp.checkpoint).is_file():
            raise FileNotFoundError(
                f"this model's features came from the checkpoint {inp.checkpoint!r}, which no longer exists; restore "
                "it, or pass features computed with the same encoder."
            )
        if not inp.encoder:
            raise ValueError(
                f"this {self.method!r} model does not record which encoder made its features, so patches cannot be "
                "encoded for it: pass the features (`features=`, or `features_key=` in `sthist.tl.predict_expression`)."
            )
        enc = build_image_encoder(inp.encoder, pretrained=inp.pretrained, checkpoint=inp.checkpoint)
        if inp.feature_dim and enc.out_dim != inp.feature_dim:
            raise ValueError(
                f"encoder {inp.encoder!r} gives {enc.out_dim}-d features but the model was trained on "
                f"{inp.feature_dim}-d features; the training features came from another encoder."
            )
        if inp.weights_sha256 is not None and state_sha256(enc) != inp.weights_sha256:
            raise ValueError(
                f"the encoder {inp.encoder!r} built now has other weights than the one the model was fitted with "
                "(weights hash mismatch: a changed checkpoint, other downloaded weights or another timm version); "
                "predicting from patches would use different features. Pass features computed at fit time instead."
            )
        self._encoder_cache = enc
        return enc

    def _features(self, images: Any, features: Any, *, device: Any, progress: bool, batch_size: int = 64) -> np.ndarray:
        """Encoder features from exactly one of ``images`` (encoded with :meth:`image_encoder`) or ``features``."""
        from .data import check_features, check_patches

        if (images is None) == (features is None):
            raise ValueError("pass exactly one of images= (uint8 patches) or features= (encoder embeddings).")
        if images is not None:
            from .encoders import encode_patches

            images = check_patches(images, name="images")
            self.inputs.check_geometry(int(images.shape[1]), None, where="the patches given")
            enc = self.image_encoder()
            return encode_patches(enc, images, device=device, progress=progress, batch_size=batch_size)
        check_features(features, None)  # shape and finiteness; the caller's dtype is kept (float64 stays exact)
        features = np.asarray(features)
        if features.shape[1] != self.inputs.feature_dim:
            raise ValueError(
                f"features have {features.shape[1]} columns but the model was trained on {self.inputs.feature_dim}-d "
                f"features of encoder {self.inputs.encoder!r}; compute them with the same encoder "
                "(`sthist.pp.embed_patches`)."
            )
        return features

    # ---- calibration ---------------------------------------------------------------------------------------------
    def refit_options(self) -> tuple[str, dict[str, Any]]:
        """The registered predictor and the fit options that refit this model's configuration on other spots.

        :func:`sthist.tl.calibrate` refits the model leaving each group out with them.
        """
        raise NotImplementedError(f"{type(self).__name__} does not say how to refit it, so it cannot be calibrated.")

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
        """The spots in the space where this model compares them (n, p): its frozen image features by default.

        The calibration measures distances there (local residual scales, the shift score).
        """
        return np.asarray(
            self._features(images, features, device=device, progress=progress, batch_size=min(batch_size, 64)),
            dtype=np.float64,
        )

    # ---- the contract --------------------------------------------------------------------------------------------
    def prediction_settings(self, **options: Any) -> dict[str, Any]:
        """The settings :meth:`predict` uses with these ``options`` (JSON-friendly; empty for models without any).

        A ``"note"`` entry, when present, says what was adjusted (e.g. a default retrieval ``k`` capped to the bank).
        """
        return {}

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
        gene_spread: bool = False,
        **options: Any,
    ) -> Prediction:
        """Predict expression from patches (``images``) or encoder ``features``; see :class:`Prediction`.

        ``gene_spread=True`` also returns the per-gene spread of the retrieved profiles (retrieval models).
        """
        raise NotImplementedError

    def save(self, dir_path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Write the model to the folder ``dir_path``."""
        raise NotImplementedError

    @classmethod
    def load(cls, dir_path: str | os.PathLike, *, device: str | None = None) -> BaseModel:
        """Read a model written by :meth:`save`."""
        raise NotImplementedError


def check_save_target(path: str | os.PathLike, *, overwrite: bool) -> Path:
    """The folder to save a model to: created if needed; one that holds a model already needs ``overwrite``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"cannot save the model to {str(path)!r}: it exists and is not a folder.")
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be True or False, got {overwrite!r}.")
    if not overwrite and (path / CONFIG_FILE).exists():
        raise FileExistsError(
            f"{str(path)!r} already holds a saved model; pass overwrite=True to replace it, or choose another folder."
        )
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_config(path: Path, doc: dict[str, Any]) -> None:
    """Write ``doc`` as the folder's ``config.json``, atomically (a temporary file renamed over it)."""
    tmp = path / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path / CONFIG_FILE)


def read_config(path: str | os.PathLike, *, expect: str | None = None) -> dict[str, Any]:
    """The ``config.json`` of a saved model folder, with errors that name the folder.

    ``expect`` is the format the caller reads (another one raises).
    """
    path = Path(path)
    where = f"model folder {str(path)!r}"
    if not path.is_dir():
        raise ModelFileError(f"{where} does not exist or is not a folder; pass the folder given to `model.save()`.")
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise ModelFileError(f"{where} has no {CONFIG_FILE}; it was not written by sthist or is incomplete.")
    try:
        doc = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelFileError(f"{where}: {CONFIG_FILE} is not valid JSON ({err}); the file is corrupted.") from err
    if not isinstance(doc, dict):
        raise ModelFileError(f"{where}: {CONFIG_FILE} is not an sthist model description.")
    if expect is not None and doc.get("format") != expect:
        raise ModelFileError(
            f"{where}: {CONFIG_FILE} is not an sthist model description of format {expect!r} (found "
            f"{doc.get('format')!r}); read any saved model with `sthist.tl.load_model`."
        )
    return doc


def load_npz_model(
    dir_path: str | os.PathLike,
    *,
    expect: str,
    version: int,
    npz_file: str,
    names: tuple[str, ...],
    what: str,
    build: Any,
) -> Any:
    """A model saved as ``config.json`` and one ``.npz`` of ``names`` (read with ``allow_pickle=False``).

    Checks the format (``expect``) and its ``version``, that the npz file is there, reads the arrays and returns
    ``build(meta, arrays)``; a missing array or one the model refuses raises a :class:`ModelFileError` naming the
    folder and ``what`` model it held.
    """
    path = Path(dir_path)
    where = f"model folder {str(path)!r}"
    meta = read_config(path, expect=expect)
    if meta.get("format_version") != version:
        raise ModelFileError(f"{where}: format version {meta.get('format_version')!r} is not {version}.")
    if not (path / npz_file).is_file():
        raise ModelFileError(f"{where} lacks {npz_file}; copy the whole folder.")
    try:
        with np.load(path / npz_file, allow_pickle=False) as npz:
            arrays = {a: np.array(npz[a]) for a in names}
        return build(meta, arrays)
    except (KeyError, TypeError, ValueError, OSError) as err:
        raise ModelFileError(f"{where}: the saved {what} model is incomplete or invalid ({err}).") from err


def load_model(dir_path: str | os.PathLike, *, device: str | None = None) -> BaseModel:
    """Load any saved sthist model folder, dispatching on the ``format`` of its ``config.json``."""
    from . import dual_knn, knn, model, ridge  # noqa: F401  (define and register the model classes)

    doc = read_config(dir_path)
    fmt = doc.get("format")
    if fmt not in MODEL_FORMATS:
        raise ModelFileError(
            f"model folder {str(dir_path)!r}: format {fmt!r} is not an sthist model format; known: {sorted(MODEL_FORMATS)}."
        )
    return MODEL_FORMATS[fmt].load(dir_path, device=device)
