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


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """:func:`warnings.warn` attributed to the first caller outside sthist (the user's line), however deep the call."""
    import sys
    import warnings
    from pathlib import Path

    package = str(Path(__file__).resolve().parent)
    frame, level = sys._getframe(1), 1
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(package):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)
