"""Detection: a torchvision Faster R-CNN on a timm ViT backbone quantizes by the backbone's path,
runs, reloads from its plan, and scores with COCOeval (exact values on hand-made boxes); detectors
built from model cards, COCO-format folders, and ``vitq quantize --task detection`` end to end; a
two-stage Swin read through a (float) feature pyramid, by the API and the command line."""
from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import vitq
from vitq.cli import main
from vitq.data import check_detection_images, detection_calibration_loader, detection_loader, scan_detection
from vitq.data.folder import scan_folder
from vitq.errors import VitqError
from vitq.methods import Plan, apply_plan
from vitq.methods.backbone import backbone_inputs
from vitq.models import find_adapter, iter_quantizers, load_model
from vitq.models.detection import DetectionHead, TransformerFeatures, build_detector

from conftest import tiny_vit

pytest.importorskip("pycocotools")
from vitq.eval.detection import coco_scores, load_coco, to_coco_results  # noqa: E402

SIZE = 64


def coco_fixture():
    """Two 64×64 images; image 1 has a box of each of two categories, image 2 one box."""
    return {
        "images": [{"id": 1, "width": SIZE, "height": SIZE}, {"id": 2, "width": SIZE, "height": SIZE}],
        "categories": [{"id": 1, "name": "car"}, {"id": 2, "name": "person"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [40, 30, 10, 20], "area": 200, "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [0, 0, 32, 32], "area": 1024, "iscrowd": 0},
        ],
    }


def _out(boxes, scores, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float), "scores": torch.tensor(scores),
            "labels": torch.tensor(labels)}


def test_coco_ap_of_perfect_boxes_is_100():
    coco = load_coco(coco_fixture())
    outputs = [_out([[10, 10, 30, 30], [40, 30, 50, 50]], [0.9, 0.8], [1, 2]), _out([[0, 0, 32, 32]], [0.7], [1])]
    scores = coco_scores(coco, to_coco_results(outputs, [1, 2]))
    assert scores["ap"] == pytest.approx(100.0) and scores["ap50"] == pytest.approx(100.0)


def test_coco_ap_of_a_box_at_iou_0_72_counts_five_of_ten_thresholds():
    coco = load_coco({**coco_fixture(), "annotations": coco_fixture()["annotations"][:1],
                      "images": coco_fixture()["images"][:1]})
    # ground truth [10, 10, 30, 30] (400 px); prediction [10, 10, 30, 24.4] → IoU 280/400 ... choose 0.72
    outputs = [_out([[10.0, 10.0, 30.0, 24.4]], [0.9], [1])]  # 20 × 14.4 = 288 px inside: IoU 0.72
    scores = coco_scores(coco, to_coco_results(outputs, [1]))
    assert scores["ap50"] == pytest.approx(100.0)
    assert scores["ap75"] == pytest.approx(0.0)
    assert scores["ap"] == pytest.approx(50.0)  # matched at IoU .50 .55 .60 .65 .70, not above


class FixedMasks(torch.nn.Module):
    """A 'detector' that finds image 1's first box exactly, with a mask filling it."""

    def forward(self, images):
        mask = torch.zeros(1, 1, SIZE, SIZE)
        mask[..., 10:30, 10:30] = 1.0
        return [{"boxes": torch.tensor([[10.0, 10.0, 30.0, 30.0]]), "scores": torch.tensor([0.9]),
                 "labels": torch.tensor([1]), "masks": mask} for _ in images]


def test_mask_ap_only_where_the_annotations_have_masks():
    from vitq.eval.detection import compare_detection

    gt = {**coco_fixture(), "annotations": coco_fixture()["annotations"][:1], "images": coco_fixture()["images"][:1]}
    batches = [([torch.zeros(3, SIZE, SIZE)], [{"image_id": 1}])]
    boxes_only = compare_detection(FixedMasks(), FixedMasks(), batches, load_coco(gt), progress=False)
    assert boxes_only["quant_bbox_ap"] == pytest.approx(100.0) and "quant_segm_ap" not in boxes_only
    gt["annotations"][0]["segmentation"] = [[10, 10, 30, 10, 30, 30, 10, 30]]
    with_masks = compare_detection(FixedMasks(), FixedMasks(), batches, load_coco(gt), progress=False)
    assert with_masks["quant_segm_ap"] == pytest.approx(100.0)


def test_coco_ap_of_a_wrong_class_is_0():
    coco = load_coco({**coco_fixture(), "annotations": coco_fixture()["annotations"][:1],
                      "images": coco_fixture()["images"][:1]})
    scores = coco_scores(coco, to_coco_results([_out([[10, 10, 30, 30]], [0.9], [2])], [1]))
    assert scores["ap"] == pytest.approx(0.0)


def tiny_detector():
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    torch.manual_seed(0)
    vit = timm.create_model("test_vit", img_size=SIZE, patch_size=8, num_classes=0, dynamic_img_size=True)
    backbone = TransformerFeatures(vit, [2])
    return FasterRCNN(backbone, num_classes=3, min_size=SIZE, max_size=SIZE,
                      rpn_anchor_generator=AnchorGenerator(sizes=((16, 32),), aspect_ratios=((0.5, 1.0, 2.0),)),
                      box_roi_pool=MultiScaleRoIAlign(["0"], output_size=7, sampling_ratio=2),
                      box_score_thresh=0.0).eval()


@pytest.fixture
def detection_batches():
    torch.manual_seed(2)
    images = [torch.rand(3, SIZE, SIZE) for _ in range(4)]
    return [(images[:2], [{"image_id": 1}, {"image_id": 2}]), (images[2:], [{"image_id": 1}, {"image_id": 2}])]


def test_detector_backbone_quantizes_by_path_runs_and_reloads(detection_batches, tmp_path):
    detector = tiny_detector()
    result = vitq.quantize(detector, "omse", detection_batches, w_bits=4, a_bits=8, backbone="backbone.body",
                           progress=False)
    qdet = result.model
    assert result.plan.meta["backbone"] == "backbone.body"
    assert type(qdet.roi_heads.box_head.fc6) is torch.nn.Linear  # the detector's heads stay float
    assert detector.backbone.body is not qdet.backbone.body  # the float model is untouched
    images = detection_batches[0][0]
    with torch.no_grad():
        q_feats = qdet.backbone(torch.stack(images))["0"]
        f_feats = detector.backbone(torch.stack(images))["0"]
        out = qdet(images)
    assert not torch.equal(q_feats, f_feats)
    assert (q_feats - f_feats).abs().mean() < 0.2 * f_feats.abs().mean()
    assert set(out[0]) == {"boxes", "scores", "labels"}
    result.plan.save(tmp_path)
    again = apply_plan(detector, Plan.load(tmp_path / "plan.json"))
    with torch.no_grad():
        assert torch.equal(again.backbone(torch.stack(images))["0"], q_feats)


def test_detector_scores_with_cocoeval(detection_batches):
    detector = tiny_detector()
    result = vitq.quantize(detector, "minmax", detection_batches, backbone="backbone.body", progress=False)
    metrics = vitq.evaluate_detection(detector, result.model, detection_batches, coco_fixture(), progress=False)
    assert metrics["num_eval"] == 4
    for key in ("fp_bbox_ap", "quant_bbox_ap", "fp_bbox_ap50", "quant_bbox_ap50"):
        assert 0.0 <= metrics[key] <= 100.0
    assert set(metrics["fp_bbox"]) >= {"ap", "ap50", "ap75", "ar100"}


def test_backbone_path_errors_name_the_fix():
    detector = tiny_detector()
    with pytest.raises(VitqError, match="no sub-module 'backbone.encoder'"):
        vitq.quantize(detector, "minmax", [], backbone="backbone.encoder", progress=False)
    with pytest.raises(VitqError, match="not a supported transformer"):
        vitq.quantize(detector, "minmax", [], backbone="roi_heads", progress=False)


# -- the detection data, model card and command line ------------------------------------------------

#: images of three shapes (width, height): the detector resizes each to its own size, then pads the batch
SHAPES = ((64, 64), (80, 48), (48, 72))
HEAD = {"detector": "fasterrcnn", "indices": [2], "num_classes": 3, "min_size": 64, "max_size": 96,
        "anchor_sizes": [[16, 32]], "box_score_thresh": 0.0, "label_to_category": {"1": 7, "2": 9}}
KWARGS = {"img_size": SIZE, "patch_size": 8, "num_classes": 0, "dynamic_img_size": True}


def pixels(i: int, width: int, height: int):
    """The seeded RGB pixels of image ``i``."""
    return np.random.default_rng(i).integers(0, 256, (height, width, 3), dtype=np.uint8)


def write_coco(root, shapes=SHAPES, folder="images", name="annotations.json"):
    """Images ``im<i>.png`` (ids 10, 11, ...) with one box each, categories 7 (car) and 9 (person)."""
    (root / folder).mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(shapes):
        Image.fromarray(pixels(i, w, h)).save(root / folder / f"im{i}.png")
    data = {"images": [{"id": 10 + i, "file_name": f"im{i}.png", "width": w, "height": h}
                       for i, (w, h) in enumerate(shapes)],
            "categories": [{"id": 7, "name": "car"}, {"id": 9, "name": "person"}],
            "annotations": [{"id": i + 1, "image_id": 10 + i, "category_id": (7, 9)[i % 2], "bbox": [4, 4, 24, 20],
                             "segmentation": [[4, 4, 28, 4, 28, 24, 4, 24]], "area": 480, "iscrowd": 0}
                            for i in range(len(shapes))]}
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return root


def write_detector(folder, head=HEAD, arch="test_vit", kwargs=KWARGS):
    """A random-weight detector on ``arch`` (test_vit) saved as a state_dict with its model card."""
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    det = build_detector(timm.create_model(arch, **kwargs), head)
    torch.save(det.state_dict(), folder / "det.pth")
    card = {"format": "vitq-model-card/1", "timm_model": arch, "kwargs": kwargs, "detection_head": head}
    (folder / "det.json").write_text(json.dumps(card))
    return folder / "det.pth"


@pytest.fixture
def coco_dir(tmp_path):
    return write_coco(tmp_path / "coco")


@pytest.fixture
def calib_dir(tmp_path):
    root = tmp_path / "calib"
    root.mkdir()
    for i, (w, h) in enumerate(SHAPES * 2):
        Image.fromarray(pixels(100 + i, w, h)).save(root / f"c{i}.jpg")
    return root


@pytest.fixture
def det_checkpoint(tmp_path):
    return write_detector(tmp_path / "models")


def test_coco_folder_gives_images_in_0_1_at_their_own_size_with_their_ids(coco_dir, calib_dir):
    data = scan_detection(coco_dir)
    assert data.annotations == coco_dir / "annotations.json" and data.image_ids == (10, 11, 12)
    assert [p.name for p in data.images] == ["im0.png", "im1.png", "im2.png"]
    batches = list(detection_loader(data, batch_size=2))
    assert [len(b[0]) for b in batches] == [2, 1]
    images = [img for b in batches for img in b[0]]
    assert [t["image_id"] for b in batches for t in b[1]] == [10, 11, 12]
    for i, (img, (w, h)) in enumerate(zip(images, SHAPES)):
        assert img.dtype == torch.float32 and tuple(img.shape) == (3, h, w)
        expected = torch.from_numpy(pixels(i, w, h)).permute(2, 0, 1).float() / 255
        assert torch.equal(img, expected)  # exactly the file's pixels over 255: no resize, no normalisation
        assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    sub = data.sample(2, seed=0)
    assert len(sub) == 2 and sub.image_ids == data.sample(2, seed=0).image_ids
    truth = sub.ground_truth()
    assert {e["id"] for e in truth["images"]} == set(sub.image_ids)
    assert {a["image_id"] for a in truth["annotations"]} == set(sub.image_ids)
    calib = list(detection_calibration_loader(scan_folder(calib_dir, labelled=False), batch_size=4))
    assert [len(b[0]) for b in calib] == [4, 2] and all(t["image_id"] == -1 for b in calib for t in b[1])


def test_annotation_file_layouts_and_what_is_looked_for(tmp_path):
    coco = write_coco(tmp_path / "coco2017", folder="val2017", name="annotations/instances_val2017.json")
    write_coco(tmp_path / "coco2017", folder="train2017", name="annotations/instances_train2017.json")
    data = scan_detection(coco)  # COCO's own layout: val is scored, its images in val2017/
    assert data.annotations.name == "instances_val2017.json" and data.images[0].parent.name == "val2017"
    write_coco(tmp_path / "two", folder="a", name="annotations/instances_a.json")
    write_coco(tmp_path / "two", folder="b", name="annotations/instances_b.json")
    with pytest.raises(VitqError, match="holds 2 annotation files .instances_a.json, instances_b.json."):
        scan_detection(tmp_path / "two")
    flat = write_coco(tmp_path / "flat", folder=".", name="boxes.json")
    assert scan_detection(flat).annotations.name == "boxes.json"
    assert check_detection_images(scan_detection(flat))[1] == 0  # its images beside the annotations
    (flat / "other.json").write_text("{}")
    with pytest.raises(VitqError, match="holds 2 .json files"):
        scan_detection(flat)
    (tmp_path / "empty").mkdir()
    with pytest.raises(VitqError, match=r"no COCO annotation file: looked for .*annotations\.json"):
        scan_detection(tmp_path / "empty")


def test_card_builds_each_detector_with_its_label_map(tmp_path):
    for name in ("fasterrcnn", "maskrcnn", "retinanet"):
        loaded = load_model(write_detector(tmp_path / name, {**HEAD, "detector": name}))
        assert loaded.task == "detection" and type(loaded.model).__name__.lower() == name
        assert loaded.model.label_to_category == {1: 7, 2: 9}
        with torch.no_grad():
            out = loaded.model([torch.rand(3, 48, 80)])
        assert {"boxes", "scores", "labels"} <= set(out[0])


def test_card_errors_name_the_choices(tmp_path):
    with pytest.raises(VitqError, match="unknown detector 'yolo'; choose one of: fasterrcnn, maskrcnn, retinanet"):
        build_detector(timm.create_model("test_vit", **KWARGS), {**HEAD, "detector": "yolo"})
    with pytest.raises(VitqError, match=r"unknown key\(s\) \['anchors'\]"):
        build_detector(timm.create_model("test_vit", **KWARGS), {**HEAD, "anchors": [[8]]})
    with pytest.raises(VitqError, match="one non-empty list of positive sizes per feature map"):
        build_detector(timm.create_model("test_vit", **KWARGS), {**HEAD, "anchor_sizes": [16, 32]})
    with pytest.raises(VitqError, match="label 0 is not one the detector outputs"):
        build_detector(timm.create_model("test_vit", **KWARGS), {**HEAD, "label_to_category": {"0": 1}})


def run_detection(args, capsys):
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 0, err
    return err


@pytest.mark.parametrize("recipe, w_bits", [("minmax", "8"), ("recommended", "4")])
def test_cli_detection_run_scores_box_ap_and_eval_reproduces_it(recipe, w_bits, det_checkpoint, calib_dir, coco_dir,
                                                                tmp_path, capsys):
    out = tmp_path / "run"
    run_detection(["quantize", str(det_checkpoint), "--task", "detection", "--recipe", recipe, "--w-bits", w_bits,
                   "--a-bits", "8", "--calib", str(calib_dir), "--eval", str(coco_dir), "--out", str(out),
                   "--device", "cpu", "--quiet"], capsys)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "detection" and metrics["num_eval"] == 3 and metrics["num_calib"] == 6
    assert metrics["w_bits"] == int(w_bits) and metrics["recipe"] == recipe
    for key in ("fp_bbox_ap", "quant_bbox_ap", "fp_bbox_ap50", "quant_bbox_ap50"):
        assert 0.0 <= metrics[key] <= 100.0
    assert set(metrics["fp_bbox"]) == {"ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large", "ar1", "ar10",
                                       "ar100", "ar_small", "ar_medium", "ar_large"}
    assert {"model", "protocol", "a_bits", "input_bits", "seed", "weight_bytes", "fp_weight_bytes", "bits", "seconds",
            "device"} <= set(metrics)
    assert "segm" not in json.dumps(metrics)  # a Faster R-CNN predicts no masks
    plan = Plan.load(out)
    assert plan.meta["backbone"] == "backbone.body" and "blocks.0.attn.qkv.weight_quantizer" in plan.rules
    report = (out / "report.md").read_text()
    assert "| model | box AP | box AP50 | box AP75 |" in report and "| AR, 100 detections |" in report
    assert (out / "detections.png").is_file()
    eval_out = tmp_path / "eval.json"
    run_detection(["eval", str(det_checkpoint), "--plan", str(out), "--eval", str(coco_dir), "--out", str(eval_out),
                   "--device", "cpu", "--quiet"], capsys)
    again = json.loads(eval_out.read_text())
    assert again["task"] == "detection" and again["num_eval"] == 3
    assert again["fp_bbox"] == metrics["fp_bbox"] and again["quant_bbox"] == metrics["quant_bbox"]


def test_cli_mask_rcnn_run_scores_mask_ap(tmp_path, calib_dir, coco_dir, capsys):
    ckpt = write_detector(tmp_path / "mask", {**HEAD, "detector": "maskrcnn", "detections_per_img": 10})
    out = tmp_path / "run"
    run_detection(["quantize", str(ckpt), "--recipe", "minmax", "--calib", str(calib_dir), "--eval", str(coco_dir),
                   "--num-eval", "2", "--out", str(out), "--device", "cpu", "--quiet"], capsys)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "detection" and metrics["num_eval"] == 2
    for key in ("fp_segm_ap", "quant_segm_ap", "fp_segm_ap50", "quant_segm_ap50"):
        assert 0.0 <= metrics[key] <= 100.0
    assert "mask AP" in (out / "report.md").read_text()


def test_search_recipe_on_a_detector_with_images_of_several_sizes():
    """The detector pads each batch to its own largest image; the captured backbone inputs are padded
    to one size, so the stages that concatenate the calibration batches (the search) run."""
    detector = build_detector(timm.create_model("test_vit", **KWARGS), HEAD).eval()
    torch.manual_seed(3)
    batches = [([torch.rand(3, 64, 64)], [{"image_id": -1}]), ([torch.rand(3, 48, 80)], [{"image_id": -1}])]
    inputs = backbone_inputs(detector, "backbone.body", batches)
    assert [tuple(x.shape) for x in inputs] == [(1, 3, 64, 96), (1, 3, 64, 96)]  # 64×64 padded to 64×96
    assert torch.equal(inputs[0][..., 64:], torch.zeros(1, 3, 64, 32))
    recipe = vitq.load_recipe("cpt-v").with_overrides({"search": {"passes": 1, "cycles": 2}})
    result = vitq.quantize(detector, recipe, batches, w_bits=4, a_bits=8, backbone="backbone.body", progress=False)
    assert result.record["search_curve"]


def bad_run(args, capsys) -> str:
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    return err


def test_cli_detection_errors_are_one_line(det_checkpoint, calib_dir, coco_dir, tmp_path, capsys):
    base = ["quantize", str(det_checkpoint), "--recipe", "minmax", "--calib", str(calib_dir), "--device", "cpu",
            "--quiet"]
    (tmp_path / "no_ann").mkdir()
    err = bad_run(base + ["--eval", str(tmp_path / "no_ann"), "--out", str(tmp_path / "a")], capsys)
    assert "no COCO annotation file: looked for" in err and "annotations.json" in err
    (coco_dir / "images" / "im1.png").unlink()
    err = bad_run(base + ["--eval", str(coco_dir), "--out", str(tmp_path / "b")], capsys)
    assert "1 missing" in err and "im1.png" in err and "--skip-bad-images" in err
    assert not (tmp_path / "b").exists() and not (tmp_path / "b.partial").exists()  # refused before calibrating
    run_detection(base + ["--eval", str(coco_dir), "--out", str(tmp_path / "c"), "--skip-bad-images"], capsys)
    metrics = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert metrics["num_eval"] == 2 and metrics["skipped_images"] == {"calib": 0, "eval": 1}
    err = bad_run(base + ["--quantize-head", "--out", str(tmp_path / "d")], capsys)
    assert "--quantize-head is for segmentation models" in err
    bad_card = write_detector(tmp_path / "bad", HEAD)
    card = json.loads(bad_card.with_suffix(".json").read_text())
    card["detection_head"]["detector"] = "detr"
    bad_card.with_suffix(".json").write_text(json.dumps(card))
    err = bad_run(["quantize", str(bad_card), "--calib", str(calib_dir), "--out", str(tmp_path / "e"), "--quiet"],
                  capsys)
    assert "unknown detector 'detr'; choose one of: fasterrcnn, maskrcnn, retinanet" in err
    classifier = tmp_path / "cls" / "vit.pth"  # a classifier
    classifier.parent.mkdir()
    torch.save(tiny_vit().state_dict(), classifier)
    classifier.with_suffix(".json").write_text(json.dumps({"timm_model": "test_vit", "kwargs": {
        "img_size": 32, "patch_size": 8, "num_classes": 4}}))
    err = bad_run(["quantize", str(classifier), "--task", "detection", "--calib", str(calib_dir), "--out",
                   str(tmp_path / "f"), "--quiet"], capsys)
    assert "--task detection but" in err and "classification model" in err and "detection_head" in err
    assert main(["export", str(tmp_path / "c"), "--out", str(tmp_path / "det.onnx"), "--quiet"]) == 2
    assert "exporting such a model is not built yet" in capsys.readouterr().err


# -- Swin stages of two widths through a feature pyramid --------------------------------------------

#: a two-stage Swin (widths 16 and 32, strides 4 and 8) that runs at the detector's padded sizes
SWIN = "swin_tiny_patch4_window7_224"
SWIN_KWARGS = {"img_size": SIZE, "patch_size": 4, "window_size": 4, "embed_dim": 16, "depths": [2, 2],
               "num_heads": [1, 2], "num_classes": 0, "strict_img_size": False}
SWIN_HEAD = {**HEAD, "indices": [0, 1], "fpn_channels": 24, "anchor_sizes": [[16], [32], [64]]}


def tiny_swin_detector(head=SWIN_HEAD):
    torch.manual_seed(0)
    return build_detector(timm.create_model(SWIN, **SWIN_KWARGS), head).eval()


def test_feature_pyramid_maps_have_exact_shapes_and_one_width():
    torch.manual_seed(0)
    swin = timm.create_model(SWIN, **SWIN_KWARGS)
    with pytest.raises(VitqError, match=r"different widths \[16, 32\]: .*feature pyramid \(fpn_channels\)"):
        TransformerFeatures(swin, [0, 1])
    with pytest.raises(VitqError, match="fpn_channels must be a positive integer"):
        TransformerFeatures(swin, [0, 1], fpn_channels=0)
    pyramid = TransformerFeatures(swin, [0, 1], fpn_channels=24)
    assert pyramid.out_channels == 24 and pyramid.num_maps == 3 and pyramid.featmap_names == ["0", "1"]
    with torch.no_grad():
        maps = pyramid(torch.rand(2, 3, 64, 96))  # stage 0: stride 4, stage 1: stride 8, pool: stride 16
    assert {k: tuple(v.shape) for k, v in maps.items()} == {"0": (2, 24, 16, 24), "1": (2, 24, 8, 12),
                                                             "pool": (2, 24, 4, 6)}
    assert list(maps) == ["0", "1", "pool"]
    vit = timm.create_model("test_vit", **KWARGS)  # one resolution: a pyramid over blocks is allowed
    with torch.no_grad():
        maps = TransformerFeatures(vit, [0, 2], fpn_channels=8)(torch.rand(1, 3, 64, 96))
    assert {k: tuple(v.shape) for k, v in maps.items()} == {"0": (1, 8, 8, 12), "1": (1, 8, 8, 12),
                                                             "pool": (1, 8, 4, 6)}


def test_card_pyramid_sets_the_anchors_and_pooler_levels():
    detector = tiny_swin_detector()
    assert isinstance(detector.backbone, TransformerFeatures) and detector.backbone.out_channels == 24
    assert detector.rpn.anchor_generator.sizes == ((16.0,), (32.0,), (64.0,))  # "0", "1" and "pool"
    assert detector.roi_heads.box_roi_pool.featmap_names == ["0", "1"]  # RoIs pool from the stages, not "pool"
    adapter = find_adapter(detector)  # the pyramid's convolutions are no second backbone
    assert adapter.path == "backbone.body"
    # default anchors: one size a level from 32 with a pyramid (torchvision's FPN), 32 to 512 on each map without
    head = {k: v for k, v in SWIN_HEAD.items() if k != "anchor_sizes"}
    assert DetectionHead.from_dict(head).anchor_sizes == ((32.0,), (64.0,), (128.0,))
    assert DetectionHead.from_dict({**head, "indices": [0, 1, 2, 3]}).anchor_sizes == tuple(
        (float(s),) for s in (32, 64, 128, 256, 512))
    assert DetectionHead.from_dict({**head, "fpn_channels": None}).anchor_sizes == ((32.0, 64.0, 128.0, 256.0,
                                                                                     512.0),) * 2
    for name in ("maskrcnn", "retinanet"):
        other = tiny_swin_detector({**SWIN_HEAD, "detector": name})
        with torch.no_grad():
            out = other([torch.rand(3, 48, 80)])
        assert {"boxes", "scores", "labels"} <= set(out[0])
        if name == "maskrcnn":
            assert other.roi_heads.mask_roi_pool.featmap_names == ["0", "1"]


def test_swin_fpn_detector_quantizes_its_backbone_only_scores_and_reloads(detection_batches, tmp_path):
    detector = tiny_swin_detector()
    result = vitq.quantize(detector, "omse", detection_batches, w_bits=4, a_bits=8, backbone="backbone.body",
                           progress=False)
    qdet = result.model
    assert result.plan.meta["backbone"] == "backbone.body"
    assert "layers.1.blocks.1.attn.qkv.weight_quantizer" in result.plan.rules  # the second stage is quantized
    names = [name for name, _ in iter_quantizers(qdet)]
    assert names and all(name.startswith("backbone.body.") for name in names)  # nothing in the pyramid
    convs = [m for m in qdet.backbone.fpn.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 4 and all(type(m) is torch.nn.Conv2d for m in convs)  # float: 2 lateral, 2 output
    for q, f in zip(qdet.backbone.fpn.state_dict().values(), detector.backbone.fpn.state_dict().values()):
        assert torch.equal(q, f)
    images = detection_batches[0][0]
    with torch.no_grad():
        q_maps = qdet.backbone(torch.stack(images))
        f_maps = detector.backbone(torch.stack(images))
        out = qdet(images)
    assert list(q_maps) == ["0", "1", "pool"]
    assert not torch.equal(q_maps["1"], f_maps["1"])
    assert set(out[0]) == {"boxes", "scores", "labels"}
    result.plan.save(tmp_path)
    again = apply_plan(tiny_swin_detector(), Plan.load(tmp_path / "plan.json"))
    with torch.no_grad():
        maps = again.backbone(torch.stack(images))
        assert all(torch.equal(maps[k], q_maps[k]) for k in q_maps)
        for a, b in zip(again(images), out):
            assert all(torch.equal(a[k], b[k]) for k in b)
    metrics = vitq.evaluate_detection(detector, qdet, detection_batches, coco_fixture(), progress=False)
    assert metrics["num_eval"] == 4 and 0.0 <= metrics["quant_bbox_ap"] <= 100.0


def test_cli_swin_fpn_detector_from_its_card_runs_and_eval_reproduces(calib_dir, coco_dir, tmp_path, capsys):
    ckpt = write_detector(tmp_path / "swin", SWIN_HEAD, arch=SWIN, kwargs=SWIN_KWARGS)
    out = tmp_path / "run"
    run_detection(["quantize", str(ckpt), "--recipe", "minmax", "--w-bits", "8", "--a-bits", "8", "--calib",
                   str(calib_dir), "--eval", str(coco_dir), "--out", str(out), "--device", "cpu", "--quiet"], capsys)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "detection" and metrics["num_eval"] == 3
    for key in ("fp_bbox_ap", "quant_bbox_ap", "fp_bbox_ap50", "quant_bbox_ap50"):
        assert 0.0 <= metrics[key] <= 100.0
    plan = Plan.load(out)
    assert plan.meta["backbone"] == "backbone.body" and "layers.1.blocks.0.attn.qkv.weight_quantizer" in plan.rules
    assert not any("fpn" in name for name in plan.rules)
    eval_out = tmp_path / "eval.json"
    run_detection(["eval", str(ckpt), "--plan", str(out), "--eval", str(coco_dir), "--out", str(eval_out),
                   "--device", "cpu", "--quiet"], capsys)
    again = json.loads(eval_out.read_text())
    assert again["fp_bbox"] == metrics["fp_bbox"] and again["quant_bbox"] == metrics["quant_bbox"]


@pytest.mark.parametrize("value", [0, -8, 2.5, "16", True])
def test_card_refuses_a_bad_fpn_channels(value, tmp_path, calib_dir, capsys):
    swin = timm.create_model(SWIN, **SWIN_KWARGS)
    with pytest.raises(VitqError, match=f"detection_head.fpn_channels must be a positive integer.*got {value!r}"):
        build_detector(swin, {**SWIN_HEAD, "fpn_channels": value})
    if value == 0:  # a card's error through the command line: one line, naming the card
        ckpt = write_detector(tmp_path / "swin", SWIN_HEAD, arch=SWIN, kwargs=SWIN_KWARGS)
        card = json.loads(ckpt.with_suffix(".json").read_text())
        card["detection_head"]["fpn_channels"] = value
        ckpt.with_suffix(".json").write_text(json.dumps(card))
        err = bad_run(["quantize", str(ckpt), "--calib", str(calib_dir), "--out", str(tmp_path / "e"), "--quiet"],
                      capsys)
        assert "det.json" in err and "fpn_channels must be a positive integer" in err


def test_card_without_a_pyramid_on_two_widths_names_fpn_channels():
    swin = timm.create_model(SWIN, **SWIN_KWARGS)
    head = {**SWIN_HEAD, "anchor_sizes": [[16], [32]]}
    del head["fpn_channels"]
    with pytest.raises(VitqError, match=r"different widths \[16, 32\].*fpn_channels"):
        build_detector(swin, head)
    with pytest.raises(VitqError, match=r"anchor_sizes .* \(3: one per index, then one for the pyramid's pool\)"):
        build_detector(swin, {**SWIN_HEAD, "anchor_sizes": [[16], [32]]})
