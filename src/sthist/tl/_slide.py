"""`predict_slide`: expression maps of a whole slide without spots, with bounded memory."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .. import _constants as C
from .._anndata import record, to_uns
from .._dask import check_client
from .._docs import inject_docs
from .._logging import info
from .._validate import check_positive_int
from ..pp._image import ImageSource, open_image
from ..pp._patches import extract_patches
from ..pp._tiles import DEFAULT_SPOT_DIAMETER, TILES_KEY, tile_tissue
from ._predict import predict_expression
from ._utils import resolve_model

if TYPE_CHECKING:
    from anndata import AnnData

    from .._engine.base import BaseModel

_FN = "sthist.tl.predict_slide"
#: Pseudo-spots whose patches are held in memory at once (2,048 x 224 x 224 x 3 bytes = 308 MB).
DEFAULT_CHUNK = 2048


def _frozen_encoder(model: BaseModel) -> tuple[Any, str, dict]:
    """The encoder that makes the model's input features, the obsm key and the params of those features."""
    from ..pp._embed import default_key

    inp = model.inputs
    if not inp.encoder:
        raise ValueError(
            f"the {model.method!r} model does not record which encoder made its features, so the slide's patches "
            "cannot be encoded: refit it on features from `sthist.pp.embed_patches`, or extract patches and embed "
            "them yourself, then call `sthist.tl.predict_expression`."
        )
    encoder = model.image_encoder()  # checks that the weights are still those the model was fitted with
    params = {
        "encoder": inp.encoder,
        "pretrained": inp.pretrained,
        "checkpoint": inp.checkpoint or "",
        "weights_sha256": inp.weights_sha256 or "",
    }
    return encoder, default_key(inp.encoder), params


def _chunk_adata(tiles: AnnData, idx: np.ndarray, lib: str) -> AnnData:
    """A small AnnData of the pseudo-spots ``idx`` with what :func:`extract_patches` reads."""
    import anndata as ad
    import pandas as pd

    sf = dict(tiles.uns[C.SPATIAL_KEY][lib][C.SCALEFACTORS])
    return ad.AnnData(
        obs=pd.DataFrame(index=tiles.obs_names[idx]),
        obsm={C.SPATIAL_KEY: np.asarray(tiles.obsm[C.SPATIAL_KEY])[idx]},
        uns={C.SPATIAL_KEY: {lib: {C.SCALEFACTORS: sf}}},
    )


def _encode_in_chunks(tiles, model, chunks, patches_of, batch_size, device, progress):
    """Features of every pseudo-spot from the model's frozen encoder, one chunk of patches in memory at a time."""
    from .._engine._utils import progress_bar
    from .._engine.encoders import encode_patches

    encoder, features_key, feat_params = _frozen_encoder(model)
    feats = None
    with progress_bar(total=tiles.n_obs, enabled=progress, desc="pseudo-spots", unit="spot") as bar:
        for idx in chunks:
            sub = patches_of(idx)
            f = encode_patches(encoder, sub.obsm[C.PATCHES_KEY], batch_size=batch_size, device=device, progress=False)
            del sub
            if feats is None:
                feats = np.empty((tiles.n_obs, f.shape[1]), dtype=np.float32)
            feats[idx] = f
            bar.update(len(idx))
    return feats, features_key, feat_params


def _predict_from_store(tiles, model, source, store, S, patch_mpp, library_id, predict_kw, progress):
    """Write every patch to a zarr store (temporary unless ``store``) and predict from it lazily."""
    import shutil
    import tempfile

    tmp = None if store is not None else Path(tempfile.mkdtemp(prefix="sthist_slide_"))
    path = Path(store) if store is not None else tmp / "patches.zarr"
    try:
        extract_patches(
            tiles, patch_size=S, mpp=patch_mpp, image=source, library_id=library_id, store=path, progress=progress
        )
        out = predict_expression(tiles, model, progress=progress, copy=True, **predict_kw)
        if tmp is not None:  # the temporary store goes: drop what points to it
            out.obsm.pop(C.PATCHES_KEY, None)
            out.uns.pop(C.PATCHES_KEY, None)
            out.obs.drop(columns=[C.PATCHES_KEY + C.BORDER_SUFFIX], inplace=True, errors="ignore")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _per_slide(name: str, value: Any, n: int) -> list[Any]:
    """A setting given once for every slide, or a list of one per slide."""
    if isinstance(value, list | tuple):
        if len(value) != n:
            raise ValueError(f"{_FN}: {name} gives {len(value)} values for {n} slides; give one, or one per slide.")
        return list(value)
    return [value] * n


def _predict_slides(images: list[Any], model: Any, *, client: Any, progress: bool, **kw: Any) -> list[AnnData]:
    """Every slide of a list, one task each: on the workers of ``client``, or one after the other here."""
    from .._dask import run_tasks

    if not images:
        raise ValueError(f"{_FN}: the list of slides is empty.")
    client = check_client(client, fn=_FN)
    n = len(images)
    if kw.get("store") is not None and not isinstance(kw["store"], list | tuple):
        raise ValueError(f"{_FN}: with several slides, store= must be a list of one .zarr path per slide (or None).")
    per_slide = {name: _per_slide(name, kw.pop(name), n) for name in ("mpp", "store", "tissue_mask", "library_id")}
    model = resolve_model(None, model) if not isinstance(model, str | Path) else model
    tasks = [(img, *(per_slide[name][i] for name in per_slide)) for i, img in enumerate(images)]
    return run_tasks(
        client,
        _slide_task,
        tasks,
        progress=progress,
        desc="slides",
        unit="slide",
        shared={"model": model, "options": kw},
    )


def _slide_task(image, mpp, store, tissue_mask, library_id, *, model, options):
    """One slide of :func:`predict_slide` (module level, so that it pickles to a worker)."""
    return predict_slide(
        image, model, mpp=mpp, store=store, tissue_mask=tissue_mask, library_id=library_id, progress=False, **options
    )


@inject_docs
def predict_slide(
    image: Any,
    model: Any,
    *,
    spot_diameter: float | None = None,
    spacing: float | None = None,
    mpp: float | None = None,
    patch_size: int | None = None,
    patch_mpp: float | None = None,
    min_tissue: float = 0.5,
    tissue_mask: Any = None,
    image_key: str | None = None,
    library_id: str = "slide",
    k: int | None = None,
    weighting: Literal["average", "distance", "softmax"] | None = None,
    genes: Any = None,
    level: float | None = None,
    key_added: str = C.PREDICTED_KEY,
    chunk_size: int = DEFAULT_CHUNK,
    store: str | Path | None = None,
    batch_size: int = 64,
    client: Any = None,
    device: str | None = None,
    progress: bool = True,
) -> AnnData | list[AnnData]:
    """Predict expression maps of a whole slide that has no spots (or of a list of slides).

    :func:`sthist.pp.tile_tissue` covers the tissue with a grid of pseudo-spots; their patches are cut at the
    model's patch geometry in chunks of ``chunk_size`` pseudo-spots, each chunk is encoded with the model's frozen
    encoder and its patches dropped, and the model predicts from the features of all pseudo-spots at once (so
    methods with spatial neighbours see the whole slide). Memory stays bounded by one chunk of patches (308 MB
    for 2,048 patches of 224 px) plus the features, whatever the number of pseudo-spots.

    Models with a fine-tuned encoder (and any model when ``store`` is given) predict from patches written to a
    chunked zarr store (:func:`sthist.pp.extract_patches` with ``store=``) that the model reads a chunk at a time;
    without ``store`` it is a temporary folder, removed at the end.

    Parameters
    ----------
    image
        The slide: a path (TIFF / OME-TIFF, openslide formats, JPEG, PNG, SpatialData ``.zarr``), a numpy or dask
        array (H, W, 3) uint8, a spatialdata image or ``SpatialData`` object (see :func:`sthist.pp.tile_tissue`); or a
        list of slides (with ``client=``, predicted in parallel on a Dask cluster).
    model

        A fitted model (:func:`sthist.tl.fit_contrastive`, :func:`sthist.tl.fit_ridge`) or the folder it was
        saved to.
    spot_diameter
        Side of the pseudo-spots in µm; ``None``: the model's patch footprint (``patch_size * patch_mpp``) when
        known, else 112 µm.
    spacing
        Centre-to-centre distance of the grid in µm; ``None``: ``spot_diameter``.
    mpp
        Microns per pixel of the slide; ``None`` reads it from the file's metadata (the rule of
        :func:`sthist.pp.tile_tissue` and :func:`sthist.pp.extract_patches`; the error says what the slide's size
        would be at common resolutions).
    patch_size, patch_mpp
        Patch geometry (output pixels, µm per pixel); ``None``: what the model was trained on (recorded by
        :func:`~sthist.tl.fit_contrastive` from :func:`~sthist.pp.extract_patches`; 224 px and the slide's own
        resolution when not recorded).
    min_tissue, tissue_mask, image_key, library_id
        Passed to :func:`sthist.pp.tile_tissue`.
    k, weighting, genes, level
        Retrieval settings, genes to write and (calibrated models) the coverage of the intervals, as in
        :func:`sthist.tl.predict_expression`.
    key_added
        Name of the prediction layer and of the ``obs`` / ``var`` / ``uns`` entries.
    chunk_size
        Pseudo-spots whose patches are held in memory at once (frozen encoders without ``store``).
    store
        A ``.zarr`` path to keep every patch on disk; the result's ``obsm['patches']`` then reads it lazily.
        ``None``: patches are not kept (frozen encoders encode them chunk by chunk in memory; fine-tuned encoders
        read them from a temporary store).
    batch_size
        Patches per forward pass of the encoder (and spots per forward pass of the model).
    client
        With a list of slides: a :class:`dask.distributed.Client` predicts one slide per task on its workers (each
        in the bounded memory of one slide; the model is sent to every worker once, the slides read by path, so they
        must be on storage every worker reads). ``None`` predicts the slides one after the other here.
    device
        Torch device; ``None`` picks cuda, then mps, then cpu.
    {progress}

    Returns
    -------
    For a list of slides, a list of AnnData, one per slide (``mpp``, ``store``, ``tissue_mask`` and ``library_id`` may
    be lists of one value per slide). For one slide, a new AnnData: the pseudo-spots of :func:`~sthist.pp.tile_tissue` (``obs``, ``obsm['spatial']``,
    ``uns['spatial']`` with the thumbnail) with the model's genes as variables, and

    ``X`` and ``layers['predicted' | key_added]``
        float32 (n_pseudo_spots, n_genes) predictions.
    ``var['predicted_modelled']``
        True for every gene.
    ``obs['predicted_spread']``
        spread of the retrieved neighbours' expression (retrieval models).
    ``obsm['X_<encoder>']`` and ``uns['X_<encoder>']``
        the encoder features of the pseudo-spots (frozen encoders).
    ``layers['predicted_lower']``, ``layers['predicted_upper']``, ``var['predicted_reliable']``, ``obs['predicted_shift']``, ``obs['predicted_ood']``, ...
        with a calibrated model (:func:`sthist.tl.calibrate`): the intervals, per-gene reliability, the shift score and
        flag and the slide's summary in ``uns['predicted']['calibration']``, as :func:`sthist.tl.predict_expression`
        writes them (with the same warning when the slide as a whole is unlike the calibration tissue).
    ``uns['predicted' | key_added]['params']``
        the settings of :func:`~sthist.tl.predict_expression` plus the patch geometry, ``chunk_size``, the slide's
        µm per pixel (``slide_mpp``) and where it came from (``slide_mpp_origin``).

    Plot a gene with ``squidpy.pl.spatial_scatter(pred, color="GENE", library_id="slide", shape="square")``.

    Examples
    --------
    >>> pred = sthist.tl.predict_slide("slide.ome.tif", model)  # doctest: +SKIP
    >>> sq.pl.spatial_scatter(pred, color=pred.var_names[0], shape="square")  # doctest: +SKIP
    """
    if model is None:
        raise ValueError(f"{_FN} needs a model: pass a fitted model or the folder `model.save(dir)` wrote.")
    if isinstance(image, list | tuple):
        return _predict_slides(
            list(image),
            model,
            client=client,
            progress=progress,
            spot_diameter=spot_diameter,
            spacing=spacing,
            mpp=mpp,
            patch_size=patch_size,
            patch_mpp=patch_mpp,
            min_tissue=min_tissue,
            tissue_mask=tissue_mask,
            image_key=image_key,
            library_id=library_id,
            k=k,
            weighting=weighting,
            genes=genes,
            level=level,
            key_added=key_added,
            chunk_size=chunk_size,
            store=store,
            batch_size=batch_size,
            device=device,
        )
    if client is not None:
        check_client(client, fn=_FN)
        raise ValueError(
            f"{_FN}: client= distributes a list of slides, one task per slide; for one slide pass it alone without "
            "client (its pseudo-spots are predicted in bounded memory here), or a list."
        )
    model_arg, model = model, resolve_model(None, model)
    chunk_size = check_positive_int("chunk_size", chunk_size)
    batch_size = check_positive_int("batch_size", batch_size)
    if not isinstance(key_added, str) or not key_added:
        raise ValueError(f"key_added must be a non-empty string, got {key_added!r}.")
    finetuned = model.inputs.finetuned
    if store is not None:
        from ..pp._store import check_store

        check_store(store, overwrite=False)  # before any work: an existing store raises with the fix
    rec_size, rec_mpp = model.inputs.patch_size, model.inputs.mpp
    S = check_positive_int("patch_size", patch_size) if patch_size is not None else (rec_size or 224)
    if patch_mpp is None:
        patch_mpp = rec_mpp
    elif isinstance(patch_mpp, bool) or not isinstance(patch_mpp, int | float) or not patch_mpp > 0:
        raise ValueError(f"patch_mpp must be a positive number of microns per pixel or None, got {patch_mpp!r}.")
    if spot_diameter is None:
        spot_diameter = S * patch_mpp if patch_mpp is not None else DEFAULT_SPOT_DIAMETER
    if genes is not None:
        genes = [genes] if isinstance(genes, str) else list(genes)
        missing = [g for g in genes if g not in set(model.genes)]
        if missing:
            raise KeyError(
                f"{len(missing)} requested genes are not covered by the model (e.g. {missing[:5]}); see `model.genes`."
            )

    start = info(f"predicting a whole slide with {model.method!r}")
    if isinstance(image, ImageSource):
        raise TypeError(f"{_FN}: pass the slide itself (a path or an array), not an open image source.")
    tiles = tile_tissue(
        image,
        spot_diameter=spot_diameter,
        spacing=spacing,
        mpp=mpp,
        min_tissue=min_tissue,
        tissue_mask=tissue_mask,
        image_key=image_key,
        library_id=library_id,
    )
    n = tiles.n_obs
    chunks = [np.arange(i, min(n, i + chunk_size)) for i in range(0, n, chunk_size)]
    tile_params = tiles.uns[TILES_KEY]["params"]
    geometry = {
        "patch_size": S,
        "patch_mpp": patch_mpp,
        "chunk_size": chunk_size,
        "spot_diameter": spot_diameter,
        "slide_mpp": tile_params["mpp"],
        "slide_mpp_origin": tile_params["mpp_origin"],
    }
    info(
        f"    {n} pseudo-spots, {S} px patches"
        + (f" at {patch_mpp} µm/px" if patch_mpp else "")
        + f", {len(chunks)} chunks"
    )

    predict_kw = {
        "k": k,
        "weighting": weighting,
        "genes": genes,
        "level": level,
        "key_added": key_added,
        "batch_size": max(batch_size, 256) if not finetuned else batch_size,
        "device": device,
    }
    with open_image(image, image_key=image_key, what="image") as src:

        def patches_of(idx: np.ndarray) -> AnnData:
            sub = _chunk_adata(tiles, idx, library_id)
            extract_patches(sub, patch_size=S, mpp=patch_mpp, image=src, library_id=library_id, progress=False)
            return sub

        if finetuned or store is not None:
            out = _predict_from_store(tiles, model, src, store, S, patch_mpp, library_id, predict_kw, progress)
        else:
            feats, features_key, feat_params = _encode_in_chunks(
                tiles, model, chunks, patches_of, batch_size, device, progress
            )
    if not (finetuned or store is not None):
        tiles.obsm[features_key] = feats
        record(
            tiles,
            features_key,
            {"params": {**feat_params, "patches_key": C.PATCHES_KEY, "patch_size": S, "mpp": patch_mpp}},
        )
        out = predict_expression(tiles, model, features_key=features_key, progress=progress, copy=True, **predict_kw)
    model_dir = str(Path(model_arg).resolve()) if isinstance(model_arg, str | Path) else None
    out.uns[key_added]["params"].update(to_uns({**geometry, "model_dir": model_dir}))
    info("    finished", time=start, deep=f"{n} pseudo-spots x {out.n_vars} genes")
    return out
