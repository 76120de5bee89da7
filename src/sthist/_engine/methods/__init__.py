"""Contrastive methods: one small module each, registered by name.

Add a method by writing ``methods/<name>.py`` with a :class:`~sthist._engine.methods._base.Method` subclass
decorated with ``@register("<name>")`` and importing it at the bottom of this file.
"""

from __future__ import annotations

from collections.abc import Callable

from ._base import Batch, Method, ProjectionHead

METHODS: dict[str, type[Method]] = {}
"""Registered methods by name."""


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator that registers a :class:`Method` subclass under ``name``."""

    def deco(cls: type[Method]) -> type[Method]:
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"only Method subclasses can be registered, got {cls!r}.")
        if name in METHODS and METHODS[name] is not cls:
            raise ValueError(f"a method named {name!r} is already registered ({METHODS[name].__qualname__}).")
        if cls.prediction not in ("retrieval", "regression"):
            raise ValueError(
                f"{cls.__qualname__}.prediction must be 'retrieval' or 'regression', got {cls.prediction!r}."
            )
        bad = sorted(set(cls.consumes) - {"features", "tokens"})
        if bad or not cls.consumes:
            raise ValueError(f"{cls.__qualname__}.consumes must name 'features' and/or 'tokens', got {cls.consumes!r}.")
        if cls.variant_of is not None and cls.variant_of not in METHODS:
            raise ValueError(
                f"{cls.__qualname__}.variant_of={cls.variant_of!r} names no registered method; register that first."
            )
        cls.name = name
        if not cls.__dict__.get("description"):
            cls.description = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else name
        METHODS[name] = cls
        return cls

    return deco


def get_method(name: str) -> type[Method]:
    """Return the method class registered as ``name``; unknown names raise with the registered ones."""
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"method={name!r} is not a registered method; choose one of {sorted(METHODS)}.")
    return METHODS[name]


from . import bleep, bleep_ctx, bleep_ctx_ens, cmrcnet, mclstexp, nh2st, stgchb  # noqa: E402, F401  (register the methods)

__all__ = ["METHODS", "Batch", "Method", "ProjectionHead", "get_method", "register"]
