"""Detection scores with pycocotools' COCOeval (box AP, and mask AP when the model predicts masks).

Needs ``pycocotools`` (``pip install 'vitq[detection]'``). A detector here is a torchvision-style
model: in eval mode it takes a list of ``[3, H, W]`` images and returns, per image, a dict with
``boxes`` (``[N, 4]`` x1 y1 x2 y2, in the image's pixels), ``scores``, ``labels`` and optionally
``masks`` (``[N, 1, H, W]`` probabilities).
"""
from __future__ import annotations

import contextlib
import io
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import VitqError

#: COCOeval's summary, in its order
STATS = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large", "ar1", "ar10", "ar100", "ar_small",
         "ar_medium", "ar_large")


def _coco():
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise VitqError("detection scores need pycocotools: pip install 'vitq[detection]'") from None
    return COCO, COCOeval


def load_coco(annotations: Union[str, Mapping[str, Any]]):
    """A pycocotools ``COCO`` object from a COCO-format JSON file or dict (``images``,
    ``annotations``, ``categories``)."""
    COCO, _ = _coco()
    coco = COCO()
    if isinstance(annotations, Mapping):
        data = dict(annotations)
    else:
        import json
        from pathlib import Path

        path = Path(annotations).expanduser()
        if not path.is_file():
            raise VitqError(f"COCO annotation file {path} does not exist")
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise VitqError(f"cannot read COCO annotations {path}: {err}") from None
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise VitqError(f"COCO annotations need '{key}'")
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def to_coco_results(outputs: Sequence[Mapping[str, torch.Tensor]], image_ids: Sequence[int],
                    label_to_category: Optional[Mapping[int, int]] = None, mask_threshold: float = 0.5
                    ) -> List[Dict[str, Any]]:
    """Detector outputs as COCO result entries (``bbox`` as x, y, w, h; ``segmentation`` as RLE
    when the outputs have ``masks``)."""
    results = []
    for out, image_id in zip(outputs, image_ids):
        boxes = out["boxes"].detach().cpu().double()
        scores, labels = out["scores"].detach().cpu(), out["labels"].detach().cpu()
        masks = out.get("masks")
        for k in range(len(boxes)):
            x1, y1, x2, y2 = boxes[k].tolist()
            label = int(labels[k])
            entry = {"image_id": int(image_id),
                     "category_id": int(label_to_category[label]) if label_to_category else label,
                     "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(scores[k])}
            if masks is not None:
                from pycocotools import mask as mask_utils

                binary = (masks[k, 0] > mask_threshold).cpu().numpy().astype(np.uint8)
                rle = mask_utils.encode(np.asfortranarray(binary))
                rle["counts"] = rle["counts"].decode("ascii")
                entry["segmentation"] = rle
            results.append(entry)
    return results


def coco_scores(coco_gt, results: List[Dict[str, Any]], iou_type: str = "bbox") -> Dict[str, float]:
    """COCOeval's twelve summary numbers (percent; -100 where COCOeval has none) for ``results``."""
    _, COCOeval = _coco()
    if not results:
        return {k: 0.0 for k in STATS}
    with contextlib.redirect_stdout(io.StringIO()):
        dets = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, dets, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: round(100.0 * float(v), 4) for k, v in zip(STATS, ev.stats)}


def _has_masks(coco_gt) -> bool:
    """Whether every ground-truth object has a ``segmentation`` (mask AP needs them)."""
    anns = coco_gt.dataset.get("annotations", [])
    return bool(anns) and all("segmentation" in a for a in anns)


@torch.no_grad()
def detect(model: nn.Module, batches: Iterable, device: Union[str, torch.device] = "cpu",
           progress: bool = True) -> tuple:
    """Run a detector over ``(images, targets)`` batches (targets carry ``image_id``); returns the
    outputs (on CPU) and the image ids."""
    model.eval().to(device)
    outputs, ids = [], []
    for images, targets in tqdm(batches, desc="detect", unit="batch", disable=not progress, leave=False):
        out = model([img.to(device) for img in images])
        outputs += [{k: v.cpu() for k, v in o.items()} for o in out]
        ids += [int(t["image_id"]) for t in targets]
    if not ids:
        raise VitqError("evaluation got no images")
    return outputs, ids


def compare_detection(float_model: nn.Module, quantized_model: nn.Module, batches: Iterable, coco_gt,
                      label_to_category: Optional[Mapping[int, int]] = None,
                      device: Union[str, torch.device] = "cpu", progress: bool = True) -> Dict[str, Any]:
    """Box AP (and mask AP when predicted, and the annotations have masks) of both models on the same
    images: ``fp_bbox_ap``, ``quant_bbox_ap``, ... with every COCOeval summary number under
    ``fp_bbox`` / ``quant_bbox``."""
    if iter(batches) is batches:  # a generator runs once: keep its batches for the second model
        batches = list(batches)
    metrics: Dict[str, Any] = {}
    for tag, model in (("fp", float_model), ("quant", quantized_model)):
        outputs, ids = detect(model, batches, device, progress)
        results = to_coco_results(outputs, ids, label_to_category)
        masks = bool(outputs) and "masks" in outputs[0] and _has_masks(coco_gt)
        types = ["bbox"] + (["segm"] if masks else [])
        for iou_type in types:
            scores = coco_scores(coco_gt, results, iou_type)
            metrics[f"{tag}_{iou_type}_ap"] = scores["ap"]
            metrics[f"{tag}_{iou_type}_ap50"] = scores["ap50"]
            metrics[f"{tag}_{iou_type}"] = scores
    metrics["num_eval"] = len(ids)
    return metrics
