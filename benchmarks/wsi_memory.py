"""Benchmark: peak memory and time of whole-slide prediction (`tile_tissue` + `predict_slide`).

Writes a synthetic ``--size`` x ``--size`` px (default 100,000) pyramidal JPEG OME-TIFF at 0.5 µm/px, 256 px tiles,
pyramid levels in SubIFDs, tile by tile from a generator (never in memory: uncompressed it would be 30 GB). Its
tissue is four large textured ellipses covering ~20 % of the slide, so that 112 µm pseudo-spots (224 px) number
about 40,000. The slide is cached in ``--workdir`` and reused by later runs.

A BLEEP model is fitted on toy data (224 px patches at 0.5 µm/px, frozen ``hed-texture`` features) and saved.
Then, in a fresh subprocess with ``torch.set_num_threads(1)``, ``sthist.pp.tile_tissue`` and
``sthist.tl.predict_slide`` run on the slide; the subprocess reports its peak resident memory (``ru_maxrss``),
its resident memory after the imports (the baseline), the wall time of each stage (tiling, patch extraction,
encoding, prediction) and the number of pseudo-spots. Target: peak under 4 GB.

Usage::

    python benchmarks/wsi_memory.py [--size 100000] [--workdir /tmp/sthist_wsi_bench] [--chunk-size 2048]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
TILE = 256
MPP = 0.5  # µm per pixel of level 0: 112 µm pseudo-spots are 224 px, the toy model's patch footprint
WHITE = 244


def blobs(size: int) -> np.ndarray:
    """Four ellipses (cx, cy, a, b) in level-0 px covering ~20 % of a ``size`` x ``size`` slide."""
    a, b = 0.150 * size, 0.106 * size  # 4 * pi * a * b = 0.1998 * size**2
    q = 0.25 * size
    return np.array([[q, q, a, b], [3 * q, q, b, a], [q, 3 * q, b, a], [3 * q, 3 * q, a, b]], dtype=np.float64)


def _textures(n: int = 8) -> list[np.ndarray]:
    """A few pink/purple H&E-like texture tiles (nuclei-like dots on stroma), drawn once."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:TILE, 0:TILE].astype(np.float32)
    out = []
    for i in range(n):
        nuclei = np.clip(np.sin((x + 13 * i) / (5 + i % 3)) * np.sin((y + 7 * i) / (6 + i % 4)), 0, None) ** 2
        fibres = 0.5 + 0.5 * np.sin((x + 2 * y) / (40 + 5 * i))
        noise = rng.normal(0.0, 4.0, (TILE, TILE)).astype(np.float32)
        r = 225 + 10 * fibres - 80 * nuclei + noise
        g = 150 + 40 * fibres - 100 * nuclei + noise
        b = 205 + 10 * fibres - 40 * nuclei + noise
        out.append(np.clip(np.stack([r, g, b], axis=-1), 0, 255).astype(np.uint8))
    return out


def write_slide(path: Path, size: int) -> dict:
    """Write the pyramidal JPEG OME-TIFF tile by tile; returns timing, levels and file size."""
    import tifffile

    ellipses = blobs(size)
    cx, cy, ax, ay = ellipses.T
    boxes = np.column_stack([cx - ax, cx + ax, cy - ay, cy + ay])
    textures = _textures()
    white = np.full((TILE, TILE, 3), WHITE, dtype=np.uint8)
    n_levels = 1
    while size // 2**n_levels >= 2 * TILE:
        n_levels += 1
    counts = {"tissue_tiles": 0, "background_tiles": 0}

    def tile(level: int, ty: int, tx: int) -> np.ndarray:
        f = 2**level
        x0, y0 = tx * TILE * f, ty * TILE * f
        x1, y1 = x0 + TILE * f, y0 + TILE * f
        hit = (boxes[:, 0] < x1) & (boxes[:, 1] > x0) & (boxes[:, 2] < y1) & (boxes[:, 3] > y0)
        if not hit.any():
            counts["background_tiles"] += 1
            return white
        xs = x0 + (np.arange(TILE, dtype=np.float64) + 0.5) * f - 0.5
        ys = y0 + (np.arange(TILE, dtype=np.float64) + 0.5) * f - 0.5
        inside = np.zeros((TILE, TILE), dtype=bool)
        for cx, cy, a, b in ellipses[hit]:
            inside |= (((xs[None, :] - cx) / a) ** 2 + ((ys[:, None] - cy) / b) ** 2) <= 1
        if not inside.any():
            counts["background_tiles"] += 1
            return white
        counts["tissue_tiles"] += 1
        tex = textures[(ty * 7919 + tx * 104729 + level) % len(textures)]
        return np.where(inside[..., None], tex, white)

    def tiles(level: int):
        n = -(-(size // 2**level) // TILE)
        for ty in range(n):
            for tx in range(n):
                yield tile(level, ty, tx)

    t = time.perf_counter()
    opts = {
        "tile": (TILE, TILE),
        "compression": "jpeg",
        "compressionargs": {"level": 85},
        "photometric": "rgb",
        "dtype": np.uint8,
    }
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tw:
        tw.write(
            tiles(0),
            shape=(size, size, 3),
            subifds=n_levels - 1,
            metadata={"axes": "YXS", "PhysicalSizeX": MPP, "PhysicalSizeY": MPP},
            **opts,
        )
        for level in range(1, n_levels):
            s = size // 2**level
            tw.write(tiles(level), shape=(s, s, 3), subfiletype=1, **opts)
    return {
        "write_seconds": time.perf_counter() - t,
        "levels": n_levels,
        "file_bytes": path.stat().st_size,
        **counts,
    }


def fit_model(model_dir: Path, encoder: str = "hed-texture") -> dict:
    """A BLEEP model on toy data with 224 px patches at 0.5 µm/px and frozen ``encoder`` features."""
    import torch

    import sthist as st

    torch.set_num_threads(1)
    t = time.perf_counter()
    adata = st.datasets.toy(n_rows=12, n_cols=12, n_genes=50, seed=0)
    st.pp.extract_patches(adata, patch_size=224, mpp=MPP, progress=False)
    st.pp.normalize_expression(adata)
    model = st.tl.fit_contrastive(adata, layer="targets", encoder=encoder, max_epochs=20, progress=False, device="cpu")
    model.save(model_dir, overwrite=True)
    return {
        "method": model.method,
        "encoder": encoder,
        "n_genes": len(model.genes),
        "n_bank": int(model.bank_embeddings.shape[0]),
        "fit_seconds": time.perf_counter() - t,
    }


CHILD = r"""
import json, resource, sys, time, warnings
warnings.filterwarnings("ignore")
import numpy as np, psutil, torch
torch.set_num_threads(1)
import anndata, scanpy, tifffile, zarr  # noqa: F401  (loaded before the baseline)
import sthist
import sthist._engine.encoders as encoders
import sthist.tl._slide as slide_mod
from sthist.tl._utils import load_model

import threading

path, model_dir, chunk_size = sys.argv[1], sys.argv[2], int(sys.argv[3])
proc = psutil.Process()
model = load_model(model_dir)
base_rss = proc.memory_info().rss
base_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

# a sampler records the largest resident memory seen during each stage (every 50 ms)
stage = ["imports"]
stage_peak = {}
done = threading.Event()
def sample():
    while not done.is_set():
        rss = proc.memory_info().rss
        stage_peak[stage[0]] = max(stage_peak.get(stage[0], 0), rss)
        done.wait(0.05)
threading.Thread(target=sample, daemon=True).start()

stages = {"extract_seconds": 0.0, "encode_seconds": 0.0, "predict_seconds": 0.0}
def timed(fn, key):
    def wrapper(*a, **kw):
        previous, stage[0] = stage[0], key.replace("_seconds", "")
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            stages[key] += time.perf_counter() - t
            stage[0] = previous
    return wrapper
slide_mod.extract_patches = timed(slide_mod.extract_patches, "extract_seconds")
encoders.encode_patches = timed(encoders.encode_patches, "encode_seconds")
slide_mod.predict_expression = timed(slide_mod.predict_expression, "predict_seconds")

stage[0] = "tile_tissue"
t = time.perf_counter()
tiles = sthist.pp.tile_tissue(path)
tile_seconds = time.perf_counter() - t
peak_after_tiling = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
n_tiles = tiles.n_obs
params = dict(tiles.uns["tile_tissue"]["params"])
del tiles

stage[0] = "predict_slide_other"  # tiling inside predict_slide, bookkeeping
t = time.perf_counter()
pred = sthist.tl.predict_slide(path, model, chunk_size=chunk_size, progress=False, device="cpu")
predict_slide_seconds = time.perf_counter() - t
done.set()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({
    "n_pseudo_spots": int(pred.n_obs), "n_pseudo_spots_tile_tissue": int(n_tiles), "n_genes": int(pred.n_vars),
    "predictions_finite": bool(np.isfinite(pred.X).all()),
    "tile_tissue_seconds": tile_seconds, "predict_slide_seconds": predict_slide_seconds,
    "predict_slide_stages": stages,
    "peak_rss_bytes": int(peak), "peak_rss_after_tile_tissue_bytes": int(peak_after_tiling),
    "baseline_rss_bytes": int(base_rss), "peak_rss_before_work_bytes": int(base_peak),
    "rss_after_bytes": int(proc.memory_info().rss),
    "sampled_peak_rss_bytes_by_stage": {k: int(v) for k, v in stage_peak.items()},
    "output_X_bytes": int(pred.X.nbytes), "features_bytes": int(next(v for k, v in pred.obsm.items() if k.startswith("X_")).nbytes),
    "tile_tissue_params": {k: (v if isinstance(v, (str, int, float, bool, list)) else str(v)) for k, v in params.items()},
}))
"""


def run_child(path: Path, model_dir: Path, chunk_size: int) -> dict:
    cmd = [sys.executable, "-c", CHILD, str(path), str(model_dir), str(chunk_size)]
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        sys.exit(f"child failed:\n{res.stderr}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["process_seconds"] = time.perf_counter() - t
    out["chunk_size"] = chunk_size
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=100_000)
    p.add_argument("--chunk-size", type=int, default=2048)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/sthist_wsi_bench"))
    p.add_argument("--write-only", action="store_true", help="only write (cache) the synthetic slide")
    p.add_argument("--encoder", default="hed-texture", help="the frozen encoder of the model (e.g. hed-fast)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "wsi_memory.json")
    args = p.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    path = args.workdir / f"synthetic_wsi_{args.size}.ome.tif"
    write_info: dict = {"reused": path.exists()}
    if not path.exists():
        print(f"writing {path} ({args.size} x {args.size} px, {TILE} px JPEG tiles) ...", flush=True)
        tmp = path.with_suffix(".partial.tif")
        write_info.update(write_slide(tmp, args.size))
        tmp.rename(path)
        print(f"  {write_info['write_seconds']:.0f} s, {write_info['file_bytes'] / 2**20:.0f} MiB", flush=True)
    else:
        write_info["file_bytes"] = path.stat().st_size
    if args.write_only:
        return

    model_dir = args.workdir / f"toy_bleep_224px_0.5mpp_{args.encoder}"
    print(f"fitting a BLEEP model on toy data ({args.encoder} features) ...", flush=True)
    model_info = fit_model(model_dir, args.encoder)

    print(f"tile_tissue + predict_slide(chunk_size={args.chunk_size}) in a subprocess ...", flush=True)
    run = run_child(path, model_dir, args.chunk_size)
    print(
        f"  {run['n_pseudo_spots']} pseudo-spots, peak RSS {run['peak_rss_bytes'] / 2**20:.0f} MiB (baseline "
        f"{run['baseline_rss_bytes'] / 2**20:.0f} MiB), tile_tissue {run['tile_tissue_seconds']:.0f} s, "
        f"predict_slide {run['predict_slide_seconds']:.0f} s {run['predict_slide_stages']}",
        flush=True,
    )
    ellipses = blobs(args.size)
    tissue_px = float(np.pi * (ellipses[:, 2] * ellipses[:, 3]).sum())
    spot_px = 112 / MPP
    result = {
        "benchmark": "wsi_memory",
        "image": {
            "size_px": [args.size, args.size],
            "tile": TILE,
            "compression": "jpeg",
            "mpp": MPP,
            "uncompressed_bytes": args.size * args.size * 3,
            "level0_tiles": math.ceil(args.size / TILE) ** 2,
            "tissue_fraction": tissue_px / args.size**2,
            "expected_pseudo_spots": tissue_px / spot_px**2,
            **write_info,
        },
        "model": model_info,
        "run": run,
        "target_peak_rss_bytes": 4 * 2**30,
        "meets_target": run["peak_rss_bytes"] < 4 * 2**30,
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "torch_threads": 1,
            "platform": platform.platform(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
