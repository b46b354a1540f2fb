"""A semantic-segmentation model around a timm ViT/DeiT/Swin backbone, and resizing a ViT to a new grid.

:class:`ViTSegmenter` is vitq's reference dense model (``benchmarks/segmentation.py`` trains its head
on CamVid): the backbone's features at a few blocks, upsampled to the finest grid, concatenated and
fed to a two-layer convolutional head whose logits are upsampled to the input size. Any other
module that holds a timm ViT/Swin quantizes the same way (:func:`vitq.models.find_adapter` finds
the backbone); this one is simply the model vitq can build from a model card.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import nn

from ..errors import VitqError


def _feature_channels(backbone: nn.Module, indices: Sequence[int]) -> List[int]:
    from .adapters import ModelAdapter, find_adapter

    try:
        adapter: Optional[ModelAdapter] = find_adapter(backbone)
    except VitqError:
        adapter = None
    if adapter is None or not type(adapter).matches(backbone):
        raise VitqError(f"a segmentation backbone must be a timm VisionTransformer or SwinTransformer, "
                        f"got {type(backbone).__name__}")
    return adapter.feature_channels(backbone, indices)


class ViTSegmenter(nn.Module):
    """Per-pixel class logits ``[B, num_classes, H, W]`` from a transformer backbone.

    Args:
        backbone: a timm ``VisionTransformer`` (features of blocks ``indices``) or
            ``SwinTransformer`` (features of stages ``indices``), without its classifier.
        indices: which blocks (ViT) or stages (Swin) feed the head.
        num_classes: output classes.
        hidden: channels of the head's hidden layer; 0: a linear head.
        kernel: the first head layer's kernel size (1 or 3).

    Example:
        >>> import timm
        >>> seg = ViTSegmenter(timm.create_model("test_vit", num_classes=0, img_size=(32, 48)), [0, 1], 5, hidden=8)
        >>> seg(torch.zeros(1, 3, 32, 48)).shape
        torch.Size([1, 5, 32, 48])
    """

    task = "segmentation"

    def __init__(self, backbone: nn.Module, indices: Sequence[int], num_classes: int, hidden: int = 256,
                 kernel: int = 1) -> None:
        super().__init__()
        if not indices:
            raise VitqError("a segmenter needs the index of at least one backbone block")
        if kernel not in (1, 3):
            raise VitqError(f"the head's kernel must be 1 or 3, got {kernel}")
        self.backbone = backbone
        self.indices = [int(i) for i in indices]
        self.num_classes = int(num_classes)
        channels = sum(_feature_channels(backbone, self.indices))
        self.norm = nn.BatchNorm2d(channels)
        if hidden:
            self.head = nn.Sequential(
                nn.Conv2d(channels, hidden, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(hidden),
                nn.GELU(), nn.Conv2d(hidden, num_classes, 1))
        else:
            self.head = nn.Conv2d(channels, num_classes, kernel, padding=kernel // 2)

    @property
    def pretrained_cfg(self) -> Dict:
        """The backbone's (timm's data config reads the preprocessing from it)."""
        return getattr(self.backbone, "pretrained_cfg", {})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The head's input: the chosen features on the finest grid, concatenated ``[B, C, h, w]``."""
        feats = self.backbone.forward_intermediates(x, indices=self.indices, intermediates_only=True,
                                                    output_fmt="NCHW")
        size = feats[0].shape[-2:]
        feats = [f if f.shape[-2:] == size else F.interpolate(f, size=size, mode="bilinear", align_corners=False)
                 for f in feats]
        return torch.cat(feats, dim=1)

    def classify(self, features: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        """Logits at ``size`` from :meth:`features` (what the head adds)."""
        logits = self.head(self.norm(features))
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x), tuple(x.shape[-2:]))


def build_segmenter(backbone: nn.Module, head: Dict) -> ViTSegmenter:
    """A :class:`ViTSegmenter` from a model card's ``segmentation_head`` section
    (``indices``, ``num_classes``, optional ``hidden`` and ``kernel``)."""
    unknown = set(head) - {"indices", "num_classes", "hidden", "kernel"}
    if unknown or "indices" not in head or "num_classes" not in head:
        raise VitqError(f"a model card's segmentation_head needs indices and num_classes (optional: hidden, kernel); "
                        f"got {sorted(head)}")
    return ViTSegmenter(backbone, head["indices"], head["num_classes"], head.get("hidden", 256),
                        head.get("kernel", 1))


def resize_vit_grid(state: Dict[str, torch.Tensor], grid: Tuple[int, int], num_prefix_tokens: int = 1
                    ) -> Dict[str, torch.Tensor]:
    """A ViT state dict whose absolute position embedding is resampled (bicubic) to ``grid``
    patches (e.g. 14×14 at 224 → 22×30 at 352×480), for a model built with the new ``img_size``."""
    if "pos_embed" not in state:
        raise VitqError("the state dict has no pos_embed: not a ViT with absolute position embeddings")
    out = dict(state)
    out["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], new_size=list(grid),
                                              num_prefix_tokens=num_prefix_tokens)
    return out
