"""The ``recalibrate`` stage: set chosen activation quant points again, on the quantized model.

``calibrate`` sets every activation range on the float model's tensors (or, with ``sequential``,
on the partly quantized model before any weight is rounded). Later stages change what those points
receive: GPTQ and block reconstruction round the weights upstream, bias correction moves the
layers' outputs. This stage observes the chosen points again on the model as it is then, point
group after point group in forward order (each group seeing every earlier one already set again),
with the recipe's activation observer or another one, and replaces their scales and zero points.

Meant for points that see few values and matter much: the class token's rows of a ``prefix_rows``
split (its default), which are one row of 197 in DeiT-Tiny, calibrated on the float model's rows
while the classifier reads the quantized model's (``benchmarks/probe_class_token.py`` set that grid
after the whole recipe).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Dict, Optional

from ..errors import VitqError
from ..models import iter_quantizers
from ..quant import protocol as roles
from ..quant.observers import OBSERVERS
from .lifecycle import recalibrate_points
from .stages import STAGES, Stage, StageContext, StageSettings


@dataclass(frozen=True)
class RecalibrateSettings(StageSettings):
    """Settings of the ``recalibrate`` stage.

    Attributes:
        points: a regular expression (``re.search``) over quant point names; the activation points
            it matches are set again. Default: the prefix-token rows' quantizers that a
            ``prefix_rows`` stage made (none matched: the stage does nothing and says so).
        observer: the observer that sets them (``minmax``, ``percentile_mse``, ...; default: the
            recipe's activation observer with its settings).
    """

    points: str = r"_prefix_quantizer$"
    observer: Optional[str] = None

    def __post_init__(self) -> None:
        if not isinstance(self.points, str) or not self.points:
            raise VitqError(f"recalibrate.points must be a regular expression over quant point names, got {self.points!r}")
        try:
            re.compile(self.points)
        except re.error as err:
            raise VitqError(f"recalibrate.points: {self.points!r} is not a regular expression ({err})") from None
        if self.observer is not None and self.observer not in OBSERVERS:
            raise VitqError(f"recalibrate.observer: unknown observer {self.observer!r}; "
                            f"choose from {', '.join(OBSERVERS.names())}")

    def to_dict(self) -> Dict[str, Any]:
        return {"points": self.points, "observer": self.observer}


@STAGES.register("recalibrate")
class RecalibrateStage(Stage):
    """Observe the chosen activation points again on the quantized model, in forward order, and
    replace their scales and zero points. Runs after ``calibrate`` (typically last, or before
    ``bias_correct``)."""

    Settings = RecalibrateSettings

    def run(self, ctx: StageContext) -> None:
        s: RecalibrateSettings = self.settings
        pattern = re.compile(s.points)
        matched = {n: q for n, q in iter_quantizers(ctx.model) if pattern.search(n)}
        points = {n: q for n, q in matched.items() if q.role != roles.WEIGHT and q.needs_calibration}
        # another observer keeps the recipe's grids (symmetric or not) but none of its observer's settings
        config = ctx.activations if s.observer is None else \
            replace(ctx.activations, observer=s.observer, settings={})
        if points:
            recalibrate_points(ctx.model, ctx.data, points, config, device=ctx.device, progress=ctx.progress)
        elif matched:
            ctx.log("recalibrate: %r matches only weights or points without a range (%s); nothing set again",
                    s.points, next(iter(matched)))
        else:
            ctx.log("recalibrate: no quant point matches %r; nothing set again", s.points)
        ctx.record["recalibrate"] = {**s.to_dict(), "observer": config.observer, "recalibrated": len(points)}
