"""`fit_contrastive`: learn a joint embedding of H&E patches and expression profiles."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .. import _constants as C
from .._docs import inject_docs
from .._logging import info
from .._validate import check_adata, check_positive_int
from ..pp._embed import default_key, encode
from ._utils import expression_matrix, image_inputs, register_model

if TYPE_CHECKING:
    from anndata import AnnData

DEFAULT_ENCODER = "hed-texture"
METHODS_DOC = "``'bleep'``, ``'mclstexp'``, ``'nh2st'``, ``'stgchb'``, ``'cmrcnet'`` and ``'bleep_ctx'`` (BLEEP with neighbour context)"


def _h5ad_safe(obj: Any) -> Any:
    """Make a nested structure writable to h5ad (no None, plain containers)."""
    if isinstance(obj, dict):
        return {str(k): _h5ad_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        vals = [_h5ad_safe(v) for v in obj]
        if vals and all(isinstance(v, int | float | bool | np.number) for v in vals):
            return np.asarray(vals)
        return vals if vals else np.zeros(0)
    if obj is None:
        return ""
    return obj


def cached_features(adata: AnnData, *, encoder: str, pretrained: bool, checkpoint: str | None) -> str | None:
    """The obsm key of embeddings computed earlier with exactly this encoder, or None."""
    key = default_key(encoder)
    params = adata.uns.get(key, {}).get("params", {}) if isinstance(adata.uns.get(key), dict) else {}
    same = (
        key in adata.obsm
        and params.get("encoder") == encoder
        and bool(params.get("pretrained")) == bool(pretrained)
        and (params.get("checkpoint") or "") == (str(checkpoint) if checkpoint else "")
    )
    return key if same else None


def spatial_inputs(adata: AnnData, *, spatial_key: str, library_key: str | None, spatial_method: str | None = None):
    """Coordinates (or None when absent) and section labels (or None).

    ``spatial_method`` names a method that uses coordinates or spatial neighbours: then missing coordinates and
    several sections without ``library_key`` raise with the fix.
    """
    coords = np.asarray(adata.obsm[spatial_key], dtype=np.float64)[:, :2] if spatial_key in adata.obsm else None
    groups = None
    if library_key is not None:
        if library_key not in adata.obs:
            raise KeyError(f"library_key={library_key!r} is not a column of adata.obs (columns: {list(adata.obs)}).")
        groups = adata.obs[library_key].astype(str).to_numpy()
    if spatial_method is not None:
        if coords is None:
            raise KeyError(
                f"method {spatial_method!r} uses the spots' positions and spatial neighbours, but "
                f"adata.obsm[{spatial_key!r}] is missing: add the spot centres in full-resolution pixels (see `sthist.io`)."
            )
        if library_key is None:
            for col in (C.SECTION_KEY, "library_id"):
                if col in adata.obs and adata.obs[col].nunique() > 1:
                    raise ValueError(
                        f"adata holds several sections (adata.obs[{col!r}]) and method {spatial_method!r} uses spatial "
                        f"neighbours: pass library_key={col!r} so that spots of different sections are not neighbours."
                    )
    return coords, groups


@inject_docs
def fit_contrastive(
    adata: AnnData,
    *,
    method: str = "bleep",
    layer: str | None = None,
    genes: Any = None,
    patches_key: str = C.PATCHES_KEY,
    features_key: str | None = None,
    encoder: str = DEFAULT_ENCODER,
    pretrained: bool = False,
    checkpoint: str | Path | None = None,
    finetune: bool = False,
    max_epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    weight_decay: float | None = None,
    validation_fraction: float = 0.1,
    early_stopping_patience: int | None = 10,
    augment: bool = True,
    spatial_key: str = C.SPATIAL_KEY,
    library_key: str | None = None,
    device: Literal["cpu", "cuda", "mps"] | str | None = None,
    random_state: int = 0,
    progress: bool = True,
    method_kwargs: dict[str, Any] | None = None,
    save_dir: str | Path | None = None,
    key_added: str = C.CONTRASTIVE_KEY,
    num_workers: int | None = None,
    compile: bool = False,
):
    """Fit a contrastive model that aligns H&E patches with expression profiles.

    The image side is an encoder (frozen, with its embeddings cached once, or fine-tuned end to end) followed
    by the method's projection head; the expression side is the method's expression encoder. Both map into
    one space where matching spots are pulled together (BLEEP: :cite:p:`xie2023bleep`).

    Parameters
    ----------
    {adata}
        It needs patches (:func:`sthist.pp.extract_patches`) or embeddings (:func:`sthist.pp.embed_patches`) and
        expression.
    method
        Contrastive method: {methods}.
    {layer}
        Recommended: the ``'targets'`` layer of :func:`sthist.pp.normalize_expression`. Values must be finite
        and non-negative.
    {genes}
    patches_key
        ``adata.obsm`` key of the uint8 patches.
    features_key
        ``adata.obsm`` key of precomputed encoder embeddings (frozen mode). ``None``: use the embeddings that
        :func:`sthist.pp.embed_patches` cached for ``encoder`` if present, else compute them from the patches and
        cache them in ``adata.obsm['X_<encoder>']``.
    encoder
        Image encoder. ``'hed-texture'`` (default) is weight-free, needs no download and is fast on a CPU. Any
        timm model name (``'resnet50'``, ``'vit_small_patch16_224'``), ``'hf-hub:<org>/<name>'`` for pathology
        foundation models (UNI, H-optimus, Virchow; gated, need a login), or a timm name with ``checkpoint=``.
    pretrained
        Download pretrained weights for a timm / hf-hub encoder. Fails with a clear error offline: then use
        ``checkpoint=`` (a local weight file), ``pretrained=False`` or the weight-free encoder.
    checkpoint
        Local weight file (``.safetensors``, or ``.pth``/``.bin`` read without executing code) for ``encoder``.
    finetune
        Train the image encoder end to end on the patches (with flips, 90° rotations and colour jitter when
        ``augment``), instead of training only the heads on frozen embeddings. Much slower on a CPU.
    max_epochs, batch_size, lr, weight_decay
        Training length and optimiser settings; ``None`` takes the method's paper values where it has them (its
        docs page lists them), else the engine's: at most 100 epochs with early stopping, batch 256, AdamW lr 1e-3,
        weight decay 1e-3 (BLEEP's code). A batch size larger than the training spots is reduced to fit, with a log
        message, unless given explicitly.
    validation_fraction
        Fraction of spots held out for early stopping and the validation loss.
    early_stopping_patience
        Epochs without validation improvement before stopping (the best weights are restored); ``None``
        trains for ``max_epochs``.
    augment
        Augment patches when fine-tuning.
    spatial_key
        ``adata.obsm`` key of the spot coordinates, for methods that use spatial neighbours.
    {library_key}
    device
        Torch device; ``None`` picks cuda, then mps, then cpu. bf16 autocast is used on CUDA.
    {random_state}
    {progress}
    method_kwargs
        Settings of the method's configuration (e.g. ``dict(temperature=1.0, projection_dim=256)`` for BLEEP).
    save_dir
        Also save the model to this folder and record it in ``adata.uns[key_added]['model_dir']``, so that
        :func:`sthist.tl.predict_expression` finds it in a later session.
    key_added
        Key of the outputs in ``adata.obsm`` and ``adata.uns``.
    num_workers
        Fine-tuning: background processes that read the patches of the next batches (and decompress them when
        ``adata.obsm[patches_key]`` is a lazy zarr-backed array). ``None``: none on a CPU, up to 8 per GPU on CUDA.
    compile
        Fine-tuning: compile the image encoder with :func:`torch.compile` (slow first steps, faster long GPU runs).
        On CUDA, bf16 autocast, ``channels_last`` memory format (convolutional encoders) and pinned memory are
        automatic. Several GPUs: launch the script with ``torchrun`` (see the docs page "Training on GPUs").

    Returns
    -------
    The fitted model (:class:`~sthist.tl.ContrastiveModel`; ``model.save(dir)`` / ``ContrastiveModel.load(dir)``).
    Also writes

    ``adata.obsm['X_<key_added>_image']``, ``adata.obsm['X_<key_added>_expression']``
        float32 image and expression embeddings in the joint space.
    ``adata.obsm['X_<encoder>']`` and ``adata.uns['X_<encoder>']``
        cached encoder embeddings (frozen mode, when they were computed here).
    ``adata.uns[key_added]``
        ``params``, ``history`` (train/validation loss per epoch, best epoch), ``model_id`` (the model kept in
        this Python process for :func:`~sthist.tl.predict_expression`) and ``model_dir``.

    Examples
    --------
    >>> import sthist as st
    >>> adata = st.datasets.toy()
    >>> st.pp.extract_patches(adata, patch_size=64)
    >>> st.pp.normalize_expression(adata)
    >>> model = st.tl.fit_contrastive(adata, layer="targets")  # doctest: +SKIP
    """
    check_adata(adata, fn="sthist.tl.fit_contrastive")
    from .._engine.methods import get_method

    method_cls = get_method(method)  # unknown names raise with the list of methods
    method_cls.make_config(method_kwargs)  # unknown or invalid settings raise before any work
    expr, gene_names = expression_matrix(adata, layer=layer, genes=genes)
    patches, feats = image_inputs(adata, patches_key=patches_key, features_key=features_key, need_patches=finetune)
    coords, groups = spatial_inputs(
        adata,
        spatial_key=spatial_key,
        library_key=library_key,
        spatial_method=method if (method_cls.needs_neighbors or method_cls.needs_coords) else None,
    )
    n = adata.n_obs
    if not 0 <= validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction!r}.")
    n_train = n - round(n * validation_fraction)

    from .._engine import train as engine

    kwargs: dict[str, Any] = {}
    paper = method_cls.training_defaults
    for name, value in {"max_epochs": max_epochs, "lr": lr, "weight_decay": weight_decay}.items():
        if value is not None:
            kwargs[name] = value
        elif name in paper:
            kwargs[name] = paper[name]
    if batch_size is None:
        batch_size = paper.get("batch_size", engine.DEFAULTS["batch_size"])
        if batch_size > n_train:
            info(f"    batch size reduced from {batch_size} to the {n_train} training spots")
            batch_size = n_train
    batch_size = check_positive_int("batch_size", batch_size)
    if batch_size > n_train:
        raise ValueError(
            f"batch_size={batch_size} is larger than the {n_train} training spots ({n} spots, "
            f"validation_fraction={validation_fraction}); use batch_size <= {n_train} or more spots."
        )

    new_features_key = None
    if not finetune and feats is None:
        features_key = cached_features(adata, encoder=encoder, pretrained=pretrained, checkpoint=checkpoint)
        if features_key is not None:
            feats = np.asarray(adata.obsm[features_key], dtype=np.float32)
        else:
            feats, enc_params = encode(
                adata,
                patches,
                encoder=encoder,
                pretrained=pretrained,
                checkpoint=checkpoint,
                patches_key=patches_key,
                device=device,
                progress=progress,
            )
            new_features_key = default_key(encoder)
    start = info(f"fitting {method!r} on {n} spots x {len(gene_names)} genes")
    model = engine.fit(
        method=method,
        expression=expr,
        genes=gene_names,
        images=patches if finetune else None,
        features=None if finetune else feats,
        coords=coords,
        groups=groups,
        encoder=encoder,
        pretrained=pretrained,
        checkpoint=None if checkpoint is None else str(checkpoint),
        finetune=finetune,
        batch_size=batch_size,
        validation_fraction=validation_fraction,
        early_stopping_patience=early_stopping_patience,
        augment=augment,
        device=device,
        random_state=random_state,
        progress=progress,
        method_kwargs=method_kwargs,
        num_workers=num_workers,
        compile=compile,
        **kwargs,
    )
    patch_params = (
        adata.uns.get(patches_key, {}).get("params", {}) if isinstance(adata.uns.get(patches_key), dict) else {}
    )
    model.config["patches"] = {k: v for k, v in dict(patch_params).items() if k in {"patch_size", "mpp", "pad_value"}}
    img_kw = {"images": patches} if finetune else {"features": feats}
    img_emb = model.embed_images(**img_kw, coords=coords, groups=groups, device=device)
    expr_emb = model.embed_expression(expr, coords=coords, groups=groups, device=device)
    if save_dir is not None:
        model.save(save_dir)

    # everything succeeded: write into adata
    if new_features_key is not None:
        adata.obsm[new_features_key] = feats
        adata.uns[new_features_key] = {"params": enc_params}
    adata.obsm[f"X_{key_added}_image"] = img_emb
    adata.obsm[f"X_{key_added}_expression"] = expr_emb
    params = {
        "method": method,
        "layer": layer,
        "n_genes": len(gene_names),
        "patches_key": patches_key,
        "features_key": features_key or new_features_key,
        "encoder": encoder,
        "pretrained": pretrained,
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "finetune": finetune,
        "batch_size": batch_size,
        "validation_fraction": validation_fraction,
        "early_stopping_patience": early_stopping_patience,
        "random_state": random_state,
        "num_workers": model.config["training"].get("num_workers", 0),
        "compile": bool(compile),
        "config": model.config.get("method_config", {}),
    }
    adata.uns[key_added] = _h5ad_safe(
        {
            "params": params,
            "history": {k: model.history[k] for k in ("train_loss", "val_loss", "best_epoch", "seconds")},
            "model_id": register_model(model),
            "model_dir": "" if save_dir is None else str(Path(save_dir).resolve()),
        }
    )
    info(
        "    finished",
        time=start,
        deep=(
            f"added\n    'X_{key_added}_image', 'X_{key_added}_expression', joint embeddings (adata.obsm)\n"
            f"    {key_added!r}, parameters, loss history and model id (adata.uns)"
        ),
    )
    return model


fit_contrastive.__doc__ = fit_contrastive.__doc__.replace("{methods}", METHODS_DOC)
