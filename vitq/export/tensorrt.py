"""TensorRT as a GPU runtime for vitq's models: the QDQ ONNX export built with explicit quantization.

TensorRT reads QuantizeLinear/DequantizeLinear pairs as explicit int8 quantization and fuses them
into int8 kernels. It accepts only **symmetric** int8 quantization (zero point 0, signed codes),
so a plan for TensorRT needs symmetric activations and weights (a recipe with
``activations: {symmetric: true}``, ``weights: {symmetric: true}``) exported in the S8S8 format;
:func:`check_tensorrt_ready` says what stands in the way before anything is built. The float
remainder (LayerNorm, softmax, GELU) runs in FP16 where ``fp16`` is set.

Needs an NVIDIA GPU, CUDA PyTorch and the ``tensorrt`` package (``pip install tensorrt``).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from ..errors import VitqError
from .runtime import read_metadata

Pathish = Union[str, Path]
INSTALL_HINT = "pip install tensorrt (and a CUDA build of torch on a machine with an NVIDIA GPU)"


def _tensorrt():
    try:
        import tensorrt
    except ImportError as err:
        raise VitqError(f"the TensorRT runtime needs the 'tensorrt' package, which is not installed ({err}); "
                        f"{INSTALL_HINT}") from None
    if not torch.cuda.is_available():
        raise VitqError("TensorRT runs on an NVIDIA GPU and torch sees none (torch.cuda.is_available() is False)")
    return tensorrt


def check_tensorrt_ready(onnx_path: Pathish) -> List[str]:
    """What in an ONNX file TensorRT's explicit quantization cannot take (empty: nothing).

    TensorRT takes int8 QuantizeLinear/DequantizeLinear with zero point 0 only: uint8 codes or a
    non-zero zero point (vitq's asymmetric activations, the U8S8/U8U8 formats) are refused.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute:
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    problems = []
    unsigned = nonzero = 0
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3:
            continue
        zero = consts.get(node.input[2])
        if zero is None:
            continue
        if zero.dtype == np.uint8:
            unsigned += 1
        elif np.any(zero != 0):
            nonzero += 1
    if unsigned:
        problems.append(f"{unsigned} quantize/dequantize nodes use uint8 codes: export with --int-format s8s8")
    if nonzero:
        problems.append(f"{nonzero} quantize/dequantize nodes have a non-zero zero point (asymmetric quantization): "
                        "quantize with a recipe whose weights and activations are symmetric")
    return problems


class TensorRTModel:
    """An ONNX file (vitq's QDQ export, or a float one) built into a TensorRT engine.

    Callable like the PyTorch model on a float tensor ``[B, 3, H, W]`` (batch up to ``max_batch``);
    returns the logits as a float tensor on the CPU.

    Args:
        path: the ``.onnx`` file.
        fp16: let TensorRT run the float layers in FP16 (the usual deployment setting).
        max_batch: the largest batch of the engine's optimization profile.
        opt_batch: the batch TensorRT tunes its kernels for.
    """

    runtime = "TensorRT"

    def __init__(self, path: Pathish, *, fp16: bool = True, max_batch: int = 32, opt_batch: Optional[int] = None,
                 workspace_gib: float = 4.0) -> None:
        trt = _tensorrt()
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise VitqError(f"ONNX file {self.path} does not exist")
        self.meta = read_metadata(self.path)
        if self.meta.get("quantized"):
            problems = check_tensorrt_ready(self.path)
            if problems:
                raise VitqError(f"TensorRT cannot take {self.path.name} as exported: " + "; ".join(problems))
        logger = trt.Logger(trt.Logger.ERROR)
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(self.path.read_bytes()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise VitqError(f"TensorRT cannot parse {self.path.name}: {errors[:400]}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
        if fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        if self.meta.get("quantized") and hasattr(trt.BuilderFlag, "INT8"):
            config.set_flag(trt.BuilderFlag.INT8)  # explicit Q/DQ networks; a no-op where TensorRT no longer needs it
        self.input_name = network.get_input(0).name
        shape = tuple(network.get_input(0).shape)[1:]
        profile = builder.create_optimization_profile()
        opt = opt_batch or max_batch
        profile.set_shape(self.input_name, (1, *shape), (opt, *shape), (max_batch, *shape))
        config.add_optimization_profile(profile)
        t0 = time.perf_counter()
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise VitqError(f"TensorRT could not build an engine from {self.path.name}")
        self.build_seconds = time.perf_counter() - t0
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
        self.context = self.engine.create_execution_context()
        self.output_name = next(self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)
                                if self.engine.get_tensor_mode(self.engine.get_tensor_name(i)) == trt.TensorIOMode.OUTPUT)
        self.max_batch = max_batch
        self.device = torch.device("cuda")

    def run_cuda(self, images: torch.Tensor) -> torch.Tensor:
        """Run on a CUDA float tensor; returns a CUDA tensor (no host copies: for timing)."""
        if images.shape[0] > self.max_batch:
            raise VitqError(f"batch {images.shape[0]} is larger than the engine's {self.max_batch}")
        images = images.contiguous()
        self.context.set_input_shape(self.input_name, tuple(images.shape))
        out_shape = tuple(self.context.get_tensor_shape(self.output_name))
        out = torch.empty(out_shape, dtype=torch.float32, device=self.device)
        self.context.set_tensor_address(self.input_name, images.data_ptr())
        self.context.set_tensor_address(self.output_name, out.data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise VitqError("TensorRT failed to run the engine")
        return out

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        outs = [self.run_cuda(chunk.to(self.device, torch.float32)) for chunk in images.split(self.max_batch)]
        torch.cuda.synchronize()
        return torch.cat(outs).float().cpu()


def bench_tensorrt(int8_onnx: Pathish, fp32_onnx: Pathish, *, batch_sizes: Sequence[int] = (1, 32),
                   repeats: int = 50, warmup: int = 10, reference: Optional[torch.nn.Module] = None,
                   sample: Optional[torch.Tensor] = None) -> Dict[str, Any]:
    """Time vitq's int8 engine against TensorRT FP16 (the float ONNX built with FP16), and check the
    int8 engine's logits against ``reference`` (the simulated model) on ``sample``."""
    engines = {"trt_int8": TensorRTModel(int8_onnx, max_batch=max(batch_sizes)),
               "trt_fp16": TensorRTModel(fp32_onnx, max_batch=max(batch_sizes))}
    meta = engines["trt_int8"].meta
    input_size = tuple((meta.get("data_config") or {}).get("input_size", (3, 224, 224)))
    out: Dict[str, Any] = {"gpu": torch.cuda.get_device_name(), "timings": {},
                           "build_seconds": {k: round(e.build_seconds, 1) for k, e in engines.items()}}
    for batch in batch_sizes:
        x = torch.randn(batch, *input_size, generator=torch.Generator().manual_seed(batch)).cuda()
        for name, engine in engines.items():
            for _ in range(warmup):
                engine.run_cuda(x)
            torch.cuda.synchronize()
            times = []
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                engine.run_cuda(x)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            median = float(np.median(times))
            out["timings"].setdefault(name, {})[str(batch)] = {"median_ms": round(median, 4),
                                                                "images_per_s": round(batch / median * 1000, 1)}
    out["speedups"] = {str(b): round(out["timings"]["trt_fp16"][str(b)]["median_ms"]
                                     / out["timings"]["trt_int8"][str(b)]["median_ms"], 3) for b in batch_sizes}
    if reference is not None:
        sample = sample if sample is not None else torch.randn(8, *input_size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ref = reference.eval().cpu()(sample)
        got = engines["trt_int8"](sample)
        out["verification"] = {"max_abs_diff": float((got - ref).abs().max()), "max_abs_logit": float(ref.abs().max()),
                               "agreement": round(100.0 * (got.argmax(1) == ref.argmax(1)).double().mean().item(), 2)}
    return out
