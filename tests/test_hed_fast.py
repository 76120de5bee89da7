"""The fast ``hed-texture`` descriptor against a straightforward reference implementation of the same algorithm.

``ReferenceHED`` below is the descriptor as it was before it was made faster (whole-batch tensors, ``sort`` for the
quantiles, ``max_pool2d`` for the blob detector), kept verbatim. The fast version computes every feature by the
same floating-point operations on the same values, except that means and standard deviations are accumulated in
float64; the differences are at float32 rounding level and every feature must agree to 1e-4 of its scale.

Features that count pixels (thresholds, blob peaks, background) may differ by one pixel's worth, where a value ties
its threshold at rounding level. On flat patches (constant colour, flat stripes) the reference's counts of pixels
above ``mean + sd`` and of blob peaks are rounding artefacts: every pixel ties the threshold, and the reference's
answer there changes with the batch the patch is in (``test_reference_depends_on_batch_on_flat_patches``). Those
three counts are not compared on the flat structured patches (``FLAT``); the fast version gives one answer for a
patch whatever its batch (``test_independent_of_batch``), from a mean and spread that are correctly rounded.

The local contrast (``LOCAL_CONTRAST``: the standard deviation in 7 x 7 windows, ``sqrt(E[x^2] - E[x]^2)``) of a flat
patch is the square root of a cancellation: both implementations compute it in float32, where ``E[x^2] - E[x]^2`` of
a constant region is rounding noise of order ``eps * x^2``, so its square root is of order ``sqrt(eps) * x`` (about
3.5e-4 of the value), and which noise a kernel leaves depends on the order of its float32 sums (torch 2.14 sums in
another order than 2.13; a float64 computation of the same feature differs from both by up to 0.7 %). On flat
patches these features are compared within ``sqrt(eps)`` times the level of their channel (its largest mean density),
not within 1e-4 of the feature's own scale.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from sthist._engine.encoders import build_image_encoder, encode_patches, encode_tokens
from sthist._engine.encoders import hed as hed_module
from sthist._engine.encoders.hed import HEDTexture

torch.set_num_threads(1)

# features that count pixels: three H thresholds, H > mean + sd, blobs at two scales (x 100), background fraction
COUNT_FEATURES = {52: 1.0, 53: 1.0, 54: 1.0, 55: 1.0, 56: 100.0, 57: 100.0, 65: 1.0}
TIE_FEATURES = (55, 56, 57)  # H > mean + sd and blob peaks: rounding artefacts on flat patches
N_STRUCTURED = 12
LOCAL_CONTRAST = (48, 49, 50, 51)  # sqrt(E[x^2] - E[x]^2): float32 cancellation on flat patches
SQRT_EPS32 = float(np.sqrt(np.finfo(np.float32).eps))  # 3.45e-4
FLAT = np.array([False] * 5 + [True] * 7)  # stripes, an edge, flat blocks and constant patches (see _structured)


class ReferenceHED(nn.Module):
    """The straightforward hed-texture descriptor as it was before the fast version (kept verbatim)."""

    scales = (1, 2, 4, 8)
    max_working_size = 128
    quantiles = (0.1, 0.5, 0.9)
    min_size = 8
    """Smallest patch (or token cell) side in pixels."""

    def __init__(self):
        super().__init__()
        self.register_buffer(
            "hed_from_rgb", torch.tensor(hed_module._HED_FROM_RGB, dtype=torch.float32), persistent=False
        )
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


# ---------------------------------------------------------------------------------------------------------------------
# inputs


def _structured(size: int, seed: int = 0) -> np.ndarray:
    """H&E-like and degenerate uint8 patches (n, size, size, 3): textures, stripes, edges, flat and saturated ones."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    out = []
    for k in range(4):  # nuclei-like dots on stroma (as the whole-slide benchmark's tissue)
        nuclei = np.clip(np.sin((xx + 13 * k) / (5 + k)) * np.sin((yy + 7 * k) / (6 + k)), 0, None) ** 2
        fibres = 0.5 + 0.5 * np.sin((xx + 2 * yy) / (40 + 5 * k))
        noise = rng.normal(0.0, 4.0, (size, size))
        rgb = np.stack(
            [225 + 10 * fibres - 80 * nuclei, 150 + 40 * fibres - 100 * nuclei, 205 + 10 * fibres - 40 * nuclei]
        )
        out.append(np.moveaxis(rgb + noise, 0, -1))
    out.append(np.stack([128 + 100 * np.sin(xx / 7.0 + c) * np.cos(yy / 5.0) for c in range(3)], -1))  # smooth waves
    out.append(np.where((xx // 8 % 2 == 0)[..., None], [90.0, 40.0, 150.0], [240.0, 235.0, 240.0]))  # stripes
    half = np.full((size, size, 3), 244.0)
    half[:, : size // 2] = [120.0, 50.0, 160.0]  # tissue edge against background
    out.append(half)
    blocks = rng.integers(0, 256, (size // 16 + 1, size // 16 + 1, 3)).repeat(16, 0).repeat(16, 1)[:size, :size]
    out.append(blocks.astype(np.float64))  # flat blocks: many exact ties
    for value in ((200, 200, 200), (0, 0, 0), (255, 255, 255), (120, 60, 160)):  # constant patches
        out.append(np.broadcast_to(np.array(value, dtype=np.float64), (size, size, 3)))
    return np.clip(np.stack(out), 0, 255).round().astype(np.uint8)


def _random(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, height, width, 3), dtype=np.uint8)


def _images(patches: np.ndarray) -> torch.Tensor:
    """Float images as ``images_to_tensor`` gives them (channels last, in [0, 1])."""
    return torch.from_numpy(np.ascontiguousarray(patches)).permute(0, 3, 1, 2).float().div_(255.0)


@pytest.fixture(scope="module")
def ref():
    return ReferenceHED()


@pytest.fixture(scope="module")
def fast():
    return HEDTexture()


def _assert_close(got: torch.Tensor, want: torch.Tensor, pixels: int, flat=None) -> None:
    """Every feature within 1e-4 of its scale; pixel counts may differ by one pixel (see the module docstring).

    ``flat``: per compared row, whether it is a flat patch, whose :data:`TIE_FEATURES` are not compared and whose
    :data:`LOCAL_CONTRAST` features agree within ``sqrt(eps)`` of their scale (see the module docstring).
    """
    got, want = got.reshape(-1, got.shape[-1]).double(), want.reshape(-1, want.shape[-1]).double()
    assert got.shape == want.shape
    assert torch.isfinite(got).all() and torch.isfinite(want).all()
    diff = (got - want).abs()
    keep = torch.ones(len(want), dtype=torch.bool) if flat is None else ~torch.as_tensor(np.asarray(flat))
    scale = want.abs().amax(0).clamp_min(1e-2)  # the feature's scale over the patches compared
    for j in range(want.shape[1]):
        if j in COUNT_FEATURES:
            d = diff[keep, j] if j in TIE_FEATURES else diff[:, j]
            assert d.numel() == 0 or d.max() <= COUNT_FEATURES[j] / pixels * 1.001, f"feature {j}: over a pixel apart"
            assert ((got[:, j] >= 0) & (got[:, j] <= COUNT_FEATURES[j])).all()
        elif j in LOCAL_CONTRAST:
            rel = diff[:, j] / scale[j]
            assert (rel[keep] < 1e-4).all(), f"feature {j}: relative difference {rel[keep].max()}"
            # the cancelled values are the channel's squares: noise of sqrt(eps) times the channel's level (its mean
            # density, feature j - 48)
            level = want[:, j - LOCAL_CONTRAST[0]].abs().max()
            assert (diff[~keep, j] < SQRT_EPS32 * level).all(), f"feature {j} (flat patches): over sqrt(eps)"
        else:
            assert (diff[:, j] / scale[j]).max() < 1e-4, (
                f"feature {j}: relative difference {diff[:, j].max() / scale[j]}"
            )


# ---------------------------------------------------------------------------------------------------------------------
# shape, dtype, determinism


def test_shape_dtype_and_describe(fast):
    patches = _random(5, 224, 224)
    out = fast(_images(patches))
    assert out.shape == (5, 68) and out.dtype == torch.float32 and fast.out_dim == 68
    assert fast.from_uint8(torch.from_numpy(patches)).shape == (5, 68)
    assert fast.from_uint8(torch.from_numpy(patches), 4).shape == (5, 16, 68)
    enc = build_image_encoder("hed-texture")
    assert enc.weight_free and enc.out_dim == enc.token_dim == 68
    assert enc.describe() == {
        "spec": "hed-texture",
        "pretrained": False,
        "checkpoint": None,
        "checkpoint_sha256": None,
        "out_dim": 68,
        "input_size": None,
        "mean": [0.0, 0.0, 0.0],
        "std": [1.0, 1.0, 1.0],
    }
    feats = encode_patches(enc, patches, progress=False, device="cpu")
    assert feats.shape == (5, 68) and feats.dtype == np.float32


def test_deterministic(fast):
    patches = np.concatenate([_random(6, 224, 224, seed=3), _structured(224)])
    x = _images(patches)
    assert torch.equal(fast(x), fast(x))
    u = torch.from_numpy(patches)
    assert torch.equal(fast.from_uint8(u), fast.from_uint8(u))
    assert torch.equal(fast.from_uint8(u, 3), fast.from_uint8(u, 3))


# ---------------------------------------------------------------------------------------------------------------------
# the same features as the reference


@pytest.mark.parametrize(("height", "width"), [(224, 224), (64, 64), (300, 300), (96, 160), (130, 257), (8, 8)])
def test_equals_reference_random(ref, fast, height, width):
    patches = _random(12, height, width, seed=height + width)
    x = _images(patches)
    f = -(-min(height, width) // 128)
    pixels = (height // f) * (width // f)
    with torch.inference_mode():
        want = ref(x)
        _assert_close(fast(x), want, pixels)
        _assert_close(fast(x.contiguous()), ref(x.contiguous()), pixels)  # planar float images too
        _assert_close(fast.from_uint8(torch.from_numpy(patches)), want, pixels)


@pytest.mark.parametrize("size", [224, 112, 48])
def test_equals_reference_structured(ref, fast, size):
    patches = _structured(size)
    x = _images(patches)
    f = -(-size // 128)
    with torch.inference_mode():
        want = ref(x)
        _assert_close(fast(x), want, (size // f) ** 2, FLAT)
        _assert_close(fast.from_uint8(torch.from_numpy(patches)), want, (size // f) ** 2, FLAT)


def test_reference_depends_on_batch_on_flat_patches(ref):
    """Why counts on flat patches are not compared: the reference's answer there depends on the batch."""
    patches = np.concatenate([_random(9, 224, 224, seed=11), _structured(224)])
    x = _images(patches)
    with torch.inference_mode():
        batched, alone = ref(x), torch.cat([ref(x[i : i + 1]) for i in range(len(x))])
    rel = (batched - alone).abs().double() / alone.abs().amax(0).double().clamp_min(1e-2)
    # beyond float32 rounding (1e-6 of a feature's scale): counts, the local contrast of flat patches (a float32
    # cancellation) and the H-E correlation of a flat patch (0 / 0)
    differs = (rel > 1e-6).any(0).nonzero().flatten().tolist()
    assert set(differs) <= {*COUNT_FEATURES, *LOCAL_CONTRAST, 67}
    assert (rel[:9] > 1e-6).sum() == 0  # random patches: no ties, rounding-level differences only
    assert (batched != alone)[9:][:, list(COUNT_FEATURES)].any()  # the counts of flat patches change with the batch


def test_equals_reference_values_outside_unit_range(ref, fast):
    x = torch.from_numpy(np.random.default_rng(1).normal(0.5, 0.6, (4, 3, 64, 64)).astype(np.float32))
    _assert_close(fast(x), ref(x), 64 * 64)


@pytest.mark.parametrize("grid", [1, 2, 4, 7])
def test_tokens_equal_reference(ref, fast, grid):
    pick = [0, 4, 6, 8]
    patches = np.concatenate([_random(3, 224, 224, seed=grid), _structured(224)[pick]])
    flat = np.repeat(np.concatenate([[False] * 3, FLAT[pick]]), grid * grid)
    x = _images(patches)
    cell = 224 // grid
    pixels = (cell // -(-cell // 128)) ** 2
    with torch.inference_mode():
        want = ref.cell_features(x, grid)
        _assert_close(fast.cell_features(x, grid), want, pixels, flat)
        _assert_close(fast.from_uint8(torch.from_numpy(patches), grid), want, pixels, flat)
        enc = build_image_encoder("hed-texture")
        got = encode_tokens(enc, patches, grid=grid, progress=False, device="cpu", batch_size=3)
        _assert_close(torch.from_numpy(got), want, pixels, flat)


def test_encode_patches_equals_reference(ref):
    patches = np.concatenate([_random(20, 224, 224, seed=5), _structured(224)])
    enc = build_image_encoder("hed-texture")
    got = encode_patches(enc, patches, progress=False, device="cpu", batch_size=7)
    with torch.inference_mode():
        want = ref(_images(patches))
    _assert_close(torch.from_numpy(got), want, 112 * 112, np.concatenate([[False] * 20, FLAT]))


def test_order_statistics_exact():
    rng = np.random.default_rng(0)
    rows = [
        rng.normal(size=5000),
        rng.integers(0, 5, 5000).astype(np.float64),  # heavy ties
        np.where(rng.random(5000) < 0.9, 0.25, rng.normal(size=5000)),  # one value holds most of the row
        np.full(5000, -3.0),  # constant
        np.concatenate([np.full(4999, 1.0), [1e30]]),  # an extreme outlier
        np.concatenate([rng.normal(size=4998) * 1e-30, [-0.0, 0.0]]),  # tiny values
    ]
    v = torch.tensor(np.stack(rows), dtype=torch.float32)
    ranks = [0, 1, 499, 500, 2499, 2500, 4998, 4999]
    assert torch.equal(hed_module._order_statistics(v, ranks), v.sort(-1).values[:, ranks])
    v3 = v.view(2, 3, 5000)
    assert torch.equal(hed_module._order_statistics(v3, ranks), v3.sort(-1).values[..., ranks])
    v[0, 7] = float("nan")  # NaN rows are sorted as sort does
    got, want = hed_module._order_statistics(v, ranks), v.sort(-1).values[:, ranks]
    assert torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0))


# ---------------------------------------------------------------------------------------------------------------------
# invariances: batch composition, batch and chunk size, layout; flips and quarter turns of square patches


def test_independent_of_batch(fast, monkeypatch):
    patches = np.concatenate([_random(9, 224, 224, seed=11), _structured(224)])
    u = torch.from_numpy(patches)
    whole = fast.from_uint8(u)
    alone = torch.cat([fast.from_uint8(u[i : i + 1]) for i in range(len(patches))])
    assert torch.equal(whole, alone)
    shuffled = np.random.default_rng(0).permutation(len(patches))
    assert torch.equal(fast.from_uint8(u[shuffled]), whole[shuffled])
    assert torch.equal(fast(_images(patches)), whole)  # float images give the same
    monkeypatch.setattr(HEDTexture, "chunk_pixels", 1)  # one patch per pass
    assert torch.equal(fast.from_uint8(u), whole)
    monkeypatch.setattr(HEDTexture, "chunk_pixels", 1 << 30)  # all patches in one pass
    assert torch.equal(fast.from_uint8(u), whole)
    enc = build_image_encoder("hed-texture")
    a = encode_patches(enc, patches, progress=False, device="cpu", batch_size=1)
    b = encode_patches(enc, patches, progress=False, device="cpu", batch_size=64)
    assert np.array_equal(a, b) and np.array_equal(a, whole.numpy())
    tok = fast.from_uint8(u, 4)
    assert torch.equal(torch.cat([fast.from_uint8(u[i : i + 1], 4) for i in range(len(patches))]), tok)


@pytest.mark.parametrize("turn", ["flip_h", "flip_v", "rot90", "rot270", "transpose"])
def test_flip_and_rotation_invariant(fast, turn):
    """The descriptor of a square patch (side divisible by the working factor) ignores flips and quarter turns.

    Up to rounding, which on flat patches decides local contrast (a square root of a cancelling difference) and
    ties, so these are textured patches.
    """
    patches = np.concatenate([_random(8, 224, 224, seed=2), _structured(224)[~FLAT]])
    ops = {
        "flip_h": lambda p: p[:, :, ::-1],
        "flip_v": lambda p: p[:, ::-1],
        "rot90": lambda p: np.rot90(p, 1, axes=(1, 2)),
        "rot270": lambda p: np.rot90(p, 3, axes=(1, 2)),
        "transpose": lambda p: p.transpose(0, 2, 1, 3),
    }
    turned = np.ascontiguousarray(ops[turn](patches))
    got, want = fast.from_uint8(torch.from_numpy(turned)), fast.from_uint8(torch.from_numpy(patches))
    _assert_close(got, want, 112 * 112)


# ---------------------------------------------------------------------------------------------------------------------
# bad input


def test_bad_input(fast):
    with pytest.raises(ValueError, match=r"expects a uint8 tensor \(B, H, W, 3\), got torch.float32"):
        fast.from_uint8(torch.zeros(2, 32, 32, 3))
    with pytest.raises(ValueError, match=r"expects a uint8 tensor .* got ndarray"):
        fast.from_uint8(np.zeros((2, 32, 32, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"expects patches of shape \(B, H, W, 3\), got \(2, 3, 32, 32\)"):
        fast.from_uint8(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"at least 8 x 8 pixels, got \(4, 32\)"):
        fast.from_uint8(torch.zeros(2, 4, 32, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"tokens need cells of at least 8 x 8 pixels"):
        fast.from_uint8(torch.zeros(2, 32, 32, 3, dtype=torch.uint8), 8)
    with pytest.raises(ValueError, match=r"expects images of shape \(B, 3, H, W\), got \(2, 32, 32, 3\)"):
        fast(torch.zeros(2, 32, 32, 3))
    with pytest.raises(ValueError, match=r"at least 8 x 8 pixels"):
        fast(torch.zeros(2, 3, 7, 32))
    enc = build_image_encoder("hed-texture")
    with pytest.raises(ValueError, match="dtype uint8"):
        encode_patches(enc, np.zeros((2, 32, 32, 3), dtype=np.float32), progress=False, device="cpu")
    with pytest.raises(ValueError, match=r"shape \(n, S, S, 3\)"):
        encode_patches(enc, np.zeros((2, 32, 32), dtype=np.uint8), progress=False, device="cpu")
