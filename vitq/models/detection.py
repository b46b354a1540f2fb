"""A timm transformer as the backbone of a torchvision detector (Faster/Mask R-CNN, RetinaNet, ...).

torchvision's detectors take a ``backbone`` module with an ``out_channels`` attribute whose forward
returns an ordered dict of feature maps. :class:`TransformerFeatures` makes one of a timm ViT (the
feature maps of some blocks, on the patch grid) or Swin (some stages), optionally through a float
feature pyramid (torchvision's FPN) that brings maps of any widths to one. The ViT should be built
with ``dynamic_img_size=True`` and the Swin with ``strict_img_size=False``: the detector resizes and
pads its images to sizes of its own.

:func:`build_detector` makes a whole detector (Faster R-CNN, Mask R-CNN or RetinaNet) on one from a
model card's ``detection_head`` section; that is how ``vitq quantize DET.pth --task detection`` gets it.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from ..errors import VitqError, reject_unknown_keys
from ..registry import Registry
from .segmentation import _feature_channels


class TransformerFeatures(nn.Module):
    """``{"0": features of indices[0], "1": ...}`` (``[B, C, h, w]``) from a timm ViT or Swin held
    as ``self.body`` (the path to quantize: ``vitq.quantize(detector, ..., backbone="backbone.body")``).

    Without ``fpn_channels`` all maps must have the same number of channels (torchvision's heads share
    one ``out_channels``). With it, the maps (of any widths: Swin's stages) go through torchvision's
    ``FeaturePyramidNetwork`` with a max-pooled extra level, as torchvision's ``resnet_fpn_backbone``
    does: ``{"0": ..., "n-1": ..., "pool": ...}``, each of ``fpn_channels`` channels. The pyramid
    (``self.fpn``) is part of the detector, not of the transformer: it stays float. Give the indices
    from the finest map to the coarsest.

    Args:
        body: a timm ``VisionTransformer`` or ``SwinTransformer`` without its classifier.
        indices: the blocks (ViT) or stages (Swin) whose features are returned.
        fpn_channels: the feature pyramid's width; None: no pyramid.

    Example:
        >>> import timm
        >>> vit = timm.create_model("test_vit", num_classes=0, dynamic_img_size=True)
        >>> feats = TransformerFeatures(vit, [1])(torch.zeros(1, 3, 64, 96))
        >>> tuple(feats["0"].shape)
        (1, 64, 4, 6)
        >>> pyramid = TransformerFeatures(vit, [0, 1], fpn_channels=32)(torch.zeros(1, 3, 64, 96))
        >>> {k: tuple(v.shape) for k, v in pyramid.items()}
        {'0': (1, 32, 4, 6), '1': (1, 32, 4, 6), 'pool': (1, 32, 2, 3)}
    """

    def __init__(self, body: nn.Module, indices: Sequence[int], fpn_channels: Optional[int] = None) -> None:
        super().__init__()
        self.body = body
        self.indices = [int(i) for i in indices]
        widths = _feature_channels(body, self.indices)
        self.fpn: Optional[nn.Module] = None
        if fpn_channels is None:
            if len(set(widths)) != 1:
                raise VitqError(f"the chosen features have different widths {sorted(set(widths))}: pick maps of one "
                                "width, or bring them to one through a feature pyramid (fpn_channels)")
            self.out_channels = widths[0]
        else:
            if not _is_int(fpn_channels) or fpn_channels <= 0:
                raise VitqError(f"fpn_channels must be a positive integer (the pyramid's width), got {fpn_channels!r}")
            from torchvision.ops import FeaturePyramidNetwork
            from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

            self.fpn = FeaturePyramidNetwork(widths, fpn_channels, extra_blocks=LastLevelMaxPool())
            self.out_channels = int(fpn_channels)

    @property
    def featmap_names(self) -> List[str]:
        """The names of the maps the RoI heads pool from: every map but the pyramid's extra ``pool``."""
        return [str(i) for i in range(len(self.indices))]

    @property
    def num_maps(self) -> int:
        """How many maps ``forward`` returns (the anchor generator needs sizes for each)."""
        return len(self.indices) + (1 if self.fpn is not None else 0)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        feats = self.body.forward_intermediates(x, indices=self.indices, intermediates_only=True, output_fmt="NCHW")
        maps = OrderedDict(zip(self.featmap_names, feats))
        return self.fpn(maps) if self.fpn is not None else maps


#: what a card's ``detection_head`` may say of the detector built around the backbone
@dataclass(frozen=True)
class DetectionHead:
    """A model card's ``detection_head``: which torchvision detector sits on the transformer's features.

    Attributes:
        detector: a name of :data:`DETECTORS` (``fasterrcnn``, ``maskrcnn``, ``retinanet``).
        indices: the backbone blocks (ViT) or stages (Swin) whose features the heads read, as
            :class:`TransformerFeatures` takes them.
        num_classes: the detector's classes as torchvision counts them (the R-CNNs include the
            background, label 0).
        fpn_channels: the width of a feature pyramid (torchvision's FPN, with a max-pooled extra
            level named ``pool``) between the backbone and the heads; needed when the maps have
            different widths (Swin's stages). None: the maps go to the heads as they are.
        min_size, max_size: torchvision's resize of each image (shorter side, cap on the longer).
        anchor_sizes: one list of anchor sizes (pixels) per feature map the backbone returns (with a
            pyramid: one per index, then one for its ``pool`` level). Default: without a pyramid, 32
            to 512 on each map; with one, one size a level from 32, doubling (torchvision's FPN
            detectors: 32, 64, 128, 256, 512).
        aspect_ratios: one list for every map, or one list per map; default 0.5, 1, 2.
        box_score_thresh: detections scoring less are dropped.
        detections_per_img: at most this many detections an image (default: torchvision's, 100 for
            the R-CNNs, 300 for RetinaNet).
        image_mean, image_std: the detector's normalisation; default: the backbone's timm config.
        label_to_category: the model's label → COCO category id (JSON keys are strings).
    """

    detector: str
    indices: Tuple[int, ...]
    num_classes: int
    fpn_channels: Optional[int] = None
    min_size: int = 800
    max_size: int = 1333
    anchor_sizes: Optional[Tuple[Tuple[float, ...], ...]] = None
    aspect_ratios: Any = (0.5, 1.0, 2.0)
    box_score_thresh: float = 0.05
    detections_per_img: Optional[int] = None
    image_mean: Optional[Tuple[float, ...]] = None
    image_std: Optional[Tuple[float, ...]] = None
    label_to_category: Optional[Dict[int, int]] = None

    @classmethod
    def from_dict(cls, head: Mapping[str, Any], where: str = "detection_head") -> "DetectionHead":
        reject_unknown_keys(cls, head, f"a model card's {where}")
        missing = [k for k in ("detector", "indices", "num_classes") if k not in head]
        if missing:
            raise VitqError(f"a model card's {where} needs {', '.join(missing)} (optional: fpn_channels, "
                            "min_size, max_size, anchor_sizes, aspect_ratios, box_score_thresh, detections_per_img, "
                            "image_mean, image_std, label_to_category)")
        return cls(**head)

    def __post_init__(self) -> None:
        where = "detection_head"
        DETECTORS.get(self.detector)  # an unknown name is refused with the choices
        if not isinstance(self.indices, (list, tuple)) or not self.indices or not all(_is_int(i) for i in self.indices):
            raise VitqError(f"{where}.indices must be a non-empty list of block (ViT) or stage (Swin) indices, "
                            f"got {self.indices!r}")
        object.__setattr__(self, "indices", tuple(int(i) for i in self.indices))
        least = 1 if self.detector == "retinanet" else 2
        if not _is_int(self.num_classes) or self.num_classes < least:
            raise VitqError(f"{where}.num_classes must be an integer of at least {least} "
                            f"({'the background and one class' if least == 2 else 'one class'}), "
                            f"got {self.num_classes!r}")
        for key in ("min_size", "max_size"):
            if not _is_int(getattr(self, key)) or getattr(self, key) <= 0:
                raise VitqError(f"{where}.{key} must be a positive integer (pixels), got {getattr(self, key)!r}")
        if self.fpn_channels is not None and (not _is_int(self.fpn_channels) or self.fpn_channels <= 0):
            raise VitqError(f"{where}.fpn_channels must be a positive integer (the feature pyramid's width), "
                            f"got {self.fpn_channels!r}")
        maps = self.num_maps
        if self.anchor_sizes is not None:
            sizes = self.anchor_sizes
        elif self.fpn_channels is None:
            sizes = [[32, 64, 128, 256, 512]] * maps
        else:
            sizes = [[32 * 2 ** level] for level in range(maps)]
        if (not isinstance(sizes, (list, tuple)) or len(sizes) != maps
                or not all(isinstance(s, (list, tuple)) and s and all(_is_positive(v) for v in s) for s in sizes)):
            which = "one per index" if self.fpn_channels is None else "one per index, then one for the pyramid's pool"
            raise VitqError(f"{where}.anchor_sizes must hold one non-empty list of positive sizes per feature map "
                            f"({maps}: {which}), got {self.anchor_sizes!r}")
        object.__setattr__(self, "anchor_sizes", tuple(tuple(float(v) for v in s) for s in sizes))
        ratios = self.aspect_ratios
        if isinstance(ratios, (list, tuple)) and ratios and all(_is_positive(r) for r in ratios):
            ratios = [ratios] * maps
        if (not isinstance(ratios, (list, tuple)) or len(ratios) != maps
                or not all(isinstance(r, (list, tuple)) and r and all(_is_positive(v) for v in r) for r in ratios)):
            raise VitqError(f"{where}.aspect_ratios must be a list of positive ratios (for every map) or one such "
                            f"list per feature map ({maps}), got {self.aspect_ratios!r}")
        object.__setattr__(self, "aspect_ratios", tuple(tuple(float(v) for v in r) for r in ratios))
        per_place = {len(s) * len(r) for s, r in zip(self.anchor_sizes, self.aspect_ratios)}
        if len(per_place) != 1:
            raise VitqError(f"{where}: every feature map needs as many anchors per place (sizes × ratios), got "
                            f"{sorted(per_place)}: torchvision's heads share one predictor")
        if not isinstance(self.box_score_thresh, (int, float)) or isinstance(self.box_score_thresh, bool) \
                or not 0.0 <= self.box_score_thresh <= 1.0:
            raise VitqError(f"{where}.box_score_thresh must be a number from 0 to 1, got {self.box_score_thresh!r}")
        if self.detections_per_img is not None and (not _is_int(self.detections_per_img)
                                                    or self.detections_per_img <= 0):
            raise VitqError(f"{where}.detections_per_img must be a positive integer, got {self.detections_per_img!r}")
        for key in ("image_mean", "image_std"):
            value = getattr(self, key)
            if value is not None:
                if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(_is_positive(v) or v == 0
                                                                                      for v in value):
                    raise VitqError(f"{where}.{key} must be three numbers (RGB), got {value!r}")
                object.__setattr__(self, key, tuple(float(v) for v in value))
        if self.label_to_category is not None:
            object.__setattr__(self, "label_to_category", _label_map(self.label_to_category, self.num_classes,
                                                                     self.detector != "retinanet"))

    @property
    def num_maps(self) -> int:
        """How many feature maps the backbone returns: one per index, and the pyramid's ``pool``."""
        return len(self.indices) + (1 if self.fpn_channels is not None else 0)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _label_map(mapping: Any, num_classes: int, background: bool) -> Dict[int, int]:
    """``{"1": 18, ...}`` (JSON) as ``{1: 18}``, every label one the detector can output."""
    where = "detection_head.label_to_category"
    if not isinstance(mapping, Mapping):
        raise VitqError(f"{where} must be an object of model label → COCO category id, got {mapping!r}")
    out = {}
    for label, category in mapping.items():
        try:
            key = int(label)
        except (TypeError, ValueError):
            key = None
        if key is None or not _is_int(category):
            raise VitqError(f"{where}: {label!r}: {category!r} is not an integer label → integer category id")
        first = 1 if background else 0
        if not first <= key < num_classes:
            raise VitqError(f"{where}: label {key} is not one the detector outputs ({first} to {num_classes - 1}"
                            + (", 0 being the background)" if background else ")"))
        out[key] = category
    return out


#: torchvision detectors by name: ``builder(features, head, mean, std) -> model``
DETECTORS: Registry[Callable[..., nn.Module]] = Registry("detector")


def _anchors(head: DetectionHead):
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    return AnchorGenerator(sizes=head.anchor_sizes, aspect_ratios=head.aspect_ratios)


def _roi_pool(features: TransformerFeatures, size: int):
    from torchvision.ops import MultiScaleRoIAlign

    # the maps of the indices, not the pyramid's extra pool level (as torchvision's FPN detectors)
    return MultiScaleRoIAlign(features.featmap_names, output_size=size, sampling_ratio=2)


def _common(head: DetectionHead, mean, std) -> Dict[str, Any]:
    return dict(min_size=head.min_size, max_size=head.max_size, image_mean=list(mean), image_std=list(std))


def _limit(head: DetectionHead, key: str) -> Dict[str, Any]:
    return {key: head.detections_per_img} if head.detections_per_img is not None else {}


@DETECTORS.register("fasterrcnn")
def _faster_rcnn(features: TransformerFeatures, head: DetectionHead, mean, std) -> nn.Module:
    from torchvision.models.detection import FasterRCNN

    return FasterRCNN(features, head.num_classes, rpn_anchor_generator=_anchors(head),
                      box_roi_pool=_roi_pool(features, 7), box_score_thresh=head.box_score_thresh,
                      **_limit(head, "box_detections_per_img"), **_common(head, mean, std))


@DETECTORS.register("maskrcnn")
def _mask_rcnn(features: TransformerFeatures, head: DetectionHead, mean, std) -> nn.Module:
    from torchvision.models.detection import MaskRCNN

    return MaskRCNN(features, head.num_classes, rpn_anchor_generator=_anchors(head),
                    box_roi_pool=_roi_pool(features, 7), mask_roi_pool=_roi_pool(features, 14),
                    box_score_thresh=head.box_score_thresh, **_limit(head, "box_detections_per_img"),
                    **_common(head, mean, std))


@DETECTORS.register("retinanet")
def _retinanet(features: TransformerFeatures, head: DetectionHead, mean, std) -> nn.Module:
    from torchvision.models.detection import RetinaNet

    return RetinaNet(features, head.num_classes, anchor_generator=_anchors(head), score_thresh=head.box_score_thresh,
                     **_limit(head, "detections_per_img"), **_common(head, mean, std))


def build_detector(backbone: nn.Module, head: Union[Mapping[str, Any], DetectionHead]) -> nn.Module:
    """A torchvision detector on a timm ViT/Swin from a model card's ``detection_head`` section
    (:class:`DetectionHead`). The model has ``task = "detection"`` and ``label_to_category`` (None
    when the labels are the category ids); its backbone is ``backbone.body``.

    Example:
        >>> import timm
        >>> vit = timm.create_model("test_vit", img_size=64, patch_size=8, num_classes=0, dynamic_img_size=True)
        >>> det = build_detector(vit, {"detector": "fasterrcnn", "indices": [2], "num_classes": 3, "min_size": 64,
        ...                            "max_size": 64, "anchor_sizes": [[16, 32]]})
        >>> det.task, type(det).__name__
        ('detection', 'FasterRCNN')
    """
    if not isinstance(head, DetectionHead):
        if not isinstance(head, Mapping):
            raise VitqError(f"a model card's detection_head must be an object, got {type(head).__name__}")
        head = DetectionHead.from_dict(head)
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    mean = head.image_mean or tuple(cfg.get("mean") or IMAGENET_DEFAULT_MEAN)
    std = head.image_std or tuple(cfg.get("std") or IMAGENET_DEFAULT_STD)
    features = TransformerFeatures(backbone, head.indices, fpn_channels=head.fpn_channels)
    model = DETECTORS.get(head.detector)(features, head, mean, std)
    model.task = "detection"
    model.label_to_category = dict(head.label_to_category) if head.label_to_category else None
    model.pretrained_cfg = {**cfg, "mean": mean, "std": std}  # timm's data config reads the normalisation here
    return model
