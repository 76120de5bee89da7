"""Local weight files for timm architectures: reading them safely and matching their tensors to a model.

``.safetensors`` (preferred) or ``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt`` read with ``torch.load(weights_only=True)``,
which never executes code. Common key prefixes (``module.``, ``model.``, BLEEP's ``image_encoder.model.`` ...) are
found and stripped; any other mismatch of names or shapes is an error, never a partial load.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import torch

_CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a weight file without unpickling code; raise :class:`ValueError` when it cannot."""
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
