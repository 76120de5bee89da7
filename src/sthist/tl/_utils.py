"""Models fitted in this session and the resolution of the ``model`` argument of the prediction tools."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from anndata import AnnData

    from .._engine.base import BaseModel

# Models fitted in this Python process, so that `predict_expression(adata)` finds the model that a fit recorded
# for this AnnData (`adata.uns[key]["model_id"]`).
_MODELS: dict[str, Any] = {}


def register_model(model: Any) -> str:
    """Keep ``model`` for this process and return its id."""
    model_id = uuid.uuid4().hex
    _MODELS[model_id] = model
    return model_id


def load_model(dir_path: str | Path, *, device: str | None = None) -> BaseModel:
    """Load a saved model folder of any kind (contrastive methods, the ridge probe, ...).

    Parameters
    ----------
    dir_path
        The folder that ``model.save(dir_path)`` (or ``save_dir=`` of a fit) wrote.
    device
        Torch device for models with networks; ``None`` picks cuda, then mps, then cpu.

    Returns
    -------
    The model, of the class named by the ``format`` in the folder's ``config.json``.
    """
    from .._engine.base import load_model as _load

    path = Path(dir_path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"no model folder at {str(path)!r}; pass a fitted model or the folder `model.save(dir)` wrote."
        )
    return _load(path, device=device)


def resolve_model(adata: AnnData | None, model: Any) -> BaseModel:
    """A model object, a saved folder, or the model a fit recorded for this AnnData."""
    from .._engine.base import BaseModel

    if model is None:
        recorded = {
            k: v for k, v in (adata.uns.items() if adata is not None else ()) if isinstance(v, dict) and "model_id" in v
        }
        if not recorded:
            raise ValueError(
                "no model given and none recorded for this AnnData: pass a model "
                "(`model = sthist.tl.fit_contrastive(ref)`) or the folder it was saved to "
                "(`sthist.tl.predict_expression(adata, 'my_model/')`)."
            )
        if len(recorded) > 1:
            raise ValueError(
                f"several models are recorded in adata.uns {sorted(recorded)}: pass the one to use as `model=`."
            )
        key, entry = next(iter(recorded.items()))
        if entry.get("model_id") in _MODELS:
            return _MODELS[entry["model_id"]]
        if entry.get("model_dir") and Path(entry["model_dir"]).is_dir():
            return load_model(entry["model_dir"])
        raise ValueError(
            f"adata.uns[{key!r}] records a model that is no longer in memory and was not saved "
            "(fit it with `save_dir=` to keep it); pass the model or its folder as `model=`."
        )
    if isinstance(model, str | Path):
        return load_model(model)
    if not isinstance(model, BaseModel):
        raise TypeError(
            f"model must be a fitted sthist model or the folder it was saved to, got {type(model).__name__}."
        )
    return model


def model_record(model: BaseModel, *, save_dir: str | Path | None) -> dict[str, Any]:
    """What a fit records next to its params: the in-session model id and the folder it was saved to."""
    return {
        "model_id": register_model(model),
        "model_dir": "" if save_dir is None else str(Path(save_dir).resolve()),
    }
