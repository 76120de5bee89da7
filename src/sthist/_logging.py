"""Logging through :mod:`scanpy.logging`, imported lazily so ``import sthist`` stays fast."""

from __future__ import annotations

from typing import Any


def _logg():
    from scanpy import logging as logg

    return logg


def info(msg: str, **kwargs: Any):
    """Log at info level; returns the time stamp scanpy uses for ``time=``."""
    return _logg().info(msg, **kwargs)


def debug(msg: str, **kwargs: Any):
    """Log at debug level."""
    return _logg().debug(msg, **kwargs)


def hint(msg: str, **kwargs: Any):
    """Log a hint."""
    return _logg().hint(msg, **kwargs)


def warning(msg: str, **kwargs: Any):
    """Log a warning."""
    return _logg().warning(msg, **kwargs)
