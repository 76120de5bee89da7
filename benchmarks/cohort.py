"""Benchmark: a synthetic cohort from images to predictions with patches and embeddings on disk.

A cohort of ``--slides`` synthetic H&E-like slides (default 200), each a tiled JPEG TIFF written tile by tile from
a generator, with ``2,500`` spots on a 50 x 50 grid of 150 µm pitch (200 slides = 500,000 spots). Resolution:
slides are written at 2 µm/px and patches are 56 px at ``mpp=2.0``, i.e. the 112 µm field of HEST's 224 px at
0.5 µm/px, at a quarter of the pixels (the weight-free encoder's cost grows with the pixels per patch; use
``--mpp 1.0 --patch-size 112`` for a 1 µm/px cohort). The tissue is three smooth random fields (cellularity,
stroma, immune infiltrate) with wavelengths of 0.4-1.5 mm rendered with a Beer-Lambert H&E stain model
(haematoxylin dots whose size and density follow cellularity and infiltrate, eosin following stroma); 60 of the
200 genes follow the three fields at the spot centre (Poisson counts), so prediction accuracy is a meaningful
sanity figure. Slides are cached in ``--workdir`` and not timed.

For every size (``--sizes``, spots; slides = size / 2,500) a fresh subprocess runs
``extract_patches(store=..., n_jobs=--jobs)`` -> ``embed_patches(store=...)`` (hed-texture) ->
``normalize_expression`` -> ``fit_contrastive`` (BLEEP on the frozen features, ``--epochs`` epochs) on 80% of
the slides -> ``predict_expression`` on the other 20% (exact retrieval over the whole reference bank) ->
``score_prediction``, plus a ridge probe on the same features as a second accuracy figure. It reports per-stage
wall times, peak resident memory of the process (``ru_maxrss`` of ``RUSAGE_SELF``) and of the largest worker
process (``RUSAGE_CHILDREN``), the disk size of the stores, and the PCC. Stores are deleted after each size.

With ``--dask``, instead, the scale-out of extraction and embedding on a Dask cluster: a cohort of ``--dask-size``
spots runs ``extract_patches(store=..., client=...)`` -> ``embed_patches(store=..., client=...)`` on a
``LocalCluster`` of 1 and 2 single-threaded worker processes (``--dask-workers``), ``--repeats`` times each, after
one serial run (``client=None``) that is the reference: every run must give the same bytes. It reports the median
wall time per stage, the speed-up over one worker, and per worker process the peak resident memory
(``VmHWM``, read in the worker) and the largest RSS sampled every 0.2 s (psutil). Results:
``results/cohort_dask.json``.

Usage::

    python benchmarks/cohort.py [--sizes 10000 100000] [--workdir /tmp/sthist_cohort] [--jobs 2] [--threads 1]
    python benchmarks/cohort.py --dask [--dask-size 10000] [--dask-workers 1 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
TILE = 256
GRID = 50  # spots per side: 2,500 per slide
PITCH_UM = 150.0
MARGIN_UM = 150.0
N_GENES = 200
N_INFORMATIVE = 60
_H_OD = np.array([0.65, 0.70, 0.29], dtype=np.float32) * 1.6  # haematoxylin: blue-purple
_E_OD = np.array([0.07, 0.99, 0.11], dtype=np.float32) * 0.9  # eosin: pink


# ------------------------------------------------------------------------------------------------ the slides


def slide_fields(seed: int) -> list[dict]:
    """Three smooth fields per slide, each a sum of separable sinusoids (evaluated cheaply per tile)."""
    rng = np.random.default_rng(10_000 + seed)
    fields = []
    for _ in range(3):
        wl = rng.uniform(400.0, 1500.0, size=(3, 2))
        fields.append(
            {
                "kx": 2 * np.pi / wl[:, 0],
                "ky": 2 * np.pi / wl[:, 1],
                "px": rng.uniform(0, 2 * np.pi, 3),
                "py": rng.uniform(0, 2 * np.pi, 3),
                "a": rng.uniform(0.8, 1.6, 3),
                "b": rng.uniform(-0.5, 0.5),
            }
        )
    return fields


def eval_fields(fields: list[dict], x_um: np.ndarray, y_um: np.ndarray, *, grid: bool) -> list[np.ndarray]:
    """Field values in (0, 1): on the grid ``y_um x x_um`` (``grid=True``) or at points ``(x_um[i], y_um[i])``."""
    out = []
    for f in fields:
        u = np.sin(np.multiply.outer(x_um, f["kx"]) + f["px"]) * f["a"]  # (nx, 3)
        v = np.cos(np.multiply.outer(y_um, f["ky"]) + f["py"])  # (ny, 3)
        z = v @ u.T if grid else (u * v).sum(1)
        out.append(1.0 / (1.0 + np.exp(-(1.6 * z + f["b"]))))
    return [o.astype(np.float32) for o in out]


_NOISE = np.random.default_rng(0).normal(0.0, 0.04, size=(8, TILE, TILE, 1)).astype(np.float32)


def render_tile(fields: list[dict], ty: int, tx: int, mpp: float, H: int, W: int) -> np.ndarray:
    """One 256 x 256 tile of the H&E-like image (RGB uint8), a function of position only."""
    ys = (ty * TILE + np.arange(TILE)) * mpp
    xs = (tx * TILE + np.arange(TILE)) * mpp
    cell, stroma, immune = eval_fields(fields, xs, ys, grid=True)
    # nuclei: dots on a ~12 µm lattice, bigger and more of them with cellularity; immune: dense small dots
    dots = np.outer(np.sin(ys * 2 * np.pi / 12.0 + 0.3), np.sin(xs * 2 * np.pi / 13.0 + 1.1)).astype(np.float32)
    small = np.outer(np.sin(ys * 2 * np.pi / 7.0), np.sin(xs * 2 * np.pi / 7.5 + 0.7)).astype(np.float32)
    nuc = np.clip((dots - (1.0 - 1.3 * cell)) * 3.0, 0.0, 1.0)
    imm = np.clip((small - (1.0 - 1.1 * immune)) * 4.0, 0.0, 1.0)
    fibres = 0.6 + 0.4 * np.sin(np.add.outer(ys, 0.6 * xs) * 2 * np.pi / 25.0).astype(np.float32)
    h = 0.9 * nuc + 1.1 * imm + 0.05
    e = 0.1 + 0.8 * stroma * fibres
    od = h[..., None] * _H_OD + e[..., None] * _E_OD + _NOISE[(ty * 7 + tx * 3) % 8]
    rgb = np.clip(255.0 * np.exp(-od), 0, 255).astype(np.uint8)
    # tiles past the image edge are cropped by the writer's shape; keep them full-size here
    return rgb


def slide_geometry(mpp: float) -> tuple[int, np.ndarray]:
    """Image side (px) and spot centres (x, y) in px of every slide (the same grid on all slides)."""
    side_um = 2 * MARGIN_UM + (GRID - 1) * PITCH_UM
    side = int(np.ceil(side_um / mpp))
    r, c = np.divmod(np.arange(GRID * GRID), GRID)
    xy_um = np.stack([MARGIN_UM + c * PITCH_UM, MARGIN_UM + r * PITCH_UM], axis=1)
    return side, xy_um / mpp


def write_slide(path: Path, seed: int, mpp: float) -> None:
    import tifffile

    side, _ = slide_geometry(mpp)
    fields = slide_fields(seed)
    n = -(-side // TILE)

    def tiles():
        for ty in range(n):
            for tx in range(n):
                yield render_tile(fields, ty, tx, mpp, side, side)

    tmp = path.with_suffix(".part.tif")
    tifffile.imwrite(
        tmp,
        tiles(),
        shape=(side, side, 3),
        dtype=np.uint8,
        tile=(TILE, TILE),
        photometric="rgb",
        compression="jpeg",
        compressionargs={"level": 90},
    )
    tmp.rename(path)


def _write_one(args: tuple[str, int, float]) -> None:
    write_slide(Path(args[0]), args[1], args[2])


def ensure_slides(workdir: Path, n_slides: int, mpp: float, jobs: int) -> list[Path]:
    folder = workdir / f"slides_{mpp:g}um"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"slide_{i:03d}.tif" for i in range(n_slides)]
    todo = [(str(p), i, mpp) for i, p in enumerate(paths) if not p.exists()]
    if todo:
        import multiprocessing

        t = time.perf_counter()
        with multiprocessing.get_context("spawn").Pool(jobs) as pool:
            pool.map(_write_one, todo, chunksize=1)
        print(f"wrote {len(todo)} slides in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return paths


def expression(seed: int, xy_px: np.ndarray, mpp: float) -> np.ndarray:
    """Poisson counts (n_spots, N_GENES): the first N_INFORMATIVE genes follow the fields at the spot centre."""
    gene_rng = np.random.default_rng(7)  # the gene model is shared by all slides
    w = np.zeros((N_GENES, 3), dtype=np.float32)
    w[:N_INFORMATIVE] = gene_rng.normal(0.0, 1.5, size=(N_INFORMATIVE, 3))
    base = np.exp(gene_rng.normal(1.0, 1.0, size=N_GENES)).astype(np.float32)
    fields = eval_fields(slide_fields(seed), xy_px[:, 0] * mpp, xy_px[:, 1] * mpp, grid=False)
    f = np.stack(fields, axis=1) - 0.5  # (n, 3)
    rng = np.random.default_rng(20_000 + seed)
    lib = np.exp(rng.normal(0.0, 0.3, size=(len(xy_px), 1))).astype(np.float32)
    lam = base * np.exp(f @ w.T) * lib
    return rng.poisson(lam).astype(np.float32)


# ------------------------------------------------------------------------------------------------ one size


def build_adata(paths: list[Path], mpp: float):
    import anndata as ad
    import pandas as pd

    _, xy = slide_geometry(mpp)
    libs = [p.stem for p in paths]
    n = len(xy)
    X = np.empty((n * len(paths), N_GENES), dtype=np.float32)
    for i, _p in enumerate(paths):
        X[i * n : (i + 1) * n] = expression(i, xy, mpp)
    obs = pd.DataFrame(
        {"slide": pd.Categorical(np.repeat(libs, n), categories=libs)},
        index=[f"{lib}_{j}" for lib in libs for j in range(n)],
    )
    adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"g{g:03d}" for g in range(N_GENES)]))
    adata.obsm["spatial"] = np.tile(xy, (len(paths), 1))
    adata.uns["spatial"] = {
        lib: {"metadata": {"source_image_path": str(p)}, "scalefactors": {"microns_per_pixel": mpp}}
        for lib, p in zip(libs, paths, strict=True)
    }
    return adata


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def child(args: argparse.Namespace) -> dict:
    import resource

    import torch

    torch.set_num_threads(args.threads)
    import anndata  # noqa: F401
    import scanpy  # noqa: F401
    import zarr  # noqa: F401

    import sthist as st

    rss_base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    n_slides = args.size // (GRID * GRID)
    workdir = Path(args.workdir)
    paths = ensure_slides(workdir, n_slides, args.mpp, args.jobs)
    stores = {k: workdir / f"{k}_{args.size}.zarr" for k in ("patches", "embeddings")}
    times: dict[str, float] = {}
    peaks: dict[str, int] = {}  # peak RSS of the main process after each stage

    def timed(name, fn, *a, **kw):
        t = time.perf_counter()
        out = fn(*a, **kw)
        times[name] = round(time.perf_counter() - t, 2)
        peaks[name] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(f"  {args.size}: {name} {times[name]} s", file=sys.stderr, flush=True)
        return out

    adata = timed("build_adata", build_adata, paths, args.mpp)
    timed(
        "extract_patches",
        st.pp.extract_patches,
        adata,
        patch_size=args.patch_size,
        mpp=args.mpp,
        library_key="slide",
        store=stores["patches"],
        overwrite=True,
        n_jobs=args.jobs,
        progress=False,
    )
    timed(
        "embed_patches",
        st.pp.embed_patches,
        adata,
        encoder="hed-texture",
        store=stores["embeddings"],
        overwrite=True,
        progress=False,
    )
    timed("normalize_expression", st.pp.normalize_expression, adata)
    n_test = max(1, round(0.2 * n_slides))  # the last 20% of the slides (at least one) are held out
    test_slides = {p.stem for p in paths[n_slides - n_test :]}
    is_test = adata.obs["slide"].astype(str).isin(test_slides).to_numpy()
    ref, query = adata[~is_test].copy(), adata[is_test].copy()
    del adata
    model = timed(
        "fit_contrastive",
        st.tl.fit_contrastive,
        ref,
        method="bleep",
        layer="targets",
        features_key="X_hed_texture",
        max_epochs=args.epochs,
        early_stopping_patience=None,
        random_state=0,
        device="cpu",
        progress=False,
    )
    timed(
        "predict_expression",
        st.tl.predict_expression,
        query,
        model,
        features_key="X_hed_texture",
        device="cpu",
        progress=False,
    )
    table = timed(
        "score_prediction", st.tl.score_prediction, query, layer="predicted", true_layer="targets", inplace=False
    )
    pipeline_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # images -> predictions -> scores
    ridge_pcc = None
    if args.ridge:  # a second accuracy figure, after the pipeline's peak was taken
        ridge = timed("fit_ridge", st.tl.fit_ridge, ref, features_key="X_hed_texture", layer="targets")
        query.layers["ridge"] = np.full(query.shape, np.nan, dtype=np.float32)
        cols = query.var_names.get_indexer(ridge.genes)
        query.layers["ridge"][:, cols] = ridge.predict(features=np.asarray(query.obsm["X_hed_texture"])).expression
        ridge_table = st.tl.score_prediction(query, layer="ridge", true_layer="targets", inplace=False)
        ridge_pcc = float(ridge_table.loc["all", "pcc_all"])
    informative = [f"g{g:03d}" for g in range(N_INFORMATIVE)]
    table_inf = st.tl.score_prediction(query, layer="predicted", true_layer="targets", genes=informative, inplace=False)
    self_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    children_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    disk = {k: du(v) for k, v in stores.items()}
    result = {
        "n_spots": int(args.size),
        "n_slides": n_slides,
        "n_reference_spots": int(ref.n_obs),
        "n_query_spots": int(query.n_obs),
        "seconds": times,
        "seconds_images_to_predictions": round(
            sum(times[k] for k in ("extract_patches", "embed_patches", "fit_contrastive", "predict_expression")), 2
        ),
        "peak_rss_main_bytes": int(self_peak),
        "peak_rss_main_images_to_predictions_bytes": int(pipeline_peak),
        "peak_rss_main_after_stage_bytes": peaks,
        "peak_rss_largest_worker_bytes": int(children_peak),
        "peak_rss_bound_bytes": int(self_peak + args.jobs * children_peak),
        "rss_after_imports_bytes": int(rss_base),
        "store_bytes": disk,
        "patches_uncompressed_bytes": int(args.size * args.patch_size**2 * 3),
        "pcc_all_bleep": float(table.loc["all", "pcc_all"]),
        "pcc_informative_genes_bleep": float(table_inf.loc["all", "pcc_all"]),
        "pcc_all_ridge": ridge_pcc,
        "pcc_hvg_bleep": float(table.loc["all", "pcc_hvg"]),
    }
    for p in stores.values():
        shutil.rmtree(p, ignore_errors=True)
    return result


# ------------------------------------------------------------------------------------------------ dask scale-out


def _worker_peak() -> int:
    """Peak resident memory of this (worker) process in bytes: ``VmHWM`` of its own address space.

    Not ``ru_maxrss``: a worker is spawned by fork + exec, and Linux carries the forking process's peak into the
    child's ``ru_maxrss``; ``VmHWM`` starts afresh at ``exec``.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _worker_warm_up() -> int:
    """Import what the tasks import, so that the timed runs do not pay for it; return the worker's pid."""
    import sthist.pp  # noqa: F401
    from sthist._engine.encoders import build_image_encoder  # noqa: F401 - torch

    return os.getpid()


class _RssSampler:
    """The largest RSS of some processes (by pid), sampled every ``interval`` seconds in a thread."""

    def __init__(self, pids: dict[str, int], interval: float = 0.2):
        import threading

        import psutil

        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.peak = dict.fromkeys(pids, 0)
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, proc in self.procs.items():
                try:
                    self.peak[name] = max(self.peak[name], proc.memory_info().rss)
                except Exception:  # a worker that is restarting
                    pass
            self._stop.wait(self.interval)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _dask_runs(args, env: str, run, ref_patches, ref_emb) -> list[dict]:
    """``--repeats`` timed runs on a local cluster of each of ``--dask-workers`` sizes (``env``: sthist's or dask's
    default worker environment), interleaved (1, 2, 1, 2, ...) so that load from other processes hits every size
    alike. Also the CPU seconds the workers got per run, and the load average."""
    import contextlib
    import statistics

    import psutil
    from distributed import Client, LocalCluster

    from sthist._dask import local_client

    @contextlib.contextmanager
    def default_env_client(n):
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster, set_as_default=False)
        try:
            yield client
        finally:
            client.close()
            cluster.close()

    def cpu(procs) -> float:
        return sum(sum(p.cpu_times()[:2]) for p in procs)

    with contextlib.ExitStack() as stack:
        clusters = {}
        for k in args.dask_workers:
            t = time.perf_counter()
            client = stack.enter_context((local_client if env == "sthist" else default_env_client)(k))
            pids = client.run(_worker_warm_up)
            clusters[k] = {
                "client": client,
                "pids": pids,
                "procs": [psutil.Process(pid) for pid in pids.values()],
                "startup": time.perf_counter() - t,
                "warm_peak": client.run(_worker_peak),
                "times": {"extract_patches": [], "embed_patches": [], "total": []},
                "cpu": [],
                "load": [],
                "identical": True,
                "sampler": stack.enter_context(_RssSampler(pids)),
            }
        for r in range(args.repeats):
            for k, c in clusters.items():
                c["load"].append(round(os.getloadavg()[0], 2))
                before = cpu(c["procs"])
                seconds, patches, emb = run(c["client"], f"w{k}")
                c["cpu"].append(round(cpu(c["procs"]) - before, 2))
                c["identical"] &= bool(np.array_equal(patches, ref_patches) and np.array_equal(emb, ref_emb))
                for name, v in seconds.items():
                    c["times"][name].append(round(v, 2))
                print(f"  {env}: {k} worker(s), repeat {r + 1}: {seconds}", file=sys.stderr, flush=True)
        out = []
        for k, c in clusters.items():
            peak = c["client"].run(_worker_peak)
            out.append(
                {
                    "workers": k,
                    "worker_env": env,
                    "cluster_startup_seconds": round(c["startup"], 2),
                    "seconds": c["times"],
                    "median_seconds": {name: round(statistics.median(v), 2) for name, v in c["times"].items()},
                    "worker_cpu_seconds": c["cpu"],
                    "load_average_1min_at_start": c["load"],
                    "identical_to_serial": c["identical"],
                    "peak_rss_per_worker_bytes": sorted(int(v) for v in peak.values()),
                    "peak_rss_per_worker_after_warm_up_bytes": sorted(int(v) for v in c["warm_peak"].values()),
                    "max_sampled_rss_per_worker_bytes": sorted(int(v) for v in c["sampler"].peak.values()),
                }
            )
    return out


def dask_scaling(args: argparse.Namespace) -> dict:
    """Extraction and embedding of one cohort serially and on LocalClusters of ``--dask-workers`` workers."""
    import resource

    import torch

    import sthist as st

    torch.set_num_threads(1)
    if args.dask_size % (GRID * GRID):
        raise SystemExit(f"--dask-size must be a multiple of {GRID * GRID} spots, got {args.dask_size}.")
    n_slides = args.dask_size // (GRID * GRID)
    workdir = Path(args.workdir)
    paths = ensure_slides(workdir, n_slides, args.mpp, args.jobs)
    base = build_adata(paths, args.mpp)
    kw = {"patch_size": args.patch_size, "mpp": args.mpp, "library_key": "slide", "progress": False}

    def run(client, tag: str) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
        adata = base.copy()
        stores = {k: workdir / f"dask_{k}_{tag}.zarr" for k in ("patches", "embeddings")}
        t0 = time.perf_counter()
        st.pp.extract_patches(adata, store=stores["patches"], overwrite=True, client=client, **kw)
        t1 = time.perf_counter()
        st.pp.embed_patches(
            adata, encoder=args.encoder, store=stores["embeddings"], overwrite=True, client=client, progress=False
        )
        t2 = time.perf_counter()
        patches = np.asarray(adata.obsm["patches"])
        emb = np.asarray(adata.obsm[st.pp._embed.default_key(args.encoder)])
        for p in stores.values():
            shutil.rmtree(p, ignore_errors=True)
        seconds = {"extract_patches": t1 - t0, "embed_patches": t2 - t1, "total": t2 - t0}
        return seconds, patches, emb

    print(f"serial reference ({args.dask_size} spots, {n_slides} slides)", file=sys.stderr, flush=True)
    serial_seconds, ref_patches, ref_emb = run(None, "serial")
    serial_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    runs = []
    envs = ["sthist"] + (["dask default"] if args.compare_default_env else [])
    for env in envs:
        runs += _dask_runs(args, env, run, ref_patches, ref_emb)
    for env in envs:
        one = next((r for r in runs if r["workers"] == 1 and r["worker_env"] == env), None)
        for r in runs:
            if one is not None and r["worker_env"] == env:
                r["speed_up_over_1_worker"] = {
                    name: round(one["median_seconds"][name] / r["median_seconds"][name], 2)
                    for name in one["median_seconds"]
                }
    return {
        "benchmark": "cohort on dask: extract_patches + embed_patches with client=, LocalCluster of 1 and 2 workers",
        "settings": {
            "n_spots": int(args.dask_size),
            "n_slides": n_slides,
            "spots_per_slide": GRID * GRID,
            "mpp": args.mpp,
            "patch_size": args.patch_size,
            "encoder": args.encoder,
            "repeats": args.repeats,
            "worker": (
                "sthist._dask.local_client(k) (what n_jobs=k starts): LocalCluster(n_workers=k, threads_per_worker=1, "
                "processes=True) without dask's MALLOC_TRIM_THRESHOLD_; 'dask default': the same with dask's "
                "default worker environment; warm-up imports not timed"
            ),
            "tasks": "extraction: one slide per task; embedding: one block of 512 rows per task",
            "slide_format": "tiled (256 px) JPEG TIFF, quality 90",
        },
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "note": "a shared machine: other processes may run at the same time (see load_average_1min_at_start)",
        },
        "serial": {
            "seconds": {name: round(v, 2) for name, v in serial_seconds.items()},
            "peak_rss_main_bytes": int(serial_peak),
        },
        "runs": runs,
    }


# ------------------------------------------------------------------------------------------------ driver


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="spots (multiples of 2,500)")
    ap.add_argument("--workdir", default="/tmp/sthist_cohort")
    ap.add_argument("--jobs", type=int, default=2, help="extraction processes (n_jobs)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--mpp", type=float, default=2.0, help="µm per pixel of the slides and the patches")
    ap.add_argument("--patch-size", type=int, default=56)
    ap.add_argument("--no-ridge", dest="ridge", action="store_false", help="skip the ridge probe (extra memory)")
    ap.add_argument("--out", default=str(HERE / "results" / "cohort.json"))
    ap.add_argument("--dask", action="store_true", help="measure extraction + embedding on LocalClusters instead")
    ap.add_argument("--dask-size", type=int, default=10_000, help="spots of the --dask cohort")
    ap.add_argument("--dask-workers", type=int, nargs="+", default=[1, 2], help="worker processes per cluster")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per cluster (--dask); the median is reported")
    ap.add_argument("--encoder", default="hed-texture", help="encoder of the --dask runs")
    ap.add_argument(
        "--compare-default-env", action="store_true", help="--dask: also run workers with dask's default environment"
    )
    ap.add_argument("--dask-out", default=str(HERE / "results" / "cohort_dask.json"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    if args.dask:
        result = dask_scaling(args)
        print(json.dumps(result, indent=1))
        out = Path(args.dask_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        return
    for size in args.sizes:
        if size % (GRID * GRID):
            raise SystemExit(f"--sizes must be multiples of {GRID * GRID} spots, got {size}.")
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    runs = {int(r["n_spots"]): r for r in results.get("runs", [])}
    for size in args.sizes:
        cmd = [sys.executable, __file__, "--child", "--size", str(size), "--workdir", args.workdir]
        cmd += ["--jobs", str(args.jobs), "--threads", str(args.threads), "--epochs", str(args.epochs)]
        cmd += ["--mpp", str(args.mpp), "--patch-size", str(args.patch_size)] + ([] if args.ridge else ["--no-ridge"])
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        sys.stderr.write(proc.stderr[-4000:])
        if proc.returncode != 0:
            raise SystemExit(f"size {size} failed")
        run = json.loads(proc.stdout.strip().splitlines()[-1])
        run["wall_seconds_subprocess"] = round(time.perf_counter() - t, 1)
        runs[size] = run
        print(json.dumps(run, indent=1))
        sizes = sorted(runs)
        results = {
            "benchmark": "cohort: images -> predictions with patches and embeddings in zarr stores",
            "settings": {
                "spots_per_slide": GRID * GRID,
                "pitch_um": PITCH_UM,
                "mpp": args.mpp,
                "patch_size": args.patch_size,
                "field_um": args.patch_size * args.mpp,
                "encoder": "hed-texture",
                "method": "bleep (frozen features)",
                "epochs": args.epochs,
                "n_jobs": args.jobs,
                "torch_threads": args.threads,
                "genes": N_GENES,
                "informative_genes": N_INFORMATIVE,
                "split": "last 20% of the slides held out (at least one)",
                "slide_format": "tiled (256 px) JPEG TIFF, quality 90",
            },
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
            "runs": [runs[s] for s in sizes],
            "scaling": {
                stage: {str(s): runs[s]["seconds"].get(stage) for s in sizes}
                for stage in ("extract_patches", "embed_patches", "fit_contrastive", "predict_expression")
            },
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
