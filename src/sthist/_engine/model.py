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

import json
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from . import bank as _bank
from ._utils import check_int, jsonable, progress_bar, resolve_device
from .data import (
    FeatureScaler,
    SpotData,
    check_coords,
    check_expression,
    check_features,
    group_codes,
    iter_batches,
    spatial_neighbors,
)
from .encoders import build_image_encoder, check_patches, encode_patches, file_sha256
from .methods import Method, get_method

FORMAT = "sthist.ContrastiveModel"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
BANK_FILE = "bank.safetensors"


class ModelFileError(ValueError):
    """A saved model folder is missing, incomplete, corrupted, modified or inconsistent."""


class _Net(nn.Module):
    """Everything with weights: the method, the frozen-feature scaler and (when fine-tuned) the image encoder."""

    def __init__(self, method: Method, scaler: FeatureScaler | None = None, encoder: nn.Module | None = None):
        super().__init__()
        self.method = method
        self.scaler = scaler
        self.encoder = encoder


class ContrastiveModel:
    """A fitted contrastive model, returned by :func:`sthist.tl.fit_contrastive`.

    Attributes
    ----------
    method
        Registry name of the method, e.g. ``"bleep"``.
    config
        JSON-friendly settings: method config, encoder description, training settings, dimensions, versions.
    genes
        Names of the modelled genes, in the column order of predictions.
    encoder_spec
        The image encoder spec (recomputes features from patches when predicting from ``images=``).
    history
        ``{"train_loss": [...], "val_loss": [...], "best_epoch": int (0-based), "seconds": float,
        "train_components": {name: [...]}, "stopped_early": bool, "n_train": int, "n_val": int, "device": str}``.
    prediction
        ``"retrieval"`` or ``"regression"``.
    needs_neighbors
        Whether prediction needs ``coords=`` (spatial neighbours).
    bank_embeddings, bank_expression
        The reference bank: expression embeddings (n_ref, p) and expression (n_ref, g) of the training spots.
    """

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
        self.bank_embeddings = np.ascontiguousarray(bank_embeddings, dtype=np.float32)
        self.bank_expression = np.ascontiguousarray(bank_expression, dtype=np.float32)
        self._frozen_encoder = encoder  # frozen-mode encoder built in this session (not saved: rebuilt from its spec)

    # ---- descriptive attributes ----------------------------------------------------------------------------------
    @property
    def method(self) -> str:
        return self.config["method"]

    @property
    def prediction(self) -> Literal["retrieval", "regression"]:
        return self.config["prediction"]

    @property
    def needs_neighbors(self) -> bool:
        return bool(self.config["needs_neighbors"])

    @property
    def encoder_spec(self) -> str:
        return self.config["encoder"]["spec"]

    @property
    def finetuned(self) -> bool:
        """Whether the image encoder was trained with the heads (its weights are part of the model)."""
        return bool(self.config["encoder"].get("finetuned", False))

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

    def _encoder(self) -> nn.Module:
        if self.finetuned:
            return self._net.encoder
        if self._frozen_encoder is None:
            enc = self.config["encoder"]
            ckpt = enc.get("checkpoint")
            if ckpt is not None:
                if not Path(ckpt).is_file():
                    raise FileNotFoundError(
                        f"this model's features came from the checkpoint {ckpt!r}, which no longer exists; restore it, "
                        "or pass features= computed with the same encoder."
                    )
                if enc.get("checkpoint_sha256") and file_sha256(ckpt) != enc["checkpoint_sha256"]:
                    raise ValueError(
                        f"the checkpoint {ckpt!r} changed since the model was trained (checksum mismatch); "
                        "predicting from images would use different features. Pass features= instead."
                    )
            self._frozen_encoder = build_image_encoder(
                enc["spec"], pretrained=bool(enc.get("pretrained")), checkpoint=ckpt
            )
        return self._frozen_encoder

    def _spot_data(self, images, features, coords, groups, dev, progress, batch_size, expression=None) -> SpotData:
        image_dim = self.config["image_dim"]
        if (images is None) == (features is None):
            raise ValueError("pass exactly one of images= (uint8 patches) or features= (encoder embeddings).")
        if images is not None:
            images = check_patches(images, name="images")
            n = images.shape[0]
        else:
            if self.finetuned:
                raise ValueError(
                    "this model fine-tuned its image encoder, so features of the original encoder do not fit it; "
                    "pass images= (the patches) instead."
                )
            features = check_features(features, None)
            n = features.shape[0]
            if features.shape[1] != image_dim:
                raise ValueError(
                    f"features have {features.shape[1]} columns but the model was trained on {image_dim}-d features of "
                    f"encoder {self.encoder_spec!r}; compute them with the same encoder (`sthist.pp.embed_patches`)."
                )
        coords = check_coords(coords, n)
        codes = group_codes(groups, n)
        if self.needs_neighbors and coords is None:
            raise ValueError(f"method {self.method!r} uses spatial neighbours: pass coords= (x, y per spot).")
        if images is not None and not self.finetuned:
            enc = self._encoder()
            if enc.out_dim != image_dim:
                raise ValueError(
                    f"encoder {self.encoder_spec!r} gives {enc.out_dim}-d features but the model was trained on "
                    f"{image_dim}-d features; the training features came from another encoder."
                )
            features = encode_patches(enc, images, device=dev, progress=progress, batch_size=min(batch_size, 64))
            images = None
        nb = None
        k = self._net.method.n_neighbors
        if k:
            nb = spatial_neighbors(coords, codes, k)
        return SpotData(
            features=features,
            images=images,
            expression=expression,
            coords=coords,
            groups=codes,
            neighbors=nb,
            device=dev,
        )

    def _run(
        self, data: SpotData, fn, batch_size: int, progress: bool = False, desc: str = "", images: bool = True
    ) -> np.ndarray:
        """Apply ``fn(batch)`` over all spots in order, in batches (one section per batch when the method wants it).

        ``images=False`` skips the encoder and scaler (expression-only batches with placeholder features).
        """
        method = self._net.method
        order = np.arange(data.n)
        groups = None if data.groups is None else data.groups.cpu().numpy()
        out, pos = [], []
        batches = list(iter_batches(order, batch_size, groups=groups, by_group=method.batch_by_group))
        with torch.inference_mode():
            for idx in progress_bar(batches, enabled=progress, desc=desc, leave=False):
                batch = data.make_batch(
                    idx,
                    encoder=self._net.encoder if (images and self.finetuned) else None,
                    scaler=self._net.scaler if images else None,
                    n_neighbors=method.n_neighbors,
                    with_expression=data.expression is not None,
                )
                out.append(fn(batch).float().cpu().numpy())
                pos.append(idx)
        res = np.concatenate(out)
        result = np.empty_like(res)
        result[np.concatenate(pos)] = res
        return result

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
    ) -> np.ndarray:
        """Joint-space embeddings (n, p) of spots from their patches (``images``) or encoder ``features``.

        ``images`` may be a numpy, dask or zarr array (uint8, (n, S, S, 3)); lazy arrays are read batch by batch.
        """
        batch_size = check_int("batch_size", batch_size)
        dev = self._to(device)
        data = self._spot_data(images, features, coords, groups, dev, progress, batch_size)
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
        n = expression.shape[0]
        coords = check_coords(coords, n)
        codes = group_codes(groups, n)
        method = self._net.method
        # expression embeddings need no image features; a placeholder keeps the batch shape
        data = SpotData(
            features=np.zeros((n, 1), dtype=np.float32), expression=expression, coords=coords, groups=codes, device=dev
        )
        if method.n_neighbors:
            if coords is None:
                raise ValueError(f"method {self.method!r} uses spatial neighbours: pass coords= (x, y per spot).")
            data.neighbors = spatial_neighbors(coords, codes, method.n_neighbors)
        return self._run(data, lambda b: method.embed_expression(b.expression, b), batch_size, images=False)

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
        images: np.ndarray | None = None,
        features: np.ndarray | None = None,
        coords: np.ndarray | None = None,
        groups: np.ndarray | None = None,
        k: int = 50,
        weighting: Literal["average", "distance", "softmax"] = "average",
        chunk_size: int = 4096,
        device: str | None = None,
        progress: bool = True,
        temperature: float = 0.1,
        batch_size: int = 256,
        index: Literal["exact", "faiss-ivf"] = "exact",
        n_probe: int = 32,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Predict expression of spots from their patches or encoder features.

        Parameters
        ----------
        images, features
            uint8 patches (n, S, S, 3) or encoder features (n, d); exactly one. ``images`` may be a numpy, dask or
            zarr array (e.g. from ``sthist.pp.extract_patches(..., store=...)``); lazy arrays are read batch by batch
            (fine-tuned models) or one storage chunk at a time (frozen encoders), never loaded whole.
        coords, groups
            Spot coordinates (n, 2) and section labels (n,), for methods that use them.
        k
            Reference spots retrieved per query (retrieval methods; BLEEP: 50, mclSTExp: 200).
        weighting
            ``"average"`` (BLEEP), ``"distance"`` (1/d^2, mclSTExp) or ``"softmax"`` (see :mod:`~sthist._engine.bank`).
        chunk_size
            Rows per query and bank chunk in retrieval.
        device
            ``None`` picks cuda, then mps, then cpu.
        progress
            Show progress bars.
        temperature
            Temperature of the ``"softmax"`` weighting.
        batch_size
            Spots per forward pass when embedding.
        index
            ``"exact"`` chunked search (default) or ``"faiss-ivf"``, an approximate faiss index for banks of
            millions of spots (needs ``faiss-cpu``; see :mod:`~sthist._engine.bank`).
        n_probe
            Inverted lists visited per query with ``index="faiss-ivf"``.

        Returns
        -------
        Predicted expression (n, g) float32 in the order of ``genes`` and the spread per spot (n,) float32: the mean
        over genes of the weighted standard deviation of the k retrieved profiles (NaN for regression methods).
        """
        batch_size = check_int("batch_size", batch_size)
        if weighting not in _bank.WEIGHTINGS:
            raise ValueError(f"weighting={weighting!r} is not valid; choose one of {list(_bank.WEIGHTINGS)}.")
        dev = self._to(device)
        data = self._spot_data(images, features, coords, groups, dev, progress, batch_size)
        method = self._net.method
        if self.prediction == "regression":
            pred = self._run(data, lambda b: method.predict(b.img_feats, b), batch_size, progress, "predicting")
            return pred.astype(np.float32), np.full(pred.shape[0], np.nan, dtype=np.float32)
        query = self._run(data, lambda b: method.embed_image(b.img_feats, b), batch_size, progress, "embedding images")
        return _bank.retrieve(
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
        )

    # ---- persistence ---------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the model to the folder ``path`` (created if needed; files of an earlier save are replaced)."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.exists() and not path.is_dir():
            raise ValueError(f"cannot save the model to {str(path)!r}: it exists and is not a folder.")
        path.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION)}
        state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in self._net.state_dict().items()}
        save_file(state, str(path / WEIGHTS_FILE), metadata=meta)
        bank = {
            "embeddings": torch.from_numpy(np.ascontiguousarray(self.bank_embeddings)),
            "expression": torch.from_numpy(np.ascontiguousarray(self.bank_expression)),
        }
        save_file(bank, str(path / BANK_FILE), metadata=meta)
        doc = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
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
        tmp = path / (CONFIG_FILE + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(path / CONFIG_FILE)

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | None = None) -> ContrastiveModel:
        """Read a model written by :meth:`save`; every file is checked, problems raise :class:`ModelFileError`."""
        from safetensors.torch import load_file

        path = Path(path)
        where = f"model folder {str(path)!r}"
        if not path.is_dir():
            raise ModelFileError(f"{where} does not exist or is not a folder; pass the folder given to `model.save()`.")
        cfg_file = path / CONFIG_FILE
        if not cfg_file.is_file():
            raise ModelFileError(
                f"{where} has no {CONFIG_FILE}; it was not written by `ContrastiveModel.save` or is incomplete."
            )
        try:
            doc = json.loads(cfg_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ModelFileError(f"{where}: {CONFIG_FILE} is not valid JSON ({err}); the file is corrupted.") from err
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ModelFileError(
                f"{where}: {CONFIG_FILE} is not an sthist model description (format {FORMAT!r} expected)."
            )
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
            enc_info = config["encoder"]
        except (KeyError, TypeError, ValueError) as err:
            raise ModelFileError(f"{where}: {CONFIG_FILE} holds an invalid model configuration ({err}).") from err
        if not isinstance(genes, list) or len(genes) != n_genes:
            raise ModelFileError(
                f"{where}: {CONFIG_FILE} lists {len(genes) if isinstance(genes, list) else '?'} genes, expected {n_genes}."
            )
        method = method_cls(image_dim, n_genes, mcfg)
        scaler = None if enc_info.get("finetuned") else FeatureScaler(image_dim)
        encoder = None
        if enc_info.get("finetuned"):
            # the architecture only; the fine-tuned weights come from model.safetensors
            encoder = build_image_encoder(enc_info["spec"], pretrained=False)
            encoder.pretrained = bool(enc_info.get("pretrained"))
            encoder.checkpoint = enc_info.get("checkpoint")
            encoder.checkpoint_sha256 = enc_info.get("checkpoint_sha256")
        net = _Net(method, scaler, encoder)
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
        return model
