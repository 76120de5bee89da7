"""`fit_knn`: the raw-feature kNN baseline (no training): the control for every retrieval method."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .. import _logging as logg
from .._anndata import fit_expression, record
from .._constants import DEFAULT_ENCODER
from .._docs import inject_docs
from .._validate import check_adata, check_positive_int
from ._frozen import frozen_inputs
from ._utils import model_record

if TYPE_CHECKING:
    from anndata import AnnData

    from .._engine.knn import KNNModel

KNN_KEY = "knn"


@inject_docs
def fit_knn(
    adata: AnnData,
    *,
    features_key: str | None = None,
    layer: str | None = None,
    genes: Sequence[str] | str | None = None,
    encoder: str = DEFAULT_ENCODER,
    pretrained: bool = False,
    checkpoint: str | Path | None = None,
    patches_key: str = "patches",
    k: int = 50,
    save_dir: str | Path | None = None,
    key_added: str = KNN_KEY,
    device: str | None = None,
    progress: bool = True,
) -> KNNModel:
    """Fit the raw-feature kNN baseline: no training, the control for every retrieval method.

    A query spot's prediction is the average expression of its ``k`` nearest training spots in the frozen
    encoder's own feature space (Euclidean distance after standardising each feature with the training mean and
    standard deviation). A contrastive retrieval method (BLEEP, mclSTExp, ...) retrieves in a learnt space; if it
    does not beat this, its training has not helped.

    Parameters
    ----------
    {adata}
        It needs patches (:func:`sthist.pp.extract_patches`) or embeddings (:func:`sthist.pp.embed_patches`).
    {frozen_features}
    {layer}
    {genes}
    k
        Neighbours averaged per query (50, as BLEEP retrieves); capped at the number of training spots.
    {baseline_record}
    {progress}

    Returns
    -------
    The :class:`~sthist.tl.KNNModel`; predict with :func:`sthist.tl.predict_expression`. Also writes

    ``adata.uns['knn' | key_added]``
        ``params`` and the ``model_id`` / ``model_dir`` that :func:`~sthist.tl.predict_expression` finds.
    ``adata.obsm['X_<encoder>']``
        the embeddings, when they were computed here.
    """
    from .._engine.knn import fit_knn as engine_fit

    fn = "sthist.tl.fit_knn"
    check_adata(adata, fn=fn)
    k = check_positive_int("k", k)
    y, gene_names, targets = fit_expression(adata, layer=layer, genes=genes, fn=fn, nonnegative=False)
    feats, inputs = frozen_inputs(
        adata,
        features_key=features_key,
        encoder=encoder,
        pretrained=pretrained,
        checkpoint=checkpoint,
        patches_key=patches_key,
        device=device,
        progress=progress,
        targets=targets,
    )
    start = logg.info(f"kNN bank of {adata.n_obs} spots on obsm[{feats.key!r}] (k = {k})")
    model = engine_fit(feats.values, y, gene_names, inputs=inputs, k=k)
    if save_dir is not None:
        model.save(save_dir, overwrite=True)
    feats.store(adata)
    params = {
        "method": "knn",
        "features_key": feats.key,
        "layer": layer,
        "n_genes": len(gene_names),
        "k": k,
        "inputs": inputs.to_dict(),
    }
    record(adata, key_added, {"params": params, **model_record(model, save_dir=save_dir)})
    logg.info("    finished", time=start)
    return model
