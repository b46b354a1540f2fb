"""End-to-end checks on the real reference models and images (``pytest -m slow``)."""
import json

import pytest

from vitq.cli import main

pytestmark = pytest.mark.slow


def test_cifar_reference_w8a8_omse_close_to_float_and_plan_reproduces(assets, tmp_path):
    model = assets / "models" / "vit_cifar10_d6.pth"
    out = tmp_path / "run"
    rc = main(["quantize", str(model), "--recipe", "omse", "--w-bits", "8", "--a-bits", "8",
               "--calib", str(assets / "cifar10" / "train"), "--num-calib", "128",
               "--eval", str(assets / "cifar10" / "test"), "--num-eval", "500",
               "--device", "cpu", "--quiet", "--out", str(out)])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["fp_top1"] > 50  # the real trained model, not random weights
    assert abs(metrics["quant_top1"] - metrics["fp_top1"]) <= 1.5
    assert metrics["agreement"] >= 97
    again = tmp_path / "eval.json"
    rc = main(["eval", str(model), "--plan", str(out / "plan.json"), "--eval", str(assets / "cifar10" / "test"),
               "--num-eval", "500", "--device", "cpu", "--quiet", "--out", str(again)])
    assert rc == 0
    assert json.loads(again.read_text())["quant_top1"] == metrics["quant_top1"]


def test_imagenet_deit_tiny_flat_synset_folder(assets, tmp_path):
    sample = assets / "imagenet-sample"
    out = tmp_path / "run"
    rc = main(["quantize", str(assets / "models" / "deit_tiny_imagenet.pth"), "--recipe", "minmax",
               "--w-bits", "8", "--a-bits", "8", "--calib", str(sample), "--num-calib", "16",
               "--eval", str(sample), "--num-eval", "64", "--batch-size", "16",
               "--device", "cpu", "--quiet", "--out", str(out)])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_calib"] == 16 and metrics["num_eval"] == 64
    assert metrics["fp_top1"] > 60  # labels follow the ImageNet synset order
    assert metrics["agreement"] >= 85


def test_cifar_reference_cptv_from_an_omse_plan(assets, tmp_path):
    """cpt-v improves its own fitness on the real model, keeps accuracy, and its plan reproduces."""
    model, train, test = assets / "models" / "vit_cifar10_d6.pth", assets / "cifar10" / "train", assets / "cifar10" / "test"
    common = ["--calib", str(train), "--num-calib", "200", "--eval", str(test), "--num-eval", "300",
              "--device", "cpu", "--quiet"]
    assert main(["quantize", str(model), "--recipe", "omse", "--w-bits", "4", "--a-bits", "8",
                 "--out", str(tmp_path / "omse"), *common]) == 0
    assert main(["quantize", str(model), "--recipe", "cpt-v", "--start-plan", str(tmp_path / "omse"),
                 "--set", "search.passes=1", "--out", str(tmp_path / "cptv"), *common]) == 0
    before = json.loads((tmp_path / "omse" / "metrics.json").read_text())
    after = json.loads((tmp_path / "cptv" / "metrics.json").read_text())
    assert after["search"]["last_fitness"] < after["search"]["first_fitness"]  # strictly: a no-op search fails
    assert after["quant_top1"] >= before["quant_top1"] - 2.0
    assert (tmp_path / "cptv" / "search_curve.png").exists()


def test_cifar_reference_exported_onnx_matches_simulated(assets, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    model = assets / "models" / "vit_cifar10_d6.pth"
    out = tmp_path / "run"
    rc = main(["quantize", str(model), "--recipe", "omse", "--w-bits", "8", "--a-bits", "8",
               "--calib", str(assets / "cifar10" / "train"), "--num-calib", "64", "--device", "cpu", "--quiet",
               "--out", str(out)])
    assert rc == 0
    onnx_path = tmp_path / "model.int8.onnx"
    assert main(["export", str(out), "--format", "onnx", "--out", str(onnx_path), "--quiet"]) == 0
    capsys.readouterr()
    rc = main(["eval", str(onnx_path), "--eval", str(assets / "cifar10" / "test"), "--num-eval", "1000",
               "--plan", str(out), "--quiet"])
    assert rc == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert abs(metrics["top1_diff"]) <= 0.3  # the bound: ONNX Runtime vs the simulated model
    assert metrics["agreement"] >= 98


def test_deit_tiny_w4a4_recommended_recipe_keeps_most_predictions(assets, tmp_path):
    """The default recipe at W4A4 on the real DeiT-Tiny: omse keeps about 1% of the float model's
    predictions here, the recommended recipe about two thirds (benchmarks/RESULTS.md)."""
    sample = assets / "imagenet-sample"
    out = tmp_path / "run"
    rc = main(["quantize", str(assets / "models" / "deit_tiny_imagenet.pth"), "--w-bits", "4", "--a-bits", "4",
               "--calib", str(sample), "--num-calib", "64", "--eval", str(sample), "--num-eval", "200",
               "--device", "cpu", "--quiet", "--out", str(out)])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["recipe"] == "recommended"
    assert metrics["agreement"] >= 50
