"""The same work on a CUDA device (skipped where there is none): calibration, both search recipes,
resume, the generators, mixed precision and evaluation, from the API and the command line.

CPU runs are covered everywhere else; these check that nothing assumes the CPU (tensors left on
the wrong device, a float model moved or modified, plans that do not re-apply elsewhere).
"""
from __future__ import annotations

import json
import os

import pytest
import torch

import vitq
from vitq.cli import main
from vitq.data.synthetic import create_generator
from vitq.methods import Plan, apply_plan

from test_cli import quantize_args
from test_cli_search import check_resume, scales
from test_cli_search import cptv_args as cpu_cptv_args

# VITQ_TEST_DEVICE=cpu runs these on the CPU: a check of the tests themselves where there is no GPU
DEVICE = os.environ.get("VITQ_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="no CUDA device")


def on_cuda(args):
    args = list(args)
    args[args.index("--device") + 1] = DEVICE
    return args


def cptv_args(checkpoint, image_folder, out, *extra):
    return on_cuda(cpu_cptv_args(checkpoint, image_folder, out, *extra))


def metrics(run):
    return json.loads((run / "metrics.json").read_text())


def test_cptv_from_a_plan_on_cuda_is_seeded_and_reapplies(checkpoint, image_folder, tmp_path, capsys):
    start = tmp_path / "omse"
    assert main(on_cuda(quantize_args(checkpoint, image_folder, start, "--recipe", "omse"))) == 0
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        args = cptv_args(checkpoint, image_folder, run, "--start-plan", str(start), "--eval", str(image_folder),
                         "--num-calib", "6")
        assert main(args) == 0, capsys.readouterr().err
    m = metrics(runs[0])
    assert m["device"].startswith(DEVICE)
    assert m["search"]["last_fitness"] <= m["search"]["first_fitness"]
    a, b = scales(runs[0]), scales(runs[1])
    assert all(torch.equal(a[k], b[k]) for k in a), "same seed, different plan on CUDA"
    assert any(not torch.equal(a[k], s) for k, s in scales(start).items()), "the search changed nothing"
    # the plan searched on the GPU re-applies on the GPU with the same result, and on the CPU closely
    capsys.readouterr()
    for device in (DEVICE, "cpu"):
        assert main(["eval", str(checkpoint), "--plan", str(runs[0]), "--eval", str(image_folder), "--device",
                     device, "--quiet"]) == 0
        evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        if device == DEVICE:
            assert evaluated["quant_top1"] == m["quant_top1"] and evaluated["kl"] == pytest.approx(m["kl"], rel=1e-5)
        else:
            assert evaluated["kl"] == pytest.approx(m["kl"], rel=0.05, abs=1e-4)


def test_clamp_vit_data_free_on_cuda(checkpoint, tmp_path, capsys):
    out = tmp_path / "clamp"
    args = ["quantize", str(checkpoint), "--recipe", "clamp-vit", "--w-bits", "4", "--a-bits", "8",
            "--data-free", "clamp", "--num-images", "4", "--iterations", "3", "--out", str(out), "--device", DEVICE,
            "--quiet", "--set", "search.passes=1", "--set", "search.cycles=2", "--set", "search.refresh_every=4",
            "--batch-size", "4"]
    assert main(args) == 0, capsys.readouterr().err
    m = metrics(out)
    assert m["data_free"] == "clamp" and m["search"]["refreshes"]
    plan = Plan.load(out)
    assert all(torch.isfinite(t).all() for t in plan.tensors.values())
    assert "refreshed the 4 synthetic images" in (out / "log.txt").read_text()


def test_resume_on_cuda(checkpoint, image_folder, tmp_path, capsys, monkeypatch):
    check_resume(lambda out, *extra: cptv_args(checkpoint, image_folder, out, *extra), tmp_path, capsys, monkeypatch)


@pytest.mark.parametrize("name", ["gaussian", "psaq", "clamp"])
def test_generators_on_cuda_leave_the_model_alone(vit, name):
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    settings = {} if name == "gaussian" else {"iterations": 3}
    data_config = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    result = create_generator(name, settings).generate(vit, 4, data_config, seed=0, device=DEVICE, progress=False)
    assert result.images.shape == (4, 3, 32, 32) and torch.isfinite(result.images).all()
    assert next(vit.parameters()).device.type == "cpu"
    assert all(torch.equal(before[k], v) for k, v in vit.state_dict().items())


def test_api_search_recipes_on_cuda(vit, images):
    for recipe in ("cpt-v", "clamp-vit"):
        r = vitq.load_recipe(recipe).with_overrides({"search": {"passes": 1, "batch_size": 6}})
        q = vitq.quantize(vit, r, [images], w_bits=4, a_bits=8, device=DEVICE, progress=False)
        assert next(q.model.parameters()).device.type == DEVICE
        with torch.no_grad():
            out = q.model(images.to(DEVICE))
        assert torch.isfinite(out).all()
        again = apply_plan(vit, q.plan)  # the plan re-applies on the CPU
        with torch.no_grad():
            assert torch.isfinite(again(images)).all()
    assert next(vit.parameters()).device.type == "cpu"


def test_greedy_mixed_precision_on_cuda(checkpoint, image_folder, tmp_path, capsys):
    out = tmp_path / "mp"
    args = on_cuda(quantize_args(checkpoint, image_folder, out, "--budget", "w6a6", "--eval", str(image_folder),
                                     "--num-calib", "6"))
    args[args.index("minmax")] = "mptq-vit-mp"
    assert main(args) == 0, capsys.readouterr().err
    bits = json.loads((out / "bits.json").read_text())
    blocks = bits["scopes"]["blocks"]
    assert blocks["w_bits"]["weighted"] <= 6 + 1e-6 and blocks["a_bits"]["weighted"] <= 6 + 1e-6


def _outputs_on(model, x):
    with torch.no_grad():
        return model(x.to(next(model.parameters()).device)).cpu()


@pytest.fixture
def no_tf32(monkeypatch):
    """cuDNN convolutions in float32 (PyTorch lets them use TF32 by default): the tiny random model at
    W4A4 moves by a quarter of its mean output when its input moves by 1e-4 (measured on the CPU),
    so the patch embedding's TF32 rounding alone made the plan's CPU and CUDA outputs differ by that
    much (seen on an H200, 2026-12-04)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


@pytest.mark.parametrize("bits", [(4, 8), (4, 4)])
def test_recommended_recipe_on_cuda_is_seeded_and_its_plan_reapplies(vit, images, bits, tmp_path, no_tf32):
    """Every stage of the default recipe (reparameterisation, OPT-m, GPTQ, block reconstruction with
    its hold-out at W4A4, bias correction at 8-bit activations) on the device."""
    w, a = bits
    recipe = vitq.load_recipe("recommended").with_overrides({"reconstruct": {"iterations": 5}})
    runs = [vitq.quantize(vit, recipe, [images[:3], images[3:]], w_bits=w, a_bits=a, device=DEVICE, seed=0,
                          progress=False) for _ in range(2)]
    assert next(runs[0].model.parameters()).device.type == DEVICE
    skipped = runs[0].plan.meta.get("skipped_stages") or {}
    assert "gptq" not in skipped and "reconstruct" not in skipped, skipped
    out = _outputs_on(runs[0].model, images)
    assert torch.isfinite(out).all()
    assert torch.equal(out, _outputs_on(runs[1].model, images)), "same seed, different model on the device"
    runs[0].plan.save(tmp_path)
    plan = Plan.load(tmp_path / "plan.json")
    assert torch.equal(_outputs_on(apply_plan(vit, plan).to(DEVICE), images), out)  # reloads on the device
    on_cpu = _outputs_on(apply_plan(vit, plan), images)  # and on the CPU, to float rounding
    assert (on_cpu - out).abs().mean() < 0.05 * out.abs().mean()
    assert next(vit.parameters()).device.type == "cpu"


def test_segmenter_backbone_on_cuda_scores_miou(tmp_path):
    from test_segmentation import H, W, tiny_segmenter

    seg = tiny_segmenter()
    torch.manual_seed(1)
    calib = [torch.randn(3, 3, H, W) for _ in range(2)]
    labels = [torch.randint(0, 3, (3, H, W)) for _ in range(2)]
    result = vitq.quantize(seg, "recommended", calib, w_bits=4, a_bits=8, device=DEVICE, progress=False)
    assert all(name.startswith("backbone.") for name in result.plan.rules)
    metrics, _ = vitq.evaluate_segmentation(seg, result.model, list(zip(calib, labels)), num_classes=3,
                                            device=DEVICE, progress=False)
    assert 0 <= metrics["quant_miou"] <= 100 and metrics["fp_miou"] > 0
    result.plan.save(tmp_path)
    again = apply_plan(seg, Plan.load(tmp_path / "plan.json")).to(DEVICE)
    assert torch.equal(_outputs_on(again, calib[0]), _outputs_on(result.model, calib[0]))
