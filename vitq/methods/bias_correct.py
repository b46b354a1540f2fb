"""Empirical bias correction, the ``bias_correct`` stage.

Quantization shifts the mean of a layer's output: rounding errors of the weights do not average
out over a channel, and neither do the clipping and rounding errors of its inputs (Nagel et al.,
2019, "Data-Free Quantization Through Weight Equalization and Bias Correction", section 4.2;
Evol-Q and CPT-V correct their weights' bias too). This stage measures, for each layer with a
bias, the mean output of every output channel on the calibration images in the quantized model
and in the float model, and subtracts the difference from the bias. The correction lives in the
float bias, which an integer runtime adds to the accumulator anyway, so it costs nothing at
inference.

Layers are corrected in forward order on the quantized model, each seeing the outputs of the
layers before it already corrected, so the correction also removes the mean drift that the
quantized upstream layers accumulate. The target is the float model's own output at the same
layer: the stages that fold factors into a layer (``smooth``, ``reparam``, ``opt_m``) keep each
linear layer's float output unchanged, so the two are comparable.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import VitqError
from ..nn import QuantConv2d, QuantLinear
from .gptq import mark_changed
from .lifecycle import forward_order, staged_passes
from .stages import STAGES, Stage, StageContext, StageSettings

Tensor = torch.Tensor


class _ChannelMean:
    """Running mean per output channel of a linear (last axis) or conv (``axis=1``) output."""

    def __init__(self, axis: int = -1) -> None:
        self.total, self.count, self.axis = None, 0, axis

    def add(self, out: Tensor) -> None:
        out = out.detach().double()
        flat = out.movedim(self.axis, -1)
        flat = flat.reshape(-1, flat.shape[-1])
        s = flat.sum(0)
        self.total = s if self.total is None else self.total + s
        self.count += flat.shape[0]

    @property
    def mean(self) -> Tensor:
        return self.total / self.count


def _channel_axis(module: nn.Module) -> int:
    return 1 if isinstance(module, nn.Conv2d) else -1


def float_output_means(float_model: nn.Module, names: List[str], images, device) -> Dict[str, Tensor]:
    """The mean output per channel of each named module of ``float_model`` over ``images``."""
    means, hooks = {}, []
    for name in names:
        try:
            module = float_model.get_submodule(name)
        except AttributeError:
            raise VitqError(f"bias_correct: the float model has no {name}; the quantized model was not "
                            "prepared from it") from None
        means[name] = _ChannelMean(_channel_axis(module))
        hooks.append(module.register_forward_hook(lambda m, a, out, acc=means[name]: acc.add(out)))
    try:
        with torch.no_grad():
            for x in images:
                float_model(x.to(device))
    finally:
        for hook in hooks:
            hook.remove()
    return {name: acc.mean for name, acc in means.items()}


@dataclass(frozen=True)
class BiasCorrectSettings(StageSettings):
    """Settings of the ``bias_correct`` stage.

    Attributes:
        convs: correct the convolutions too (the patch embedding), not only the linear layers.
        exclude: regular expressions; layers whose name matches one (``re.search``) are left as
            they are, e.g. ``["attn\\.qkv$"]``.
        strength: the fraction of the measured shift that is removed (1: all of it).

    The recommended recipe runs it at 8-bit activations only (``min_a_bits: 8``, the gate every stage
    has: :class:`vitq.methods.stages.StageGate`): on DeiT-Tiny (``benchmarks/accuracy.py --select``:
    two folds of 50 calibration images, each scored on the other 50) the correction lowered the
    held-out KL at A8, left it level at A6 and raised it at A4, where the shifts measured on the
    calibration images do not carry over.
    """

    convs: bool = True
    exclude: List[str] = field(default_factory=list)
    strength: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.convs, bool):
            raise VitqError(f"bias_correct.convs must be true or false, got {self.convs!r}")
        if not isinstance(self.exclude, (list, tuple)) or not all(isinstance(e, str) for e in self.exclude):
            raise VitqError(f"bias_correct.exclude must be a list of regular expressions, got {self.exclude!r}")
        for pattern in self.exclude:
            try:
                re.compile(pattern)
            except re.error as err:
                raise VitqError(f"bias_correct.exclude: {pattern!r} is not a regular expression ({err})") from None
        if isinstance(self.strength, bool) or not isinstance(self.strength, (int, float)) or \
                not 0 < self.strength <= 1:
            raise VitqError(f"bias_correct.strength must be a number in (0, 1], got {self.strength!r}")


@STAGES.register("bias_correct")
class BiasCorrectStage(Stage):
    """Empirical bias correction: each layer's bias shifted so that the mean of every output
    channel on the calibration images equals the float model's, layer by layer in forward order
    on the quantized model. Layers without a bias are left as they are."""

    Settings = BiasCorrectSettings

    def run(self, ctx: StageContext) -> None:
        s: BiasCorrectSettings = self.settings
        model = ctx.model.to(ctx.device)
        kinds = (QuantLinear, QuantConv2d) if s.convs else (QuantLinear,)
        names = {m: n for n, m in model.named_modules()}
        layers = [m for m in model.modules() if isinstance(m, kinds) and m.bias is not None
                  and not any(re.search(p, names[m]) for p in s.exclude)]
        if not layers:
            ctx.log("bias_correct: no layer with a bias; nothing to do")
            ctx.record["bias_correct"] = {**s.to_dict(), "layers": 0}
            return
        images = [b.to(ctx.device) for b in ctx.data]
        float_model = ctx.float_model.to(ctx.device).eval()
        targets = float_output_means(float_model, [names[m] for m in layers], images, ctx.device)
        order = forward_order(model, images[0], layers)
        shifts = []
        passes = staged_passes(model, images, [[m] for m in order], ctx.device)
        for (layer,), feed in tqdm(passes, total=len(order), desc="bias_correct", unit="layer",
                                   disable=not ctx.progress, leave=False):
            acc = _ChannelMean(_channel_axis(layer))
            hook = layer.register_forward_pre_hook(lambda m, args: acc.add(m.forward(*args)))
            try:
                feed()
            finally:
                hook.remove()
            with torch.no_grad():
                shift = s.strength * (acc.mean - targets[names[layer]].to(acc.mean.device)).to(layer.bias.dtype)
                layer.bias.sub_(shift)
            shifts.append(float(shift.abs().mean()))
        mark_changed(model, [f"{names[m]}.bias" for m in order])
        ctx.record["bias_correct"] = {**s.to_dict(), "layers": len(order),
                                      "mean_abs_shift": round(sum(shifts) / len(shifts), 6)}
