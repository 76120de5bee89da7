"""Benchmark: exact chunked retrieval against the approximate faiss IVF index on large reference banks.

Banks of ``--sizes`` spots (default 100,000 and 1,000,000) of 256-d clustered embeddings (like a trained joint
space: many cell-state clusters with spread), ``--queries`` query embeddings, top ``--k``. For each bank: the
exact chunked search (sthist's default) and ``index="faiss-ivf"`` at several ``n_probe`` (index build timed
separately from the search), recall@k of the approximate search against the exact one, and the peak resident
memory of the process. Run side by side in one process, so the ratios are comparable on a shared machine.

Usage::

    python benchmarks/retrieval.py [--sizes 100000 1000000] [--queries 5000] [--k 50] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def clustered(n: int, d: int, n_centres: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).normal(size=(n_centres, d)).astype(np.float32)
    out = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 100_000):  # in blocks: no float64 temporaries of the whole bank
        m = min(100_000, n - s)
        out[s : s + m] = centres[rng.integers(0, n_centres, m)] + 0.5 * rng.standard_normal((m, d), dtype=np.float32)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--queries", type=int, default=5000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--n-probe", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "retrieval.json")
    args = ap.parse_args()

    import faiss
    import torch

    from sthist._engine import bank

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    rows = []
    for n in args.sizes:
        keys = clustered(n, args.dim, 2000, seed=1)
        query = clustered(args.queries, args.dim, 2000, seed=2)
        t = time.perf_counter()
        _, exact = bank.topk_search(query, keys, args.k)
        t_exact = time.perf_counter() - t
        row = {"bank": n, "queries": args.queries, "exact_seconds": round(t_exact, 2), "faiss_ivf": []}
        t = time.perf_counter()
        fb = bank._FaissBank(keys, "cosine", torch.device("cpu"), n_probe=1)
        t_build = time.perf_counter() - t
        for n_probe in args.n_probe:
            fb.index.nprobe = min(n_probe, fb.n_list)
            t = time.perf_counter()
            _, approx = fb.search(torch.from_numpy(query), args.k)
            t_search = time.perf_counter() - t
            approx = approx.numpy()
            recall = float(np.mean([np.intersect1d(a, b).size / args.k for a, b in zip(exact, approx, strict=True)]))
            row["faiss_ivf"].append(
                {
                    "n_probe": n_probe,
                    "n_list": fb.n_list,
                    "build_seconds": round(t_build, 2),
                    "search_seconds": round(t_search, 2),
                    "recall_at_k": round(recall, 4),
                    "speedup_search_vs_exact": round(t_exact / t_search, 1),
                    "speedup_build_plus_search_vs_exact": round(t_exact / (t_build + t_search), 2),
                }
            )
        row["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        rows.append(row)
        print(json.dumps(row))
        del keys, fb
    out = {
        "benchmark": "retrieval",
        "dim": args.dim,
        "k": args.k,
        "threads": args.threads,
        "machine": {"platform": platform.platform(), "processor": platform.processor()},
        "faiss": faiss.__version__,
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
