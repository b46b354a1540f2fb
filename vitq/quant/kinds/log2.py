"""``log2``: FQ-ViT's fixed log2 grid for attention probabilities (no parameters)."""
from __future__ import annotations

import math
from typing import Tuple

import torch

from ..primitives import fake_quantize_log2
from . import QuantKind, register_kind


@register_kind
class Log2(QuantKind):
    name = "log2"
    granularities = ("per_tensor",)
    symmetric = False
    requirement = "per_tensor and unsigned"
    calibrated = False

    def fake_quantize(self, x, scale, zero_point, spec):
        return fake_quantize_log2(x, spec.bits)

    def export_forward(self, x, scale, zero_point, spec):
        q = torch.clamp(torch.round(-torch.log(torch.clamp(x, min=1e-30)) / math.log(2.0)), min=0.0)
        out = torch.pow(2.0, -q)
        return torch.where((q > 2**spec.bits - 1) | (x <= 0), torch.zeros_like(out), out)

    def qparams(self, observer) -> Tuple[torch.Tensor, torch.Tensor]:
        one = torch.ones((), device=observer.max_val.device)
        return one, torch.zeros_like(one)
