"""Every key sthist reads or writes in an AnnData, in one place."""

from __future__ import annotations

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
