"""Shared parameter documentation, written once and injected into docstrings.

Use ``@inject_docs`` and write ``{adata}``, ``{copy}`` ... in a numpydoc ``Parameters`` section.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)

DOCS = {
    "adata": """adata
    Annotated data matrix in the Visium convention: spot centres in full-resolution pixels in
    ``obsm['spatial']`` and per-library images and scale factors in ``uns['spatial']``.""",
    "copy": """copy
    Return a modified copy instead of writing into ``adata``; then the function returns that copy,
    otherwise it returns ``None``.""",
    "library_key": """library_key
    Column of ``adata.obs`` that says which library (section) each spot belongs to, for objects holding
    several sections. ``None`` means one library in ``adata.uns['spatial']``.""",
    "library_id": """library_id
    Library in ``adata.uns['spatial']`` to use. ``None`` works when there is exactly one.""",
    "layer": """layer
    Layer of ``adata`` that holds the expression; ``None`` uses ``adata.X``.""",
    "genes": """genes
    Genes to use: a list of gene names, the name of a boolean column of ``adata.var``, or a path to a text
    file with one gene per line. ``None`` uses all genes.""",
    "progress": """progress
    Show a progress bar for long work.""",
    "random_state": """random_state
    Seed (or :class:`numpy.random.Generator`) that makes the result repeatable.""",
    "frozen_features": """features_key
    ``adata.obsm`` key of the spot features, e.g. ``'X_<encoder>'`` written by :func:`sthist.pp.embed_patches`;
    ``None`` uses the cached embeddings of ``encoder``, else computes them from the patches (and caches them).
encoder, pretrained, checkpoint
    The frozen image encoder when ``features_key`` is ``None``, as in :func:`sthist.tl.fit_contrastive`.
patches_key
    ``adata.obsm`` key of the uint8 patches.""",
    "baseline_record": """save_dir
    Also save the model to this folder (replacing a model saved there) and record it in
    ``adata.uns[key_added]['model_dir']``.
key_added
    Key of the record in ``adata.uns``.
device
    Torch device when features are computed here.""",
}


def inject_docs(fn: F) -> F:
    """Replace ``{name}`` placeholders in ``fn.__doc__`` with the shared parameter docs."""
    if fn.__doc__:
        doc = fn.__doc__
        for key, text in DOCS.items():
            placeholder = "{" + key + "}"
            if placeholder in doc:
                # keep the indentation of the placeholder for every line of the injected text
                indent = doc[: doc.index(placeholder)].rsplit("\n", 1)[-1]
                doc = doc.replace(placeholder, text.replace("\n", "\n" + indent))
        fn.__doc__ = doc
    return fn
