"""`fit_ridge`: the HEST-Benchmark linear probe from image features to gene expression."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .. import _logging as logg
from .._anndata import fit_expression, record
from .._constants import DEFAULT_ENCODER
from .._docs import inject_docs
from .._validate import check_adata, check_positive_int
from ._frozen import frozen_inputs, seed_of
from ._utils import model_record

if TYPE_CHECKING:
    from anndata import AnnData

    from .._engine.ridge import RidgeModel

RIDGE_KEY = "ridge"


@inject_docs
def fit_ridge(
    adata: AnnData,
    *,
    features_key: str | None = None,
    layer: str | None = None,
    genes: Sequence[str] | str | None = None,
    encoder: str = DEFAULT_ENCODER,
    pretrained: bool = False,
    checkpoint: str | Path | None = None,
    patches_key: str = "patches",
    n_components: int = 256,
    alpha: float | str | None = None,
    random_state: int | np.random.Generator | None = 0,
    save_dir: str | Path | None = None,
    key_added: str = RIDGE_KEY,
    device: str | None = None,
    progress: bool = True,
) -> RidgeModel:
    """Fit the HEST-Benchmark linear probe from image features to gene expression.

    The recipe of HEST-Benchmark (Jaume et al., 2024) for scoring patch encoders:

    1. standardise each feature to zero mean and unit variance over the spots (constant features keep scale 1);
    2. project on the first ``n_components`` principal components (256 in HEST; scikit-learn's PCA, seeded);
    3. ridge regression of every gene on the components with ``alpha = 100 / (n_components * n_genes)`` and
       scikit-learn's ``lsqr`` solver (``max_iter=1000``), without a penalised intercept.

    HEST fits without intercept; because the components are centred, the coefficients are the same when the
    targets are centred first, so sthist fits on centred targets and adds their means back as intercept: the
    per-gene Pearson r equals HEST's (up to the lsqr tolerance), and the predictions are on the scale of the
    targets (so MSE is meaningful).

    Parameters
    ----------
    {adata}
        It needs patches (:func:`sthist.pp.extract_patches`) or embeddings (:func:`sthist.pp.embed_patches`).
    {frozen_features}
    {layer}
        Use the same scale you will score on, e.g. ``'targets'`` from :func:`sthist.pp.normalize_expression`.
    {genes}
    n_components
        Number of principal components; clipped (with a log message) to ``min(n_obs, n_features)``.
    alpha
        Ridge penalty; ``None`` uses HEST's rule ``100 / (n_components * n_genes)``; ``'gcv'`` chooses one
        penalty for all genes among ``10**-1 ... 10**4`` (12 values) by generalised (efficient leave-one-out)
        cross-validation, scikit-learn's ``RidgeCV``: the registered baseline ``"ridge_gcv"``. HEST's rule is
        nearly unpenalised, which over-fits a few hundred training spots; ``'gcv'`` is the fair linear control
        on small cohorts.
    {random_state}
    {baseline_record}
    {progress}

    Returns
    -------
    The fitted :class:`~sthist.tl.RidgeModel`. Predict with :func:`sthist.tl.predict_expression` (from the
    features, or from patches, which are encoded with the recorded encoder). Also writes

    ``adata.uns['ridge' | key_added]``
        ``params`` (features key, encoder, genes, components, alpha) and the ``model_id`` / ``model_dir`` that
        :func:`~sthist.tl.predict_expression` finds.
    ``adata.obsm['X_<encoder>']``
        the embeddings, when they were computed here.
    """
    from .._engine.ridge import fit_ridge as engine_fit

    fn = "sthist.tl.fit_ridge"
    check_adata(adata, fn=fn)
    n_components = check_positive_int("n_components", n_components)
    seed = seed_of(random_state)
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
    n, d = feats.values.shape
    k = min(n_components, n, d)
    if k < n_components:
        logg.info(f"    n_components={n_components} clipped to {k} = min(n_obs={n}, n_features={d})")
    start = logg.info(
        f"fitting ridge probe on obsm[{feats.key!r}] ({d} features -> {k} PCs -> {len(gene_names)} genes)"
    )
    model = engine_fit(
        feats.values, y, gene_names, inputs=inputs, n_components=n_components, alpha=alpha, random_state=seed
    )
    if save_dir is not None:
        model.save(save_dir, overwrite=True)
    feats.store(adata)
    params = {
        "method": "ridge",
        "features_key": feats.key,
        "layer": layer,
        "n_genes": len(gene_names),
        "n_components": k,
        "alpha": model.alpha,
        "random_state": seed,
        "inputs": inputs.to_dict(),
    }
    record(adata, key_added, {"params": params, **model_record(model, save_dir=save_dir)})
    logg.info(f"    finished (alpha = {model.alpha:.3g})", time=start)
    return model
