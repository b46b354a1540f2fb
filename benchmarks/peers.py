"""Peers benchmark (issue 15): vitq next to the quantizers a user would try instead.

    pip install -e '.[peers]'     # ONNX Runtime, OpenVINO, NNCF, torchao, Brevitas
    python benchmarks/peers.py [--models imagenet cifar small] [--peers ...] [--bits W8A8 W4A8 W4A4]
                               [--threads 2] [--repeats 10] [--warmup 2] [--num-eval N] [--no-speed]
                               [--append]

The same model, the same calibration images and the same evaluation images for every tool:

* ``imagenet``: the real ImageNet DeiT-Tiny, calibrated on 100 images of `imagenet-sample/` and
  evaluated on the other 900 (the split of benchmarks/foundation.py and accuracy.py);
* ``cifar``: the CIFAR-10 ViT, 256 `cifar10/train` images, evaluated on `cifar10/test`;
* ``small``: a DeiT-Small with random weights (timm ``deit_small_patch16_224``, nothing
  downloaded), 8 seeded random calibration images: speed and size only.

Each peer runs at its own recommended settings for transformers (named in the table), in its own
runtime: ONNX Runtime for ``quantize_static``/``quantize_dynamic``, OpenVINO for NNCF, PyTorch for
torchao and Brevitas. vitq runs its default (recommended) recipe, deployed as its QDQ ONNX export
in ONNX Runtime and, converted, in OpenVINO. Columns: top-1 on the evaluation images, top-1
agreement with the float model and KL(float ‖ quantized) on the same images, quantization seconds,
file size, how many matrix products run in integer kernels (read back from each runtime), batch-1
latency and batch-32 throughput (medians of ``--repeats`` runs after ``--warmup``, seeded random
inputs). A peer that cannot do a bit-width says so in the table, with why.

Writes benchmarks/results/peers.json and the "Peers" section of benchmarks/RESULTS.md on a CPU
without VNNI, benchmarks/results/peers-vnni.json and the section "Peers on a CPU with VNNI" on
one with VNNI and AMX, and benchmarks/results/peers-vnni-noamx.json and the section "Peers on a CPU
with VNNI and no AMX" on one with VNNI alone: the integer kernels (and so the speed, and ONNX
Runtime's and torchao's reduce_range; OpenVINO's AMX kernels) differ between them, so their rows
never share a table.
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from foundation import cpu_kind, in_memory, machine, machine_marks, write_section  # noqa: E402

from vitq.api import quantize  # noqa: E402
from vitq.data import assets_dir, balanced_subset, load_images, make_loader, scan_folder  # noqa: E402
from vitq.eval.metrics import compare, predict  # noqa: E402
from vitq.export import OnnxModel, analyse_graph, cpu_info, export_onnx  # noqa: E402
from vitq.models import load_model  # noqa: E402

HERE = Path(__file__).resolve().parent


def results_for(info) -> Tuple[Path, str]:
    """The JSON file and the RESULTS.md heading of this CPU kind's table (see the module docstring)."""
    suffix, _ = cpu_kind(info)
    # the sections' titles as first written (the VNNI-and-AMX one says "with VNNI")
    where = {"-vnni": " on a CPU with VNNI", "-vnni-noamx": " on a CPU with VNNI and no AMX", "": ""}[suffix]
    return (HERE / "results" / f"peers{suffix}.json",
            f"## Peers{where}: vitq next to ONNX Runtime, NNCF/OpenVINO, torchao and Brevitas (issue 15)")


RESULTS_JSON, HEADING = results_for(cpu_info())
MODELS = {
    "imagenet": "DeiT-Tiny (`deit_tiny_imagenet`), ImageNet, 100 calibration / 900 evaluation images",
    "cifar": "CIFAR-10 ViT (`vit_cifar10_d6`), 256 calibration / test-set evaluation images",
    "small": "DeiT-Small, random weights (`deit_small_patch16_224`): speed and size only",
}
BITS = {"W8A8": (8, 8), "W4A8": (4, 8), "W4A4": (4, 4)}
SPEED_BITS = "W8A8"


def log(msg: str) -> None:
    print(msg, flush=True)


class Unsupported(Exception):
    """The peer cannot quantize at these bits (the message says why)."""


@dataclass
class Bench:
    """One model with its images, shared by every peer."""

    key: str
    loaded: Any
    calib: List[Tuple[torch.Tensor, torch.Tensor]]
    evals: Optional[List[Tuple[torch.Tensor, torch.Tensor]]]
    workdir: Path
    threads: int
    fp_onnx: Path = None
    fp_logits: Optional[torch.Tensor] = None
    labels: Optional[torch.Tensor] = None
    cache: Dict[str, Any] = field(default_factory=dict)

    @property
    def input_size(self) -> Tuple[int, ...]:
        return tuple(self.loaded.data_config["input_size"])

    def calib_arrays(self) -> List[np.ndarray]:
        return [x.numpy() for x, _ in self.calib]

    def num_calib(self) -> int:
        return sum(int(x.shape[0]) for x, _ in self.calib)


@dataclass
class Deployed:
    """A peer's quantized model, in the peer's runtime."""

    run: Callable[[np.ndarray], np.ndarray]
    runtime: str
    quant_seconds: float
    size_bytes: int
    integer_gemms: str
    note: str = ""


def _file_bytes(*paths: Path) -> int:
    return sum(Path(p).stat().st_size for p in paths)


def _state_bytes(model: torch.nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


# ---------------------------------------------------------------- ONNX Runtime


class _Reader:
    """ONNX Runtime's CalibrationDataReader over the calibration batches."""

    def __init__(self, name: str, arrays: List[np.ndarray]) -> None:
        self.name, self.arrays, self.i = name, arrays, 0

    def get_next(self):
        if self.i >= len(self.arrays):
            return None
        self.i += 1
        return {self.name: self.arrays[self.i - 1]}

    def rewind(self) -> None:
        self.i = 0


def _ort_runner(path: Path, threads: int) -> Tuple[Callable, str]:
    model = OnnxModel(path, threads=threads)
    gemms = analyse_graph(path)["gemms"]
    integer = sum(1 for g in gemms if g["precision"] == "integer")
    return model.run, f"{integer}/{len(gemms)}"


def _preprocessed(bench: Bench) -> Path:
    """ONNX Runtime's recommended pre-processing (shape inference and graph optimization)."""
    if "ort_pre" not in bench.cache:
        from onnxruntime.quantization import quant_pre_process

        out = bench.workdir / f"{bench.key}-pre.onnx"
        t0 = time.perf_counter()
        quant_pre_process(str(bench.fp_onnx), str(out))
        bench.cache["ort_pre"] = (out, time.perf_counter() - t0)
    return bench.cache["ort_pre"]


def ort_static(bench: Bench, w: int, a: int, method: str = "MinMax", recommended: bool = True) -> Deployed:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if (w, a) != (8, 8):
        raise Unsupported("int8 only: ONNX Runtime's CPU integer kernels take 8-bit operands (4-bit weights run "
                          "weight-only in MatMulNBits, with float activations)")
    out = bench.workdir / f"{bench.key}-ort-static-{method}-{'rec' if recommended else 'default'}.onnx"
    reader = _Reader(OnnxModel(bench.fp_onnx).input_name, bench.calib_arrays())
    t0 = time.perf_counter()
    if recommended:
        source, pre_seconds = _preprocessed(bench)
        quantize_static(str(source), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=not cpu_info().vnni, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=getattr(CalibrationMethod, method))
    else:
        pre_seconds = 0.0
        quantize_static(str(bench.fp_onnx), str(out), reader)
    seconds = time.perf_counter() - t0 + pre_seconds
    run, gemms = _ort_runner(out, bench.threads)
    return Deployed(run, "ONNX Runtime", seconds, _file_bytes(out), gemms)


def ort_dynamic(bench: Bench, w: int, a: int) -> Deployed:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if (w, a) != (8, 8):
        raise Unsupported("int8 only (activations are quantized at run time to 8 bits)")
    out = bench.workdir / f"{bench.key}-ort-dynamic.onnx"
    source, pre_seconds = _preprocessed(bench)
    t0 = time.perf_counter()
    quantize_dynamic(str(source), str(out), per_channel=True, reduce_range=not cpu_info().vnni,
                     weight_type=QuantType.QInt8)
    seconds = time.perf_counter() - t0 + pre_seconds
    run, gemms = _ort_runner(out, bench.threads)
    return Deployed(run, "ONNX Runtime", seconds, _file_bytes(out), gemms)


# ---------------------------------------------------------------- NNCF / OpenVINO


def _ov_runner(model, threads: int, precision: Optional[str] = None):
    """run, the integer GEMM count, and the precision the float parts run in (``precision``, or
    OpenVINO's default: bf16 on a CPU with native bf16 (AVX512-BF16, AMX), else f32)."""
    import openvino as ov

    from vitq.export.openvino import gemm_precisions, inference_precision

    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
    if precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    compiled = ov.Core().compile_model(model, "CPU", config)
    request = compiled.create_infer_request()
    output = compiled.output(0)

    def run(x: np.ndarray) -> np.ndarray:
        return np.array(request.infer({0: np.ascontiguousarray(x, dtype=np.float32)})[output])

    g = gemm_precisions(compiled)
    gemms = f"{g['integer']}/{g['integer'] + g['float']}"
    if g.get("weight_only"):
        gemms += f" ({g['weight_only']} weight-only)"
    att = g.get("attention", {})
    if sum(att.values()):
        gemms += f"; attention {att['integer']}/{att['integer'] + att['float']}"
    return run, gemms, inference_precision(compiled)


def _precision_note(precision: str) -> str:
    return "" if precision == "f32" else f"float parts in {precision}: OpenVINO's default on this CPU"


def nncf_quantize(bench: Bench, w: int, a: int) -> Deployed:
    import nncf
    import openvino as ov

    if (w, a) != (8, 8):
        raise Unsupported("nncf.quantize is int8 (W8A8); NNCF's 4-bit mode (compress_weights) is weight-only, with "
                          "float activations")
    model = ov.Core().read_model(str(bench.fp_onnx))
    items = [x[i:i + 1] for x in bench.calib_arrays() for i in range(x.shape[0])]
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = nncf.quantize(model, nncf.Dataset(items), model_type=nncf.ModelType.TRANSFORMER,
                                  preset=nncf.QuantizationPreset.MIXED, subset_size=len(items))
    seconds = time.perf_counter() - t0
    xml = bench.workdir / f"{bench.key}-nncf.xml"
    ov.save_model(quantized, str(xml), compress_to_fp16=False)
    run, gemms, precision = _ov_runner(quantized, bench.threads)
    return Deployed(run, "OpenVINO", seconds, _file_bytes(xml, xml.with_suffix(".bin")), gemms,
                    note=_precision_note(precision))


# ---------------------------------------------------------------- torchao


def torchao_quantize(bench: Bench, w: int, a: int) -> Deployed:
    from torchao.quantization import (Int8DynamicActivationInt8WeightConfig,
                                      Int8DynamicActivationIntxWeightConfig, quantize_)
    from torchao.quantization.granularity import PerGroup

    if a != 8:
        raise Unsupported("no 4-bit activation path on CPU (torchao's int4 activations need CUDA kernels)")
    model = copy.deepcopy(bench.loaded.model).eval()
    if w == 8:
        config, what = Int8DynamicActivationInt8WeightConfig(reduce_range=not cpu_info().vnni), "W8A8"
    else:
        config, what = Int8DynamicActivationIntxWeightConfig(weight_dtype=getattr(torch, f"int{w}"),
                                                             weight_granularity=PerGroup(32)), f"W{w}A8"
    t0 = time.perf_counter()
    quantize_(model, config)
    seconds = time.perf_counter() - t0
    linears = sum(1 for m in model.modules() if isinstance(m, torch.nn.Linear))

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).float().numpy()

    return Deployed(run, "PyTorch (eager)", seconds, _state_bytes(model), f"{linears} linear layers ({what})",
                    note="the patch embedding (a convolution) stays float")


# ---------------------------------------------------------------- Brevitas


def brevitas_quantize(bench: Bench, w: int, a: int, first_last_bits: int = 8) -> Deployed:
    from brevitas_examples.imagenet_classification.ptq.ptq_common import (apply_bias_correction, apply_gptq,
                                                                          calibrate, quantize_model)

    if first_last_bits != 8 and w != a:
        raise Unsupported("Brevitas's layerwise width of the first and last layer applies to their weights and "
                          "activations alike: it cannot give them 4-bit weights with 8-bit activations")
    default = " (Brevitas's layerwise default)" if first_last_bits == 8 else ""
    model = copy.deepcopy(bench.loaded.model).eval()
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = quantize_model(
            model, backend="layerwise", weight_bit_width=w, act_bit_width=a, bias_bit_width=32,
            weight_quant_granularity="per_channel", act_quant_percentile=99.999, act_quant_type="asym",
            scale_factor_type="float_scale", quant_format="int", layerwise_first_last_bit_width=first_last_bits,
            weight_quant_type="sym")
        with torch.no_grad():
            quantized(bench.calib[0][0])  # initialises the weight quantizers, as Brevitas asks before GPTQ
        calibrate(bench.calib, quantized)
        apply_gptq(bench.calib, quantized)
        apply_bias_correction(bench.calib, quantized)
    seconds = time.perf_counter() - t0
    layers = sum(1 for m in quantized.modules() if type(m).__name__ in ("QuantLinear", "QuantConv2d"))

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = quantized(torch.from_numpy(x))
            return (out.value if hasattr(out, "value") else out).float().numpy()

    return Deployed(run, "PyTorch (fake-quant)", seconds, _state_bytes(bench.loaded.model),
                    f"{layers} layers (fake-quant)",
                    note=f"first and last layer at {first_last_bits} bits{default}; simulated in float, size is "
                         "the float checkpoint's")


# ---------------------------------------------------------------- vitq


def _vitq_plan(bench: Bench, recipe: str, w: int, a: int, protocol: str = "p1"):
    key = ("vitq", recipe, w, a, protocol)
    if key not in bench.cache:
        t0 = time.perf_counter()
        result = quantize(bench.loaded.model, recipe, bench.calib, w_bits=w, a_bits=a, protocol=protocol,
                          device="cpu", progress=False)
        bench.cache[key] = (result, time.perf_counter() - t0)
    return bench.cache[key]


def _vitq_onnx(bench: Bench, recipe: str, w: int, a: int, protocol: str = "p1", fold: bool = False
               ) -> Tuple[Path, Any, float]:
    """The plan's QDQ export; ``fold``: as `vitq export --format openvino` writes it (weight zero points folded
    into the codes where exact)."""
    result, seconds = _vitq_plan(bench, recipe, w, a, protocol)
    path = bench.workdir / f"{bench.key}-vitq-{recipe}-{protocol}-w{w}a{a}{'-fold' if fold else ''}.onnx"
    if not path.exists():
        export_onnx(result.model, path, data_config=bench.loaded.data_config, meta=result.plan.meta, verify=False,
                    fold_weight_zero_points=fold)
    return path, result, seconds


def vitq_ort(bench: Bench, w: int, a: int, recipe: str = "recommended", protocol: str = "p1") -> Deployed:
    path, result, seconds = _vitq_onnx(bench, recipe, w, a, protocol)
    run, gemms = _ort_runner(path, bench.threads)
    fmt = OnnxModel(path).meta.get("int_format", "?")
    return Deployed(run, "ONNX Runtime", seconds, _file_bytes(path), gemms, note=f"{fmt.upper()}")


def vitq_openvino(bench: Bench, w: int, a: int, recipe: str = "recommended", precision: Optional[str] = None,
                  protocol: str = "p1") -> Deployed:
    from vitq.export.openvino import onnx_to_openvino

    path, result, seconds = _vitq_onnx(bench, recipe, w, a, protocol, fold=True)
    xml = onnx_to_openvino(path, path.with_suffix(".xml"))
    import openvino as ov

    run, gemms, precision = _ov_runner(ov.Core().read_model(str(xml)), bench.threads, precision)
    return Deployed(run, "OpenVINO", seconds, _file_bytes(xml, xml.with_suffix(".bin")), gemms,
                    note=_precision_note(precision))


def vitq_simulated(bench: Bench, w: int, a: int, recipe: str = "recommended") -> Deployed:
    result, seconds = _vitq_plan(bench, recipe, w, a)
    model = result.model.eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).float().numpy()

    return Deployed(run, "PyTorch (simulated)", seconds, 0, "—")


def vitq_int_w7(bench: Bench, w: int, a: int) -> Deployed:
    if (w, a) != (8, 8):
        raise Unsupported("a W8A8 row only: 7-bit weights are the W8A8 setting for the U8S8 kernels of a CPU without "
                          "VNNI")
    return vitq_ort(bench, 7, 8, "recommended-int")


def vitq_int_w7_openvino(bench: Bench, w: int, a: int) -> Deployed:
    if (w, a) != (8, 8):
        raise Unsupported("a W8A8 row only: 7-bit weights, whose zero points always fold into int8 codes")
    return vitq_openvino(bench, 7, 8, "recommended-int")


# name: (tool, settings, function)
PEERS: Dict[str, Tuple[str, str, Callable[..., Deployed]]] = {
    "ort-static-default": ("ONNX Runtime `quantize_static`",
                           "its defaults: QDQ, per-tensor S8S8, MinMax",
                           lambda b, w, a: ort_static(b, w, a, "MinMax", recommended=False)),
    "ort-static-minmax": ("ONNX Runtime `quantize_static`",
                          "pre-processed, QDQ, per-channel U8S8, reduce_range without VNNI, MinMax",
                          lambda b, w, a: ort_static(b, w, a, "MinMax")),
    "ort-static-entropy": ("ONNX Runtime `quantize_static`", "as above, Entropy calibration",
                           lambda b, w, a: ort_static(b, w, a, "Entropy")),
    "ort-static-percentile": ("ONNX Runtime `quantize_static`", "as above, Percentile (99.999) calibration",
                              lambda b, w, a: ort_static(b, w, a, "Percentile")),
    "ort-dynamic": ("ONNX Runtime `quantize_dynamic`",
                    "pre-processed, per-channel int8 weights, reduce_range without VNNI, dynamic uint8 activations",
                    ort_dynamic),
    "nncf": ("NNCF `quantize` → OpenVINO", "model_type=TRANSFORMER (SmoothQuant), preset MIXED, all calibration "
             "images", nncf_quantize),
    "torchao": ("torchao `quantize_`", "Int8DynamicActivationInt8WeightConfig (per-token dynamic int8 activations, "
                "per-channel int8 weights; reduce_range without VNNI); W4A8: Int8DynamicActivationIntxWeightConfig "
                "(int4 weights, groups of 32)", torchao_quantize),
    "brevitas": ("Brevitas (layerwise PTQ)", "per-channel symmetric weights, asymmetric per-tensor activations at the "
                 "99.999th percentile, GPTQ, bias correction (its best ViT configuration), first and last layer at 8 bits "
                 "(its layerwise default)", brevitas_quantize),
    "brevitas-uniform": ("Brevitas (layerwise PTQ)", "as above, with the first and last layer at the same bits as the "
                         "rest (as every other row)", lambda b, w, a: brevitas_quantize(b, w, a, first_last_bits=w)),
    "vitq-omse": ("vitq `omse`", "p1, the fast baseline recipe; QDQ export", lambda b, w, a: vitq_ort(b, w, a, "omse")),
    "vitq": ("vitq `recommended`", "p1, the default recipe; QDQ export", vitq_ort),
    "vitq-p4": ("vitq `recommended`", "p4 (linear layers only, attention in float: the scope of quantize_dynamic, "
                "torchao and Brevitas); QDQ export", lambda b, w, a: vitq_ort(b, w, a, protocol="p4")),
    "vitq-int": ("vitq `recommended-int`", "p1, every quant point with an integer form (uniform probabilities, no "
                 "OPT-m twins; q, k and v on symmetric grids since 2026-12-05, earlier rows with zero points); QDQ "
                 "export", lambda b, w, a: vitq_ort(b, w, a, "recommended-int")),
    "vitq-int-p4": ("vitq `recommended-int`", "p4 (linear layers only, attention in float); QDQ export",
                    lambda b, w, a: vitq_ort(b, w, a, "recommended-int", "p4")),
    "vitq-int-w7": ("vitq `recommended-int`", "p1 with 7-bit weights (what ONNX Runtime's reduce_range does on a CPU "
                    "without VNNI): exact in the faster U8S8 kernels; QDQ export", vitq_int_w7),
    "vitq-openvino": ("vitq `recommended`", "the same plan's export for OpenVINO (`vitq export --format openvino`: "
                      "weight zero points folded where exact)", vitq_openvino),
    "vitq-int-openvino": ("vitq `recommended-int`", "p1, its export converted to OpenVINO (q, k and v symmetric since "
                          "2026-12-05, so that OpenVINO runs the attention products in integers; earlier rows with "
                          "zero points, attention in float)",
                          lambda b, w, a: vitq_openvino(b, w, a, "recommended-int")),
    "vitq-int-p4-openvino": ("vitq `recommended-int`", "p4 (linear layers only, attention in float), its export "
                             "converted to OpenVINO",
                             lambda b, w, a: vitq_openvino(b, w, a, "recommended-int", protocol="p4")),
    "vitq-int-w7-openvino": ("vitq `recommended-int`", "p1 with 7-bit weights, whose zero points fold exactly into "
                             "int8 codes: OpenVINO's integer kernels", vitq_int_w7_openvino),
    "vitq-openvino-f32": ("vitq `recommended`", "the same plan's export in OpenVINO with what stays float in float32 "
                          "(`--ov-precision f32`; the same as the row above on a CPU without native bf16)",
                          lambda b, w, a: vitq_openvino(b, w, a, precision="f32")),
    "vitq-simulated": ("vitq `recommended`", "the same plan, simulated (fake-quant) in PyTorch", vitq_simulated),
}
# vitq-int-w7 answers the int16 saturation of a CPU without VNNI; with VNNI 8-bit weights are exact in U8S8
DEFAULT_PEERS = [p for p in PEERS if p not in ("vitq-simulated", "brevitas-uniform", "vitq-openvino-f32",
                                               "vitq-int-w7-openvino")
                 + (("vitq-int-w7",) if cpu_info().vnni else ())]
LABELS = {
    "ort-static-default": "ORT static (defaults)", "ort-static-minmax": "ORT static MinMax",
    "ort-static-entropy": "ORT static Entropy", "ort-static-percentile": "ORT static Percentile",
    "ort-dynamic": "ORT dynamic", "nncf": "NNCF", "torchao": "torchao", "brevitas": "Brevitas",
    "brevitas-uniform": "Brevitas, first/last at the same bits", "vitq-omse": "vitq omse (p1)",
    "vitq": "vitq recommended (p1)", "vitq-p4": "vitq recommended (p4)", "vitq-int": "vitq recommended-int (p1)",
    "vitq-int-p4": "vitq recommended-int (p4)", "vitq-int-w7": "vitq recommended-int (p1), 7-bit weights",
    "vitq-openvino": "vitq recommended (p1) in OpenVINO", "vitq-int-openvino": "vitq recommended-int (p1) in OpenVINO",
    "vitq-int-p4-openvino": "vitq recommended-int (p4) in OpenVINO",
    "vitq-openvino-f32": "vitq recommended (p1) in OpenVINO, f32",
    "vitq-int-w7-openvino": "vitq recommended-int (p1), 7-bit weights, in OpenVINO",
    "vitq-simulated": "vitq recommended (p1), simulated",
}


SLOW_SECONDS, SLOW_REPEATS = 3.0, 3


def speed(run: Callable[[np.ndarray], np.ndarray], input_size, batch: int, repeats: int, warmup: int) -> float:
    """Median milliseconds per batch on seeded random inputs (a runner slower than ``SLOW_SECONDS``
    per batch is timed ``SLOW_REPEATS`` times after one warm-up run)."""
    x = torch.randn(batch, *input_size, generator=torch.Generator().manual_seed(batch)).numpy()
    t0 = time.perf_counter()
    run(x)
    if time.perf_counter() - t0 > SLOW_SECONDS:
        repeats, warmup = min(repeats, SLOW_REPEATS), 1
    for _ in range(warmup - 1):
        run(x)
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(x)
        seconds.append(time.perf_counter() - t0)
    return round(1000 * statistics.median(seconds), 2)


def evaluate(bench: Bench, deployed: Deployed) -> Dict[str, Any]:
    logits = torch.cat([torch.from_numpy(deployed.run(x.numpy())) for x, _ in bench.evals])
    cmp = compare(bench.fp_logits, logits, bench.labels)
    return {"fp_top1": cmp["fp_top1"], "top1": cmp["quant_top1"], "agreement": cmp["agreement"], "kl": cmp["kl"]}


def _key(row: Dict[str, Any]) -> Tuple[str, str, str]:
    return row["peer"], row["bits"], row["tool"] if row["peer"] == "float" else ""


def run_model(bench: Bench, peers: List[str], bits: List[str], args, save: Callable[[Dict[str, Any]], None],
              done: set) -> None:
    """Measure every (peer, bits) of one model; ``save`` stores each row as soon as it is measured,
    and rows whose key is in ``done`` (``--resume``) are not measured again."""
    bench.fp_onnx = bench.workdir / f"{bench.key}-fp32.onnx"
    export_onnx(bench.loaded.model, bench.fp_onnx, data_config=bench.loaded.data_config, verify=False)
    if bench.evals is not None:
        (bench.fp_logits,), bench.labels = predict(bench.loaded.model, bench.evals, "cpu", progress=False)
    fp_run = OnnxModel(bench.fp_onnx, threads=bench.threads).run
    baselines = {"ONNX Runtime FP32": fp_run}

    def torch_fp(x):
        with torch.inference_mode():
            return bench.loaded.model(torch.from_numpy(x)).numpy()

    baselines["PyTorch FP32"] = torch_fp
    if "nncf" in peers or "vitq-openvino" in peers:
        import openvino as ov

        fp_model = ov.Core().read_model(str(bench.fp_onnx))
        baselines["OpenVINO FP32"] = _ov_runner(fp_model, bench.threads, "f32")[0]  # float32 forced
        default_run, _, precision = _ov_runner(fp_model, bench.threads)
        if precision != "f32":  # OpenVINO runs a float model in bf16 by default here: time that too, named so
            baselines[f"OpenVINO {precision.upper()}"] = default_run
    if not args.no_speed:
        for name, run in baselines.items():
            settings = "float32" if "FP32" in name else f"{name.split()[-1].lower()}: OpenVINO's default on this CPU"
            row = {"model": bench.key, "peer": "float", "tool": name, "settings": settings, "bits": "FP32",
                   "runtime": name.rsplit(" ", 1)[0], "size_bytes": _file_bytes(bench.fp_onnx)}
            if _key(row) in done:
                continue
            if bench.evals is not None and name == "PyTorch FP32":
                row.update(top1=float(f"{100 * (bench.fp_logits.argmax(1) == bench.labels).double().mean():.4f}"),
                           agreement=100.0, kl=0.0)
            row.update(b1_ms=speed(run, bench.input_size, 1, args.repeats, args.warmup),
                       b32_ms=speed(run, bench.input_size, 32, args.repeats, args.warmup))
            log(f"[{bench.key}] {name}: b1 {row['b1_ms']:.1f} ms, b32 {row['b32_ms']:.1f} ms")
            save(row)
    for bits_name in bits:
        w, a = BITS[bits_name]
        for peer in peers:
            tool, settings, fn = PEERS[peer]
            row: Dict[str, Any] = {"model": bench.key, "peer": peer, "tool": tool, "settings": settings,
                                   "bits": bits_name}
            if _key(row) in done:
                continue
            try:
                deployed = fn(bench, w, a)
            except Unsupported as why:
                row["unsupported"] = str(why)
                log(f"[{bench.key}] {bits_name} {peer}: not supported ({why})")
                save(row)
                continue
            except Exception as err:  # a peer that fails is a result too: say how
                row["failed"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}" if str(err) else \
                    type(err).__name__
                log(f"[{bench.key}] {bits_name} {peer}: FAILED {row['failed']}")
                if args.debug:
                    traceback.print_exc()
                save(row)
                continue
            row.update(runtime=deployed.runtime, quant_seconds=round(deployed.quant_seconds, 1),
                       size_bytes=deployed.size_bytes, integer_gemms=deployed.integer_gemms, note=deployed.note)
            if bench.evals is not None:
                t0 = time.perf_counter()
                row.update(evaluate(bench, deployed), eval_seconds=round(time.perf_counter() - t0, 1))
            if not args.no_speed and bits_name == SPEED_BITS and peer != "vitq-simulated":
                row.update(b1_ms=speed(deployed.run, bench.input_size, 1, args.repeats, args.warmup),
                           b32_ms=speed(deployed.run, bench.input_size, 32, args.repeats, args.warmup))
            log(f"[{bench.key}] {bits_name} {peer}: " + ", ".join(
                f"{k} {row[k]}" for k in ("top1", "agreement", "kl", "quant_seconds", "size_bytes", "integer_gemms",
                                          "b1_ms", "b32_ms") if k in row))
            save(row)
            del deployed


def _mb(n: Optional[int]) -> str:
    return f"{n / 1e6:.1f}" if n else "—"


def _fmt(row: Dict[str, Any], key: str, spec: str) -> str:
    return format(row[key], spec) if row.get(key) is not None else "—"


def write_markdown(results: Dict[str, Any]) -> None:
    every = [r for m in results["models"].values() for r in m["rows"]]
    marks = machine_marks(results["machine"], every)
    isa = {r["machine"]: r.get("isa", "?") for r in every if r.get("machine") in marks}
    where = "".join(f"; rows marked {mark}: {m}; CPU features: {isa[m]}" for m, mark in marks.items())
    lines = [
        HEADING,
        "",
        "Commands: " + "; ".join(f"`{c}`" for c in results["commands"]) + "  ",
        f"Machine: {results['machine']}; CPU features: {results['isa']}{' (unmarked rows)' if marks else ''}{where}; "
        f"threads: {results['threads']}  ",
        f"Versions: {', '.join(f'{k} {v}' for k, v in results['versions'].items())}  ",
        f"Date: {results['date']}",
        "",
        "Same model, same calibration images and same evaluation images for every tool; each in its own runtime "
        "(ONNX Runtime for ONNX Runtime's quantizers and vitq's QDQ export, OpenVINO for NNCF and for vitq's export "
        "converted, PyTorch for torchao and Brevitas). *agreement*: top-1 agreement with the float PyTorch model on the "
        "evaluation images; *KL*: mean KL(float ‖ quantized); *quant s*: wall seconds of the tool's quantization "
        "(calibration included; ONNX Runtime's pre-processing included; the float ONNX export, shared, excluded); "
        "*MB*: the deployed file (ONNX, OpenVINO IR .xml+.bin, or the PyTorch state dict); *integer GEMMs*: matrix "
        "products that run in integer kernels, read back from the runtime's optimized graph (ONNX Runtime) or compiled "
        "model (OpenVINO; *attention a/b*: of the b attention blocks OpenVINO fused into one kernel (q·kᵀ, softmax, "
        "attn·v), a compute in integers; rows measured before 2026-12-05 do not count them), or the layers the tool "
        "swapped (PyTorch); OpenVINO runs what stays float in bf16 by "
        "default on a CPU with native bf16 (AVX512-BF16, AMX): its rows say so, and *OpenVINO FP32* then forces "
        "float32; *b1 ms*: batch-1 latency, *b32 ms*: one batch of "
        "32 (medians over "
        f"{results['repeats']} runs after {results['warmup']} warm-up runs, {SLOW_REPEATS} runs after one for a runtime "
        f"slower than {SLOW_SECONDS:.0f} s per batch; seeded random inputs). The rows come from the commands above, run "
        "one after another on a shared machine whose speed drifts between runs: a float row measured by a later "
        "command replaces the earlier one, so speed ratios carry that drift (compare the two runs' float rows in "
        f"benchmarks/results/{RESULTS_JSON.name}'s history, or rerun one command for a single-run table).",
        "",
    ]
    for model in [m for m in MODELS if m in results["models"]]:
        order = {name: i for i, name in enumerate(["float", *PEERS])}
        bits_order = {name: i for i, name in enumerate(["FP32", *BITS])}
        rows = sorted(results["models"][model]["rows"], key=lambda r: (bits_order.get(r["bits"], 9),
                                                                       order.get(r["peer"], 99), r["tool"]))
        title = MODELS[model]
        if model == "cifar" and results["models"][model].get("num_eval"):
            title = title.replace("test-set evaluation images",
                                  f"{results['models'][model]['num_eval']} seeded `cifar10/test` evaluation images")
        lines += [f"### {title}", ""]
        lines += ["| bits | tool | runtime | top-1 | agreement | KL | quant s | MB | integer GEMMs | b1 ms | b32 ms |",
                  "|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|"]
        missing: Dict[str, List[str]] = {}
        for row in rows:
            if "unsupported" in row or "failed" in row:
                why = f"not supported: {row['unsupported']}" if "unsupported" in row else f"failed: {row['failed']}"
                missing.setdefault(f"{LABELS.get(row['peer'], row['tool'])} — {why}", []).append(row["bits"])
                continue
            label = row["tool"] if row["peer"] == "float" else LABELS.get(row["peer"], row["tool"])
            if row.get("machine") in marks:
                label += f" {marks[row['machine']]}"
            note = f" ({row['note']})" if row.get("note") else ""
            lines.append(
                f"| {row['bits']} | {label}{note} | {row.get('runtime', '')} | {_fmt(row, 'top1', '.2f')} | "
                f"{_fmt(row, 'agreement', '.2f')} | {_fmt(row, 'kl', '.4f')} | {_fmt(row, 'quant_seconds', '.1f')} | "
                f"{_mb(row.get('size_bytes'))} | {row.get('integer_gemms', '')} | {_fmt(row, 'b1_ms', '.1f')} | "
                f"{_fmt(row, 'b32_ms', '.1f')} |")
        lines.append("")
        if missing:
            lines += [f"- {', '.join(bits)}: {what}" for what, bits in missing.items()] + [""]
    used = [p for p in PEERS if any(r["peer"] == p for m in results["models"].values() for r in m["rows"])]
    lines += ["Settings of each row:", ""]
    lines += [f"- **{LABELS[p]}**: {PEERS[p][0]}; {PEERS[p][1]}" for p in used] + [""]
    lines += goal_lines(results)
    write_section(HEADING.split(":")[0] + ":", lines)


def goal_lines(results: Dict[str, Any]) -> List[str]:
    """The issue's targets, read from the rows: the most accurate tool per model and bits, and the
    fastest int8 model at batch 32 against ONNX Runtime FP32."""
    out = ["Targets (computed from the rows above):", ""]
    for model in [m for m in MODELS if m in results["models"]]:
        rows = [r for r in results["models"][model]["rows"] if "agreement" in r and r["peer"] != "float"]
        for bits in BITS:
            at = [r for r in rows if r["bits"] == bits]
            if not at:
                continue
            best = max(at, key=lambda r: (r["agreement"], -r["kl"]))
            ours = [r for r in at if r["peer"].startswith("vitq")]
            peers = [r for r in at if not r["peer"].startswith("vitq")]
            if ours and peers:
                v = max(ours, key=lambda r: (r["agreement"], -r["kl"]))
                p = max(peers, key=lambda r: (r["agreement"], -r["kl"]))
                met = "met" if best["peer"].startswith("vitq") else "not met"
                out.append(f"- {model} {bits}: most accurate vitq row {LABELS[v['peer']]} (agreement {v['agreement']:.2f}, "
                           f"KL {v['kl']:.4f}); most accurate peer {LABELS[p['peer']]} ({p['agreement']:.2f}, "
                           f"{p['kl']:.4f}): vitq most accurate: {met}")
        fp = next((r for r in results["models"][model]["rows"] if r.get("tool") == "ONNX Runtime FP32"
                   and r.get("b32_ms")), None)
        on = (fp or {}).get("machine", results["machine"])  # speeds compare on one machine only
        timed = [r for r in results["models"][model]["rows"] if r.get("b32_ms") and r["bits"] == SPEED_BITS
                 and r.get("machine", results["machine"]) == on]
        ours = [r for r in timed if r["peer"].startswith("vitq")]
        peers = [r for r in timed if not r["peer"].startswith("vitq")]
        if ours and peers and fp:
            v, p = min(ours, key=lambda r: r["b32_ms"]), min(peers, key=lambda r: r["b32_ms"])
            goal = f" (goal ≥ 1.8×: {'met' if fp['b32_ms'] / v['b32_ms'] >= 1.8 else 'not met'})" \
                if model == "small" else ""
            out.append(f"- {model} speed at batch 32: fastest vitq export {LABELS[v['peer']]} {v['b32_ms']:.1f} ms = "
                       f"{fp['b32_ms'] / v['b32_ms']:.2f}× ONNX Runtime FP32{goal}; fastest peer {LABELS[p['peer']]} "
                       f"{p['b32_ms']:.1f} ms ({fp['b32_ms'] / p['b32_ms']:.2f}×): vitq fastest: "
                       f"{'met' if v['b32_ms'] < p['b32_ms'] else 'not met'}")
    return out + [""]


def build(key: str, root: Path, workdir: Path, args) -> Bench:
    if key == "imagenet":
        loaded = load_model(root / "models/deit_tiny_imagenet.pth")
        sample = scan_folder(root / "imagenet-sample")
        calib = balanced_subset(sample, 100, seed=0, what="calibration images")
        evalset = balanced_subset(sample, None, seed=0, exclude=calib.paths, what="evaluation images")
        return Bench(key, loaded, in_memory(make_loader(calib, loaded.data_config, 50)),
                     in_memory(make_loader(evalset, loaded.data_config, 50)), workdir, args.threads)
    if key == "cifar":
        loaded = load_model(root / "models/vit_cifar10_d6.pth")
        calib = load_images(root / "cifar10/train", 256, seed=0, what="calibration images")
        evalset = load_images(root / "cifar10/test", args.num_eval, seed=0, what="evaluation images")
        return Bench(key, loaded, in_memory(make_loader(calib, loaded.data_config, 64)),
                     in_memory(make_loader(evalset, loaded.data_config, 250)), workdir, args.threads)
    torch.manual_seed(0)
    loaded = load_model("deit_small_patch16_224", pretrained=False)
    size = tuple(loaded.data_config["input_size"])
    noise = torch.randn(8, *size, generator=torch.Generator().manual_seed(0))
    return Bench(key, loaded, [(noise, torch.zeros(8, dtype=torch.long))], None, workdir, args.threads)


def versions() -> Dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "onnxruntime", "openvino", "nncf", "torchao", "brevitas", "timm"):
        try:
            out[name] = md.version(name).split("-")[0]
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", default=None, help="assets folder (default: $VITQ_ASSETS or ../shared/assets)")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--peers", nargs="+", choices=list(PEERS), default=DEFAULT_PEERS)
    parser.add_argument("--bits", nargs="+", choices=list(BITS), default=list(BITS))
    parser.add_argument("--threads", type=int, default=2, help="threads of every runtime (default 2)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--num-eval", type=int, default=None, help="CIFAR: evaluate on a subset (quick check)")
    parser.add_argument("--no-speed", action="store_true", help="accuracy only")
    parser.add_argument("--append", action="store_true",
                        help="keep the rows of the last run (a row measured again replaces its old one)")
    parser.add_argument("--resume", action="store_true",
                        help="with --append: measure only the rows the last run does not have")
    parser.add_argument("--redo", nargs="+", default=[], metavar="PEER",
                        help="with --resume: measure these peers again (`float`: the float baselines)")
    parser.add_argument("--debug", action="store_true", help="print the traceback of a peer that fails")
    args = parser.parse_args(argv)
    if args.resume and not args.append:
        parser.error("--resume continues the last run: pass --append too")
    torch.set_num_threads(args.threads)
    root = assets_dir(args.assets)
    results: Dict[str, Any] = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.exists() else {}
    if not args.append:
        results = {"models": {k: v for k, v in results.get("models", {}).items() if k not in args.models}}
    results.setdefault("models", {})
    command = ("python benchmarks/peers.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    # the file's machine is that of the rows that carry none (its first run's); appended rows from
    # another machine carry theirs and are marked in the table
    if not args.append:
        results.update(machine=machine(), isa=cpu_info().isa, versions=versions())
    results.setdefault("machine", machine())
    results.setdefault("isa", cpu_info().isa)
    results.setdefault("versions", versions())
    results.update(threads=args.threads, repeats=args.repeats, warmup=args.warmup, date=time.strftime("%Y-%m-%d"),
                   commands=(results.get("commands", []) if args.append else []) + [command])
    here = machine()

    def save(row: Dict[str, Any]) -> None:
        if here != results["machine"]:
            row.update(machine=here, isa=cpu_info().isa)
        rows = results["models"].setdefault(row["model"], {"rows": []})["rows"]
        rows[:] = [r for r in rows if _key(r) != _key(row)] + [row]
        RESULTS_JSON.parent.mkdir(exist_ok=True)
        RESULTS_JSON.write_text(json.dumps(results, indent=1, default=str) + "\n")
        write_markdown(results)

    with tempfile.TemporaryDirectory() as tmp:
        for key in args.models:
            if not args.append:
                results["models"].pop(key, None)
            done = {_key(r) for r in results["models"].get(key, {}).get("rows", [])
                    if r["peer"] not in args.redo} if args.resume else set()
            bench = build(key, root, Path(tmp), args)
            log(f"[{key}] {bench.num_calib()} calibration images"
                + (f", {sum(len(y) for _, y in bench.evals)} evaluation images" if bench.evals else ""))
            bits = [SPEED_BITS] if bench.evals is None else args.bits
            if bench.evals:
                entry = results["models"].setdefault(key, {"rows": []})
                n = sum(len(y) for _, y in bench.evals)
                if entry.get("num_eval", n) != n:
                    raise SystemExit(f"[{key}] the rows already there were scored on {entry['num_eval']} images, "
                                     f"this run on {n}: use the same --num-eval, or drop --append")
                entry["num_eval"] = n
            run_model(bench, args.peers, bits, args, save, done)
    log(f"wrote {RESULTS_JSON} and {HERE / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
