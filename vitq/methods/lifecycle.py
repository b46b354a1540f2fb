"""The calibration lifecycle: prepare → calibrate → convert, explicit and raising on misuse."""
from __future__ import annotations

import copy
from typing import Dict, Iterable, Mapping, Optional, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import VitqError
from ..models.adapters import find_adapter, iter_quantizers, quantizers_off
from ..quant import protocol as roles
from ..quant.observers import ObserverConfig
from ..quant.protocol import get_protocol
from ..quant.quantizer import Quantizer
from ..quant.spec import QuantSpec

Batch = Union[torch.Tensor, tuple, list]

DEFAULT_WEIGHTS = ObserverConfig("minmax", symmetric=True)
DEFAULT_ACTIVATIONS = ObserverConfig("minmax", symmetric=False)


def check_bits(value: object, what: str) -> int:
    """Bit-widths the CLI and API accept: an integer from 2 to 8."""
    if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 8:
        raise VitqError(f"{what} must be an integer from 2 to 8, got {value!r}")
    return value


def is_prepared(model: nn.Module) -> bool:
    return any(True for _ in iter_quantizers(model))


def prepare(
    model: nn.Module,
    *,
    protocol: str = "p1",
    w_bits: int = 8,
    a_bits: int = 8,
    weight_symmetric: bool = True,
    act_symmetric: bool = False,
    specs: Optional[Mapping[str, QuantSpec]] = None,
) -> nn.Module:
    """A quantized copy of ``model`` with uncalibrated quantizers in place; ``model`` is untouched.

    Args:
        model: a float timm ViT/DeiT/Swin.
        protocol: which tensors are quantized (``p1``, ``p2``, ``p3``; see :mod:`vitq.quant.protocol`).
        w_bits, a_bits: weight and activation bit-widths (2-8).
        weight_symmetric, act_symmetric: signed symmetric ranges or unsigned with a zero point.
        specs: per-point overrides by fully-qualified quantizer name (from a plan).

    Example:
        >>> import timm
        >>> qmodel = prepare(timm.create_model("test_vit"), w_bits=4, a_bits=8)
        >>> qmodel.blocks[0].attn.qkv.weight_quantizer.spec.bits
        4
    """
    if is_prepared(model):
        raise VitqError("the model is already prepared: pass the float model to prepare()")
    check_bits(w_bits, "w_bits")
    check_bits(a_bits, "a_bits")
    proto = get_protocol(protocol)
    adapter = find_adapter(model)
    qmodel = adapter.quantize_modules(copy.deepcopy(model)).eval()
    for name, quantizer in iter_quantizers(qmodel):
        quantizer.set_spec(proto.spec_for(quantizer.role, w_bits, a_bits, weight_symmetric, act_symmetric))
    if specs:
        known = dict(iter_quantizers(qmodel))
        unknown = sorted(set(specs) - set(known))
        if unknown:
            raise VitqError(f"no quant point named {unknown[0]!r} in this model ({len(unknown)} unknown names)")
        for name, spec in specs.items():
            known[name].set_spec(spec)
    return qmodel


def _owner_weights(model: nn.Module) -> Dict[Quantizer, torch.Tensor]:
    """Each weight quantizer with the weight it quantizes."""
    out = {}
    for module in model.modules():
        quantizer = getattr(module, "weight_quantizer", None)
        if isinstance(quantizer, Quantizer):
            out[quantizer] = module.weight
    return out


def calibrate(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    weights: ObserverConfig = DEFAULT_WEIGHTS,
    activations: ObserverConfig = DEFAULT_ACTIVATIONS,
    device: Union[str, torch.device, None] = None,
    progress: bool = True,
) -> nn.Module:
    """Set every quantizer's scale and zero point from statistics, in place.

    Weights are observed directly; activations are observed on the float tensors of a forward
    pass over ``batches`` (all quantizers pass through while observing, as in FQ-ViT).

    Args:
        model: a prepared, not yet calibrated model.
        batches: image tensors ``[B, 3, H, W]`` or ``(images, labels)`` pairs.
        weights, activations: observers for weight and for activation quant points.
        device: where to run (default: the model's device).
        progress: show a progress bar.
    """
    quantizers = dict(iter_quantizers(model))
    if not quantizers:
        raise VitqError("the model has no quantizers: call vitq.prepare(model, ...) first")
    calibrated = [n for n, q in quantizers.items() if q.needs_calibration and q.scale is not None]
    if calibrated:
        raise VitqError(f"the model is already calibrated ({calibrated[0]}): prepare a fresh model to recalibrate")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device).eval()

    for quantizer, weight in _owner_weights(model).items():
        if quantizer.needs_calibration:
            observer = weights.build(quantizer.spec)
            observer.observe(weight.detach())
            quantizer.set_qparams(*observer.qparams())

    observers = {
        q: activations.build(q.spec) for q in quantizers.values() if q.needs_calibration and q.role != roles.WEIGHT
    }
    hooks = [q.register_forward_pre_hook(lambda mod, args: observers[mod].observe(args[0])) for q in observers]
    seen = 0
    try:
        with quantizers_off(model), torch.no_grad():
            for batch in tqdm(batches, desc="calibrate", unit="batch", disable=not progress, leave=False):
                images = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(images.to(device))
                seen += 1
    finally:
        for hook in hooks:
            hook.remove()
    if observers and seen == 0:
        raise VitqError("calibration got no batches: give at least one calibration image")
    for quantizer, observer in observers.items():
        quantizer.set_qparams(*observer.qparams())
    return model


def convert(model: nn.Module) -> nn.Module:
    """Check that every quant point is calibrated and put the model in inference mode.

    Raises:
        VitqError: when a quant point still lacks parameters (calibrate first).
    """
    quantizers = dict(iter_quantizers(model))
    if not quantizers:
        raise VitqError("the model has no quantizers: call vitq.prepare(model, ...) first")
    missing = [n for n, q in quantizers.items() if not q.is_calibrated]
    if missing:
        raise VitqError(
            f"{len(missing)} quant point(s) are not calibrated (e.g. {missing[0]}): run vitq.calibrate first"
        )
    for q in quantizers.values():
        q.enabled = q.spec.enabled
    return model.eval().requires_grad_(False)
