"""GPU figures in one prepared run (under 8 minutes on one H100), each beside the device's ceiling for its model.

    python benchmarks/gpu.py --device cuda                 # the real run (JSON in results/gpu.json)
    python benchmarks/gpu.py --device cpu --tiny           # a smoke run with tiny sizes (tests/test_benchmarks_gpu.py)

Three measurements, each against a *ceiling*: the same network in a plain loop on synthetic tensors already on the
device (no data reading, no augmentation, no copies), the best sthist's path could do:

1. **Fine-tuning BLEEP with a ResNet-50** (random init): sthist's training path (``sthist._engine.train.fit`` with
   ``finetune=True``: uint8 patches copied to the device, augmented there, encoded, BLEEP's loss, backward, AdamW),
   in patches per second over the epochs after the first (the first pays for start-up), against the ceiling's
   forward + backward + step, in fp32 and in bf16 autocast with ``channels_last`` (sthist uses the latter on CUDA).
2. **Frozen embedding with a ViT-L/16 of UNI's shape** (timm ``vit_large_patch16_224`` with ``init_values=1e-5``,
   random init: UNI's weights are gated): ``sthist.pp.embed_patches`` on uint8 patches, against the ceiling's
   forward passes in bf16 under ``torch.inference_mode``.
3. **predict_slide** on the synthetic 100,000 x 100,000 px slide of ``benchmarks/wsi_memory.py`` (about 40,000
   pseudo-spots of 224 px at 0.5 µm/px) with a ResNet-50 model, in pseudo-spots per second, against the ResNet-50
   forward ceiling (reading and resizing the patches is the difference).

``--tiny`` swaps in small networks (resnet18, vit_tiny_patch16_224) and sizes (32-64 px, a 4,096 px slide) so that
the script runs on a CPU in a test; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _patches(n: int, size: int) -> np.ndarray:
    """H&E-like uint8 patches from the toy generator, repeated to ``n``."""
    import sthist as st

    toy = st.datasets.toy(n_rows=8, n_cols=8, n_genes=16, seed=0)
    st.pp.extract_patches(toy, patch_size=size, progress=False)
    rows = np.arange(n) % toy.n_obs
    return np.ascontiguousarray(np.asarray(toy.obsm["patches"])[rows])


def _median_rate(fn, repeats: int) -> float:
    return float(statistics.median(fn() for _ in range(repeats)))


def ceiling_training(spec: str, size: int, batch: int, steps: int, dev, *, bf16: bool, repeats: int) -> float:
    """Patches/s of forward + backward + AdamW of the encoder and BLEEP's heads on random on-device tensors."""
    import torch

    from sthist._engine.encoders import build_image_encoder
    from sthist._engine.methods import get_method
    from sthist._engine.methods._base import Batch

    enc = build_image_encoder(spec, pretrained=False).to(dev).train()
    channels_last = bf16 and any(isinstance(m, torch.nn.Conv2d) for m in enc.modules())
    if channels_last:
        enc.to(memory_format=torch.channels_last)
    cls = get_method("bleep")
    head = cls(enc.out_dim, 64, cls.make_config(None)).to(dev).train()
    opt = torch.optim.AdamW([*enc.parameters(), *head.parameters()], lr=1e-4)
    x = torch.rand(batch, 3, size, size, device=dev)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.rand(batch, 64, device=dev)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=bf16):
            loss = sum(head.loss(Batch(img_feats=enc(x).float(), expression=y)).values())
        loss.backward()
        opt.step()

    step()
    _sync(dev)

    def timed() -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(dev)
        return steps * batch / (time.perf_counter() - t0)

    return _median_rate(timed, repeats)


def ceiling_forward(spec: str, size: int, batch: int, steps: int, dev, *, repeats: int, **timm_kw) -> float:
    """Patches/s of the encoder's forward passes (bf16 on CUDA, inference mode) on random on-device tensors."""
    import timm
    import torch

    if timm_kw:
        net = timm.create_model(spec, pretrained=False, num_classes=0, **timm_kw)
    else:
        from sthist._engine.encoders import build_image_encoder

        net = build_image_encoder(spec, pretrained=False)
    net = net.to(dev).eval()
    x = torch.rand(batch, 3, size, size, device=dev)
    bf16 = dev.type == "cuda"

    def timed() -> float:
        with torch.inference_mode(), torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=bf16):
            net(x)
            _sync(dev)
            t0 = time.perf_counter()
            for _ in range(steps):
                net(x)
            _sync(dev)
        return steps * batch / (time.perf_counter() - t0)

    return _median_rate(timed, repeats)


def finetune(spec: str, size: int, batch: int, n: int, dev, *, epochs: int = 3) -> dict:
    """sthist's fine-tuning path: patches/s over the epochs after the first (the first pays for start-up)."""
    from sthist._engine import train

    images = _patches(n, size)
    expr = np.random.default_rng(0).gamma(2.0, 1.0, size=(n, 64)).astype(np.float32)
    kw = dict(
        method="bleep",
        expression=expr,
        genes=[f"g{i}" for i in range(expr.shape[1])],
        images=images,
        encoder=spec,
        finetune=True,
        batch_size=batch,
        validation_fraction=0.0,
        early_stopping_patience=None,
        device=str(dev),
        progress=False,
    )
    t0 = time.perf_counter()
    train.fit(max_epochs=1, **kw)
    one = time.perf_counter() - t0
    t0 = time.perf_counter()
    train.fit(max_epochs=epochs, **kw)
    many = time.perf_counter() - t0
    return {"patches_per_second": (epochs - 1) * n / max(many - one, 1e-9), "seconds_1_epoch": one, "epochs": epochs}


def embed(spec_kw: dict, size: int, n: int, batch: int, dev) -> dict:
    """``sthist.pp.embed_patches`` with a timm encoder (random init) on uint8 patches: patches per second."""
    import anndata as ad
    import pandas as pd

    import sthist as st

    adata = ad.AnnData(obs=pd.DataFrame(index=[f"s{i}" for i in range(n)]))
    adata.obsm["patches"] = _patches(n, size)
    from sthist.pp._embed import default_key

    t0 = time.perf_counter()
    st.pp.embed_patches(adata, encoder=spec_kw["spec"], batch_size=batch, device=str(dev), progress=False)
    seconds = time.perf_counter() - t0
    return {"patches_per_second": n / seconds, "dim": int(adata.obsm[default_key(spec_kw["spec"])].shape[1])}


def slide(spec: str, size: int, patch: int, dev, workdir: Path) -> dict:
    """``predict_slide`` on the synthetic slide with a fine-tuned ``spec`` model: pseudo-spots per second."""
    import sys

    import sthist as st

    sys.path.insert(0, str(HERE))
    from wsi_memory import MPP, write_slide

    path = workdir / f"slide_{size}.ome.tif"
    if not path.exists():
        write_slide(path, size)
    toy = st.datasets.toy(n_rows=8, n_cols=8, n_genes=16, seed=0)
    st.pp.extract_patches(toy, patch_size=patch, mpp=MPP, progress=False)
    st.pp.normalize_expression(toy)
    model = st.tl.fit_contrastive(
        toy, layer="targets", encoder=spec, finetune=True, max_epochs=1, device=str(dev), progress=False
    )
    t0 = time.perf_counter()
    pred = st.tl.predict_slide(
        str(path), model, device=str(dev), batch_size=256 if dev.type == "cuda" else 8, progress=False
    )
    seconds = time.perf_counter() - t0
    return {"pseudo_spots": int(pred.n_obs), "seconds": seconds, "pseudo_spots_per_second": pred.n_obs / seconds}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="small networks and sizes: a CPU smoke run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "sthist_gpu_bench")
    p.add_argument("--out", type=Path, default=HERE / "results" / "gpu.json")
    args = p.parse_args(argv)

    import torch

    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no GPU is visible; run with --device cpu --tiny for a smoke run.")
    args.workdir.mkdir(parents=True, exist_ok=True)
    cnn, vit = ("resnet18", "vit_tiny_patch16_224") if args.tiny else ("resnet50", "vit_large_patch16_224")
    size, batch, steps, n = (32, 4, 2, 16) if args.tiny else (224, 256, 20, 4096)
    vit_size = 224
    vit_batch, vit_n = (2, 4) if args.tiny else (256, 8192)
    slide_px, slide_patch = (4096, 32) if args.tiny else (100_000, 224)
    t_start = time.perf_counter()
    out: dict = {"device": str(dev), "tiny": args.tiny}
    if dev.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(dev)
    out["finetune_bleep"] = {
        "encoder": cnn,
        "patch_size": size,
        "batch_size": batch,
        "ceiling_fp32": ceiling_training(cnn, size, batch, steps, dev, bf16=False, repeats=args.repeats),
        "ceiling_bf16_channels_last": ceiling_training(cnn, size, batch, steps, dev, bf16=True, repeats=args.repeats),
        "sthist": finetune(cnn, size, batch, n, dev),
    }
    ft = out["finetune_bleep"]
    ceiling = ft["ceiling_bf16_channels_last"] if dev.type == "cuda" else ft["ceiling_fp32"]
    ft["sthist_over_ceiling"] = ft["sthist"]["patches_per_second"] / ceiling
    print("fine-tuning:", json.dumps(ft), flush=True)
    uni = {"init_values": 1e-5, "dynamic_img_size": True} if not args.tiny else {}
    out["embed_vit"] = {
        "encoder": vit,
        "shape": "UNI (ViT-L/16, init_values=1e-5)" if not args.tiny else "tiny",
        "ceiling": ceiling_forward(vit, vit_size, vit_batch, steps, dev, repeats=args.repeats, **uni),
        "sthist": embed({"spec": vit}, vit_size, vit_n, vit_batch, dev),
    }
    ev = out["embed_vit"]
    ev["sthist_over_ceiling"] = ev["sthist"]["patches_per_second"] / ev["ceiling"]
    print("embedding:", json.dumps(ev), flush=True)
    out["predict_slide"] = {
        "slide_px": slide_px,
        "encoder": cnn,
        "ceiling_forward": ceiling_forward(cnn, slide_patch, batch, steps, dev, repeats=args.repeats),
        **slide(cnn, slide_px, slide_patch, dev, args.workdir),
    }
    ps = out["predict_slide"]
    ps["sthist_over_ceiling"] = ps["pseudo_spots_per_second"] / ps["ceiling_forward"]
    print("predict_slide:", json.dumps(ps), flush=True)
    out["seconds"] = round(time.perf_counter() - t_start, 1)
    out["versions"] = {"torch": torch.__version__, "python": platform.python_version()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out} in {out['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
