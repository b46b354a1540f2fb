"""``twin_range``: PTQ4ViT's twin uniform for post-softmax values: a region bit picks the fine scale
``s / 2^m`` for values within its range, else the coarse ``s`` (unsigned, zero point 0)."""
from __future__ import annotations

from ..primitives import fake_quantize_twin_range
from . import register_kind
from .twin import Twin


@register_kind
class TwinRange(Twin):
    name = "twin_range"
    symmetric = False
    requirement = "per_tensor and unsigned (region bit + magnitude, zero point 0)"

    def qrange(self, spec):
        return 0, 2 ** (spec.bits - 1) - 1

    def fake_quantize(self, x, scale, zero_point, spec):
        return fake_quantize_twin_range(x, scale, spec.ratio_log2, spec.bits)
