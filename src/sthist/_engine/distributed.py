"""Data-parallel training over several processes (GPUs or machines), launched with ``torchrun``.

:func:`sthist._engine.train.fit` detects a ``torchrun`` launch (``WORLD_SIZE`` > 1 in the environment, or a
``torch.distributed`` process group that is already initialised) and then trains data-parallel:

* every process uses the same seed, so all draw the same *global* batches (``batch_size`` is the global batch);
* in fine-tuning mode each process reads and encodes only its contiguous shard of the batch's images
  (:func:`shard_positions`; shards are padded to equal length by repeating the last image, the padding is dropped);
* the encoder features are all-gathered *with gradients* (:func:`gather_rows`), so every process builds the full
  batch and computes the method's loss over all of it: the contrastive negatives are those of the whole global batch,
  as in one-process training, for every method (neighbour images are part of the encoded rows);
* the backward pass of the all-gather sums the (identical) gradients of the loss that reach each process's shard,
  so the encoder's local gradient is ``world_size`` times its shard's part; DistributedDataParallel averages it
  over processes, which gives the sum of the parts: exactly the one-process gradient. The heads' gradients are
  the same on every process and are averaged too (:func:`average_gradients`), which keeps them bitwise equal.

Augmentation random numbers are drawn for the whole global batch on every process and sliced to the shard, and
dropout in the heads draws from the same seeded generator everywhere, so two processes reproduce one process.
Layers that mix samples inside the encoder (BatchNorm) see only the local shard; use SyncBatchNorm or an encoder
with LayerNorm (ViTs, ConvNeXt) when that matters.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Context:
    """Where this process stands: ``rank`` of ``world_size`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def active(self) -> bool:
        """Whether training is data-parallel over several processes."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0 (progress bars, logging, saving)."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as err:
        raise ValueError(f"the environment variable {name}={value!r} is not an integer; torchrun sets it.") from err


def detect() -> Context:
    """The context of this process: from an initialised process group, else from torchrun's environment."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    else:
        world, rank = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    return Context(rank=rank, world_size=world, local_rank=_env_int("LOCAL_RANK", rank), local_world_size=local_world)


def process_device(device: torch.device, ctx: Context) -> torch.device:
    """The device of this process: ``cuda:LOCAL_RANK`` on CUDA under torchrun (made current), else ``device``."""
    import torch

    if not ctx.active or device.type != "cuda":
        return device
    if device.index is not None and device.index != ctx.local_rank:
        raise ValueError(
            f"device={str(device)!r} was requested in a torchrun launch, where process {ctx.rank} uses GPU "
            f"{ctx.local_rank} (LOCAL_RANK); pass device='cuda' (or None) and let every process take its own GPU."
        )
    dev = torch.device("cuda", ctx.local_rank)
    torch.cuda.set_device(dev)
    return dev


def init(device: torch.device, ctx: Context) -> None:
    """Initialise the default process group when torchrun started this process and nobody did yet.

    The backend is NCCL on CUDA and gloo elsewhere; rendezvous through torchrun's environment (``env://``). The
    group is left open for the rest of the script (call ``torch.distributed.destroy_process_group()`` at its end).
    """
    import torch.distributed as dist

    if not ctx.active:
        return
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run a single process.")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    backend = str(dist.get_backend()).lower()
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(
            f"the process group uses NCCL, which needs CUDA tensors, but training runs on {str(device)!r}; "
            "use device='cuda' or initialise the group with backend='gloo'."
        )


def shard_positions(n: int, ctx: Context) -> np.ndarray:
    """Positions (into ``n`` rows) of the contiguous block that process ``ctx.rank`` encodes.

    Blocks hold ``ceil(n / world_size)`` rows; the last ones are padded by repeating row ``n - 1`` so that every
    process holds the same number of rows.
    """
    m = -(-n // ctx.world_size)
    return np.minimum(np.arange(ctx.rank * m, (ctx.rank + 1) * m), n - 1)


def gather_rows(local: torch.Tensor, n: int, ctx: Context) -> torch.Tensor:
    """All-gather the (m, ...) shards of all processes *with gradients*; every process gets the same (n, ...) rows.

    The padding of :func:`shard_positions` (rows ``n`` and beyond) is dropped.
    """
    import torch
    from torch.distributed.nn.functional import all_gather

    if not ctx.active:
        return local[:n]
    return torch.cat(all_gather(local.contiguous()), dim=0)[:n]


def average_gradients(params, ctx: Context) -> None:
    """Average the gradients of ``params`` over processes in one all-reduce.

    Parameters without a gradient are skipped; they are the same on every process because every process runs the
    same computation.
    """
    import torch
    import torch.distributed as dist

    if not ctx.active:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat.div_(ctx.world_size)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_float(value: float, ctx: Context, device: torch.device) -> float:
    """Rank 0's ``value`` on every process (keeps decisions such as early stopping identical everywhere)."""
    import torch
    import torch.distributed as dist

    if not ctx.active:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return float(t.item())
