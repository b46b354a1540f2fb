"""``uniform``: the affine grid ``s · (clamp(round(x / s) + z) − z)``, per tensor, channel or token."""
from __future__ import annotations

from . import QuantKind, register_kind


@register_kind
class Uniform(QuantKind):
    name = "uniform"
    plain_grid = True
    integer = True
    searchable = True
