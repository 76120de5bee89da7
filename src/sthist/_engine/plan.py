"""Training plans: the typed recipe a method declares and the engine runs.

A :class:`TrainPlan` says how a model learns: the optimiser (:class:`Optim`: AdamW, Adam with L2 weight decay, SGD),
the learning-rate schedule (:class:`Schedule`: constant, step, cosine with optional linear warm-up), the batch size,
how many spots are held out for validation, early stopping, the model-selection rule (validation loss, or the
validation Pearson r of the predicted expression on the training genes) and one or more **stages**
(:class:`Stage`), each with its own loss terms, trainable parameters, epochs and optimiser (e.g. graph
pre-training, then alignment).

Every method declares its published recipe as the class attribute ``recipe``; :func:`resolve_plan` merges a
caller's overrides into it. The engine's :func:`~sthist._engine.train.fit` and :func:`sthist.tl.fit_contrastive`
both go through :func:`resolve_plan`, so calling the engine without ``tl`` gives the same recipe. Every field is
checked once, here, when a plan is made.

Example (a two-stage recipe)::

    recipe = TrainPlan(
        optimizer=Optim("adam", lr=5e-4),
        schedule=Schedule("step", step_size=50, gamma=0.5),
        batch_size=8,
        stages=(
            Stage("pretrain", epochs=50, losses=("dgi",)),
            Stage("align", epochs=4, losses=("align", "hsic"), trainable=("image_projection", "expression_projection")),
        ),
        select_on="val_pearson",
    )
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("constant", "step", "cosine")
SELECTIONS = ("val_loss", "val_pearson", "val_pearson_top50")
ROTATIONS = ("none", "quarter", "any")
NORMALISATIONS = ("encoder", "imagenet", "unit")
#: ImageNet's channel mean and standard deviation (torchvision's), for ``normalisation="imagenet"``.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WHOLE_SECTION = "section"
"""``Stage.batch_size`` of stages whose batches are whole sections."""


def _check_number(owner: str, name: str, value: Any, *, minimum: float | None = None, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{owner}.{name} must be a finite number, got {value!r}.")
    if minimum is not None and (value < minimum or (strict and value == minimum)):
        raise ValueError(f"{owner}.{name} must be {'>' if strict else '>='} {minimum}, got {value!r}.")
    return float(value)


def _check_int(owner: str, name: str, value: Any, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}.{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def _check_choice(owner: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{owner}.{name}={value!r} is not valid; choose one of {list(choices)}.")


def _names(owner: str, name: str, value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = (value,)
    value = tuple(value)
    if not value or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{owner}.{name} must be None or a non-empty tuple of names, got {value!r}.")
    return value


@dataclass(frozen=True)
class Optim:
    """An optimiser and its settings.

    Attributes
    ----------
    name
        ``"adamw"`` (decoupled weight decay, BLEEP), ``"adam"`` (L2 weight decay added to the gradients, as
        ``torch.optim.Adam``) or ``"sgd"`` (with ``momentum``).
    lr
        Learning rate (> 0).
    weight_decay
        Weight decay (>= 0).
    momentum
        SGD momentum (ignored by the Adam family).
    """

    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-3
    momentum: float = 0.9

    def __post_init__(self):
        _check_choice("Optim", "name", self.name, OPTIMIZERS)
        _check_number("Optim", "lr", self.lr, minimum=0.0, strict=True)
        _check_number("Optim", "weight_decay", self.weight_decay, minimum=0.0)
        _check_number("Optim", "momentum", self.momentum, minimum=0.0)

    def build(self, params: list) -> Any:
        """The :mod:`torch.optim` optimiser over ``params``."""
        import torch

        if self.name == "adamw":
            return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        if self.name == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(params, lr=self.lr, weight_decay=self.weight_decay, momentum=self.momentum)


@dataclass(frozen=True)
class Schedule:
    """A learning-rate schedule over the epochs of a stage (stepped once per epoch).

    Attributes
    ----------
    name
        ``"constant"``; ``"step"``: multiply the lr by ``gamma`` every ``step_size`` epochs; ``"cosine"``: cosine
        decay from the optimiser's lr to ``min_lr`` over the stage's epochs.
    step_size, gamma
        Of the step schedule.
    min_lr
        Final lr of the cosine schedule.
    warmup_epochs
        Linear warm-up from ``lr / (warmup_epochs + 1)`` to ``lr`` before the schedule starts (any schedule).
    """

    name: Literal["constant", "step", "cosine"] = "constant"
    step_size: int = 50
    gamma: float = 0.5
    min_lr: float = 0.0
    warmup_epochs: int = 0

    def __post_init__(self):
        _check_choice("Schedule", "name", self.name, SCHEDULES)
        _check_int("Schedule", "step_size", self.step_size)
        _check_number("Schedule", "gamma", self.gamma, minimum=0.0, strict=True)
        _check_number("Schedule", "min_lr", self.min_lr, minimum=0.0)
        _check_int("Schedule", "warmup_epochs", self.warmup_epochs, minimum=0)

    def lr_at(self, epoch: int, *, lr: float, epochs: int) -> float:
        """The learning rate of (0-based) ``epoch`` of a stage of ``epochs`` epochs that starts at ``lr``."""
        w = self.warmup_epochs
        if epoch < w:
            return lr * (epoch + 1) / (w + 1)
        e = epoch - w
        if self.name == "step":
            return lr * self.gamma ** (e // self.step_size)
        if self.name == "cosine":
            span = max(epochs - w - 1, 1)
            return self.min_lr + (lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(e, span) / span))
        return lr


@dataclass(frozen=True)
class Stage:
    """One stage of training.

    Attributes
    ----------
    name
        Label in the history (``"main"`` for single-stage plans).
    epochs
        Maximum epochs of the stage (early stopping may end it sooner).
    losses
        Names of the loss terms of the method's ``loss`` that are summed in this stage; ``None``: all of them.
    trainable
        Prefixes of the parameter names that train in this stage (``"encoder"`` is the fine-tuned image
        encoder; other names are the method's modules); ``None``: everything.
    optimizer, schedule
        This stage's own; ``None`` takes the plan's.
    batch_size
        Spots per training batch of this stage (>= 2); ``"section"``: one batch per section, all its training spots
        (graph objectives over a whole tissue graph, e.g. ST-GCHB's Deep Graph Infomax); ``None`` takes the plan's.
    """

    name: str = "main"
    epochs: int = 100
    losses: tuple[str, ...] | None = None
    trainable: tuple[str, ...] | None = None
    optimizer: Optim | None = None
    schedule: Schedule | None = None
    batch_size: int | Literal["section"] | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Stage.name must be a non-empty string, got {self.name!r}.")
        _check_int("Stage", "epochs", self.epochs)
        object.__setattr__(self, "losses", _names("Stage", "losses", self.losses))
        object.__setattr__(self, "trainable", _names("Stage", "trainable", self.trainable))
        if self.optimizer is not None and not isinstance(self.optimizer, Optim):
            raise TypeError(f"Stage.optimizer must be an Optim or None, got {type(self.optimizer).__name__}.")
        if self.schedule is not None and not isinstance(self.schedule, Schedule):
            raise TypeError(f"Stage.schedule must be a Schedule or None, got {type(self.schedule).__name__}.")
        b = self.batch_size
        if b is not None and b != WHOLE_SECTION and (isinstance(b, bool) or not isinstance(b, int) or b < 2):
            raise ValueError(
                f"Stage.batch_size must be an integer >= 2, {WHOLE_SECTION!r} (one batch per section) or None (the "
                f"plan's), got {b!r}."
            )


@dataclass(frozen=True)
class Augment:
    """The random changes made to every training patch when fine-tuning (drawn per patch, repeatable for a seed).

    Attributes
    ----------
    hflip, vflip
        Mirror left-right / top-bottom with probability 0.5.
    rotation
        ``"quarter"``: by 0, 90, 180 or 270 degrees (0 or 180 for non-square patches); ``"any"``: by an angle drawn
        uniformly in [0, 360) (corners filled with black, as torchvision's ``rotate``); ``"none"``.
    jitter
        Brightness, contrast and saturation factors drawn uniformly in ``[1 - j, 1 + j]`` (torchvision's
        ``ColorJitter(j, j, j)``; 0 leaves a property alone).
    """

    hflip: bool = True
    vflip: bool = True
    rotation: Literal["none", "quarter", "any"] = "quarter"
    jitter: tuple[float, float, float] = (0.1, 0.1, 0.1)

    def __post_init__(self):
        for name in ("hflip", "vflip"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"Augment.{name} must be True or False, got {getattr(self, name)!r}.")
        _check_choice("Augment", "rotation", self.rotation, ROTATIONS)
        jitter = tuple(self.jitter)
        if len(jitter) != 3:
            raise ValueError(f"Augment.jitter must be 3 numbers (brightness, contrast, saturation), got {jitter!r}.")
        object.__setattr__(self, "jitter", tuple(_check_number("Augment", "jitter", j, minimum=0.0) for j in jitter))
        if any(j >= 1 for j in self.jitter):
            raise ValueError(f"Augment.jitter factors must be below 1, got {self.jitter}.")


@dataclass(frozen=True)
class TrainPlan:
    """How a model learns; see the module docstring.

    Attributes
    ----------
    optimizer
        The optimiser of every stage that has none of its own (default: AdamW, lr 1e-3, weight decay 1e-3, BLEEP).
    schedule
        The learning-rate schedule of every stage that has none of its own (default: constant).
    batch_size
        Spots per training batch (>= 2). A recipe's batch larger than the training spots is reduced to fit (with a
        log message); a batch the caller asked for is not.
    max_epochs
        Epochs of a single-stage plan (``stages`` empty).
    stages
        The stages, in order; empty: one stage ``"main"`` of ``max_epochs`` with all losses and parameters.
    validation_fraction
        Fraction of spots held out for validation, early stopping and model selection (0: none; the last epoch
        of every stage is kept).
    early_stopping_patience
        Stop a stage after this many epochs without a better validation score; ``None`` runs every epoch.
    select_on
        ``"val_loss"`` (the lowest validation loss), ``"val_pearson"`` (the highest mean Pearson r over genes of
        the expression predicted for the validation spots: by retrieval from the training spots, or by the
        method's regression head) or ``"val_pearson_top50"`` (the mean r of the 50 genes best predicted on the
        validation spots, NH2ST's criterion). The best epoch's weights are restored at the end of every stage.
    validation_by_group
        Hold out ``validation_fraction`` of every section's spots (CMRCNet's split) instead of a fraction of all
        spots drawn together.
    augment
        Fine-tuning: augment the patches (with :attr:`augmentation`).
    augmentation
        Fine-tuning: the :class:`Augment` applied to training patches (default: both flips, quarter turns and
        +/- 10 % colour jitter; every published recipe declares its paper's).
    normalisation
        Fine-tuning: the patches' normalisation before the encoder: ``"encoder"`` (the encoder's own mean and
        standard deviation, e.g. timm's pretrained configuration), ``"imagenet"`` (ImageNet's mean and standard
        deviation) or ``"unit"`` (values in [0, 1], none). It stays with the model for prediction.
    drop_last
        Drop the incomplete last training batch of every epoch (BLEEP's ``drop_last=True``); batches of one section
        (``batch_by_group`` methods) always keep it.
    """

    optimizer: Optim = field(default_factory=Optim)
    schedule: Schedule = field(default_factory=Schedule)
    batch_size: int = 256
    max_epochs: int = 100
    stages: tuple[Stage, ...] = ()
    validation_fraction: float = 0.1
    early_stopping_patience: int | None = 10
    select_on: Literal["val_loss", "val_pearson", "val_pearson_top50"] = "val_loss"
    augment: bool = True
    drop_last: bool = True
    validation_by_group: bool = False
    augmentation: Augment = field(default_factory=Augment)
    normalisation: Literal["encoder", "imagenet", "unit"] = "encoder"

    def __post_init__(self):
        if not isinstance(self.optimizer, Optim):
            raise TypeError(f"TrainPlan.optimizer must be an Optim, got {type(self.optimizer).__name__}.")
        if not isinstance(self.schedule, Schedule):
            raise TypeError(f"TrainPlan.schedule must be a Schedule, got {type(self.schedule).__name__}.")
        _check_int("TrainPlan", "batch_size", self.batch_size, minimum=2)
        _check_int("TrainPlan", "max_epochs", self.max_epochs)
        stages = tuple(self.stages)
        if not all(isinstance(s, Stage) for s in stages):
            raise TypeError("TrainPlan.stages must be a tuple of Stage objects.")
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"TrainPlan.stages need distinct names, got {names}.")
        object.__setattr__(self, "stages", stages)
        v = _check_number("TrainPlan", "validation_fraction", self.validation_fraction, minimum=0.0)
        if v >= 1.0:
            raise ValueError(f"TrainPlan.validation_fraction must be < 1, got {self.validation_fraction!r}.")
        if self.early_stopping_patience is not None:
            _check_int("TrainPlan", "early_stopping_patience", self.early_stopping_patience)
        _check_choice("TrainPlan", "select_on", self.select_on, SELECTIONS)
        if not isinstance(self.augmentation, Augment):
            raise TypeError(f"TrainPlan.augmentation must be an Augment, got {type(self.augmentation).__name__}.")
        _check_choice("TrainPlan", "normalisation", self.normalisation, NORMALISATIONS)
        for name in ("augment", "drop_last", "validation_by_group"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"TrainPlan.{name} must be True or False, got {getattr(self, name)!r}.")

    def resolved_stages(self) -> tuple[Stage, ...]:
        """The stages with the plan's optimiser and schedule filled in (one ``"main"`` stage when none is given)."""
        stages = self.stages or (Stage("main", epochs=self.max_epochs),)
        return tuple(
            dataclasses.replace(s, optimizer=s.optimizer or self.optimizer, schedule=s.schedule or self.schedule)
            for s in stages
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly description (recorded in the saved model's config)."""
        d = dataclasses.asdict(self)
        d["stages"] = [dataclasses.asdict(s) for s in self.resolved_stages()]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainPlan:
        """Rebuild a plan from :meth:`to_dict`."""
        d = dict(d)
        stages = []
        for s in d.pop("stages", ()) or ():
            s = dict(s)
            for key, typ in (("optimizer", Optim), ("schedule", Schedule)):
                if isinstance(s.get(key), dict):
                    s[key] = typ(**s[key])
            for key in ("losses", "trainable"):
                if s.get(key) is not None:
                    s[key] = tuple(s[key])
            stages.append(Stage(**s))
        if isinstance(d.get("augmentation"), dict):
            aug = dict(d.pop("augmentation"))
            aug["jitter"] = tuple(aug.get("jitter", (0.1, 0.1, 0.1)))
            d["augmentation"] = Augment(**aug)
        return cls(
            optimizer=Optim(**d.pop("optimizer", {})),
            schedule=Schedule(**d.pop("schedule", {})),
            stages=tuple(stages),
            **d,
        )


#: Override value of ``early_stopping_patience`` that switches early stopping off (``None`` means "not given").
NO_EARLY_STOPPING = "off"

#: The caller's overrides of a plan accepted by :func:`resolve_plan` (keyword -> what it sets).
OVERRIDES = (
    "max_epochs",
    "batch_size",
    "lr",
    "weight_decay",
    "optimizer",
    "schedule",
    "validation_fraction",
    "early_stopping_patience",
    "select_on",
    "augment",
)


def resolve_plan(recipe: TrainPlan, plan: TrainPlan | None = None, **overrides: Any) -> TrainPlan:
    """The plan a fit runs: ``plan`` (or the method's ``recipe``) with the caller's ``overrides``.

    ``overrides`` whose value is ``None`` are ignored; ``early_stopping_patience="off"``
    (:data:`NO_EARLY_STOPPING`) switches early stopping off. ``max_epochs`` sets the
    epochs of every stage; ``lr`` / ``weight_decay`` / ``optimizer`` (a name or an :class:`Optim`) replace the
    optimiser of every stage; ``schedule`` (a name or a :class:`Schedule`) replaces the schedule of every stage.
    """
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise TypeError(f"unknown training settings {unknown}; valid: {list(OVERRIDES)}.")
    base = recipe if plan is None else plan
    if not isinstance(base, TrainPlan):
        raise TypeError(f"plan must be a sthist TrainPlan, got {type(base).__name__}.")
    o = {k: v for k, v in overrides.items() if v is not None}
    if not o:
        return base
    if o.get("early_stopping_patience") == NO_EARLY_STOPPING:
        o["early_stopping_patience"] = None
    stages = base.stages
    opt_changes = {k: o.pop(k) for k in ("lr", "weight_decay") if k in o}
    new_opt = o.pop("optimizer", None)
    new_sched = o.pop("schedule", None)
    if isinstance(new_sched, str):
        new_sched = Schedule(new_sched)

    def optim(current: Optim) -> Optim:
        if isinstance(new_opt, Optim):
            current = new_opt
        elif new_opt is not None:
            current = dataclasses.replace(current, name=new_opt)
        return dataclasses.replace(current, **opt_changes) if opt_changes else current

    changes: dict[str, Any] = {}
    if opt_changes or new_opt is not None:
        changes["optimizer"] = optim(base.optimizer)
        stages = tuple(
            s if s.optimizer is None else dataclasses.replace(s, optimizer=optim(s.optimizer)) for s in stages
        )
    if new_sched is not None:
        changes["schedule"] = new_sched
        stages = tuple(dataclasses.replace(s, schedule=None) for s in stages)
    if "max_epochs" in o:
        stages = tuple(dataclasses.replace(s, epochs=o["max_epochs"]) for s in stages)
    changes.update(o)
    return dataclasses.replace(base, stages=stages, **changes)
