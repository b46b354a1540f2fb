"""OpenVINO as a runtime: ``vitq export --format openvino``, ``vitq eval MODEL.xml`` and the
OpenVINO backends of ``vitq bench-speed``, on a tiny ViT (skipped without the openvino package).

These cases run in a child process (``tests/export/test_openvino.py``): with OpenVINO loaded, a
later ``fork`` in the same process (``subprocess.run`` in other tests) crashed the test run."""
from __future__ import annotations

import json
import os

import pytest
import timm
import torch

if os.environ.get("VITQ_OPENVINO_CHILD") != "1":  # collected in the main run (e.g. --doctest-modules): not here
    pytest.skip("OpenVINO's cases run in a child process (tests/export/test_openvino.py)", allow_module_level=True)
pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("openvino")

import vitq  # noqa: E402
from vitq.cli import main  # noqa: E402
from vitq.errors import VitqError  # noqa: E402
from vitq.export.openvino import OpenVinoModel, export_openvino  # noqa: E402

from test_cli import run_error  # noqa: E402


def test_export_openvino_then_eval(export_run, image_folder, tmp_path, capsys):
    xml = tmp_path / "out" / "model.xml"
    rc = main(["export", str(export_run), "--format", "openvino", "--out", str(xml)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert xml.is_file() and xml.with_suffix(".bin").is_file()
    report = json.loads(xml.with_suffix(".export.json").read_text())
    assert report["runtime"] == "openvino" and report["plan"]["w_bits"] == 4
    ov = report["openvino"]
    # every linear layer of the tiny ViT (patch embedding, qkv, proj, fc1, fc2 per block, head) keeps integer
    # weights; the default recipe's asymmetric weights may run as OpenVINO's weight-only compression
    assert ov["integer"] + ov["weight_only"] >= 26
    if ov["weight_only"]:
        assert any("weight-only compression" in w for w in report["warnings"])
    assert "OpenVINO vs PyTorch" in captured.out
    assert report["verification"]["max_abs_diff"] < 0.2 * report["verification"]["max_abs_logit"] + 1e-3

    rc = main(["eval", str(xml), "--eval", str(image_folder), "--plan", str(export_run), "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0
    metrics = json.loads(out.strip().splitlines()[-1])
    assert metrics["runtime"] == "openvino" and "onnx_top1" not in metrics
    assert metrics["openvino_top1"] == pytest.approx(metrics["reference_top1"] + metrics["top1_diff"])
    assert metrics["agreement"] >= 75.0 and metrics["num_eval"] == 8
    assert "OpenVINO top-1" in out


def test_export_openvino_bad_inputs(export_run, tmp_path, capsys):
    err = run_error(capsys, ["export", str(export_run), "--format", "openvino", "--out", str(tmp_path / "m.onnx")])
    assert "--out must end in .xml" in err
    err = run_error(capsys, ["eval", str(tmp_path / "missing.xml"), "--eval", str(tmp_path)])
    assert "does not exist" in err
    bad = tmp_path / "bad.xml"
    bad.write_text("<net>not a model")
    err = run_error(capsys, ["eval", str(bad), "--eval", str(tmp_path)])
    assert "OpenVINO cannot read" in err


def test_library_export_matches_simulated_model(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("test_vit", img_size=32, patch_size=8)
    q = vitq.quantize(model, "minmax", [torch.randn(4, 3, 32, 32)], w_bits=8, a_bits=8, progress=False).model
    report = export_openvino(q, tmp_path / "m.xml", int_format="u8u8")
    assert report.extra["openvino"]["integer"] + report.extra["openvino"]["weight_only"] > 0
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = q(x)
    got = OpenVinoModel(tmp_path / "m.xml", threads=1)(x)
    assert got.shape == ref.shape
    assert (got - ref).abs().max() < 0.1 * ref.abs().max()
    with pytest.raises(VitqError, match=r"\.xml"):
        export_openvino(q, tmp_path / "m.onnx")


def test_symmetric_weights_run_in_integer_kernels_and_zero_points_are_counted_as_weight_only(tmp_path):
    """OpenVINO computes a product in int8 only when its weights are symmetric; weights with zero
    points are stored as integers but decompressed (weight-only), and the count says which."""
    torch.manual_seed(0)
    model = timm.create_model("test_vit", img_size=32, patch_size=8)
    counts = {}
    for symmetric in (True, False):
        recipe = {"name": "t", "weights": {"observer": "minmax", "symmetric": symmetric},
                  "activations": {"observer": "minmax", "symmetric": False}, "stages": ["calibrate"]}
        q = vitq.quantize(model, recipe, [torch.randn(4, 3, 32, 32)], w_bits=8, a_bits=8, protocol="p4",
                          progress=False).model
        counts[symmetric] = export_openvino(q, tmp_path / f"m{symmetric}.xml", verify=False).extra["openvino"]
    # p4: the 26 linear layers (patch embedding, 4 per block, head); attention stays float
    assert counts[True]["integer"] == 26 and counts[True]["weight_only"] == 0
    assert counts[False]["integer"] + counts[False]["weight_only"] == 26
    assert counts[False]["folded_weights"] == counts[False]["integer"]  # 8-bit codes fold only where they fit


def test_weights_below_8_bits_fold_their_zero_points_exactly_and_run_in_integer_kernels(tmp_path):
    from vitq.export import OnnxModel, export_onnx

    torch.manual_seed(0)
    model = timm.create_model("test_vit", img_size=32, patch_size=8)
    recipe = {"name": "t", "weights": {"observer": "minmax", "symmetric": False},
              "activations": {"observer": "minmax", "symmetric": False}, "stages": ["calibrate"]}
    q = vitq.quantize(model, recipe, [torch.randn(4, 3, 32, 32)], w_bits=4, a_bits=8, protocol="p4",
                      progress=False).model
    report = export_openvino(q, tmp_path / "m.xml", verify=False)
    ov = report.extra["openvino"]
    assert ov["folded_weights"] == 26 and ov["integer"] == 26 and ov["weight_only"] == 0
    assert not any("weight-only" in w for w in report.warnings)
    # the same grid: folded and plain ONNX files give the same logits in ONNX Runtime
    folded = export_onnx(q, tmp_path / "f.onnx", verify=False, fold_weight_zero_points=True, int_format="u8s8")
    plain = export_onnx(q, tmp_path / "p.onnx", verify=False, int_format="u8s8")
    assert sum("zero points folded" in p.note for p in folded.points) == 26
    assert not any("zero points folded" in p.note for p in plain.points)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    a, b = OnnxModel(tmp_path / "f.onnx", threads=1)(x), OnnxModel(tmp_path / "p.onnx", threads=1)(x)
    assert (a - b).abs().max() < 1e-4


def test_openvino_precision_is_chosen_recorded_and_checked(export_run, image_folder, tmp_path, capsys):
    torch.manual_seed(0)
    model = timm.create_model("test_vit", img_size=32, patch_size=8)
    q = vitq.quantize(model, "minmax", [torch.randn(4, 3, 32, 32)], w_bits=8, a_bits=8, progress=False).model
    report = export_openvino(q, tmp_path / "m.xml", int_format="u8u8")
    default = OpenVinoModel(tmp_path / "m.xml", threads=1)
    assert report.extra["openvino"]["precision"] == default.inference_precision in ("f32", "bf16", "f16")
    exact = OpenVinoModel(tmp_path / "m.xml", threads=1, precision="f32")
    assert exact.inference_precision == "f32"
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = q(x)
    # (which of the two lands closer to the simulated model is not fixed: a value on a step boundary
    # rounds either way; benchmarks/peers.py measures both on real images)
    assert (exact(x) - ref).abs().max() < 0.1 * ref.abs().max()
    with pytest.raises(VitqError, match="f32, bf16, f16"):
        OpenVinoModel(tmp_path / "m.xml", precision="fp8")

    xml = tmp_path / "run.xml"
    assert main(["export", str(export_run), "--format", "openvino", "--out", str(xml), "--quiet"]) == 0
    capsys.readouterr()
    rc = main(["eval", str(xml), "--eval", str(image_folder), "--ov-precision", "f32", "--quiet"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["openvino_precision"] == "f32"
    onnx = tmp_path / "run.onnx"
    assert main(["export", str(export_run), "--out", str(onnx), "--quiet"]) == 0
    err = run_error(capsys, ["eval", str(onnx), "--eval", str(image_folder), "--ov-precision", "f32"])
    assert "--ov-precision applies to an OpenVINO model" in err


def test_bench_speed_openvino_backends(export_run, checkpoint, tmp_path, capsys):
    out = tmp_path / "speed.json"
    rc = main(["bench-speed", str(checkpoint), "--plan", str(export_run), "--batch-sizes", "2", "--repeats", "1",
               "--warmup", "1", "--threads", "1", "--backends", "ort_int8", "ov_fp32", "ov_int8",
               "--ov-precision", "f32", "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    result = json.loads(out.read_text())
    assert set(result["timings"]) == {"ort_int8", "ov_fp32", "ov_int8"}
    assert result["runtime_choice"]["runtime"] in ("onnxruntime", "openvino")
    assert result["openvino"]["gemms"]["integer"] > 0
    assert result["openvino"]["precision"] == {"ov_fp32": "f32", "ov_int8": "f32"}
    assert "OpenVINO int8" in captured.out


def test_bench_speed_default_backends_include_openvino(export_run, checkpoint, tmp_path, capsys):
    from vitq.export.speed import available_backends

    out = tmp_path / "speed.json"
    rc = main(["bench-speed", str(checkpoint), "--plan", str(export_run), "--batch-sizes", "1", "--repeats", "1",
               "--warmup", "1", "--threads", "1", "--out", str(out), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    timings = json.loads(out.read_text())["timings"]
    assert set(timings) == set(available_backends()) >= {"ov_fp32", "ov_int8", "ort_int8"}


def test_recommended_int_at_8_bits_runs_every_product_in_integer_kernels(tmp_path):
    """``recommended-int`` keeps 8-bit weights symmetric (``symmetric_min_bits: 8``), so none of its W8A8
    products falls back to OpenVINO's weight-only compression."""
    torch.manual_seed(0)
    model = timm.create_model("test_vit", img_size=32, patch_size=8)
    q = vitq.quantize(model, "recommended-int", [torch.randn(4, 3, 32, 32)], w_bits=8, a_bits=8, protocol="p4",
                      progress=False).model
    counts = export_openvino(q, tmp_path / "m.xml", verify=False).extra["openvino"]
    assert counts["integer"] == 26 and counts["weight_only"] == 0


def test_symmetric_qkv_lets_openvino_run_attention_in_integer_kernels(tmp_path):
    """``recommended-int`` puts q, k and v on signed symmetric grids (``symmetric_roles: [attn_qkv]``):
    where OpenVINO fuses each attention block (q·kᵀ, softmax, attn·v) into one kernel, that kernel
    computes in integers. With zero points on q, k and v it stays in float, and the export says why."""
    from vitq.export import cpu_info

    torch.manual_seed(0)
    model = timm.create_model("test_vit", img_size=32, patch_size=8)
    images = [torch.randn(4, 3, 32, 32)]
    sym = vitq.quantize(model, "recommended-int", images, w_bits=8, a_bits=8, protocol="p1", progress=False).model
    report = export_openvino(sym, tmp_path / "sym.xml", verify=False)
    attention = report.extra["openvino"]["attention"]
    if sum(attention.values()) == 0:
        pytest.skip("this CPU's OpenVINO does not fuse attention blocks into one kernel")
    if attention["float"] and not cpu_info().vnni:
        pytest.skip(f"this CPU (no VNNI) runs OpenVINO's fused attention in float: {attention}")
    assert attention == {"integer": 6, "float": 0}
    assert not [w for w in report.warnings if "attention" in w]

    asym_recipe = {"name": "asym", "weights": {"observer": "omse", "symmetric_min_bits": 8},
                   "activations": {"observer": "percentile_mse"}, "stages": ["calibrate"]}
    asym = vitq.quantize(model, asym_recipe, images, w_bits=8, a_bits=8, protocol="p1", progress=False).model
    report = export_openvino(asym, tmp_path / "asym.xml", verify=False)
    assert report.extra["openvino"]["attention"] == {"integer": 0, "float": 6}
    warning, = [w for w in report.warnings if "attention" in w]
    assert "18 of their q, k and v quantizers have zero points" in warning
    assert "symmetric_roles: [attn_qkv]" in warning
