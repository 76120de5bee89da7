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
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import bank as _bank
from . import distributed
from ._utils import autocast, check_int, mean_pearson, progress_bar, resolve_device, seed_everything
from .base import ModelInputs, state_sha256
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
from .plan import WHOLE_SECTION, Stage, TrainPlan, resolve_plan


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
    ):
        self.module, self.data, self.scaler, self.encoder = module, data, scaler, encoder
        self.token_scaler = token_scaler
        self.optimizer, self.augment, self.aug_gen = optimizer, augment, aug_gen
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
            params = draw_augmentation(n, self.aug_gen, square=x.shape[-1] == x.shape[-2])
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
    patch_size: int | None = None,
    mpp: float | None = None,
    device: str | None = None,
    random_state: int = 0,
    progress: bool = True,
    method_kwargs: dict[str, Any] | None = None,
    num_workers: int | None = None,
    compile: bool = False,
    targets: dict[str, Any] | None = None,
    **overrides: Any,
) -> _Run:
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
    random_state = int(random_state)
    ctx = distributed.detect()
    dev = distributed.process_device(resolve_device(device), ctx)

    # ---- split ---------------------------------------------------------------------------------------------------
    rng = np.random.default_rng(random_state)
    vf = plan.validation_fraction
    n_val = round(n * vf) if vf > 0 else 0
    if vf > 0 and n_val < 2:
        raise ValueError(
            f"validation_fraction={vf} of {n} spots leaves {n_val} validation spots; the contrastive "
            "loss needs at least 2. Raise validation_fraction or set it to 0 (no early stopping)."
        )
    perm = rng.permutation(n)
    val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    notes = []
    if plan.batch_size > train_idx.size:
        if batch_given:
            if not method_cls.batch_by_group:
                raise ValueError(
                    f"batch_size={plan.batch_size} is larger than the {train_idx.size} training spots ({n} spots minus "
                    f"{n_val} for validation); the maximum batch size here is {train_idx.size}. Lower batch_size or "
                    "use more spots."
                )
        else:
            notes.append(f"batch size reduced from {plan.batch_size} to the {train_idx.size} training spots")
            plan = dataclasses.replace(plan, batch_size=int(train_idx.size))

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
            enc_info = {**frozen_encoder.describe(), "finetuned": False, "weights_sha256": state_sha256(frozen_encoder)}
        else:
            enc_info = {
                "spec": encoder,
                "pretrained": bool(pretrained),
                "checkpoint": None if checkpoint is None else str(checkpoint),
                "checkpoint_sha256": None,
                "weights_sha256": None,
                "out_dim": int(features.shape[1]),
                "finetuned": False,
            }
            if checkpoint is not None:
                from pathlib import Path

                from .encoders import file_sha256

                p = Path(checkpoint)
                enc_info["checkpoint_sha256"] = file_sha256(p) if p.is_file() else None
                enc_info["checkpoint"] = str(p.resolve()) if p.is_file() else str(checkpoint)
            # what the caller knows of the encoder that made the features (e.g. `sthist.pp.embed_patches` params)
            for key in ("weights_sha256", "patch_size", "mpp"):
                if (encoder_info or {}).get(key) not in (None, ""):
                    enc_info[key] = encoder_info[key]
        image_dim = features.shape[1]
    scaler = None if finetune else FeatureScaler(image_dim).fit(features[train_idx]).to(dev)
    grid = int(getattr(mcfg, "token_grid", 0)) if "tokens" in method_cls.consumes else 0
    token_scaler = None
    if grid and finetune:
        # the tokens come from the fine-tuned encoder's forward pass of every batch (unstandardised, as features)
        if tokens is not None:
            raise ValueError(
                "finetune=True computes the encoder tokens from the patches in every step; drop tokens= (cached tokens "
                "are for frozen mode)."
            )
        tokens_dim = int(enc.token_dim)
    elif grid:
        if tokens is None:
            if frozen_encoder is None:
                raise ValueError(
                    f"method {method!r} consumes a {grid} x {grid} grid of encoder tokens: pass tokens= (n, "
                    f"{grid * grid}, d) or images= (the patches), not features= alone."
                )
            from .encoders import encode_tokens

            tokens = encode_tokens(frozen_encoder, images, grid=grid, device=dev, progress=progress and ctx.is_main)
        tokens = check_tokens(tokens, n, grid)
        token_scaler = FeatureScaler(tokens.shape[2]).fit(tokens[train_idx].reshape(-1, tokens.shape[2])).to(dev)
    elif tokens is not None:
        raise ValueError(f"method {method!r} does not consume encoder tokens; drop tokens=.")
    if images is not None:
        patch_size = int(images.shape[1])
    elif patch_size is None:
        patch_size = enc_info.get("patch_size")
    if mpp is None:
        mpp = enc_info.get("mpp")
    inputs = ModelInputs(
        encoder=str(enc_info["spec"]),
        pretrained=bool(enc_info.get("pretrained")),
        checkpoint=enc_info.get("checkpoint"),
        weights_sha256=enc_info.get("weights_sha256"),
        finetuned=bool(finetune),
        feature_dim=int(image_dim),
        patch_size=None if patch_size is None else int(patch_size),
        mpp=None if mpp is None else float(mpp),
        needs_coords=bool(method_cls.needs_neighbors),
        needs_neighbors=bool(method_cls.needs_neighbors),
        tokens=grid or None,
        targets=None if targets is None else dict(targets),
    )

    extra = {"token_dim": tokens_dim if finetune else int(tokens.shape[2])} if grid else {}
    module = method_cls(image_dim, g, mcfg, **extra).to(dev)
    k_nb = module.n_neighbors
    neighbors = spatial_neighbors(coords, codes, k_nb) if k_nb else None
    data = SpotData(
        features=None if finetune else features,
        images=images if finetune else None,
        expression=expression,
        coords=method_cls.prepare_coords(coords, codes),
        groups=codes,
        neighbors=neighbors,
        tokens=tokens,
        device=dev,
    )
    channels_last = bool(finetune and dev.type == "cuda" and _has_conv(enc))
    if channels_last:
        enc.to(memory_format=torch.channels_last)
    if finetune:
        # data-parallel training over processes (torchrun); a no-op in one process
        distributed.init(dev, ctx)
    trainer = _Trainer(
        module=module,
        data=data,
        scaler=scaler,
        encoder=enc,
        optimizer=None,
        augment=bool(finetune and plan.augment),
        aug_gen=torch.Generator().manual_seed(random_state),
        device=dev,
        ctx=ctx if finetune else distributed.Context(rank=ctx.rank),
        channels_last=channels_last,
        compile=bool(finetune and compile),
        token_scaler=token_scaler,
    )
    workers = (num_workers if num_workers is not None else _auto_workers(dev, ctx)) if finetune else 0
    settings = {
        "random_state": random_state,
        "device": str(dev),
        "num_workers": int(workers),
        "compile": bool(compile),
        "channels_last": channels_last,
        "world_size": int(ctx.world_size if finetune else 1),
    }
    stages = plan.resolved_stages()
    run = _Run(
        trainer=trainer,
        method_cls=method_cls,
        mcfg=mcfg,
        plan=plan,
        stages=stages,
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
        inputs=inputs,
        frozen_encoder=frozen_encoder,
        device=dev,
        num_workers=int(workers),
        settings=settings,
        notes=notes,
        progress=bool(progress),
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


def _val_pearson(run: _Run, outputs: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Mean Pearson r over genes of the expression predicted for the validation spots.

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
    return mean_pearson(out, run.expression[idx])


def fit(**kwargs: Any) -> ContrastiveModel:
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

    Returns
    -------
    A :class:`~sthist._engine.model.ContrastiveModel` whose reference bank holds all n spots; its ``config`` holds
    the resolved ``plan``, its ``inputs`` what it was fitted on, its ``history`` the losses per epoch and stage.
    """
    from .._logging import info

    start_time = time.perf_counter()
    run = _prepare(**kwargs)
    for note in run.notes:
        info(f"    {note}")
    trainer, method_cls, dev, plan = run.trainer, run.method_cls, run.device, run.plan
    finetune = trainer.finetune
    module, enc, ctx = trainer.module, trainer.encoder, trainer.ctx
    n_val = int(run.val_idx.size)
    g = run.expression.shape[1]
    by_pearson = plan.select_on == "val_pearson"

    def snapshot():
        state = {"method": {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}}
        if finetune:
            state["encoder"] = {k: v.detach().to("cpu", copy=True) for k, v in enc.state_dict().items()}
        return state

    # ---- loop ----------------------------------------------------------------------------------------------------
    history: dict[str, Any] = {"train_loss": [], "val_loss": [], "train_components": {}, "stages": []}
    if by_pearson:
        history["val_pearson"] = []
    show = run.progress and ctx.is_main
    patience = plan.early_stopping_patience
    global_epoch, best_epoch, stopped_early = 0, -1, False
    epoch_items, items_batch = None, None
    for s_i, stage in enumerate(run.stages):
        if s_i:
            _enter_stage(run, stage)
        stage_batch = stage.batch_size or plan.batch_size
        if stage_batch != items_batch:
            epoch_items, items_batch = None, None  # ends the previous loader's worker processes
            epoch_items, items_batch = _loader(run, stage_batch), stage_batch
        sched, base_lr, stage_start = stage.schedule, stage.optimizer.lr, global_epoch
        best_score, best_epoch, best_state, bad_epochs, stopped_early = float("inf"), -1, None, 0, False
        label = method_cls.name if len(run.stages) == 1 else f"{method_cls.name}: {stage.name}"
        bar = progress_bar(range(stage.epochs), enabled=show, desc=f"fitting {label}", leave=False)
        for epoch in bar:
            lr = sched.lr_at(epoch, lr=base_lr, epochs=stage.epochs)
            for group in trainer.optimizer.param_groups:
                group["lr"] = lr
            trainer.train(True)
            total, count, parts = 0.0, 0, {}
            val_total, val_count, outputs = 0.0, 0, []
            for tag, idx, imgs in epoch_items():
                if tag == "train":
                    loss, logs = trainer.step(idx, imgs, epoch=global_epoch)
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
            if n_val:
                # rank 0's values everywhere, so that all processes take the same early-stopping decisions
                val_loss = distributed.broadcast_float(val_total / max(val_count, 1), ctx, dev)
                history["val_loss"].append(val_loss)
                score = val_loss
                if by_pearson:
                    if trainer.module.training:
                        trainer.train(False)
                    with torch.no_grad():
                        r = distributed.broadcast_float(_val_pearson(run, outputs), ctx, dev)
                    history["val_pearson"].append(r)
                    score = -r
                if score < best_score:
                    best_score, best_epoch, best_state, bad_epochs = score, global_epoch, snapshot(), 0
                else:
                    bad_epochs += 1
                bar.set_postfix(train=f"{train_loss:.4f}", val=f"{val_loss:.4f}", best=best_epoch + 1)
                global_epoch += 1
                if patience is not None and bad_epochs >= patience:
                    stopped_early = True
                    break
            else:
                best_epoch = global_epoch
                global_epoch += 1
                bar.set_postfix(train=f"{train_loss:.4f}")
        if best_state is not None:
            module.load_state_dict(best_state["method"])
            if finetune:
                enc.load_state_dict(best_state["encoder"])
        history["stages"].append(
            {
                "name": stage.name,
                "epochs": global_epoch - stage_start,
                "best_epoch": int(best_epoch),
                "stopped_early": stopped_early,
            }
        )
    del epoch_items  # ends the loader's worker processes
    for p in [*module.parameters(), *(enc.parameters() if finetune else [])]:
        p.requires_grad_(run.own_trainable[id(p)])
    trainer.train(False)

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
    model.build_bank(run.expression, coords=run.coords, groups=run.groups, batch_size=_bank_batch(plan), device=dev)
    config["embedding_dim"] = int(model.bank_embeddings.shape[1])
    history["seconds"] = float(time.perf_counter() - start_time)
    return model
