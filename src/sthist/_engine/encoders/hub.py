"""Creating timm models, by name or from the Hugging Face hub (``"hf-hub:<org>/<name>"``).

``pretrained=True`` downloads weights through timm; ``pretrained=False`` gives a deterministic random initialisation
(seed 0). Some hub pathology models need extra ``timm.create_model`` arguments (:func:`_hf_presets`). When weights
cannot be obtained, :class:`EncoderUnavailableError` says which offline options exist; there is no silent fallback.
"""

from __future__ import annotations

from typing import Any

import torch

from .hed import HED_SPEC

_HF_PREFIX = "hf-hub:"
_OFFLINE_OPTIONS = (
    "Offline options: `pretrained=False` (random initialisation of the same architecture), "
    "`checkpoint='path/to/weights.safetensors'` (a local weight file for this architecture; .pth/.bin also work), "
    f"or encoder={HED_SPEC!r} (weight-free, needs no download)."
)


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split a timm spec into its model name and its architecture options.

    ``"vit_base_patch32_224(depth=8, num_heads=8)"`` -> ``("vit_base_patch32_224", {"depth": 8, "num_heads": 8})``.

    Options are ``timm.create_model`` keyword arguments with literal values (numbers, booleans, strings); they
    change the architecture (e.g. CMRCNet's 8-layer, 8-head ViT-B/32, or tiny networks in tests).
    """
    import ast

    spec = spec.strip()
    if not spec.endswith(")") or "(" not in spec:
        return spec, {}
    name, _, args = spec[:-1].partition("(")
    try:
        call = ast.parse(f"f({args})", mode="eval").body
        if not isinstance(call, ast.Call) or call.args or any(kw.arg is None for kw in call.keywords):
            raise ValueError
        kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
    except (SyntaxError, ValueError) as err:
        raise ValueError(
            f"encoder={spec!r}: the options in parentheses must be keyword arguments with literal values, e.g. "
            "'vit_base_patch32_224(depth=8, num_heads=8)'."
        ) from err
    return name.strip(), kwargs


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


def _create_timm(spec: str, *, pretrained: bool):
    """A timm model without classifier (``num_classes=0``) for a timm name or an ``"hf-hub:"`` spec.

    Raises
    ------
    ValueError
        ``spec`` is not a timm model name (with close matches as a hint).
    EncoderUnavailableError
        Pretrained weights, or the configuration of a hub model, could not be fetched.
    """
    import timm

    spec, options = parse_spec(spec)
    is_hub = spec.startswith(_HF_PREFIX)
    if options and pretrained:
        raise ValueError(
            f"encoder options {options} change the architecture of {spec!r}, so its pretrained weights do not fit; "
            "use pretrained=False (random initialisation) or checkpoint= (weights of that architecture)."
        )
    if not is_hub and not timm.is_model(spec):
        import difflib

        close = difflib.get_close_matches(spec, timm.list_models(), n=8, cutoff=0.6)
        hint = f" Similar names: {close}." if close else ""
        raise ValueError(
            f"encoder={spec!r} is neither {HED_SPEC!r}, a timm model name nor 'hf-hub:<org>/<name>'.{hint} "
            "List timm models with `timm.list_models()`."
        )
    kwargs = {**(_hf_presets(spec) if is_hub else {}), **options}
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
