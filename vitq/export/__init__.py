"""Deployment (DESIGN layer 9): ONNX QDQ export, ONNX Runtime evaluation and speed.

Needs the optional dependencies ``onnx`` and ``onnxruntime``: ``pip install 'vitq[deploy]'``.
The functions import them on first use and raise a :class:`vitq.VitqError` naming the extra
when they are missing.
"""
from .formats import FORMATS, CpuInfo, IntFormat, choose_format, cpu_info
from .onnx_export import ExportReport, export_onnx
from .runtime import ExportedModel, OnnxModel, analyse_graph, evaluate_onnx, evaluate_onnx_segmentation, profile_ops, read_metadata
from .speed import bench_speed

__all__ = [
    "FORMATS",
    "CpuInfo",
    "ExportReport",
    "IntFormat",
    "ExportedModel",
    "OnnxModel",
    "analyse_graph",
    "bench_speed",
    "choose_format",
    "cpu_info",
    "evaluate_onnx",
    "evaluate_onnx_segmentation",
    "export_onnx",
    "profile_ops",
    "read_metadata",
]
