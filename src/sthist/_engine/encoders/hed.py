"""The weight-free ``"hed-texture"`` descriptor: a fixed, deterministic H&E feature vector per patch.

It needs no weights and no download: colour deconvolution into haematoxylin / eosin / DAB optical densities
(Ruifrok & Johnston 2001), their distribution (mean, spread, quantiles, centre vs whole patch), multi-scale gradient
and Laplacian energy, local contrast, nucleus-density proxies (haematoxylin-rich area, counts of haematoxylin blobs at
two scales), colour and background fraction. It is fast on a CPU and the natural choice for frozen-mode training
without internet.

:meth:`HEDTexture.cell_features` gives the same descriptor for each cell of a ``grid x grid`` split of the patch
(token-level inputs). :meth:`HEDTexture.from_uint8` computes either from uint8 RGB patches (n, H, W, 3) directly,
converting a few patches at a time, which is what :func:`~sthist._engine.encoders.encode_patches` and
:func:`~sthist._engine.encoders.encode_tokens` use.

Speed. Patches are described a few at a time (:attr:`HEDTexture.chunk_pixels` pixels per pass), so the
intermediate images stay small and are reused by the allocator instead of being allocated afresh for a whole
batch. The quantiles are exact order statistics found without sorting (:func:`_order_statistics`: a histogram per
row, then a sort of the few values in the bins that hold the wanted ranks), and the max filter of the blob detector
uses shifted maxima instead of ``max_pool2d``. The working image, optical densities, stain channels and box filters
are the same floating-point operations on the same values as in the straightforward version
(``tests/test_hed_fast.py``); means and standard deviations are accumulated in float64, so that a patch's features
do not depend on its batch (on flat patches the float32 rounding of the mean used to decide the pixel counts above
``mean + sd``).

``"hed-fast"`` (:class:`HEDFast`) is the same 68-value descriptor of a small thumbnail of each patch: the uint8
patch is resized so that its shorter side is 56 px (antialiased bilinear interpolation on the uint8 values, as
torch's ``F.interpolate(..., antialias=True)`` does it), then described at that resolution: 1/16 of the pixels of
a 224 px patch, which makes it about 3.5 times as fast as ``hed-texture`` there (``benchmarks/throughput.py
--hed-texture`` times both side by side; the resize is about 5 % of the cost). Float input is quantised to uint8
first, so that the float and uint8 paths give the same features; token cells are cropped at full resolution and
thumbnailed one by one.

:class:`HEDTextureContext` (``"hed-texture-ctx"``) concatenates the descriptor of the whole patch and of its
central half.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

HED_SPEC = "hed-texture"
"""The encoder spec of the descriptor."""

# stain vectors (rows: haematoxylin, eosin, DAB) in optical-density RGB space, Ruifrok & Johnston (2001)
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64)
_RGB_FROM_HED /= np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)

_BINS = 1024
"""Histogram bins per row in :func:`_order_statistics`."""


def _order_statistics(v: torch.Tensor, ranks: list[int]) -> torch.Tensor:
    """The ``ranks``-th smallest values (0-based) along the last dim of ``v`` (..., n): ``v.sort(-1).values[..., ranks]``.

    Each row is binned by value into :data:`_BINS` equal bins between its minimum and maximum; the bin index is a
    non-decreasing function of the value, so the sorted row is the concatenation of its bins in order. The
    cumulative bin counts give the bin of each rank and the rank within that bin; only the values in those bins
    (a small fraction of the row) are then sorted. Rows holding NaN are sorted whole, as ``sort`` orders NaN.
    """
    lead = v.shape[:-1]
    rows = int(np.prod(lead))
    mn = v.amin(-1, keepdim=True)
    span = v.amax(-1, keepdim=True) - mn
    if not bool(torch.isfinite(span).all()):
        return v.sort(dim=-1).values[..., ranks]
    width = _BINS + 1  # the maximum can land in bin _BINS after rounding
    scale = _BINS / span.clamp_min(_BINS / 1e38)  # finite; rows of equal values fall into bin 0
    key = (v - mn).mul_(scale).to(torch.int32)
    offset = torch.arange(rows, device=v.device, dtype=torch.int32).mul_(width).view(*lead, 1)
    key += offset
    counts = torch.bincount(key.view(-1), minlength=rows * width).view(rows, width)
    cum = counts.cumsum(1)
    want = torch.tensor(ranks, device=v.device, dtype=cum.dtype).expand(rows, len(ranks)).contiguous()
    bin_ = torch.searchsorted(cum, want, right=True)  # cum[bin - 1] <= rank < cum[bin]
    within = want - (cum.gather(1, bin_) - counts.gather(1, bin_))
    # global bin ids (*lead, len(ranks)), non-decreasing along the last dim
    gbin = (bin_.view(*lead, len(ranks)) + offset).to(torch.int32)
    # the values in those bins; the bins of consecutive ranks are the same or have only empty bins between them
    runs = [[0]]
    for i in range(1, len(ranks)):
        if ranks[i] - ranks[i - 1] <= 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    sel = None
    for run in runs:
        part = (key >= gbin[..., run[0], None]).logical_and_(key <= gbin[..., run[-1], None])
        sel = part if sel is None else sel.logical_or_(part)
    where = sel.nonzero().unbind(1)
    cand_key, cand_val = key[where], v[where]
    order = cand_val.argsort(stable=True)
    order = order[cand_key[order].argsort(stable=True)]  # by bin, then by value
    start = torch.searchsorted(cand_key[order], gbin.view(rows, len(ranks)))
    return cand_val[order][start + within].view(*lead, len(ranks))


class HEDTexture(nn.Module):
    """Deterministic H&E descriptor; see the module docstring. Input (B, 3, H, W) in [0, 1], H, W >= 8."""

    name = HED_SPEC
    """The encoder spec, used in error messages."""
    scales = (1, 2, 4, 8)
    max_working_size = 128
    quantiles = (0.1, 0.5, 0.9)
    min_size = 8
    """Smallest patch (or token cell) side in pixels."""
    chunk_pixels = 1 << 19
    """Input pixels described per pass (about ten 224 px patches); the result does not depend on it."""

    def __init__(self):
        super().__init__()
        self.register_buffer("hed_from_rgb", torch.tensor(_HED_FROM_RGB, dtype=torch.float32), persistent=False)
        self.out_dim = int(self.forward(torch.full((1, 3, 32, 32), 0.5)).shape[1])

    @staticmethod
    def _grad_energy(x):
        gx = x[..., :, 1:] - x[..., :, :-1]
        gy = x[..., 1:, :] - x[..., :-1, :]
        return gx.abs().mean(dim=(-2, -1)) + gy.abs().mean(dim=(-2, -1))

    @staticmethod
    def _box(x, r: int):
        """Separable (2r+1) x (2r+1) mean filter with replicate padding (cumulative sums), same size as ``x``.

        Each output is ``(c[i + k] - c[i]) / k`` over the cumulative sums ``c`` (a leading zero, then the padded
        row), as it always was; the leading zero is not materialised (``c[k] - 0`` is ``c[k]``).
        """
        k = 2 * r + 1
        for dim in (-1, -2):
            c = HEDTexture._pad_replicate(x, dim, r).cumsum_(dim)
            n = c.shape[dim] + 1 - k  # the unpadded size
            x = torch.empty_like(c.narrow(dim, 0, n))
            x.narrow(dim, 0, 1).copy_(c.narrow(dim, k - 1, 1))
            torch.sub(c.narrow(dim, k, n - 1), c.narrow(dim, 0, n - 1), out=x.narrow(dim, 1, n - 1))
            x.div_(k)
        return x

    @staticmethod
    def _pad_replicate(x, dim: int, r: int):
        """``x`` with its first and last slice along ``dim`` repeated ``r`` times before and after (``F.pad`` replicate)."""
        n = x.shape[dim]
        shape = list(x.shape)
        shape[dim] = n + 2 * r
        out = x.new_empty(shape)
        out.narrow(dim, r, n).copy_(x)
        out.narrow(dim, 0, r).copy_(x.narrow(dim, 0, 1).expand_as(out.narrow(dim, 0, r)))
        out.narrow(dim, n + r, r).copy_(x.narrow(dim, n - 1, 1).expand_as(out.narrow(dim, 0, r)))
        return out

    @staticmethod
    def _box3(x):
        """3 x 3 mean filter with replicate padding (sums of shifted copies), same size as ``x`` (at least 2 x 2)."""
        for dim in (-1, -2):
            n = x.shape[dim]
            y = x.clone()
            y.narrow(dim, 1, n - 1).add_(x.narrow(dim, 0, n - 1))
            y.narrow(dim, 0, n - 1).add_(x.narrow(dim, 1, n - 1))
            y.narrow(dim, 0, 1).add_(x.narrow(dim, 0, 1))
            y.narrow(dim, n - 1, 1).add_(x.narrow(dim, n - 1, 1))
            x = y.div_(3)
        return x

    @staticmethod
    def _boxmax(x, r: int):
        """Separable (2r+1) x (2r+1) max filter with replicate padding, same size as ``x``.

        The maximum over a window clipped to the image (what replicate padding gives), from shifted copies.
        """
        for dim in (-1, -2):
            n = x.shape[dim]
            out = x.clone()
            for j in range(1, min(r, n - 1) + 1):
                head, tail = out.narrow(dim, 0, n - j), out.narrow(dim, j, n - j)
                torch.maximum(head, x.narrow(dim, j, n - j), out=head)
                torch.maximum(tail, x.narrow(dim, 0, n - j), out=tail)
            x = out
        return x

    @staticmethod
    def _mean_std(flat):
        """Mean and (biased) standard deviation along the last dim, accumulated in float64, and the centred values.

        Summing in float64 makes both the float32 values correctly rounded but for vanishingly rare ties, so they
        do not depend on how the reduction is split (batch size, threads). That matters on flat patches, where the
        rounding of the mean decides whether every pixel lies above ``mean + sd``.
        """
        n = flat.shape[-1]
        mean = (flat.sum(-1, dtype=torch.float64) / n).float()
        cen = flat - mean.unsqueeze(-1)
        std = (cen.square().sum(-1, dtype=torch.float64) / n).sqrt().float()
        return mean, std, cen

    def _quantiles(self, flat, order):
        """Quantiles of the planes ``flat[:, order]`` (B, C, n): (B, len(quantiles) * C), quantile-major."""
        # linear interpolation between order statistics, like torch.quantile but without its size limit
        step = max(1, int(np.sqrt(flat.shape[-1] / 4096)))  # a regular subsample of at most ~4096 pixels
        s = flat[..., ::step]
        n = s.shape[-1]
        where = []
        for q in self.quantiles:
            pos = q * (n - 1)
            where.append((pos, int(np.floor(pos)), int(np.ceil(pos))))
        ranks = sorted({r for _, lo, hi in where for r in (lo, hi)})
        vals = _order_statistics(s, ranks)[:, order]
        out = []
        for pos, lo, hi in where:
            v_lo, v_hi = vals[..., ranks.index(lo)], vals[..., ranks.index(hi)]
            out.append(v_lo + (v_hi - v_lo) * (pos - lo))
        return torch.cat(out, dim=-1)

    def forward(self, x):
        with torch.autocast(device_type=x.device.type, enabled=False):
            self._check_shape(x)
            h, w = int(x.shape[-2]), int(x.shape[-1])
            self._check_size(h, w)
            return self._chunked(x, (h, w), lambda part: self._describe(part.float().clamp(0.0, 1.0)))

    def _check_shape(self, x):
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"{self.name} expects images of shape (B, 3, H, W), got {tuple(x.shape)}.")

    def _check_size(self, height: int, width: int) -> None:
        if min(height, width) < self.min_size:
            raise ValueError(
                f"{self.name} needs patches of at least {self.min_size} x {self.min_size} pixels, "
                f"got {(height, width)}."
            )

    def _images_per_pass(self, height: int, width: int) -> int:
        """How many images of ``height x width`` pixels are described per pass (:attr:`chunk_pixels` worth)."""
        return max(1, self.chunk_pixels // max(1, height * width))

    def _chunked(
        self, x: torch.Tensor, size: tuple[int, int], describe: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """``describe`` applied to a few images of ``x`` (``size`` pixels each) at a time (dim 0), concatenated."""
        n = int(x.shape[0])
        step = self._images_per_pass(*size)
        if n <= step:
            return describe(x)
        return torch.cat([describe(x[i : i + step]) for i in range(0, n, step)])

    def _describe(self, x):
        """The descriptor of float images ``x`` (B, 3, H, W) already clamped to [0, 1] (any memory layout).

        The same computation as the straightforward version (``tests/test_hed_fast.py``): the same working image
        (``avg_pool2d``'s sum, term by term), optical densities, stain channels and box filters, value for value;
        channels are kept as separate contiguous planes and statistics are reduced directly.
        """
        b = int(x.shape[0])
        f = -(-min(x.shape[-2:]) // self.max_working_size)  # work at <= max_working_size pixels
        h, w = int(x.shape[-2]) // f, int(x.shape[-1]) // f
        n = h * w
        if f > 1:  # avg_pool2d(x, f): the sum in its order, then divided
            # channels-last images (as from uint8 patches) are pooled as (B, H, W, 3), then made planar
            last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
            xv = x.permute(0, 2, 3, 1) if last else x
            pooled = None
            for i in range(f):
                for j in range(f):
                    if last:
                        part = xv[:, i : i + f * h : f, j : j + f * w : f]
                    else:
                        part = xv[..., i : i + f * h : f, j : j + f * w : f]
                    pooled = part.clone() if pooled is None else pooled.add_(part)
            pooled.div_(f * f)
            x = pooled.permute(0, 3, 1, 2) if last else pooled
        rgb = x.contiguous()  # (B, 3, h, w) planes
        od = rgb.clamp_min(1.0 / 255.0).log_().neg_()  # optical density, >= 0
        # planes H, E, total density, DAB (the texture channels first; features are reordered to H, E, DAB,
        # density), then their squares for the local contrast
        z = torch.empty((b, 8, h, w), dtype=torch.float32, device=x.device)
        ch = z[:, :4]
        m = self.hed_from_rgb
        for plane, d in ((0, 0), (1, 1), (3, 2)):  # od @ hed_from_rgb, summed in the order of the matrix product
            torch.mul(od[:, 0], m[0, d], out=ch[:, plane]).add_(od[:, 1] * m[1, d]).add_(od[:, 2] * m[2, d])
        torch.add(od[:, 0], od[:, 1], out=ch[:, 2]).add_(od[:, 2]).div_(3)  # od.mean(dim=1)
        order = [0, 1, 3, 2]
        flat = ch.reshape(b, 4, n)
        mean, std, cen = self._mean_std(flat)
        feats = [mean[:, order], std[:, order]]
        # distribution of stain densities
        feats.append(self._quantiles(flat, order))
        # the centre of the patch, where the spot is
        feats.append(ch[..., h // 4 : h - h // 4, w // 4 : w - w // 4].mean(dim=(-2, -1))[:, order])
        # multi-scale texture of H, E and density
        tex = ch[:, :3]
        xs = tex
        for s in self.scales:
            if min(h, w) // s < 4:
                xs = F.adaptive_avg_pool2d(tex, 4)
            elif s > 1:  # avg_pool2d(tex, s) as 2 x 2 means of the previous scale
                hs, ws = xs.shape[-2] // 2, xs.shape[-1] // 2
                xs = (
                    xs[..., 0 : 2 * hs : 2, 0 : 2 * ws : 2]
                    + xs[..., 0 : 2 * hs : 2, 1 : 2 * ws : 2]
                    + xs[..., 1 : 2 * hs : 2, 0 : 2 * ws : 2]
                    + xs[..., 1 : 2 * hs : 2, 1 : 2 * ws : 2]
                ) / 4
            feats += [self._grad_energy(xs), (xs - self._box3(xs)).abs_().mean(dim=(-2, -1))]
        # local contrast: standard deviation in 7 x 7 windows
        torch.mul(ch, ch, out=z[:, 4:])
        mm = self._box(z, 3)
        m1, m2 = mm[:, :4], mm[:, 4:]
        feats.append((m2 - m1 * m1).clamp_min_(0).sqrt_().mean(dim=(-2, -1))[:, order])
        # nucleus-density proxies on the haematoxylin channel
        hem = ch[:, :1]
        mu, sd = mean[:, :1, None, None], std[:, :1, None, None]
        for t in (0.25, 0.5, 1.0):
            feats.append((hem > t).sum(dim=(-2, -1)) / n)
        feats.append((hem > mu + sd).sum(dim=(-2, -1)) / n)
        thr = torch.maximum(mu + 0.5 * sd, torch.full_like(mu, 0.25))
        for r in (1, 2):
            sm = self._box(hem, r)
            blobs = (sm >= self._boxmax(sm, r)).logical_and_(sm > thr)
            feats.append((blobs.sum(dim=(-2, -1)) / n) * 100.0)
        # colour, saturation, background, stain balance and H-E co-variation
        feats += list(self._mean_std(rgb.view(b, 3, n))[:2])
        lo = torch.minimum(torch.minimum(rgb[:, 0], rgb[:, 1]), rgb[:, 2])
        hi = torch.maximum(torch.maximum(rgb[:, 0], rgb[:, 1]), rgb[:, 2])
        feats.append((hi - lo).mean(dim=(-2, -1)).unsqueeze(1))
        feats.append(((lo > 0.85).sum(dim=(-2, -1)) / n).unsqueeze(1))
        hm, em = mean[:, 0], mean[:, 1]
        feats.append((hm / (hm.abs() + em.abs() + 1e-6)).unsqueeze(1))
        corr = (cen[:, 0] * cen[:, 1]).mean(-1) / (std[:, 0] * std[:, 1] + 1e-6)
        feats.append(corr.unsqueeze(1))
        return torch.cat([f.reshape(b, -1).float() for f in feats], dim=1)

    def check_grid(self, grid: int, height: int, width: int) -> None:
        """Raise a :class:`ValueError` when a ``grid x grid`` split of a ``height x width`` patch has too small cells.

        Parameters
        ----------
        grid
            Cells per side (a positive integer, already checked).
        height, width
            Patch size in pixels.
        """
        cell_h, cell_w = height // grid, width // grid
        if min(cell_h, cell_w) < self.min_size:
            finest = min(height, width) // self.min_size
            hint = f"use grid <= {finest} or larger patches" if finest >= 1 else "use larger patches"
            raise ValueError(
                f"{self.name} tokens need cells of at least {self.min_size} x {self.min_size} pixels, but a "
                f"{height} x {width} pixel patch split into a {grid} x {grid} grid gives cells of {cell_h} x {cell_w} "
                f"pixels; {hint}."
            )

    @staticmethod
    def _cells_by_size(grid: int, height: int, width: int) -> tuple[list[int], list[int], list[list[int]]]:
        """Cell boundaries (rows, cols) and the cells of each size, row-major indices (at most four sizes)."""
        rows = [height * i // grid for i in range(grid + 1)]
        cols = [width * j // grid for j in range(grid + 1)]
        by_size: dict[tuple[int, int], list[int]] = {}
        for i in range(grid):
            for j in range(grid):
                by_size.setdefault((rows[i + 1] - rows[i], cols[j + 1] - cols[j]), []).append(i * grid + j)
        return rows, cols, list(by_size.values())

    def cell_features(self, x: torch.Tensor, grid: int) -> torch.Tensor:
        """The descriptor of each cell of a ``grid x grid`` split of the patches.

        Cell boundaries are ``floor(i * H / grid)`` (and likewise along the width), so cells differ in size by at
        most one pixel and every pixel belongs to exactly one cell. With ``grid=1`` this equals :meth:`forward`.

        Parameters
        ----------
        x
            Images (B, 3, H, W) in [0, 1].
        grid
            Cells per side (a positive integer); every cell must be at least :attr:`min_size` pixels wide and high.

        Returns
        -------
        float32 tensor (B, grid * grid, out_dim), cells in row-major order.

        Raises
        ------
        ValueError
            Wrong image shape, or cells smaller than :attr:`min_size` pixels.
        """
        self._check_shape(x)
        b, _, h, w = (int(v) for v in x.shape)
        self.check_grid(grid, h, w)
        rows, cols, groups = self._cells_by_size(grid, h, w)
        # cells of equal size are described in one batched call
        out = torch.empty((b, grid * grid, self.out_dim), dtype=torch.float32, device=x.device)
        for cells in groups:
            crops = [x[..., rows[c // grid] : rows[c // grid + 1], cols[c % grid] : cols[c % grid + 1]] for c in cells]
            feats = self(torch.stack(crops, dim=1).flatten(0, 1))
            out[:, torch.tensor(cells, device=x.device)] = feats.view(b, len(cells), -1)
        return out

    def from_uint8(self, patches: torch.Tensor, grid: int | None = None) -> torch.Tensor:
        """The descriptor of uint8 RGB patches, converted to float a few at a time.

        Equal to ``forward(images)`` (``grid=None``) or ``cell_features(images, grid)`` with
        ``images = patches.permute(0, 3, 1, 2).float() / 255``, without a float copy of all patches.

        Parameters
        ----------
        patches
            uint8 tensor (B, H, W, 3) (channels last, as stored).
        grid
            ``None`` for one vector per patch, else cells per side as in :meth:`cell_features`.

        Returns
        -------
        float32 tensor (B, out_dim), or (B, grid * grid, out_dim) with ``grid``.

        Raises
        ------
        ValueError
            Not a uint8 (B, H, W, 3) tensor, or patches (cells) smaller than :attr:`min_size` pixels.
        """
        if not isinstance(patches, torch.Tensor) or patches.dtype != torch.uint8:
            got = patches.dtype if isinstance(patches, torch.Tensor) else type(patches).__name__
            raise ValueError(f"{self.name} from_uint8 expects a uint8 tensor (B, H, W, 3), got {got}.")
        if patches.ndim != 4 or patches.shape[-1] != 3:
            raise ValueError(
                f"{self.name} from_uint8 expects patches of shape (B, H, W, 3), got {tuple(patches.shape)}."
            )
        b, h, w, _ = (int(v) for v in patches.shape)
        describe = self._describe_uint8
        with torch.autocast(device_type=patches.device.type, enabled=False):
            if grid is None:
                self._check_size(h, w)
                return self._chunked(patches, (h, w), describe)
            self.check_grid(grid, h, w)
            rows, cols, groups = self._cells_by_size(grid, h, w)
            out = torch.empty((b, grid * grid, self.out_dim), dtype=torch.float32, device=patches.device)
            for cells in groups:
                idx = torch.tensor(cells, device=patches.device)
                crops = [
                    patches[:, rows[c // grid] : rows[c // grid + 1], cols[c % grid] : cols[c % grid + 1]]
                    for c in cells
                ]
                crops = torch.stack(crops, dim=1).flatten(0, 1)  # (B * cells, h, w, 3), patch-major
                feats = self._chunked(crops, (int(crops.shape[1]), int(crops.shape[2])), describe)
                out[:, idx] = feats.view(b, len(cells), -1)
            return out

    def _describe_uint8(self, patches: torch.Tensor) -> torch.Tensor:
        """The descriptor of uint8 RGB patches (B, h, w, 3), as the float images ``images_to_tensor`` gives."""
        # in [0, 1], so the clamping of forward changes nothing
        return self._describe(patches.float().div_(255.0).permute(0, 3, 1, 2))


HED_CONTEXT_SPEC = "hed-texture-ctx"
"""The encoder spec of the two-scale descriptor."""


class HEDTextureContext(HEDTexture):
    """Two fields of view in one weight-free vector: the whole patch (the context) and its centre (the spot).

    The descriptor of :class:`HEDTexture` for the whole patch, followed by the descriptor of its central crop of
    ``centre`` times the side (half by default): extracted at 224 px and 1 µm/px, the whole patch sees 224 µm of
    tissue around a spot and the crop the 112 µm under it. Tokens (:meth:`cell_features`) are the same two-part
    descriptor of each cell. Twice the width of ``hed-texture`` (136 values) and about 1.25 times its cost.
    """

    name = HED_CONTEXT_SPEC
    centre = 0.5
    """Side of the central crop as a fraction of the patch side."""

    def _describe(self, x):
        h, w = int(x.shape[-2]), int(x.shape[-1])
        ch, cw = max(self.min_size, round(h * self.centre)), max(self.min_size, round(w * self.centre))
        top, left = (h - ch) // 2, (w - cw) // 2
        inner = x[..., top : top + ch, left : left + cw]
        return torch.cat([super()._describe(x), super()._describe(inner)], dim=-1)


HED_FAST_SPEC = "hed-fast"
"""The encoder spec of the descriptor of a thumbnail."""


class HEDFast(HEDTexture):
    """The ``hed-texture`` descriptor (68 values) of a small thumbnail of the patch: several times faster.

    Definition. The uint8 RGB patch is resized so that its shorter side is :attr:`thumbnail` pixels, the aspect
    kept (the longer side ``round(long * thumbnail / short)``), by antialiased bilinear interpolation on the uint8
    values: ``F.interpolate(patch, mode="bilinear", antialias=True)`` on a uint8 tensor, which rounds to uint8.
    Patches whose shorter side is at most :attr:`thumbnail` are used as they are. The thumbnail, as floats in
    [0, 1], is then described by :meth:`HEDTexture._describe`, which at up to 128 px works at its full
    resolution. A 224 px patch becomes a 56 px thumbnail: the statistics describe the same field of view at a
    quarter of the resolution (1/16 of the pixels).

    - :meth:`from_uint8` (what :func:`~sthist._engine.encoders.encode_patches` uses) resizes the uint8 patches
      directly, :attr:`chunk_pixels` input pixels at a time.
    - :meth:`forward` takes float images (B, 3, H, W) in [0, 1] and quantises them to uint8 first
      (``x.clamp(0, 1).mul(255).round()``), then takes the same path, so that it gives exactly the features of
      :meth:`from_uint8` on the uint8 patches the images came from: there is one definition.
    - Tokens (:meth:`cell_features`, ``from_uint8(..., grid=g)``): each cell is cropped from the full-resolution
      patch as in :class:`HEDTexture`, then thumbnailed and described the same way (cells at most
      :attr:`thumbnail` pixels on their shorter side are used as they are, so e.g. the 32 px cells of a 7 x 7 grid
      on 224 px patches give exactly ``hed-texture``'s tokens). Cells must be at least :attr:`min_size` pixels.

    torch's uint8 resize runs on the CPU only: on another device the patches are resized on the CPU and the
    thumbnails moved back, so that the features are the same on every device up to float rounding in the
    descriptor.
    """

    name = HED_FAST_SPEC
    thumbnail = 56
    """Side of the thumbnail in pixels (its shorter side, for non-square patches)."""
    chunk_pixels = 64 * 224 * 224
    """Input pixels resized and described per pass (64 patches of 224 px: the fastest on 2 CPU threads); the result
    does not depend on it."""
    thumbnail_pixels = HEDTexture.chunk_pixels
    """At most this many thumbnail pixels are described per pass (bounds the memory for small patches)."""

    def thumbnail_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) of the thumbnail of a ``height x width`` patch (the patch's own size if small)."""
        short, t = min(height, width), self.thumbnail
        if short <= t:
            return height, width
        # round half up of side * t / short; the shorter side becomes exactly t
        return (2 * height * t + short) // (2 * short), (2 * width * t + short) // (2 * short)

    def _images_per_pass(self, height: int, width: int) -> int:
        th, tw = self.thumbnail_size(height, width)
        return max(1, min(self.chunk_pixels // max(1, height * width), self.thumbnail_pixels // max(1, th * tw)))

    def _thumbnails(self, patches: torch.Tensor) -> torch.Tensor:
        """uint8 thumbnails (B, 3, h, w) (a channels-last view) of uint8 RGB patches (B, H, W, 3)."""
        x = patches.permute(0, 3, 1, 2)
        size = self.thumbnail_size(int(x.shape[-2]), int(x.shape[-1]))
        if size == tuple(x.shape[-2:]):
            return x
        # torch's uint8 antialiased resize exists on the CPU only; elsewhere resize there and move back
        small = F.interpolate(x.cpu(), size=size, mode="bilinear", align_corners=False, antialias=True)
        return small.to(x.device)

    def _describe_uint8(self, patches: torch.Tensor) -> torch.Tensor:
        return self._describe(self._thumbnails(patches).float().div_(255.0))

    def forward(self, x):
        """The descriptor of float images ``x`` (B, 3, H, W) in [0, 1]: ``from_uint8`` of ``x`` quantised to uint8."""
        self._check_shape(x)
        x = x.detach()
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise ValueError(f"{self.name} got images with NaN or infinite values.")
        q = x.float().clamp(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)
        # channels last and contiguous, as uint8 patches are stored
        return self.from_uint8(q.permute(0, 2, 3, 1).contiguous())
