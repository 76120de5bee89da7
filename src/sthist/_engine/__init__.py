"""The torch side of sthist: numpy in, numpy out, no AnnData.

Modules
-------
``encoders``
    Image encoders: the weight-free ``"hed-texture"`` descriptor, timm models, hf-hub models, local checkpoints.
``methods``
    One small file per contrastive method plus a registry (:data:`~sthist._engine.methods.METHODS`).
``data``
    Batches, data sets of spots, augmentation, spatial neighbours.
``bank``
    Chunked top-k retrieval from a reference bank and aggregation of the retrieved profiles.
``train``
    :func:`~sthist._engine.train.fit`, the training loop shared by all methods.
``base``
    The one model contract (:class:`~sthist._engine.base.BaseModel`, :class:`~sthist._engine.base.ModelInputs`,
    :class:`~sthist._engine.base.Prediction`) and :func:`~sthist._engine.base.load_model`.
``plan``
    Training plans: :class:`~sthist._engine.plan.TrainPlan` (optimiser, schedule, stages, model selection).
``model``
    :class:`~sthist._engine.model.ContrastiveModel`: prediction, save and load (safetensors + JSON, no pickle).
``ridge``, ``knn``
    The baselines: the HEST linear probe and raw-feature kNN, as models of the same contract.

Nothing here is imported by ``import sthist``; the AnnData-facing functions import it lazily.
"""

from __future__ import annotations
