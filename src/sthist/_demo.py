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
    mpp = params.get("mpp")
    where = f"{mpp:g} µm/px" if mpp else "the image's own resolution"
    fig.suptitle(f"patches: {params['patch_size']} px at {where}")
    _save(fig, out / "patches.png")
    return ["spots.png", "patches.png"]


#: What the demo fits: the recommended call (chosen on the training section and calibrated), the two controls, and
#: one contrastive method (its published recipe), every one a registered name. Name -> layer of its prediction.
DEMO_METHODS = {"recommended": "predicted", "knn": "knn", "ridge_gcv": "ridge_gcv", "bleep": "bleep"}


def run_demo(
    out: str | Path = "sthist-demo", *, seed: int = 0, quick: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Run sthist on :func:`sthist.datasets.toy` and write ``metrics.json`` and PNG figures into ``out``.

    Two synthetic sections: the recommended call (:func:`sthist.tl.fit_recommended` on ``hed-fast`` features of 224 px
    patches at 1 µm/px: chosen by cross-validation on spatial blocks of the training section, and calibrated) is fitted
    on one and predicts the other, held out, with 90 % intervals; beside it the two controls every method must beat
    (raw-feature kNN and the ridge probe with a cross-validated penalty) and BLEEP with its published recipe. Every
    prediction is scored against the expression its model was fitted on (``layers['targets']``).

    Parameters
    ----------
    out
        Output folder (created).
    seed
        Seed of the synthetic data and of training.
    quick
        A smaller data set, for smoke tests.
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
    from sthist.tl._registry import fit_predictor, get_predictor

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
    # the recommended geometry: 224 px patches at 1 µm/px (224 µm of tissue around each spot)
    timed(
        "extract_patches",
        st.pp.extract_patches,
        adata,
        patch_size=224,
        mpp=1.0,
        library_key="section",
        progress=progress,
    )
    timed("normalize_expression", st.pp.normalize_expression, adata, flavor="log1p")
    timed("embed_patches", st.pp.embed_patches, adata, progress=progress)  # hed-fast, the default encoder

    train = adata[adata.obs["section"] == "toy_0"].copy()
    test = adata[adata.obs["section"] == "toy_1"].copy()
    options = {"layer": "targets", "library_key": "section", "random_state": seed, "progress": progress}
    models, scores = {}, {}
    for name, key in DEMO_METHODS.items():
        accepted = {k: v for k, v in options.items() if get_predictor(name).accepts(k)}
        models[name] = timed(f"fit {name}", fit_predictor, train, name, **accepted)

        timed(
            f"predict {name}",
            st.tl.predict_expression,
            test,
            models[name],
            key_added=key,
            library_key="section",
            progress=progress,
        )
        # no true_layer: the truth is what the model was fitted on, layers["targets"]
        table = st.tl.score_prediction(test, layer=key, inplace=False)
        scores[name] = {m: round(float(table.loc["all", m]), 4) for m in ("pcc_all", "pcc_heg", "pcc_hvg", "gene_corr")}
    st.tl.score_prediction(test)  # the recommended prediction's per-gene r, for the figures
    informative = test.var_names[test.var["informative"]].tolist()
    for name, key in DEMO_METHODS.items():
        inf_table = st.tl.score_prediction(test, layer=key, genes=informative, inplace=False)
        scores[name]["pcc_informative_genes"] = round(float(inf_table.loc["all", "pcc_all"]), 4)

    figures = _plot_overview(adata, out)
    ranked = test.var.sort_values("predicted_scores_pearson", ascending=False).index
    genes = [g for g in ranked if g in informative][:2]
    _save(
        st.pl.predicted_vs_true(test, genes, library_key="section", show=False, return_fig=True),
        out / "predicted_vs_true.png",
    )
    _save(st.pl.gene_correlation(test, show=False, return_fig=True), out / "gene_correlation.png")
    ax = st.pl.scores(test, show=False)
    _save(ax.figure, out / "scores.png")
    ax = st.pl.training_history(models["bleep"], show=False)
    _save(ax.figure, out / "training_history_bleep.png")
    _save(st.pl.calibration(test, library_key="section", return_fig=True), out / "calibration.png")
    plt.close("all")
    figures += ["predicted_vs_true.png", "gene_correlation.png", "scores.png", "training_history_bleep.png"]
    figures.append("calibration.png")

    summary = {
        "train": "toy_0",
        "test": "toy_1",
        "n_spots": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
        "patch_shape": list(adata.obsm["patches"].shape[1:]),
        "recommended": models["recommended"].calibration.provenance["selection"]["chosen"],
        "intervals": {
            k: round(float(test.uns["predicted_scores"]["summary"][k]), 4)
            for k in ("coverage_all", "coverage_heg", "width_rel_heg", "adaptivity_heg")
        },
        "n_reliable_genes": int(test.var["predicted_reliable"].sum()),
        "fraction_flagged": round(float(test.obs["predicted_ood"].mean()), 4),
        "truth": "layers['targets'] (normalize_expression flavor='log1p'), what every model was fitted on",
        # epochs are counted from 1, as in the training-history plot
        "bleep_best_epoch": int(models["bleep"].history["best_epoch"]) + 1,
        "bleep_epochs_run": len(models["bleep"].history["train_loss"]),
        "scores_on_held_out_section": scores,
    }
    metrics = {
        "summary": summary,
        "seconds": timings,
        "figures": figures,
        "config": {
            "seed": seed,
            "quick": quick,
            "encoder": models["recommended"].inputs.encoder,
            "patch_size": 224,
            "mpp": 1.0,
            "methods": list(DEMO_METHODS),
        },
        "versions": {"sthist": st.__version__, "python": platform.python_version()},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
