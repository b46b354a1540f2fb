"""``twin``: MPTQ-ViT OPT-m's two regions for post-GELU values: a sign bit picks the negative scale
``s_pos / 2^m`` or the positive ``s_pos`` (sign-magnitude codes, zero point 0)."""
from __future__ import annotations

from typing import Tuple

import torch

from ..primitives import fake_quantize_twin
from . import QuantKind, register_kind


def twin_qparams(max_val: torch.Tensor, qmax: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The positive (coarse) scale ``max / qmax`` and zero point 0 of a two-region quantizer (the
    other scale follows from the spec's ``ratio_log2``)."""
    scale = torch.clamp(torch.clamp(max_val, min=0.0) / qmax, min=1e-8)
    return scale, torch.zeros_like(scale)


@register_kind
class Twin(QuantKind):
    name = "twin"
    granularities = ("per_tensor",)
    symmetric = True
    requirement = "per_tensor and symmetric (sign-magnitude codes, zero point 0)"
    ratio = True

    def qrange(self, spec):
        return -(2 ** (spec.bits - 1) - 1), 2 ** (spec.bits - 1) - 1

    def fake_quantize(self, x, scale, zero_point, spec):
        return fake_quantize_twin(x, scale, spec.ratio_log2, spec.bits)

    def export_forward(self, x, scale, zero_point, spec):
        return self.fake_quantize(x, scale, zero_point, spec)  # plain out-of-place ops: it exports as is

    def range_qparams(self, spec, lo, hi):
        return twin_qparams(hi, self.qrange(spec)[1])

    def range_error(self, spec, data, lo, hi):
        scale, zero_point = self.range_qparams(spec, lo, hi)
        return (self.fake_quantize(data, scale, zero_point, spec) - data).pow(2)

    def label(self, spec):
        return f"{self.name}(m={spec.ratio_log2})"
