"""Quantized modules (DESIGN layer 4)."""
from .modules import QuantAttention, QuantConv2d, QuantLayerNorm, QuantLinear, QuantModule, QuantWindowAttention

__all__ = ["QuantAttention", "QuantConv2d", "QuantLayerNorm", "QuantLinear", "QuantModule", "QuantWindowAttention"]
