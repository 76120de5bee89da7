"""Do the prediction intervals hold what they promise, which genes can be believed, and is a strange slide flagged?

    python benchmarks/calibration.py --root ../shared/data/her2st

The recommended configuration's data (the four shared her2st sections, 785 genes, Hist2ST targets, ``hed-fast``
features of 224 px patches at 1 µm/px). Every model is calibrated with ``sthist.tl.calibrate`` on its training data
only (leave one section out, or spatial blocks of one section) and tested on spots it never saw. Splits:

- ``within_C``: held-out sections of a training patient: train on two of C2, C3, C4 (calibration: leave one of the
  two out), test on the third; every model of ``--methods``. This is the split the method was designed on (tuned).
- ``within_C_with_B4``: the same with B4 (another patient, far shallower counts) in training and calibration: the
  confirmation split.
- ``half_section``: one section, calibrated on 5 spatial blocks of its left half, tested on its right half (each
  of C2, C3, C4 and B4; the shared data have no Visium section, and the synthetic Visium-layout section of
  ``sthist.datasets.toy`` is run the same way).
- ``C_to_B4`` and ``B4_to_C``: a new patient, where the intervals are expected to fail and the slide-level warning
  must say so.

Per split and method: coverage of the 90 % intervals (all genes, top-50 HEG of the training spots), the mean width
over the HEG relative to their training 5-95 % range, the adaptivity (Spearman r over test spots of mean width and
mean absolute error over the HEG), the fraction of spots flagged as unlike the calibration tissue and whether the
slide drew the warning, and the reliable genes (how many, and how many of them have held-out r >= 0.2).

Shift: background patches (pseudo-spots of `sthist.pp.tile_tissue` with at most 5 % tissue, on each section's image),
tissue of another organ and stain (scikit-image's immunohistochemistry sample, a human colon section with
haematoxylin counterstain and DAB, tiled at 224 px), and the synthetic tissue of ``sthist.datasets.toy``, all
predicted with the model calibrated within patient C.

The recommended call (``fit_recommended``) against ``knn`` and ``ridge_gcv`` with ``sthist.tl.benchmark`` (3 seeds):
within patient C, C -> B4 and B4 -> C.

Result: ``results/calibration.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
LEVEL = 0.9


def _dense(m):
    return np.asarray(m.toarray() if hasattr(m, "toarray") else m, dtype=np.float64)


def _fit(st, name, ref, **kw):
    from sthist.tl._registry import fit_predictor, get_predictor

    options = {"layer": "targets", "library_key": "section", "progress": False, "random_state": 0, **kw}
    pred = get_predictor(name)
    return fit_predictor(ref, name, **{k: v for k, v in options.items() if pred.accepts(k)})


def evaluate(st, model, ref, test, *, groupby=None, n_blocks=5, calibrated=False):
    """Calibrate ``model`` on ``ref`` (unless done), predict ``test``, and measure intervals, flags and genes."""
    from scipy.stats import spearmanr

    t0 = time.perf_counter()
    if not calibrated:
        st.tl.calibrate(ref, model, groupby=groupby, n_blocks=n_blocks, library_key="section", progress=False)
    cal_seconds = time.perf_counter() - t0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        st.tl.predict_expression(test, model, library_key="section", progress=False)
    warned = any(issubclass(w.category, st.tl.ShiftWarning) for w in caught)
    y = _dense(test.layers["targets"])
    genes = test.var_names.get_indexer(model.genes)
    y = y[:, genes]
    p = test.layers["predicted"][:, genes]
    lo, hi = test.layers["predicted_lower"][:, genes], test.layers["predicted_upper"][:, genes]
    yr = _dense(ref.layers["targets"])[:, ref.var_names.get_indexer(model.genes)]
    heg = np.argsort(-yr.mean(0), kind="stable")[:50]
    inside = (y >= lo) & (y <= hi)
    width = hi - lo
    cal = model.calibration
    rng = cal.train_high - cal.train_low
    err = np.abs(y - p)
    adapt = spearmanr(width[:, heg].mean(1), err[:, heg].mean(1)).statistic
    # held-out r per gene, per test section, averaged (as the benchmark scores)
    rs = []
    for sec in np.unique(test.obs["section"].astype(str)):
        rows = (test.obs["section"].astype(str) == sec).to_numpy()
        a, b = y[rows] - y[rows].mean(0), p[rows] - p[rows].mean(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            rs.append((a * b).sum(0) / np.sqrt((a * a).sum(0) * (b * b).sum(0)))
    held_out_r = np.nanmean(rs, 0)
    reliable = cal.reliable
    out = {
        "n_calibration_spots": int(cal.provenance["n_spots"]),
        "calibration_groups": cal.provenance["groups"],
        "how": cal.provenance["how"],
        "n_test_spots": int(test.n_obs),
        "coverage_all": float(inside.mean()),
        "coverage_heg": float(inside[:, heg].mean()),
        "width_rel_heg": float(np.nanmean(width[:, heg].mean(0) / rng[heg])),
        "width_rel_all": float(np.nanmean(width.mean(0) / np.where(rng > 0, rng, np.nan))),
        "adaptivity_heg": float(adapt),
        "fraction_flagged": float(test.obs["predicted_ood"].mean()),
        "slide_warning": bool(warned),
        "n_reliable": int(reliable.sum()),
        "reliable_with_held_out_r_ge_0.2": float(np.mean(held_out_r[reliable] >= 0.2)) if reliable.any() else None,
        "genes_with_held_out_r_ge_0.2": int(np.sum(held_out_r >= 0.2)),
        "pcc_all": float(np.nanmean(held_out_r)),
        "calibrate_seconds": round(cal_seconds, 2),
    }
    return out


def _background(st, adata, root):
    """Pseudo-spots with at most 5 % tissue on each section's image (glass), as an AnnData with 224 px patches."""
    import anndata as ad

    parts = []
    for sec in ("C2", "C3", "C4", "B4"):
        info = adata.uns["spatial"][sec]
        path = info["metadata"]["source_image_path"]
        mpp = info["scalefactors"]["microns_per_pixel"]
        tiles = st.pp.tile_tissue(path, spot_diameter=224, mpp=mpp, min_tissue=0.0, library_id=sec)
        tiles = tiles[tiles.obs["tissue_fraction"].to_numpy() <= 0.05].copy()
        rng = np.random.default_rng(0)
        tiles = tiles[np.sort(rng.choice(tiles.n_obs, size=min(60, tiles.n_obs), replace=False))].copy()
        st.pp.extract_patches(tiles, patch_size=224, mpp=1.0, library_id=sec, progress=False)
        tiles.obs["section"] = sec
        parts.append(tiles)
    return ad.concat(parts, uns_merge="unique")


def _other_organ(st):
    """scikit-image's immunohistochemistry sample (human colon, haematoxylin + DAB) tiled into 224 px patches."""
    import anndata as ad
    import pandas as pd
    from skimage import data

    img = data.immunohistochemistry()
    starts = range(0, img.shape[0] - 224 + 1, 24)
    patches = np.stack([img[r : r + 224, c : c + 224] for r in starts for c in starts])
    coords = np.array([[c + 112, r + 112] for r in starts for c in starts], dtype=float)
    out = ad.AnnData(obs=pd.DataFrame({"section": "ihc"}, index=[f"ihc_{i}" for i in range(len(patches))]))
    out.obsm["patches"] = patches
    out.obsm["spatial"] = coords
    out.uns["patches"] = {"params": {"patch_size": 224, "mpp": 1.0}}
    return out


def _toy(st):
    toy = st.datasets.toy(n_sections=1, n_rows=20, n_cols=20, seed=3)
    st.pp.extract_patches(toy, patch_size=224, mpp=1.0, progress=False)
    return toy


def recommended(st, adata, seeds):
    """fit_recommended against knn and ridge_gcv (and dual_knn) with tl.benchmark, within C and across patients."""
    out = {}
    protocols = {
        "within_C": (adata[adata.obs["patient"] == "C"].copy(), {"groupby": "section"}),
        "C_to_B4": (adata, {"groupby": "patient", "folds": ["B"]}),
        "B4_to_C": (adata, {"groupby": "patient", "folds": ["C"]}),
    }
    for name, (data, kw) in protocols.items():
        res = st.tl.benchmark(
            data,
            methods=[],
            baselines=["recommended", "dual_knn", "knn", "ridge_gcv"],
            seeds=seeds,
            layer="targets",
            library_key="section",
            progress=False,
            **kw,
        )
        summ = res.summary[res.summary["fold"] == "all"].set_index("method")
        rows = {m: {k: float(summ.loc[m, f"{k}_mean"]) for k in ("pcc_all", "pcc_heg")} for m in summ.index}
        comp = {}
        for ref in ("knn", "ridge_gcv"):
            c = res.compare(ref)
            c = c[c["method"] == "recommended"]
            comp[ref] = {
                r.metric: {"mean_diff": r.mean_diff, "ci": [r.ci_low, r.ci_high], "wins": f"{r.wins}/{r.n}"}
                for r in c.itertuples()
            }
        out[name] = {"summary": rows, "recommended_vs": comp, "seconds": res.seconds}
        print(f"== recommended {name}: {rows}", flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=HERE.parents[1] / "shared" / "data" / "her2st")
    p.add_argument("--methods", default="dual_knn,ridge_gcv,bleep_ctx", help="models calibrated within patient C")
    p.add_argument("--seeds", type=int, default=3, help="seeds of the recommended-call benchmark")
    p.add_argument("--out", type=Path, default=HERE / "results" / "calibration.json")
    args = p.parse_args(argv)

    import sthist as st

    warnings.filterwarnings("ignore", category=st.tl.ShiftWarning)  # recorded per split below, not printed
    t0 = time.perf_counter()
    adata = st.datasets.her2st(args.root, sections=["B4", "C2", "C3", "C4"], progress=False)
    adata = adata[:, adata.var["genes_785"].to_numpy()].copy()
    st.pp.normalize_expression(adata, flavor="hist2st")
    st.pp.extract_patches(adata, patch_size=224, mpp=1.0, library_key="section", progress=False)
    st.pp.embed_patches(adata, progress=False)
    sec = adata.obs["section"].astype(str).to_numpy()
    results: dict = {"level": LEVEL, "splits": {}}

    def subset(names):
        return adata[np.isin(sec, names)].copy()

    methods = [m for m in args.methods.split(",") if m]
    for split, extra in (("within_C", []), ("within_C_with_B4", ["B4"])):
        results["splits"][split] = {}
        for method in methods:
            rows = {}
            for test in ("C2", "C3", "C4"):
                ref = subset([s for s in ("C2", "C3", "C4") if s != test] + extra)
                model = _fit(st, method, ref)
                rows[test] = evaluate(st, model, ref, subset([test]), groupby="section")
                print(f"== {split} {method} test {test}: {rows[test]}", flush=True)
            results["splits"][split][method] = rows
    # one section: spatial blocks of its left half, tested on its right half
    halves = {}
    toy = _toy(st)
    st.pp.normalize_expression(toy, flavor="log1p")
    for name in ("C2", "C3", "C4", "B4", "toy"):
        data = toy if name == "toy" else subset([name])
        if name != "toy":
            st.pp.embed_patches(data, progress=False)
        x = np.asarray(data.obsm["spatial"])[:, 0]
        left = x < np.median(x)
        ref, test = data[left].copy(), data[~left].copy()
        model = _fit(st, "dual_knn", ref)
        halves[name] = evaluate(st, model, ref, test, n_blocks=5)
        print(f"== half_section {name}: {halves[name]}", flush=True)
    results["splits"]["half_section"] = {"dual_knn": halves}
    # a new patient: expected to fail, with the warning
    across = {}
    for name, train, test in (("C_to_B4", ["C2", "C3", "C4"], ["B4"]), ("B4_to_C", ["B4"], ["C2", "C3", "C4"])):
        ref = subset(train)
        model = _fit(st, "dual_knn", ref)
        across[name] = evaluate(st, model, ref, subset(test), groupby="section" if len(train) > 1 else None)
        print(f"== {name}: {across[name]}", flush=True)
    results["splits"]["across_patients"] = {"dual_knn": across}
    # shift: the model calibrated on all of patient C
    ref = subset(["C2", "C3", "C4"])
    model = _fit(st, "dual_knn", ref)
    st.tl.calibrate(ref, model, groupby="section", progress=False)
    queries = {
        "background": _background(st, adata, args.root),
        "other_organ_ihc": _other_organ(st),
        "toy": _toy(st)[:, []].copy(),  # synthetic tissue; its genes are not the model's
    }
    shift = {}
    for name, data in queries.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            st.tl.predict_expression(data, model, library_key="section", progress=False)
        shift[name] = {
            "n_spots": int(data.n_obs),
            "fraction_flagged": float(np.mean(data.obs["predicted_ood"])),
            "slide_warning": any(issubclass(w.category, st.tl.ShiftWarning) for w in caught),
        }
        print(f"== shift {name}: {shift[name]}", flush=True)
    results["shift"] = shift
    results["recommended"] = recommended(st, adata, args.seeds)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    results["machine"] = {"python": platform.python_version(), "processor": platform.processor()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=float))
    print(f"wrote {args.out} in {results['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
