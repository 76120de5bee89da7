"""Where downloaded data sets live, and the lazy imports of the optional download clients."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

#: Environment variable naming the folder that holds sthist's downloaded data sets.
DATA_DIR_ENV = "STHIST_DATA_DIR"


def data_dir(name: str) -> Path:
    """``$STHIST_DATA_DIR/<name>``, else ``$XDG_CACHE_HOME/sthist/<name>`` (``~/.cache/sthist/<name>``)."""
    base = os.environ.get(DATA_DIR_ENV)
    if not base:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sthist"
    return Path(base).expanduser() / name


def optional_import(module: str, *, extra: str, purpose: str) -> Any:
    """Import ``module``, raising an ImportError that names the pip extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{purpose} needs the optional package {module!r}: install it with `pip install 'sthist[{extra}]'` "
            f"(or `pip install {module}`)."
        ) from e


def is_connection_error(err: BaseException) -> bool:
    """Whether ``err`` (or its cause) is a network failure: no connection, DNS, timeout, offline mode."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        name = type(err).__name__
        module = type(err).__module__.split(".")[0]
        if isinstance(err, ConnectionError | TimeoutError) or name in (
            "ConnectionError",
            "ConnectError",
            "ConnectTimeout",
            "ReadTimeout",
            "Timeout",
            "TimeoutException",
            "NetworkError",
            "OfflineModeIsEnabled",
            "LocalEntryNotFoundError",
            "NameResolutionError",
            "MaxRetryError",
        ):
            return True
        if (module in ("requests", "urllib3") or module.startswith("httpx")) and "Connect" in name:
            return True
        err = err.__cause__ or err.__context__
    return False
