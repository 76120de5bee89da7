"""Benchmark: peak memory and time of patch extraction from a gigapixel tiled pyramidal TIFF.

Writes a synthetic ``--size`` x ``--size`` px (default 40,000) RGB OME-TIFF with 256 px tiles (JPEG by default)
and a pyramid in SubIFDs, tile by tile from a generator, so the slide is never held in memory (uncompressed it
would be 4.8 GB). Then runs ``sthist.pp.extract_patches`` for ``--spots`` random spots in a fresh subprocess
and reports that process's peak resident memory (``ru_maxrss``), its resident memory after the imports (the
baseline), wall time and how many blocks were decoded. Target: peak under 1 GB.

Usage::

    python benchmarks/large_tiff_memory.py [--size 40000] [--spots 2000] [--workdir /tmp/sthist_bench]
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
SOURCE_MPP = 0.25  # written into the OME metadata; the mpp=0.5 run resamples 2x


def synthetic_tile(level: int, ty: int, tx: int, tile: int = TILE) -> np.ndarray:
    """A pink-purple H&E-like texture as a function of level-0 position (pyramid levels are consistent)."""
    f = 2**level
    y = (ty * tile + np.arange(tile, dtype=np.float32))[:, None] * f
    x = (tx * tile + np.arange(tile, dtype=np.float32))[None, :] * f
    nuclei = np.sin(x / 23.0) * np.sin(y / 29.0) + 0.5 * np.sin((x + 2 * y) / 97.0)
    stroma = 0.5 + 0.5 * np.sin(x / 800.0 + np.cos(y / 650.0))
    rng = np.random.default_rng(level * 1_000_003 + ty * 4_099 + tx)
    noise = rng.normal(0.0, 6.0, (tile, tile)).astype(np.float32)
    r = 215 + 25 * stroma - 60 * np.clip(nuclei, 0, None) + noise
    g = 150 + 60 * stroma - 90 * np.clip(nuclei, 0, None) + noise
    b = 200 + 20 * stroma - 30 * np.clip(nuclei, 0, None) + noise
    return np.clip(np.stack([r, g, b], axis=-1), 0, 255).astype(np.uint8)


def write_slide(path: Path, size: int, compression: str) -> dict:
    import tifffile

    n_levels = 1
    while size // 2**n_levels >= 2 * TILE:
        n_levels += 1
    t = time.perf_counter()

    def tiles(level: int):
        n = -(-(size // 2**level) // TILE)
        for ty in range(n):
            for tx in range(n):
                yield synthetic_tile(level, ty, tx)

    opts = {"tile": (TILE, TILE), "compression": compression, "photometric": "rgb", "dtype": np.uint8}
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tw:
        tw.write(
            tiles(0),
            shape=(size, size, 3),
            subifds=n_levels - 1,
            metadata={"axes": "YXS", "PhysicalSizeX": SOURCE_MPP, "PhysicalSizeY": SOURCE_MPP},
            **opts,
        )
        for level in range(1, n_levels):
            s = size // 2**level
            tw.write(tiles(level), shape=(s, s, 3), subfiletype=1, **opts)
    return {"write_seconds": time.perf_counter() - t, "levels": n_levels, "file_bytes": path.stat().st_size}


CHILD = r"""
import json, resource, sys, time, warnings
warnings.filterwarnings("ignore")
import numpy as np, psutil, anndata as ad, pandas as pd
import sthist
import scanpy  # sthist logs through scanpy: import it before the baseline
from sthist.pp import _image
path, spots_file, patch_size, mpp = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
mpp = None if mpp == "none" else float(mpp)
xy = np.load(spots_file)
proc = psutil.Process()
base_rss = proc.memory_info().rss
adata = ad.AnnData(obs=pd.DataFrame(index=[f"s{i}" for i in range(len(xy))]), obsm={"spatial": xy})
adata.uns["spatial"] = {"slide": {"metadata": {"source_image_path": path}, "scalefactors": {}}}
loads = []
real = _image.TiffSource._load
def counting(self, *a):
    loads.append(a)
    return real(self, *a)
_image.TiffSource._load = counting
t = time.perf_counter()
sthist.pp.extract_patches(adata, patch_size=patch_size, mpp=mpp, progress=False)
dt = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
after = proc.memory_info().rss
_image.TiffSource._load = real
# check a few patches against direct reads of the zarr store
import tifffile, zarr
z = zarr.open_array(tifffile.imread(path, aszarr=True, level=0), mode="r")
ok = True
if mpp is None:
    for i in range(0, len(xy), max(1, len(xy) // 10)):
        ix, iy = int(np.floor(xy[i, 0] + 0.5)), int(np.floor(xy[i, 1] + 0.5))
        h = patch_size // 2
        if h <= ix < z.shape[1] - patch_size and h <= iy < z.shape[0] - patch_size:
            ok &= bool(np.array_equal(adata.obsm["patches"][i], z[iy - h: iy - h + patch_size, ix - h: ix - h + patch_size]))
print(json.dumps({
    "seconds": dt, "peak_rss_bytes": peak, "baseline_rss_bytes": base_rss, "rss_after_bytes": after,
    "patches_bytes": int(adata.obsm["patches"].nbytes), "blocks_decoded": len(loads),
    "distinct_blocks": len(set(loads)), "n_at_border": int(adata.obs["patches_at_border"].sum()),
    "source_patch_size": adata.uns["patches"]["params"]["source_patch_size"]["slide"],
    "image_source": adata.uns["patches"]["params"]["image_source"]["slide"], "spot_check_equal": ok,
}))
"""


def run_child(path: Path, spots_file: Path, patch_size: int, mpp: float | None) -> dict:
    cmd = [
        sys.executable,
        "-c",
        CHILD,
        str(path),
        str(spots_file),
        str(patch_size),
        "none" if mpp is None else str(mpp),
    ]
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        sys.exit(f"child failed:\n{res.stderr}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["process_seconds"] = time.perf_counter() - t
    out["mpp"] = mpp
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=40_000)
    p.add_argument("--spots", type=int, default=2_000)
    p.add_argument("--patch-size", type=int, default=224)
    p.add_argument("--compression", default="jpeg", choices=["jpeg", "deflate", "zstd"])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/sthist_bench"))
    p.add_argument("--keep", action="store_true", help="keep the synthetic slide (reused by later runs)")
    p.add_argument("--no-mpp", action="store_true", help="skip the mpp=0.5 (2x resampling) run")
    p.add_argument("--out", type=Path, default=HERE / "results" / "large_tiff_memory.json")
    args = p.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    path = args.workdir / f"synthetic_{args.size}_{args.compression}.ome.tif"
    write_info: dict = {"reused": path.exists()}
    if not path.exists():
        print(f"writing {path} ({args.size} x {args.size} px, {TILE} px {args.compression} tiles) ...", flush=True)
        tmp = path.with_suffix(".partial.tif")
        write_info.update(write_slide(tmp, args.size, args.compression))
        tmp.rename(path)
        print(f"  {write_info['write_seconds']:.0f} s, {write_info['file_bytes'] / 2**20:.0f} MiB", flush=True)
    else:
        write_info["file_bytes"] = path.stat().st_size

    rng = np.random.default_rng(0)
    xy = rng.uniform(0, args.size, (args.spots, 2))
    spots_file = args.workdir / "spots.npy"
    np.save(spots_file, xy)

    runs = []
    for mpp in [None] if args.no_mpp else [None, 0.5]:
        print(f"extract_patches(patch_size={args.patch_size}, mpp={mpp}) in a subprocess ...", flush=True)
        r = run_child(path, spots_file, args.patch_size, mpp)
        print(
            f"  {r['seconds']:.1f} s, peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB "
            f"(baseline after imports {r['baseline_rss_bytes'] / 2**20:.0f} MiB, patches "
            f"{r['patches_bytes'] / 2**20:.0f} MiB), {r['blocks_decoded']} tiles decoded",
            flush=True,
        )
        runs.append(r)

    n_tiles = math.ceil(args.size / TILE) ** 2
    result = {
        "benchmark": "large_tiff_memory",
        "image": {
            "size_px": [args.size, args.size],
            "tile": TILE,
            "compression": args.compression,
            "uncompressed_bytes": args.size * args.size * 3,
            "level0_tiles": n_tiles,
            "source_mpp": SOURCE_MPP,
            **write_info,
        },
        "n_spots": args.spots,
        "patch_size": args.patch_size,
        "runs": runs,
        "target_peak_rss_bytes": 2**30,
        "meets_target": all(r["peak_rss_bytes"] < 2**30 for r in runs),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    if not args.keep:
        path.unlink()
        spots_file.unlink()


if __name__ == "__main__":
    main()
