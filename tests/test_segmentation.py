"""Dense prediction: mIoU on hand-made label maps, backbones found inside other models, plans of
whole models, non-square grids, Swin, data-free without a head, and the CLI's segmentation runs."""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn

import vitq
from vitq.cli import main
from vitq.data import scan_segmentation, segmentation_loader
from vitq.errors import VitqError
from vitq.eval.segmentation import confusion_matrix, iou_per_class, mean_iou, pixel_accuracy
from vitq.methods import Plan, apply_plan, prepare
from vitq.models import BackboneAdapter, ViTSegmenter, find_adapter, iter_quantizers, load_model
from vitq.nn import QuantModule

H, W = 32, 48  # a non-square input: a 4×6 grid of 8-pixel patches


def tiny_segmenter(hidden: int = 8) -> ViTSegmenter:
    torch.manual_seed(0)
    backbone = timm.create_model("test_vit", img_size=(H, W), patch_size=8, num_classes=0)
    return ViTSegmenter(backbone, [0, 2], 3, hidden=hidden).eval()


def tiny_swin_segmenter() -> ViTSegmenter:
    torch.manual_seed(0)
    backbone = timm.create_model("swin_tiny_patch4_window7_224", img_size=(H, W), patch_size=2, window_size=4,
                                 embed_dim=16, depths=(2, 2), num_heads=(1, 2), num_classes=0)
    return ViTSegmenter(backbone, [0, 1], 3, hidden=8).eval()


@pytest.fixture
def batches():
    torch.manual_seed(1)
    return [torch.randn(3, 3, H, W) for _ in range(2)]


# -- metrics ----------------------------------------------------------------------------------------
def test_miou_on_hand_made_maps_is_dataset_level_and_ignores_void():
    # image 1: class 0 everywhere but one pixel; image 2: class 1, half of it predicted as 0, one void
    label1 = torch.tensor([[0, 0], [0, 1]])
    pred1 = torch.tensor([[0, 0], [0, 1]])
    label2 = torch.tensor([[1, 1], [1, 2]])  # 2 = void
    pred2 = torch.tensor([[1, 0], [0, 0]])
    cm = confusion_matrix(pred1, label1, 2, ignore_index=2) + confusion_matrix(pred2, label2, 2, ignore_index=2)
    assert cm.tolist() == [[3, 0], [2, 2]]
    # class 0: I = 3, U = 3 + 2 = 5; class 1: I = 2, U = 4 → 60 and 50 (void pixel not counted)
    assert iou_per_class(cm) == pytest.approx([60.0, 50.0])
    assert mean_iou(cm) == pytest.approx(55.0)
    assert pixel_accuracy(cm) == pytest.approx(100 * 5 / 7)
    # the per-image average would differ: image 1 alone scores 100, image 2 alone 25 (class 0: 0/2, class 1: 1/3)
    per_image = (mean_iou(confusion_matrix(pred1, label1, 2, 2)) + mean_iou(confusion_matrix(pred2, label2, 2, 2))) / 2
    assert per_image != pytest.approx(mean_iou(cm))


def test_class_absent_everywhere_is_left_out_of_the_mean():
    cm = confusion_matrix(torch.tensor([0, 0, 1]), torch.tensor([0, 0, 1]), 3)
    assert iou_per_class(cm) == [100.0, 100.0, None]
    assert mean_iou(cm) == 100.0


def test_label_out_of_range_is_an_error():
    with pytest.raises(VitqError, match="class 5"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 5]), 3, ignore_index=4)


def test_miou_matches_torchmetrics_when_installed():
    tm = pytest.importorskip("torchmetrics")
    torch.manual_seed(0)
    pred, target = torch.randint(0, 4, (3, 20, 30)), torch.randint(0, 5, (3, 20, 30))  # 4 = void
    metric = tm.classification.MulticlassJaccardIndex(num_classes=4, ignore_index=4, average="macro")
    expected = 100 * float(metric(pred, target))
    assert mean_iou(confusion_matrix(pred, target, 4, ignore_index=4)) == pytest.approx(expected, abs=1e-4)


# -- backbones inside other models -----------------------------------------------------------------
class Wrapped(nn.Module):
    """A user's own dense model: a timm ViT under another name, a convolutional head."""

    def __init__(self, second: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = timm.create_model("test_vit", img_size=(H, W), patch_size=8, num_classes=0)
        if second:
            self.teacher = timm.create_model("test_vit", img_size=(H, W), patch_size=8, num_classes=0)
        self.decode = nn.Conv2d(self.encoder.embed_dim, 2, 1)

    def forward(self, x):
        tokens = self.encoder.forward_features(x)[:, 1:]
        grid = tokens.transpose(1, 2).reshape(len(x), -1, H // 8, W // 8)
        return self.decode(grid)


def test_backbone_found_inside_any_module_and_only_it_is_quantized(batches):
    model = Wrapped().eval()
    adapter = find_adapter(model)
    assert isinstance(adapter, BackboneAdapter) and adapter.path == "encoder"
    assert [n for n, _ in adapter.blocks(model)][:2] == ["encoder.blocks.0", "encoder.blocks.1"]
    qmodel = prepare(model, w_bits=4, a_bits=8)
    names = [n for n, _ in iter_quantizers(qmodel)]
    assert names and all(n.startswith("encoder.") for n in names)
    assert type(qmodel.decode) is nn.Conv2d  # the head stays float
    assert isinstance(qmodel.encoder.blocks[0].attn.qkv, QuantModule)
    assert adapter.image_input(qmodel) == "encoder.patch_embed.proj.input_quantizer"
    assert {p.linear for p in adapter.norm_linear_pairs(qmodel)} >= {"encoder.blocks.0.attn.qkv",
                                                                       "encoder.blocks.0.mlp.fc1"}
    for _, q in iter_quantizers(qmodel):  # every quantizer off: the float model's output exactly
        q.enabled = False
    x = batches[0]
    torch.testing.assert_close(qmodel(x), model(x), atol=1e-5, rtol=0)


def test_two_backbones_are_refused_by_name():
    with pytest.raises(VitqError, match="encoder, teacher"):
        find_adapter(Wrapped(second=True))


def test_module_without_transformer_is_refused():
    with pytest.raises(VitqError, match="holds no supported transformer"):
        find_adapter(nn.Sequential(nn.Conv2d(3, 4, 3)))


@pytest.mark.parametrize("recipe", ["omse", "recommended"])
def test_segmenter_quantizes_at_a_non_square_grid_and_its_plan_reloads(recipe, batches, tmp_path):
    seg = tiny_segmenter()
    assert tuple(seg.backbone.patch_embed.grid_size) == (4, 6)
    result = vitq.quantize(seg, recipe, batches, w_bits=4, a_bits=8, progress=False)
    assert all(name.startswith("backbone.") for name in result.plan.rules)
    x = batches[0]
    out = result.model(x)
    assert out.shape == (3, 3, H, W)
    assert not torch.equal(out, seg(x))  # quantized ...
    assert (out - seg(x)).abs().mean() < 0.2 * seg(x).abs().mean()  # ... and close
    result.plan.save(tmp_path)
    again = apply_plan(seg, Plan.load(tmp_path / "plan.json"))
    assert torch.equal(again(x), out)


def test_the_head_is_quantized_on_request_and_its_plan_reloads(batches, tmp_path):
    """``head=True`` gives the decode head's convolutions quantizers (inputs and weights, calibrated
    like the backbone's); the plan records it and rebuilds the same model. By default the head is float."""
    seg = tiny_segmenter()
    heads = [n for n, m in seg.named_modules() if isinstance(m, nn.Conv2d) and not n.startswith("backbone.")]
    assert heads  # the segmenter's head has convolutions
    plain = vitq.quantize(seg, "omse", batches, w_bits=4, a_bits=8, progress=False)
    assert not any(name.startswith(tuple(heads)) for name in plain.plan.rules)
    result = vitq.quantize(seg, "omse", batches, w_bits=4, a_bits=8, head=True, progress=False)
    assert result.plan.meta["quantize_head"] is True
    for name in heads:
        assert result.plan.rules[f"{name}.weight_quantizer"].bits == 4
        assert result.plan.rules[f"{name}.input_quantizer"].bits == 8
        assert f"{name}.weight_quantizer.scale" in result.plan.tensors
    x = batches[0]
    out = result.model(x)
    assert not torch.equal(out, plain.model(x))  # the head's quantizers act
    result.plan.save(tmp_path)
    assert torch.equal(apply_plan(seg, Plan.load(tmp_path / "plan.json"))(x), out)
    with pytest.raises(VitqError, match="the transformer itself"):
        prepare(timm.create_model("test_vit", img_size=(H, W), patch_size=8), head=True)
    with pytest.raises(VitqError, match="made with the head in float"):
        vitq.quantize(seg, "omse", batches, head=True, start_plan=plain.plan, progress=False)


def test_swin_segmenter_quantizes_and_reloads(batches, tmp_path):
    seg = tiny_swin_segmenter()
    result = vitq.quantize(seg, "recommended", batches, w_bits=4, a_bits=8, progress=False)
    adapter = find_adapter(seg)
    assert adapter.path == "backbone" and len(adapter.blocks(seg)) == 4
    x = batches[0]
    out = result.model(x)
    assert (out - seg(x)).abs().mean() < 0.2 * seg(x).abs().mean()
    result.plan.save(tmp_path)
    assert torch.equal(apply_plan(seg, Plan.load(tmp_path / "plan.json"))(x), out)


def test_search_on_a_dense_model_runs_the_whole_model(batches):
    seg = tiny_segmenter()
    recipe = vitq.load_recipe("cpt-v").with_overrides({"search": {"passes": 1, "cycles": 2}})
    result = vitq.quantize(seg, recipe, batches, w_bits=4, a_bits=8, progress=False)
    curve = result.record["search_curve"]
    assert curve and all(np.isfinite(p["fitness"]) for p in curve)


def test_data_free_without_a_head_drops_the_class_loss_for_the_pixel_loss(batches):
    seg = tiny_segmenter()
    # no image-level class: no cross-entropy to random classes; a segmentation model's per-pixel loss by default
    made = vitq.synthesize(seg, "clamp-vit", generator="clamp", num_images=2, settings={"iterations": 3},
                           progress=False)
    assert made.result.images.shape == (2, 3, H, W) and made.result.output_loss
    made = vitq.synthesize(seg, "clamp-vit", generator="clamp", num_images=2,
                           settings={"iterations": 3, "pixel_weight": 0}, progress=False)
    assert made.result.images.shape == (2, 3, H, W) and not made.result.output_loss
    result = vitq.quantize(seg, "omse", None, data_free="psaq", num_images=2, gen_settings={"iterations": 2},
                           w_bits=8, a_bits=8, progress=False)
    assert result.plan.meta["calibration"]["data_free"] == "psaq"


# -- data and CLI ----------------------------------------------------------------------------------
def write_set(root: Path, splits=("train", "test"), n: int = 3, size=(60, 40), classes=3, void=3) -> Path:
    """A CamVid-like set: images/<split>/*.jpg, labels/<split>/*.png (values 0..classes-1 and void)."""
    rng = np.random.default_rng(0)
    for split in splits:
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
                root / "images" / split / f"f{i}.jpg")
            label = rng.integers(0, classes + 1, (size[1], size[0]), dtype=np.uint8)
            label[label == classes] = void
            Image.fromarray(label, mode="L").save(root / "labels" / split / f"f{i}.png")
    (root / "classes.json").write_text(json.dumps({"classes": [f"c{i}" for i in range(classes)],
                                                   "ignore_index": void}))
    return root


@pytest.fixture
def seg_set(tmp_path) -> Path:
    return write_set(tmp_path / "set")


@pytest.fixture
def seg_checkpoint(tmp_path) -> Path:
    seg = tiny_segmenter()
    path = tmp_path / "seg" / "model.pth"
    path.parent.mkdir()
    torch.save(seg.state_dict(), path)
    card = {"format": "vitq-model-card/1", "timm_model": "test_vit",
            "kwargs": {"img_size": [H, W], "patch_size": 8, "num_classes": 0},
            "segmentation_head": {"indices": [0, 2], "num_classes": 3, "hidden": 8},
            "data_config": {"input_size": [3, H, W], "interpolation": "bilinear", "crop_pct": 1.0,
                            "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
            "classes": ["c0", "c1", "c2"], "ignore_index": 3}
    path.with_suffix(".json").write_text(json.dumps(card))
    return path


def test_scan_segmentation_and_loader_resize_images_not_labels(seg_set):
    data = scan_segmentation(seg_set, "test")
    assert len(data) == 3 and data.ignore_index == 3 and data.classes == ["c0", "c1", "c2"]
    images, labels = next(iter(segmentation_loader(data, {"input_size": (3, H, W), "interpolation": "bilinear",
                                                          "mean": (0.5,) * 3, "std": (0.25,) * 3}, 2)))
    assert images.shape == (2, 3, H, W) and labels.shape == (2, 40, 60) and labels.dtype == torch.int64


def test_scan_segmentation_names_an_image_without_labels(seg_set):
    (seg_set / "labels" / "test" / "f1.png").unlink()
    with pytest.raises(VitqError, match="'f1'"):
        scan_segmentation(seg_set, "test")
    with pytest.raises(VitqError, match="'val' split"):
        scan_segmentation(seg_set, "val")


def test_card_builds_the_segmenter(seg_checkpoint):
    loaded = load_model(seg_checkpoint)
    assert loaded.task == "segmentation" and loaded.ignore_index == 3
    assert isinstance(loaded.model, ViTSegmenter)
    assert tuple(loaded.data_config["input_size"]) == (3, H, W)


def test_cli_segmentation_run_scores_miou_and_eval_reproduces_it(seg_checkpoint, seg_set, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["quantize", str(seg_checkpoint), "--task", "segmentation", "--recipe", "omse", "--w-bits", "4",
               "--calib", str(seg_set), "--eval", str(seg_set), "--out", str(out), "--quiet"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "segmentation" and metrics["num_eval"] == 3 and metrics["num_calib"] == 3
    assert 0 <= metrics["quant_miou"] <= 100 and 0 <= metrics["fp_miou"] <= 100
    assert set(metrics["per_class_iou"]) == {"c0", "c1", "c2"}
    assert (out / "predictions.png").is_file() and Image.open(out / "predictions.png").size[0] == 4 * 60
    assert "| class | float IoU |" in (out / "report.md").read_text()
    capsys.readouterr()
    rc = main(["eval", str(seg_checkpoint), "--plan", str(out), "--eval", str(seg_set), "--quiet"])
    assert rc == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["quant_miou"] == metrics["quant_miou"] and again["fp_miou"] == metrics["fp_miou"]


def test_cli_quantize_head_is_recorded_reported_and_reproduced(seg_checkpoint, seg_set, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["quantize", str(seg_checkpoint), "--recipe", "omse", "--quantize-head", "--calib", str(seg_set),
               "--eval", str(seg_set), "--out", str(out), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    plan = Plan.load(out)
    assert plan.meta["quantize_head"] is True and any(".weight_quantizer" in n and not n.startswith("backbone.")
                                                      for n in plan.rules)
    float_note = [line for line in (out / "report.md").read_text().splitlines() if "left in float" in line]
    assert not any("head" in line for line in float_note)  # the head is no longer among the float layers
    capsys.readouterr()
    assert main(["eval", str(seg_checkpoint), "--plan", str(out), "--eval", str(seg_set), "--quiet"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["quant_miou"] == metrics["quant_miou"]
    if importlib.util.find_spec("onnxruntime") is not None:  # the export carries the head's quant points
        onnx_path = tmp_path / "seg.onnx"
        assert main(["export", str(out), "--out", str(onnx_path), "--quiet"]) == 0
        report = json.loads(onnx_path.with_suffix(".export.json").read_text())
        v = report["verification"]  # within what float rounding alone moves the simulated model
        assert v["max_abs_diff"] <= 2 * v["float64_max_abs_diff"] + 1e-3, v
        assert any(p["name"].startswith("head.") for p in report["points"])


def test_cli_task_mismatch_is_refused(checkpoint, seg_set, tmp_path, capsys):
    rc = main(["quantize", str(checkpoint), "--task", "segmentation", "--calib", str(seg_set), "--out",
               str(tmp_path / "r"), "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "classification model" in err and "Traceback" not in err


def test_cli_data_free_segmentation_uses_the_pixel_loss_or_says_the_output_loss_was_dropped(seg_checkpoint, seg_set,
                                                                                            tmp_path):
    # by default a segmentation model's images are shaped by its per-pixel scores: no remark
    out = tmp_path / "df"
    rc = main(["quantize", str(seg_checkpoint), "--recipe", "omse", "--data-free", "clamp", "--num-images", "2",
               "--iterations", "2", "--eval", str(seg_set), "--out", str(out), "--quiet"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "segmentation" and metrics["data_free"] == "clamp" and metrics["quant_miou"] is not None
    assert json.loads((out / "stats.json").read_text())["output_loss"] is True
    assert "without the cross-entropy to random classes" not in (out / "report.md").read_text()
    # with the per-pixel loss turned off the report says the images had no output loss
    out = tmp_path / "df-no-pixel"
    assert main(["quantize", str(seg_checkpoint), "--recipe", "omse", "--data-free", "clamp", "--num-images", "2",
                 "--iterations", "2", "--gen-settings", '{"pixel_weight": 0}', "--eval", str(seg_set), "--out", str(out),
                 "--quiet"]) == 0
    assert "without the cross-entropy to random classes" in (out / "report.md").read_text()
    stats = json.loads((out / "stats.json").read_text())
    assert stats["output_loss"] is False and stats["target_hit_rate"] is None


def test_cli_export_of_a_segmentation_run_and_its_miou_in_onnx_runtime(seg_checkpoint, seg_set, tmp_path, capsys):
    """``vitq eval FILE.onnx --eval SET`` scores a segmentation export in ONNX Runtime; with ``--plan``
    the simulated model's mIoU is beside it and equals what ``vitq eval CHECKPOINT --plan`` reports."""
    pytest.importorskip("onnxruntime")
    run = tmp_path / "run"
    assert main(["quantize", str(seg_checkpoint), "--recipe", "minmax", "--calib", str(seg_set), "--out", str(run),
                 "--quiet"]) == 0
    onnx_path = tmp_path / "seg.onnx"
    assert main(["export", str(run), "--out", str(onnx_path), "--quiet"]) == 0
    report = json.loads(onnx_path.with_suffix(".export.json").read_text())
    assert report["verification"]["max_abs_diff"] < 1e-3  # ONNX Runtime's logits against the simulated model
    out = tmp_path / "onnx_eval.json"
    assert main(["eval", str(onnx_path), "--eval", str(seg_set), "--plan", str(run), "--out", str(out), "--quiet"]) == 0
    got = json.loads(out.read_text())
    assert got["task"] == "segmentation" and got["runtime"] == "onnxruntime" and got["num_eval"] > 0
    assert got["pixel_agreement"] > 99.0 and abs(got["miou_diff"]) < 1.0
    assert set(got["per_class_iou"]) == {"c0", "c1", "c2"}  # the model card's names, recorded at export
    plan_eval = tmp_path / "plan_eval.json"
    assert main(["eval", str(seg_checkpoint), "--plan", str(run), "--eval", str(seg_set), "--out", str(plan_eval),
                 "--quiet"]) == 0
    assert got["reference_miou"] == pytest.approx(json.loads(plan_eval.read_text())["quant_miou"], abs=1e-3)
    alone = tmp_path / "alone.json"
    assert main(["eval", str(onnx_path), "--eval", str(seg_set), "--out", str(alone), "--quiet"]) == 0
    assert json.loads(alone.read_text())["onnx_miou"] == got["onnx_miou"] and "reference_miou" not in \
        json.loads(alone.read_text())


def test_cli_unreadable_label_map_is_named_before_any_work_or_skipped(seg_checkpoint, seg_set, tmp_path, capsys):
    (seg_set / "labels" / "test" / "f2.png").write_bytes(b"not a png")
    args = ["quantize", str(seg_checkpoint), "--recipe", "minmax", "--calib", str(seg_set), "--eval", str(seg_set),
            "--quiet"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "f2.png" in err and "--skip-bad-images" in err and "Traceback" not in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "a.partial").exists()  # refused before calibrating
    assert main(args + ["--out", str(tmp_path / "b"), "--skip-bad-images"]) == 0
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert metrics["num_eval"] == 2 and metrics["skipped_images"] == {"calib": 0, "eval": 1}


@pytest.mark.parametrize("make, recipe, settings", [
    (tiny_segmenter, "clamp-vit", {"passes": 1, "cycles": 1, "refresh_every": 0, "batch_size": 3, "max_units": 10}),
    (tiny_swin_segmenter, "cpt-v", {"passes": 1, "cycles": 1, "batch_size": 3}),
])
def test_search_on_a_dense_model_replays_the_unchanged_blocks_exactly(make, recipe, settings, batches, monkeypatch):
    """Replaying the cached outputs of the blocks before the searched unit gives the very same search
    (curve and scales, bit for bit) as recomputing them, and skips their work."""
    from vitq.methods import search

    recipe = vitq.load_recipe(recipe).with_overrides({"search": settings})
    runs, block_calls = [], []
    for replay in (True, False):
        monkeypatch.setattr(search._Objective, "replay_upstream", replay)
        seg = make()
        calls = [0]  # the first block's MLP: it computes only when its block is not replayed
        first = find_adapter(seg).block_parts(find_adapter(seg).blocks(seg)[0][1])["mlp"]
        first.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
        result = vitq.quantize(seg, recipe, batches, w_bits=4, a_bits=8, progress=False)
        runs.append(result)
        block_calls.append(calls[0])
    (replayed, recomputed) = runs
    assert [p["fitness"] for p in replayed.record["search_curve"]] == [p["fitness"] for p in recomputed.record["search_curve"]]
    assert replayed.plan.tensors.keys() == recomputed.plan.tensors.keys()
    assert all(torch.equal(t, recomputed.plan.tensors[k]) for k, t in replayed.plan.tensors.items())
    assert block_calls[0] < block_calls[1]  # the first block ran far fewer times
