"""A trained contrastive model: embeddings, prediction, and a safe on-disk format.

On disk a model is a folder::

    config.json         format name and version, method and its config, genes, encoder, training settings,
                        history, versions, and the SHA-256 and tensor shapes of the two weight files
    model.safetensors   the method's weights, the feature scaler (frozen mode) and, when fine-tuned, the encoder
    bank.safetensors    the reference bank: "embeddings" (n_ref, p) and "expression" (n_ref, g)

No pickle anywhere: loading reads JSON and safetensors only, so it cannot execute code. :meth:`ContrastiveModel.load`
checks the format, the checksums (so modified or truncated files are caught) and every shape, and raises
:class:`ModelFileError` naming the folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from . import bank as _bank
from ._utils import check_int, jsonable, progress_bar, resolve_device
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
from .data import (
    FeatureScaler,
    SpotData,
    check_coords,
    check_expression,
    check_patches,
    check_tokens,
    group_codes,
    iter_batches,
    spatial_neighbors,
)
from .encoders import build_image_encoder, file_sha256
from .methods import Method, get_method

FORMAT = "sthist.ContrastiveModel"
FORMAT_VERSION = 2
WEIGHTS_FILE = "model.safetensors"
BANK_FILE = "bank.safetensors"

__all__ = ["ContrastiveModel", "ModelFileError"]


def retrieval_settings(prediction_defaults: dict[str, Any], n_bank: int, k: int | None, weighting: str | None):
    """The caller's ``k`` / ``weighting``, else the method's paper values; returns ``(k, weighting, note)``.

    A default ``k`` is capped at ``max_k_fraction`` of the bank (``prediction_defaults``; a third when absent), and
    ``note`` says so.
    """
    if weighting is None:
        weighting = prediction_defaults.get("weighting", "average")
    if weighting not in _bank.WEIGHTINGS:
        raise ValueError(f"weighting={weighting!r} is not valid; choose one of {list(_bank.WEIGHTINGS)}.")
    if k is not None:
        return check_int("k", k), weighting, None
    k = int(prediction_defaults.get("k", 50))
    fraction = float(prediction_defaults.get("max_k_fraction", 1 / 3))
    cap = max(1, int(n_bank * fraction + 1e-9))
    if k > cap:
        if fraction >= 1.0:
            return cap, weighting, f"k reduced to {cap}, all {n_bank} reference spots"
        share = "a third" if abs(fraction - 1 / 3) < 1e-9 else f"{fraction:.0%}"
        return cap, weighting, f"k reduced to {cap}, {share} of the {n_bank} reference spots"
    return k, weighting, None


class _Net(nn.Module):
    """Everything with weights: the method, the frozen-feature scaler and (when fine-tuned) the image encoder."""

    def __init__(
        self,
        method: Method,
        scaler: FeatureScaler | None = None,
        encoder: nn.Module | None = None,
        token_scaler: FeatureScaler | None = None,
    ):
        super().__init__()
        self.method = method
        self.scaler = scaler
        self.encoder = encoder
        self.token_scaler = token_scaler  # methods that consume encoder tokens (frozen mode)


class ContrastiveModel(BaseModel):
    """A fitted contrastive model, returned by :func:`sthist.tl.fit_contrastive`.

    Attributes
    ----------
    method
        Registry name of the method, e.g. ``"bleep"``.
    config
        JSON-friendly settings: method config, inputs, training plan and settings, dimensions, versions.
    genes
        Names of the modelled genes, in the column order of predictions.
    inputs
        The :class:`~sthist._engine.base.ModelInputs` recorded at fit time.
    history
        ``{"train_loss": [...], "val_loss": [...], "val_pearson": [...], "best_epoch": int (0-based, of the last
        stage), "stages": [{"name", "epochs", "best_epoch", "stopped_early"}], "seconds": float,
        "train_components": {name: [...]}, "stopped_early": bool, "n_train": int, "n_val": int, "device": str}``.
    prediction
        ``"retrieval"`` or ``"regression"``.
    bank_embeddings, bank_expression
        The reference bank: expression embeddings (n_ref, p) and expression (n_ref, g) of the training spots.
    """

    format = FORMAT

    def __init__(
        self,
        *,
        net: _Net,
        config: dict[str, Any],
        genes: list[str],
        history: dict[str, Any],
        bank_embeddings: np.ndarray,
        bank_expression: np.ndarray,
        encoder: nn.Module | None = None,
    ):
        self._net = net
        self.config = config
        self.genes = list(genes)
        self.history = history
        self.inputs = ModelInputs.from_dict(config["inputs"])
        self.bank_embeddings = np.ascontiguousarray(bank_embeddings, dtype=np.float32)
        self.bank_expression = np.ascontiguousarray(bank_expression, dtype=np.float32)
        self._encoder_cache = encoder  # frozen-mode encoder built in this session (not saved: rebuilt from inputs)

    # ---- descriptive attributes ----------------------------------------------------------------------------------
    @property
    def method(self) -> str:
        return self.config["method"]

    @property
    def prediction(self) -> Literal["retrieval", "regression"]:
        return self.config["prediction"]

    @property
    def module(self) -> Method:
        """The underlying torch :class:`~sthist._engine.methods.Method`."""
        return self._net.method

    def __repr__(self) -> str:
        h = self.history
        return (
            f"ContrastiveModel(method={self.method!r}, encoder={self.encoder_spec!r}, "
            f"mode={'fine-tuned' if self.finetuned else 'frozen'}, n_genes={len(self.genes)}, "
            f"n_bank={self.bank_embeddings.shape[0]}, best_epoch={h.get('best_epoch')})"
        )

    # ---- internals -----------------------------------------------------------------------------------------------
    def _to(self, device) -> torch.device:
        dev = resolve_device(device)
        self._net.to(dev).eval()
        return dev

    def _spot_data(
        self, images, features, coords, groups, dev, progress, batch_size, expression=None, tokens=None
    ) -> SpotData:
        if (images is None) == (features is None):
            raise ValueError("pass exactly one of images= (uint8 patches) or features= (encoder embeddings).")
        grid = self.inputs.tokens or 0
        if grid:
            if tokens is None:
                if images is None:
                    raise ValueError(
                        f"method {self.method!r} reads a {grid} x {grid} grid of encoder tokens: pass images= (the "
                        "patches), or tokens= with features=."
                    )
                from .encoders import encode_tokens

                tokens = encode_tokens(
                    self._net.encoder if self.finetuned else self.image_encoder(),
                    check_patches(images, name="images"),
                    grid=grid,
                    device=dev,
                    progress=progress,
                    batch_size=min(batch_size, 64),
                )
            tokens = check_tokens(tokens, int((images if images is not None else features).shape[0]), grid)
        elif tokens is not None:
            raise ValueError(f"method {self.method!r} does not read encoder tokens; drop tokens=.")
        if self.finetuned:
            if images is None:
                raise ValueError(
                    "this model fine-tuned its image encoder, so features of the original encoder do not fit it; "
                    "pass images= (the patches) instead."
                )
            images = check_patches(images, name="images")
            self.inputs.check_geometry(int(images.shape[1]), None, where="the patches given")
        else:
            features = self._features(images, features, device=dev, progress=progress, batch_size=min(batch_size, 64))
            images = None
        n = int((images if images is not None else features).shape[0])
        coords = check_coords(coords, n)
        codes = group_codes(groups, n)
        if self.needs_neighbors and coords is None:
            raise ValueError(f"method {self.method!r} uses spatial neighbours: pass coords= (x, y per spot).")
        nb = None
        k = self._net.method.n_neighbors
        if k:
            nb = spatial_neighbors(coords, codes, k)
        return SpotData(
            features=features,
            images=images,
            expression=expression,
            coords=self._net.method.prepare_coords(coords, codes),
            groups=codes,
            neighbors=nb,
            tokens=tokens,
            device=dev,
        )

    def _run(
        self, data: SpotData, fn, batch_size: int, progress: bool = False, desc: str = "", images: bool = True
    ) -> np.ndarray:
        net = self._net
        return run_batches(
            net.method,
            data,
            fn,
            batch_size,
            encoder=net.encoder if (images and self.finetuned) else None,
            scaler=net.scaler if images else None,
            token_scaler=net.token_scaler if images else None,
            images=images,
            progress=progress,
            desc=desc,
        )

    # ---- public API ----------------------------------------------------------------------------------------------
    def embed_images(
        self,
        *,
        images: np.ndarray | None = None,
        features: np.ndarray | None = None,
        coords: np.ndarray | None = None,
        groups: np.ndarray | None = None,
        batch_size: int = 256,
        device: str | None = None,
        progress: bool = False,
        tokens: np.ndarray | None = None,
    ) -> np.ndarray:
        """Joint-space embeddings (n, p) of spots from their patches (``images``) or encoder ``features``.

        ``images`` may be a numpy, dask or zarr array (uint8, (n, S, S, 3)); lazy arrays are read batch by batch.
        Methods that read encoder tokens compute them from ``images``, or take ``tokens=`` with ``features``.
        """
        batch_size = check_int("batch_size", batch_size)
        dev = self._to(device)
        data = self._spot_data(images, features, coords, groups, dev, progress, batch_size, tokens=tokens)
        method = self._net.method
        return self._run(data, lambda b: method.embed_image(b.img_feats, b), batch_size, progress, "embedding images")

    def embed_expression(
        self,
        expression: np.ndarray,
        *,
        coords: np.ndarray | None = None,
        groups: np.ndarray | None = None,
        batch_size: int = 256,
        device: str | None = None,
    ) -> np.ndarray:
        """Joint-space embeddings (n, p) of expression profiles (columns in the order of ``genes``)."""
        batch_size = check_int("batch_size", batch_size)
        expression = check_expression(expression)
        if expression.shape[1] != len(self.genes):
            raise ValueError(
                f"expression has {expression.shape[1]} columns but the model has {len(self.genes)} genes; "
                "select the model's genes in its order (`model.genes`)."
            )
        dev = self._to(device)
        method = self._net.method
        data = expression_data(expression, coords=coords, groups=groups, method=method, device=dev)
        if method.n_neighbors and data.coords is None:
            raise ValueError(f"method {self.method!r} uses spatial neighbours: pass coords= (x, y per spot).")
        fn = lambda b: method.embed_expression(b.expression, b)  # noqa: E731
        return self._run(data, fn, expression_batch_size(method, batch_size), images=False)

    def build_bank(
        self,
        expression: np.ndarray,
        *,
        coords: np.ndarray | None = None,
        groups: np.ndarray | None = None,
        batch_size: int = 256,
        device: str | None = None,
    ) -> None:
        """Replace the reference bank by ``expression`` (n_ref, g) of other spots (e.g. other sections)."""
        emb = self.embed_expression(expression, coords=coords, groups=groups, batch_size=batch_size, device=device)
        self.bank_embeddings = emb
        self.bank_expression = check_expression(expression)

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
        weighting: Literal["average", "distance", "softmax"] | None = None,
        temperature: float = 0.1,
        chunk_size: int = 4096,
        index: Literal["exact", "faiss-ivf"] = "exact",
        n_probe: int = 32,
        tokens: np.ndarray | None = None,
        gene_spread: bool = False,
    ) -> Prediction:
        """Predict expression of spots from their patches or encoder features.

        Parameters
        ----------
        images, features
            uint8 patches (n, S, S, 3) or encoder features (n, d); exactly one. ``images`` may be a numpy, dask or
            zarr array (e.g. from ``sthist.pp.extract_patches(..., store=...)``); lazy arrays are read batch by batch
            (fine-tuned models) or one storage chunk at a time (frozen encoders), never loaded whole.
        coords, groups
            Spot coordinates (n, 2) and section labels (n,), for methods that use them.
        batch_size
            Spots per forward pass when embedding.
        device
            ``None`` picks cuda, then mps, then cpu.
        progress
            Show progress bars.
        k
            Reference spots retrieved per query (retrieval methods); ``None``: the method's paper value (BLEEP 50,
            mclSTExp 200), at most a third of the bank.
        weighting
            ``"average"`` (BLEEP), ``"distance"`` (1/d^2, mclSTExp) or ``"softmax"``; ``None``: the method's.
        temperature
            Temperature of the ``"softmax"`` weighting.
        chunk_size
            Rows per query and bank chunk in retrieval.
        index
            ``"exact"`` chunked search (default) or ``"faiss-ivf"``, an approximate faiss index for banks of
            millions of spots (needs ``faiss-cpu``; see :mod:`~sthist._engine.bank`).
        n_probe
            Inverted lists visited per query with ``index="faiss-ivf"``.
        tokens
            (n, T, D) encoder tokens, with ``features``, for methods that read tokens (else computed from ``images``).
        gene_spread
            Retrieval methods: also return the weighted standard deviation of every gene over the retrieved profiles.

        Returns
        -------
        A :class:`~sthist._engine.base.Prediction`: expression (n, g) float32 in the order of ``genes``; the spread
        per spot (retrieval: the mean over genes of the weighted standard deviation of the k retrieved profiles;
        ``None`` for regression methods); the settings used (``k``, ``weighting``, ``index``, ``n_probe``).
        """
        batch_size = check_int("batch_size", batch_size)
        dev = self._to(device)
        method = self._net.method
        if self.prediction == "regression":
            data = self._spot_data(images, features, coords, groups, dev, progress, batch_size, tokens=tokens)
            pred = self._run(data, lambda b: method.predict(b.img_feats, b), batch_size, progress, "predicting")
            return Prediction(pred.astype(np.float32), None)
        opts = self.prediction_settings(k=k, weighting=weighting, index=index, n_probe=n_probe)
        k, weighting = opts["k"], opts["weighting"]
        data = self._spot_data(images, features, coords, groups, dev, progress, batch_size, tokens=tokens)
        query = self._run(data, lambda b: method.embed_image(b.img_feats, b), batch_size, progress, "embedding images")
        out = _bank.retrieve(
            query,
            self.bank_embeddings,
            self.bank_expression,
            k=k,
            similarity=self.config["similarity"],
            weighting=weighting,
            temperature=temperature,
            chunk_size=chunk_size,
            device=dev,
            progress=progress,
            index=index,
            n_probe=n_probe,
            gene_spread=gene_spread,
        )
        return Prediction(*out)

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
        """The spots' image embeddings in the joint space (:meth:`embed_images`), where the model compares them."""
        emb = self.embed_images(
            images=images,
            features=features,
            coords=coords,
            groups=groups,
            batch_size=batch_size,
            device=device,
            progress=progress,
        )
        return np.asarray(emb, dtype=np.float64)

    def refit_options(self) -> tuple[str, dict[str, Any]]:
        """``(method, {...})``: the plan that ran, the method's settings and the encoder (frozen or fine-tuned)."""
        from .plan import TrainPlan

        inputs = self.inputs
        options: dict[str, Any] = {
            "plan": TrainPlan.from_dict(self.config["plan"]),
            "method_kwargs": dict(self.config.get("method_config") or {}),
            "finetune": bool(inputs.finetuned),
            "encoder": inputs.encoder,
            "pretrained": bool(inputs.pretrained),
            "checkpoint": inputs.checkpoint,
        }
        return self.method, options

    def prediction_settings(
        self,
        *,
        k: int | None = None,
        weighting: str | None = None,
        index: str = "exact",
        n_probe: int = 32,
        **_: Any,
    ) -> dict[str, Any]:
        """Retrieval settings of a :meth:`predict` call.

        ``k`` and ``weighting`` (the method's defaults where ``None``; a default ``k`` is capped at the method's
        ``max_k_fraction`` of the bank, a third unless it says otherwise, said in ``"note"``), ``index`` and
        ``n_probe``.
        """
        if self.prediction == "regression":
            return {}
        k, weighting, note = retrieval_settings(
            self.config.get("prediction_defaults", {}), self.bank_embeddings.shape[0], k, weighting
        )
        if index not in ("exact", "faiss-ivf"):
            raise ValueError(f"index={index!r} is not valid; choose one of ['exact', 'faiss-ivf'].")
        settings: dict[str, Any] = {"k": k, "weighting": weighting, "index": index}
        if index == "faiss-ivf":
            settings["n_probe"] = check_int("n_probe", n_probe)
        if note:
            settings["note"] = note
        return settings

    # ---- persistence ---------------------------------------------------------------------------------------------
    def save(self, dir_path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Write the model to the folder ``dir_path`` (created if needed).

        A folder that holds a model already is replaced only with ``overwrite=True``.
        """
        from safetensors.torch import save_file

        path = check_save_target(dir_path, overwrite=overwrite)
        meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION)}
        state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in self._net.state_dict().items()}
        save_file(state, str(path / WEIGHTS_FILE), metadata=meta)
        bank = {
            "embeddings": torch.from_numpy(np.ascontiguousarray(self.bank_embeddings)),
            "expression": torch.from_numpy(np.ascontiguousarray(self.bank_expression)),
        }
        save_file(bank, str(path / BANK_FILE), metadata=meta)
        save_calibration(self, path)
        doc = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "config": jsonable(self.config),
            "genes": self.genes,
            "history": jsonable(self.history),
            "files": {
                WEIGHTS_FILE: {
                    "sha256": file_sha256(path / WEIGHTS_FILE),
                    "shapes": {k: list(v.shape) for k, v in state.items()},
                },
                BANK_FILE: {
                    "sha256": file_sha256(path / BANK_FILE),
                    "shapes": {k: list(v.shape) for k, v in bank.items()},
                },
            },
        }
        write_config(path, doc)

    @classmethod
    def load(cls, dir_path: str | os.PathLike, *, device: str | None = None) -> ContrastiveModel:
        """Read a model written by :meth:`save`; every file is checked, problems raise :class:`ModelFileError`."""
        from safetensors.torch import load_file

        path = Path(dir_path)
        where = f"model folder {str(path)!r}"
        doc = read_config(path, expect=FORMAT)
        version = doc.get("format_version")
        if not isinstance(version, int) or version < 1:
            raise ModelFileError(f"{where}: invalid format_version {version!r}.")
        if version > FORMAT_VERSION:
            raise ModelFileError(
                f"{where} was written by a newer sthist (format version {version} > {FORMAT_VERSION}); upgrade sthist."
            )
        for key in ("config", "genes", "history", "files"):
            if key not in doc:
                raise ModelFileError(
                    f"{where}: {CONFIG_FILE} lacks the entry {key!r}; the file was modified or truncated."
                )
        config, genes, files = doc["config"], doc["genes"], doc["files"]
        tensors = {}
        for name in (WEIGHTS_FILE, BANK_FILE):
            f = path / name
            if not f.is_file():
                raise ModelFileError(f"{where} lacks {name}; copy the whole folder.")
            info = files.get(name) if isinstance(files, dict) else None
            if not isinstance(info, dict) or "sha256" not in info:
                raise ModelFileError(f"{where}: {CONFIG_FILE} has no checksum for {name}.")
            if file_sha256(f) != info["sha256"]:
                raise ModelFileError(f"{where}: {name} was modified or corrupted (checksum mismatch).")
            try:
                tensors[name] = load_file(str(f), device="cpu")
            except Exception as err:
                raise ModelFileError(f"{where}: {name} is not a readable safetensors file ({err}).") from err
        try:
            method_cls = get_method(config["method"])
            mcfg = method_cls.make_config(config["method_config"])
            image_dim, n_genes = int(config["image_dim"]), int(config["n_genes"])
            if version == 1:  # written before models recorded their inputs
                config["inputs"] = _inputs_v1(config).to_dict()
            inputs = ModelInputs.from_dict(config["inputs"])
        except (KeyError, TypeError, ValueError) as err:
            raise ModelFileError(f"{where}: {CONFIG_FILE} holds an invalid model configuration ({err}).") from err
        if not isinstance(genes, list) or len(genes) != n_genes:
            raise ModelFileError(
                f"{where}: {CONFIG_FILE} lists {len(genes) if isinstance(genes, list) else '?'} genes, expected {n_genes}."
            )
        token_dim = config.get("token_dim")
        method = method_cls(image_dim, n_genes, mcfg, **({"token_dim": int(token_dim)} if token_dim else {}))
        scaler = None if inputs.finetuned else FeatureScaler(image_dim)
        encoder = None
        if inputs.finetuned:
            # the architecture only; the fine-tuned weights come from model.safetensors
            encoder = build_image_encoder(inputs.encoder, pretrained=False)
            encoder.pretrained = inputs.pretrained
            encoder.checkpoint = inputs.checkpoint
            # the input normalisation it was fine-tuned with (the recipe's; older models: the encoder's own)
            encoder.set_normalisation(str(config.get("plan", {}).get("normalisation", "encoder")))

        # frozen token methods standardise their tokens; fine-tuned ones read the encoder's tokens as they are
        token_scaler = FeatureScaler(int(token_dim)) if token_dim and not inputs.finetuned else None
        net = _Net(method, scaler, encoder, token_scaler)
        try:
            net.load_state_dict(tensors[WEIGHTS_FILE], strict=True)
        except RuntimeError as err:
            raise ModelFileError(f"{where}: {WEIGHTS_FILE} does not fit the configured model ({err}).") from err
        bank = tensors[BANK_FILE]
        if set(bank) != {"embeddings", "expression"}:
            raise ModelFileError(f"{where}: {BANK_FILE} must hold 'embeddings' and 'expression', found {sorted(bank)}.")
        emb, expr = bank["embeddings"].numpy(), bank["expression"].numpy()
        emb_dim = config.get("embedding_dim")
        if (
            emb.ndim != 2
            or expr.ndim != 2
            or emb.shape[0] != expr.shape[0]
            or expr.shape[1] != n_genes
            or (emb_dim is not None and emb.shape[1] != emb_dim)
        ):
            raise ModelFileError(
                f"{where}: the bank has inconsistent shapes (embeddings {tuple(emb.shape)}, expression "
                f"{tuple(expr.shape)}; expected (n, {emb_dim}) and (n, {n_genes}))."
            )
        model = cls(
            net=net,
            config=config,
            genes=[str(g) for g in genes],
            history=doc["history"],
            bank_embeddings=emb,
            bank_expression=expr,
        )
        model._to(device)
        return attach_calibration(model, path)


def _inputs_v1(config: dict[str, Any]) -> ModelInputs:
    """The inputs of a format-1 model, from its ``encoder`` and ``patches`` entries."""
    enc, patches = config["encoder"], config.get("patches") or {}
    return ModelInputs(
        encoder=str(enc["spec"]),
        pretrained=bool(enc.get("pretrained")),
        checkpoint=enc.get("checkpoint"),
        finetuned=bool(enc.get("finetuned")),
        feature_dim=int(config["image_dim"]),
        patch_size=patches.get("patch_size"),
        mpp=patches.get("mpp"),
        needs_coords=bool(config.get("needs_neighbors")),
        needs_neighbors=bool(config.get("needs_neighbors")),
    )


def run_batches(
    method: Method,
    data: SpotData,
    fn,
    batch_size: int,
    *,
    encoder: nn.Module | None = None,
    scaler: nn.Module | None = None,
    token_scaler: nn.Module | None = None,
    images: bool = True,
    progress: bool = False,
    desc: str = "",
) -> np.ndarray:
    """Apply ``fn(batch)`` over all spots of ``data`` in batches, without gradients; rows follow the spots.

    Batches hold one section each when the method wants it.

    ``images=False`` makes expression-only batches (placeholder image features, no encoder or scaler).
    """
    order = np.arange(data.n)
    groups = None if data.groups is None else data.groups.cpu().numpy()
    out, pos = [], []
    batches = list(iter_batches(order, batch_size, groups=groups, by_group=method.batch_by_group))
    with torch.inference_mode():
        for idx in progress_bar(batches, enabled=progress, desc=desc, leave=False):
            batch = data.make_batch(
                idx,
                encoder=encoder if images else None,
                scaler=scaler if images else None,
                token_scaler=token_scaler if images else None,
                n_neighbors=method.n_neighbors,
                with_expression=data.expression is not None,
            )
            out.append(fn(batch).float().cpu().numpy())
            pos.append(idx)
    res = np.concatenate(out)
    result = np.empty_like(res)
    result[np.concatenate(pos)] = res
    return result


def expression_data(expression, *, coords, groups, method: Method, device) -> SpotData:
    """Expression-only spot data (placeholder image features) for embedding expression profiles with ``method``."""
    n = expression.shape[0]
    coords = check_coords(coords, n)
    codes = group_codes(groups, n)
    data = SpotData(
        features=np.zeros((n, 1), dtype=np.float32),
        expression=expression,
        coords=method.prepare_coords(coords, codes),
        groups=codes,
        device=device,
    )
    if method.n_neighbors and coords is not None:
        data.neighbors = spatial_neighbors(coords, codes, method.n_neighbors)
    return data


def expression_batch_size(method: Method, batch_size: int) -> int:
    """Spots per batch when embedding expression outside training: the method's set size, else ``batch_size``."""
    return int(method.expression_set_size or batch_size)
