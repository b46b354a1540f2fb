"""TensorRT with explicit quantization: what a QDQ file must be for TensorRT (checked on any machine),
and the engine against the simulated model (only with the tensorrt package and an NVIDIA GPU)."""
from __future__ import annotations

import pytest
import timm
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

import vitq  # noqa: E402
from vitq.export import export_onnx  # noqa: E402
from vitq.export.tensorrt import check_tensorrt_ready  # noqa: E402

SYMMETRIC = {"name": "symmetric", "weights": {"observer": "minmax", "symmetric": True},
             "activations": {"observer": "minmax", "symmetric": True}, "stages": ["calibrate"]}


def _vit():
    torch.manual_seed(0)
    return timm.create_model("test_vit", img_size=32, patch_size=8)


def _export(tmp_path, recipe, protocol, int_format):
    q = vitq.quantize(_vit(), recipe, [torch.randn(4, 3, 32, 32)], protocol=protocol, progress=False).model
    path = tmp_path / f"{protocol}-{int_format}.onnx"
    export_onnx(q, path, int_format=int_format, verify=False)
    return q, path


def test_tensorrt_needs_signed_symmetric_quantization(tmp_path):
    _, asym = _export(tmp_path, "minmax", "p1", "u8u8")
    problems = check_tensorrt_ready(asym)
    assert any("uint8" in p and "s8s8" in p for p in problems)
    _, signed_asym = _export(tmp_path, "minmax", "p1", "s8s8")
    assert any("non-zero zero point" in p for p in check_tensorrt_ready(signed_asym))
    # symmetric weights and activations, probabilities in float (p4): every zero point is 0
    _, ready = _export(tmp_path, SYMMETRIC, "p4", "s8s8")
    assert check_tensorrt_ready(ready) == []


def test_tensorrt_engine_matches_simulated_model(tmp_path):
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs an NVIDIA GPU")
    from vitq.export.tensorrt import TensorRTModel, bench_tensorrt

    q, path = _export(tmp_path, SYMMETRIC, "p4", "s8s8")
    fp = tmp_path / "fp.onnx"
    export_onnx(_vit(), fp, verify=False)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = q(x)
    got = TensorRTModel(path, fp16=False, max_batch=4)(x)
    assert (got - ref).abs().max() < 0.1 * ref.abs().max()
    result = bench_tensorrt(path, fp, batch_sizes=(1, 4), repeats=3, warmup=1, reference=q, sample=x)
    assert result["speedups"]["4"] > 0 and result["verification"]["agreement"] >= 50
