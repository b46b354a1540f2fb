"""Recipe stages: the steps a recipe names, run in order on a prepared model.

A stage is a registered class with a ``Settings`` dataclass (validated from the recipe; an
unknown key is an error) and a ``run(ctx)`` method that changes ``ctx.model`` in place. The
built-in ``calibrate`` stage sets every quantizer from statistics; refiners (``search``,
``smooth``, ...) register themselves in their own modules.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from ..errors import VitqError, check_by_bits, reject_unknown_keys
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
class StageGate:
    """The bit-widths and the calibration images a stage runs at, for every stage: outside them it
    is skipped, the model left as the stages before it made it, and the plan says why
    (``meta[STAGE]["skipped"]``).

    Written among the stage's settings in a recipe: ``{reconstruct: {iterations: 200, min_w_bits: 4,
    min_a_bits: 6}}``. The run's nominal bits (``--w-bits``/``--a-bits``) are compared. ``images``:
    ``any`` (default), ``real`` (skipped on generated, data-free images) or ``generated`` (run on
    those only).
    """

    min_w_bits: int = 2
    max_w_bits: int = 8
    min_a_bits: int = 2
    max_a_bits: int = 8
    images: str = "any"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> "StageGate":
        gate = cls(**data)
        for key, value in asdict(gate).items():
            if key == "images":
                if value not in IMAGE_GATES:
                    raise VitqError(f"{where}.images must be one of {', '.join(IMAGE_GATES)}, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 8:
                raise VitqError(f"{where}.{key} must be an integer from 2 to 8, got {value!r}")
        for kind in ("w", "a"):
            lo, hi = getattr(gate, f"min_{kind}_bits"), getattr(gate, f"max_{kind}_bits")
            if lo > hi:
                raise VitqError(f"{where}.min_{kind}_bits ({lo}) is above max_{kind}_bits ({hi}): "
                                "no bit-width would run the stage")
        return gate

    def outside(self, w_bits: int, a_bits: int, generated: bool = False) -> str:
        """Why a run at ``w_bits``/``a_bits`` (on generated images when ``generated``) skips the stage
        (empty when it runs)."""
        return ", ".join(why for why, out in (
            (f"w_bits {w_bits} < {self.min_w_bits}", w_bits < self.min_w_bits),
            (f"w_bits {w_bits} > {self.max_w_bits}", w_bits > self.max_w_bits),
            (f"a_bits {a_bits} < {self.min_a_bits}", a_bits < self.min_a_bits),
            (f"a_bits {a_bits} > {self.max_a_bits}", a_bits > self.max_a_bits),
            ("generated (data-free) images", generated and self.images == "real"),
            ("real images", not generated and self.images == "generated")) if out)

    def describe(self) -> str:
        images = {"any": "", "real": ", on real images", "generated": ", on generated images"}[self.images]
        return (f"weights {self.min_w_bits}-{self.max_w_bits} bits, activations {self.min_a_bits}-"
                f"{self.max_a_bits} bits{images}")


IMAGE_GATES = ("any", "real", "generated")
GATE_KEYS = tuple(StageGate.__dataclass_fields__)
BY_BITS = "by_bits"


def _split(data: Mapping[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any], Any]:
    """A stage entry's mapping as (its own settings, gate keys, by_bits)."""
    data = dict(data or {})
    by_bits = data.pop(BY_BITS, None)
    gate = {k: data.pop(k) for k in GATE_KEYS if k in data}
    return data, gate, by_bits


@dataclass(frozen=True)
class StageConfig:
    """One entry of a recipe's ``stages`` list: a stage name, its validated settings, and what the
    framework reads for every stage: its bit-width gate (:class:`StageGate`) and ``by_bits``,
    settings (the gate's included) that replace the others at one bit-width, keyed ``wXaY``
    (``{reconstruct: {min_a_bits: 6, by_bits: {w4a4: {min_a_bits: 4, holdout: 0.2}}}}``)."""

    name: str
    settings: StageSettings
    gate: StageGate = field(default_factory=StageGate)
    by_bits: Optional[Dict[str, Dict[str, Any]]] = None

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
        if data is not None and not isinstance(data, Mapping):
            raise VitqError(f"{where}: the settings of stage {name!r} must be a mapping, got {data!r}")
        return cls._build(name, stage.Settings, data or {}, f"{where}: stage {name!r}")

    @classmethod
    def _build(cls, name: str, settings_type: type, data: Mapping[str, Any], where: str) -> "StageConfig":
        own, gate_data, by_bits = _split(data)
        try:
            settings = settings_type.from_dict(own, where)
        except VitqError as err:
            if "unknown key" not in str(err):
                raise
            raise VitqError(f"{err}; and for every stage: {', '.join(GATE_KEYS)}, {BY_BITS}") from None
        try:
            gate = StageGate.from_dict(gate_data, name)
        except VitqError as err:
            raise VitqError(f"{where}: {err}") from None
        if by_bits is not None:
            by_bits = check_by_bits(by_bits, where, "w4a4: {min_a_bits: 4}")
            for key, changes in by_bits.items():
                inner = f"{name}.by_bits.{key}"
                try:  # its keys and values, as they will be read at that bit-width
                    cls._build(name, settings_type, {**settings.to_dict(), **gate_data, **changes}, inner)
                except VitqError as err:
                    raise VitqError(str(err) if inner in str(err) else f"{where}: {inner}: {err}") from None
        return cls(name, settings, gate, by_bits or None)

    def at_bits(self, w_bits: int, a_bits: int, generated: bool = False) -> Tuple["StageConfig", str]:
        """This stage as a run at ``w_bits``/``a_bits`` reads it (its ``by_bits`` entry applied), and
        why the run skips it (empty when it runs; ``generated``: the run calibrates on generated images)."""
        config = self
        changes = (self.by_bits or {}).get(f"w{w_bits}a{a_bits}")
        if changes:
            config = StageConfig._build(self.name, type(self.settings), {**self._flat(), **changes},
                                        f"{self.name}.by_bits.w{w_bits}a{a_bits}")
        return config, config.gate.outside(w_bits, a_bits, generated)

    def _flat(self) -> Dict[str, Any]:
        """Settings and non-default gate keys in one mapping (no by_bits)."""
        default = StageGate()
        return {**self.settings.to_dict(),
                **{k: v for k, v in asdict(self.gate).items() if v != getattr(default, k)}}

    def build(self) -> Stage:
        return STAGES.get(self.name)(self.settings)

    def to_dict(self) -> Any:
        data = self._flat()
        if self.by_bits:
            data[BY_BITS] = self.by_bits
        if data == type(self.settings)().to_dict() and self.name == "calibrate":
            return self.name  # plain calibration reads as before its settings existed
        return {self.name: data} if data else self.name

    def with_overrides(self, overrides: Mapping[str, Any]) -> "StageConfig":
        data = {**self._flat(), **({BY_BITS: self.by_bits} if self.by_bits else {}), **overrides}
        return StageConfig._build(self.name, type(self.settings), data, f"--set {self.name}")
