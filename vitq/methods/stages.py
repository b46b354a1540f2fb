"""Recipe stages: the steps a recipe names, run in order on a prepared model.

A stage is a registered class with a ``Settings`` dataclass (validated from the recipe; an
unknown key is an error) and a ``run(ctx)`` method that changes ``ctx.model`` in place. The
built-in ``calibrate`` stage sets every quantizer from statistics; refiners (``search``,
``smooth``, ...) register themselves in their own modules.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, List, Mapping, Optional

import torch
from torch import nn

from ..errors import VitqError, reject_unknown_keys
from ..quant.observers import ObserverConfig
from ..registry import Registry
from .lifecycle import calibrate

Batch = Any
# refresh(qmodel, batches, step) -> new batches: data-free runs re-synthesise their images from
# the model being built (CLAMP-ViT's cycle)
Refresher = Callable[[nn.Module, List[torch.Tensor], int], List[torch.Tensor]]


@dataclass(frozen=True)
class StageSettings:
    """Base of every stage's settings: ``from_dict`` rejects unknown keys."""

    @classmethod
    def from_dict(cls, data: Optional[Mapping[str, Any]], where: str) -> "StageSettings":
        data = dict(data or {})
        reject_unknown_keys(cls, data, where)
        try:
            return cls(**data)
        except TypeError as err:  # a wrong type that the dataclass itself trips on
            raise VitqError(f"{where}: {err}") from None

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def allocates_widths(self) -> bool:
        """Whether the stage chooses bit-widths under an average-bits budget (``budget_w``/``budget_a``)."""
        return False

    def replace(self, **changes: Any) -> "StageSettings":
        return type(self).from_dict({**self.to_dict(), **changes}, type(self).__name__)


@dataclass
class StageContext:
    """What a stage sees: the float model, the model being quantized and the calibration data.

    Attributes:
        float_model: the float model; stages never modify it.
        model: the prepared model, changed in place by each stage.
        data: calibration batches (image tensors), already on no particular device.
        weights, activations: the recipe's observers.
        device: where to compute.
        w_bits, a_bits: the run's bit-widths.
        seed: seeds every random choice of a stage.
        workdir: a folder for checkpoints and plots (the run folder), or None.
        resume: continue from a checkpoint found in ``workdir``.
        refresh: data-free runs: makes new calibration images from the current quantized model.
        log: progress messages (a logger's ``info``).
        record: facts a stage reports (times, curves); they go into the plan's metadata.
    """

    float_model: nn.Module
    model: nn.Module
    data: List[torch.Tensor]
    weights: ObserverConfig
    activations: ObserverConfig
    device: torch.device
    w_bits: int = 8
    a_bits: int = 8
    seed: int = 0
    progress: bool = True
    workdir: Optional[Path] = None
    resume: bool = False
    refresh: Optional[Refresher] = None
    log: Callable[..., None] = lambda *args: None
    record: Dict[str, Any] = field(default_factory=dict)
    from_plan: bool = False


class Stage:
    """A step of a recipe. Subclasses set ``Settings`` and implement :meth:`run`."""

    Settings: ClassVar[type] = StageSettings
    #: whether the stage runs on a model that is already calibrated (``--start-plan``)
    needs_calibrated: ClassVar[bool] = True

    def __init__(self, settings: Optional[StageSettings] = None) -> None:
        self.settings = settings if settings is not None else self.Settings()

    def run(self, ctx: StageContext) -> None:  # pragma: no cover - every stage defines it
        raise NotImplementedError


STAGES: Registry[type] = Registry("stage")


@dataclass(frozen=True)
class CalibrateSettings(StageSettings):
    """Settings of the ``calibrate`` stage.

    Attributes:
        sequential: observe each quant point on the partly quantized model (every point before
            it in forward order already quantized), as RepQ-ViT's calibration pass does; about
            two forward passes per block. ``false``: every point sees float tensors (FQ-ViT).
    """

    sequential: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.sequential, bool):
            raise VitqError(f"calibrate.sequential must be true or false, got {self.sequential!r}")


@STAGES.register("calibrate")
class CalibrateStage(Stage):
    """Set every quantizer's scale and zero point from the recipe's observers (on float
    tensors, or sequentially on the partly quantized model)."""

    Settings = CalibrateSettings
    needs_calibrated = False

    def run(self, ctx: StageContext) -> None:
        calibrate(ctx.model, ctx.data, weights=ctx.weights, activations=ctx.activations, device=ctx.device,
                  progress=ctx.progress, sequential=self.settings.sequential)


@dataclass(frozen=True)
class StageConfig:
    """One entry of a recipe's ``stages`` list: a stage name and its validated settings."""

    name: str
    settings: StageSettings

    @classmethod
    def parse(cls, entry: Any, where: str) -> "StageConfig":
        """``calibrate`` or ``{search: {passes: 10, ...}}``."""
        if isinstance(entry, str):
            name, data = entry, {}
        elif isinstance(entry, Mapping) and len(entry) == 1:
            name, data = next(iter(entry.items()))
        else:
            raise VitqError(f"{where}: each stage is a name or a one-key mapping {{name: settings}}, got {entry!r}")
        stage = STAGES.get(name)
        return cls(name, stage.Settings.from_dict(data, f"{where}: stage {name!r}"))

    def build(self) -> Stage:
        return STAGES.get(self.name)(self.settings)

    def to_dict(self) -> Any:
        data = self.settings.to_dict()
        if data == type(self.settings)().to_dict() and self.name == "calibrate":
            return self.name  # plain calibration reads as before its settings existed
        return {self.name: data} if data else self.name

    def with_overrides(self, overrides: Mapping[str, Any]) -> "StageConfig":
        data = {**self.settings.to_dict(), **overrides}
        return StageConfig(self.name, type(self.settings).from_dict(data, f"--set {self.name}"))
