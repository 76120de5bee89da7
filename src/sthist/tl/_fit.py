"""`fit_contrastive`: learn a joint embedding of H&E patches and expression profiles."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .. import _constants as C
from .._anndata import fit_expression, get_patches, image_features, patch_geometry, record, spatial_inputs
from .._constants import DEFAULT_ENCODER
from .._docs import inject_docs
from .._logging import info
from .._validate import check_adata
from ._utils import model_record

if TYPE_CHECKING:
    from anndata import AnnData

    from .._engine.model import ContrastiveModel
    from .._engine.plan import TrainPlan

METHODS_DOC = (
    "see :func:`sthist.tl.methods`: the published recipes ``'bleep'``, ``'mclstexp'``, ``'nh2st'``, ``'stgchb'``, "
    "``'cmrcnet'``; sthist's variants ``'bleep_es'``, ``'mclstexp_section'``, ``'nh2st_ctx'``, ``'stgchb_joint'``, "
    "``'cmrcnet_pooled'``; and ``'bleep_ctx'``"
)


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
    plan: TrainPlan | None = None,
    max_epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    weight_decay: float | None = None,
    validation_fraction: float | None = None,
    early_stopping_patience: int | Literal["recipe"] | None = "recipe",
    select_on: Literal["val_loss", "val_pearson", "val_pearson_top50"] | None = None,
    augment: bool | None = None,
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
    checkpoint_every: int | None = None,
    resume: bool = False,
) -> ContrastiveModel:
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
        Image encoder. ``'hed-fast'`` (default, the recommended configuration's) and ``'hed-texture'`` are
        weight-free, need no download and are fast on a CPU. Any
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
    plan
        The training plan (:class:`sthist.tl.TrainPlan`: optimiser, learning-rate schedule, batch, epochs, stages,
        model selection); ``None`` runs the method's published recipe (``sthist.tl.methods()`` and the method's
        docs page list it). The settings below override single fields of it.
    max_epochs, batch_size, lr, weight_decay
        Training length and optimiser settings; ``None`` keeps the plan's (``max_epochs`` sets the epochs of every
        stage; ``batch_size`` the plan's batch, not that of stages with their own). A recipe's batch larger than
        the training spots is reduced to fit, with a log message; a ``batch_size`` given here is not. Another
        optimiser or schedule: pass ``plan=``.
    validation_fraction
        Fraction of spots held out for early stopping and model selection (``None``: the recipe's, e.g. 0.2 for
        BLEEP, 0 for mclSTExp and ST-GCHB, whose authors keep the last epoch).
    early_stopping_patience
        Epochs without validation improvement before stopping (the best weights are restored); ``'recipe'``
        keeps the plan's (20 for NH2ST, 10 for sthist's variants, none for the other published recipes);
        ``None`` trains every epoch.
    select_on
        Model selection: ``'val_loss'``, ``'val_pearson'`` (the mean Pearson r over genes of the expression
        predicted for the validation spots) or ``'val_pearson_top50'`` (the mean r of the 50 genes best predicted
        on the validation spots). ``None``: the recipe's; NH2ST's is ``'val_pearson_top50'``, as in its authors'
        code.

    augment
        Augment patches when fine-tuning (plan default True).
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
        Also save the model to this folder (replacing a model saved there before; on rank 0 only under torchrun) and
        record it in ``adata.uns[key_added]['model_dir']``, so that :func:`sthist.tl.predict_expression` finds it in a
        later session. Checkpoints go to its sub-folder ``checkpoint``.
    key_added
        Key of the outputs in ``adata.obsm`` and ``adata.uns``.
    num_workers
        Fine-tuning: background processes that read the patches of the next batches (and decompress them when
        ``adata.obsm[patches_key]`` is a lazy zarr-backed array). ``None``: none on a CPU, up to 8 per GPU on CUDA.
    compile
        Fine-tuning: compile the image encoder with :func:`torch.compile` (slow first steps, faster long GPU runs).
        On CUDA, bf16 autocast, ``channels_last`` memory format (convolutional encoders) and pinned memory are
        automatic. Several GPUs: launch the script with ``torchrun`` (see the docs page "Training on GPUs").
    checkpoint_every
        Write a checkpoint into ``save_dir/checkpoint`` after every ``checkpoint_every`` epochs (and when training
        ends): the weights, the optimiser, the epoch and stage, the best-so-far model selection, the loss history and
        every random number generator, written atomically (the previous checkpoint stays valid until the new one is
        complete). Needs ``save_dir``. ``None``: no checkpoints. See the docs page "Checkpoints and resuming".
    resume
        Continue from the checkpoint in ``save_dir/checkpoint`` that an interrupted call with the same arguments
        wrote; the model equals that of an uninterrupted run (on a CPU, to the last bit). Without a checkpoint there,
        training starts from the start (logged), so one command serves the first run and every restart. A
        checkpoint of another configuration (method, plan, data, genes, seed) raises a :class:`ValueError` naming
        what differs. The checkpoint is kept after a successful fit (``resume=True`` then trains nothing again);
        delete the folder to reclaim its space.

    Returns
    -------
    The fitted model (:class:`~sthist.tl.ContrastiveModel`; ``model.save(dir)`` / ``sthist.tl.load_model(dir)``);
    ``model.config['plan']`` is the plan that ran and ``model.inputs`` what it was fitted on. Also writes

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
    fn = "sthist.tl.fit_contrastive"
    check_adata(adata, fn=fn)
    checkpoint_dir = _checkpoint_dir(save_dir, checkpoint_every, resume, fn=fn)
    from .._engine import train as engine
    from .._engine.methods import get_method
    from .._engine.plan import NO_EARLY_STOPPING, resolve_plan

    method_cls = get_method(method)  # unknown names raise with the list of methods
    method_cls.make_config(method_kwargs)  # unknown or invalid settings raise before any work
    overrides = {
        "max_epochs": max_epochs,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "validation_fraction": validation_fraction,
        "early_stopping_patience": {"recipe": None, None: NO_EARLY_STOPPING}.get(
            early_stopping_patience, early_stopping_patience
        ),
        "select_on": select_on,
        "augment": augment,
    }
    resolve_plan(method_cls.recipe, plan, **overrides)  # invalid settings raise before any work
    expr, gene_names, targets = fit_expression(adata, layer=layer, genes=genes, fn=fn)
    needs_space = bool(method_cls.needs_neighbors or method_cls.needs_coords)
    coords, groups = spatial_inputs(
        adata, spatial_key=spatial_key, library_key=library_key, needs_space=needs_space, method=method
    )
    if finetune or "tokens" in method_cls.consumes:
        # fine-tuning, or a method that reads token grids: the engine encodes the patches itself (tokens once)
        patches, feats = get_patches(adata, patches_key=patches_key), None
        geometry = patch_geometry(adata, patches_key)
        image_kw = {"images": patches}
    else:
        feats = image_features(
            adata,
            encoder=encoder,
            pretrained=pretrained,
            checkpoint=checkpoint,
            patches_key=patches_key,
            features_key=features_key,
            device=device,
            progress=progress,
        )
        geometry = patch_geometry(adata, patches_key if feats.computed else feats.key)
        image_kw = {"features": feats.values}
        encoder = feats.params.get("encoder") or encoder
    start = info(f"fitting {method!r} on {adata.n_obs} spots x {len(gene_names)} genes")
    model = engine.fit(
        method=method,
        expression=expr,
        genes=gene_names,
        **image_kw,
        coords=coords,
        groups=groups,
        encoder=encoder,
        pretrained=pretrained,
        checkpoint=None if checkpoint is None else str(checkpoint),
        encoder_info=None if feats is None else feats.params,
        finetune=finetune,
        plan=plan,
        patch_size=geometry[0],
        mpp=geometry[1],
        device=device,
        random_state=random_state,
        progress=progress,
        method_kwargs=method_kwargs,
        num_workers=num_workers,
        compile=compile,
        targets=targets,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every,
        resume=resume,
        **overrides,
    )
    img_emb = model.embed_images(**image_kw, coords=coords, groups=groups, device=device)
    expr_emb = model.embed_expression(expr, coords=coords, groups=groups, device=device)
    if save_dir is not None and _is_main_process():
        model.save(save_dir, overwrite=True)  # under torchrun every process holds the same model: rank 0 writes it

    # everything succeeded: write into adata
    if feats is not None:
        feats.store(adata)
    adata.obsm[C.Key.embedding(key_added, "image")] = img_emb
    adata.obsm[C.Key.embedding(key_added, "expression")] = expr_emb
    params = {
        "method": method,
        "layer": layer,
        "n_genes": len(gene_names),
        "patches_key": patches_key,
        "features_key": None if feats is None else feats.key,
        "encoder": model.inputs.encoder,
        "pretrained": pretrained,
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "finetune": finetune,
        "random_state": random_state,
        "num_workers": model.config["training"].get("num_workers", 0),
        "compile": bool(compile),
        "checkpoint_every": None if checkpoint_every is None else int(checkpoint_every),
        "resume": bool(resume),
        "config": model.config.get("method_config", {}),
        "plan": model.config["plan"],
        "inputs": model.inputs.to_dict(),
    }
    record(
        adata,
        key_added,
        {
            "params": params,
            "history": {
                k: model.history.get(k)
                for k in ("train_loss", "val_loss", "best_epoch", "seconds", "resumed_from_epoch")
            },
            **model_record(model, save_dir=save_dir),
        },
    )
    info(
        "    finished",
        time=start,
        deep=(
            f"added\n    {C.Key.embedding(key_added, 'image')!r}, {C.Key.embedding(key_added, 'expression')!r}, "
            f"joint embeddings (adata.obsm)\n    {key_added!r}, parameters, loss history and model id (adata.uns)"
        ),
    )
    return model


fit_contrastive.__doc__ = fit_contrastive.__doc__.replace("{methods}", METHODS_DOC)


def _checkpoint_dir(save_dir: Any, checkpoint_every: Any, resume: Any, *, fn: str) -> Path | None:
    """The checkpoint folder ``save_dir/checkpoint`` when checkpoints are written or read; bad settings raise."""
    from .._engine.train import CHECKPOINT_DIR, check_checkpointing

    check_checkpointing(save_dir, checkpoint_every, resume, fn=fn, folder_arg="save_dir")
    if save_dir is None or (checkpoint_every is None and not resume):
        return None
    return Path(save_dir) / CHECKPOINT_DIR


def _is_main_process() -> bool:
    """Whether this is rank 0 of a torchrun launch, or a plain process."""
    from .._engine import distributed

    return distributed.detect().is_main
