"""Run exported models in ONNX Runtime: inference, evaluation, graph analysis and profiling."""
from __future__ import annotations

import json
import os
import tempfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import VitqError
from ..eval.metrics import compare, predict, topk_accuracy
from ._deps import require

METADATA_KEY = "vitq"
# ONNX Runtime ops that compute a matrix product or convolution with integer arithmetic
INTEGER_OPS = frozenset({
    "MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger", "DynamicQuantizeMatMul", "QGemm",
    "QLinearConv", "ConvInteger", "QAttention",
})
# integer weights, float activations: what ONNX Runtime makes of DQ(weight) → MatMul on a float input
WEIGHT_ONLY_OPS = frozenset({"MatMulNBits"})
GEMM_OPS = INTEGER_OPS | WEIGHT_ONLY_OPS | {"MatMul", "Gemm", "Conv", "FusedMatMul", "FusedConv", "FusedGemm"}


def op_precision(op: str) -> str:
    """``integer``, ``weights-only`` or ``float`` for an ONNX Runtime op type."""
    if op in INTEGER_OPS:
        return "integer"
    return "weights-only" if op in WEIGHT_ONLY_OPS else "float"
Pathish = Union[str, Path]


def _check_file(path: Pathish) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise VitqError(f"ONNX file {path} does not exist")
    if not path.is_file():
        raise VitqError(f"{path} is a folder, not an ONNX file")
    return path


def read_metadata(path: Pathish) -> Dict[str, Any]:
    """The ``vitq`` record of an exported file (empty for an ONNX file vitq did not write)."""
    onnx = require("onnx")
    path = _check_file(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as err:
        raise VitqError(f"{path} is not an ONNX model ({type(err).__name__}: {str(err).splitlines()[0][:160]})") \
            from None
    if not proto.graph.node:
        raise VitqError(f"{path} is not an ONNX model (it has no graph)")
    for prop in proto.metadata_props:
        if prop.key == METADATA_KEY:
            try:
                return json.loads(prop.value)
            except json.JSONDecodeError:
                raise VitqError(f"{path} has a corrupt vitq metadata record") from None
    return {}


def session_options(threads: Optional[int] = None, level: str = "all", profile_prefix: Optional[str] = None):
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    options.graph_optimization_level = levels[level]
    options.log_severity_level = 3  # errors only: the optimizer's notes are not for users
    # Weights-only products (integer weights, float inputs) are fused into MatMulNBits, which by default
    # rounds its float input to int8 blocks (accuracy level 4): values the simulated model never sees.
    # Level 1 keeps the input float32, as vitq's plan says.
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return options


class ExportedModel:
    """What every exported model has, whatever runs it: the preprocessing and classes recorded at
    export (``meta``), a call on a float tensor that returns logits, and :meth:`predict` over batches.
    Subclasses load the file and define :meth:`run` (``numpy`` images in, ``numpy`` outputs out)."""

    runtime = ""
    #: the command that writes this kind of file, for the message when metadata is missing
    export_command = "vitq export"
    path: Path
    meta: Dict[str, Any]

    @property
    def data_config(self) -> Dict[str, Any]:
        cfg = self.meta.get("data_config")
        if not cfg:
            raise VitqError(f"{self.path} has no vitq metadata (preprocessing, classes): export it with "
                            f"`{self.export_command}`")
        return {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}

    @property
    def num_classes(self) -> int:
        return int(self.meta.get("num_classes") or 0)

    def run(self, images: np.ndarray) -> np.ndarray:  # pragma: no cover - every runtime defines it
        raise NotImplementedError

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.run(images.detach().cpu().float().numpy()))

    def predict(self, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]], progress: bool = True
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Logits and labels over ``(images, labels)`` batches."""
        logits, labels = [], []
        desc = self.runtime.lower().replace(" ", "")
        for images, target in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
            logits.append(self(images))
            labels.append(torch.as_tensor(target).cpu())
        if not labels:
            raise VitqError("evaluation got no images")
        return torch.cat(logits), torch.cat(labels)


class OnnxModel(ExportedModel):
    """An exported model in ONNX Runtime (CPU), with the preprocessing recorded at export.

    Calling it on a float tensor ``[B, 3, H, W]`` returns the logits as a float tensor, like the
    PyTorch model.

    Args:
        path: a ``.onnx`` file written by :func:`vitq.export.export_onnx`.
        threads: ONNX Runtime intra-op threads (default: its own choice, all cores).
        profile_prefix: write an ONNX Runtime profile (see :func:`profile_ops`).

    Example:
        >>> import tempfile, timm, torch
        >>> from vitq.export import OnnxModel, export_onnx
        >>> path = tempfile.mkdtemp() + "/float.onnx"
        >>> _ = export_onnx(timm.create_model("test_vit", img_size=32, patch_size=8), path, verify=False)
        >>> OnnxModel(path)(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 1000])
    """

    def __init__(self, path: Pathish, *, threads: Optional[int] = None, level: str = "all",
                 profile_prefix: Optional[str] = None) -> None:
        ort = require("onnxruntime")
        self.path = _check_file(path)
        self.meta = read_metadata(self.path)
        try:
            self.session = ort.InferenceSession(str(self.path), session_options(threads, level, profile_prefix),
                                                providers=["CPUExecutionProvider"])
        except Exception as err:
            raise VitqError(f"ONNX Runtime cannot load {self.path}: {str(err).splitlines()[0][:300]}") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise VitqError(f"{self.path} has {len(inputs)} inputs; vitq runs image classifiers with one input")
        self.input_name = inputs[0].name

    runtime = "ONNX Runtime"

    def run(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(images, dtype=np.float32)})[0]


def evaluate_onnx(
    model: Union[OnnxModel, Any, Pathish],
    data: Iterable[Tuple[torch.Tensor, torch.Tensor]],
    *,
    reference: Optional[nn.Module] = None,
    progress: bool = True,
) -> Dict[str, Any]:
    """Top-1/5 of an exported model on ``(images, labels)`` batches.

    ``model``: an :class:`OnnxModel`, a :class:`vitq.export.openvino.OpenVinoModel` (keys
    ``openvino_top1``/``openvino_top5`` instead of ``onnx_*``) or the path of an ``.onnx`` file.
    With ``reference`` (the simulated PyTorch model, or the float one) the same images go through
    it too, and the result adds its accuracy, the top-1 agreement and KL(reference ‖ exported).
    """
    model = model if hasattr(model, "predict") else OnnxModel(model)
    key = "openvino" if getattr(model, "runtime", "") == "OpenVINO" else "onnx"
    batches = list(data) if reference is not None else data
    logits, labels = model.predict(batches, progress)
    metrics: Dict[str, Any] = {
        f"{key}_top1": round(topk_accuracy(logits, labels, 1), 4),
        f"{key}_top5": round(topk_accuracy(logits, labels, 5), 4),
        "runtime": "openvino" if key == "openvino" else "onnxruntime",
        "num_eval": int(labels.numel()),
    }
    if reference is not None:
        (ref_logits,), _ = predict(reference, batches, "cpu", progress, desc="pytorch")
        cmp = compare(ref_logits, logits, labels)
        metrics.update(
            reference_top1=cmp["fp_top1"], reference_top5=cmp["fp_top5"],
            top1_diff=round(cmp["quant_top1"] - cmp["fp_top1"], 4),
            agreement=cmp["agreement"], kl=cmp["kl"],
            max_abs_diff=float((logits - ref_logits).abs().max()),
        )
    return metrics


class _AsModule(nn.Module):
    """An exported model (ONNX Runtime or OpenVINO, on CPU) called like a module."""

    def __init__(self, runtime: Any) -> None:
        super().__init__()
        self.runtime = runtime

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.runtime(x.cpu())


def evaluate_onnx_segmentation(
    model: Union[Pathish, "OnnxModel"],
    data: Iterable,
    *,
    reference: Optional[nn.Module] = None,
    num_classes: Optional[int] = None,
    ignore_index: Optional[int] = None,
    classes: Optional[Sequence[str]] = None,
    progress: bool = True,
) -> Dict[str, Any]:
    """mIoU (dataset-level, void ignored), pixel accuracy and per-class IoU of an exported
    segmentation model in its runtime, on ``(images, label maps)`` batches.

    With ``reference`` (the simulated PyTorch model) the same images go through it too, and the
    result adds its mIoU, the difference, the pixel agreement and the per-pixel KL(reference ‖ exported).
    Keys are ``onnx_*`` for ONNX Runtime and ``openvino_*`` for OpenVINO.
    """
    from ..eval.segmentation import compare_segmentation, iou_per_class, mean_iou, pixel_accuracy

    model = model if hasattr(model, "predict") else OnnxModel(model)
    key = "openvino" if getattr(model, "runtime", "") == "OpenVINO" else "onnx"
    num_classes = int(num_classes or model.num_classes or 0)
    if num_classes <= 0:
        raise VitqError("pass num_classes: the exported model does not record how many classes it segments")
    models = [reference, _AsModule(model)] if reference is not None else [_AsModule(model)]
    out = compare_segmentation(models, data, num_classes, ignore_index, "cpu", progress)
    mine = out["confusion"][-1]
    names = list(classes) if classes and len(classes) == num_classes else [str(i) for i in range(num_classes)]
    metrics: Dict[str, Any] = {
        f"{key}_miou": round(mean_iou(mine), 4),
        f"{key}_pixel_acc": round(pixel_accuracy(mine), 4),
        "per_class_iou": {n: (None if v is None else round(v, 4)) for n, v in zip(names, iou_per_class(mine))},
        "runtime": "openvino" if key == "openvino" else "onnxruntime",
        "num_eval": int(out["num_images"]),
    }
    if reference is not None:
        ref = mean_iou(out["confusion"][0])
        metrics.update(reference_miou=round(ref, 4), miou_diff=round(metrics[f"{key}_miou"] - ref, 4),
                       pixel_agreement=round(out["agreement"][1], 4), kl=float(f"{out['kl'][1]:.6g}"))
    return metrics


def analyse_graph(path: Pathish) -> Dict[str, Any]:
    """ONNX Runtime's graph after its (hardware-independent) optimizations: op counts, and every
    matrix product or convolution with whether it runs in an integer kernel."""
    onnx = require("onnx")
    ort = require("onnxruntime")
    path = _check_file(path)
    with tempfile.TemporaryDirectory() as tmp:
        options = session_options(1, "extended")
        options.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        try:
            ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:
            raise VitqError(f"ONNX Runtime cannot load {path}: {str(err).splitlines()[0][:300]}") from None
        graph = onnx.load(options.optimized_model_filepath).graph
    gemms = [{"name": n.name, "op": n.op_type, "precision": op_precision(n.op_type)}
             for n in graph.node if n.op_type in GEMM_OPS]
    return {"op_counts": dict(Counter(n.op_type for n in graph.node)), "gemms": gemms}


def profile_ops(path: Pathish, images: np.ndarray, *, runs: int = 3, threads: Optional[int] = None
                ) -> Dict[str, Any]:
    """Where ONNX Runtime spends its time: kernel milliseconds per op type (mean over ``runs``),
    from its profiler, with each op type marked integer or float."""
    with tempfile.TemporaryDirectory() as tmp:
        model = OnnxModel(path, threads=threads, profile_prefix=os.path.join(tmp, "profile"))
        model.run(images)  # warm-up, excluded below
        model.session.end_profiling()
        model = OnnxModel(path, threads=threads, profile_prefix=os.path.join(tmp, "profile_runs"))
        for _ in range(runs):
            model.run(images)
        events = json.loads(Path(model.session.end_profiling()).read_text())
    per_op: Dict[str, float] = defaultdict(float)
    count: Dict[str, int] = defaultdict(int)
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            op = event.get("args", {}).get("op_name", "?")
            per_op[op] += event["dur"] / 1000.0 / runs
            count[op] += 1
    total = sum(per_op.values()) or 1.0
    rows = [
        {"op": op, "ms": round(ms, 3), "percent": round(100 * ms / total, 1), "nodes": count[op] // runs,
         "precision": "quantize" if op.endswith("QuantizeLinear") else op_precision(op)}
        for op, ms in sorted(per_op.items(), key=lambda kv: -kv[1])
    ]
    return {"batch": int(images.shape[0]), "runs": runs, "total_ms": round(total, 3), "ops": rows}
