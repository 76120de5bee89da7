"""Every key sthist reads or writes in an AnnData, in one place."""

from __future__ import annotations

#: The image encoder every function uses unless told otherwise: the weight-free ``hed-fast`` descriptor of the
#: recommended configuration (``dual_knn`` on 224 px patches at 1 µm/px). It needs no download and runs fast on a CPU.
DEFAULT_ENCODER = "hed-fast"

# Visium convention (scanpy / squidpy)
SPATIAL_KEY = "spatial"  # obsm: full-resolution pixel (x = column, y = row); uns: per-library images/scalefactors
SCALEFACTORS = "scalefactors"
IMAGES = "images"
METADATA = "metadata"
HIRES = "hires"
LOWRES = "lowres"
FULLRES = "fullres"  # uns["spatial"][lib]["images"]["fullres"]: an in-memory full-resolution image (toy data)
SOURCE_IMAGE_PATH = "source_image_path"  # uns["spatial"][lib]["metadata"]: path of the full-resolution image
SOURCE_IMAGE_KEY = "source_image_key"  # element name inside a SpatialData zarr store
OBS_KIND = "obs_kind"  # uns["spatial"][lib]["metadata"]: "spots", "bins" or "cells" (written by from_spatialdata)
HIRES_SCALEF = "tissue_hires_scalef"
LOWRES_SCALEF = "tissue_lowres_scalef"
SPOT_DIAMETER = "spot_diameter_fullres"
MPP = "microns_per_pixel"

# obs columns written by readers
SECTION_KEY = "section"
PATIENT_KEY = "patient"
ARRAY_ROW = "array_row"
ARRAY_COL = "array_col"

# sthist outputs (defaults of key_added)
PATCHES_KEY = "patches"  # obsm: uint8 (n_obs, S, S, 3); uns[key]["params"]
BORDER_SUFFIX = "_at_border"  # obs[f"{key}_at_border"]: patch padded because it crosses the image edge
GENES_KEY = "sthist_genes"  # var: boolean gene selection; uns[key]["params"]
TARGETS_KEY = "targets"  # layers: normalised expression targets; uns[key]["params"]
PREDICTED_KEY = "predicted"
CONTRASTIVE_KEY = "contrastive"  # uns: params, history, model_id / model_dir of fit_contrastive
SPREAD_SUFFIX = "_spread"  # obs[f"{key}_spread"]: spread of the retrieved neighbours (uncertainty)
MODELLED_SUFFIX = "_modelled"  # var[f"{key}_modelled"]: the gene is covered by the model
CV_KEY = "cv_predicted"
SCORES_SUFFIX = "_scores"  # uns[f"{layer}_scores"]: default key_added of score_prediction
PEARSON_SUFFIX = "_pearson"  # var[f"{key}_pearson"]: per-gene r written by score_prediction
HISTORY = "history"  # uns[key]["history"]: loss per epoch written by fit_contrastive


class Key:
    """Builders of every derived key name sthist writes and reads.

    The writer (:mod:`sthist.tl`, :mod:`sthist.pp`) and the readers (:mod:`sthist.pl`) call the same builder, so a
    name is spelt once. Each method returns the string; none touches an AnnData.

    Examples
    --------
    >>> Key.scores("predicted")
    'predicted_scores'
    >>> Key.embedding("contrastive", "image")
    'X_contrastive_image'
    """

    _GENE_CORR = ("true", "pred", "genes")
    _EMBEDDING = ("image", "expression")

    @staticmethod
    def scores(layer: str) -> str:
        """``adata.uns`` key of the scores of a predicted layer (the default ``key_added`` of ``score_prediction``)."""
        return f"{layer}{SCORES_SUFFIX}"

    @staticmethod
    def pearson(key: str) -> str:
        """``adata.var`` column of the per-gene Pearson r written under the scores key ``key``."""
        return f"{key}{PEARSON_SUFFIX}"

    @staticmethod
    def coverage(key: str) -> str:
        """``adata.var`` column of the per-gene coverage of the intervals, written under the scores key ``key``."""
        return f"{key}_coverage"

    @staticmethod
    def width(key: str) -> str:
        """``adata.var`` column of the per-gene mean width of the intervals, written under the scores key ``key``."""
        return f"{key}_width"

    @staticmethod
    def gene_corr(which: str) -> str:
        """Entry of ``adata.uns[<scores key>]`` holding a gene-gene correlation matrix or its genes.

        ``which`` is ``'true'`` or ``'pred'`` (the matrices) or ``'genes'`` (their genes, in matrix order).
        """
        if which not in Key._GENE_CORR:
            raise ValueError(f"Key.gene_corr: which={which!r} is not valid; choose one of {list(Key._GENE_CORR)}.")
        return f"gene_corr_{which}"

    @staticmethod
    def modelled(key: str) -> str:
        """``adata.var`` column flagging the genes a model covers in the prediction ``key``."""
        return f"{key}{MODELLED_SUFFIX}"

    @staticmethod
    def interval(key: str, side: str) -> str:
        """``adata.layers`` key of the ``'lower'`` or ``'upper'`` bound of the prediction intervals of ``key``."""
        if side not in ("lower", "upper"):
            raise ValueError(f"Key.interval: side={side!r} is not valid; choose 'lower' or 'upper'.")
        return f"{key}_{side}"

    @staticmethod
    def interval_scale(key: str) -> str:
        """``adata.varm`` key of the per-gene half-width of the intervals of ``key`` at each calibrated level."""
        return f"{key}_interval_scale"

    @staticmethod
    def cv_r(key: str, bound: str | None = None) -> str:
        """``adata.var`` column of the cross-validated r of the genes of ``key`` (``bound``: ``'low'`` / ``'high'``)."""
        if bound not in (None, "low", "high"):
            raise ValueError(f"Key.cv_r: bound={bound!r} is not valid; choose None, 'low' or 'high'.")
        return f"{key}_cv_r" if bound is None else f"{key}_cv_r_{bound}"

    @staticmethod
    def reliable(key: str) -> str:
        """``adata.var`` column flagging the genes of ``key`` whose cross-validated r is reliably above ``min_r``."""
        return f"{key}_reliable"

    @staticmethod
    def train_range(key: str) -> str:
        """``adata.var`` column of the 5-95 % range of every gene over the training spots of the model of ``key``."""
        return f"{key}_train_range"

    @staticmethod
    def shift(key: str) -> str:
        """``adata.obs`` column of how unlike the calibration tissue each spot of ``key`` is (1 - its p-value)."""
        return f"{key}_shift"

    @staticmethod
    def ood(key: str) -> str:
        """``adata.obs`` column flagging the spots of ``key`` unlike the calibration tissue."""
        return f"{key}_ood"

    @staticmethod
    def spread(key: str) -> str:
        """``adata.obs`` column of the per-spot spread (uncertainty) of the prediction ``key``."""
        return f"{key}{SPREAD_SUFFIX}"

    @staticmethod
    def at_border(key: str) -> str:
        """``adata.obs`` column flagging patches ``key`` padded because they cross the image edge."""
        return f"{key}{BORDER_SUFFIX}"

    @staticmethod
    def embedding(key: str, which: str) -> str:
        """``adata.obsm`` key of the joint ``'image'`` or ``'expression'`` embedding written by ``fit_contrastive``."""
        if which not in Key._EMBEDDING:
            raise ValueError(f"Key.embedding: which={which!r} is not valid; choose one of {list(Key._EMBEDDING)}.")
        return f"X_{key}_{which}"

    @staticmethod
    def features(name: str) -> str:
        """``adata.obsm`` key of spot features named ``name`` (e.g. an encoder's embeddings, ``'X_hed_texture'``)."""
        return f"X_{name}"

    @staticmethod
    def scalefactor(img_key: str) -> str:
        """Entry of ``uns['spatial'][library_id]['scalefactors']`` that maps full resolution to image ``img_key``."""
        return f"tissue_{img_key}_scalef"
