"""Semantic-segmentation scores: dataset-level IoU from a confusion matrix, and a float-vs-quantized pass.

mIoU is the standard dataset-level one: the intersection and the union of each class are summed over
all images (void pixels ignored) before their ratio is taken, then averaged over the classes
(torchmetrics' ``MulticlassJaccardIndex(average="macro", ignore_index=...)``); a class that appears
neither in the labels nor in the predictions has no IoU and is left out of the mean.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import VitqError


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: Optional[int] = None) -> torch.Tensor:
    """``[K, K]`` int64 counts: row = label, column = prediction, pixels labelled ``ignore_index`` left out.

    Raises:
        VitqError: a label outside ``0..K-1`` that is not ``ignore_index``.

    Example:
        >>> confusion_matrix(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]), 2).tolist()
        [[1, 1], [0, 1]]
    """
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    if pred.shape != target.shape:
        raise VitqError(f"predictions have {pred.numel()} pixels but the labels {target.numel()}")
    keep = target != ignore_index if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
    pred, target = pred[keep], target[keep]
    if target.numel() and (target.min() < 0 or target.max() >= num_classes):
        bad = int(target[(target < 0) | (target >= num_classes)][0])
        raise VitqError(f"a label map holds class {bad}, outside 0..{num_classes - 1}"
                        + (f" and not the ignore index {ignore_index}" if ignore_index is not None else "")
                        + ": is this set the one the model was trained on?")
    return torch.bincount(target * num_classes + pred, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def iou_per_class(confusion: torch.Tensor) -> List[Optional[float]]:
    """IoU (percent) of each class; None where the class is in neither labels nor predictions.

    Example:
        >>> iou_per_class(torch.tensor([[1, 1], [0, 1]]))  # class 0: 1/(1+1); class 1: 1/(1+1)
        [50.0, 50.0]
    """
    cm = confusion.double()
    inter = cm.diag()
    union = cm.sum(0) + cm.sum(1) - inter
    return [None if u == 0 else 100.0 * float(i / u) for i, u in zip(inter, union)]


def mean_iou(confusion: torch.Tensor) -> float:
    """Mean of :func:`iou_per_class` over the classes that have one (percent)."""
    ious = [v for v in iou_per_class(confusion) if v is not None]
    if not ious:
        raise VitqError("no labelled pixels: mIoU is undefined")
    return sum(ious) / len(ious)


def pixel_accuracy(confusion: torch.Tensor) -> float:
    """Percent of labelled (non-void) pixels predicted right."""
    total = int(confusion.sum())
    if total == 0:
        raise VitqError("no labelled pixels: pixel accuracy is undefined")
    return 100.0 * float(confusion.diag().sum()) / total


def _resized(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


@torch.no_grad()
def compare_segmentation(
    models: Union[nn.Module, Sequence[nn.Module]],
    batches: Iterable,
    num_classes: int,
    ignore_index: Optional[int] = None,
    device: Union[str, torch.device] = "cpu",
    progress: bool = True,
    keep: Union[int, Sequence[int]] = 0,
) -> Dict[str, Any]:
    """One pass of ``(images, labels)`` batches through each model (the first is the reference,
    usually the float model): a confusion matrix per model, and for each other model its pixel
    agreement with the first (percent of all pixels with the same class) and the mean per-pixel
    KL(first ‖ model). Logits are resized (bilinear) to each label map's size before scoring.

    Returns:
        ``{"confusion": [K×K per model], "agreement": [...], "kl": [...], "num_images": n,
        "examples": [(image, label, [pred per model]), ...]}`` (on CPU: the first ``keep`` images,
        or those at the indices ``keep``).
    """
    wanted = set(range(keep)) if isinstance(keep, int) else {int(i) for i in keep}
    models = [models] if isinstance(models, nn.Module) else list(models)
    for model in models:
        model.eval().to(device)
    cms = [torch.zeros(num_classes, num_classes, dtype=torch.int64) for _ in models]
    same = [0] * len(models)
    kl = [0.0] * len(models)
    pixels = 0
    count = 0
    examples: List = []
    for images, labels in tqdm(batches, desc="evaluate", unit="batch", disable=not progress, leave=False):
        images = images.to(device)
        outs = [model(images).float() for model in models]
        for o in outs:
            if o.ndim != 4 or o.shape[1] != num_classes:
                raise VitqError(f"a segmentation model must output [B, {num_classes}, H, W] logits, "
                                f"got {tuple(o.shape)}")
        for j in range(len(images)):
            label = labels[j].cpu()
            per = [_resized(o[j:j + 1], label.shape[-2:])[0].cpu() for o in outs]
            preds = [p.argmax(0) for p in per]
            for m, pred in enumerate(preds):
                cms[m] += confusion_matrix(pred, label, num_classes, ignore_index)
            ref_logp = F.log_softmax(per[0].double(), dim=0)
            for m in range(1, len(models)):
                same[m] += int((preds[m] == preds[0]).sum())
                logp = F.log_softmax(per[m].double(), dim=0)
                kl[m] += float((ref_logp.exp() * (ref_logp - logp)).sum())
            pixels += label.numel()
            if count in wanted:
                examples.append((images[j].cpu(), label, preds))
            count += 1
    if not count:
        raise VitqError("evaluation got no images")
    return {
        "confusion": cms,
        "agreement": [None] + [100.0 * same[m] / pixels for m in range(1, len(models))],
        "kl": [None] + [kl[m] / pixels for m in range(1, len(models))],
        "num_images": count,
        "examples": examples,
    }


def segmentation_metrics(fp_confusion: torch.Tensor, q_confusion: torch.Tensor, agreement: float, kl: float,
                         classes: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """The metrics a segmentation run reports: mIoU and pixel accuracy of both models (percent),
    pixel agreement, per-pixel KL, and each class's IoU."""
    fp_iou, q_iou = iou_per_class(fp_confusion), iou_per_class(q_confusion)
    names = list(classes) if classes and len(classes) == len(fp_iou) else [str(i) for i in range(len(fp_iou))]
    rnd = lambda v: None if v is None else round(v, 4)  # noqa: E731
    return {
        "fp_miou": round(mean_iou(fp_confusion), 4),
        "quant_miou": round(mean_iou(q_confusion), 4),
        "fp_pixel_acc": round(pixel_accuracy(fp_confusion), 4),
        "quant_pixel_acc": round(pixel_accuracy(q_confusion), 4),
        "pixel_agreement": round(agreement, 4),
        "kl": float(f"{kl:.6g}"),
        "per_class_iou": {n: {"fp": rnd(f), "quant": rnd(q)} for n, f, q in zip(names, fp_iou, q_iou)},
    }
