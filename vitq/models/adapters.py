"""Model adapters: which float modules of a model family become which quantized modules.

Chosen by module type through a registry, never by module names.
"""
from __future__ import annotations

from typing import Dict, Iterator, Tuple, Type

import timm.layers
from timm.layers.attention import Attention
from timm.models.swin_transformer import SwinTransformer, WindowAttention
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..errors import VitqError
from ..nn import QuantAttention, QuantConv2d, QuantLayerNorm, QuantLinear, QuantModule, QuantWindowAttention
from ..quant.quantizer import Quantizer
from ..registry import Registry

ADAPTERS: Registry[type] = Registry("model adapter")

_COMMON: Dict[type, Type[QuantModule]] = {
    nn.Linear: QuantLinear,
    nn.Conv2d: QuantConv2d,
    nn.LayerNorm: QuantLayerNorm,
    timm.layers.LayerNorm: QuantLayerNorm,
}


class ModelAdapter:
    """Maps the modules of one model family to quantized modules.

    Matching is by exact type: a subclass with a different forward (e.g. a channels-first
    LayerNorm) is not silently treated as its parent.
    """

    family: str = ""
    model_types: Tuple[type, ...] = ()
    module_map: Dict[type, Type[QuantModule]] = {}

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, cls.model_types)

    def check(self, model: nn.Module) -> None:
        """Raise a :class:`VitqError` naming what the model lacks for this adapter."""

    def quantize_modules(self, model: nn.Module) -> nn.Module:
        """Replace, in place, every mapped float module of ``model`` by its quantized module."""
        self.check(model)
        self._swap(model)
        return model

    def _swap(self, module: nn.Module) -> None:
        for name, child in list(module.named_children()):
            if isinstance(child, (QuantModule, Quantizer)):
                continue
            qcls = self.module_map.get(type(child))
            if qcls is not None:
                child = qcls.from_float(child)
                setattr(module, name, child)
            self._swap(child)


@ADAPTERS.register("vit")
class ViTAdapter(ModelAdapter):
    family = "ViT, DeiT and distilled DeiT (timm VisionTransformer)"
    model_types = (VisionTransformer,)
    module_map = {**_COMMON, Attention: QuantAttention}

    def check(self, model: nn.Module) -> None:
        for i, block in enumerate(model.blocks):
            attn = getattr(block, "attn", None)
            if type(attn) is not Attention:
                raise VitqError(
                    f"blocks.{i}.attn is {type(attn).__name__}, not timm's Attention: this ViT variant "
                    "is not supported yet (supported: " + ", ".join(ADAPTERS.names()) + ")"
                )


@ADAPTERS.register("swin")
class SwinAdapter(ModelAdapter):
    family = "Swin Transformer v1 (timm SwinTransformer)"
    model_types = (SwinTransformer,)
    module_map = {**_COMMON, WindowAttention: QuantWindowAttention}

    def check(self, model: nn.Module) -> None:
        found = sum(isinstance(m, WindowAttention) for m in model.modules())
        if found == 0:
            raise VitqError("this SwinTransformer has no WindowAttention modules: it is not a Swin v1 model")


def find_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``'s family, or a :class:`VitqError` naming the supported ones."""
    if not isinstance(model, nn.Module):
        raise VitqError(f"expected a torch.nn.Module, got {type(model).__name__}")
    for _, cls in ADAPTERS.items():
        if cls.matches(model):
            return cls()
    supported = "; ".join(f"{name}: {cls.family}" for name, cls in ADAPTERS.items())
    raise VitqError(f"{type(model).__name__} is not a supported model family. Supported: {supported}")


def iter_quantizers(model: nn.Module) -> Iterator[Tuple[str, Quantizer]]:
    """Every quant point of a prepared model, by fully-qualified name."""
    for name, module in model.named_modules():
        if isinstance(module, Quantizer):
            yield name, module
