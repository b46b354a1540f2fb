"""Bit statistics of a quantized model: per-layer widths, average bits, size and bit-operations.

Mixed-precision plans are compared by these figures, so how they are computed is stated here
and in every report that shows them:

- **average weight bits** of a set of layers: Σ bitsₗ·paramsₗ / Σ paramsₗ (weighted by each
  layer's parameter count), and the plain mean over layers (``unweighted``);
- **average activation bits**: Σ bitsₗ·elementsₗ / Σ elementsₗ, where elementsₗ is the number of
  values entering layer ℓ's input quantizer per image (tokens × channels), and the plain mean;
- **BOPs** (bit-operations) per image: Σ MACsₗ · w_bitsₗ · a_bitsₗ over the linear and
  convolution layers, plus the two attention products (q·kᵀ at q/k bits, probabilities·v at
  probability/v bits); a float operand counts 32 bits;
- **size**: weights packed at their bit-width plus their scales, other parameters in float32
  (:func:`vitq.eval.model_size`).

Two scopes: ``blocks`` (the linear layers inside the transformer blocks, which mixed-precision
allocators assign widths to, and which ``--budget`` constrains) and ``all`` (every quantized
linear and convolution layer, including the patch embedding and the head).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from ..models.adapters import find_adapter
from ..nn import QuantAttention, QuantConv2d, QuantLinear, QuantWindowAttention
from ..quant.quantizer import Quantizer
from .metrics import model_size

FLOAT_BITS = 32


def _bits(q: Optional[Quantizer]) -> int:
    """The width a quantizer applies (32 where it is off: the operand stays float)."""
    if q is None or not (q.enabled and q.spec.enabled):
        return FLOAT_BITS
    return int(q.spec.bits)


@dataclass
class LayerBits:
    """One linear or convolution layer: its widths, sizes and work per image."""

    name: str
    w_bits: int
    a_bits: int
    params: int
    elements: int  # input values per image
    macs: int  # multiply-accumulates per image
    in_blocks: bool

    @property
    def bops(self) -> int:
        return self.macs * self.w_bits * self.a_bits


def _average(values: List[int], weights: List[int]) -> Dict[str, Optional[float]]:
    if not values:
        return {"weighted": None, "unweighted": None}
    total = sum(weights)
    return {"weighted": round(sum(v * w for v, w in zip(values, weights)) / total, 6) if total else None,
            "unweighted": round(sum(values) / len(values), 6)}


@torch.no_grad()
def layer_bits(model: nn.Module, example: torch.Tensor) -> List[LayerBits]:
    """Per-layer widths and sizes, measured with one forward pass of ``example`` (one image is
    enough; counts are per image). The model's outputs are not changed."""
    device = next(model.parameters()).device
    example = example[:1].to(device)
    names = {id(m): n for n, m in model.named_modules()}
    try:
        block_ids = {id(m) for _, b in find_adapter(model).blocks(model) for m in b.modules()}
    except Exception:  # a family without blocks: every layer is outside them
        block_ids = set()
    layers: Dict[int, LayerBits] = {}
    attention: List[LayerBits] = []

    def linear_hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:
        x = args[0]
        if isinstance(module, QuantConv2d):
            macs = out.numel() * (module.in_channels // module.groups) * module.kernel_size[0] * module.kernel_size[1]
        else:
            macs = out.numel() * module.in_features
        layers[id(module)] = LayerBits(names[id(module)], _bits(module.weight_quantizer), _bits(module.input_quantizer),
                                       module.weight.numel(), x.numel(), macs, id(module) in block_ids)

    def attention_hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:
        x = args[0]  # [windows·B, N, C]; with one image, windows·N·N·C MACs per product
        windows, n, _ = x.shape
        dim = module.qkv.out_features // 3
        macs = windows * n * n * dim
        name = names[id(module)]
        attention.append(LayerBits(f"{name}.q@k", _bits(module.k_quantizer), _bits(module.q_quantizer), 0,
                                   windows * n * dim, macs, id(module) in block_ids))
        attention.append(LayerBits(f"{name}.probs@v", _bits(module.v_quantizer), _bits(module.probs_quantizer), 0,
                                   windows * module.num_heads * n * n, macs, id(module) in block_ids))

    hooks = []
    for module in model.modules():
        if isinstance(module, (QuantLinear, QuantConv2d)):
            hooks.append(module.register_forward_hook(linear_hook))
        elif isinstance(module, (QuantAttention, QuantWindowAttention)):
            hooks.append(module.register_forward_hook(attention_hook))
    was_training = model.training
    try:
        model.eval()(example)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    order = {id(m): i for i, m in enumerate(model.modules())}
    return [lay for key, lay in sorted(layers.items(), key=lambda kv: order[kv[0]])] + attention


def bit_stats(model: nn.Module, example: torch.Tensor) -> Dict[str, Any]:
    """Average bits (weighted and unweighted, per scope), size in bytes and BOPs of a quantized
    model; see the module docstring for the definitions.

    Example:
        >>> import timm, vitq
        >>> m = timm.create_model("test_vit", pretrained=False, num_classes=10).eval()
        >>> q = vitq.quantize(m, "minmax", [torch.randn(2, 3, 160, 160)], w_bits=4, a_bits=8, progress=False)
        >>> s = bit_stats(q.model, torch.randn(1, 3, 160, 160))
        >>> s["scopes"]["blocks"]["w_bits"]["weighted"], s["scopes"]["blocks"]["a_bits"]["weighted"]
        (4.0, 8.0)
    """
    all_layers = layer_bits(model, example)
    linears = [lay for lay in all_layers if lay.params]
    scopes = {}
    for scope, chosen in (("blocks", [lay for lay in linears if lay.in_blocks]), ("all", linears)):
        scopes[scope] = {
            "layers": len(chosen),
            "w_bits": _average([lay.w_bits for lay in chosen], [lay.params for lay in chosen]),
            "a_bits": _average([lay.a_bits for lay in chosen], [lay.elements for lay in chosen]),
        }
    size = model_size(model)
    bops = sum(lay.bops for lay in all_layers)
    fp_bops = sum(lay.macs for lay in all_layers) * FLOAT_BITS * FLOAT_BITS
    return {
        "scopes": scopes,
        "size_bytes": size.weight_bytes,
        "fp_size_bytes": size.fp_bytes,
        "gbops": round(bops / 1e9, 4),
        "fp_gbops": round(fp_bops / 1e9, 4),
        "gmacs": round(sum(lay.macs for lay in all_layers) / 1e9, 4),
        "layers": [{**asdict(lay), "bops": lay.bops} for lay in all_layers],
        "definition": "weights: mean bits weighted by parameter count; activations: weighted by input elements per "
                      "image; unweighted: plain mean over layers; BOPs: MACs × w_bits × a_bits per image "
                      "(linear/conv layers and the two attention products; float operands count 32 bits)",
    }
