"""Detection: a torchvision Faster R-CNN on a timm ViT backbone quantizes by the backbone's path,
runs, reloads from its plan, and scores with COCOeval (exact values on hand-made boxes)."""
from __future__ import annotations

import pytest
import timm
import torch

import vitq
from vitq.errors import VitqError
from vitq.methods import Plan, apply_plan
from vitq.models.detection import TransformerFeatures

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
