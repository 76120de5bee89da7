"""Every method and the controls (ridge, ridge_gcv, knn, dual_knn) on the her2st sections, with `sthist.tl.benchmark`.

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
comparison with the ridge probe, with the GCV ridge and with raw-feature kNN, the **fidelity** comparisons (each registered variant
against its method's published recipe, paired over folds, seeds and genes) and the tidy table, with the wall time
of each protocol and of the whole run.

The work can be split over processes with the same seeds and folds (results are identical to one run)::

    python benchmarks/her2st.py --methods nh2st --baselines "" --part /tmp/a.pkl --threads 1 &
    python benchmarks/her2st.py --methods bleep,bleep_es --part /tmp/b.pkl --threads 1 &
    wait; python benchmarks/her2st.py --merge /tmp/a.pkl /tmp/b.pkl
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path


def run_parts(args) -> tuple[dict, float]:
    """Run ``tl.benchmark`` on every protocol; returns ``{protocol: BenchmarkResult}`` and the preparation time."""
    import sthist as st

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
    methods = "all" if args.methods == "all" else [m for m in args.methods.split(",") if m]
    baselines = [b for b in args.baselines.split(",") if b]
    results = {}
    for name in args.protocols.split(","):
        data, kw = protocols[name]
        results[name] = st.tl.benchmark(
            data,
            methods=methods,
            baselines=baselines,
            seeds=int(args.seeds) if "," not in args.seeds else [int(v) for v in args.seeds.split(",") if v],
            layer="targets",
            library_key="section",
            encoder=args.encoder,
            fit_kwargs={"max_epochs": args.max_epochs} if args.max_epochs else None,
            # a part without the ridge probe compares with its first predictor; --merge compares with ridge again
            reference="ridge" if "ridge" in baselines or methods == "all" else [*methods, *baselines][0],
            progress=False,
            **kw,
        )
        print(f"== {name}: {results[name]}", flush=True)
    return results, prep_seconds


def merge(parts: list[dict]) -> dict:
    """One BenchmarkResult per protocol from the results of several processes (same folds, seeds and gene sets)."""
    import dataclasses

    import pandas as pd

    from sthist.tl._benchmark import _summary

    merged = {}
    for name in parts[0]:
        rs = [p[name] for p in parts if name in p]
        per_gene = {}
        for r in rs:
            shared = set(r.per_gene) & set(per_gene)
            if shared:
                raise ValueError(
                    f"{name}: (method, fold, seed) {sorted(shared)[:3]} are in more than one part; give each part "
                    "its own methods or its own seeds."
                )
            per_gene.update(r.per_gene)
        table = pd.concat([r.table for r in rs], ignore_index=True)
        # the summary is recomputed from all parts' rows: a method may be split over parts by seed
        metrics = list(dict.fromkeys(table["metric"]))
        wide = table.pivot_table(
            index=["method", "fold", "seed", "split"], columns="metric", values="value", sort=False
        )
        summary = _summary(wide.reset_index(), metrics)
        ref = "ridge" if any(m == "ridge" for m, _, _ in per_gene) else rs[0].reference
        res = dataclasses.replace(
            rs[0],
            table=table,
            summary=summary,
            per_gene=per_gene,
            reference=ref,
            seeds=sorted({seed for _, _, seed in per_gene}),
            seconds=sum(r.seconds for r in rs),
        )
        merged[name] = dataclasses.replace(res, comparison=res.compare(ref))
    return merged


def fidelity(res) -> list[dict]:
    """Each variant against its method's published recipe (paired over folds, seeds and genes)."""
    from sthist._engine.methods import METHODS

    variants = {name: cls.variant_of for name, cls in METHODS.items() if cls.variant_of}
    present = {m for m, _, _ in res.per_gene}
    rows = []
    for variant, original in variants.items():
        if variant in present and original in present:
            cmp = res.compare(original)
            rows += json.loads(cmp[cmp["method"] == variant].assign(recipe=original).to_json(orient="records"))
    return rows


#: Controls compared with every method besides the reference (when they are in the run).
CONTROLS = ("knn", "ridge_gcv")


def report(results: dict, prep_seconds: float, total_seconds: float, out: Path) -> None:
    import torch

    import sthist as st

    doc = {"preprocessing_seconds": prep_seconds, "protocols": {}}
    for name, res in results.items():
        overall = res.summary[res.summary["fold"] == "all"]
        print(f"== {name}: {res}")
        cols = ["method", "split", "pcc_all_mean", "pcc_all_std", "pcc_heg_mean", "pcc_heg_std", "gene_corr_mean"]
        print(overall[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        print(res.comparison.to_string(index=False, float_format=lambda v: f"{v:.4f}"), flush=True)
        present = {m for m, _, _ in res.per_gene}
        # the no-training controls every method must beat, besides the reference
        controls = {c: res.compare(c) for c in CONTROLS if c in present}
        for cmp in controls.values():
            print(cmp.to_string(index=False, float_format=lambda v: f"{v:.4f}"), flush=True)
        fid = fidelity(res)
        for row in fid:
            print(f"   fidelity {row['method']} vs {row['recipe']}: {row}")
        doc["protocols"][name] = {
            "seconds": res.seconds,
            "seeds": res.seeds,
            "reference": res.reference,
            "summary": json.loads(res.summary.to_json(orient="records")),
            "comparison": json.loads(res.comparison.to_json(orient="records")),
            **{
                f"comparison_vs_{c}": json.loads(controls[c].to_json(orient="records")) if c in controls else []
                for c in CONTROLS
            },
            "fidelity": fid,
            "table": json.loads(res.table.to_json(orient="records")),
        }
    doc["total_seconds"] = round(total_seconds, 1)
    doc["machine"] = {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "sthist": st.__version__,
    }
    doc["command"] = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    print(f"wrote {out} in {doc['total_seconds']} s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "her2st")
    p.add_argument("--methods", default="all", help="comma-separated methods (default: every contrastive method)")
    p.add_argument("--baselines", default="ridge,knn")
    p.add_argument(
        "--seeds", default="3", help='a number of seeds (0, 1, ...) or a comma-separated list of seeds (one seed: "2,")'
    )
    p.add_argument("--protocols", default="within_patient_C,C_to_B")
    p.add_argument("--patch-size", type=int, default=224)
    p.add_argument("--mpp", type=float, default=0.5)
    p.add_argument("--encoder", default="hed-texture")
    p.add_argument("--max-epochs", type=int, default=None, help="cap every method's training (default: its recipe)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--part", type=Path, default=None, help="pickle this process's results here instead of a report")
    p.add_argument("--merge", type=Path, nargs="+", default=None, help="report on the pickled results of --part runs")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/her2st_benchmark.json"))
    args = p.parse_args(argv)

    import pickle

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.merge:
        parts = [pickle.loads(path.read_bytes()) for path in args.merge]  # (results, prep s, wall s) per process
        results = merge([r for r, _, _ in parts])
        # the processes ran side by side: the wall time of the run is that of the slowest
        report(results, max(p[1] for p in parts), max(p[2] for p in parts), args.out)
        return 0
    results, prep_seconds = run_parts(args)
    if args.part is not None:
        args.part.write_bytes(pickle.dumps((results, prep_seconds, time.perf_counter() - t0)))
        print(f"wrote {args.part} in {time.perf_counter() - t0:.1f} s")
        return 0
    report(results, prep_seconds, time.perf_counter() - t0, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
