"""``vitq export``, ``vitq eval FILE.onnx`` and ``vitq bench-speed`` end to end on a tiny ViT."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from vitq.cli import main  # noqa: E402

from test_cli import argparse_error, run_error  # noqa: E402


def test_export_then_eval_onnx(export_run, image_folder, tmp_path, capsys):
    onnx_path = tmp_path / "out" / "model.int8.onnx"
    rc = main(["export", str(export_run), "--format", "onnx", "--out", str(onnx_path), "--int-format", "u8s8"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert onnx_path.is_file()
    report = json.loads(onnx_path.with_suffix(".export.json").read_text())
    assert report["int_format"]["name"] == "u8s8"  # W4 plan: exact on any CPU
    assert report["plan"]["w_bits"] == 4
    assert onnx_path.with_suffix(".export.md").is_file()
    assert "integer matrix products: 38 of 38 (float: none)" in captured.out

    # the ONNX file alone: the evaluation images exclude the plan's calibration images, as `vitq eval --plan` does
    metrics_path = tmp_path / "onnx_metrics.json"
    rc = main(["eval", str(onnx_path), "--eval", str(image_folder), "--out", str(metrics_path), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    metrics = json.loads(metrics_path.read_text())
    assert metrics["num_eval"] == 8
    assert 0 <= metrics["onnx_top1"] <= 100 and metrics["int_format"] == "u8s8"

    # with --plan: the simulated PyTorch model on the same images, and the difference
    rc = main(["eval", str(onnx_path), "--eval", str(image_folder), "--plan", str(export_run), "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0
    metrics = json.loads(out.strip().splitlines()[-1])
    assert abs(metrics["top1_diff"]) <= 100 / 8 and metrics["agreement"] >= 75.0
    assert metrics["onnx_top1"] == pytest.approx(metrics["reference_top1"] + metrics["top1_diff"])


def test_export_from_plan_json_with_explicit_model(export_run, checkpoint, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    rc = main(["export", str(export_run / "plan.json"), "--model", str(checkpoint), "--out", str(out), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert out.is_file()
    err = run_error(capsys, ["export", str(export_run), "--out", str(out)])
    assert "already exists" in err and "--overwrite" in err
    assert main(["export", str(export_run), "--out", str(out), "--overwrite", "--quiet"]) == 0


def test_export_bad_inputs(export_run, checkpoint, tmp_path, capsys):
    out = str(tmp_path / "m.onnx")
    err = run_error(capsys, ["export", str(tmp_path / "nowhere"), "--out", out])
    assert "does not exist" in err and "vitq quantize" in err
    err = run_error(capsys, ["export", str(checkpoint), "--out", out])
    assert "not a run folder nor a plan.json" in err
    err = run_error(capsys, ["export", str(tmp_path), "--out", out])
    assert "plan.json does not exist" in err
    err = run_error(capsys, ["export", str(export_run), "--out", str(tmp_path / "m.pth")])
    assert "--out must end in .onnx" in err
    err = argparse_error(capsys, ["export", str(export_run), "--format", "tflite", "--out", out])
    assert "invalid choice: 'tflite'" in err
    err = argparse_error(capsys, ["export", str(export_run), "--int-format", "i4", "--out", out])
    assert "invalid choice: 'i4'" in err
    err = run_error(capsys, ["export", str(export_run), "--model", "test_vit", "--random-weights",
                             "--model-kwargs", '{"img_size": 64}', "--out", out])
    assert "does not fit this model" in err or "another architecture" in err


def test_export_plan_whose_model_moved(export_run, tmp_path, capsys):
    plan = json.loads((export_run / "plan.json").read_text())
    plan["meta"]["model"]["name"] = str(tmp_path / "moved" / "tiny.pth")
    (export_run / "plan.json").write_text(json.dumps(plan))
    err = run_error(capsys, ["export", str(export_run), "--out", str(tmp_path / "m.onnx")])
    assert "is not found from here: pass --model PATH" in err


def test_eval_onnx_bad_inputs(export_run, checkpoint, image_folder, tmp_path, capsys):
    fake = tmp_path / "fake.onnx"
    fake.write_bytes(b"\x00\x01 definitely not protobuf")
    err = run_error(capsys, ["eval", str(fake), "--eval", str(image_folder)])
    assert "is not an ONNX model" in err
    err = run_error(capsys, ["eval", str(tmp_path / "missing.onnx"), "--eval", str(image_folder)])
    assert "does not exist" in err
    onnx_path = tmp_path / "m.onnx"
    assert main(["export", str(export_run), "--out", str(onnx_path), "--quiet"]) == 0
    capsys.readouterr()
    err = run_error(capsys, ["eval", str(onnx_path)])
    assert "needs --eval DIR" in err
    err = run_error(capsys, ["eval", str(onnx_path), "--eval", str(image_folder), "--protocol", "p2"])
    assert "fixed at export" in err
    err = run_error(capsys, ["eval", str(checkpoint), "--eval", str(image_folder)])
    assert "needs --plan" in err


def test_eval_onnx_without_vitq_metadata(image_folder, tmp_path, capsys):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 32, 32])])
    path = tmp_path / "other.onnx"
    onnx.save(helper.make_model(graph), str(path))
    err = run_error(capsys, ["eval", str(path), "--eval", str(image_folder)])
    assert "has no vitq metadata" in err and "vitq export" in err


def test_bench_speed_tiny(checkpoint, export_run, tmp_path, capsys):
    out = tmp_path / "speed.json"
    keep = tmp_path / "onnx"
    from vitq.export.speed import available_backends

    # OpenVINO's backends are tested in a child process (tests/export/test_openvino.py): never load it here
    backends = [b for b in available_backends() if not b.startswith("ov_")]
    only = ["--backends", *backends] if len(backends) < len(available_backends()) else []
    rc = main(["bench-speed", str(checkpoint), "--plan", str(export_run / "plan.json"), "--batch-sizes", "1", "2",
               "--repeats", "2", "--warmup", "1", "--threads", "1", "--profile", "--keep", str(keep),
               "--out", str(out), "--quiet", *only])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    result = json.loads(out.read_text())
    assert set(result["timings"]) == set(backends) >= {"pytorch_fp32", "pytorch_simulated", "ort_fp32", "ort_int8"}
    for per_batch in result["timings"].values():
        assert set(per_batch) == {"1", "2"} and per_batch["2"]["median_ms"] > 0
    assert result["speedups"]["2"]["int8_vs_ort_fp32"] > 0
    assert result["sizes"]["onnx_bytes"] < result["sizes"]["fp32_onnx_bytes"]
    assert result["profile"]["ort_int8"]["ops"][0]["ms"] > 0
    assert {p.name for p in keep.iterdir()} >= {"model.fp32.onnx", "model.int8.onnx"}
    assert "ONNX Runtime int8" in captured.out and "int8 speed-up vs ORT FP32" in captured.out


def test_bench_speed_random_weights_without_plan(tmp_path, capsys):
    out = tmp_path / "speed.json"
    rc = main(["bench-speed", "test_vit", "--random-weights", "--model-kwargs", '{"img_size": 32, "patch_size": 8}',
               "--batch-sizes", "1", "--repeats", "1", "--warmup", "1", "--threads", "1",
               "--backends", "ort_fp32", "ort_int8", "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    result = json.loads(out.read_text())
    assert set(result["timings"]) == {"ort_fp32", "ort_int8"}
    assert "random images (speed only" in result["plan"]


def test_bench_speed_bad_inputs(checkpoint, export_run, image_folder, tmp_path, capsys):
    err = run_error(capsys, ["bench-speed", str(checkpoint), "--plan", str(export_run), "--calib", str(image_folder)])
    assert "pass one of them" in err
    err = run_error(capsys, ["bench-speed", "test_vit", "--random-weights", "--plan", str(export_run)])
    assert "the plan was made for" in err
    err = argparse_error(capsys, ["bench-speed", str(checkpoint), "--backends", "tensorrt"])
    assert "invalid choice" in err
