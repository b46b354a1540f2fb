"""OpenVINO as a runtime for vitq's models: the QDQ ONNX export converted to OpenVINO IR.

OpenVINO reads each QuantizeLinear/DequantizeLinear pair of vitq's export as a FakeQuantize and
its low-precision transformations run the matrix products whose inputs are quantized in integer
kernels (``runtimePrecision`` u8/i8 in the compiled model). The integer grid is the ONNX file's,
so the same format rule holds (:mod:`vitq.export.formats`): on a CPU without VNNI, 8-bit weights
with 8-bit activations in U8S8 can saturate oneDNN's int16 pair sums as they do ONNX Runtime's.

Needs the optional ``openvino`` package: ``pip install 'vitq[openvino]'``.
"""
from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
import torch
from torch import nn

from ..errors import VitqError
from ..quant import protocol as roles
from ._lowering import QDQ
from .runtime import ExportedModel, read_metadata

Pathish = Union[str, Path]
RT_KEY = "vitq_meta"
INSTALL_HINT = "pip install 'vitq[openvino]'"
GEMM_LAYERS = ("FullyConnected", "MatMul", "Convolution", "Gemm")
INTEGER_PRECISIONS = ("u8", "i8")


def _openvino():
    try:
        import openvino
    except ImportError as err:
        raise VitqError(f"the OpenVINO runtime needs the 'openvino' package, which is not installed ({err}); "
                        f"install it with: {INSTALL_HINT}") from None
    return openvino


def is_openvino(path: Pathish) -> bool:
    """Whether ``path`` names an OpenVINO IR model (``.xml``)."""
    return Path(path).suffix.lower() == ".xml"


def onnx_to_openvino(onnx_path: Pathish, xml_path: Pathish) -> Path:
    """Convert an ONNX file (vitq's export) to OpenVINO IR (``.xml`` + ``.bin``), keeping vitq's record.

    Weights keep their stored types (no FP16 compression): the integer weights stay integer.
    """
    ov = _openvino()
    onnx_path, xml_path = Path(onnx_path), Path(xml_path).expanduser()
    if xml_path.suffix.lower() != ".xml":
        raise VitqError(f"an OpenVINO model is written as an .xml file (with its .bin beside it), got {xml_path}")
    meta = read_metadata(onnx_path)
    try:
        model = ov.convert_model(str(onnx_path))
    except Exception as err:
        raise VitqError(f"OpenVINO cannot convert {onnx_path}: {str(err).splitlines()[0][:300]}") from None
    if meta:
        model.set_rt_info(json.dumps(meta), [RT_KEY])
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(xml_path), compress_to_fp16=False)
    return xml_path


def _compute_precision(info) -> str:
    """The precision a compiled node computes in, read from its ``primitiveType`` (``undef_I8``,
    ``brgemm_avx512_amx_bf16``): a float suffix means float arithmetic, an i8/u8/s8 part integer
    arithmetic; a kernel name that says neither falls back to ``runtimePrecision``."""
    stored = info["runtimePrecision"].astype(str).lower() if "runtimePrecision" in info else "?"
    if "primitiveType" not in info:
        return stored
    kernel = info["primitiveType"].astype(str).lower()
    suffix = kernel.rsplit("_", 1)[-1]
    if suffix in ("f32", "fp32", "bf16", "f16", "fp16"):
        return suffix
    if any(part in INTEGER_PRECISIONS or part in ("s8", "int8") for part in kernel.split("_")):
        return "u8" if "u8" in kernel.split("_") else "i8"
    return stored


def gemm_precisions(compiled) -> Dict[str, Any]:
    """The matrix products of a compiled OpenVINO model with the precision each computes in.

    Returns ``{"integer": n, "weight_only": k, "float": m, "by_layer": {layer type: {precision:
    count}}, "attention": {"integer": a, "float": b}}``, read from the runtime model. A product
    counts as integer when its kernel computes in i8/u8 (``primitiveType``); ``weight_only`` counts
    those whose weights are stored as integers (``runtimePrecision`` i8/u8) but which compute in
    float: OpenVINO treats weights with zero points (asymmetric grids) as weight compression and
    decompresses them, so such a product gains memory, not integer arithmetic. ``attention``
    counts the attention blocks (q·kᵀ, softmax, attn·v) that OpenVINO fused into one kernel, by the
    precision of their products: integer only where the operands' quantizers allow it (signed
    symmetric q, k and v; an operand with a zero point keeps the fused block in float).
    """
    by_layer: Dict[str, Counter] = {}
    attention: Counter = Counter()
    weight_only = 0
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layer = info["layerType"].astype(str) if "layerType" in info else op.get_type_name()
        if layer == "Subgraph" and "Softmax" in (info["originalLayersNames"].astype(str)
                                                 if "originalLayersNames" in info else ""):
            attention["integer" if _compute_precision(info) in INTEGER_PRECISIONS else "float"] += 1
        if layer not in GEMM_LAYERS:
            continue
        precision = _compute_precision(info)
        stored = info["runtimePrecision"].astype(str).lower() if "runtimePrecision" in info else "?"
        if precision not in INTEGER_PRECISIONS and stored in INTEGER_PRECISIONS:
            weight_only += 1
            precision = f"{precision} (weights {stored})"
        by_layer.setdefault(layer, Counter())[precision] += 1
    integer = sum(n for c in by_layer.values() for p, n in c.items() if p in INTEGER_PRECISIONS)
    total = sum(sum(c.values()) for c in by_layer.values())
    return {"integer": integer, "weight_only": weight_only, "float": total - integer,
            "by_layer": {k: dict(v) for k, v in by_layer.items()},
            "attention": {"integer": attention["integer"], "float": attention["float"]}}


PRECISIONS = ("f32", "bf16", "f16")


def inference_precision(compiled) -> str:
    """``f32``, ``bf16`` or ``f16``: the precision a compiled OpenVINO model runs its float parts in."""
    try:
        value = compiled.get_property("INFERENCE_PRECISION_HINT")
    except Exception:  # a device without the property
        return "f32"
    name = value.get_type_name() if hasattr(value, "get_type_name") else str(value)
    return {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}.get(name, name)


class OpenVinoModel(ExportedModel):
    """An exported model in OpenVINO (CPU), with the preprocessing recorded at export.

    The same interface as :class:`vitq.export.OnnxModel`: calling it on a float tensor
    ``[B, 3, H, W]`` returns the logits as a float tensor.

    Args:
        path: an ``.xml`` file written by :func:`export_openvino` (or ``vitq export --format openvino``),
            or an ``.onnx`` file, which OpenVINO reads directly.
        threads: inference threads (default: OpenVINO's own choice, all cores).
        device: the OpenVINO device (``CPU``; ``GPU`` for an Intel GPU).
        precision: the precision of the parts that stay float (LayerNorm, softmax, GELU, and every
            matrix product of a float model): ``f32``, ``bf16`` or ``f16``; ``None`` (default) leaves
            OpenVINO's own choice, which is **bf16 on a CPU with native bf16** (AVX512-BF16, AMX) and
            f32 elsewhere. :attr:`inference_precision` says which one the compiled model runs.
    """

    runtime = "OpenVINO"
    export_command = "vitq export --format openvino"

    def __init__(self, path: Pathish, *, threads: Optional[int] = None, device: str = "CPU",
                 precision: Optional[str] = None) -> None:
        ov = _openvino()
        if precision is not None and precision not in PRECISIONS:
            raise VitqError(f"OpenVINO precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise VitqError(f"OpenVINO model {self.path} does not exist" if not self.path.exists()
                            else f"{self.path} is a folder, not an OpenVINO .xml file")
        core = ov.Core()
        try:
            model = core.read_model(str(self.path))
        except Exception as err:
            raise VitqError(f"OpenVINO cannot read {self.path}: {str(err).splitlines()[0][:300]}") from None
        self.meta = self._meta(model)
        if len(model.inputs) != 1:
            raise VitqError(f"{self.path} has {len(model.inputs)} inputs; vitq runs image models with one input")
        config: Dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        if precision:
            config["INFERENCE_PRECISION_HINT"] = precision
        try:
            self.compiled = core.compile_model(model, device, config)
        except Exception as err:
            raise VitqError(f"OpenVINO cannot compile {self.path} for {device}: "
                            f"{str(err).splitlines()[0][:300]}") from None
        self.request = self.compiled.create_infer_request()
        self.inference_precision = inference_precision(self.compiled)

    def _meta(self, model) -> Dict[str, Any]:
        if self.path.suffix.lower() == ".onnx":
            return read_metadata(self.path)
        if not model.has_rt_info([RT_KEY]):
            return {}
        try:
            return json.loads(model.get_rt_info([RT_KEY]).astype(str))
        except json.JSONDecodeError:
            raise VitqError(f"{self.path} has a corrupt vitq metadata record") from None

    def gemms(self) -> Dict[str, Any]:
        """See :func:`gemm_precisions`."""
        return gemm_precisions(self.compiled)

    def run(self, images: np.ndarray) -> np.ndarray:
        result = self.request.infer({0: np.ascontiguousarray(images, dtype=np.float32)})
        return np.array(result[self.compiled.output(0)])


def export_openvino(
    model: nn.Module,
    path: Pathish,
    *,
    int_format: Optional[str] = "auto",
    data_config: Optional[Dict[str, Any]] = None,
    meta: Optional[Dict[str, Any]] = None,
    sample: Optional[torch.Tensor] = None,
    verify: bool = True,
):
    """Write ``model`` as an OpenVINO IR model (``.xml`` + ``.bin``) through vitq's QDQ ONNX export.

    Arguments as :func:`vitq.export.export_onnx`. The returned :class:`~vitq.export.ExportReport`
    describes the ONNX graph the IR was converted from; with ``verify`` its ``verification`` is
    OpenVINO's output against the PyTorch model on the same images, and ``openvino`` (a dict in
    ``report.extra``) counts the matrix products OpenVINO compiled into integer kernels.

    Example (needs openvino; tests/export/test_openvino.py runs it)::

        q = vitq.quantize(timm.create_model("test_vit", img_size=32, patch_size=8),
                          "minmax", [torch.randn(2, 3, 32, 32)], progress=False).model
        report = export_openvino(q, "m.xml", int_format="u8u8")
        report.extra["openvino"]["integer"]   # 27 of 28 matrix products in integer kernels
    """
    from .onnx_export import _verify_against, export_onnx

    path = Path(path).expanduser()
    if path.suffix.lower() != ".xml":
        raise VitqError(f"an OpenVINO model is written as an .xml file (with its .bin beside it), got {path}")
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        report = export_onnx(model, onnx_path, int_format=int_format, data_config=data_config, meta=meta,
                             sample=sample, verify=False, fold_weight_zero_points=True)
        onnx_to_openvino(onnx_path, path)
    report.path = path
    report.runtime = "openvino"
    runtime = OpenVinoModel(path)
    report.extra["openvino"] = {**runtime.gemms(), "precision": runtime.inference_precision}
    report.extra["openvino"]["folded_weights"] = sum("zero points folded" in p.note for p in report.points)
    weight_only = report.extra["openvino"]["weight_only"]
    if weight_only:
        report.warnings.append(
            f"OpenVINO runs {weight_only} matrix products whose weights have zero points (asymmetric grids) as "
            f"weight-only compression: the weights are stored as integers but decompressed and multiplied in "
            f"{runtime.inference_precision} (their 8-bit codes span too wide a range to fold the zero points exactly). "
            f"For integer kernels quantize with symmetric weights (a recipe with `weights: {{symmetric: true}}`) or "
            f"7-bit weights; ONNX Runtime runs these products in integer kernels either way")
    attention = report.extra["openvino"]["attention"]
    asymmetric = [p.name for p in report.points
                  if p.role == roles.ATTN_QKV and p.form == QDQ and not p.spec.symmetric]
    if attention["float"] and asymmetric:
        report.warnings.append(
            f"OpenVINO runs {attention['float']} of {attention['integer'] + attention['float']} attention blocks "
            f"(q·kᵀ, softmax, attn·v) in {runtime.inference_precision}: {len(asymmetric)} of their q, k and v "
            f"quantizers have zero points (asymmetric grids, e.g. {asymmetric[0]}), and OpenVINO's integer "
            f"attention needs signed symmetric operands. Quantize with `activations: {{symmetric_roles: [attn_qkv]}}` "
            f"in the recipe (`recommended-int` has it) for integer attention")
    report.sizes["openvino_bytes"] = path.stat().st_size + path.with_suffix(".bin").stat().st_size
    if verify:
        report.verification = _verify_against(model, runtime, sample, report.input_size)
    return report
