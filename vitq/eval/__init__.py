"""Evaluation (DESIGN layer 9)."""
from .bits import LayerBits, bit_stats, layer_bits
from .metrics import ModelSize, compare, count_quant_points, model_size, predict, topk_accuracy

__all__ = ["LayerBits", "ModelSize", "bit_stats", "compare", "count_quant_points", "layer_bits", "model_size", "predict",
           "topk_accuracy"]
