"""The training loop shared by all contrastive methods.

Two modes:

frozen (``features=`` given, or ``images=`` with ``finetune=False``)
    Image features are computed once (or come cached from ``sthist.pp.embed_patches``), standardised with the
    training mean / std, and only the method's heads train. Fast: ~1000 spots train in seconds on a CPU.
fine-tuning (``images=`` with ``finetune=True``)
    The timm image encoder trains end to end with the heads, with augmentation (flips, rotations by multiples of
    90 degrees, mild colour jitter), as in BLEEP. Use a GPU.

Defaults (:data:`DEFAULTS`): at most 100 epochs, batch size 256, AdamW with lr 1e-3 and weight decay 1e-3 (BLEEP's
``config.py`` / ``BLEEP_main.py``), 10 % of the spots for validation, early stopping after 10 epochs without a
lower validation loss, and the weights of the best validation epoch restored (BLEEP keeps its best validation
checkpoint too). Training batches drop the incomplete last batch (``drop_last=True`` as BLEEP). BLEEP's own script
runs 4 epochs by default on large GPU batches of fine-tuned ResNet-50 features; frozen heads on small data need more
epochs, which early stopping bounds.

Speed (fine-tuning): a :class:`torch.utils.data.DataLoader` reads the uint8 patches of every batch (``num_workers``
background processes; numpy, dask or zarr arrays, read by rows so that lazy stores are never loaded whole), with
pinned memory and asynchronous copies on CUDA; augmentation runs on the device after the copy. On CUDA the encoder
runs under bf16 autocast, in ``channels_last`` memory format when it has convolutions, and optionally compiled
(``compile=True``). Frozen mode keeps all features on the device and needs none of this.

Several GPUs or machines: launched with ``torchrun``, :func:`fit` trains data-parallel with the contrastive negatives
of the whole global batch, see :mod:`sthist._engine.distributed`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import distributed
from ._utils import autocast, check_float, check_int, progress_bar, resolve_device, seed_everything
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
    draw_augmentation,
    group_codes,
    iter_batches,
    read_rows,
    spatial_neighbors,
)
from .encoders import DEFAULT_ENCODER, build_image_encoder, check_patches, encode_patches, images_to_tensor
from .methods import get_method
from .model import ContrastiveModel, _Net

DEFAULTS: dict[str, Any] = {
    "max_epochs": 100,
    "batch_size": 256,
    "lr": 1e-3,
    "weight_decay": 1e-3,
    "validation_fraction": 0.1,
    "early_stopping_patience": 10,
}
"""Default training settings of :func:`fit` (documented in the module docstring)."""


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
    ):
        self.module, self.data, self.scaler, self.encoder = module, data, scaler, encoder
        self.optimizer, self.augment, self.aug_gen = optimizer, augment, aug_gen
        self.device, self.ctx, self.channels_last = device, ctx, channels_last
        self.n_neighbors = module.n_neighbors
        self.finetune = encoder is not None
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

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(self.device):
            if self._compiled and not self._compile_checked:
                try:
                    out = self.encoder_forward(x)
                except Exception as err:
                    raise RuntimeError(
                        f"torch.compile of the image encoder failed ({type(err).__name__}: {err}); train with "
                        "compile=False."
                    ) from err
                self._compile_checked = True
                return out
            return self.encoder_forward(x)

    def image_features(self, idx: np.ndarray, images=None, *, train: bool) -> torch.Tensor:
        """Encoder features (float32) of all image rows of the batch ``idx`` (see :func:`batch_image_rows`)."""
        rows, _ = batch_image_rows(idx, self.data.neighbors, self.n_neighbors)
        n = rows.size
        pos = self.shard(n)
        if images is None:
            images = read_rows(self.data.images, rows[pos])
        x = images_to_tensor(images, self.device, non_blocking=True)
        if train and self.augment:
            # drawn for all rows of the global batch (the same on every process), applied to the local shard
            params = draw_augmentation(n, self.aug_gen, square=x.shape[-1] == x.shape[-2])
            if self.ctx.active:
                t_pos = torch.as_tensor(pos)
                params = {k: v[t_pos] for k, v in params.items()}
            x = apply_augmentation(x, params)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        f = self._encode(x).float()
        return distributed.gather_rows(f, n, self.ctx) if self.ctx.active else f

    def batch(self, idx: np.ndarray, images=None, *, train: bool):
        """The :class:`~sthist._engine.methods.Batch` of the spots ``idx`` (with neighbours when the method uses them)."""
        if not self.finetune:
            return self.data.make_batch(idx, scaler=self.scaler, n_neighbors=self.n_neighbors)
        feats = self.image_features(idx, images, train=train)
        return self.data.make_batch(idx, n_neighbors=self.n_neighbors, row_features=feats)

    def loss(self, idx: np.ndarray, images=None, *, train: bool = True):
        """The method's loss and logged components on the batch ``idx``."""
        batch = self.batch(idx, images, train=train)
        with autocast(self.device):
            return self.module.loss(batch)

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
    frozen_encoder: Any
    device: torch.device
    num_workers: int
    settings: dict[str, Any]


def _prepare(
    *,
    method: str,
    expression: np.ndarray,
    genes: list[str],
    images: Any,
    features: np.ndarray | None,
    coords: np.ndarray | None,
    groups: np.ndarray | None,
    encoder: str,
    pretrained: bool,
    checkpoint: str | None,
    finetune: bool,
    max_epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    validation_fraction: float,
    early_stopping_patience: int | None,
    augment: bool,
    device: str | None,
    random_state: int,
    progress: bool,
    method_kwargs: dict[str, Any] | None,
    num_workers: int | None,
    compile: bool,
) -> _Run:
    method_cls = get_method(method)
    mcfg = method_cls.make_config(method_kwargs)
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
    max_epochs = check_int("max_epochs", max_epochs)
    batch_size = check_int("batch_size", batch_size, minimum=2)
    lr = check_float("lr", lr, minimum=0.0, strict=True)
    weight_decay = check_float("weight_decay", weight_decay, minimum=0.0)
    validation_fraction = check_float("validation_fraction", validation_fraction, minimum=0.0, below=1.0)
    if early_stopping_patience is not None:
        early_stopping_patience = check_int("early_stopping_patience", early_stopping_patience)
    if not isinstance(random_state, int | np.integer) or isinstance(random_state, bool):
        raise TypeError(f"random_state must be an integer, got {random_state!r}.")
    random_state = int(random_state)
    ctx = distributed.detect()
    dev = distributed.process_device(resolve_device(device), ctx)

    # ---- split ---------------------------------------------------------------------------------------------------
    rng = np.random.default_rng(random_state)
    n_val = round(n * validation_fraction) if validation_fraction > 0 else 0
    if validation_fraction > 0 and n_val < 2:
        raise ValueError(
            f"validation_fraction={validation_fraction} of {n} spots leaves {n_val} validation spots; the contrastive "
            "loss needs at least 2. Raise validation_fraction or set it to 0 (no early stopping)."
        )
    perm = rng.permutation(n)
    val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    if not method_cls.batch_by_group and train_idx.size < batch_size:
        raise ValueError(
            f"batch_size={batch_size} is larger than the {train_idx.size} training spots ({n} spots minus {n_val} "
            f"for validation); the maximum batch size here is {train_idx.size}. Lower batch_size or use more spots."
        )

    # ---- encoder and features ------------------------------------------------------------------------------------
    seed_everything(random_state)
    enc, frozen_encoder = None, None
    if finetune:
        enc = build_image_encoder(encoder, pretrained=pretrained, checkpoint=checkpoint)
        if enc.weight_free:
            raise ValueError(
                f"encoder={encoder!r} is weight-free and has nothing to fine-tune; use finetune=False, or a timm model "
                "such as encoder='resnet18'."
            )
        enc_info = {**enc.describe(), "finetuned": True}
        image_dim = enc.out_dim
        enc.to(dev)
    else:
        if images is not None:
            frozen_encoder = build_image_encoder(encoder, pretrained=pretrained, checkpoint=checkpoint)
            features = encode_patches(frozen_encoder, images, device=dev, progress=progress and ctx.is_main)
            enc_info = {**frozen_encoder.describe(), "finetuned": False}
        else:
            enc_info = {
                "spec": encoder,
                "pretrained": bool(pretrained),
                "checkpoint": None if checkpoint is None else str(checkpoint),
                "checkpoint_sha256": None,
                "out_dim": int(features.shape[1]),
                "finetuned": False,
            }
            if checkpoint is not None:
                from pathlib import Path

                from .encoders import file_sha256

                p = Path(checkpoint)
                enc_info["checkpoint_sha256"] = file_sha256(p) if p.is_file() else None
                enc_info["checkpoint"] = str(p.resolve()) if p.is_file() else str(checkpoint)
        image_dim = features.shape[1]
    scaler = None if finetune else FeatureScaler(image_dim).fit(features[train_idx]).to(dev)

    module = method_cls(image_dim, g, mcfg).to(dev)
    k_nb = module.n_neighbors
    neighbors = spatial_neighbors(coords, codes, k_nb) if k_nb else None
    data = SpotData(
        features=None if finetune else features,
        images=images if finetune else None,
        expression=expression,
        coords=coords,
        groups=codes,
        neighbors=neighbors,
        device=dev,
    )
    channels_last = bool(finetune and dev.type == "cuda" and _has_conv(enc))
    if channels_last:
        enc.to(memory_format=torch.channels_last)
    if finetune:
        # data-parallel training over processes (torchrun); a no-op in one process
        distributed.init(dev, ctx)
    params = [p for p in module.parameters() if p.requires_grad]
    if finetune:
        params += [p for p in enc.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    trainer = _Trainer(
        module=module,
        data=data,
        scaler=scaler,
        encoder=enc,
        optimizer=optimizer,
        augment=bool(finetune and augment),
        aug_gen=torch.Generator().manual_seed(random_state),
        device=dev,
        ctx=ctx if finetune else distributed.Context(rank=ctx.rank),
        channels_last=channels_last,
        compile=bool(finetune and compile),
    )
    workers = (num_workers if num_workers is not None else _auto_workers(dev, ctx)) if finetune else 0
    settings = {
        "max_epochs": max_epochs,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "validation_fraction": validation_fraction,
        "early_stopping_patience": early_stopping_patience,
        "augment": bool(augment),
        "random_state": random_state,
        "device": str(dev),
        "num_workers": int(workers),
        "compile": bool(compile),
        "channels_last": channels_last,
        "world_size": int(ctx.world_size if finetune else 1),
    }
    return _Run(
        trainer=trainer,
        method_cls=method_cls,
        mcfg=mcfg,
        train_idx=train_idx,
        val_idx=val_idx,
        rng=rng,
        codes=codes,
        coords=coords,
        groups=groups,
        expression=expression,
        genes=genes,
        image_dim=int(image_dim),
        enc_info=enc_info,
        frozen_encoder=frozen_encoder,
        device=dev,
        num_workers=int(workers),
        settings=settings,
    )


def _epoch_batches(run: _Run, batch_size: int):
    """A function giving the ``(tag, idx)`` items of one epoch: shuffled training batches, then validation batches."""
    by_group = run.method_cls.batch_by_group

    def items():
        for idx in iter_batches(
            run.train_idx, batch_size, rng=run.rng, drop_last=not by_group, groups=run.codes, by_group=by_group
        ):
            if idx.size >= 2:
                yield "train", idx
        for idx in iter_batches(run.val_idx, batch_size, groups=run.codes, by_group=by_group):
            if idx.size >= 2:
                yield "val", idx

    return items


def _loader(run: _Run, batch_size: int):
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


def fit(
    *,
    method: str = "bleep",
    expression: np.ndarray,
    genes: list[str],
    images: Any = None,
    features: np.ndarray | None = None,
    coords: np.ndarray | None = None,
    groups: np.ndarray | None = None,
    encoder: str = DEFAULT_ENCODER,
    pretrained: bool = False,
    checkpoint: str | None = None,
    finetune: bool = False,
    max_epochs: int = DEFAULTS["max_epochs"],
    batch_size: int = DEFAULTS["batch_size"],
    lr: float = DEFAULTS["lr"],
    weight_decay: float = DEFAULTS["weight_decay"],
    validation_fraction: float = DEFAULTS["validation_fraction"],
    early_stopping_patience: int | None = DEFAULTS["early_stopping_patience"],
    augment: bool = True,
    device: str | None = None,
    random_state: int = 0,
    progress: bool = True,
    method_kwargs: dict[str, Any] | None = None,
    num_workers: int | None = None,
    compile: bool = False,
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
    coords, groups
        Spot coordinates (n, 2) and section labels (n,), for methods that use neighbours or set-level batches.
    encoder, pretrained, checkpoint
        Image encoder spec, see :func:`sthist._engine.encoders.build_image_encoder`.
    finetune
        Train the encoder end to end (needs ``images`` and a timm encoder).
    max_epochs, batch_size, lr, weight_decay
        Optimisation (AdamW). ``batch_size`` must not exceed the number of training spots; under torchrun it is the
        global batch over all processes.
    validation_fraction
        Fraction of spots held out for validation / early stopping (0 disables both; the last epoch is kept).
    early_stopping_patience
        Stop after this many epochs without a lower validation loss; ``None`` runs all epochs. The weights of the
        best validation epoch are restored either way.
    augment
        Augment patches in fine-tuning mode (flips, 90 degree rotations, colour jitter); unused in frozen mode.
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
        the next batches while the GPU trains. ``None``: 0 off CUDA (reading in the training process, usually
        fastest on a CPU), else ``min(8, CPUs per GPU process - 1)``. Unused in frozen mode.
    compile
        Fine-tuning: wrap the image encoder in :func:`torch.compile` (the first steps are slow while it compiles;
        pays off on long GPU runs). Unused in frozen mode.

    Returns
    -------
    A :class:`~sthist._engine.model.ContrastiveModel` whose reference bank holds all n spots.
    """
    start_time = time.perf_counter()
    run = _prepare(
        method=method,
        expression=expression,
        genes=genes,
        images=images,
        features=features,
        coords=coords,
        groups=groups,
        encoder=encoder,
        pretrained=pretrained,
        checkpoint=checkpoint,
        finetune=finetune,
        max_epochs=max_epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        validation_fraction=validation_fraction,
        early_stopping_patience=early_stopping_patience,
        augment=augment,
        device=device,
        random_state=random_state,
        progress=progress,
        method_kwargs=method_kwargs,
        num_workers=num_workers,
        compile=compile,
    )
    trainer, method_cls, dev = run.trainer, run.method_cls, run.device
    settings = run.settings
    max_epochs, batch_size = settings["max_epochs"], settings["batch_size"]
    early_stopping_patience = settings["early_stopping_patience"]
    module, enc, ctx = trainer.module, trainer.encoder, trainer.ctx
    n_val = int(run.val_idx.size)
    g = run.expression.shape[1]

    def snapshot():
        state = {"method": {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}}
        if finetune:
            state["encoder"] = {k: v.detach().to("cpu", copy=True) for k, v in enc.state_dict().items()}
        return state

    # ---- loop ----------------------------------------------------------------------------------------------------
    history: dict[str, Any] = {"train_loss": [], "val_loss": [], "train_components": {}}
    best_val, best_epoch, best_state, bad_epochs, stopped_early = float("inf"), -1, None, 0, False
    epoch_items = _loader(run, batch_size)
    show = bool(progress) and ctx.is_main
    bar = progress_bar(range(max_epochs), enabled=show, desc=f"fitting {method}", leave=False)
    for epoch in bar:
        trainer.train(True)
        total, count, parts = 0.0, 0, {}
        val_total, val_count = 0.0, 0
        for tag, idx, imgs in epoch_items():
            if tag == "train":
                loss, logs = trainer.step(idx, imgs, epoch=epoch)
                total += float(loss.detach()) * idx.size
                count += idx.size
                for name, value in logs.items():
                    parts[name] = parts.get(name, 0.0) + float(value) * idx.size
                continue
            if trainer.module.training:
                trainer.train(False)
            with torch.no_grad():
                loss, _ = trainer.loss(idx, imgs, train=False)
            val_total += float(loss) * idx.size
            val_count += idx.size
        train_loss = total / max(count, 1)
        history["train_loss"].append(train_loss)
        for name, value in parts.items():
            history["train_components"].setdefault(name, []).append(value / max(count, 1))
        if n_val:
            # rank 0's value everywhere, so that all processes take the same early-stopping decisions
            val_loss = distributed.broadcast_float(val_total / max(val_count, 1), ctx, dev)
            history["val_loss"].append(val_loss)
            if val_loss < best_val:
                best_val, best_epoch, best_state, bad_epochs = val_loss, epoch, snapshot(), 0
            else:
                bad_epochs += 1
            bar.set_postfix(train=f"{train_loss:.4f}", val=f"{val_loss:.4f}", best=best_epoch + 1)
            if early_stopping_patience is not None and bad_epochs >= early_stopping_patience:
                stopped_early = True
                break
        else:
            best_epoch = epoch
            bar.set_postfix(train=f"{train_loss:.4f}")
    del epoch_items  # ends the loader's worker processes
    if best_state is not None:
        module.load_state_dict(best_state["method"])
        if finetune:
            enc.load_state_dict(best_state["encoder"])
    trainer.train(False)

    net = _Net(module, trainer.scaler, enc if finetune else None)
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
        "n_genes": int(g),
        "encoder": run.enc_info,
        "training": settings,
        "versions": _versions(),
    }
    history.update(
        {
            "best_epoch": int(best_epoch),
            "stopped_early": stopped_early,
            "n_train": int(run.train_idx.size),
            "n_val": n_val,
            "device": str(dev),
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
    model.build_bank(run.expression, coords=run.coords, groups=run.groups, batch_size=max(batch_size, 256), device=dev)
    config["embedding_dim"] = int(model.bank_embeddings.shape[1])
    history["seconds"] = float(time.perf_counter() - start_time)
    return model
