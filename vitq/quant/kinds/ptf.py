"""``ptf``: FQ-ViT's power-of-two factors for LayerNorm inputs: per-channel scales ``s1 · 2^α``,
α ∈ {0..3}, over one shared base scale and zero point."""
from __future__ import annotations

from typing import Tuple

import torch

from ..primitives import choose_ptf_factors
from . import QuantKind, register_kind


@register_kind
class PowerOfTwoFactor(QuantKind):
    name = "ptf"
    granularities = ("per_channel",)
    symmetric = False
    requirement = "per_channel and unsigned (one power-of-two factor per channel, one shared zero point)"
    channel_stats = False  # one base range shared by every channel
    needs_tensor = True  # each channel's factor is fitted on the last batch

    def qparams(self, observer) -> Tuple[torch.Tensor, torch.Tensor]:
        spec = observer.spec
        scale, zero_point = super().qparams(observer)
        qmin, qmax = self.qrange(spec)
        # FQ-ViT PTF: channel scales s1·2^α, α ∈ {0..3}, s1 = s8 / 8, one shared zero point
        scale = choose_ptf_factors(observer.last, scale / 8, zero_point, qmin, qmax)
        return scale, zero_point.expand_as(scale).clone()
