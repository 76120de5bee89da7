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
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from ._utils import autocast, check_float, check_int, progress_bar, resolve_device, seed_everything
from .data import (
    FeatureScaler,
    SpotData,
    augment_images,
    check_coords,
    check_expression,
    check_features,
    check_genes,
    group_codes,
    iter_batches,
    spatial_neighbors,
)
from .encoders import DEFAULT_ENCODER, build_image_encoder, check_patches, encode_patches
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


def _evaluate(method, data, indices, batch_size, groups, encoder, scaler, dev) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for idx in iter_batches(indices, batch_size, groups=groups, by_group=method.batch_by_group):
            if idx.size < 2:
                continue
            batch = data.make_batch(idx, encoder=encoder, scaler=scaler, n_neighbors=method.n_neighbors)
            with autocast(dev):
                loss, _ = method.loss(batch)
            total += float(loss) * idx.size
            count += idx.size
    return total / max(count, 1)


def fit(
    *,
    method: str = "bleep",
    expression: np.ndarray,
    genes: list[str],
    images: np.ndarray | None = None,
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
        uint8 patches (n, S, S, 3). With ``finetune=False`` they are encoded once by ``encoder`` (frozen mode).
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
        Optimisation (AdamW). ``batch_size`` must not exceed the number of training spots.
    validation_fraction
        Fraction of spots held out for validation / early stopping (0 disables both; the last epoch is kept).
    early_stopping_patience
        Stop after this many epochs without a lower validation loss; ``None`` runs all epochs. The weights of the
        best validation epoch are restored either way.
    augment
        Augment patches in fine-tuning mode (flips, 90 degree rotations, colour jitter); unused in frozen mode.
    device
        ``None`` picks cuda, then mps, then cpu; bf16 autocast on CUDA.
    random_state
        Seed of python, numpy and torch; the same seed gives the same model on the same device.
    progress
        Show progress bars.
    method_kwargs
        Options of the method's ``Config`` (e.g. ``{"projection_dim": 128}`` for BLEEP).

    Returns
    -------
    A :class:`~sthist._engine.model.ContrastiveModel` whose reference bank holds all n spots.
    """
    start_time = time.perf_counter()
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
    dev = resolve_device(device)

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
    enc = None
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
            enc = build_image_encoder(encoder, pretrained=pretrained, checkpoint=checkpoint)
            features = encode_patches(enc, images, device=dev, progress=progress)
            enc_info = {**enc.describe(), "finetuned": False}
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
    params = [p for p in module.parameters() if p.requires_grad]
    if finetune:
        params += [p for p in enc.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    aug_gen = torch.Generator().manual_seed(random_state)
    augment_fn = (lambda x: augment_images(x, aug_gen)) if (finetune and augment) else None
    train_encoder = enc if finetune else None

    def snapshot():
        state = {"method": {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}}
        if finetune:
            state["encoder"] = {k: v.detach().to("cpu", copy=True) for k, v in enc.state_dict().items()}
        return state

    # ---- loop ----------------------------------------------------------------------------------------------------
    history: dict[str, Any] = {"train_loss": [], "val_loss": [], "train_components": {}}
    best_val, best_epoch, best_state, bad_epochs, stopped_early = float("inf"), -1, None, 0, False
    bar = progress_bar(range(max_epochs), enabled=progress, desc=f"fitting {method}", leave=False)
    for epoch in bar:
        module.train()
        if finetune:
            enc.train()
        total, count, parts = 0.0, 0, {}
        for idx in iter_batches(
            train_idx,
            batch_size,
            rng=rng,
            drop_last=not method_cls.batch_by_group,
            groups=codes,
            by_group=method_cls.batch_by_group,
        ):
            if idx.size < 2:
                continue
            batch = data.make_batch(idx, encoder=train_encoder, scaler=scaler, augment=augment_fn, n_neighbors=k_nb)
            with autocast(dev):
                loss, logs = module.loss(batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"the training loss became {float(loss)} in epoch {epoch + 1}; lower lr (now {lr}) or check the inputs."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * idx.size
            count += idx.size
            for name, value in logs.items():
                parts[name] = parts.get(name, 0.0) + float(value) * idx.size
        train_loss = total / max(count, 1)
        history["train_loss"].append(train_loss)
        for name, value in parts.items():
            history["train_components"].setdefault(name, []).append(value / max(count, 1))
        if n_val:
            module.eval()
            if finetune:
                enc.eval()
            val_loss = _evaluate(module, data, val_idx, batch_size, codes, train_encoder, scaler, dev)
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
    if best_state is not None:
        module.load_state_dict(best_state["method"])
        if finetune:
            enc.load_state_dict(best_state["encoder"])
    module.eval()
    if finetune:
        enc.eval()

    net = _Net(module, scaler, enc if finetune else None)
    config: dict[str, Any] = {
        "method": method_cls.name,
        "method_config": dict(vars(mcfg)),
        "prediction": method_cls.prediction,
        "needs_neighbors": bool(method_cls.needs_neighbors),
        "needs_coords": bool(method_cls.needs_coords),
        "prediction_defaults": dict(method_cls.prediction_defaults),
        "similarity": method_cls.similarity,
        "mode": "finetune" if finetune else "frozen",
        "image_dim": int(image_dim),
        "n_genes": int(g),
        "encoder": enc_info,
        "training": {
            "max_epochs": max_epochs,
            "batch_size": batch_size,
            "lr": lr,
            "weight_decay": weight_decay,
            "validation_fraction": validation_fraction,
            "early_stopping_patience": early_stopping_patience,
            "augment": bool(augment),
            "random_state": random_state,
            "device": str(dev),
        },
        "versions": _versions(),
    }
    history.update(
        {
            "best_epoch": int(best_epoch),
            "stopped_early": stopped_early,
            "n_train": int(train_idx.size),
            "n_val": int(n_val),
            "device": str(dev),
        }
    )
    model = ContrastiveModel(
        net=net,
        config=config,
        genes=genes,
        history=history,
        bank_embeddings=np.zeros((0, 1), dtype=np.float32),
        bank_expression=np.zeros((0, g), dtype=np.float32),
        encoder=None if finetune else enc,
    )
    # the reference bank: expression embeddings of all training spots (training and validation split)
    model.build_bank(expression, coords=coords, groups=groups, batch_size=max(batch_size, 256), device=dev)
    config["embedding_dim"] = int(model.bank_embeddings.shape[1])
    history["seconds"] = float(time.perf_counter() - start_time)
    return model
