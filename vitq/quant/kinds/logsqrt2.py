"""``logsqrt2``: RepQ-ViT's log√2 grid ``Δ · 2^(-q/2)`` for attention probabilities; Δ is calibrated."""
from __future__ import annotations

import math
from typing import Tuple

import torch

from ..primitives import fake_quantize_logsqrt2
from . import QuantKind, register_kind


@register_kind
class LogSqrt2(QuantKind):
    name = "logsqrt2"
    granularities = ("per_tensor",)
    symmetric = False
    requirement = "per_tensor and unsigned"
    searchable = True

    def fake_quantize(self, x, scale, zero_point, spec):
        return fake_quantize_logsqrt2(x, scale, spec.bits)

    def export_forward(self, x, scale, zero_point, spec):
        q = torch.clamp(torch.round(-2.0 * torch.log(torch.clamp(x / scale, min=1e-30)) / math.log(2.0)), min=0.0)
        out = scale * torch.pow(2.0, -q / 2)
        return torch.where((q > 2**spec.bits - 1) | (x <= 0), torch.zeros_like(out), out)

    def qparams(self, observer) -> Tuple[torch.Tensor, torch.Tensor]:
        delta = torch.clamp(observer._logsqrt2_delta(), min=1e-8)  # Δ: the largest level
        return delta, torch.zeros_like(delta)
