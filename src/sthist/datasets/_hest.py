"""Download HEST-1k samples from the Hugging Face Hub: :func:`hest`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .._docs import inject_docs
from .._logging import info
from ..io._hest import HEST_URL, _layout, read_hest
from ._cache import data_dir, is_connection_error, optional_import

if TYPE_CHECKING:
    from anndata import AnnData

HEST_REPO = "MahmoodLab/hest"
METADATA_CSV = "HEST_v1_1_0.csv"  # the table of every sample id at the repository's root
_LOGIN = (
    f"HEST-1k is a gated data set: open {HEST_URL}, accept its terms with your Hugging Face account, create a read "
    "token at https://huggingface.co/settings/tokens and log in with `hf auth login` (or `huggingface-cli login`, or "
    "set the environment variable HF_TOKEN, or pass token=)."
)


def _ids(ids: str | Sequence[str]) -> list[str]:
    if isinstance(ids, str):
        ids = [ids]
    if not isinstance(ids, Sequence) or not all(isinstance(i, str) and i for i in ids):
        raise TypeError(f"ids must be a HEST sample id or a list of them (e.g. ['TENX96', 'NCBI783']), got {ids!r}.")
    ids = list(ids)
    if not ids:
        raise ValueError(f"ids is empty: name the HEST samples to download (the list is {METADATA_CSV} in {HEST_URL}).")
    dups = sorted({i for i in ids if ids.count(i) > 1})
    if dups:
        raise ValueError(f"ids lists {dups} more than once; list every sample once.")
    return ids


def _missing(root: Path, ids: list[str]) -> list[str]:
    return [i for i in ids if not all(p.is_file() for p in _layout(root, i).values())]


def _download(root: Path, ids: list[str], token: str | bool | None) -> None:
    hub = optional_import("huggingface_hub", extra="hest", purpose="sthist.datasets.hest")
    errors = optional_import("huggingface_hub.errors", extra="hest", purpose="sthist.datasets.hest")
    patterns = [p for i in ids for p in (f"st/{i}.h5ad", f"wsis/{i}.tif", f"metadata/{i}.json")]
    root.mkdir(parents=True, exist_ok=True)
    start = info(f"downloading HEST-1k sample(s) {ids} from {HEST_URL} into {str(root)!r}")
    try:
        hub.snapshot_download(
            repo_id=HEST_REPO, repo_type="dataset", local_dir=root, allow_patterns=patterns, token=token
        )
    except errors.GatedRepoError as e:
        raise PermissionError(f"Cannot download {ids}: {_LOGIN} ({type(e).__name__})") from None
    except errors.RepositoryNotFoundError as e:  # the Hub answers 401 / 404 to requests without access
        raise PermissionError(
            f"Cannot download {ids}: no access to {HEST_REPO}. {_LOGIN} ({type(e).__name__})"
        ) from None
    except Exception as e:
        if is_connection_error(e):
            raise ConnectionError(
                f"Cannot download HEST-1k sample(s) {ids}: huggingface.co cannot be reached (offline, a proxy, or "
                f"HF_HUB_OFFLINE=1). Connect and call again, or download them elsewhere into {str(root)!r} "
                "(st/<id>.h5ad, wsis/<id>.tif, metadata/<id>.json) and pass root=; samples already there are read "
                f"without a connection. ({type(e).__name__}: {e})"
            ) from None
        raise
    info("    finished", time=start)


@inject_docs
def hest(
    ids: str | Sequence[str],
    *,
    root: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
    hires_max_size: int = 2000,
    progress: bool = True,
) -> AnnData:
    """Download HEST-1k samples (if needed) and read them with :func:`sthist.io.read_hest`.

    HEST-1k (https://huggingface.co/datasets/MahmoodLab/hest) is gated on the Hugging Face Hub: accept its terms
    with your account and log in (``hf auth login``, or the environment variable ``HF_TOKEN``) once. Only the three
    files of each requested sample are downloaded (``st/<id>.h5ad``, ``wsis/<id>.tif``, ``metadata/<id>.json``), with
    :func:`huggingface_hub.snapshot_download`; samples already complete under ``root`` are read without a connection.
    The sample ids are listed in ``HEST_v1_1_0.csv`` at the root of the data set.

    Needs the optional package ``huggingface_hub``: ``pip install 'sthist[hest]'``.

    Parameters
    ----------
    ids
        HEST sample ids, e.g. ``"TENX96"`` or ``["TENX96", "NCBI783"]``.
    root
        Folder to download into and read from; ``None``: ``$STHIST_DATA_DIR/hest``, else ``~/.cache/sthist/hest``.
    token
        Hugging Face token; ``None`` uses the one you logged in with (or ``HF_TOKEN``).
    hires_max_size
        Longest side of the stored ``'hires'`` image, as in :func:`sthist.io.read_hest`.
    {progress}

    Returns
    -------
    The AnnData of :func:`sthist.io.read_hest` for ``ids``.

    Raises
    ------
    PermissionError
        If the data set's terms are not accepted or you are not logged in (the message says how).
    ConnectionError
        If samples are missing under ``root`` and the Hub cannot be reached.
    ValueError
        If a sample id does not exist in HEST-1k.

    Examples
    --------
    >>> adata = sthist.datasets.hest(["TENX96"])  # doctest: +SKIP
    >>> sthist.pp.extract_patches(adata, patch_size=224, mpp=0.5)  # doctest: +SKIP
    """
    ids = _ids(ids)
    root = data_dir("hest") if root is None else Path(root).expanduser()
    missing = _missing(root, ids)
    if missing:
        _download(root, missing, token)
        still = _missing(root, missing)
        if still:
            raise ValueError(
                f"HEST-1k has no sample(s) {still} (nothing was downloaded for them). Sample ids are listed in "
                f"{METADATA_CSV} at {HEST_URL}, e.g. 'TENX96' or 'NCBI783'."
            )
    return read_hest(root, ids=ids, hires_max_size=hires_max_size, progress=progress)
