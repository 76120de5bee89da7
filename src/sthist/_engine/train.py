"""The training loop shared by all contrastive methods.

Two modes:

frozen (``features=`` given, or ``images=`` with ``finetune=False``)
    Image features are computed once (or come cached from ``sthist.pp.embed_patches``), standardised with the
    training mean / std, and only the method's heads train. Fast: ~1000 spots train in seconds on a CPU.
fine-tuning (``images=`` with ``finetune=True``)
    The timm image encoder trains end to end with the heads, with augmentation (flips, rotations by multiples of
    90 degrees, mild colour jitter), as in BLEEP. Use a GPU.

What to learn and how is the method's :class:`~sthist._engine.plan.TrainPlan` (its ``recipe``), merged with the
caller's overrides by :func:`~sthist._engine.plan.resolve_plan`: optimiser, learning-rate schedule, batch size,
validation split, early stopping, model selection (validation loss or validation Pearson r) and stages, each with
its own loss terms, trainable parameters, epochs and optimiser. The engine's default plan is BLEEP's: at most 100
epochs, batch size 256, AdamW with lr 1e-3 and weight decay 1e-3, 10 % of the spots for validation, early stopping
after 10 epochs without a better validation score, and the weights of the best validation epoch restored. Training
batches drop the incomplete last batch (``drop_last=True`` as BLEEP).

Speed (fine-tuning): a :class:`torch.utils.data.DataLoader` reads the uint8 patches of every batch (``num_workers``
background processes; numpy, dask or zarr arrays, read by rows so that lazy stores are never loaded whole), with
pinned memory and asynchronous copies on CUDA; augmentation runs on the device after the copy. On CUDA the encoder
runs under bf16 autocast, in ``channels_last`` memory format when it has convolutions, and optionally compiled
(``compile=True``). Frozen mode keeps all features on the device and needs none of this.

Several GPUs or machines: launched with ``torchrun``, :func:`fit` trains data-parallel with the contrastive negatives
of the whole global batch, see :mod:`sthist._engine.distributed`.

The pieces: :func:`_prepare` checks the inputs (:func:`_check_inputs`), splits the spots (:func:`_split`), builds the
image side (:func:`_image_side`, :func:`_token_side`), the model's inputs record (:func:`_model_inputs`) and the
method's module with its :class:`_Trainer` (:func:`_build_trainer`). Everything the loop then changes is one
:class:`TrainingState` (weights, optimiser, position in the stages, best-so-far, history, random number generators),
advanced by :func:`_train` epoch by epoch (:func:`_run_epoch`, :func:`_finish_stage`) and, with ``checkpoint_every``,
written atomically by :class:`_Checkpointer` (:func:`_write_checkpoint`); ``resume=True`` loads it back, so that a
killed run continues to the model an uninterrupted run gives (docs page "Checkpoints and resuming").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from . import bank as _bank
from . import distributed
from ._utils import autocast, check_int, jsonable, mean_pearson, progress_bar, resolve_device, seed_everything
from .base import ModelFileError, ModelInputs, state_sha256
from .data import (
    BatchSampler,
    FeatureScaler,
    PatchBatches,
    SpotData,
    apply_augmentation,
    batch_image_rows,
    check_coords,
    check_expression,
    check_features,
    check_genes,
    check_patches,
    check_tokens,
    draw_augmentation,
    group_codes,
    images_to_tensor,
    iter_batches,
    read_rows,
    spatial_neighbors,
)
from .encoders import DEFAULT_ENCODER, build_image_encoder, encode_patches
from .methods import get_method
from .model import ContrastiveModel, _Net, expression_batch_size, expression_data, retrieval_settings, run_batches
from .plan import WHOLE_SECTION, Optim, Schedule, Stage, TrainPlan, resolve_plan


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("sthist", "torch", "timm"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def _auto_workers(dev: torch.device, ctx: distributed.Context) -> int:
    """Background reader processes when ``num_workers=None``: none off CUDA, else up to 8 per GPU process."""
    if dev.type != "cuda":
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return int(max(1, min(8, cpus // max(ctx.local_world_size, 1) - 1)))


def _has_conv(module: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.Conv2d) for m in module.modules())


class _Trainer:
    """One training (or validation) step of any method on a batch of spot positions.

    ``fit`` calls :meth:`step` for every training batch and :meth:`loss` (without gradients) for validation; tests call
    :meth:`backward` to compare losses and gradients of one- and multi-process training on the same global batch.
    In fine-tuning mode ``images`` are the uint8 rows of the batch (of this process's shard under torchrun) as read
    by :class:`~sthist._engine.data.PatchBatches`; ``None`` reads them here.
    """

    def __init__(
        self,
        *,
        module,
        data: SpotData,
        scaler,
        encoder,
        optimizer,
        augment: bool,
        aug_gen: torch.Generator,
        device: torch.device,
        ctx: distributed.Context,
        channels_last: bool = False,
        compile: bool = False,
        token_scaler=None,
        augmentation=None,
    ):
        self.module, self.data, self.scaler, self.encoder = module, data, scaler, encoder
        self.token_scaler = token_scaler
        self.optimizer, self.augment, self.aug_gen = optimizer, augment, aug_gen
        self.augmentation = augmentation  # the recipe's Augment (None: the default)
        self.device, self.ctx, self.channels_last = device, ctx, channels_last
        self.n_neighbors = module.n_neighbors
        self.finetune = encoder is not None
        self.token_grid = module.token_grid if self.finetune else 0  # fine-tuning: tokens from the encoder's pass
        self.terms: tuple[str, ...] | None = None  # the loss terms of the current stage (None: all)
        self._compiled, self._compile_checked = bool(compile), False
        fwd = encoder
        if self.finetune and ctx.active:
            from torch.nn.parallel import DistributedDataParallel

            fwd = DistributedDataParallel(encoder, device_ids=[device.index] if device.type == "cuda" else None)
        self._wrapper = fwd  # the encoder or its DistributedDataParallel wrapper (train / eval mode)
        if self.finetune and compile:
            fwd = torch.compile(fwd)
        self.encoder_forward = fwd

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)
        if self.finetune:
            self._wrapper.train(mode)

    def shard(self, n_rows: int) -> np.ndarray:
        """Positions of the batch's image rows this process encodes (all of them in one process)."""
        return distributed.shard_positions(n_rows, self.ctx) if self.ctx.active else np.arange(n_rows)

    def _encode(self, x: torch.Tensor):
        """Encoder output of ``x``: features, or ``(features, tokens)`` for methods that read tokens."""
        kwargs = {"grid": self.token_grid} if self.token_grid else {}
        with autocast(self.device):
            if self._compiled and not self._compile_checked:
                try:
                    out = self.encoder_forward(x, **kwargs)
                except Exception as err:
                    raise RuntimeError(
                        f"torch.compile of the image encoder failed ({type(err).__name__}: {err}); train with "
                        "compile=False."
                    ) from err
                self._compile_checked = True
                return out
            return self.encoder_forward(x, **kwargs)

    def image_features(self, idx: np.ndarray, images=None, *, train: bool):
        """Encoder features (float32) of all image rows of the batch ``idx`` (see :func:`batch_image_rows`).

        Methods that read tokens get ``(features, tokens)`` of the rows, from the same forward pass.
        """
        rows, _ = batch_image_rows(idx, self.data.neighbors, self.n_neighbors)
        n = rows.size
        pos = self.shard(n)
        if images is None:
            images = read_rows(self.data.images, rows[pos])
        x = images_to_tensor(images, self.device, non_blocking=True)
        if train and self.augment:
            # drawn for all rows of the global batch (the same on every process), applied to the local shard
            params = draw_augmentation(n, self.aug_gen, square=x.shape[-1] == x.shape[-2], spec=self.augmentation)
            if self.ctx.active:
                t_pos = torch.as_tensor(pos)
                params = {k: v[t_pos] for k, v in params.items()}
            x = apply_augmentation(x, params)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = self._encode(x)
        f, tok = (out[0].float(), out[1].float()) if self.token_grid else (out.float(), None)
        if self.ctx.active:
            f = distributed.gather_rows(f, n, self.ctx)
            if tok is not None:
                shape = tok.shape[1:]
                tok = distributed.gather_rows(tok.flatten(1), n, self.ctx).view(n, *shape)
        return f if tok is None else (f, tok)

    def batch(self, idx: np.ndarray, images=None, *, train: bool):
        """The :class:`~sthist._engine.methods.Batch` of the spots ``idx`` (with neighbours when the method uses them)."""
        if not self.finetune:
            return self.data.make_batch(
                idx, scaler=self.scaler, n_neighbors=self.n_neighbors, token_scaler=self.token_scaler
            )
        feats = self.image_features(idx, images, train=train)
        tokens = None
        if self.token_grid:
            feats, tokens = feats
        return self.data.make_batch(idx, n_neighbors=self.n_neighbors, row_features=feats, row_tokens=tokens)

    def loss(self, idx: np.ndarray, images=None, *, train: bool = True, batch=None):
        """The loss of the batch ``idx``: the sum of the stage's terms of the method's ``loss``, and all terms.

        Returns ``(loss, terms)`` with the terms detached (for logging).
        """
        if batch is None:
            batch = self.batch(idx, images, train=train)
        with autocast(self.device):
            terms = self.module.loss(batch)
        if not isinstance(terms, dict) or not terms:
            raise TypeError(
                f"{type(self.module).__name__}.loss must return a non-empty dict of named loss terms, got "
                f"{type(terms).__name__}."
            )
        names = self.terms if self.terms is not None else tuple(terms)
        missing = [t for t in names if t not in terms]
        if missing:
            raise ValueError(
                f"the training stage asks for loss terms {missing} that {type(self.module).__name__}.loss does not "
                f"return; it returns {list(terms)}."
            )
        total = sum(terms[t] for t in names)
        return total, {t: v.detach() for t, v in terms.items()}

    def backward(self, idx: np.ndarray, images=None, *, epoch: int = 0):
        """Zero the gradients, compute the loss of the global batch ``idx`` and its gradients; no optimiser step.

        Under torchrun the gradients are synchronised over processes. Returns ``(loss, logs)``.
        """
        self.optimizer.zero_grad(set_to_none=True)
        loss, logs = self.loss(idx, images, train=True)
        if not torch.isfinite(loss):
            lr = self.optimizer.param_groups[0]["lr"]
            raise FloatingPointError(
                f"the training loss became {float(loss)} in epoch {epoch + 1}; lower lr (now {lr}) or check the inputs."
            )
        loss.backward()
        if self.ctx.active and self.finetune:
            # encoder gradients are averaged by DistributedDataParallel; the heads' are equal everywhere, average
            # them too so that they stay bitwise equal
            distributed.average_gradients([p for p in self.module.parameters() if p.requires_grad], self.ctx)
        return loss, logs

    def step(self, idx: np.ndarray, images=None, *, epoch: int = 0):
        """One optimisation step on the global batch ``idx``; returns ``(loss, logs)``."""
        loss, logs = self.backward(idx, images, epoch=epoch)
        self.optimizer.step()
        return loss, logs


@dataclass
class _Run:
    """Everything :func:`fit` prepared before its loop (also used by tests to run single steps)."""

    trainer: _Trainer
    method_cls: Any
    mcfg: Any
    plan: TrainPlan
    stages: tuple[Stage, ...]
    train_idx: np.ndarray
    val_idx: np.ndarray
    rng: np.random.Generator
    codes: np.ndarray | None
    coords: np.ndarray | None
    groups: Any
    expression: np.ndarray
    genes: list[str]
    image_dim: int
    enc_info: dict[str, Any]
    inputs: ModelInputs
    frozen_encoder: Any
    device: torch.device
    num_workers: int
    settings: dict[str, Any]
    notes: list[str]
    progress: bool
    own_trainable: dict[int, bool] = dataclasses.field(default_factory=dict)
    """Which parameters the method and encoder themselves leave trainable (a stage never unfreezes the others)."""
    shapes: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    """Shapes of the image inputs (``images``, ``features``, ``tokens``), for the checkpoint's fingerprint."""


@dataclass
class _Inputs:
    """The checked inputs of a fit (:func:`_check_inputs`)."""

    method_cls: Any
    mcfg: Any
    plan: TrainPlan
    batch_given: bool
    expression: np.ndarray
    genes: list[str]
    images: Any
    features: np.ndarray | None
    coords: np.ndarray | None
    codes: np.ndarray | None
    groups: Any
    random_state: int
    num_workers: int | None
    ctx: distributed.Context
    device: torch.device


def _check_inputs(
    *,
    method: str,
    expression: Any,
    genes: list[str],
    images: Any,
    features: Any,
    coords: Any,
    groups: Any,
    finetune: bool,
    compile: bool,
    num_workers: int | None,
    random_state: int,
    device: str | None,
    plan: TrainPlan | None,
    method_kwargs: dict[str, Any] | None,
    overrides: dict[str, Any],
) -> _Inputs:
    """Check the inputs of a fit and resolve its plan, device and process context; errors name the fix."""
    method_cls = get_method(method)
    mcfg = method_cls.make_config(method_kwargs)
    batch_given = overrides.get("batch_size") is not None
    plan = resolve_plan(method_cls.recipe, plan, **overrides)
    expression = check_expression(expression)
    n, g = expression.shape
    genes = check_genes(genes, g)
    if (images is None) == (features is None):
        raise ValueError(
            "pass exactly one of images= (uint8 patches, for fine-tuning or on-the-fly encoding) or features= "
            "(cached encoder embeddings from `sthist.pp.embed_patches`)."
        )
    if images is not None:
        images = check_patches(images, name="images")
        if images.shape[0] != n:
            raise ValueError(f"images has {images.shape[0]} patches but expression has {n} spots; they must match.")
    else:
        features = check_features(features, n)
    if not isinstance(finetune, bool | np.bool_):
        raise TypeError(f"finetune must be True or False, got {finetune!r}.")
    if finetune and images is None:
        raise ValueError("finetune=True trains the image encoder and needs images= (the patches), not features=.")
    if not isinstance(compile, bool | np.bool_):
        raise TypeError(f"compile must be True or False, got {compile!r}.")
    if num_workers is not None:
        num_workers = check_int("num_workers", num_workers, minimum=0)
    coords = check_coords(coords, n)
    codes = group_codes(groups, n)
    if (method_cls.needs_neighbors or method_cls.needs_coords) and coords is None:
        raise ValueError(f"method {method!r} uses spot coordinates: pass coords= (x, y per spot).")
    if not isinstance(random_state, int | np.integer) or isinstance(random_state, bool):
        raise TypeError(f"random_state must be an integer, got {random_state!r}.")
    ctx = distributed.detect()
    return _Inputs(
        method_cls=method_cls,
        mcfg=mcfg,
        plan=plan,
        batch_given=batch_given,
        expression=expression,
        genes=genes,
        images=images,
        features=features,
        coords=coords,
        codes=codes,
        groups=groups,
        random_state=int(random_state),
        num_workers=num_workers,
        ctx=ctx,
        device=distributed.process_device(resolve_device(device), ctx),
    )


def _split(inp: _Inputs) -> tuple[np.ndarray, np.ndarray, np.random.Generator, TrainPlan, list[str]]:
    """The validation split: ``(train_idx, val_idx, rng, plan, notes)``.

    ``rng`` drew the split and shuffles the training batches afterwards; ``plan`` has its batch reduced to the training
    spots when the recipe's is larger (noted in ``notes``); a ``batch_size`` given by the caller is never reduced.
    """
    plan, n = inp.plan, inp.expression.shape[0]
    rng = np.random.default_rng(inp.random_state)
    vf = plan.validation_fraction
    n_val = round(n * vf) if vf > 0 else 0
    if vf > 0 and n_val < 2:
        raise ValueError(
            f"validation_fraction={vf} of {n} spots leaves {n_val} validation spots; the contrastive "
            "loss needs at least 2. Raise validation_fraction or set it to 0 (no early stopping)."
        )
    perm = rng.permutation(n)
    if plan.validation_by_group and vf > 0 and inp.codes is not None:
        # a fraction of every section (CMRCNet's split): each section's spots in the order of the permutation
        val = [perm[inp.codes[perm] == g][: round((inp.codes == g).sum() * vf)] for g in np.unique(inp.codes)]
        val_idx = np.sort(np.concatenate(val))
        train_idx = np.setdiff1d(np.arange(n), val_idx)
        n_val = val_idx.size
    else:
        val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    notes = []
    if plan.batch_size > train_idx.size:
        if inp.batch_given:
            if not inp.method_cls.batch_by_group:
                raise ValueError(
                    f"batch_size={plan.batch_size} is larger than the {train_idx.size} training spots ({n} spots minus "
                    f"{n_val} for validation); the maximum batch size here is {train_idx.size}. Lower batch_size or "
                    "use more spots."
                )
        else:
            notes.append(f"batch size reduced from {plan.batch_size} to the {train_idx.size} training spots")
            plan = dataclasses.replace(plan, batch_size=int(train_idx.size))
    return train_idx, val_idx, rng, plan, notes


@dataclass
class _ImageSide:
    """The image encoder of a fit (:func:`_image_side`): trained (fine-tuning) or frozen, and the features."""

    encoder: Any  # the encoder that trains (fine-tuning), else None
    frozen_encoder: Any  # the encoder that computed the features from images (frozen mode), else None
    info: dict[str, Any]
    dim: int
    features: np.ndarray | None


def _features_encoder_info(
    encoder: str, pretrained: bool, checkpoint: str | None, encoder_info: dict[str, Any] | None, dim: int
) -> dict[str, Any]:
    """What is known of the encoder that made cached ``features=``: its spec, and what the caller recorded of it."""
    info = {
        "spec": encoder,
        "pretrained": bool(pretrained),
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "checkpoint_sha256": None,
        "weights_sha256": None,
        "out_dim": int(dim),
        "finetuned": False,
    }
    if checkpoint is not None:
        from pathlib import Path

        from .encoders import file_sha256

        p = Path(checkpoint)
        info["checkpoint_sha256"] = file_sha256(p) if p.is_file() else None
        info["checkpoint"] = str(p.resolve()) if p.is_file() else str(checkpoint)
    # what the caller knows of the encoder that made the features (e.g. `sthist.pp.embed_patches` params)
    for key in ("weights_sha256", "patch_size", "mpp"):
        if (encoder_info or {}).get(key) not in (None, ""):
            info[key] = encoder_info[key]
    return info


def _image_side(
    inp: _Inputs,
    *,
    encoder: str,
    pretrained: bool,
    checkpoint: str | None,
    encoder_info: dict[str, Any] | None,
    finetune: bool,
    progress: bool,
) -> _ImageSide:
    """Build the encoder to fine-tune, or the frozen features (encoded here from ``images`` when not given)."""
    dev = inp.device
    if finetune:
        enc = build_image_encoder(encoder, pretrained=pretrained, checkpoint=checkpoint)
        if enc.weight_free:
            raise ValueError(
                f"encoder={encoder!r} is weight-free and has nothing to fine-tune; use finetune=False, or a timm model "
                "such as encoder='resnet18'."
            )
        enc.set_normalisation(inp.plan.normalisation)  # the paper's input normalisation (recorded in the plan)
        enc.to(dev)
        return _ImageSide(enc, None, {**enc.describe(), "finetuned": True}, int(enc.out_dim), None)
    if inp.images is not None:
        frozen = build_image_encoder(encoder, pretrained=pretrained, checkpoint=checkpoint)
        features = encode_patches(frozen, inp.images, device=dev, progress=progress and inp.ctx.is_main)
        info = {**frozen.describe(), "finetuned": False, "weights_sha256": state_sha256(frozen)}
        return _ImageSide(None, frozen, info, int(features.shape[1]), features)
    features = inp.features
    info = _features_encoder_info(encoder, pretrained, checkpoint, encoder_info, features.shape[1])
    return _ImageSide(None, None, info, int(features.shape[1]), features)


def _token_side(
    inp: _Inputs, side: _ImageSide, tokens: Any, train_idx: np.ndarray, *, finetune: bool, progress: bool
) -> tuple[int, Any, Any, int]:
    """The encoder tokens of methods that consume them: ``(grid, tokens, token_scaler, token_dim)``.

    ``grid`` is 0 for methods without tokens. Fine-tuning takes the tokens from the encoder's pass of every batch
    (no cached tokens, no scaler); frozen mode uses ``tokens`` or encodes them from the images once.
    """
    method_cls, method = inp.method_cls, inp.method_cls.name
    grid = int(getattr(inp.mcfg, "token_grid", 0)) if "tokens" in method_cls.consumes else 0
    if grid and finetune:
        # the tokens come from the fine-tuned encoder's forward pass of every batch (unstandardised, as features)
        if tokens is not None:
            raise ValueError(
                "finetune=True computes the encoder tokens from the patches in every step; drop tokens= (cached tokens "
                "are for frozen mode)."
            )
        return grid, None, None, int(side.encoder.token_dim)
    if grid:
        if tokens is None:
            if side.frozen_encoder is None:
                raise ValueError(
                    f"method {method!r} consumes a {grid} x {grid} grid of encoder tokens: pass tokens= (n, "
                    f"{grid * grid}, d) or images= (the patches), not features= alone."
                )
            from .encoders import encode_tokens

            tokens = encode_tokens(
                side.frozen_encoder, inp.images, grid=grid, device=inp.device, progress=progress and inp.ctx.is_main
            )
        tokens = check_tokens(tokens, inp.expression.shape[0], grid)
        d = tokens.shape[2]
        token_scaler = FeatureScaler(d).fit(tokens[train_idx].reshape(-1, d)).to(inp.device)
        return grid, tokens, token_scaler, int(d)
    if tokens is not None:
        raise ValueError(f"method {method!r} does not consume encoder tokens; drop tokens=.")
    return 0, None, None, 0


def _model_inputs(
    inp: _Inputs,
    side: _ImageSide,
    *,
    grid: int,
    finetune: bool,
    patch_size: int | None,
    mpp: float | None,
    targets: dict[str, Any] | None,
) -> ModelInputs:
    """What the model is fitted on (encoder, patch geometry, tokens, targets), recorded in the model."""
    info = side.info
    if inp.images is not None:
        patch_size = int(inp.images.shape[1])
    elif patch_size is None:
        patch_size = info.get("patch_size")
    if mpp is None:
        mpp = info.get("mpp")
    return ModelInputs(
        encoder=str(info["spec"]),
        pretrained=bool(info.get("pretrained")),
        checkpoint=info.get("checkpoint"),
        weights_sha256=info.get("weights_sha256"),
        finetuned=bool(finetune),
        feature_dim=int(side.dim),
        patch_size=None if patch_size is None else int(patch_size),
        mpp=None if mpp is None else float(mpp),
        needs_coords=bool(inp.method_cls.needs_neighbors),
        needs_neighbors=bool(inp.method_cls.needs_neighbors),
        tokens=grid or None,
        targets=None if targets is None else dict(targets),
    )


def _build_trainer(
    inp: _Inputs,
    side: _ImageSide,
    train_idx: np.ndarray,
    *,
    grid: int,
    tokens: Any,
    token_scaler: Any,
    token_dim: int,
    finetune: bool,
    augment: bool,
    compile: bool,
) -> _Trainer:
    """The method's module (initialised from torch's seeded generator), the spot data and the :class:`_Trainer`."""
    dev, method_cls, enc = inp.device, inp.method_cls, side.encoder
    scaler = None if finetune else FeatureScaler(side.dim).fit(side.features[train_idx]).to(dev)
    extra = {"token_dim": token_dim} if grid else {}
    module = method_cls(side.dim, inp.expression.shape[1], inp.mcfg, **extra).to(dev)
    k_nb = module.n_neighbors
    neighbors = spatial_neighbors(inp.coords, inp.codes, k_nb) if k_nb else None
    data = SpotData(
        features=None if finetune else side.features,
        images=inp.images if finetune else None,
        expression=inp.expression,
        coords=method_cls.prepare_coords(inp.coords, inp.codes),
        groups=inp.codes,
        neighbors=neighbors,
        tokens=tokens,
        device=dev,
    )
    channels_last = bool(finetune and dev.type == "cuda" and _has_conv(enc))
    if channels_last:
        enc.to(memory_format=torch.channels_last)
    if finetune:
        # data-parallel training over processes (torchrun); a no-op in one process
        distributed.init(dev, inp.ctx)
    return _Trainer(
        module=module,
        data=data,
        scaler=scaler,
        encoder=enc,
        optimizer=None,
        augment=bool(finetune and augment),
        aug_gen=torch.Generator().manual_seed(inp.random_state),
        augmentation=inp.plan.augmentation,
        device=dev,
        ctx=inp.ctx if finetune else distributed.Context(rank=inp.ctx.rank),
        channels_last=channels_last,
        compile=bool(finetune and compile),
        token_scaler=token_scaler,
    )


def _prepare(
    *,
    method: str = "bleep",
    expression: np.ndarray,
    genes: list[str],
    images: Any = None,
    features: np.ndarray | None = None,
    tokens: np.ndarray | None = None,
    coords: np.ndarray | None = None,
    groups: np.ndarray | None = None,
    encoder: str = DEFAULT_ENCODER,
    pretrained: bool = False,
    checkpoint: str | None = None,
    encoder_info: dict[str, Any] | None = None,
    finetune: bool = False,
    plan: TrainPlan | None = None,
    max_epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    weight_decay: float | None = None,
    optimizer: str | Optim | None = None,
    schedule: str | Schedule | None = None,
    validation_fraction: float | None = None,
    early_stopping_patience: int | Literal["off"] | None = None,
    select_on: Literal["val_loss", "val_pearson", "val_pearson_top50"] | None = None,
    augment: bool | None = None,
    patch_size: int | None = None,
    mpp: float | None = None,
    device: str | None = None,
    random_state: int = 0,
    progress: bool = True,
    method_kwargs: dict[str, Any] | None = None,
    num_workers: int | None = None,
    compile: bool = False,
    targets: dict[str, Any] | None = None,
) -> _Run:
    """Check the inputs and build everything the loop needs, in the first stage (see :func:`fit` for the arguments).

    The steps: :func:`_check_inputs`, :func:`_split`, then, from the seeded generators, :func:`_image_side` (encoder
    and features), :func:`_token_side`, :func:`_model_inputs` and :func:`_build_trainer` (the method's module).
    """
    overrides = {
        "max_epochs": max_epochs,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "optimizer": optimizer,
        "schedule": schedule,
        "validation_fraction": validation_fraction,
        "early_stopping_patience": early_stopping_patience,
        "select_on": select_on,
        "augment": augment,
    }
    inp = _check_inputs(
        method=method,
        expression=expression,
        genes=genes,
        images=images,
        features=features,
        coords=coords,
        groups=groups,
        finetune=finetune,
        compile=compile,
        num_workers=num_workers,
        random_state=random_state,
        device=device,
        plan=plan,
        method_kwargs=method_kwargs,
        overrides=overrides,
    )
    train_idx, val_idx, rng, plan, notes = _split(inp)
    seed_everything(inp.random_state)  # the encoder's and the heads' initial weights, dropout
    side = _image_side(
        inp,
        encoder=encoder,
        pretrained=pretrained,
        checkpoint=checkpoint,
        encoder_info=encoder_info,
        finetune=finetune,
        progress=progress,
    )
    grid, tokens, token_scaler, token_dim = _token_side(
        inp, side, tokens, train_idx, finetune=finetune, progress=progress
    )
    trainer = _build_trainer(
        inp,
        side,
        train_idx,
        grid=grid,
        tokens=tokens,
        token_scaler=token_scaler,
        token_dim=token_dim,
        finetune=finetune,
        augment=plan.augment,
        compile=compile,
    )
    dev, ctx = inp.device, inp.ctx
    workers = (inp.num_workers if inp.num_workers is not None else _auto_workers(dev, ctx)) if finetune else 0
    settings = {
        "random_state": inp.random_state,
        "device": str(dev),
        "num_workers": int(workers),
        "compile": bool(compile),
        "channels_last": trainer.channels_last,
        "world_size": int(ctx.world_size if finetune else 1),
    }
    source = inp.images if inp.images is not None else inp.features
    shapes = {"images" if inp.images is not None else "features": list(source.shape)}
    if tokens is not None:
        shapes["tokens"] = list(tokens.shape)
    stages = plan.resolved_stages()
    run = _Run(
        trainer=trainer,
        method_cls=inp.method_cls,
        mcfg=inp.mcfg,
        plan=plan,
        stages=stages,
        train_idx=train_idx,
        val_idx=val_idx,
        rng=rng,
        codes=inp.codes,
        coords=inp.coords,
        groups=inp.groups,
        expression=inp.expression,
        genes=inp.genes,
        image_dim=int(side.dim),
        enc_info=side.info,
        inputs=_model_inputs(inp, side, grid=grid, finetune=finetune, patch_size=patch_size, mpp=mpp, targets=targets),
        frozen_encoder=side.frozen_encoder,
        device=dev,
        num_workers=int(workers),
        settings=settings,
        notes=notes,
        progress=bool(progress),
        shapes=shapes,
    )
    _enter_stage(run, stages[0])
    return run


def _enter_stage(run: _Run, stage: Stage) -> None:
    """Set the trainable parameters, loss terms and a fresh optimiser for ``stage``."""
    trainer = run.trainer
    prefixes = stage.trainable
    named = [(name, p) for name, p in trainer.module.named_parameters()]
    if trainer.finetune:
        named += [(f"encoder.{name}", p) for name, p in trainer.encoder.named_parameters()]
    if not run.own_trainable:
        run.own_trainable.update({id(p): p.requires_grad for _, p in named})
    if prefixes is not None:
        unknown = sorted(pre for pre in prefixes if not any(n.startswith(pre) for n, _ in named))
        if unknown:
            tops = sorted({n.split(".")[0] for n, _ in named})
            raise ValueError(
                f"stage {stage.name!r} trains {unknown}, which name no parameters of method {run.method_cls.name!r}; "
                f"its modules are {tops}."
            )
    params = []
    for name, p in named:
        on = run.own_trainable[id(p)] and (prefixes is None or any(name.startswith(pre) for pre in prefixes))
        p.requires_grad_(on)
        if on:
            params.append(p)
    if not params:
        raise ValueError(f"stage {stage.name!r} of method {run.method_cls.name!r} has no trainable parameters.")
    trainer.optimizer = stage.optimizer.build(params)
    trainer.terms = stage.losses


def _epoch_batches(run: _Run, batch_size: int | str):
    """A function giving the ``(tag, idx)`` items of one epoch: shuffled training batches, then validation batches.

    ``batch_size="section"`` (:data:`~sthist._engine.plan.WHOLE_SECTION`) makes one batch of each section's spots.
    """
    by_group = run.method_cls.batch_by_group
    if batch_size == WHOLE_SECTION:
        batch_size, by_group = max(int(run.expression.shape[0]), 2), True
    elif not by_group:
        batch_size = min(int(batch_size), max(int(run.train_idx.size), 2))  # a stage's batch cannot exceed the spots

    def items():
        for idx in iter_batches(
            run.train_idx,
            batch_size,
            rng=run.rng,
            drop_last=run.plan.drop_last and not by_group,
            groups=run.codes,
            by_group=by_group,
        ):
            if idx.size >= 2:
                yield "train", idx
        for idx in iter_batches(run.val_idx, batch_size, groups=run.codes, by_group=by_group):
            if idx.size >= 2:
                yield "val", idx

    return items


def _loader(run: _Run, batch_size: int | str):
    """Iterable over the epochs' ``(tag, idx, images)``: a DataLoader reading patches (fine-tuning) or plain indices."""
    items = _epoch_batches(run, batch_size)
    trainer = run.trainer
    if not trainer.finetune:
        return lambda: ((tag, idx, None) for tag, idx in items())
    dataset = PatchBatches(
        trainer.data.images,
        neighbors=trainer.data.neighbors,
        n_neighbors=trainer.n_neighbors,
        shard=trainer.shard if trainer.ctx.active else None,
    )
    workers = run.num_workers
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,  # the sampler yields whole batches
        sampler=BatchSampler(items),
        num_workers=workers,
        pin_memory=run.device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        # a private generator: the loader's worker seeds must not consume torch's global random numbers (dropout)
        generator=torch.Generator().manual_seed(0),
    )
    return lambda: ((item["tag"], item["idx"].numpy(), item["images"]) for item in loader)


def _bank_batch(plan: TrainPlan) -> int:
    """Spots per batch when embedding the reference bank (at least 256; methods with sets use theirs)."""
    return max(plan.batch_size, 256)


def _val_pearson(run: _Run, outputs: list[tuple[np.ndarray, np.ndarray]], top: int | None = None) -> float:
    """Mean Pearson r over genes of the expression predicted for the validation spots (``top``: of the ``top`` best).

    ``outputs`` holds ``(idx, out)`` of the validation batches: predicted expression (regression methods) or image
    embeddings (retrieval methods, then matched against a bank of the training spots' expression embeddings).
    """
    idx = np.concatenate([i for i, _ in outputs])
    out = np.concatenate([o for _, o in outputs])
    module, method_cls = run.trainer.module, run.method_cls
    if method_cls.prediction == "retrieval":
        tr = run.train_idx
        data = expression_data(
            run.expression[tr],
            coords=None if run.coords is None else run.coords[tr],
            groups=None if run.codes is None else run.codes[tr],
            method=module,
            device=run.device,
        )
        bank = run_batches(
            module,
            data,
            lambda b: module.embed_expression(b.expression, b),
            expression_batch_size(module, _bank_batch(run.plan)),
            images=False,
        )
        k, weighting, _ = retrieval_settings(method_cls.prediction_defaults, tr.size, None, None)
        out, _ = _bank.retrieve(
            out,
            bank,
            run.expression[tr],
            k=k,
            similarity=method_cls.similarity,
            weighting=weighting,
            device=run.device,
            progress=False,
        )
    return mean_pearson(out, run.expression[idx], top=top)


# ---- the training state and its checkpoints ------------------------------------------------------------------------

CHECKPOINT_DIR = "checkpoint"
"""The sub-folder of ``save_dir`` that :func:`sthist.tl.fit_contrastive` keeps its checkpoint in."""
CHECKPOINT_FILE = "checkpoint.json"
"""The checkpoint's JSON document; it names the safetensors file that holds the checkpoint's tensors."""
CHECKPOINT_FORMAT = "sthist-checkpoint"
CHECKPOINT_VERSION = 1


@dataclass
class Best:
    """Model selection within the current stage: the best validation score so far, its epoch and its weights.

    ``score`` is the validation loss, or minus the validation Pearson r (lower is better); ``bad_epochs`` counts
    the epochs since it last improved (early stopping).
    """

    score: float = math.inf
    epoch: int = -1
    weights: dict[str, dict[str, torch.Tensor]] | None = None
    bad_epochs: int = 0


def _new_history(plan: TrainPlan) -> dict[str, Any]:
    history: dict[str, Any] = {"train_loss": [], "val_loss": [], "train_components": {}, "stages": []}
    if plan.select_on.startswith("val_pearson"):
        history["val_pearson"] = []
    return history


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def _pick(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


@dataclass
class TrainingState:
    """Everything that training changes, with one owner: the loop advances it, checkpoints save and restore it.

    The torch objects (the method's module, the fine-tuned encoder, the current stage's optimiser) live in
    ``run.trainer`` and are reached through this state; the learning rate is the stage's schedule at
    ``stage_epoch`` (a :class:`~sthist._engine.plan.Schedule` holds no state of its own). The random number
    generators are those of Python, numpy and torch (CPU, and the process's GPU), the generator that shuffles the
    training batches (``run.rng``) and the one that draws the augmentations (``run.trainer.aug_gen``).
    :meth:`state_dict` / :meth:`load_state_dict` give and take all of it as ``(tensors, meta)``: a flat dict of CPU
    tensors (for safetensors) and a dict of JSON types.
    """

    run: _Run
    history: dict[str, Any]
    epoch: int = 0
    """Epochs done, over all stages."""
    stage: int = 0
    """Index of the current stage; ``len(run.stages)`` once training is done."""
    stage_epoch: int = 0
    """Epochs done in the current stage."""
    stopped_early: bool = False
    """Whether the current stage stopped early (it ends before its last epoch)."""
    best: Best = dataclasses.field(default_factory=Best)
    seconds: float = 0.0
    """Seconds spent by the processes that wrote the checkpoint this run resumed from."""
    resumed_from: int | None = None
    """The epoch this run resumed from (``None``: it started from scratch)."""
    started: float = dataclasses.field(default_factory=time.perf_counter)

    @property
    def trainer(self) -> _Trainer:
        return self.run.trainer

    @property
    def module(self) -> torch.nn.Module:
        return self.run.trainer.module

    @property
    def encoder(self) -> torch.nn.Module | None:
        """The encoder that trains (fine-tuning), else ``None``."""
        return self.run.trainer.encoder if self.run.trainer.finetune else None

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.run.trainer.optimizer

    @property
    def finished(self) -> bool:
        return self.stage >= len(self.run.stages)

    def lr(self) -> float:
        """The learning rate of the current epoch: the stage's schedule at ``stage_epoch``."""
        stage = self.run.stages[self.stage]
        return stage.schedule.lr_at(self.stage_epoch, lr=stage.optimizer.lr, epochs=stage.epochs)

    def snapshot(self) -> dict[str, dict[str, torch.Tensor]]:
        """CPU copies of the weights: ``{"method": ..., "encoder": ...}`` (the encoder when fine-tuning)."""
        state = {"method": _cpu(self.module.state_dict())}
        if self.encoder is not None:
            state["encoder"] = _cpu(self.encoder.state_dict())
        return state

    def restore_best(self) -> None:
        """Load the weights of the stage's best validation epoch (when there was one)."""
        if self.best.weights is not None:
            self.module.load_state_dict(self.best.weights["method"])
            if self.encoder is not None:
                self.encoder.load_state_dict(self.best.weights["encoder"])

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The whole state as ``(tensors, meta)``; see :func:`_write_checkpoint` for the names."""
        tensors = {f"model/{part}/{k}": v for part, sd in self.snapshot().items() for k, v in sd.items()}
        if self.best.weights is not None:
            tensors.update({f"best/{part}/{k}": v for part, sd in self.best.weights.items() for k, v in sd.items()})
        opt = self.optimizer.state_dict()
        opt_state: dict[str, dict[str, Any]] = {}
        for i, entry in opt["state"].items():
            opt_state[str(i)] = {}
            for k, v in entry.items():
                if torch.is_tensor(v):
                    tensors[f"optimizer/{i}/{k}"] = v.detach().to("cpu", copy=True)
                else:
                    opt_state[str(i)][k] = v
        rng_tensors, rng_meta = _rng_state(self.run)
        tensors.update(rng_tensors)
        best = self.best
        meta = {
            "position": {
                "epoch": self.epoch,
                "stage": self.stage,
                "stage_name": None if self.finished else self.run.stages[self.stage].name,
                "stage_epoch": self.stage_epoch,
                "stopped_early": self.stopped_early,
                "completed": self.finished,
            },
            "best": {
                "score": best.score if math.isfinite(best.score) else None,
                "epoch": best.epoch,
                "bad_epochs": best.bad_epochs,
                "weights": best.weights is not None,
            },
            "history": self.history,
            "optimizer": {
                "class": type(self.optimizer).__name__,
                "param_groups": opt["param_groups"],
                "state": opt_state,
            },
            "rng": rng_meta,
            "seconds": self.seconds + time.perf_counter() - self.started,
        }
        return {k: v.contiguous() for k, v in tensors.items()}, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`: weights, optimiser, position, model selection, history and generators.

        The run must be freshly prepared (:func:`_prepare`, in its first stage) with the same configuration.
        """
        run, pos, b = self.run, meta["position"], meta["best"]
        self.epoch, self.stage, self.stage_epoch = int(pos["epoch"]), int(pos["stage"]), int(pos["stage_epoch"])
        self.stopped_early = bool(pos["stopped_early"])
        self.history = meta["history"]
        weights = None
        if b["weights"]:
            weights = {"method": _pick(tensors, "best/method/")}
            if self.encoder is not None:
                weights["encoder"] = _pick(tensors, "best/encoder/")
        score = math.inf if b["score"] is None else float(b["score"])
        self.best = Best(score=score, epoch=int(b["epoch"]), weights=weights, bad_epochs=int(b["bad_epochs"]))
        self.module.load_state_dict(_pick(tensors, "model/method/"))
        if self.encoder is not None:
            self.encoder.load_state_dict(_pick(tensors, "model/encoder/"))
        if not self.finished:
            if self.stage:
                _enter_stage(run, run.stages[self.stage])  # its trainable parameters, loss terms and optimiser
            opt = meta["optimizer"]
            state = {int(i): {**scalars, **_pick(tensors, f"optimizer/{i}/")} for i, scalars in opt["state"].items()}
            groups = [
                {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
                for g in opt["param_groups"]
            ]
            self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        _set_rng_state(run, tensors, meta["rng"])
        self.seconds, self.resumed_from = float(meta["seconds"]), self.epoch
        self.started = time.perf_counter()


def _rng_state(run: _Run) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The states of every generator training draws from: tensors (torch's) and JSON (Python's and numpy's)."""
    tensors = {"rng/torch": torch.get_rng_state(), "rng/augment": run.trainer.aug_gen.get_state()}
    if run.device.type == "cuda":
        tensors["rng/cuda"] = torch.cuda.get_rng_state(run.device)
    elif run.device.type == "mps":
        tensors["rng/mps"] = torch.mps.get_rng_state()
    py = random.getstate()
    legacy = np.random.get_state()  # noqa: NPY002  (third-party code may draw from numpy's global generator)
    meta = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [legacy[0], legacy[1].tolist(), int(legacy[2]), int(legacy[3]), float(legacy[4])],
        "shuffle": run.rng.bit_generator.state,
    }
    return tensors, meta


def _set_rng_state(run: _Run, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    run.trainer.aug_gen.set_state(tensors["rng/augment"])
    if run.device.type == "cuda" and "rng/cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng/cuda"], run.device)
    elif run.device.type == "mps" and "rng/mps" in tensors:
        torch.mps.set_rng_state(tensors["rng/mps"])
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))  # noqa: NPY002
    run.rng.bit_generator.state = meta["shuffle"]


def _sha256(*arrays: Any) -> str | None:
    """SHA-256 of the bytes of arrays (``None`` when the first is ``None``)."""
    if arrays[0] is None:
        return None
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.view(np.uint8).reshape(-1).data if a.size else b"")
    return h.hexdigest()


def _fingerprint(run: _Run) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote the checkpoint (a JSON-ready dict)."""
    enc = run.enc_info
    genes = hashlib.sha256("\0".join(run.genes).encode()).hexdigest()
    fp = {
        "method": run.method_cls.name,
        "method_config": dict(vars(run.mcfg)),
        "mode": "finetune" if run.trainer.finetune else "frozen",
        "plan": run.plan.to_dict(),
        "encoder": {k: enc.get(k) for k in ("spec", "pretrained", "checkpoint_sha256", "weights_sha256", "out_dim")},
        "n_spots": int(run.expression.shape[0]),
        "n_genes": int(run.expression.shape[1]),
        "inputs": run.shapes,
        "genes_sha256": genes,
        "expression_sha256": _sha256(run.expression),
        "coords_sha256": _sha256(run.coords),
        "groups_sha256": _sha256(run.codes),
        "random_state": run.settings["random_state"],
    }
    return json.loads(json.dumps(jsonable(fp)))


def _differences(saved: Any, current: Any, path: str = "") -> list[str]:
    """The leaves in which two JSON documents differ, as ``"path: a in the checkpoint, b now"``."""

    def short(v: Any) -> str:
        text = json.dumps(v)
        return text if len(text) <= 60 else text[:57] + "..."

    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for k in sorted(set(saved) | set(current)):
            where = f"{path}.{k}" if path else str(k)
            if k not in saved:
                out.append(f"{where}: not in the checkpoint, {short(current[k])} now")
            elif k not in current:
                out.append(f"{where}: {short(saved[k])} in the checkpoint, not set now")
            else:
                out += _differences(saved[k], current[k], where)
        return out
    if isinstance(saved, list) and isinstance(current, list) and len(saved) == len(current):
        return [
            d for i, (a, b) in enumerate(zip(saved, current, strict=True)) for d in _differences(a, b, f"{path}[{i}]")
        ]
    if saved != current:
        return [f"{path}: {short(saved)} in the checkpoint, {short(current)} now"]
    return []


def _fsync(path: Path) -> None:
    """Flush a file (or a folder's entries) to disk; best effort where the platform cannot."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_checkpoint(directory: Path, tensors: dict[str, torch.Tensor], doc: dict[str, Any]) -> Path:
    """Write a checkpoint atomically: a reader finds the previous complete checkpoint or this one, never a mix.

    The tensors go to a new ``state-<epoch>-<id>.safetensors`` (written under a temporary name, flushed, renamed),
    then ``checkpoint.json``, which names that file with its size and SHA-256, replaces the previous document in one
    :func:`os.replace`; only then are older tensor files and left-over temporary files removed. Tensor names:
    ``model/method/*``, ``model/encoder/*`` (fine-tuning), ``best/method/*``, ``best/encoder/*`` (the stage's best
    validation weights), ``optimizer/<i>/<key>`` (the optimiser's per-parameter state), ``rng/torch``,
    ``rng/cuda`` or ``rng/mps`` (the process's device), ``rng/augment``.
    """
    from safetensors.torch import save_file

    from .encoders import file_sha256

    directory.mkdir(parents=True, exist_ok=True)
    name = f"state-{int(doc['position']['epoch']):05d}-{uuid.uuid4().hex[:8]}.safetensors"
    tmp = directory / f".{name}.tmp"
    save_file(tensors, str(tmp), metadata={"format": CHECKPOINT_FORMAT, "format_version": str(CHECKPOINT_VERSION)})
    _fsync(tmp)
    os.replace(tmp, directory / name)
    doc = {**doc, "tensors": {"file": name, "bytes": (directory / name).stat().st_size}}
    doc["tensors"]["sha256"] = file_sha256(directory / name)
    tmp_doc = directory / f".{CHECKPOINT_FILE}.tmp"
    with open(tmp_doc, "w") as fh:
        json.dump(doc, fh, indent=1, default=lambda v: v.item() if isinstance(v, np.generic) else str(v))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp_doc, directory / CHECKPOINT_FILE)
    _fsync(directory)
    for old in directory.iterdir():
        stale = old.name.startswith("state-") and old.name.endswith(".safetensors") and old.name != name
        if stale or (old.name.startswith(".") and old.name.endswith(".tmp")):
            old.unlink(missing_ok=True)
    return directory / CHECKPOINT_FILE


class _Checkpointer:
    """Writes the :class:`TrainingState` every ``every`` epochs into ``directory`` and reads it back.

    Under torchrun only rank 0 writes (every process holds the same state); every process reads.
    """

    def __init__(self, directory: str | os.PathLike, *, every: int | None, fingerprint: dict[str, Any], main: bool):
        self.directory = Path(directory)
        self.every, self.fingerprint, self.main = every, fingerprint, main

    def exists(self) -> bool:
        return (self.directory / CHECKPOINT_FILE).is_file()

    def after_epoch(self, state: TrainingState) -> None:
        """Write a checkpoint when ``state.epoch`` is a multiple of ``every`` (called by every process)."""
        if self.every is not None and state.epoch % self.every == 0:
            self.write(state)

    def write(self, state: TrainingState) -> None:
        if not self.main:
            return
        tensors, meta = state.state_dict()
        doc = {
            "format": CHECKPOINT_FORMAT,
            "format_version": CHECKPOINT_VERSION,
            "fingerprint": self.fingerprint,
            **meta,
            "settings": state.run.settings,
            "versions": _versions(),
        }
        _write_checkpoint(self.directory, tensors, doc)

    def read(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """The checkpoint's ``(tensors, meta)``; ``None`` when there is none. Another run's checkpoint raises."""
        from safetensors.torch import load_file

        from .encoders import file_sha256

        path = self.directory / CHECKPOINT_FILE
        if not path.is_file():
            return None
        where = f"the checkpoint in {str(self.directory)!r}"
        fix = "delete the folder, or pass resume=False to train from the start (the checkpoint is then replaced)"
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ModelFileError(f"{where}: {CHECKPOINT_FILE} is not readable JSON ({err}); {fix}.") from err
        if not isinstance(doc, dict) or doc.get("format") != CHECKPOINT_FORMAT:
            raise ModelFileError(f"{where}: {CHECKPOINT_FILE} is not an sthist checkpoint; {fix}.")
        if int(doc.get("format_version", 0)) > CHECKPOINT_VERSION:
            raise ModelFileError(
                f"{where} has format version {doc.get('format_version')}, newer than this sthist reads "
                f"({CHECKPOINT_VERSION}); update sthist, or {fix}."
            )
        diff = _differences(doc.get("fingerprint"), self.fingerprint)
        if diff:
            more = f"; and {len(diff) - 6} more" if len(diff) > 6 else ""
            raise ValueError(
                f"cannot resume from {where}: it was written by a run with another configuration ("
                f"{'; '.join(diff[:6])}{more}). Resume with the arguments of that run, pass resume=False to train "
                "from the start (the checkpoint is then replaced), or use another save_dir."
            )
        info = doc.get("tensors") or {}
        file = self.directory / str(info.get("file", ""))
        if not info.get("file") or not file.is_file():
            raise ModelFileError(f"{where}: the tensor file {info.get('file')!r} it names is missing; {fix}.")
        if file.stat().st_size != info.get("bytes") or file_sha256(file) != info.get("sha256"):
            raise ModelFileError(f"{where}: {info['file']} does not match its recorded size and SHA-256; {fix}.")
        return load_file(str(file), device="cpu"), doc


def check_checkpointing(
    folder: Any, checkpoint_every: Any, resume: Any, *, fn: str = "fit", folder_arg: str = "checkpoint_dir"
) -> int | None:
    """Check the checkpoint arguments before any work; returns ``checkpoint_every`` as an int (or ``None``).

    ``folder`` is the value of the caller's argument ``folder_arg`` (the engine's ``checkpoint_dir``,
    :func:`sthist.tl.fit_contrastive`'s ``save_dir``); ``fn`` names the caller in the messages.
    """
    if checkpoint_every is not None:
        if (
            isinstance(checkpoint_every, bool)
            or not isinstance(checkpoint_every, int | np.integer)
            or checkpoint_every < 1
        ):
            raise ValueError(
                f"{fn}: checkpoint_every must be a positive integer (epochs between checkpoints) or None, got "
                f"{checkpoint_every!r}."
            )
        if folder is None:
            raise ValueError(
                f"{fn}: checkpoint_every={checkpoint_every} writes checkpoints into a folder; pass {folder_arg}= (e.g. "
                f"{folder_arg}='bleep_model'), or drop checkpoint_every."
            )
        checkpoint_every = int(checkpoint_every)
    if not isinstance(resume, bool | np.bool_):
        raise TypeError(f"{fn}: resume must be True or False, got {resume!r}.")
    if resume and folder is None:
        raise ValueError(
            f"{fn}: resume=True continues from the checkpoint an interrupted run wrote; pass the {folder_arg}= of the "
            "interrupted call."
        )
    return checkpoint_every


def _start_or_resume(state: TrainingState, checkpointer: _Checkpointer, resume: bool) -> None:
    """Load the checkpoint into ``state`` (``resume=True``), or say that a checkpoint there will be replaced."""
    from .._logging import info

    where = str(checkpointer.directory)
    if resume:
        saved = checkpointer.read()
        if saved is None:
            info(f"    resume=True, but {where!r} holds no checkpoint yet: training from the start")
            return
        state.load_state_dict(*saved)
        if state.finished:
            info(f"    the checkpoint in {where!r} is of a finished run ({state.epoch} epochs): nothing left to train")
        else:
            info(f"    resuming from the checkpoint of epoch {state.epoch} in {where!r}")
    elif checkpointer.every is not None and checkpointer.exists():
        info(f"    resume=False: the checkpoint in {where!r} is replaced by this run's")


# ---- the loop -------------------------------------------------------------------------------------------------------


def _run_epoch(run: _Run, state: TrainingState, epoch_items, bar) -> None:
    """One epoch of the current stage: train, validate, keep the best weights, decide on early stopping."""
    trainer, method_cls, dev = run.trainer, run.method_cls, run.device
    module, ctx, history, best = trainer.module, trainer.ctx, state.history, state.best
    by_pearson = run.plan.select_on.startswith("val_pearson")
    lr = state.lr()
    for group in trainer.optimizer.param_groups:
        group["lr"] = lr
    trainer.train(True)
    total, count, parts = 0.0, 0, {}
    val_total, val_count, outputs = 0.0, 0, []
    for tag, idx, imgs in epoch_items():
        if tag == "train":
            loss, logs = trainer.step(idx, imgs, epoch=state.epoch)
            total += float(loss.detach()) * idx.size
            count += idx.size
            for name, value in logs.items():
                parts[name] = parts.get(name, 0.0) + float(value) * idx.size
            continue
        if trainer.module.training:
            trainer.train(False)
        with torch.no_grad():
            batch = trainer.batch(idx, imgs, train=False)
            loss, _ = trainer.loss(idx, train=False, batch=batch)
            if by_pearson:
                with autocast(dev):
                    out = (
                        module.predict(batch.img_feats, batch)
                        if method_cls.prediction == "regression"
                        else module.embed_image(batch.img_feats, batch)
                    )
                outputs.append((idx, out.float().cpu().numpy()))
        val_total += float(loss) * idx.size
        val_count += idx.size
    train_loss = total / max(count, 1)
    history["train_loss"].append(train_loss)
    for name, value in parts.items():
        history["train_components"].setdefault(name, []).append(value / max(count, 1))
    if not run.val_idx.size:
        best.epoch = state.epoch
        state.epoch += 1
        state.stage_epoch += 1
        bar.set_postfix(train=f"{train_loss:.4f}")
        return
    # rank 0's values everywhere, so that all processes take the same early-stopping decisions
    val_loss = distributed.broadcast_float(val_total / max(val_count, 1), ctx, dev)
    history["val_loss"].append(val_loss)
    score = val_loss
    if by_pearson:
        if trainer.module.training:
            trainer.train(False)
        with torch.no_grad():
            top = 50 if run.plan.select_on == "val_pearson_top50" else None
            r = distributed.broadcast_float(_val_pearson(run, outputs, top=top), ctx, dev)
        history["val_pearson"].append(r)
        score = -r
    if score < best.score:
        state.best = best = Best(score=score, epoch=state.epoch, weights=state.snapshot(), bad_epochs=0)
    else:
        best.bad_epochs += 1
    bar.set_postfix(train=f"{train_loss:.4f}", val=f"{val_loss:.4f}", best=best.epoch + 1)
    state.epoch += 1
    state.stage_epoch += 1
    patience = run.plan.early_stopping_patience
    if patience is not None and best.bad_epochs >= patience:
        state.stopped_early = True


def _finish_stage(run: _Run, state: TrainingState) -> None:
    """End the current stage: restore its best weights, record it, and enter the next stage (if any)."""
    stage = run.stages[state.stage]
    state.restore_best()
    state.history["stages"].append(
        {
            "name": stage.name,
            "epochs": state.stage_epoch,
            "best_epoch": int(state.best.epoch),
            "stopped_early": state.stopped_early,
        }
    )
    state.stage, state.stage_epoch, state.stopped_early, state.best = state.stage + 1, 0, False, Best()
    if not state.finished:
        _enter_stage(run, run.stages[state.stage])


def _train(run: _Run, state: TrainingState, checkpointer: _Checkpointer | None) -> None:
    """Run the stages from where ``state`` stands to the end, writing checkpoints after epochs."""
    trainer, method_cls = run.trainer, run.method_cls
    show = run.progress and trainer.ctx.is_main
    epoch_items, items_batch = None, None
    while not state.finished:
        stage = run.stages[state.stage]
        stage_batch = stage.batch_size or run.plan.batch_size
        if stage_batch != items_batch:
            epoch_items, items_batch = None, None  # ends the previous loader's worker processes
            epoch_items, items_batch = _loader(run, stage_batch), stage_batch
        label = method_cls.name if len(run.stages) == 1 else f"{method_cls.name}: {stage.name}"
        bar = progress_bar(
            total=stage.epochs, initial=state.stage_epoch, enabled=show, desc=f"fitting {label}", leave=False
        )
        with bar:
            while state.stage_epoch < stage.epochs and not state.stopped_early:
                _run_epoch(run, state, epoch_items, bar)
                bar.update(1)
                if checkpointer is not None:
                    checkpointer.after_epoch(state)
        _finish_stage(run, state)
    del epoch_items  # ends the loader's worker processes


def _finish(run: _Run, state: TrainingState) -> ContrastiveModel:
    """The fitted model: parameters trainable as the method made them, eval mode, the reference bank built."""
    trainer, method_cls, dev, plan, history = run.trainer, run.method_cls, run.device, run.plan, state.history
    module, enc, finetune = trainer.module, trainer.encoder, trainer.finetune
    for p in [*module.parameters(), *(enc.parameters() if finetune else [])]:
        p.requires_grad_(run.own_trainable[id(p)])
    trainer.train(False)
    g = run.expression.shape[1]
    inputs = run.inputs
    if finetune:
        inputs = dataclasses.replace(inputs, weights_sha256=state_sha256(enc))
    net = _Net(module, trainer.scaler, enc if finetune else None, trainer.token_scaler)
    config: dict[str, Any] = {
        "method": method_cls.name,
        "method_config": dict(vars(run.mcfg)),
        "prediction": method_cls.prediction,
        "needs_neighbors": bool(method_cls.needs_neighbors),
        "needs_coords": bool(method_cls.needs_coords),
        "prediction_defaults": dict(method_cls.prediction_defaults),
        "similarity": method_cls.similarity,
        "mode": "finetune" if finetune else "frozen",
        "image_dim": run.image_dim,
        "token_dim": int(module.token_dim) if module.token_grid else None,
        "n_genes": int(g),
        "inputs": inputs.to_dict(),
        "encoder": run.enc_info,
        "plan": plan.to_dict(),
        "training": run.settings,
        "versions": _versions(),
    }
    last = history["stages"][-1]
    history.update(
        {
            "best_epoch": int(last["best_epoch"]),
            "stopped_early": bool(last["stopped_early"]),
            "n_train": int(run.train_idx.size),
            "n_val": int(run.val_idx.size),
            "device": str(dev),
            "resumed_from_epoch": state.resumed_from,
        }
    )
    model = ContrastiveModel(
        net=net,
        config=config,
        genes=run.genes,
        history=history,
        bank_embeddings=np.zeros((0, 1), dtype=np.float32),
        bank_expression=np.zeros((0, g), dtype=np.float32),
        encoder=run.frozen_encoder,
    )
    # the reference bank: expression embeddings of all training spots (training and validation split)
    model.build_bank(run.expression, coords=run.coords, groups=run.groups, batch_size=_bank_batch(plan), device=dev)
    config["embedding_dim"] = int(model.bank_embeddings.shape[1])
    history["seconds"] = float(state.seconds + time.perf_counter() - state.started)
    return model


def fit(
    *,
    method: str = "bleep",
    expression: np.ndarray,
    genes: list[str],
    images: Any = None,
    features: np.ndarray | None = None,
    tokens: np.ndarray | None = None,
    coords: np.ndarray | None = None,
    groups: np.ndarray | None = None,
    encoder: str = DEFAULT_ENCODER,
    pretrained: bool = False,
    checkpoint: str | None = None,
    encoder_info: dict[str, Any] | None = None,
    finetune: bool = False,
    plan: TrainPlan | None = None,
    max_epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    weight_decay: float | None = None,
    optimizer: str | Optim | None = None,
    schedule: str | Schedule | None = None,
    validation_fraction: float | None = None,
    early_stopping_patience: int | Literal["off"] | None = None,
    select_on: Literal["val_loss", "val_pearson", "val_pearson_top50"] | None = None,
    augment: bool | None = None,
    patch_size: int | None = None,
    mpp: float | None = None,
    device: str | None = None,
    random_state: int = 0,
    progress: bool = True,
    method_kwargs: dict[str, Any] | None = None,
    num_workers: int | None = None,
    compile: bool = False,
    targets: dict[str, Any] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
) -> ContrastiveModel:
    """Train a contrastive image-expression model.

    Parameters
    ----------
    method
        Registered method name (``sthist._engine.methods.METHODS``), e.g. ``"bleep"``.
    expression
        (n, g) non-negative expression targets (e.g. log1p-normalised counts).
    genes
        The g gene names.
    images
        uint8 patches (n, S, S, 3): a numpy array, or a dask / zarr array (e.g. from
        ``sthist.pp.extract_patches(..., store=...)``) that is read batch by batch, never whole. With
        ``finetune=False`` they are encoded once by ``encoder`` (frozen mode).
    features
        (n, d) cached encoder embeddings (frozen mode); ``encoder`` should name the encoder that produced them so
        that predictions from patches can recompute them.
    tokens
        (n, T, D) cached encoder tokens (``grid x grid`` rasters, :func:`~sthist._engine.encoders.encode_tokens`)
        for methods that consume ``"tokens"``; computed from ``images`` when not given.
    coords, groups
        Spot coordinates (n, 2) and section labels (n,), for methods that use neighbours or set-level batches.
    encoder, pretrained, checkpoint
        Image encoder spec, see :func:`sthist._engine.encoders.build_image_encoder`.
    encoder_info
        With ``features``: what is known of the encoder that made them (``weights_sha256``, ``patch_size``,
        ``mpp``, as ``sthist.pp.embed_patches`` records them); recorded in the model's inputs.
    finetune
        Train the encoder end to end (needs ``images`` and a timm encoder).
    plan
        A :class:`~sthist._engine.plan.TrainPlan`; ``None`` takes the method's published ``recipe``.
    max_epochs, batch_size, lr, weight_decay, optimizer, schedule, validation_fraction, early_stopping_patience, select_on, augment
        Overrides of the plan (``None``: the plan's value), see :func:`~sthist._engine.plan.resolve_plan`. A recipe's
        batch larger than the training spots is reduced to fit; a ``batch_size`` given here is not.
    patch_size, mpp
        The patch geometry, recorded in the model's inputs (``patch_size`` is read from ``images`` when given).
    device
        ``None`` picks cuda, then mps, then cpu; bf16 autocast on CUDA. Under torchrun every process takes the GPU
        ``LOCAL_RANK``.
    random_state
        Seed of python, numpy and torch; the same seed gives the same model on the same device (and the same model
        from one or several processes).
    progress
        Show progress bars (on rank 0 only under torchrun).
    method_kwargs
        Options of the method's ``Config`` (e.g. ``{"projection_dim": 128}`` for BLEEP).
    num_workers
        Fine-tuning: background processes of the DataLoader that read (and, for zarr, decompress) the patches of
        the next batches while the GPU trains. ``None``: 0 off CUDA, else ``min(8, CPUs per GPU process - 1)``.
    compile
        Fine-tuning: wrap the image encoder in :func:`torch.compile`.
    targets
        The record of the expression's scale (``{'layer': ..., 'scale': ...}``), kept in the model's inputs.
    checkpoint_dir
        Folder of the checkpoint (:class:`TrainingState`: weights, optimiser, position, best-so-far, history and
        random number generators; see :func:`_write_checkpoint`). Needed by ``checkpoint_every`` and ``resume``.
    checkpoint_every
        Write a checkpoint after every ``checkpoint_every`` epochs (counted over all stages) and when training ends,
        atomically, replacing the previous one; only rank 0 writes under torchrun. ``None``: no checkpoints.
    resume
        Continue from the checkpoint in ``checkpoint_dir``; the result equals that of an uninterrupted run (bitwise
        on a CPU). A checkpoint of another configuration (method, plan, data, genes, seed) raises, naming what
        differs; without a checkpoint there, training starts from scratch (logged).

    Returns
    -------
    A :class:`~sthist._engine.model.ContrastiveModel` whose reference bank holds all n spots; its ``config`` holds
    the resolved ``plan``, its ``inputs`` what it was fitted on, its ``history`` the losses per epoch and stage.
    """
    from .._logging import info

    start_time = time.perf_counter()
    checkpoint_every = check_checkpointing(checkpoint_dir, checkpoint_every, resume)

    run = _prepare(
        method=method,
        expression=expression,
        genes=genes,
        images=images,
        features=features,
        tokens=tokens,
        coords=coords,
        groups=groups,
        encoder=encoder,
        pretrained=pretrained,
        checkpoint=checkpoint,
        encoder_info=encoder_info,
        finetune=finetune,
        plan=plan,
        max_epochs=max_epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        optimizer=optimizer,
        schedule=schedule,
        validation_fraction=validation_fraction,
        early_stopping_patience=early_stopping_patience,
        select_on=select_on,
        augment=augment,
        patch_size=patch_size,
        mpp=mpp,
        device=device,
        random_state=random_state,
        progress=progress,
        method_kwargs=method_kwargs,
        num_workers=num_workers,
        compile=compile,
        targets=targets,
    )
    for note in run.notes:
        info(f"    {note}")
    state = TrainingState(run=run, history=_new_history(run.plan), started=start_time)
    checkpointer = None
    if checkpoint_dir is not None and (checkpoint_every is not None or resume):
        checkpointer = _Checkpointer(
            checkpoint_dir, every=checkpoint_every, fingerprint=_fingerprint(run), main=run.trainer.ctx.is_main
        )
        _start_or_resume(state, checkpointer, bool(resume))
    _train(run, state, checkpointer)
    if checkpointer is not None and checkpoint_every is not None:
        checkpointer.write(state)  # the finished state: resume=True after a finished run trains nothing
    return _finish(run, state)
