"""Evaluation (DESIGN layer 9)."""
from .metrics import ModelSize, compare, count_quant_points, model_size, predict, topk_accuracy

__all__ = ["ModelSize", "compare", "count_quant_points", "model_size", "predict", "topk_accuracy"]
