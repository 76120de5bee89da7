"""``sthist demo``: the pipeline end to end on the embedded synthetic data set."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any


def _plot_overview(adata, out: Path) -> list[str]:
    """H&E with spots and a gallery of extracted patches."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import scanpy as sc

    written = []
    lib = next(iter(adata.uns["spatial"]))
    fig = sc.pl.spatial(adata, color="region", library_id=lib, show=False, return_fig=True, title="toy: H&E and spots")
    fig = fig if fig is not None else plt.gcf()
    fig.savefig(out / "spots.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    written.append("spots.png")

    patches = adata.obsm["patches"]
    regions = adata.obs["region"].astype(str).to_numpy()
    idx = np.linspace(0, adata.n_obs - 1, 16).astype(int)
    fig, axes = plt.subplots(2, 8, figsize=(12, 3.4))
    for ax, i in zip(axes.ravel(), idx, strict=True):
        ax.imshow(patches[i])
        ax.set_title(f"{adata.obs_names[i]}\n{regions[i]}", fontsize=7)
        ax.axis("off")
    fig.suptitle(f"patches: {patches.shape[1]} px at {adata.uns['patches']['params']['mpp'] or 'native'} µm/px")
    fig.savefig(out / "patches.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    written.append("patches.png")
    return written


def run_demo(out: str | Path = "sthist-demo", *, seed: int = 0, quick: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run sthist on :func:`sthist.datasets.toy` and write ``metrics.json`` and PNG figures into ``out``.

    Parameters
    ----------
    out
        Output folder (created).
    seed
        Seed of the synthetic data and of training.
    quick
        Smaller data and shorter training, for smoke tests.
    progress
        Show progress bars.

    Returns
    -------
    The metrics written to ``out / "metrics.json"``.
    """
    import sthist as st

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def timed(name, fn, *args, **kwargs):
        t0 = time.perf_counter()
        res = fn(*args, **kwargs)
        timings[name] = round(time.perf_counter() - t0, 3)
        return res

    size = {"n_rows": 12, "n_cols": 12} if quick else {}
    adata = timed("toy", st.datasets.toy, seed=seed, **size)
    timed("extract_patches", st.pp.extract_patches, adata, patch_size=64, mpp=1.0, progress=progress)
    timed("select_genes", st.pp.select_genes, adata, flavor="heg", n_top=50)
    timed("normalize_expression", st.pp.normalize_expression, adata, flavor="log1p")

    figures = _plot_overview(adata, out)
    summary = {
        "n_spots": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
        "patch_shape": list(adata.obsm["patches"].shape[1:]),
        "patches_at_border": int(adata.obs["patches_at_border"].sum()),
        "n_selected_genes": int(adata.var["sthist_genes"].sum()),
    }
    metrics = {
        "summary": summary,
        "seconds": timings,
        "figures": figures,
        "config": {"seed": seed, "quick": quick},
        "versions": {"sthist": st.__version__, "python": platform.python_version()},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
