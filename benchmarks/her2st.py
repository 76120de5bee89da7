"""Every method and both baselines on the her2st sections, with `sthist.tl.benchmark` (a thin script over it).

    python benchmarks/her2st.py --root ../shared/data/her2st --seeds 3 --threads 1

Two protocols on the four shared sections, each run by `sthist.tl.benchmark` (repeated seeds, gene sets chosen on
the training groups of each fold, per-section and pooled Pearson r, paired per-gene comparison with the ridge probe):

- ``within_patient_C``: leave one section out among C2, C3, C4 (serial sections of one patient: labelled
  "within patient");
- ``C_to_B``: train on patient C (C2, C3, C4), test on patient B (B4): generalisation to a new patient.

Preparation (the same for every method): the 785-gene panel of the Hist2ST family (`genes_785.txt` in the root);
targets log10(1 + 1e4 x / library size over the panel) (`normalize_expression(flavor="hist2st")`); 224 px patches
at 0.5 µm/px (112 µm, HEST's convention); features of the weight-free `hed-texture` encoder computed once.

Writes ``benchmarks/results/her2st_benchmark.json`` (or ``--out``): per protocol the summary, the paired
comparison with the ridge probe and with raw-feature kNN, and the tidy table, with the wall time of each protocol
and of the whole run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "her2st")
    p.add_argument("--methods", default="all", help="comma-separated methods (default: every contrastive method)")
    p.add_argument("--baselines", default="ridge,knn")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--protocols", default="within_patient_C,C_to_B")
    p.add_argument("--patch-size", type=int, default=224)
    p.add_argument("--mpp", type=float, default=0.5)
    p.add_argument("--encoder", default="hed-texture")
    p.add_argument("--max-epochs", type=int, default=None, help="cap every method's training (default: its recipe)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/her2st_benchmark.json"))
    args = p.parse_args(argv)

    import torch

    import sthist as st

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    adata = st.datasets.her2st(args.root, sections=["B4", "C2", "C3", "C4"], progress=False)
    panel = [g for g in (args.root / "genes_785.txt").read_text().split() if g in adata.var_names]
    adata = adata[:, panel].copy()
    st.pp.normalize_expression(adata, flavor="hist2st")
    st.pp.extract_patches(adata, patch_size=args.patch_size, mpp=args.mpp, library_key="section", progress=False)
    st.pp.embed_patches(adata, encoder=args.encoder, progress=False)
    prep_seconds = round(time.perf_counter() - t0, 1)

    protocols = {
        "within_patient_C": (adata[adata.obs["patient"] == "C"].copy(), {"groupby": "section"}),
        "C_to_B": (adata, {"groupby": "patient", "folds": ["B"]}),
    }
    methods = "all" if args.methods == "all" else args.methods.split(",")
    doc = {"preprocessing_seconds": prep_seconds, "protocols": {}}
    for name in args.protocols.split(","):
        data, kw = protocols[name]
        baselines = [b for b in args.baselines.split(",") if b]
        res = st.tl.benchmark(
            data,
            methods=methods,
            baselines=baselines,
            seeds=args.seeds,
            layer="targets",
            library_key="section",
            encoder=args.encoder,
            fit_kwargs={"max_epochs": args.max_epochs} if args.max_epochs else None,
            progress=False,
            **kw,
        )
        overall = res.summary[res.summary["fold"] == "all"]
        print(f"== {name}: {res}")
        cols = ["method", "split", "pcc_all_mean", "pcc_all_std", "pcc_heg_mean", "pcc_heg_std", "gene_corr_mean"]
        print(overall[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        print(res.comparison.to_string(index=False, float_format=lambda v: f"{v:.4f}"), flush=True)
        if "knn" in baselines:
            print(res.compare("knn").to_string(index=False, float_format=lambda v: f"{v:.4f}"), flush=True)
        doc["protocols"][name] = {
            "seconds": res.seconds,
            "seeds": res.seeds,
            "reference": res.reference,
            "summary": json.loads(res.summary.to_json(orient="records")),
            "comparison": json.loads(res.comparison.to_json(orient="records")),
            "comparison_vs_knn": json.loads(res.compare("knn").to_json(orient="records")) if "knn" in baselines else [],
            "table": json.loads(res.table.to_json(orient="records")),
        }
    doc["total_seconds"] = round(time.perf_counter() - t0, 1)
    doc["machine"] = {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "sthist": st.__version__,
    }
    doc["command"] = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    print(f"wrote {args.out} in {doc['total_seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
