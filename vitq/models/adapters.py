"""Model adapters: which float modules of a model family become which quantized modules.

Chosen by module type through a registry, never by module names. Each family is one file of
:mod:`vitq.models.families` that registers its :class:`ModelAdapter` subclass in :data:`ADAPTERS`.
"""
from __future__ import annotations

import importlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Type

import timm.layers
from timm.layers import Mlp, PatchEmbed
import torch
from torch import nn

from ..errors import VitqError
from ..nn import PrefixRows, QuantConv2d, QuantLayerNorm, QuantLinear, QuantModule
from ..quant.quantizer import Quantizer
from ..registry import Registry

ADAPTERS: Registry[type] = Registry("model adapter")

_COMMON: Dict[type, Type[QuantModule]] = {
    nn.Linear: QuantLinear,
    nn.Conv2d: QuantConv2d,
    nn.LayerNorm: QuantLayerNorm,
    timm.layers.LayerNorm: QuantLayerNorm,
}


_NORMS = (nn.LayerNorm, timm.layers.LayerNorm)


@dataclass(frozen=True)
class NormLinearPair:
    """A LayerNorm whose output feeds exactly one linear layer, and nothing else (SQ-b folds into both).

    Attributes:
        point: what the linear is: ``qkv``, ``fc1`` or ``reduction`` (Swin patch merging).
        norm, linear: fully-qualified module names (the same in the float and the prepared model).
        shift_exact: whether a per-channel shift of the LayerNorm output folds exactly. It does not
            where the model pads the normalised tokens with zeros before the linear (Swin windows
            that do not divide the feature map): a zero in the shifted domain is not a zero before.
    """

    point: str
    norm: str
    linear: str
    shift_exact: bool = True


def _is_norm(module: Optional[nn.Module]) -> bool:
    """A last-axis LayerNorm with γ and β (float or quantized; not a channels-first subclass)."""
    return type(module) in (*_NORMS, QuantLayerNorm) and module.elementwise_affine


def _gelu_mlp(mlp: nn.Module) -> bool:
    """timm's ``Mlp`` whose fc2 input is exactly the GELU output (no hidden norm)."""
    return (type(mlp) is Mlp and isinstance(mlp.act, nn.GELU) and isinstance(mlp.norm, nn.Identity)
            and isinstance(mlp.fc2, nn.Linear))


class ModelAdapter:
    """Maps the modules of one model family to quantized modules.

    Matching is by exact type: a subclass with a different forward (e.g. a channels-first
    LayerNorm) is not silently treated as its parent.
    """

    family: str = ""
    model_types: Tuple[type, ...] = ()
    #: whether :meth:`forward_from` (and :meth:`forward_after`) compute the model's output from a block's input (output)
    can_forward_from: bool = True
    module_map: Dict[type, Type[QuantModule]] = {}

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, cls.model_types)

    def check(self, model: nn.Module) -> None:
        """Raise a :class:`VitqError` naming what the model lacks for this adapter."""

    def token_grids(self, model: nn.Module) -> List[Tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]]:
        """The modules whose outputs are patch-token maps, each with a function that turns its
        output into a ``[B, h, w, C]`` grid (prefix tokens dropped). Used by data-free generators."""
        raise VitqError(f"{type(model).__name__}: this model family exposes no token grids")

    def blocks(self, model: nn.Module) -> List[Tuple[str, nn.Module]]:
        """The transformer blocks in forward order, by qualified name (the units of block-wise
        search). Each has an ``attn`` and an ``mlp`` part (:meth:`block_parts`)."""
        raise VitqError(f"{type(model).__name__}: this model family exposes no transformer blocks")

    def forward_from(self, model: nn.Module, block: str, x: torch.Tensor) -> torch.Tensor:
        """The model's logits computed from ``x``, the input of the block named ``block``, on:
        the same operations as a full forward from that block, so searches need not recompute
        the unchanged blocks before it."""
        raise VitqError(f"{type(model).__name__}: this model family cannot run from a block")

    def forward_after(self, model: nn.Module, block: str, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The model's logits computed from ``x``, the output of the block named ``block`` (the
        blocks after it and the head), so that a block can be fitted to the model's output;
        ``pre_logits``: the pooled features the classifier reads instead of its logits."""
        raise VitqError(f"{type(model).__name__}: this model family cannot run from a block's output")

    def image_input(self, model: nn.Module) -> Optional[str]:
        """The quant point that sees the model's input image (the patch embedding's input), or None
        where the patch embedding reads something else (a hybrid model's convolutional stem)."""
        embed = getattr(model, "patch_embed", None)
        if type(embed) is PatchEmbed and isinstance(embed.proj, QuantConv2d):
            return "patch_embed.proj.input_quantizer"
        return None

    def block_parts(self, block: nn.Module) -> Dict[str, nn.Module]:
        """A block's attention and MLP sub-modules."""
        return {"attn": block.attn, "mlp": block.mlp}

    def prefix_rows(self, model: nn.Module) -> Tuple[int, List[Tuple[str, PrefixRows]]]:
        """How many prefix tokens (class, distillation, register tokens) lead the token sequence, and
        the quantized modules whose operands carry them on their token axis (0 and none: the family
        has no prefix tokens)."""
        return 0, []

    def norm_linear_pairs(self, model: nn.Module) -> List[NormLinearPair]:
        """Every LayerNorm → linear pair whose activation SQ-b can smooth, in forward order."""
        return []

    def gelu_linears(self, model: nn.Module) -> List[str]:
        """Names of the linear layers whose input is a GELU output (each block's MLP ``fc2``)."""
        names = {id(m): n for n, m in model.named_modules()}
        out = []
        for _, block in self.blocks(model):
            mlp = self.block_parts(block)["mlp"]
            if _gelu_mlp(mlp):
                out.append(names[id(mlp.fc2)])
        return out

    def feature_channels(self, model: nn.Module, indices: Sequence[int]) -> List[int]:
        """The channels of the feature maps ``forward_intermediates(indices=...)`` returns (dense heads)."""
        raise VitqError(f"{type(model).__name__}: this model family gives no feature maps for a dense head")

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


class BackboneAdapter(ModelAdapter):
    """A supported transformer (the backbone) inside a larger model, e.g. a segmentation or
    detection model: the backbone's modules are quantized, the rest of the model stays float.

    Every name it gives (blocks, quant points, LayerNorm → linear pairs) is the full path in the
    whole model, so plans made on the whole model re-apply to it. A pass from a block to the model's
    output is not defined for any model (a dense head reads several blocks): :meth:`forward_from`
    raises and searches run the whole model instead.
    """

    family = "a ViT/DeiT/Swin backbone inside another model (segmentation, detection, ...): only the backbone"
    can_forward_from = False

    def __init__(self, inner: ModelAdapter, path: str) -> None:
        self.inner = inner
        self.path = path

    def _sub(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.path)

    def _name(self, name: str) -> str:
        return f"{self.path}.{name}"

    def check(self, model: nn.Module) -> None:
        self.inner.check(self._sub(model))

    def token_grids(self, model: nn.Module) -> List[Tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]]:
        return self.inner.token_grids(self._sub(model))

    def blocks(self, model: nn.Module) -> List[Tuple[str, nn.Module]]:
        return [(self._name(n), m) for n, m in self.inner.blocks(self._sub(model))]

    def forward_from(self, model: nn.Module, block: str, x: torch.Tensor) -> torch.Tensor:
        raise VitqError(f"{type(model).__name__}: the output of a model around a backbone cannot be computed from "
                        "one block's input (run the whole model)")

    def forward_after(self, model: nn.Module, block: str, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        raise VitqError(f"{type(model).__name__}: the output of a model around a backbone cannot be computed from "
                        "one block's output (run the whole model)")

    def image_input(self, model: nn.Module) -> Optional[str]:
        inner = self.inner.image_input(self._sub(model))
        return None if inner is None else self._name(inner)

    def block_parts(self, block: nn.Module) -> Dict[str, nn.Module]:
        return self.inner.block_parts(block)

    def prefix_rows(self, model: nn.Module) -> Tuple[int, List[Tuple[str, PrefixRows]]]:
        tokens, modules = self.inner.prefix_rows(self._sub(model))
        return tokens, [(self._name(n), m) for n, m in modules]

    def norm_linear_pairs(self, model: nn.Module) -> List[NormLinearPair]:
        return [NormLinearPair(p.point, self._name(p.norm), self._name(p.linear), p.shift_exact)
                for p in self.inner.norm_linear_pairs(self._sub(model))]

    def quantize_modules(self, model: nn.Module) -> nn.Module:
        sub = self._sub(model)
        self.inner.check(sub)
        self.inner._swap(sub)
        return model

    def quantize_rest(self, model: nn.Module) -> List[str]:
        """Quantize, in place, the linear layers and convolutions outside the backbone (a dense
        model's decode head: ``vitq.quantize(..., head=True)``); returns their names. Their inputs and
        weights get the protocol's activation and weight quantizers; normalisations stay float."""
        swapped = []
        rest = {nn.Linear: QuantLinear, nn.Conv2d: QuantConv2d}

        def visit(module: nn.Module, prefix: str) -> None:
            for name, child in list(module.named_children()):
                full = f"{prefix}{name}"
                if full == self.path or isinstance(child, (QuantModule, Quantizer)):
                    continue
                qcls = rest.get(type(child))
                if qcls is not None:
                    setattr(module, name, qcls.from_float(child))
                    swapped.append(full)
                else:
                    visit(child, f"{full}.")

        visit(model, "")
        return swapped


def find_backbones(model: nn.Module) -> List[Tuple[str, type]]:
    """The outermost sub-modules of ``model`` (not ``model`` itself) that a registered adapter
    supports, by path, with the adapter class: the transformer backbones of a dense model."""
    found: List[Tuple[str, type]] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(path + ".") for path, _ in found):
            continue
        for _, cls in ADAPTERS.items():
            if cls.matches(module):
                found.append((name, cls))
                break
    return found


def find_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``'s family; for a model that holds exactly one supported transformer
    (a segmentation or detection model around a ViT/Swin backbone), a :class:`BackboneAdapter` of
    it. Otherwise a :class:`VitqError` naming the supported families (or the backbones found)."""
    if not isinstance(model, nn.Module):
        raise VitqError(f"expected a torch.nn.Module, got {type(model).__name__}")
    for _, cls in ADAPTERS.items():
        if cls.matches(model):
            return cls()
    backbones = find_backbones(model)
    if len(backbones) == 1:
        path, cls = backbones[0]
        return BackboneAdapter(cls(), path)
    if len(backbones) > 1:
        raise VitqError(f"{type(model).__name__} holds {len(backbones)} transformer backbones "
                        f"({', '.join(p for p, _ in backbones)}); vitq quantizes a model with one: quantize the "
                        "module that holds only the backbone you mean")
    supported = "; ".join(f"{name}: {cls.family}" for name, cls in ADAPTERS.items())
    raise VitqError(f"{type(model).__name__} is not a supported model family and holds no supported transformer "
                    f"backbone. Supported: {supported}")


def scores_last(out: torch.Tensor) -> torch.Tensor:
    """A model's output with its class scores on the last axis: a classifier's ``[B, C]`` as it is,
    a dense model's ``[B, C, H, W]`` as ``[B, H, W, C]`` (so that a KL or an argmax over the last
    axis compares each pixel's class distribution)."""
    return out.movedim(1, -1) if out.ndim == 4 else out


def iter_quantizers(model: nn.Module) -> Iterator[Tuple[str, Quantizer]]:
    """Every quant point of a prepared model, by fully-qualified name."""
    for name, module in model.named_modules():
        if isinstance(module, Quantizer):
            yield name, module


@contextmanager
def quantizers_off(model: nn.Module) -> Iterator[nn.Module]:
    """Every quantizer of ``model`` passes its input through inside the block (the float
    computation of the quantized modules, for calibration passes); restored on exit."""
    quantizers = [q for _, q in iter_quantizers(model)]
    previous = [q.enabled for q in quantizers]
    try:
        for q in quantizers:
            q.enabled = False
        yield model
    finally:
        for q, enabled in zip(quantizers, previous):
            q.enabled = enabled


@contextmanager
def kept_on_its_device(model: nn.Module) -> Iterator[nn.Module]:
    """Whatever moves ``model`` inside the block (``model.to("cuda")`` for a GPU pass), it is
    back on its own device on exit: the caller's float model is not moved by vitq's work
    (``tests/test_cuda.py`` checks it on a GPU).
    """
    tensors = list(model.parameters()) + list(model.buffers())
    home = tensors[0].device if tensors else None
    try:
        yield model
    finally:
        if home is not None:
            model.to(home)


importlib.import_module(f"{__package__}.families")  # each family registers its adapter
