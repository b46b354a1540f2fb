"""Post-LayerNorm scale reparameterisation (RepQ-ViT), the ``reparam`` stage.

The activations that leave a LayerNorm differ so much from channel to channel that one
per-tensor quantizer fits none of them well. RepQ-ViT calibrates them per channel (scale Δ_c,
zero point z_c), then moves the per-channel part into the LayerNorm before and the linear layer
after, so that what is deployed is one per-tensor quantizer (METHODS.md §1.3)::

    Δ̄ = mean_c Δ_c,  z̄ = mean_c z_c,  r_c = Δ_c / Δ̄,  b_c = min_c / r_c − min̄
    (min_c = −z_c·Δ_c, min̄ = −z̄·Δ̄)
    γ ← γ / r,  β ← β / r − b,  W[:, c] ← W[:, c]·r_c,  bias ← bias + W·b (with the new W)

Channel c's calibrated range [min_c, min_c + (2^b − 1)·Δ_c] lands on the shared range
[min̄, min̄ + (2^b − 1)·Δ̄]. In float the model is unchanged. This is the fold of
:mod:`vitq.methods.smooth` with ``scale = r`` and ``shift = b·r`` (``Y ↦ (Y − shift)/scale``), so
plans store and re-fold it the same way. The ``calibrate`` stage that follows sets the
per-tensor quantizer and the weight quantizers on the reparameterised model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Sequence, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import VitqError
from ..models.adapters import NormLinearPair, find_adapter
from ..nn import QuantLinear
from ..quant.observers import Observer, ObserverConfig
from ..quant.spec import QuantSpec
from .smooth import POINTS, SmoothFactor, check_foldable, fold_smoothing
from .stages import STAGES, Stage, StageContext, StageSettings

Tensor = torch.Tensor
TARGETS = ("mean", "median")
#: where a partial ``strength`` applies: every pair, or the pairs whose weights have fewer bits than their input
STRENGTH_WHERE = ("all", "fewer_weight_bits")


def reparam_factors(scale: Tensor, zero_point: Tensor, target: str = "mean", strength: float = 1.0,
                    levels: int = 255) -> Tuple[Tensor, Tensor]:
    """``(r, shift)`` of one pair from its per-channel ``scale`` Δ_c and ``zero_point`` z_c.

    ``r = Δ_c / Δ̄`` and ``shift = b·r = min_c − r_c·min̄``, so that ``(Y − shift) / r`` maps channel
    c's range onto the shared one.

    ``strength`` α < 1 moves only part of the per-channel spread into the linear layer:
    ``r = (Δ_c / Δ̄)^α`` and each channel's range is centred on the shared one
    (``shift = mid_c − r_c·mid̄``, the mid-points of ``levels`` steps). Channel c's weights are
    multiplied by ``r_c``, so a full move (α = 1, RepQ-ViT) makes the weight columns of outlier
    channels as large as their activations; a partial one leaves part of the spread to the
    activation quantizer, which at 8 bits has room for it while 4-bit weights have not.

    Example (2 bits, two channels: [0, 1.5] and [−2, 1]; shared Δ̄ = 0.75, z̄ = 1, range [−0.75, 1.5]):
        >>> r, shift = reparam_factors(torch.tensor([0.5, 1.0]), torch.tensor([0., 2.]))
        >>> [round(v, 4) for v in r.tolist()], shift.tolist()
        ([0.6667, 1.3333], [0.5, -1.0])
    """
    scale, zero_point = scale.double(), zero_point.double()
    if target == "mean":
        t_scale, t_zero = scale.mean(), zero_point.mean()
    elif target == "median":
        t_scale, t_zero = scale.median(), zero_point.median()
    else:
        raise VitqError(f"reparam.target must be one of {', '.join(TARGETS)}, got {target!r}")
    t_zero = torch.round(t_zero)  # an integer zero point for the deployed per-tensor quantizer
    if not 0.0 < strength <= 1.0:
        raise VitqError(f"reparam.strength must be in (0, 1], got {strength}")
    if strength == 1.0:
        r = scale / t_scale
        shift = -zero_point * scale - r * (-t_zero * t_scale)
    else:
        r = (scale / t_scale) ** strength
        shift = (levels / 2 - zero_point) * scale - r * (levels / 2 - t_zero) * t_scale
    return r.float(), shift.float()


@dataclass(frozen=True)
class ReparamSettings(StageSettings):
    """Settings of the ``reparam`` stage.

    Attributes:
        points: which LayerNorm → linear pairs: ``qkv``, ``fc1``, ``reduction`` (Swin patch merging).
        target: the shared scale and zero point: the ``mean`` of the channels' (RepQ-ViT) or their
            ``median`` (less pulled by outlier channels).
        strength: how much of the per-channel spread moves into the linear layer's weights, in
            (0, 1]: 1 is RepQ-ViT's full move (a per-tensor activation range fits every channel);
            less keeps the weight columns of outlier channels smaller, for low-bit weights.
        strength_where: ``all`` pairs take ``strength``, or only those whose linear layer has fewer
            weight bits than input bits (``fewer_weight_bits``; the others take the full move). On
            DeiT-Tiny (benchmarks/select_recipe.py, held-out calibration images) 0.5 lowered the KL
            at W4A8 and W3A8 and raised it at W8A8 and W6A6.
    """

    points: Tuple[str, ...] = POINTS
    target: str = "mean"
    strength: float = 1.0
    strength_where: str = "all"

    def __post_init__(self) -> None:
        if isinstance(self.points, str):
            object.__setattr__(self, "points", (self.points,))
        object.__setattr__(self, "points", tuple(self.points))
        bad = [p for p in self.points if p not in POINTS]
        if bad or not self.points:
            raise VitqError(f"reparam.points must be a non-empty list of {', '.join(POINTS)}; got {list(self.points)}")
        if self.target not in TARGETS:
            raise VitqError(f"reparam.target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if isinstance(self.strength, bool) or not isinstance(self.strength, (int, float)) or \
                not 0.0 < float(self.strength) <= 1.0:
            raise VitqError(f"reparam.strength must be a number in (0, 1], got {self.strength!r}")
        object.__setattr__(self, "strength", float(self.strength))
        if self.strength_where not in STRENGTH_WHERE:
            raise VitqError(f"reparam.strength_where must be one of {', '.join(STRENGTH_WHERE)}, "
                            f"got {self.strength_where!r}")

    def to_dict(self) -> Dict[str, Any]:
        out = super().to_dict()
        out["points"] = list(self.points)
        return out


@STAGES.register("reparam")
class ReparamStage(Stage):
    """RepQ-ViT's post-LayerNorm reparameterisation: calibrate the qkv/fc1 (and Swin reduction)
    inputs per channel, fold the per-channel scales and zero points into the LayerNorm and the
    linear layer, leaving a per-tensor quantizer. Runs before ``calibrate``."""

    Settings = ReparamSettings
    needs_calibrated = False

    def run(self, ctx: StageContext) -> None:
        s: ReparamSettings = self.settings
        model = ctx.model
        check_foldable(model, "reparam")
        pairs = [p for p in find_adapter(model).norm_linear_pairs(model) if p.point in s.points]
        pairs = [p for p in pairs if _input_spec(model, p) is not None]
        if not pairs:
            ctx.log("reparam: no LayerNorm → linear pair with a quantized uniform input; nothing to do")
            ctx.record["reparam"] = {**s.to_dict(), "pairs": 0}
            return
        observers = self._observe(ctx, pairs, ctx.activations)
        factors, unshifted, partial = [], [], []
        for pair in pairs:
            scale, zero_point = observers[pair.linear].qparams()
            levels = observers[pair.linear].spec.qrange[1] - observers[pair.linear].spec.qrange[0]
            strength = s.strength if _takes_strength(model, pair, s.strength_where) else 1.0
            if strength < 1.0:
                partial.append(pair.linear)
            r, shift = reparam_factors(scale.reshape(-1), zero_point.reshape(-1), s.target, strength, levels)
            if not pair.shift_exact:
                shift = torch.zeros_like(shift)
                unshifted.append(pair.linear)
            factors.append(SmoothFactor(pair.point, pair.norm, pair.linear, r.cpu(), shift.cpu()))
        fold_smoothing(model, factors)
        if unshifted:
            ctx.log("reparam: %d pair(s) rescaled without a shift (the model pads their tokens with zeros): %s",
                    len(unshifted), ", ".join(unshifted))
        if s.strength < 1.0:
            ctx.log("reparam: strength %.2f on %d of %d pair(s)", s.strength, len(partial), len(factors))
        ctx.record["reparam"] = {**s.to_dict(), "pairs": len(factors), "unshifted": unshifted,
                                 "partial": len(partial)}

    @staticmethod
    def _observe(ctx: StageContext, pairs: Sequence[NormLinearPair], config: ObserverConfig) -> Dict[str, Observer]:
        """A per-channel observer of each linear's input, fed by a float forward pass (the fold is
        exact, so the float model's activations are the reparameterised model's before the map)."""
        float_model = ctx.float_model.to(ctx.device).eval()
        observers = {}
        for pair in pairs:
            spec = _input_spec(ctx.model, pair)
            observers[pair.linear] = config.build(QuantSpec("uniform", spec.bits, "per_channel", axis=-1,
                                                            symmetric=False))
        hooks = [float_model.get_submodule(name).register_forward_pre_hook(
            lambda mod, args, obs=obs: obs.observe(args[0])) for name, obs in observers.items()]
        try:
            with torch.no_grad():
                for batch in tqdm(ctx.data, desc="reparam", unit="batch", disable=not ctx.progress, leave=False):
                    float_model(batch.to(ctx.device))
        finally:
            for hook in hooks:
                hook.remove()
        return observers


def _takes_strength(model: nn.Module, pair: NormLinearPair, where: str) -> bool:
    """Whether the pair takes the settings' partial strength (``strength_where``)."""
    if where == "all":
        return True
    linear = model.get_submodule(pair.linear)
    w = linear.weight_quantizer.spec
    return w.enabled and w.bits < linear.input_quantizer.spec.bits


def _input_spec(model: nn.Module, pair: NormLinearPair):
    """The input quantizer spec of the pair's linear, when it is an enabled uniform one."""
    linear = model.get_submodule(pair.linear)
    if not isinstance(linear, QuantLinear):
        return None
    spec = linear.input_quantizer.spec
    return spec if spec.enabled and spec.kind_entry.plain_grid else None
