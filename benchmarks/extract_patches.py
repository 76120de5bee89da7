"""Benchmark: patch extraction on a her2st section against decoding the JPEG alone, and against squidpy.

Side by side, in one run, interleaved over ``--repeats`` rounds (medians reported):

- ``decode``: ``PIL.Image.open(jpg)`` + ``np.asarray`` (what any reader that wants the slide as an array pays);
- ``pil_load``: ``PIL.Image.open(jpg).load()``, the JPEG decode alone, without the copy into numpy;
- ``sthist``: ``sthist.pp.extract_patches(adata, patch_size=224)`` (image path in ``uns``, opened by sthist);
- ``squidpy_eager``: ``squidpy.im.ImageContainer(jpg).compute()`` + ``generate_spot_crops`` (crops of
  ``spot_diameter_fullres = 224``, which squidpy makes 2 * 112 + 1 = 225 px wide);
- ``squidpy_lazy`` (with ``--squidpy-lazy``, one repeat): squidpy's lazy default, ``ImageContainer(jpg)`` +
  ``generate_spot_crops`` straight away.

Target: ``sthist / decode <= 1.2``.

Usage::

    python benchmarks/extract_patches.py --root /work/shared/data/her2st --section C3 [--squidpy-lazy]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent


def build_adata(root: Path, section: str, patch_size: int):
    """A minimal AnnData: spot centres from the selection file, the JPEG path in uns (no counts needed)."""
    import anndata as ad

    sel = pd.read_csv(root / "data" / "ST-spotfiles" / f"{section}_selection.tsv", sep="\t")
    jpgs = sorted((root / "data" / "ST-imgs").glob(f"*/{section}/*.jpg"))
    if not jpgs:
        sys.exit(f"no JPEG for section {section} under {root / 'data' / 'ST-imgs'}")
    obs = pd.DataFrame(index=[f"{x}x{y}" for x, y in zip(sel["x"], sel["y"], strict=True)])
    adata = ad.AnnData(obs=obs, obsm={"spatial": sel[["pixel_x", "pixel_y"]].to_numpy(dtype=float)})
    adata.uns["spatial"] = {
        section: {
            "images": {},
            "metadata": {"source_image_path": str(jpgs[0])},
            "scalefactors": {"spot_diameter_fullres": float(patch_size), "tissue_hires_scalef": 1.0},
        }
    }
    return adata, jpgs[0]


def time_decode(jpg: Path) -> float:
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    t = time.perf_counter()
    arr = np.asarray(Image.open(jpg))
    dt = time.perf_counter() - t
    assert arr.ndim == 3
    return dt


def time_pil_load(jpg: Path) -> float:
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    t = time.perf_counter()
    with Image.open(jpg) as im:
        im.load()
    return time.perf_counter() - t


def time_sthist(adata, patch_size: int) -> float:
    import sthist

    t = time.perf_counter()
    sthist.pp.extract_patches(adata, patch_size=patch_size, progress=False)
    return time.perf_counter() - t


def time_squidpy(adata, jpg: Path, section: str, *, lazy: bool) -> tuple[float, int]:
    import squidpy as sq

    t = time.perf_counter()
    img = sq.im.ImageContainer(str(jpg), lazy=lazy)
    if not lazy:
        img = img.compute()
    crops = [np.asarray(c) for c in img.generate_spot_crops(adata, library_id=section, as_array="image", squeeze=True)]
    dt = time.perf_counter() - t
    return dt, int(crops[0].shape[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", type=Path, default=Path("/work/shared/data/her2st"))
    p.add_argument("--section", default="C3")
    p.add_argument("--patch-size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--squidpy-lazy", action="store_true", help="also time squidpy's lazy default (slow, 1 repeat)")
    p.add_argument("--no-squidpy", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    out = args.out or HERE / "results" / f"extract_patches_{args.section}.json"

    import warnings

    warnings.filterwarnings("ignore")
    import sthist  # noqa: F401 - import cost outside the timings

    if not args.no_squidpy:
        import squidpy  # noqa: F401

    adata, jpg = build_adata(args.root, args.section, args.patch_size)
    from PIL import Image

    with Image.open(jpg) as im:
        width, height = im.size
    print(f"{args.section}: {jpg.name} {width} x {height} px, {adata.n_obs} spots", flush=True)

    # warm-up: file cache, lazy imports
    time_decode(jpg)
    time_sthist(adata, args.patch_size)

    times: dict[str, list[float]] = {"decode": [], "pil_load": [], "sthist": []}
    if not args.no_squidpy:
        times["squidpy_eager"] = []
    squidpy_crop = None
    for r in range(args.repeats):
        times["decode"].append(time_decode(jpg))
        times["pil_load"].append(time_pil_load(jpg))
        times["sthist"].append(time_sthist(adata, args.patch_size))
        if not args.no_squidpy:
            dt, squidpy_crop = time_squidpy(adata, jpg, args.section, lazy=False)
            times["squidpy_eager"].append(dt)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items()), flush=True)
    if args.squidpy_lazy and not args.no_squidpy:
        dt, _ = time_squidpy(adata, jpg, args.section, lazy=True)
        times["squidpy_lazy"] = [dt]
        print(f"squidpy lazy: {dt:.1f} s", flush=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = {
        "sthist_over_decode": med["sthist"] / med["decode"],
        "sthist_over_pil_load": med["sthist"] / med["pil_load"],
    }
    for k in ("squidpy_eager", "squidpy_lazy"):
        if k in med:
            ratios[f"{k}_over_sthist"] = med[k] / med["sthist"]
    result = {
        "benchmark": "extract_patches",
        "section": args.section,
        "image": str(jpg),
        "image_width": width,
        "image_height": height,
        "n_spots": int(adata.n_obs),
        "patch_size": args.patch_size,
        "squidpy_crop_size": squidpy_crop,
        "repeats": args.repeats,
        "seconds": times,
        "median_seconds": med,
        "ratios": ratios,
        "target_sthist_over_decode": 1.2,
        "meets_target": ratios["sthist_over_decode"] <= 1.2,
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            **{pkg: version(pkg) for pkg in ("pillow", "numpy", "anndata", "squidpy", "tifffile")},
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"median_seconds": med, "ratios": ratios}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
