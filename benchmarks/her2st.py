"""Accuracy, time and memory of every method on her2st sections under one protocol.

    python benchmarks/her2st.py --root ../shared/data/her2st --train C2,C3,C4 --test B4 \
        --methods bleep,ridge --out benchmarks/results/her2st.json

Protocol (the same for every method):
- genes: the 785-gene panel of the Hist2ST family (`genes_785.txt` in the root, or `--genes`);
- targets: log10(1 + 1e4 * x / library size over the panel) (`sthist.pp.normalize_expression(flavor="hist2st")`);
- patches: 224 px at 0.5 µm/px (112 µm, HEST's convention), features of the weight-free `hed-texture` encoder
  computed once and shared by all methods (the recommended offline CPU configuration);
- metrics: Pearson r per gene on each test section; `pcc_all` is its mean over the panel, `pcc_heg` / `pcc_hvg`
  over the top-50 highly expressed / highly variable genes chosen on the training sections; `gene_corr` is the
  correlation between the true and predicted gene-gene correlation matrices of the top-50 HEG genes;
- `seconds` is the wall time of fitting plus predicting, `peak_mb` the peak resident memory sampled during it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

import numpy as np


class PeakMemory:
    """Sample this process's resident memory in a thread; `.peak_mb` after the block."""

    def __init__(self, interval: float = 0.05):
        import psutil

        self._proc = psutil.Process()
        self.interval = interval
        self.peak = 0

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._stop = threading.Event()
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def peak_mb(self) -> float:
        return round(self.peak / 2**20, 1)


def all_methods() -> list[str]:
    from sthist._engine.methods import METHODS

    return [*METHODS, "ridge"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "her2st")
    p.add_argument("--train", default="C2,C3,C4", help="comma-separated training sections")
    p.add_argument("--test", default="B4", help="comma-separated test sections (each scored on its own)")
    p.add_argument("--methods", default=None, help="comma-separated; default: every method sthist has")
    p.add_argument("--genes", type=Path, default=None, help="gene panel file (default: ROOT/genes_785.txt)")
    p.add_argument("--patch-size", type=int, default=224)
    p.add_argument("--mpp", type=float, default=0.5)
    p.add_argument("--encoder", default="hed-texture")
    p.add_argument("--max-epochs", type=int, default=None, help="override the methods' default training length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/her2st.json"))
    args = p.parse_args(argv)

    import torch

    import sthist as st

    if args.threads:
        torch.set_num_threads(args.threads)
    train, test = args.train.split(","), args.test.split(",")
    methods = args.methods.split(",") if args.methods else all_methods()
    genes_file = args.genes or args.root / "genes_785.txt"

    t0 = time.perf_counter()
    adata = st.datasets.her2st(args.root, sections=list(dict.fromkeys(train + test)), progress=False)
    panel = [g.strip() for g in genes_file.read_text().split() if g.strip()]
    present = [g for g in panel if g in adata.var_names]
    adata = adata[:, present].copy()
    st.pp.normalize_expression(adata, flavor="hist2st")
    st.pp.extract_patches(adata, patch_size=args.patch_size, mpp=args.mpp, library_key="section", progress=False)
    st.pp.embed_patches(adata, encoder=args.encoder, progress=False)
    features_key = next(k for k in adata.obsm if k.startswith("X_"))
    prep_seconds = round(time.perf_counter() - t0, 2)

    is_train = adata.obs["section"].isin(train).to_numpy()
    ref = adata[is_train].copy()
    st.pp.select_genes(ref, flavor="heg", n_top=50, layer=None, key_added="heg")
    st.pp.select_genes(ref, flavor="hvg", n_top=50, layer=None, key_added="hvg")
    heg, hvg = list(ref.uns["heg"]["genes"]), list(ref.uns["hvg"]["genes"])

    results = []
    for method in methods:
        with PeakMemory() as mem:
            t1 = time.perf_counter()
            if method == "ridge":
                model = st.tl.fit_ridge(ref, features_key=features_key, layer="targets", random_state=args.seed)
                config = {"n_components": model.n_components, "alpha": model.alpha}
            else:
                kw = {"max_epochs": args.max_epochs} if args.max_epochs else {}
                model = st.tl.fit_contrastive(
                    ref,
                    method=method,
                    layer="targets",
                    features_key=features_key,
                    library_key="section",
                    random_state=args.seed,
                    progress=False,
                    **kw,
                )
                config = {
                    "method_config": model.config.get("method_config", {}),
                    "best_epoch": model.history["best_epoch"],
                }
            fit_seconds = time.perf_counter() - t1
            rows = []
            for section in test:
                t2 = time.perf_counter()
                q = adata[adata.obs["section"] == section].copy()
                st.tl.predict_expression(q, model, features_key=features_key, library_key="section", progress=False)
                st.tl.score_prediction(q, layer="predicted", true_layer="targets", key_added="s")
                r = q.var["s_pearson"]
                summary = q.uns["s"]["summary"]
                rows.append(
                    {
                        "method": method,
                        "test": section,
                        "pcc_all": round(float(np.nanmean(r.to_numpy())), 4),
                        "pcc_heg": round(float(np.nanmean(r[heg].to_numpy())), 4),
                        "pcc_hvg": round(float(np.nanmean(r[hvg].to_numpy())), 4),
                        "gene_corr": round(float(summary["gene_corr"]), 4),
                        "mse": round(float(summary["mse"]), 4),
                        "seconds": round(fit_seconds + time.perf_counter() - t2, 2),
                    }
                )
        for row in rows:
            row["peak_mb"] = mem.peak_mb
            row["config"] = {
                "train": train,
                "genes": f"{len(present)} of {genes_file.name}",
                "targets": "hist2st: log10(1 + 1e4 x / library over the panel)",
                "patches": {"patch_size": args.patch_size, "mpp": args.mpp},
                "encoder": args.encoder,
                "seed": args.seed,
                **config,
            }
            results.append(row)
            print(
                f"{row['method']:>10} test={row['test']}  pcc_all={row['pcc_all']:.3f}  pcc_heg={row['pcc_heg']:.3f}  "
                f"pcc_hvg={row['pcc_hvg']:.3f}  gene_corr={row['gene_corr']:.3f}  {row['seconds']:.1f} s  {row['peak_mb']:.0f} MB",
                flush=True,
            )

    doc = {
        "results": results,
        "preprocessing_seconds": prep_seconds,
        "heg": heg,
        "hvg": hvg,
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "sthist": st.__version__,
            "cuda": torch.cuda.is_available(),
        },
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
