"""The weight-free ``"hed-texture"`` descriptor: a fixed, deterministic H&E feature vector per patch.

It needs no weights and no download: colour deconvolution into haematoxylin / eosin / DAB optical densities
(Ruifrok & Johnston 2001), their distribution (mean, spread, quantiles, centre vs whole patch), multi-scale gradient
and Laplacian energy, local contrast, nucleus-density proxies (haematoxylin-rich area, counts of haematoxylin blobs at
two scales), colour and background fraction. It is fast on a CPU and the natural choice for frozen-mode training
without internet.

:meth:`HEDTexture.cell_features` gives the same descriptor for each cell of a ``grid x grid`` split of the patch
(token-level inputs).
"""

from __future__ import annotations

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


class HEDTexture(nn.Module):
    """Deterministic H&E descriptor; see the module docstring. Input (B, 3, H, W) in [0, 1], H, W >= 8."""

    scales = (1, 2, 4, 8)
    max_working_size = 128
    quantiles = (0.1, 0.5, 0.9)
    min_size = 8
    """Smallest patch (or token cell) side in pixels."""

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
        """Separable (2r+1) x (2r+1) mean filter with replicate padding (cumulative sums), same size as ``x``."""
        k = 2 * r + 1
        for dim, pad in ((-1, (r, r, 0, 0)), (-2, (0, 0, r, r))):
            c = F.pad(x, pad, mode="replicate").cumsum(dim)
            n = c.shape[dim]
            c = torch.cat([torch.zeros_like(c.narrow(dim, 0, 1)), c], dim=dim)
            x = (c.narrow(dim, k, n + 1 - k) - c.narrow(dim, 0, n + 1 - k)) / k
        return x

    @staticmethod
    def _boxmax(x, r: int):
        """Separable (2r+1) x (2r+1) max filter with replicate padding, same size as ``x``."""
        k = 2 * r + 1
        x = F.max_pool2d(F.pad(x, (r, r, 0, 0), mode="replicate"), (1, k), stride=1)
        return F.max_pool2d(F.pad(x, (0, 0, r, r), mode="replicate"), (k, 1), stride=1)

    def _laplace_energy(self, x):
        return (x - self._box(x, 1)).abs().mean(dim=(-2, -1))

    def _quantiles(self, flat):
        # linear interpolation between order statistics, like torch.quantile but without its size limit
        step = max(1, int(np.sqrt(flat.shape[-1] / 4096)))  # a regular subsample of at most ~4096 pixels
        s = flat[..., ::step].sort(dim=-1).values
        n = s.shape[-1]
        out = []
        for q in self.quantiles:
            pos = q * (n - 1)
            lo, hi = int(np.floor(pos)), int(np.ceil(pos))
            out.append(s[..., lo] + (s[..., hi] - s[..., lo]) * (pos - lo))
        return torch.cat(out, dim=-1)

    def forward(self, x):
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self._forward(x)

    @staticmethod
    def _check_shape(x):
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"hed-texture expects images of shape (B, 3, H, W), got {tuple(x.shape)}.")

    def _forward(self, x):
        self._check_shape(x)
        if min(x.shape[-2:]) < self.min_size:
            raise ValueError(
                f"hed-texture needs patches of at least {self.min_size} x {self.min_size} pixels, "
                f"got {tuple(x.shape[-2:])}."
            )
        x = x.float().clamp(0.0, 1.0)
        f = -(-min(x.shape[-2:]) // self.max_working_size)  # work at <= max_working_size pixels
        if f > 1:
            x = F.avg_pool2d(x, f)
        b, _, h, w = x.shape
        od = -torch.log(x.clamp_min(1.0 / 255.0))  # optical density, >= 0
        hed = torch.einsum("bchw,cd->bdhw", od, self.hed_from_rgb)
        dens = od.mean(dim=1, keepdim=True)
        ch = torch.cat([hed, dens], dim=1)  # H, E, DAB, total density
        feats = []
        # distribution of stain densities
        flat = ch.flatten(2)
        feats += [flat.mean(-1), flat.std(-1, unbiased=False)]
        feats.append(self._quantiles(flat))
        # the centre of the patch, where the spot is
        ch_c = ch[..., h // 4 : h - h // 4, w // 4 : w - w // 4]
        feats.append(ch_c.mean(dim=(-2, -1)))
        # multi-scale texture of H, E and density
        tex = ch[:, [0, 1, 3]]
        for s in self.scales:
            xs = F.avg_pool2d(tex, s) if min(h, w) // s >= 4 else F.adaptive_avg_pool2d(tex, 4)
            feats += [self._grad_energy(xs), self._laplace_energy(xs)]
        # local contrast: standard deviation in 7 x 7 windows
        m1 = self._box(ch, 3)
        m2 = self._box(ch * ch, 3)
        feats.append((m2 - m1 * m1).clamp_min(0).sqrt().mean(dim=(-2, -1)))
        # nucleus-density proxies on the haematoxylin channel
        hem = ch[:, :1]
        mu, sd = hem.mean(dim=(-2, -1), keepdim=True), hem.std(dim=(-2, -1), keepdim=True, unbiased=False)
        for t in (0.25, 0.5, 1.0):
            feats.append((hem > t).float().mean(dim=(-2, -1)))
        feats.append((hem > mu + sd).float().mean(dim=(-2, -1)))
        for r in (1, 2):
            sm = self._box(hem, r)
            peak = self._boxmax(sm, r)
            blobs = (sm >= peak) & (sm > torch.maximum(mu + 0.5 * sd, torch.full_like(mu, 0.25)))
            feats.append(blobs.float().mean(dim=(-2, -1)) * 100.0)
        # colour, saturation, background, stain balance and H-E co-variation
        rgb = x.flatten(2)
        feats += [rgb.mean(-1), rgb.std(-1, unbiased=False)]
        sat = x.max(dim=1).values - x.min(dim=1).values
        feats.append(sat.mean(dim=(-2, -1)).unsqueeze(1))
        feats.append((x.min(dim=1).values > 0.85).float().mean(dim=(-2, -1)).unsqueeze(1))
        hm, em = flat[:, 0].mean(-1), flat[:, 1].mean(-1)
        feats.append((hm / (hm.abs() + em.abs() + 1e-6)).unsqueeze(1))
        hc = flat[:, 0] - flat[:, 0].mean(-1, keepdim=True)
        ec = flat[:, 1] - flat[:, 1].mean(-1, keepdim=True)
        corr = (hc * ec).mean(-1) / (hc.std(-1, unbiased=False) * ec.std(-1, unbiased=False) + 1e-6)
        feats.append(corr.unsqueeze(1))
        return torch.cat([f.reshape(b, -1) for f in feats], dim=1)

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
                f"hed-texture tokens need cells of at least {self.min_size} x {self.min_size} pixels, but a "
                f"{height} x {width} pixel patch split into a {grid} x {grid} grid gives cells of {cell_h} x {cell_w} "
                f"pixels; {hint}."
            )

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
        rows = [h * i // grid for i in range(grid + 1)]
        cols = [w * j // grid for j in range(grid + 1)]
        # cells of equal size are described in one batched call (at most four sizes)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i in range(grid):
            for j in range(grid):
                by_size.setdefault((rows[i + 1] - rows[i], cols[j + 1] - cols[j]), []).append(i * grid + j)
        out = torch.empty((b, grid * grid, self.out_dim), dtype=torch.float32, device=x.device)
        for cells in by_size.values():
            crops = [x[..., rows[c // grid] : rows[c // grid + 1], cols[c % grid] : cols[c % grid + 1]] for c in cells]
            feats = self(torch.stack(crops, dim=1).flatten(0, 1))
            out[:, torch.tensor(cells, device=x.device)] = feats.view(b, len(cells), -1)
        return out
