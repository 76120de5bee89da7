"""Spots as arrays, batches on a device, augmentation and spatial neighbours."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from ._utils import autocast
from .methods._base import Batch


class FeatureScaler(nn.Module):
    """Standardises frozen image features with the training mean and standard deviation (identity when unset)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def fit(self, feats: np.ndarray) -> FeatureScaler:
        """Set mean and standard deviation from ``feats`` (n, d); constant columns keep std 1."""
        x = torch.as_tensor(feats, dtype=torch.float64)
        std = x.std(dim=0, unbiased=False)
        std[std < 1e-8] = 1.0
        self.mean.copy_(x.mean(dim=0).float())
        self.std.copy_(std.float())
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def draw_augmentation(
    n: int, generator: torch.Generator, *, square: bool = True, spec: Any = None
) -> dict[str, torch.Tensor]:
    """Draw the random numbers of :func:`augment_images` for ``n`` images (CPU tensors, in a fixed order).

    ``spec`` is the recipe's :class:`~sthist._engine.plan.Augment` (``None``: the default one). Drawing and applying
    are separate so that data-parallel training can draw for the whole global batch on every process (the same
    generator state everywhere) and apply only the rows of the local shard. The default draws the same numbers in
    the same order as before recipes declared their augmentation.
    """
    from .plan import Augment

    spec = Augment() if spec is None else spec
    hflip = torch.rand(n, generator=generator) < 0.5
    vflip = torch.rand(n, generator=generator) < 0.5
    if spec.rotation == "any":
        angle = torch.rand(n, generator=generator) * 360.0
    else:
        quarter = (
            torch.randint(0, 4, (n,), generator=generator)
            if square
            else torch.randint(0, 2, (n,), generator=generator) * 2
        )
        angle = quarter if spec.rotation == "quarter" else torch.zeros(n, dtype=quarter.dtype)
    jitter = torch.rand(n, 3, generator=generator)
    amount = torch.tensor(spec.jitter, dtype=jitter.dtype)
    return {
        "hflip": hflip & spec.hflip,
        "vflip": vflip & spec.vflip,
        "rot" if spec.rotation != "any" else "angle": angle,
        "jitter": 1.0 - amount + 2.0 * amount * jitter,
    }


def _rotate(x: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate (B, 3, H, W) images by ``degrees`` (B,) about their centres, corners filled with 0 (black)."""
    theta = torch.deg2rad(degrees.to(x.device, x.dtype))
    cos, sin = torch.cos(theta), torch.sin(theta)
    zero = torch.zeros_like(cos)
    affine = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = torch.nn.functional.affine_grid(affine, list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def apply_augmentation(x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Apply flips, rotations and colour jitter drawn by :func:`draw_augmentation` to (B, 3, H, W) images in [0, 1]."""
    dev = x.device
    hflip, vflip = params["hflip"].to(dev), params["vflip"].to(dev)
    jitter = params["jitter"].to(dev)
    x = torch.where(hflip.view(-1, 1, 1, 1), x.flip(-1), x)
    x = torch.where(vflip.view(-1, 1, 1, 1), x.flip(-2), x)
    if "angle" in params:
        out = _rotate(x, params["angle"])
    else:
        rot = params["rot"]
        out = x.clone()
        for r in (1, 2, 3):
            sel = (rot == r).nonzero().flatten().to(dev)
            if sel.numel():
                out[sel] = torch.rot90(x[sel], r, dims=(-2, -1))
    x = out * jitter[:, 0].view(-1, 1, 1, 1)  # brightness
    gray = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - gray) * jitter[:, 1].view(-1, 1, 1, 1) + gray  # contrast
    lum = x.mean(dim=1, keepdim=True)
    x = (x - lum) * jitter[:, 2].view(-1, 1, 1, 1) + lum  # saturation
    return x.clamp(0.0, 1.0)


def augment_images(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random flips, rotations by multiples of 90 degrees and mild colour jitter of (B, 3, H, W) images in [0, 1].

    Flips and rotations as in BLEEP's ``dataset.py``; colour jitter (brightness, contrast, saturation, each by a
    factor in [0.9, 1.1]) mimics stain and scanner variation. Random numbers come from ``generator`` (CPU), so
    augmentation is repeatable for a seed.
    """
    params = draw_augmentation(x.shape[0], generator, square=x.shape[-1] == x.shape[-2])
    return apply_augmentation(x, params)


# ---------------------------------------------------------------------------------------------------------------------
# patch arrays: numpy in memory, or lazy (dask, zarr) read by rows


def is_lazy_array(array: Any) -> bool:
    """Whether ``array`` is a dask or zarr array (or another chunked store) rather than a numpy array."""
    if isinstance(array, np.ndarray):
        return False
    root = type(array).__module__.split(".", 1)[0]
    return root in _LAZY_MODULES and all(hasattr(array, a) for a in ("shape", "dtype", "ndim", "__getitem__"))


_LAZY_MODULES = ("dask", "zarr", "h5py")


def row_chunks(array: Any) -> np.ndarray | None:
    """Row boundaries ``[0, ..., n]`` of the storage chunks along axis 0, or ``None`` for in-memory arrays."""
    if not is_lazy_array(array):
        return None
    n = int(array.shape[0])
    chunks = getattr(array, "chunks", None)
    if not chunks:
        return None
    first = chunks[0]
    if isinstance(first, tuple | list):  # dask: the size of every chunk
        return np.concatenate([[0], np.cumsum(first)]).astype(np.int64)
    step = max(int(first), 1)  # zarr / h5py: one chunk shape
    return np.unique(np.append(np.arange(0, n, step), n)).astype(np.int64)


def iter_row_blocks(array: Any, rows: int):
    """Yield ``(start, block)`` for consecutive blocks of ``rows`` rows (the last may be shorter), in order.

    In-memory arrays give views. Lazy arrays (dask, zarr) are read one storage chunk (or more, up to a block) at a
    time, keeping the unused tail for the next block, so every chunk is read once and peak memory is about one
    chunk plus one block whatever the chunk boundaries are.
    """
    n = int(array.shape[0])
    bounds = row_chunks(array)
    if bounds is None:  # in memory: views
        for start in range(0, n, rows):
            yield start, array[start : start + rows]
        return
    block, b0, b1 = None, 0, 0  # rows [b0, b1) are held in block
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        if stop > b1:
            new_stop = int(bounds[np.searchsorted(bounds, stop, side="left")])  # next chunk boundary >= stop
            fresh = read_rows(array, slice(b1, new_stop))
            # blocks are consecutive (b1 >= start): keep the unused tail of the old block
            block = fresh if block is None or b1 <= start else np.concatenate([block[start - b0 :], fresh])
            b0, b1 = start, new_stop
        yield start, block[start - b0 : stop - b0]


def _materialise(block: Any, scheduler: str | None) -> np.ndarray:
    if hasattr(block, "compute"):
        block = block.compute(scheduler=scheduler) if scheduler else block.compute()
    return np.asarray(block)


def read_rows(array: Any, idx: np.ndarray | slice, *, scheduler: str | None = None) -> np.ndarray:
    """Read rows of a numpy, dask or zarr array into a numpy array, touching only the chunks that hold them.

    Parameters
    ----------
    array
        (n, ...) numpy array, dask array or zarr array.
    idx
        A slice, or integer positions in any order (repeats allowed).
    scheduler
        dask scheduler for the read (``"synchronous"`` inside data-loader workers); ignored for other arrays.

    Returns
    -------
    A numpy array with the rows in the order of ``idx``.
    """
    if isinstance(idx, slice):
        return _materialise(array[idx], scheduler)
    idx = np.asarray(idx, dtype=np.int64).reshape(-1)
    if isinstance(array, np.ndarray):
        return array[idx]
    if idx.size == 0:
        return np.empty((0, *array.shape[1:]), dtype=array.dtype)
    uniq, inv = np.unique(idx, return_inverse=True)
    if uniq[-1] - uniq[0] + 1 == uniq.size:  # consecutive rows: one slice
        rows = _materialise(array[int(uniq[0]) : int(uniq[-1]) + 1], scheduler)
    elif hasattr(array, "oindex"):  # zarr: orthogonal selection reads only the chunks touched
        rows = np.asarray(array.oindex[uniq])
    else:  # dask, h5py: sorted unique positions
        rows = _materialise(array[uniq], scheduler)
    return rows if uniq.size == idx.size and np.array_equal(uniq, idx) else rows[inv.reshape(-1)]


def check_patches(patches: Any, *, name: str = "patches") -> Any:
    """Check that ``patches`` are uint8 RGB patches (n, H, W, 3) and return them unchanged.

    numpy arrays and lazy arrays (dask, zarr, e.g. from ``sthist.pp.extract_patches(..., store=...)``) are accepted;
    only shape and dtype are checked, so a lazy array is not read.
    """
    if not isinstance(patches, np.ndarray) and not is_lazy_array(patches):
        raise TypeError(
            f"{name} must be a numpy, dask or zarr array of shape (n, S, S, 3) and dtype uint8, "
            f"got {type(patches).__name__}."
        )
    shape = tuple(int(v) for v in patches.shape)
    if len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"{name} must have shape (n, S, S, 3) (RGB patches), got {shape}.")
    if np.dtype(patches.dtype) != np.uint8:
        raise ValueError(
            f"{name} must have dtype uint8 (0-255 RGB), got {patches.dtype}; "
            "convert with `(patches * 255).round().clip(0, 255).astype(np.uint8)` if they are floats in [0, 1]."
        )
    if shape[0] == 0:
        raise ValueError(f"{name} holds no patches.")
    return patches


def images_to_tensor(patches: np.ndarray | torch.Tensor, device: torch.device, *, non_blocking: bool = False):
    """uint8 (n, H, W, 3) (numpy array or tensor) -> float (n, 3, H, W) in [0, 1] on ``device``.

    The result is a permuted view of the channels-last uint8 layout, i.e. already in ``torch.channels_last`` memory
    format. ``non_blocking`` copies asynchronously from pinned memory.
    """
    x = patches if isinstance(patches, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(patches))
    x = x.to(device, non_blocking=non_blocking)
    return x.permute(0, 3, 1, 2).float().div_(255.0)


def batch_image_rows(idx: np.ndarray, neighbors: np.ndarray | None, n_neighbors: int) -> tuple[np.ndarray, np.ndarray]:
    """The spots whose images a batch needs (the spots ``idx`` and their neighbours) and where each sits.

    Returns ``rows`` (positions, each once: ``idx`` itself without neighbours, else sorted) and ``inv`` with
    ``rows[inv] == concatenate([idx, valid neighbours])``. One forward pass encodes ``rows``.
    """
    idx = np.asarray(idx, dtype=np.int64)
    if not n_neighbors:
        return idx, np.arange(idx.size)
    if neighbors is None:
        raise ValueError("this method needs spatial neighbours: pass coords=.")
    nb = neighbors[idx, :n_neighbors]
    rows, inv = np.unique(np.concatenate([idx, nb[nb >= 0]]), return_inverse=True)
    return rows, inv.reshape(-1)


def spatial_neighbors(coords: np.ndarray, groups: np.ndarray | None, k: int) -> np.ndarray:
    """Return indices (n, k) of the k nearest spots of the same group (self excluded), ``-1`` where a group is too small."""
    from scipy.spatial import cKDTree

    n = coords.shape[0]
    out = np.full((n, k), -1, dtype=np.int64)
    if k <= 0:
        return out
    codes = np.zeros(n, dtype=np.int64) if groups is None else groups
    for g in np.unique(codes):
        idx = np.flatnonzero(codes == g)
        if idx.size < 2:
            continue
        kk = min(k, idx.size - 1)
        _, nb = cKDTree(coords[idx]).query(coords[idx], k=kk + 1)
        nb = np.asarray(nb).reshape(idx.size, kk + 1)
        # drop self (usually the first hit; anywhere, or absent, among duplicated coordinates): keep the first kk others
        other = nb != np.arange(idx.size)[:, None]
        first = np.argsort(~other, axis=1, kind="stable")[:, :kk]
        out[idx, :kk] = idx[np.take_along_axis(nb, first, axis=1)]
    return out


def iter_batches(
    indices: np.ndarray,
    batch_size: int,
    *,
    rng: np.random.Generator | None = None,
    drop_last: bool = False,
    groups: np.ndarray | None = None,
    by_group: bool = False,
) -> Iterator[np.ndarray]:
    """Yield index arrays; shuffled when ``rng`` is given.

    ``drop_last`` drops the incomplete last batch (training, as BLEEP); otherwise the indices are split into
    near-equal batches of at most ``batch_size``. With ``by_group`` every batch holds one group only.
    """
    indices = np.asarray(indices)
    if by_group and groups is not None:
        parts = [indices[groups[indices] == g] for g in np.unique(groups[indices])]
        if rng is not None:
            parts = [parts[i] for i in rng.permutation(len(parts))]
    else:
        parts = [indices]
    for part in parts:
        if rng is not None:
            part = part[rng.permutation(part.size)]
        if drop_last:
            for s in range(0, part.size - batch_size + 1, batch_size):
                yield part[s : s + batch_size]
        elif part.size:
            n_batches = -(-part.size // batch_size)
            yield from np.array_split(part, n_batches)


class SpotData:
    """The arrays of a set of spots; makes :class:`Batch` objects on a device.

    Either ``features`` (n, d) (frozen mode) or ``images`` (n, H, W, 3) uint8 (encoded on the fly) are given.
    Features, expression, coordinates and groups are moved to the device once; images stay on the host.
    """

    def __init__(
        self,
        *,
        features: np.ndarray | None = None,
        images: np.ndarray | None = None,
        expression: np.ndarray | None = None,
        coords: np.ndarray | None = None,
        groups: np.ndarray | None = None,
        neighbors: np.ndarray | None = None,
        tokens: np.ndarray | None = None,
        device: torch.device,
    ):
        if (features is None) == (images is None):
            raise ValueError("SpotData needs exactly one of features= or images=.")
        self.tokens = None if tokens is None else torch.as_tensor(tokens, dtype=torch.float32).to(device)
        self.device = device
        self.images = images
        self.n = int((features if features is not None else images).shape[0])
        self.features = None if features is None else torch.as_tensor(features, dtype=torch.float32).to(device)
        self.expression = None if expression is None else torch.as_tensor(expression, dtype=torch.float32).to(device)
        self.coords = None if coords is None else torch.as_tensor(coords, dtype=torch.float32).to(device)
        self.groups = None if groups is None else torch.as_tensor(groups, dtype=torch.int64).to(device)
        self.neighbors = neighbors

    def _features(self, rows: np.ndarray, encoder, scaler, augment) -> torch.Tensor:
        if self.features is not None:
            f = self.features[torch.as_tensor(rows, device=self.device)]
        else:
            x = images_to_tensor(read_rows(self.images, rows), self.device)
            if augment is not None:
                x = augment(x)
            with autocast(self.device):  # bf16 on CUDA, as in training
                f = encoder(x).float()
        return f if scaler is None else scaler(f)

    def make_batch(
        self,
        idx: np.ndarray,
        *,
        encoder: Callable | None = None,
        scaler: Callable | None = None,
        augment: Callable | None = None,
        n_neighbors: int = 0,
        with_expression: bool = True,
        row_features: torch.Tensor | None = None,
        token_scaler: Callable | None = None,
        row_tokens: torch.Tensor | None = None,
    ) -> Batch:
        """Gather the spots ``idx`` (and their neighbours when ``n_neighbors``) into a :class:`Batch`.

        ``row_features`` are image features of the rows of :func:`batch_image_rows` computed by the caller (e.g. by
        a data-parallel encoder); otherwise they are computed here from ``features`` or ``images``. ``row_tokens``
        are the encoder tokens of the same rows (fine-tuned methods that read tokens).
        """
        idx = np.asarray(idx, dtype=np.int64)
        t_idx = torch.as_tensor(idx, device=self.device)
        if n_neighbors and self.neighbors is None:
            raise ValueError("this method needs spatial neighbours: pass coords=.")
        # the spots and their neighbours are encoded together (one forward pass, augmentation per image)
        rows, inv = batch_image_rows(idx, self.neighbors, n_neighbors)
        feats_all = self._features(rows, encoder, scaler, augment) if row_features is None else row_features
        nb = None
        if n_neighbors:
            nb = self.neighbors[idx, :n_neighbors]
            feats = feats_all[torch.as_tensor(inv[: idx.size], device=self.device)]
            mask = nb >= 0
            pos = np.zeros(nb.shape, dtype=np.int64)
            pos[mask] = inv[idx.size :]
            nb_feats = feats_all[torch.as_tensor(pos, device=self.device)]
            t_mask = torch.as_tensor(mask, device=self.device)
            nb_feats = nb_feats * t_mask.unsqueeze(-1).to(nb_feats.dtype)
        else:
            feats = feats_all
        batch = Batch(
            img_feats=feats,
            expression=self.expression[t_idx] if (with_expression and self.expression is not None) else None,
            index=t_idx,
            coords=None if self.coords is None else self.coords[t_idx],
            groups=None if self.groups is None else self.groups[t_idx],
        )
        if row_tokens is not None:
            batch.img_tokens = (
                row_tokens[torch.as_tensor(inv[: idx.size], device=row_tokens.device)] if n_neighbors else row_tokens
            )
        elif self.tokens is not None:
            tok = self.tokens[t_idx]
            batch.img_tokens = tok if token_scaler is None else token_scaler(tok)
        if nb is not None:
            t_nb = torch.as_tensor(np.where(nb >= 0, nb, 0), device=self.device)
            batch.neighbor_index = torch.as_tensor(nb, device=self.device)
            batch.neighbor_mask = t_mask
            batch.neighbor_img_feats = nb_feats
            if self.coords is not None:
                batch.neighbor_coords = self.coords[t_nb] * t_mask.unsqueeze(-1)
            if with_expression and self.expression is not None:
                batch.neighbor_expression = self.expression[t_nb] * t_mask.unsqueeze(-1)
        return batch


class PatchBatches(torch.utils.data.Dataset):
    """uint8 patches of whole batches, for a :class:`torch.utils.data.DataLoader` whose workers read them.

    Item ``(tag, idx)`` (a batch of spot positions, as yielded by the sampler) gives
    ``{"tag": tag, "idx": idx, "images": uint8 (m, S, S, 3)}``: the images of the batch's rows
    (:func:`batch_image_rows`), or of this process's shard of them in data-parallel training (``shard(n_rows)``
    returns the positions into the rows, see :func:`sthist._engine.distributed.shard_positions`).
    """

    def __init__(
        self,
        images: Any,
        *,
        neighbors: np.ndarray | None = None,
        n_neighbors: int = 0,
        shard: Callable[[int], np.ndarray] | None = None,
    ):
        self.images = images
        self.neighbors = neighbors
        self.n_neighbors = int(n_neighbors)
        self.shard = shard
        self.lazy = is_lazy_array(images)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, item):
        tag, idx = item
        rows, _ = batch_image_rows(idx, self.neighbors, self.n_neighbors)
        if self.shard is not None:
            rows = rows[self.shard(rows.size)]
        in_worker = torch.utils.data.get_worker_info() is not None
        imgs = read_rows(self.images, rows, scheduler="synchronous" if (self.lazy and in_worker) else None)
        return {"tag": tag, "idx": np.asarray(idx, dtype=np.int64), "images": np.ascontiguousarray(imgs)}


class BatchSampler(torch.utils.data.Sampler):
    """Yields ``(tag, idx)`` items from ``make_batches()``, called anew for every pass (epoch)."""

    def __init__(self, make_batches: Callable[[], Iterator[tuple[str, np.ndarray]]]):
        self.make_batches = make_batches

    def __iter__(self):
        return iter(self.make_batches())


# ---------------------------------------------------------------------------------------------------------------------
# input checks shared by training and prediction


def check_expression(expression, *, name: str = "expression") -> np.ndarray:
    """Return expression as float32 (n, g); NaN, infinite or negative values raise with the fix."""
    if hasattr(expression, "toarray"):
        expression = expression.toarray()
    x = np.asarray(expression)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-d array (n_spots, n_genes), got shape {x.shape}.")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {x.shape}).")
    if not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"{name} must be numeric, got dtype {x.dtype}.")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        rows = np.flatnonzero(~np.isfinite(x).all(axis=1))
        raise ValueError(
            f"{name} holds NaN or infinite values (in {rows.size} spots, e.g. rows {rows[:5].tolist()}); "
            "drop those spots or fill the values before training."
        )
    if (x < 0).any():
        raise ValueError(
            f"{name} holds negative values (min {float(x.min()):.4g}); sthist expects non-negative expression such as "
            "log1p-normalised counts (`sthist.pp.normalize_expression`), not z-scores or batch-corrected residuals."
        )
    return x


def check_genes(genes, n_genes: int) -> list[str]:
    """Return gene names as a list of str of length ``n_genes``, unique."""
    if isinstance(genes, str):
        raise TypeError("genes must be a list of gene names, not a single string.")
    genes = [str(g) for g in genes]
    if len(genes) != n_genes:
        raise ValueError(f"genes has {len(genes)} names but expression has {n_genes} columns; they must match.")
    if len(set(genes)) != len(genes):
        dup = sorted({g for g in genes if genes.count(g) > 1})[:5]
        raise ValueError(
            f"gene names must be unique; duplicated: {dup}. Make them unique (`adata.var_names_make_unique()`)."
        )
    return genes


def check_features(features, n: int | None, *, name: str = "features") -> np.ndarray:
    """Return features as float32 (n, d), raising on wrong shape or non-finite values."""
    x = np.asarray(features)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-d array (n_spots, n_features), got shape {x.shape}.")
    if n is not None and x.shape[0] != n:
        raise ValueError(f"{name} has {x.shape[0]} rows but expression has {n} spots; they must match.")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has no columns.")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or infinite values; recompute the embeddings (`sthist.pp.embed_patches`).")
    return x


def check_tokens(tokens, n: int | None, grid: int, *, name: str = "tokens") -> np.ndarray:
    """Return tokens as float32 (n, grid * grid, D), raising on wrong shape or non-finite values."""
    x = np.asarray(tokens)
    if x.ndim != 3 or x.shape[1] != grid * grid or (n is not None and x.shape[0] != n) or x.shape[2] == 0:
        raise ValueError(
            f"{name} must have shape ({'n' if n is None else n}, {grid * grid}, D) (a {grid} x {grid} grid of "
            f"encoder tokens per spot, `encode_tokens(encoder, patches, grid={grid})`), got {x.shape}."
        )
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"{name} hold NaN or infinite values; recompute them.")
    return x


def check_coords(coords, n: int) -> np.ndarray | None:
    """Return coordinates as float64 (n, 2) or None."""
    if coords is None:
        return None
    x = np.asarray(coords, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] < 2 or x.shape[0] != n:
        raise ValueError(f"coords must have shape ({n}, 2) (x, y per spot), got {x.shape}.")
    x = x[:, :2]
    if not np.isfinite(x).all():
        raise ValueError("coords hold NaN or infinite values; drop those spots first.")
    return x


def group_codes(groups, n: int) -> np.ndarray | None:
    """Return integer codes (n,) of the groups (sections) or None."""
    if groups is None:
        return None
    g = np.asarray(groups)
    if g.ndim != 1 or g.shape[0] != n:
        raise ValueError(f"groups must have shape ({n},) (one section label per spot), got {g.shape}.")
    if g.dtype.kind == "f" and np.isnan(g).any():
        raise ValueError("groups hold NaN; give every spot a section label.")
    try:
        _, codes = np.unique(g, return_inverse=True)
    except TypeError:
        _, codes = np.unique(g.astype(str), return_inverse=True)
    return codes.astype(np.int64).reshape(-1)
