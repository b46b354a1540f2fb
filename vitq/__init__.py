"""vitq: post-training quantization of vision transformers.

Example:
    >>> import timm, torch, vitq
    >>> model = timm.create_model("test_vit")
    >>> result = vitq.quantize(model, "minmax", [torch.randn(2, 3, 160, 160)], w_bits=4, progress=False)
    >>> sorted(result.plan.meta)[:2]
    ['a_bits', 'input_bits']
"""
__version__ = "0.1.0"

from . import export  # vitq.export.export_onnx, OnnxModel, evaluate_onnx, bench_speed (needs vitq[deploy])
from .api import (QuantizedModel, Synthesized, data_free_refresher, evaluate, evaluate_detection, evaluate_segmentation,
                  quantize, resolve_device, synthesize)
from .errors import VitqError
from .methods import Plan, apply_plan, calibrate, convert, prepare
from .models import load_model
from .recipes import Recipe, load_recipe

__all__ = [
    "Plan",
    "QuantizedModel",
    "Recipe",
    "Synthesized",
    "VitqError",
    "apply_plan",
    "calibrate",
    "convert",
    "data_free_refresher",
    "evaluate",
    "evaluate_detection",
    "evaluate_segmentation",
    "export",
    "load_model",
    "load_recipe",
    "prepare",
    "quantize",
    "resolve_device",
    "synthesize",
]
