"""Small helpers shared by the engine: devices, seeding, progress bars."""

from __future__ import annotations

import os
import random
import sys
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch
    from tqdm.std import tqdm


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """Return ``device`` as a :class:`torch.device`; ``None`` picks cuda, then mps, then cpu."""
    import torch

    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"device={device!r} is not a valid torch device; use 'cpu', 'cuda', 'cuda:0' or 'mps'."
        ) from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was requested but CUDA is not available here; use device='cpu' or None.")
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(
                f"device={device!r} was requested but MPS is not available here; use device='cpu' or None."
            )
    return dev


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global random number generators."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002  (third-party code may use the global generator)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def autocast(device: torch.device):
    """bf16 autocast on CUDA, a no-op context elsewhere."""
    import torch

    return torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def jsonable(obj: Any) -> Any:
    """Convert a nested structure into plain JSON types.

    Numpy arrays and scalars (e.g. as read back from h5ad) become lists and Python scalars; dict keys become str;
    non-finite floats become None and other objects their ``str``.
    """
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if obj is None or isinstance(obj, str | int | float | bool):
        return obj
    return str(obj)


def _in_jupyter_kernel() -> bool:
    """Whether this runs in a Jupyter kernel whose front end can show widgets (not qtconsole or Spyder)."""
    ipython = sys.modules.get("IPython")  # a kernel has imported IPython already: never import it here
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
    except Exception:  # a half-initialised or stubbed IPython: no kernel to draw in
        return False
    if shell is None or not any(c.__name__ == "ZMQInteractiveShell" for c in type(shell).__mro__):
        return False  # plain python, the IPython terminal, jupyter console
    return not any(k == "QT_API" or k.startswith("SPYDER") for k in os.environ)  # as tqdm.autonotebook


def _widgets_available() -> bool:
    """Whether ``ipywidgets`` imports and :mod:`tqdm.notebook` found its progress widget."""
    try:
        import ipywidgets  # noqa: F401
    except Exception:  # ImportError, or a broken install
        return False
    from tqdm import notebook

    return notebook.IProgress is not None


def progress_bar(iterable: Any = None, *, enabled: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm progress bar over ``iterable`` (or one driven by ``total=`` and ``.update()``) that can be switched off.

    In a Jupyter kernel with :mod:`ipywidgets` installed the bar is a widget (:class:`tqdm.notebook.tqdm`);
    everywhere else, a notebook without ipywidgets included, it is tqdm's text bar (:class:`tqdm.std.tqdm`), written
    to stdout in a notebook (no red stderr block). Unlike :mod:`tqdm.auto` it never warns that ipywidgets is missing.

    Parameters
    ----------
    iterable
        What to iterate over; ``None`` for a bar updated by hand (pass ``total=``).
    enabled
        ``False`` gives a disabled bar that shows nothing.
    **kwargs
        Passed on to tqdm (``desc``, ``total``, ``unit``, ``leave``, ...).

    Returns
    -------
    The tqdm object: iterate over it, or use it as a context manager and call ``.update(n)``.

    Examples
    --------
    >>> for x in progress_bar(range(3), enabled=False):
    ...     pass
    >>> with progress_bar(total=10, enabled=False, unit="spot") as bar:
    ...     bar.update(10)
    """
    in_kernel = enabled and _in_jupyter_kernel()
    if in_kernel and _widgets_available():
        from tqdm.notebook import tqdm as cls
    else:
        from tqdm.std import tqdm as cls

        if in_kernel:
            kwargs.setdefault("file", sys.stdout)
    return cls(iterable, disable=not enabled, **kwargs)


def check_int(name: str, value: Any, *, minimum: int = 1) -> int:
    """Return ``value`` as int, raising unless it is an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def check_float(
    name: str, value: Any, *, minimum: float | None = None, strict: bool = False, below: float | None = None
) -> float:
    """Return ``value`` as float, raising when it is not a finite number in range."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float | np.integer | np.floating)
        or not np.isfinite(value)
    ):
        raise ValueError(f"{name} must be a finite number, got {value!r}.")
    value = float(value)
    if minimum is not None and (value < minimum or (strict and value == minimum)):
        op = ">" if strict else ">="
        raise ValueError(f"{name} must be {op} {minimum}, got {value!r}.")
    if below is not None and value >= below:
        raise ValueError(f"{name} must be < {below}, got {value!r}.")
    return value


def mean_pearson(pred: np.ndarray, true: np.ndarray, top: int | None = None) -> float:
    """Mean over genes (columns) of the Pearson r between ``pred`` and ``true`` (``top``: of the ``top`` highest r).

    Genes constant in either are skipped (NaN when all are).
    """
    p = np.asarray(pred, dtype=np.float64)
    t = np.asarray(true, dtype=np.float64)
    p = p - p.mean(0)
    t = t - t.mean(0)
    den = np.sqrt((p * p).sum(0) * (t * t).sum(0))
    ok = den > 0
    if not ok.any():
        return float("nan")
    r = (p * t).sum(0)[ok] / den[ok]
    if top is not None:
        r = np.sort(r)[::-1][: int(top)]
    return float(r.mean())
