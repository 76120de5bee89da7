"""Image encoders: patches (uint8 RGB) in, one feature vector per patch out.

Three kinds of encoder are built from one ``spec`` string by :func:`build_image_encoder`:

``"hed-texture"`` (the default, :data:`DEFAULT_ENCODER`)
    A fixed, deterministic descriptor that needs no weights and no download: colour deconvolution into
    haematoxylin / eosin / DAB optical densities (Ruifrok & Johnston 2001), their distribution (mean, spread,
    quantiles, centre vs whole patch), multi-scale gradient and Laplacian energy, local contrast, nucleus-density
    proxies (haematoxylin-rich area, counts of haematoxylin blobs at two scales), colour and background
    fraction. It is fast on a CPU and the natural choice for frozen-mode training without internet.
a timm model name (``"resnet18"``, ``"resnet50"``, ``"vit_small_patch16_224"``, ...)
    ``pretrained=True`` downloads ImageNet weights through timm; ``pretrained=False`` gives a random
    initialisation that is deterministic (seed 0), so the same spec always gives the same network.
``"hf-hub:<org>/<name>"``
    A model on the Hugging Face hub loaded through timm, e.g. the pathology foundation models UNI
    (``"hf-hub:MahmoodLab/uni"``), UNI2-h, H-optimus-0 or Virchow; these are gated: accept their licence on
    huggingface.co and log in (``huggingface-cli login`` or ``HF_TOKEN``). CONCH is not a timm model and cannot
    be loaded this way.

``checkpoint=`` loads a local file into the timm architecture named by ``spec``: ``.safetensors`` (preferred) or
``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt`` read with ``torch.load(weights_only=True)``, which never executes code.
Common key prefixes (``module.``, ``model.``, BLEEP's ``image_encoder.model.`` ...) are found and stripped.

There is no silent fallback: when weights cannot be obtained, :class:`EncoderUnavailableError` says which offline
options exist.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

DEFAULT_ENCODER = "hed-texture"
"""The weight-free default encoder: works offline, fast on a CPU, deterministic."""

WEIGHT_FREE_ENCODERS = (DEFAULT_ENCODER,)
_HF_PREFIX = "hf-hub:"
_CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
_OFFLINE_OPTIONS = (
    "Offline options: `pretrained=False` (random initialisation of the same architecture), "
    "`checkpoint='path/to/weights.safetensors'` (a local weight file for this architecture; .pth/.bin also work), "
    f"or encoder={DEFAULT_ENCODER!r} (weight-free, needs no download)."
)


class EncoderUnavailableError(RuntimeError):
    """Pretrained weights of an image encoder could not be obtained (no internet, gated model, ...)."""


def _hf_presets(spec: str) -> dict[str, Any]:
    """Extra ``timm.create_model`` keyword arguments that some hf-hub pathology models need (from their model cards)."""
    from timm.layers import SwiGLUPacked

    name = spec[len(_HF_PREFIX) :].lower()
    presets: dict[str, dict[str, Any]] = {
        "mahmoodlab/uni": {"init_values": 1e-5, "dynamic_img_size": True},
        "mahmoodlab/uni2-h": {
            "img_size": 224,
            "patch_size": 14,
            "depth": 24,
            "num_heads": 24,
            "init_values": 1e-5,
            "embed_dim": 1536,
            "mlp_ratio": 2.66667 * 2,
            "no_embed_class": True,
            "mlp_layer": SwiGLUPacked,
            "act_layer": torch.nn.SiLU,
            "reg_tokens": 8,
            "dynamic_img_size": True,
        },
        "bioptimus/h-optimus-0": {"init_values": 1e-5, "dynamic_img_size": False},
        "bioptimus/h-optimus-1": {"init_values": 1e-5, "dynamic_img_size": False},
        "paige-ai/virchow": {"mlp_layer": SwiGLUPacked, "act_layer": torch.nn.SiLU},
        "paige-ai/virchow2": {"mlp_layer": SwiGLUPacked, "act_layer": torch.nn.SiLU},
    }
    return presets.get(name, {})


def encoder_key(spec: str) -> str:
    """Return a short, safe name for an encoder spec: ``"hed-texture"`` -> ``"hed_texture"``, ``"hf-hub:MahmoodLab/UNI"`` -> ``"uni"``."""
    name = spec[len(_HF_PREFIX) :] if spec.startswith(_HF_PREFIX) else spec
    name = name.rstrip("/").rsplit("/", 1)[-1]
    name = re.sub(r"[^0-9a-zA-Z]+", "_", name).strip("_").lower()
    return name or "encoder"


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------------------------
# the weight-free descriptor


# stain vectors (rows: haematoxylin, eosin, DAB) in optical-density RGB space, Ruifrok & Johnston (2001)
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64)
_RGB_FROM_HED /= np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)


class HEDTexture(nn.Module):
    """Deterministic H&E descriptor; see the module docstring. Input (B, 3, H, W) in [0, 1], H, W >= 8."""

    scales = (1, 2, 4, 8)
    max_working_size = 128
    quantiles = (0.1, 0.5, 0.9)

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

    def _forward(self, x):
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"hed-texture expects images of shape (B, 3, H, W), got {tuple(x.shape)}.")
        if min(x.shape[-2:]) < 8:
            raise ValueError(f"hed-texture needs patches of at least 8 x 8 pixels, got {tuple(x.shape[-2:])}.")
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


# --------------------------------------------------------------------------------------------------------------------
# the encoder wrapper


class ImageEncoder(nn.Module):
    """An image encoder: ``forward(x)`` takes float images (B, 3, H, W) in [0, 1] and returns (B, out_dim).

    Normalisation with the model's ``mean`` / ``std`` happens inside; models with a fixed input size
    (``input_size`` not ``None``, e.g. ViTs) get patches resized to it, others (CNNs) take any size.
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        spec: str,
        out_dim: int,
        input_size: int | None,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        pretrained: bool,
        checkpoint: str | None,
        checkpoint_sha256: str | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.spec = spec
        self.out_dim = int(out_dim)
        self.input_size = input_size
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.pretrained = bool(pretrained)
        self.checkpoint = checkpoint
        self.checkpoint_sha256 = checkpoint_sha256
        self.register_buffer("_mean", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)

    @property
    def weight_free(self) -> bool:
        """Whether the encoder has no trainable parameters (the deterministic descriptor)."""
        return not any(True for _ in self.backbone.parameters())

    def describe(self) -> dict[str, Any]:
        """JSON-friendly description that :func:`build_image_encoder` can rebuild the encoder from."""
        return {
            "spec": self.spec,
            "pretrained": self.pretrained,
            "checkpoint": self.checkpoint,
            "checkpoint_sha256": self.checkpoint_sha256,
            "out_dim": self.out_dim,
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    def forward(self, x):
        if self.input_size is not None and tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(
                x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False, antialias=True
            )
        x = (x - self._mean.to(x.dtype)) / self._std.to(x.dtype)
        out = self.backbone(x)
        if out.ndim != 2:
            out = out.flatten(1)
        return out

    def extra_repr(self) -> str:
        return f"spec={self.spec!r}, out_dim={self.out_dim}, input_size={self.input_size}"


# --------------------------------------------------------------------------------------------------------------------
# building encoders


def _load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as err:
            raise ValueError(f"checkpoint {str(path)!r} is not a readable safetensors file ({err}).") from err
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(
            f"checkpoint {str(path)!r} could not be loaded safely with torch.load(weights_only=True) ({err}). "
            "It may hold Python objects besides tensors; sthist never unpickles code. Convert it to "
            "safetensors in a trusted environment: `safetensors.torch.save_file(state_dict, 'weights.safetensors')`."
        ) from err
    for key in ("state_dict", "model", "module", "model_state_dict", "teacher", "student"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"checkpoint {str(path)!r} does not hold a state dict (a mapping of names to tensors).")
    return obj


def _match_state_dict(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor], path: Path, spec: str):
    """Strip the key prefix that maps most checkpoint keys onto the model's keys, then check names and shapes."""
    tkeys = set(target)
    prefixes: Counter[str] = Counter()
    for k in state:
        for t in tkeys:
            if k.endswith(t) and (len(k) == len(t) or k[-len(t) - 1] == "."):
                prefixes[k[: len(k) - len(t)]] += 1
    if not prefixes:
        raise ValueError(
            f"checkpoint {str(path)!r} does not match the architecture {spec!r}: none of its "
            f"{len(state)} tensor names (e.g. {list(state)[:3]}) are names of this model (e.g. {list(target)[:3]}). "
            "Pass the timm model name the weights were trained with as `encoder=`."
        )
    best = min(prefixes.items(), key=lambda kv: (-kv[1], len(kv[0])))[0]
    sub = {k[len(best) :]: v for k, v in state.items() if k.startswith(best) and k[len(best) :] in tkeys}
    # tensors of the checkpoint the architecture does not have (a classifier head aside) mean another architecture:
    # loading the rest would silently give wrong features (e.g. UNI's LayerScale into a plain ViT)
    classifier = ("head.", "fc.", "classifier.", "head_dist.", "last_linear.")
    unexpected = sorted(
        k[len(best) :]
        for k in state
        if k.startswith(best) and k[len(best) :] not in tkeys and not k[len(best) :].startswith(classifier)
    )
    if unexpected:
        raise ValueError(
            f"checkpoint {str(path)!r} does not match the architecture {spec!r}: it has {len(unexpected)} tensors the "
            f"model lacks (e.g. {unexpected[:5]}). Pass the timm model name (and settings) the weights were trained with "
            "as `encoder=`."
        )
    missing = sorted(tkeys - set(sub))
    if missing:
        raise ValueError(
            f"checkpoint {str(path)!r} does not match the architecture {spec!r}: {len(missing)} tensors are missing "
            f"(e.g. {missing[:5]}). Pass the timm model name the weights were trained with as `encoder=`."
        )
    bad = [
        (k, tuple(v.shape), tuple(target[k].shape)) for k, v in sub.items() if tuple(v.shape) != tuple(target[k].shape)
    ]
    if bad:
        raise ValueError(
            f"checkpoint {str(path)!r} does not match the architecture {spec!r}: shape mismatch for "
            f"{len(bad)} tensors, e.g. {bad[:3]} (name, checkpoint shape, model shape)."
        )
    return sub


def _create_timm(spec: str, *, pretrained: bool):
    import timm

    is_hub = spec.startswith(_HF_PREFIX)
    if not is_hub and not timm.is_model(spec):
        import difflib

        close = difflib.get_close_matches(spec, timm.list_models(), n=8, cutoff=0.6)
        hint = f" Similar names: {close}." if close else ""
        raise ValueError(
            f"encoder={spec!r} is neither {DEFAULT_ENCODER!r}, a timm model name nor 'hf-hub:<org>/<name>'.{hint} "
            "List timm models with `timm.list_models()`."
        )
    kwargs = _hf_presets(spec) if is_hub else {}
    if not pretrained:
        try:
            # deterministic random initialisation: the same spec always gives the same network
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                return timm.create_model(spec, pretrained=False, num_classes=0, **kwargs)
        except Exception as err:
            if not is_hub:
                raise
            raise EncoderUnavailableError(
                f"Could not fetch the configuration of {spec!r} from the Hugging Face hub ({type(err).__name__}: {err}). "
                "Hub models need internet (or a filled Hugging Face cache) even for their architecture. "
                + _OFFLINE_OPTIONS
            ) from err
    try:
        return timm.create_model(spec, pretrained=True, num_classes=0, **kwargs)
    except Exception as err:
        msg = f"Could not load pretrained weights for encoder {spec!r} ({type(err).__name__}: {err}). "
        if is_hub:
            msg += (
                "Hugging Face hub models need internet, and pathology foundation models such as UNI, CONCH, "
                "H-optimus or Virchow are gated: accept the licence on the model's huggingface.co page, then log in "
                "with `huggingface-cli login` or set the HF_TOKEN environment variable. "
            )
        else:
            msg += "timm downloads pretrained weights from the internet (Hugging Face hub), which failed here. "
        raise EncoderUnavailableError(msg + _OFFLINE_OPTIONS) from err


def build_image_encoder(spec: str = DEFAULT_ENCODER, *, pretrained: bool = True, checkpoint: str | Path | None = None):
    """Build an image encoder from a spec string.

    Parameters
    ----------
    spec
        ``"hed-texture"`` (weight-free, the default), a timm model name (``"resnet18"``, ``"resnet50"``,
        ``"vit_small_patch16_224"``, ...) or ``"hf-hub:<org>/<name>"`` (e.g. ``"hf-hub:MahmoodLab/uni"``).
    pretrained
        Load pretrained weights (download through timm / the Hugging Face hub). ``False`` gives a deterministic
        random initialisation (seed 0). Ignored for ``"hed-texture"`` and when ``checkpoint`` is given.
    checkpoint
        A local weight file for the timm architecture named by ``spec``: ``.safetensors`` (preferred) or
        ``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt`` loaded with ``torch.load(weights_only=True)`` (never executes code).

    Returns
    -------
    An :class:`ImageEncoder` in eval mode with ``.spec``, ``.out_dim``, ``.input_size``, ``.mean`` and ``.std``.

    Raises
    ------
    EncoderUnavailableError
        Pretrained weights could not be downloaded; the message lists the offline options.
    ValueError
        Unknown spec, unreadable or mismatching checkpoint.
    FileNotFoundError
        ``checkpoint`` does not exist.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"encoder must be a non-empty string such as {DEFAULT_ENCODER!r} or 'resnet18', got {spec!r}.")
    if not isinstance(pretrained, bool | np.bool_):
        raise TypeError(f"pretrained must be True or False, got {pretrained!r}.")
    if spec in WEIGHT_FREE_ENCODERS:
        if checkpoint is not None:
            raise ValueError(
                f"encoder={spec!r} is weight-free and takes no checkpoint; pass a timm model name as `encoder=`."
            )
        backbone = HEDTexture()
        return ImageEncoder(
            backbone,
            spec=spec,
            out_dim=backbone.out_dim,
            input_size=None,
            mean=(0.0, 0.0, 0.0),
            std=(1.0, 1.0, 1.0),
            pretrained=False,
            checkpoint=None,
        ).eval()

    sha = None
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {str(checkpoint)!r} does not exist or is not a file.")
        if path.suffix.lower() not in _CHECKPOINT_SUFFIXES:
            raise ValueError(
                f"checkpoint {str(checkpoint)!r} has an unknown file type; use one of {list(_CHECKPOINT_SUFFIXES)} "
                "(.safetensors preferred)."
            )
        model = _create_timm(spec, pretrained=False)
        state = _load_state_dict_file(path)
        model.load_state_dict(_match_state_dict(state, model.state_dict(), path, spec), strict=True)
        sha = file_sha256(path)
        checkpoint = str(path.resolve())
        pretrained = False
    else:
        model = _create_timm(spec, pretrained=bool(pretrained))

    import timm

    cfg = timm.data.resolve_data_config({}, model=model)
    pe = getattr(model, "patch_embed", None)
    fixed = pe is not None and not getattr(pe, "dynamic_img_size", False) and getattr(pe, "strict_img_size", True)
    input_size = int(cfg["input_size"][-1]) if fixed else None
    return ImageEncoder(
        model,
        spec=spec,
        out_dim=_probe_out_dim(model, cfg, input_size),
        input_size=input_size,
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        pretrained=bool(pretrained),
        checkpoint=None if checkpoint is None else str(checkpoint),
        checkpoint_sha256=sha,
    ).eval()


def _probe_out_dim(model: nn.Module, cfg: dict, input_size: int | None) -> int:
    """Width of the pooled output, measured with one forward pass (num_features is not always the output width)."""
    size = input_size if input_size is not None else min(64, int(cfg["input_size"][-1]))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, 3, size, size))
    finally:
        model.train(was_training)
    return int(out.flatten(1).shape[1])


# --------------------------------------------------------------------------------------------------------------------
# encoding patches


def check_patches(patches: Any, *, name: str = "patches") -> Any:
    """Check that ``patches`` are uint8 RGB patches (n, H, W, 3) and return them unchanged.

    numpy arrays and lazy arrays (dask, zarr, e.g. from ``sthist.pp.extract_patches(..., store=...)``) are accepted;
    only shape and dtype are checked, so a lazy array is not read.
    """
    from .data import is_lazy_array

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


def encode_patches(
    encoder,
    patches: Any,
    *,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Encode RGB patches into one feature vector each.

    Parameters
    ----------
    encoder
        An :class:`ImageEncoder` from :func:`build_image_encoder`.
    patches
        uint8 array (n, S, S, 3): numpy, or a dask / zarr array that is read one storage chunk at a time (never
        loaded whole).
    batch_size
        Patches per forward pass.
    device
        ``None`` picks cuda, then mps, then cpu. The encoder is moved there.
    progress
        Show a progress bar.

    Returns
    -------
    float32 array (n, encoder.out_dim).
    """
    from ._utils import autocast, check_int, progress_bar, resolve_device
    from .data import iter_row_blocks

    patches = check_patches(patches)
    batch_size = check_int("batch_size", batch_size)
    dev = resolve_device(device)
    was_training = encoder.training
    encoder = encoder.to(dev).eval()
    n = int(patches.shape[0])
    out = np.empty((n, encoder.out_dim), dtype=np.float32)
    bar = progress_bar(total=n, enabled=progress, desc=f"encoding ({encoder.spec})", leave=False)
    try:
        with torch.inference_mode(), autocast(dev):
            for start, rows in iter_row_blocks(patches, batch_size):
                x = images_to_tensor(rows, dev)
                out[start : start + rows.shape[0]] = encoder(x).float().cpu().numpy()
                bar.update(rows.shape[0])
    finally:
        bar.close()
        encoder.train(was_training)
    if not np.isfinite(out).all():
        raise FloatingPointError(f"encoder {encoder.spec!r} produced NaN or infinite features; check the patches.")
    return out
