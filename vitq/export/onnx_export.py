"""Export a quantized model to ONNX with QuantizeLinear/DequantizeLinear pairs, and say what runs how.

The graph holds weights as 8-bit integer initializers (per output channel) feeding
``DequantizeLinear``, and every uniformly quantized activation as a ``QuantizeLinear`` →
``DequantizeLinear`` pair (per tensor). ONNX Runtime's CPU provider fuses these into integer
kernels (``MatMulIntegerToFloat``, ``QLinearMatMul``); which ones it fused is read back from
the optimized graph and written in the export report, next to the ``.onnx`` file.
"""
from __future__ import annotations

import copy
import io
import json
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .. import __version__
from ..errors import VitqError
from ..eval.metrics import model_size
from ..models.adapters import iter_quantizers
from ..models.loading import data_config_of
from ..quant import protocol as roles
from ._deps import require
from ._lowering import EMULATED, INT_WEIGHT, OFF, QDQ, PointExport, _ExportAttend, lower
from .formats import CpuInfo, IntFormat, choose_format, cpu_info
from .runtime import OnnxModel, analyse_graph

ONNX_FORMAT = "vitq-onnx/1"
REPORT_FORMAT = "vitq-export-report/1"
METADATA_KEY = "vitq"
DEFAULT_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "images", "logits"


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote and how each part of the model runs.

    Attributes:
        path: the ``.onnx`` file.
        int_format: the integer format (None for a float export).
        cpu: the CPU the format was chosen for.
        points: how every quant point of the plan is exported.
        layers: every GEMM/convolution of the graph as ONNX Runtime runs it after its graph
            optimizations: ``{"name", "node", "op", "precision"}``.
        sizes: bytes of the file and of the weights (float, 8-bit containers, packed at their bits).
        verification: ONNX Runtime against the PyTorch model on the same inputs.
        warnings: what does not run in integers although the plan quantizes it, and why.
    """

    path: Path
    int_format: Optional[IntFormat]
    cpu: CpuInfo
    meta: Dict[str, Any]
    points: List[PointExport] = field(default_factory=list)
    layers: List[Dict[str, str]] = field(default_factory=list)
    op_counts: Dict[str, int] = field(default_factory=dict)
    sizes: Dict[str, Any] = field(default_factory=dict)
    verification: Dict[str, Any] = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)
    seconds: float = 0.0
    runtime: str = "onnxruntime"
    input_size: Tuple[int, ...] = ()
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def integer_layers(self) -> List[Dict[str, str]]:
        """The GEMMs that run in integer arithmetic (both operands integer)."""
        return [layer for layer in self.layers if layer["precision"] not in ("float", "weights-only")]

    def to_dict(self) -> Dict[str, Any]:
        fmt = self.int_format
        return {
            "format": REPORT_FORMAT,
            "onnx": str(self.path),
            "runtime": self.runtime,
            "vitq": __version__,
            "int_format": None if fmt is None else {
                "name": fmt.name, "reason": fmt.reason,
                "activations": "int8" if fmt.signed_activations else "uint8",
                "weights": "int8" if fmt.signed_weights else "uint8",
                "may_saturate": fmt.may_saturate(self.cpu, *self._max_bits()),
            },
            "cpu": {"isa": self.cpu.isa, "vnni": self.cpu.vnni},
            "plan": {k: self.meta.get(k) for k in ("recipe", "protocol", "w_bits", "a_bits")},
            "summary": self.summary(),
            "layers": self.layers,
            "op_counts": self.op_counts,
            "points": [p.to_dict() for p in self.points],
            "sizes": self.sizes,
            "verification": self.verification,
            "warnings": self.warnings,
            "seconds": round(self.seconds, 2),
            **self.extra,
        }

    def _max_bits(self) -> Tuple[int, int]:
        """The widest integer weight, and the widest integer activation feeding a weight GEMM."""
        weights = [p.spec.bits for p in self.points if p.form == INT_WEIGHT]
        acts = [p.spec.bits for p in self.points if p.form == QDQ and p.role == roles.ACT]
        return max(weights, default=0), max(acts, default=0)

    def summary(self) -> Dict[str, int]:
        forms = Counter(p.form for p in self.points)
        return {
            "integer_gemms": len(self.integer_layers),
            "float_gemms": sum(1 for layer in self.layers if layer["precision"] == "float"),
            "weight_only_gemms": sum(1 for layer in self.layers if layer["precision"] == "weights-only"),
            "int_weights": forms.get(INT_WEIGHT, 0),
            "qdq_activations": forms.get(QDQ, 0),
            "float_emulated_points": forms.get(EMULATED, 0),
            "disabled_points": forms.get(OFF, 0),
        }

    def to_markdown(self) -> str:
        d = self.to_dict()
        fmt = d["int_format"]
        s = self.sizes
        lines = [f"# Export report: `{self.path.name}`", ""]
        if fmt is None:
            lines += ["Float model (no quantizers): every operation runs in float32.", ""]
        else:
            plan = d["plan"]
            lines += [
                f"Plan: recipe {plan['recipe']}, protocol {plan['protocol']}, W{plan['w_bits']}A{plan['a_bits']}.  ",
                f"Integer format: **{fmt['name'].upper()}** (activations {fmt['activations']}, weights "
                f"{fmt['weights']}). {fmt['reason']}.",
            ]
            if fmt["may_saturate"]:
                lines.append("**Warning**: on this CPU the U8S8/S8S8 kernels can saturate int16 sums with 8-bit "
                             "weights; results may differ from the simulated model (see verification).")
            lines.append("")
        summ = d["summary"]
        lines += [
            "## What runs in integers",
            "",
            f"{summ['integer_gemms']} of {len(self.layers)} matrix products run in integer kernels of ONNX Runtime "
            f"(read back from its optimized graph); {summ['float_gemms']} run in float32, "
            f"{summ['weight_only_gemms']} with integer weights on float inputs. Everything else "
            "(LayerNorm, softmax, GELU, residual additions, bias additions) runs in float32.",
            "",
            "| layer | ONNX Runtime op | precision |",
            "|---|---|---|",
        ]
        lines += [f"| `{lay['name']}` | {lay['op']} | {lay['precision']} |" for lay in self.layers]
        lines += ["", "## Quant points of the plan", "",
                  f"{summ['int_weights']} weights as integer initializers (per output channel), "
                  f"{summ['qdq_activations']} activations as QuantizeLinear/DequantizeLinear pairs (per tensor), "
                  f"{summ['float_emulated_points']} emulated with float operations, {summ['disabled_points']} "
                  "disabled in the plan.", ""]
        notes = [p for p in self.points if p.note]
        if notes:
            lines += ["| quant point | bits | exported as | note |", "|---|---|---|---|"]
            lines += [f"| `{p.name}` | {p.spec.bits} | {p.form} | {p.note} |" for p in notes]
            lines.append("")
        if s:
            lines += ["## Size", "", "| | bytes | × float |", "|---|---:|---:|"]
            fp = s["fp32_weight_bytes"]
            for key, label in (("fp32_weight_bytes", "float32 weights"), ("onnx_bytes", "this .onnx file"),
                               ("container_weight_bytes", "weights in 8-bit containers + float rest"),
                               ("packed_weight_bytes", f"weights packed at their bits ({s.get('weight_bits')})")):
                if s.get(key) is not None:
                    lines.append(f"| {label} | {s[key]:,} | {s[key] / fp:.3f} |")
            lines.append("")
        ov = self.extra.get("openvino")
        if ov:
            kinds = "; ".join(f"{layer}: " + ", ".join(f"{n} {p}" for p, n in sorted(c.items()))
                              for layer, c in sorted(ov["by_layer"].items()))
            lines += ["## OpenVINO", "",
                      f"This OpenVINO model was converted from the ONNX graph above. OpenVINO compiled "
                      f"{ov['integer']} of {ov['integer'] + ov['float']} matrix products into integer (u8/i8) "
                      f"kernels ({kinds})."
                      + (f" {ov['weight_only']} of the others store integer weights but compute in float "
                         "(weight-only compression of weights with zero points)." if ov.get("weight_only") else "")
                      + (f" Attention blocks (q·kᵀ, softmax and attn·v fused into one kernel) in integer: "
                         f"{ov['attention']['integer']} of {ov['attention']['integer'] + ov['attention']['float']}."
                         if sum(ov.get("attention", {}).values()) else ""),
                      ""]
        v = self.verification
        runtime = "OpenVINO" if self.runtime == "openvino" else "ONNX Runtime"
        if v:
            lines += ["## Verification", "",
                      f"{runtime} against the PyTorch model on {v['num_images']} {v['inputs']}: max |Δ logit| "
                      f"{v['max_abs_diff']:.3g} (largest |logit| {v['max_abs_logit']:.3g}), top-1 agreement "
                      f"{v['agreement']:.2f} %.", ""]
            if "float64_max_abs_diff" in v:
                lines[-1:-1] = [verdict_line(v)]
        if self.warnings:
            lines += ["## Warnings", ""] + [f"- {w}" for w in self.warnings] + [""]
        return "\n".join(lines)

    def save(self) -> Dict[str, Path]:
        """Write ``<stem>.export.json`` and ``<stem>.export.md`` beside the ``.onnx`` file."""
        stem = self.path.with_suffix("")
        out = {"json": Path(f"{stem}.export.json"), "markdown": Path(f"{stem}.export.md")}
        out["json"].write_text(json.dumps(self.to_dict(), indent=1, default=str) + "\n")
        out["markdown"].write_text(self.to_markdown())
        return out


def _dotted(node_name: str) -> str:
    """``/blocks/blocks.0/attn/qkv/MatMul`` → ``blocks.0.attn.qkv.MatMul`` (torch's scope names)."""
    out: List[str] = []
    prev = None
    for part in (p for p in node_name.split("/") if p):
        if prev is not None and part.startswith(prev + "."):  # "blocks", "blocks.0": child 0 of blocks
            out[-1] += part[len(prev):]
        else:
            out.append(part)
        prev = part
    return ".".join(out) or node_name


ATTENTION_PRODUCTS = ("(q·kᵀ)", "(attn·v)")


def _precision(kind: str, fmt: Optional[IntFormat], activations_only: bool) -> str:
    """``u8s8``-style operand types of an integer GEMM (both activations in attention products)."""
    if kind != "integer" or fmt is None:
        return kind
    if activations_only:
        return "s8s8" if fmt.signed_activations else "u8u8"
    return fmt.name


def _layer_names(model: nn.Module, nodes: List[Dict[str, Any]]) -> List[str]:
    """A readable name per GEMM node: its module, and for attention which of the two products."""
    modules = dict(model.named_modules())
    seen: Counter = Counter()
    names = []
    for node in nodes:
        dotted = _dotted(node["name"])
        owner = max((m for m in modules if m and (dotted == m or dotted.startswith(m + "."))), key=len, default="")
        if owner and isinstance(modules[owner], _ExportAttend):
            names.append(f"{owner} {ATTENTION_PRODUCTS[min(seen[owner], 1)]}")
            seen[owner] += 1
        else:
            names.append(owner or dotted)
    return names


def _is_quantized(model: nn.Module) -> bool:
    return any(True for _ in iter_quantizers(model))


def export_onnx(
    model: nn.Module,
    path: Union[str, Path],
    *,
    int_format: Optional[str] = "auto",
    data_config: Optional[Dict[str, Any]] = None,
    meta: Optional[Dict[str, Any]] = None,
    opset: int = DEFAULT_OPSET,
    sample: Optional[torch.Tensor] = None,
    verify: bool = True,
    cpu: Optional[CpuInfo] = None,
    fold_weight_zero_points: bool = False,
) -> ExportReport:
    """Write ``model`` as an ONNX file: QDQ integer form for a quantized model, float otherwise.

    Args:
        model: a converted quantized model (from :func:`vitq.quantize` or :func:`vitq.apply_plan`),
            or a float model (exported as it is, for comparisons).
        path: the ``.onnx`` file to write.
        int_format: ``auto`` (the fastest exact format for this CPU, see
            :func:`vitq.export.formats.choose_format`), ``u8s8``, ``u8u8`` or ``s8s8``.
        data_config: the model's preprocessing, recorded in the file for ``vitq eval``.
        meta: facts recorded in the file (the plan's ``meta``: model, recipe, protocol, bits, ...).
        opset: ONNX opset (17 or later: LayerNormalization).
        sample: images ``[B, 3, H, W]`` to verify ONNX Runtime against PyTorch (default: 4
            seeded random images).
        verify: run the verification.
        cpu: the CPU to choose the format for (default: this one).
        fold_weight_zero_points: store weights that have zero points (asymmetric grids) as
            ``codes - zero point`` with zero point 0 wherever that is exact and cannot saturate
            (every code within ±127 with VNNI, ±64 without, in a signed container): OpenVINO runs
            only zero-point-free weights in integer kernels (:func:`vitq.export.export_openvino`
            sets it). Weights below 8 bits always fold; 8-bit ones only when their codes allow.

    Returns:
        an :class:`ExportReport`; ``report.save()`` writes it beside the file.

    Example:
        >>> import tempfile, timm, torch, vitq
        >>> from vitq.export import export_onnx
        >>> q = vitq.quantize(timm.create_model("test_vit", img_size=32, patch_size=8),
        ...                   "minmax", [torch.randn(2, 3, 32, 32)], progress=False).model
        >>> report = export_onnx(q, tempfile.mkdtemp() + "/m.onnx", int_format="u8u8")
        >>> report.int_format.name, report.summary()["float_gemms"]
        ('u8u8', 0)
    """
    onnx = require("onnx")
    start = time.perf_counter()
    path = Path(path).expanduser()
    if path.suffix.lower() != ".onnx":
        raise VitqError(f"the output file must end in .onnx, got {path.name!r}")
    if not isinstance(model, nn.Module):
        raise VitqError(f"expected a torch.nn.Module to export, got {type(model).__name__}")
    if opset < 17:
        raise VitqError(f"opset {opset} is too old: vitq exports LayerNormalization, which needs opset 17 or later")
    meta = dict(meta or {})
    data_config = dict(data_config or data_config_of(model))
    quantized = _is_quantized(model)
    cpu = cpu or cpu_info()
    model = model.eval()
    if quantized:
        w_bits, a_bits = _gemm_bits(model)
        fmt: Optional[IntFormat] = choose_format(int_format, w_bits, cpu, max_act_bits=a_bits)
        fold = (127 if cpu.vnni else 64) if fold_weight_zero_points else None
        lowered, points = lower(model, fmt, fold)
    else:
        fmt, points = None, []
        on_cpu = all(p.device.type == "cpu" for p in model.parameters())
        lowered = model if on_cpu else copy.deepcopy(model).cpu()  # traced on CPU, like the quantized one
    input_size = tuple(data_config.get("input_size", (3, 224, 224)))
    example = torch.randn(1, *input_size, generator=torch.Generator().manual_seed(0))

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        try:
            torch.onnx.export(
                lowered, (example,), buffer, dynamo=False, opset_version=opset,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, do_constant_folding=True,
            )
        except Exception as err:  # the exporter raises many types; name the model and the cause
            raise VitqError(f"torch could not export {type(model).__name__} to ONNX: {type(err).__name__}: "
                            f"{str(err).splitlines()[0][:300]}") from None
    proto = onnx.load_from_string(buffer.getvalue())
    fp_bytes = model_size(model).fp_bytes
    record = {
        "format": ONNX_FORMAT,
        "vitq": __version__,
        "quantized": quantized,
        "int_format": None if fmt is None else fmt.name,
        "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()},
        "num_classes": int(getattr(model, "num_classes", 0) or 0),
        "task": getattr(model, "task", "classification"),
        "meta": meta,
    }
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(record, default=str)
    proto.producer_name, proto.producer_version = "vitq", __version__
    onnx.checker.check_model(proto)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))

    report = ExportReport(path, fmt, cpu, meta, points, input_size=input_size)
    analysis = analyse_graph(path)
    report.op_counts = analysis["op_counts"]
    report.layers = [
        {"name": name, "node": n["name"], "op": n["op"],
         "precision": _precision(n["precision"], fmt, activations_only=name.endswith(ATTENTION_PRODUCTS))}
        for name, n in zip(_layer_names(lowered, analysis["gemms"]), analysis["gemms"])
    ]
    report.sizes = _sizes(model, path, proto, fp_bytes, quantized)
    if quantized:
        report.warnings += _warnings(report)
    if verify:
        report.verification = _verify(model, path, sample, input_size)
    report.seconds = time.perf_counter() - start
    return report


def _gemm_bits(model: nn.Module) -> Tuple[int, int]:
    """The widest integer weight and the widest integer activation (linear/conv inputs) of ``model``."""
    weights, acts = [0], [0]
    for _, q in iter_quantizers(model):
        spec = q.spec
        if not (spec.enabled and spec.kind_entry.integer):
            continue
        if q.role == roles.WEIGHT:
            weights.append(spec.bits)
        elif q.role == roles.ACT and spec.granularity == "per_tensor":
            acts.append(spec.bits)
    return max(weights), max(acts)


def _sizes(model: nn.Module, path: Path, proto, fp_bytes: int, quantized: bool) -> Dict[str, Any]:
    sizes: Dict[str, Any] = {"onnx_bytes": path.stat().st_size, "fp32_weight_bytes": fp_bytes}
    if not quantized:
        return sizes
    from onnx import numpy_helper

    container = sum(numpy_helper.to_array(t).nbytes for t in proto.graph.initializer)
    packed = model_size(model)
    bits = sorted({q.spec.bits for _, q in iter_quantizers(model) if q.role == "weight" and q.spec.enabled})
    sizes.update(
        container_weight_bytes=int(container),
        packed_weight_bytes=packed.weight_bytes,
        weight_bits=bits,
        onnx_ratio=round(sizes["onnx_bytes"] / fp_bytes, 4),
        packed_ratio=round(packed.weight_bytes / fp_bytes, 4),
    )
    return sizes


def _warnings(report: ExportReport) -> List[str]:
    out = []
    emulated = [p for p in report.points if p.form == EMULATED]
    if emulated:
        kinds = sorted({p.note.split(":")[0] for p in emulated})
        names = ", ".join(p.name for p in emulated[:4]) + (", ..." if len(emulated) > 4 else "")
        out.append(f"{len(emulated)} quant points run in float (emulated, same values): {'; '.join(kinds)} "
                   f"({names})")
    low = sorted({p.spec.bits for p in report.points if p.form in (INT_WEIGHT, QDQ) and p.spec.bits < 8})
    if low:
        out.append(f"{'/'.join(map(str, low))}-bit codes are stored and computed in 8-bit containers (values stay "
                   "on their low-bit grid); the packed size is reported, the file holds 8-bit containers")
    floats = [lay["name"] for lay in report.layers if lay["precision"] == "float"]
    if floats:
        out.append(f"{len(floats)} matrix products run in float32: {', '.join(floats)}")
    weight_only = [lay["name"] for lay in report.layers if lay["precision"] == "weights-only"]
    if weight_only:
        out.append(f"{len(weight_only)} matrix products have integer weights but float inputs (ONNX Runtime "
                   f"{', '.join(sorted({lay['op'] for lay in report.layers if lay['precision'] == 'weights-only'}))}"
                   f"): {', '.join(weight_only)}")
    fmt = report.int_format
    if fmt is not None and fmt.may_saturate(report.cpu, *report._max_bits()):
        out.append(f"{fmt.name.upper()} with 8-bit weights and activations on a CPU without VNNI: the int16 pair "
                   "sums of vpmaddubsw can saturate; use --int-format u8u8 (exact) or quantize with --w-bits 7 "
                   "or --a-bits 7")
    return out


def verdict_line(v: Dict[str, Any]) -> str:
    """The runtime's difference from the simulated model, next to the model's own float-rounding one."""
    base, diff = v["float64_max_abs_diff"], v["max_abs_diff"]
    verdict = ("within what float rounding alone moves the model" if diff <= 2.0 * base + 1e-3 else
               f"{diff / max(base, 1e-6):.1f}× what float rounding alone moves it: look at the export")
    return (f"The PyTorch model in float64 against itself in float32, on the same inputs: max |Δ logit| "
            f"{base:.3g}, top-1 agreement {v['float64_agreement']:.2f} % (a quantizer's rounding flips where a value "
            f"sits on a step boundary). The runtime's difference is {verdict}.")


def _verify(model: nn.Module, path: Path, sample: Optional[torch.Tensor], input_size: Sequence[int]) -> Dict[str, Any]:
    return _verify_against(model, OnnxModel(path), sample, input_size)


def _verify_against(model: nn.Module, runtime: Callable[[torch.Tensor], torch.Tensor], sample: Optional[torch.Tensor],
                    input_size: Sequence[int]) -> Dict[str, Any]:
    """A runtime's logits against the PyTorch model's on ``sample`` (default: 4 seeded random images)."""
    if sample is None:
        inputs = "seeded random images"
        sample = torch.randn(4, *input_size, generator=torch.Generator().manual_seed(1))
    else:
        inputs = "given images"
    with torch.no_grad():
        device = next(model.parameters()).device
        ref = model(sample.to(device)).float().cpu()
    with torch.no_grad():
        got = runtime(sample).detach().float().cpu()
    diff = (got - ref).abs()
    out = {
        "inputs": inputs,
        "num_images": int(sample.shape[0]),
        "max_abs_diff": float(diff.max()),
        "max_abs_logit": float(ref.abs().max()),
        "agreement": round(100.0 * (got.argmax(1) == ref.argmax(1)).double().mean().item(), 4),
    }
    out.update(float_rounding_baseline(model, sample, ref))
    return out


def float_rounding_baseline(model: nn.Module, sample: torch.Tensor, ref: torch.Tensor) -> Dict[str, Any]:
    """How far the PyTorch model moves from itself when its arithmetic is float64 instead of float32.

    A quantized network is discontinuous: a value within a rounding error of a quantizer's step
    boundary lands on one code or the next depending on the order of float operations, and at low
    bits one code is a large step. A runtime computes in another order than PyTorch (and its integer
    kernels exactly), so it can differ from the simulated model by as much as the model differs from
    itself in float64; only a difference well beyond this baseline points at the export.
    Returns ``float64_max_abs_diff`` and ``float64_agreement`` (empty where the model cannot run in
    float64).
    """
    try:
        twin = copy.deepcopy(model).double()
        with torch.no_grad():
            device = next(twin.parameters()).device
            ref64 = twin(sample.to(device, torch.float64)).float().cpu()
    except (RuntimeError, TypeError):  # an op without a float64 kernel on this device
        return {}
    return {"float64_max_abs_diff": float((ref64 - ref).abs().max()),
            "float64_agreement": round(100.0 * (ref64.argmax(1) == ref.argmax(1)).double().mean().item(), 4)}
