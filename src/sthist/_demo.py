"""``sthist demo``: the pipeline end to end on the embedded synthetic data set."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _plot_overview(adata, out: Path) -> list[str]:
    """H&E with spots and a gallery of extracted patches."""
    import matplotlib.pyplot as plt
    import numpy as np
    import squidpy as sq

    lib = sorted(adata.uns["spatial"])[0]
    sub = adata[adata.obs["section"] == lib].copy()
    sub.uns["spatial"] = {lib: sub.uns["spatial"][lib]}
    sq.pl.spatial_scatter(
        sub, color="region", library_id=lib, img_res_key="hires", title=f"{lib}: H&E and tissue regions"
    )
    _save(plt.gcf(), out / "spots.png")

    patches = adata.obsm["patches"]
    regions = adata.obs["region"].astype(str).to_numpy()
    idx = np.linspace(0, adata.n_obs - 1, 16).astype(int)
    fig, axes = plt.subplots(2, 8, figsize=(12, 3.4))
    for ax, i in zip(axes.ravel(), idx, strict=True):
        ax.imshow(patches[i])
        ax.set_title(regions[i], fontsize=8)
        ax.axis("off")
    params = adata.uns["patches"]["params"]
    fig.suptitle(f"patches: {params['patch_size']} px at {params['mpp']} µm/px")
    _save(fig, out / "patches.png")
    return ["spots.png", "patches.png"]


def run_demo(
    out: str | Path = "sthist-demo", *, seed: int = 0, quick: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Run sthist on :func:`sthist.datasets.toy` and write ``metrics.json`` and PNG figures into ``out``.

    Two synthetic sections: BLEEP and the ridge baseline are trained on one and predict the other, held out.

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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import sthist as st

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def timed(name, fn, *args, **kwargs):
        t0 = time.perf_counter()
        res = fn(*args, **kwargs)
        timings[name] = round(time.perf_counter() - t0, 3)
        return res

    size = {"n_rows": 12, "n_cols": 12, "n_genes": 40} if quick else {"n_rows": 20, "n_cols": 20}
    adata = timed("toy", st.datasets.toy, n_sections=2, seed=seed, **size)
    timed("extract_patches", st.pp.extract_patches, adata, patch_size=64, library_key="section", progress=progress)
    timed("normalize_expression", st.pp.normalize_expression, adata, flavor="log1p")
    timed("embed_patches", st.pp.embed_patches, adata, progress=progress)

    train = adata[adata.obs["section"] == "toy_0"].copy()
    test = adata[adata.obs["section"] == "toy_1"].copy()
    epochs = 20 if quick else 100
    model = timed(
        "fit_contrastive",
        st.tl.fit_contrastive,
        train,
        layer="targets",
        max_epochs=epochs,
        random_state=seed,
        progress=progress,
    )
    ridge = timed("fit_ridge", st.tl.fit_ridge, train, features_key="X_hed_texture", layer="targets")
    timed("predict_expression", st.tl.predict_expression, test, model, progress=progress)
    st.tl.predict_expression(test, ridge, key_added="ridge", progress=False)
    scores = {}
    for name, layer in {"bleep": "predicted", "ridge": "ridge"}.items():
        st.tl.score_prediction(test, layer=layer, true_layer="targets")
        table = st.tl.score_prediction(test, layer=layer, true_layer="targets", inplace=False)
        row = table.loc["all"]
        scores[name] = {
            k: round(float(row[k]), 4) for k in ["pcc_all", "pcc_heg", "pcc_hvg", "gene_corr", "mse", "mae"]
        }
    informative = test.var_names[test.var["informative"]].tolist()
    inf_table = st.tl.score_prediction(test, true_layer="targets", genes=informative, inplace=False)
    scores["bleep"]["pcc_informative_genes"] = round(float(inf_table.loc["all", "pcc_all"]), 4)

    figures = _plot_overview(adata, out)
    ranked = test.var.sort_values("predicted_scores_pearson", ascending=False).index
    genes = [g for g in ranked if g in informative][:2]
    _save(
        st.pl.predicted_vs_true(test, genes, true_layer="targets", library_key="section", show=False, return_fig=True),
        out / "predicted_vs_true.png",
    )
    _save(st.pl.gene_correlation(test, show=False, return_fig=True), out / "gene_correlation.png")
    ax = st.pl.scores(test, show=False)
    _save(ax.figure, out / "scores.png")
    ax = st.pl.training_history(model, show=False)
    _save(ax.figure, out / "training_history.png")
    plt.close("all")
    figures += ["predicted_vs_true.png", "gene_correlation.png", "scores.png", "training_history.png"]

    summary = {
        "train": "toy_0",
        "test": "toy_1",
        "n_spots": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
        "patch_shape": list(adata.obsm["patches"].shape[1:]),
        "best_epoch": int(model.history["best_epoch"]),
        "scores_on_held_out_section": scores,
    }
    metrics = {
        "summary": summary,
        "seconds": timings,
        "figures": figures,
        "config": {"seed": seed, "quick": quick, "encoder": "hed-texture", "method": "bleep", "max_epochs": epochs},
        "versions": {"sthist": st.__version__, "python": platform.python_version()},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
