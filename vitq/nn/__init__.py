"""Quantized modules (DESIGN layer 4)."""
from .modules import (PrefixRows, QuantAttention, QuantConv2d, QuantLayerNorm, QuantLinear, QuantModule,
                      QuantWindowAttention)

__all__ = ["PrefixRows", "QuantAttention", "QuantConv2d", "QuantLayerNorm", "QuantLinear", "QuantModule",
           "QuantWindowAttention"]
