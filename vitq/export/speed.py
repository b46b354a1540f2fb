"""Latency and throughput: PyTorch float, PyTorch simulated quantization, ONNX Runtime float and
ONNX Runtime integer, on the same inputs, with the files' sizes."""
from __future__ import annotations

import importlib.util
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from .. import __version__
from ..errors import VitqError
from ..models.loading import data_config_of
from ._deps import require
from .onnx_export import export_onnx
from .runtime import OnnxModel, profile_ops

BACKENDS = {
    "pytorch_fp32": "PyTorch FP32",
    "pytorch_simulated": "PyTorch simulated (fake-quant)",
    "ort_fp32": "ONNX Runtime FP32",
    "ort_int8": "ONNX Runtime int8",
    "ov_fp32": "OpenVINO FP32",
    "ov_int8": "OpenVINO int8",
}
OPENVINO_BACKENDS = ("ov_fp32", "ov_int8")


def available_backends() -> List[str]:
    """Every backend whose runtime is installed (OpenVINO's need the optional ``openvino`` package)."""
    if importlib.util.find_spec("openvino") is None:
        return [b for b in BACKENDS if b not in OPENVINO_BACKENDS]
    return list(BACKENDS)


def machine() -> Dict[str, Any]:
    """The CPU, core count and library versions a timing was taken with."""
    ort = require("onnxruntime")
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "onnxruntime": ort.__version__,
           "python": platform.python_version(), "vitq": __version__}
    try:
        import openvino
        out["openvino"] = openvino.__version__.split("-")[0]
    except ImportError:
        pass
    return out


def _time(fn: Callable[[], Any], warmup: int, repeats: int) -> List[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def bench_speed(
    float_model: nn.Module,
    quantized_model: nn.Module,
    *,
    data_config: Optional[Dict[str, Any]] = None,
    batch_sizes: Sequence[int] = (1, 32),
    repeats: int = 10,
    warmup: int = 2,
    threads: Optional[int] = None,
    int_format: Optional[str] = "auto",
    workdir: Optional[str | Path] = None,
    backends: Optional[Sequence[str]] = None,
    profile: bool = False,
    meta: Optional[Dict[str, Any]] = None,
    progress: bool = True,
    ov_precision: Optional[str] = None,
) -> Dict[str, Any]:
    """Time the float and the quantized model in PyTorch and in ONNX Runtime.

    Each backend runs ``warmup`` times, then ``repeats`` timed runs per batch size; the result
    gives the median (and minimum) milliseconds per batch and images per second. The ONNX files
    are exported into ``workdir`` (a temporary folder by default).

    Args:
        float_model, quantized_model: the float model and its quantized copy (converted).
        batch_sizes: batch 1 measures latency, a larger batch throughput.
        threads: PyTorch and ONNX Runtime intra-op threads (default: each library's own).
        int_format: see :func:`vitq.export.export_onnx`.
        backends: a subset of ``pytorch_fp32``, ``pytorch_simulated``, ``ort_fp32``, ``ort_int8``,
            ``ov_fp32``, ``ov_int8`` (default: all whose runtime is installed). The OpenVINO backends
            run the same ONNX files, converted by OpenVINO; ``ov_int8`` is checked against the
            simulated model like ONNX Runtime's.
        profile: add ONNX Runtime's per-op-type time of both ONNX models at the largest batch.
        ov_precision: OpenVINO's precision for what stays float (``f32``, ``bf16``, ``f16``; default
            OpenVINO's own, bf16 on a CPU with native bf16): see :class:`vitq.export.openvino.OpenVinoModel`.
            The result's ``openvino.precision`` records what ran.

    The result's ``runtime_choice`` names the faster int8 runtime at the largest batch when both
    ran, with their accuracy against the simulated model.
    """
    backends = list(backends) if backends is not None else available_backends()
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        raise VitqError(f"unknown backend(s) {unknown}; choose from {', '.join(BACKENDS)}")
    if repeats < 1 or warmup < 0 or not batch_sizes or min(batch_sizes) < 1:
        raise VitqError("repeats must be ≥ 1, warm-up ≥ 0 and batch sizes ≥ 1")
    data_config = dict(data_config or data_config_of(float_model))
    input_size = tuple(data_config["input_size"])
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory()
        workdir = tmp.name
    workdir = Path(workdir)
    try:
        say = print if progress else (lambda *a, **k: None)
        say(f"exporting ONNX models to {workdir} ...", flush=True)
        fp_report = export_onnx(float_model, workdir / "model.fp32.onnx", data_config=data_config, meta=meta,
                                verify=False)
        q_report = export_onnx(quantized_model, workdir / "model.int8.onnx", int_format=int_format,
                               data_config=data_config, meta=meta)
        runners: Dict[str, Callable[[torch.Tensor], Any]] = {}
        if "pytorch_fp32" in backends:
            runners["pytorch_fp32"] = float_model.eval().cpu()
        if "pytorch_simulated" in backends:
            runners["pytorch_simulated"] = quantized_model.eval().cpu()
        if "ort_fp32" in backends:
            runners["ort_fp32"] = OnnxModel(fp_report.path, threads=threads)
        if "ort_int8" in backends:
            runners["ort_int8"] = OnnxModel(q_report.path, threads=threads)
        if set(OPENVINO_BACKENDS) & set(backends):
            from .openvino import OpenVinoModel
            from .onnx_export import _verify_against

            if "ov_fp32" in backends:
                runners["ov_fp32"] = OpenVinoModel(fp_report.path, threads=threads, precision=ov_precision)
            if "ov_int8" in backends:
                runners["ov_int8"] = OpenVinoModel(q_report.path, threads=threads, precision=ov_precision)
                ov_gemms = runners["ov_int8"].gemms()
                ov_check = _verify_against(quantized_model.eval(), runners["ov_int8"], None, input_size)
        timings: Dict[str, Dict[str, Any]] = {name: {} for name in runners}
        for batch in batch_sizes:
            x = torch.randn(batch, *input_size, generator=torch.Generator().manual_seed(batch))
            xn = x.numpy()
            for name, runner in runners.items():
                if hasattr(runner, "run"):
                    fn = lambda r=runner: r.run(xn)  # noqa: E731
                else:
                    def fn(m=runner):
                        with torch.inference_mode():
                            m(x)
                seconds = _time(fn, warmup, repeats)
                median = statistics.median(seconds)
                timings[name][str(batch)] = {
                    "median_ms": round(1000 * median, 3), "min_ms": round(1000 * min(seconds), 3),
                    "images_per_s": round(batch / median, 2), "repeats": repeats,
                }
                say(f"  batch {batch:3d}  {BACKENDS[name]:32s} {1000 * median:9.1f} ms  "
                    f"{batch / median:8.1f} img/s", flush=True)
        speedups = {}
        for batch in map(str, batch_sizes):
            row = {}
            if {"ort_fp32", "ort_int8"} <= set(timings):
                row["int8_vs_ort_fp32"] = round(timings["ort_fp32"][batch]["median_ms"]
                                                / timings["ort_int8"][batch]["median_ms"], 3)
            if {"pytorch_fp32", "ort_int8"} <= set(timings):
                row["int8_vs_pytorch_fp32"] = round(timings["pytorch_fp32"][batch]["median_ms"]
                                                    / timings["ort_int8"][batch]["median_ms"], 3)
            if {"ov_fp32", "ov_int8"} <= set(timings):
                row["ov_int8_vs_ov_fp32"] = round(timings["ov_fp32"][batch]["median_ms"]
                                                  / timings["ov_int8"][batch]["median_ms"], 3)
            if {"ort_fp32", "ov_int8"} <= set(timings):
                row["ov_int8_vs_ort_fp32"] = round(timings["ort_fp32"][batch]["median_ms"]
                                                   / timings["ov_int8"][batch]["median_ms"], 3)
            speedups[batch] = row
        result: Dict[str, Any] = {
            "machine": machine(),
            "threads": threads or "library default",
            "torch_threads": torch.get_num_threads(),
            "input_size": list(input_size),
            "batch_sizes": list(batch_sizes),
            "warmup": warmup,
            "repeats": repeats,
            "int_format": q_report.to_dict()["int_format"],
            "timings": timings,
            "speedups": speedups,
            "sizes": {"fp32_onnx_bytes": fp_report.sizes["onnx_bytes"], **q_report.sizes},
            "export": {"summary": q_report.summary(), "warnings": q_report.warnings,
                       "verification": q_report.verification,
                       "float_gemms": [lay["name"] for lay in q_report.layers if lay not in q_report.integer_layers]},
        }
        if "ov_int8" in runners:
            result["openvino"] = {"gemms": ov_gemms, "verification": ov_check}
        for name in ("ov_fp32", "ov_int8"):
            if name in runners:
                result.setdefault("openvino", {}).setdefault("precision", {})[name] = runners[name].inference_precision
        if {"ort_int8", "ov_int8"} <= set(timings):
            result["runtime_choice"] = runtime_choice(timings, q_report.verification, ov_check, max(batch_sizes))
        if profile:
            batch = max(batch_sizes)
            x = torch.randn(batch, *input_size, generator=torch.Generator().manual_seed(batch)).numpy()
            say(f"profiling ONNX Runtime at batch {batch} ...", flush=True)
            result["profile"] = {
                "ort_int8": profile_ops(q_report.path, x, runs=max(1, min(repeats, 3)), threads=threads),
                "ort_fp32": profile_ops(fp_report.path, x, runs=max(1, min(repeats, 3)), threads=threads),
            }
        return result
    finally:
        torch.set_num_threads(previous_threads)
        if tmp is not None:
            tmp.cleanup()


def runtime_choice(timings: Dict[str, Any], ort_check: Dict[str, Any], ov_check: Dict[str, Any], batch: int
                   ) -> Dict[str, Any]:
    """The faster int8 runtime at ``batch`` among those whose outputs agree with the simulated model.

    A runtime is "accurate" when its top-1 agreement with the simulated model is at least the
    other's (both checked on the same images); among accurate ones the faster wins.
    """
    ms = {"onnxruntime": timings["ort_int8"][str(batch)]["median_ms"],
          "openvino": timings["ov_int8"][str(batch)]["median_ms"]}
    agree = {"onnxruntime": ort_check.get("agreement", 0.0), "openvino": ov_check.get("agreement", 0.0)}
    best_agree = max(agree.values())
    accurate = [r for r in ms if agree[r] >= best_agree]
    choice = min(accurate, key=ms.get)
    other = "openvino" if choice == "onnxruntime" else "onnxruntime"
    why = (f"{choice} int8 {ms[choice]:.1f} ms against {other} {ms[other]:.1f} ms at batch {batch}, "
           f"top-1 agreement with the simulated model {agree[choice]:.1f} % against {agree[other]:.1f} %")
    if choice not in (r for r in ms if ms[r] == min(ms.values())):
        why += f" ({other} is faster but agrees less with the simulated model)"
    return {"runtime": choice, "batch": batch, "ms": ms, "agreement": agree, "reason": why}


def speed_table(result: Dict[str, Any]) -> str:
    """A Markdown table of :func:`bench_speed`'s result."""
    batches = [str(b) for b in result["batch_sizes"]]
    head = ["backend"] + [f"batch {b}: ms (img/s)" for b in batches]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * len(batches)]
    precision = result.get("openvino", {}).get("precision", {})
    for name, per_batch in result["timings"].items():
        cells = [f"{per_batch[b]['median_ms']:.1f} ({per_batch[b]['images_per_s']:.1f})" for b in batches]
        label = BACKENDS[name]
        if precision.get(name, "f32") != "f32":  # OpenVINO's default on a CPU with native bf16
            label += f" (float parts in {precision[name]})"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for key, label in (("int8_vs_ort_fp32", "ORT int8 speed-up vs ORT FP32"),
                       ("int8_vs_pytorch_fp32", "ORT int8 speed-up vs PyTorch FP32"),
                       ("ov_int8_vs_ov_fp32", "OpenVINO int8 speed-up vs OpenVINO FP32"),
                       ("ov_int8_vs_ort_fp32", "OpenVINO int8 speed-up vs ORT FP32")):
        if all(key in result["speedups"][b] for b in batches):
            lines.append(f"| {label} | " + " | ".join(f"{result['speedups'][b][key]:.2f}×" for b in batches) + " |")
    return "\n".join(lines)


def size_table(result: Dict[str, Any]) -> str:
    s = result["sizes"]
    fp = s["fp32_weight_bytes"]
    rows = [("float32 weights", fp), ("FP32 .onnx", s["fp32_onnx_bytes"]), ("int8 .onnx", s["onnx_bytes"]),
            (f"weights packed at {'/'.join(map(str, s.get('weight_bits', [])))} bits", s.get("packed_weight_bytes"))]
    lines = ["| | MB | × float |", "|---|---:|---:|"]
    lines += [f"| {label} | {v / 1e6:.2f} | {v / fp:.3f} |" for label, v in rows if v is not None]
    return "\n".join(lines)


def profile_table(profile: Dict[str, Any], top: int = 12) -> str:
    lines = ["| op | ms | % | nodes | runs in |", "|---|---:|---:|---:|---|"]
    for row in profile["ops"][:top]:
        lines.append(f"| {row['op']} | {row['ms']:.1f} | {row['percent']:.1f} | {row['nodes']} | {row['precision']} |")
    return "\n".join(lines)
