"""Benchmark: fine-tuning and prediction throughput against the encoder's own forward-backward ceiling.

Side by side, in one run, interleaved over ``--repeats`` rounds (medians reported), in patches per second:

- ``ceiling``: forward + backward + AdamW step of the image encoder and BLEEP's heads and loss on random tensors
  that are already on the device (float images, no reading, no augmentation, no copies): the best the training
  loop can do;
- ``train_numpy`` / ``train_zarr``: the real fine-tuning loop of :func:`sthist._engine.train.fit` (the same
  ``_prepare`` / DataLoader / ``_Trainer.step`` code path): uint8 patches read by rows from a numpy array or from a
  zarr store on disk (chunks of 256 spots, default compression), copied to the device (pinned, non-blocking on
  CUDA), augmented there, encoded, BLEEP loss, backward, AdamW step;
- ``predict_numpy`` / ``predict_zarr``: ``ContrastiveModel.predict(images=...)`` of a fine-tuned model, from patches
  to predicted expression (encoder, heads and top-50 retrieval from the bank of all spots).

Reported ratio: ``train / ceiling`` (target on a GPU: >= 0.8, i.e. the data pipeline is not the bottleneck).

Patches come from the toy generator (H&E-like, so zarr compression behaves as on real slides), repeated to
``batch_size * (warmup + steps)`` spots. On CUDA: bf16 autocast, channels_last (convolutional encoders), pinned
memory and ``--num-workers`` reader processes (default: the engine's automatic choice).

``--hed-texture`` measures instead the weight-free encoders on the CPU: ``encode_patches`` on the same 224 px uint8
H&E-like patches with ``--threads`` (default 2) torch threads, side by side and interleaved over ``--repeats`` rounds
(default 5; medians): the current ``hed-texture``, the straightforward implementation it replaced (``ReferenceHED`` in
``tests/test_hed_fast.py``, through the old float path) and ``hed-fast`` (the same descriptor of a 56 px thumbnail),
with the ratios ``hed_fast / hed_texture_reference`` and ``hed_fast / hed_texture_new``; together with decoding the
her2st C3 JPEG with PIL (seconds and megapixels per second; skipped when ``--root`` has no C3 JPEG) as a yardstick
of the machine. Result: ``results/throughput.json`` (or ``--out``).

Usage::

    python benchmarks/throughput.py                       # CPU: resnet18, 112 px, batch 32, 1 thread
    python benchmarks/throughput.py --device cuda         # GPU: resnet50, 224 px, batch 256
    python benchmarks/throughput.py --hed-texture --root ../shared/data/her2st   # hed-texture, hed-fast, 2 threads
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def make_patches(n: int, patch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` H&E-like uint8 patches and expression (toy data, rows repeated to reach ``n``)."""
    import sthist as st

    adata = st.datasets.toy(n_rows=16, n_cols=16, n_genes=50, seed=0)
    st.pp.extract_patches(adata, patch_size=patch_size, progress=False)
    st.pp.normalize_expression(adata)
    t = adata.layers["targets"]
    expr = np.asarray(t.toarray() if hasattr(t, "toarray") else t, dtype=np.float32)
    rows = np.arange(n) % adata.n_obs
    return np.ascontiguousarray(np.asarray(adata.obsm["patches"])[rows]), expr[rows]


def sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def ceiling_runner(args, dev, image_dim_probe):
    """A function timing ``args.steps`` optimisation steps on random on-device tensors (after warm-up)."""
    import torch

    from sthist._engine._utils import autocast
    from sthist._engine.encoders import build_image_encoder
    from sthist._engine.methods import get_method
    from sthist._engine.methods._base import Batch

    enc = build_image_encoder(args.encoder, pretrained=False).to(dev).train()
    channels_last = dev.type == "cuda" and any(isinstance(m, torch.nn.Conv2d) for m in enc.modules())
    if channels_last:
        enc.to(memory_format=torch.channels_last)
    cls = get_method("bleep")
    module = cls(enc.out_dim, image_dim_probe, cls.make_config(None)).to(dev).train()
    opt = torch.optim.AdamW([*enc.parameters(), *module.parameters()], lr=1e-4, weight_decay=1e-3)
    gen = torch.Generator(device=dev).manual_seed(0)
    b, s = args.batch_size, args.patch_size
    x = torch.rand(b, 3, s, s, device=dev, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    expr = torch.rand(b, image_dim_probe, device=dev, generator=gen)
    fwd = torch.compile(enc) if args.compile else enc

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(dev):
            f = fwd(x)
            loss = sum(module.loss(Batch(img_feats=f.float(), expression=expr)).values())
        loss.backward()
        opt.step()
        return float(loss.detach())

    for _ in range(args.warmup):
        step()
    sync(dev)

    def timed() -> float:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync(dev)
        return args.steps * b / (time.perf_counter() - t0)

    return timed


def training_runner(args, dev, images, expr):
    """A function timing one pass of the real fine-tuning loop (``warmup`` untimed batches, then ``steps``)."""
    from sthist._engine import train

    run = train._prepare(
        method="bleep",
        expression=expr,
        genes=[f"g{i}" for i in range(expr.shape[1])],
        images=images,
        features=None,
        coords=None,
        groups=None,
        encoder=args.encoder,
        pretrained=False,
        checkpoint=None,
        finetune=True,
        max_epochs=1,
        batch_size=args.batch_size,
        lr=1e-4,
        weight_decay=1e-3,
        validation_fraction=0.0,
        early_stopping_patience=None,
        augment=True,
        device=str(dev),
        random_state=0,
        progress=False,
        method_kwargs=None,
        num_workers=args.num_workers,
        compile=args.compile,
    )
    epoch = train._loader(run, args.batch_size)
    trainer = run.trainer
    trainer.train(True)

    def timed() -> float:
        t0, n = None, 0
        for i, (_tag, idx, imgs) in enumerate(epoch()):
            if i == args.warmup:
                sync(dev)
                t0 = time.perf_counter()
            loss, _ = trainer.step(idx, imgs)
            float(loss.detach())  # as fit does (loss bookkeeping)
            if i >= args.warmup:
                n += idx.size
        sync(dev)
        return n / (time.perf_counter() - t0)

    return timed, run.num_workers


def fitted_model(args, dev, images, expr):
    from sthist._engine import train

    return train.fit(
        method="bleep",
        expression=expr,
        genes=[f"g{i}" for i in range(expr.shape[1])],
        images=images,
        encoder=args.encoder,
        finetune=True,
        max_epochs=1,
        batch_size=args.batch_size,
        validation_fraction=0.0,
        device=str(dev),
        progress=False,
        num_workers=0,
    )


def prediction_runner(model, images, dev, batch_size):
    n = int(images.shape[0])
    k = min(50, model.bank_embeddings.shape[0])

    def timed() -> float:
        sync(dev)
        t0 = time.perf_counter()
        model.predict(images=images, k=k, device=str(dev), progress=False, batch_size=batch_size)
        sync(dev)
        return n / (time.perf_counter() - t0)

    return timed


def hed_texture_benchmark(args) -> None:
    """patches/s of hed-texture (new vs reference), hed-fast and the C3 JPEG decode, side by side; writes the JSON."""
    import importlib.util
    import os

    import torch
    from PIL import Image

    from sthist._engine.encoders import ImageEncoder, build_image_encoder, encode_patches

    spec = importlib.util.spec_from_file_location("test_hed_fast", HERE.parent / "tests" / "test_hed_fast.py")
    ref_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref_module)  # the test module sets torch.set_num_threads(1): set the threads after it
    torch.set_num_threads(args.threads)
    new = build_image_encoder("hed-texture")
    fast = build_image_encoder("hed-fast")
    old = ImageEncoder(  # the reference is not an HEDTexture: encode_patches takes the old float path for it
        ref_module.ReferenceHED(),
        spec="hed-texture",
        out_dim=68,
        input_size=None,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        pretrained=False,
        checkpoint=None,
    ).eval()
    patches, _ = make_patches(args.n_patches, 224)
    jpgs = sorted((Path(args.root) / "data" / "ST-imgs" / "C" / "C3").glob("*.jpg"))
    jpg = jpgs[0] if jpgs else None
    runners = {
        "hed_texture_new": lambda: encode_patches(new, patches, batch_size=64, device="cpu", progress=False),
        "hed_texture_reference": lambda: encode_patches(old, patches, batch_size=64, device="cpu", progress=False),
        "hed_fast": lambda: encode_patches(fast, patches, batch_size=64, device="cpu", progress=False),
    }
    for fn in runners.values():  # warm-up
        fn()
    threads = torch.get_num_threads()  # what the timed runs use
    if threads != args.threads:
        raise RuntimeError(f"torch uses {threads} threads, not --threads {args.threads}")
    samples: dict[str, list[float]] = {k: [] for k in [*runners, "jpeg_decode_seconds"]}
    megapixels = None
    for r in range(args.repeats):
        for name, fn in runners.items():
            t = time.perf_counter()
            fn()
            samples[name].append(len(patches) / (time.perf_counter() - t))
        if jpg is not None:
            t = time.perf_counter()
            with Image.open(jpg) as im:
                arr = np.asarray(im.convert("RGB"))
            samples["jpeg_decode_seconds"].append(time.perf_counter() - t)
            megapixels = arr.shape[0] * arr.shape[1] / 1e6
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in samples.items() if v))
    med = {k: statistics.median(v) for k, v in samples.items() if v}
    result = {
        "benchmark": "throughput_hed_texture",
        "unit": "patches per second (median over repeats); JPEG decode in seconds and megapixels per second",
        "settings": {
            "patch_size": 224,
            "n_patches": len(patches),
            "batch_size": 64,
            "torch_threads": threads,
            "repeats": args.repeats,
            "patches": "toy H&E-like patches (sthist.datasets.toy, 224 px)",
            "hed_fast": "HEDFast: hed-texture of a 56 px antialiased uint8 thumbnail, through the same encode_patches",
            "reference": "ReferenceHED in tests/test_hed_fast.py through the float path (images_to_tensor, _prepare)",
            "jpeg": str(jpg) if jpg is not None else None,
            "load_average_before": os.getloadavg(),
        },
        "median": {k: round(v, 3) for k, v in med.items()},
        "samples": {k: [round(x, 3) for x in v] for k, v in samples.items()},
        "speedup_new_over_reference": round(med["hed_texture_new"] / med["hed_texture_reference"], 2),
        "ratio_hed_fast_over_reference": round(med["hed_fast"] / med["hed_texture_reference"], 2),
        "ratio_hed_fast_over_hed_texture_new": round(med["hed_fast"] / med["hed_texture_new"], 2),
        "target": "hed_fast >= 1,500 patches of 224 px per second on 2 cores",
        "platform": {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()},
        "versions": {p: version(p) for p in ("sthist", "torch", "numpy", "pillow")},
    }
    if megapixels is not None:
        result["jpeg_megapixels"] = round(megapixels, 2)
        result["median"]["jpeg_decode_megapixels_per_second"] = round(megapixels / med["jpeg_decode_seconds"], 1)
    result["settings"]["load_average_after"] = os.getloadavg()
    out = Path(args.out) if args.out else HERE / "results" / "throughput.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    ratios = [k for k in result if k.startswith(("speedup_", "ratio_"))]
    print(json.dumps({"median": result["median"], **{k: result[k] for k in ratios}}, indent=1))
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--hed-texture", action="store_true", help="benchmark the hed-texture and hed-fast encoders (CPU) instead"
    )
    parser.add_argument("--root", default="../shared/data/her2st", help="her2st folder (--hed-texture: C3 JPEG)")
    parser.add_argument("--n-patches", type=int, default=512, help="--hed-texture: patches per repeat")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--encoder", default=None, help="timm model (default: resnet18 on CPU, resnet50 on CUDA)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 32 on CPU, 256 on CUDA")
    parser.add_argument("--patch-size", type=int, default=None, help="default: 112 on CPU, 224 on CUDA")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per repeat (default: 4 CPU, 30 CUDA)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 1 CPU, 5 CUDA)")
    parser.add_argument("--repeats", type=int, default=None, help="rounds (default 3; --hed-texture: 5)")
    parser.add_argument("--num-workers", type=int, default=None, help="DataLoader workers (default: automatic)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1; --hed-texture: 2)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the encoder (ceiling and training)")
    parser.add_argument(
        "--out",
        default=None,
        help="JSON path (default: results/throughput_<device>.json; --hed-texture: results/throughput.json)",
    )
    args = parser.parse_args()
    if args.hed_texture:
        args.threads = args.threads or 2
        args.repeats = args.repeats or 5
        return hed_texture_benchmark(args)
    args.threads = args.threads or 1
    args.repeats = args.repeats or 3

    import torch
    import zarr

    from sthist._engine._utils import resolve_device

    dev = resolve_device(args.device)
    gpu = dev.type == "cuda"
    args.encoder = args.encoder or ("resnet50" if gpu else "resnet18")
    args.batch_size = args.batch_size or (256 if gpu else 32)
    args.patch_size = args.patch_size or (224 if gpu else 112)
    args.steps = args.steps or (30 if gpu else 4)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    torch.set_num_threads(args.threads)
    if gpu:
        torch.backends.cudnn.benchmark = True

    n = args.batch_size * (args.warmup + args.steps)
    patches, expr = make_patches(n, args.patch_size)
    with tempfile.TemporaryDirectory() as tmp:
        z = zarr.open_array(
            Path(tmp) / "patches.zarr",
            mode="w",
            shape=patches.shape,
            chunks=(256, *patches.shape[1:]),
            dtype="uint8",
        )
        z[:] = patches
        z = zarr.open_array(Path(tmp) / "patches.zarr", mode="r")
        zarr_mb = sum(f.stat().st_size for f in (Path(tmp) / "patches.zarr").rglob("*") if f.is_file()) / 1e6

        runners = {"ceiling": ceiling_runner(args, dev, expr.shape[1])}
        runners["train_numpy"], workers = training_runner(args, dev, patches, expr)
        runners["train_zarr"], _ = training_runner(args, dev, z, expr)
        model = fitted_model(args, dev, patches, expr)
        pred_bs = max(args.batch_size, 256 if gpu else 64)
        runners["predict_numpy"] = prediction_runner(model, patches, dev, pred_bs)
        runners["predict_zarr"] = prediction_runner(model, z, dev, pred_bs)

        samples: dict[str, list[float]] = {k: [] for k in runners}
        for r in range(args.repeats):
            for name, fn in runners.items():
                samples[name].append(fn())
            print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in samples.items()))

    med = {k: statistics.median(v) for k, v in samples.items()}
    result = {
        "benchmark": "throughput",
        "unit": "patches per second (median over repeats)",
        "settings": {
            "device": str(dev),
            "device_name": torch.cuda.get_device_name(dev) if gpu else platform.processor() or platform.machine(),
            "encoder": args.encoder,
            "pretrained": False,
            "method": "bleep",
            "batch_size": args.batch_size,
            "patch_size": args.patch_size,
            "timed_steps": args.steps,
            "warmup_steps": args.warmup,
            "repeats": args.repeats,
            "num_workers": workers,
            "torch_threads": torch.get_num_threads(),
            "bf16_autocast": gpu,
            "channels_last": gpu,
            "pin_memory": gpu,
            "compile": bool(args.compile),
            "n_spots": n,
            "zarr_store_mb": round(zarr_mb, 2),
            "zarr_chunk_rows": 256,
            "prediction_batch_size": pred_bs,
            "prediction_k": min(50, n),
        },
        "median": {k: round(v, 2) for k, v in med.items()},
        "samples": {k: [round(x, 2) for x in v] for k, v in samples.items()},
        "ratio_to_ceiling": {
            "train_numpy": round(med["train_numpy"] / med["ceiling"], 3),
            "train_zarr": round(med["train_zarr"] / med["ceiling"], 3),
        },
        "target": "train / ceiling >= 0.8 on a GPU",
        "platform": {"python": platform.python_version(), "machine": platform.machine(), "system": platform.system()},
        "versions": {p: version(p) for p in ("sthist", "torch", "timm", "zarr", "numpy")},
    }
    out = Path(args.out) if args.out else HERE / "results" / f"throughput_{dev.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"median": result["median"], "ratio_to_ceiling": result["ratio_to_ceiling"]}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
