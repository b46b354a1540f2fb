"""A timm transformer as the backbone of a torchvision detector (Faster/Mask R-CNN, RetinaNet, ...).

torchvision's detectors take a ``backbone`` module with an ``out_channels`` attribute whose forward
returns an ordered dict of feature maps. :class:`TransformerFeatures` makes one of a timm ViT (the
feature maps of some blocks, on the patch grid) or Swin (some stages). The ViT should be built with
``dynamic_img_size=True``: the detector resizes and pads its images to sizes of its own.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Sequence

import torch
from torch import nn

from ..errors import VitqError
from .segmentation import _feature_channels


class TransformerFeatures(nn.Module):
    """``{"0": features of indices[0], "1": ...}`` (``[B, C, h, w]``) from a timm ViT or Swin held
    as ``self.body`` (the path to quantize: ``vitq.quantize(detector, ..., backbone="backbone.body")``).

    All maps must have the same number of channels (torchvision's heads share one ``out_channels``).

    Example:
        >>> import timm
        >>> vit = timm.create_model("test_vit", num_classes=0, dynamic_img_size=True)
        >>> feats = TransformerFeatures(vit, [1])(torch.zeros(1, 3, 64, 96))
        >>> tuple(feats["0"].shape)
        (1, 64, 4, 6)
    """

    def __init__(self, body: nn.Module, indices: Sequence[int]) -> None:
        super().__init__()
        self.body = body
        self.indices = [int(i) for i in indices]
        channels = set(_feature_channels(body, self.indices))
        if len(channels) != 1:
            raise VitqError(f"the chosen features have different widths {sorted(channels)}: pick maps of one width")
        self.out_channels = channels.pop()

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        feats = self.body.forward_intermediates(x, indices=self.indices, intermediates_only=True, output_fmt="NCHW")
        return OrderedDict((str(i), f) for i, f in enumerate(feats))
