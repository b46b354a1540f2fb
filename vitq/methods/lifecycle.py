"""The calibration lifecycle: prepare → calibrate → convert, explicit and raising on misuse."""
from __future__ import annotations

import copy
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import VitqError
from ..models.adapters import BackboneAdapter, find_adapter, iter_quantizers, quantizers_off
from ..quant import protocol as roles
from ..quant.observers import ObserverConfig
from ..nn import PrefixRows
from ..quant.protocol import DEFAULT_INPUT_BITS, PREFIX_CHOICES, check_prefix_rows, get_protocol
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
    act_symmetric_roles: Sequence[str] = (),
    specs: Optional[Mapping[str, QuantSpec]] = None,
    input_bits: Optional[int] = DEFAULT_INPUT_BITS,
    kinds: Optional[Mapping[str, str]] = None,
    head: bool = False,
    prefix_rows: Sequence[str] = (),
) -> nn.Module:
    """A quantized copy of ``model`` with uncalibrated quantizers in place; ``model`` is untouched.

    Args:
        model: a float timm ViT/DeiT/Swin.
        protocol: which tensors are quantized (``p1``, ``p2``, ``p3``; see :mod:`vitq.quant.protocol`).
        w_bits, a_bits: weight and activation bit-widths (2-8).
        weight_symmetric, act_symmetric: signed symmetric ranges or unsigned with a zero point.
        act_symmetric_roles: activation roles whose grids are symmetric whatever ``act_symmetric``
            says (``["attn_qkv"]``: q, k and v; see :class:`~vitq.quant.observers.ObserverConfig`).
        specs: per-point overrides by fully-qualified quantizer name (from a plan).
        input_bits: bits of the image input (the patch embedding's input) where the protocol quantizes
            it: 8 by default at every activation width (RepQ-ViT's setting); None: ``a_bits``.
        kinds: quantizer kind per role, e.g. ``{"attn_probs": "logsqrt2"}`` (a recipe's ``kinds``).
        head: a model around a backbone (segmentation, ...): also quantize the linear layers and
            convolutions outside the backbone (the decode head), which otherwise stay float.
        prefix_rows: operands whose prefix-token rows (a ViT's class token ...) get a quantizer of their
            own (``<point>_prefix_quantizer``, the main point's spec): ``q``, ``k`` (attention) and ``act``
            (the inputs of the blocks' linear layers); see :class:`vitq.nn.PrefixRows`. Nothing is added
            to a model without prefix tokens (Swin): :func:`prefix_rows_of` says what was.

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
    if input_bits is not None:
        check_bits(input_bits, "input_bits")
    proto = get_protocol(protocol)
    kinds = proto.check_kinds(kinds)
    adapter = find_adapter(model)
    qmodel = adapter.quantize_modules(copy.deepcopy(model)).eval()
    if head:
        if not isinstance(adapter, BackboneAdapter):
            raise VitqError(f"head=True quantizes the layers around a backbone, but {type(model).__name__} is the "
                            "transformer itself (its classifier head is quantized already)")
        if not adapter.quantize_rest(qmodel):
            raise VitqError(f"head=True: {type(model).__name__} has no linear layer or convolution outside its "
                            f"backbone {adapter.path!r} to quantize")
    image_point = adapter.image_input(qmodel)
    for name, quantizer in iter_quantizers(qmodel):
        spec = proto.spec_for(quantizer.role, w_bits, a_bits, weight_symmetric,
                              act_symmetric or quantizer.role in act_symmetric_roles, kinds)
        if name == image_point and spec.enabled and input_bits is not None:
            spec = spec.with_(bits=input_bits)
        quantizer.set_spec(spec)
    prefix_rows = check_prefix_rows(prefix_rows)
    for choice in prefix_rows:
        role, _ = PREFIX_CHOICES[choice]
        if role not in proto.quantized:
            raise VitqError(f"prefix_rows: protocol {protocol} leaves {role} in float, so {choice!r} has no "
                            "quantizer to split; drop it or use a protocol that quantizes it")
    split_prefix_rows(qmodel, prefix_rows)
    if specs:
        known = dict(iter_quantizers(qmodel))
        unknown = sorted(set(specs) - set(known))
        if unknown:
            raise VitqError(f"no quant point named {unknown[0]!r} in this model ({len(unknown)} unknown names)")
        for name, spec in specs.items():
            known[name].set_spec(spec)
    return qmodel


def split_prefix_rows(model: nn.Module, choices: Sequence[str]) -> int:
    """Give the prefix-token rows of the operands ``choices`` (``q``, ``k``, ``act``) a quantizer of
    their own in every block of a prepared, not yet calibrated ``model``, where the operand is
    quantized; returns the number of prefix tokens (0: the model has none, nothing is split)."""
    choices = check_prefix_rows(choices)
    if any(q.needs_calibration and q.scale is not None for _, q in iter_quantizers(model)):
        raise VitqError("prefix rows are split before calibration: run the prefix_rows stage before calibrate")
    tokens, modules = find_adapter(model).prefix_rows(model)
    if not tokens:
        return 0
    for _, module in modules:
        for choice in choices:
            point = PREFIX_CHOICES[choice][1]
            if point in module.PREFIX_POINTS and point not in module.prefix_points and \
                    getattr(module, f"{point}_quantizer").spec.enabled:
                module.add_prefix_quantizer(point, tokens)
    return tokens


def prefix_rows_of(model: nn.Module) -> Dict[str, Any]:
    """What a prepared model's prefix-row quantizers are (for its plan): ``{}`` without any, else
    ``{"points": [...], "tokens": n}`` (the operands split, by :data:`PREFIX_CHOICES` name)."""
    split = [m for m in model.modules() if isinstance(m, PrefixRows) and m.prefix_points]
    if not split:
        return {}
    points = {p for m in split for p in m.prefix_points}
    return {"points": [c for c, (_, p) in PREFIX_CHOICES.items() if p in points], "tokens": split[0].prefix_tokens}


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
    sequential: bool = False,
) -> nn.Module:
    """Set every quantizer's scale and zero point from statistics, in place.

    Weights are observed directly. Activations are observed on the float tensors of a forward
    pass over ``batches`` (all quantizers pass through while observing, as in FQ-ViT), or, with
    ``sequential``, on the tensors of the partly quantized model: each quant point sees its input
    computed with every quant point before it already quantized (as RepQ-ViT's first forward
    does), so its range fits what it will receive.

    Args:
        model: a prepared, not yet calibrated model.
        batches: image tensors ``[B, 3, H, W]`` or ``(images, labels)`` pairs.
        weights, activations: observers for weight and for activation quant points.
        device: where to run (default: the model's device).
        progress: show a progress bar.
        sequential: calibrate point after point in forward order on the partly quantized model.
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
    if sequential:
        images = [(b[0] if isinstance(b, (tuple, list)) else b) for b in batches]
        if observers and not images:
            raise VitqError("calibration got no batches: give at least one calibration image")
        _calibrate_sequential(model, images, {n: q for n, q in quantizers.items() if q in observers}, observers,
                              device, progress)
        return model
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


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the tensors it needed were seen."""


def _run_until(fn, inputs, stop_at: nn.Module) -> None:
    """``fn(x)`` for each input, each pass ended as soon as ``stop_at`` is called."""
    def stop(module, args):
        raise _Stop

    hook = stop_at.register_forward_pre_hook(stop)
    try:
        with torch.no_grad():
            for x in inputs:
                try:
                    fn(x)
                except _Stop:
                    pass
    finally:
        hook.remove()


def forward_order(model: nn.Module, images: torch.Tensor, modules) -> list:
    """``modules`` in the order a forward pass on ``images`` first calls them (with the model's
    quantizers switched off). Raises when one is never called."""
    modules = list(modules)
    order: list = []

    def record(module, args):
        if module not in order:
            order.append(module)

    hooks = [m.register_forward_pre_hook(record) for m in modules]
    try:
        with quantizers_off(model), torch.no_grad():
            model(images)
    finally:
        for hook in hooks:
            hook.remove()
    if len(order) != len(modules):
        names = {m: n for n, m in model.named_modules()}
        missing = next(m for m in modules if m not in order)
        raise VitqError(f"{names.get(missing, type(missing).__name__)} is never reached by a forward pass")
    return order


def staged_passes(model: nn.Module, images, groups, device):
    """For each group of modules (in forward order), yield ``(group, feed)``: ``feed()`` runs the
    calibration ``images`` through the model as it is now, each pass ended once the group's last
    module is called (so the caller's hooks on the group see their inputs, computed with every
    earlier group finished). Inside a transformer block a pass starts from the block's input,
    cached when the block's first group comes (everything before the block is final by then):
    about two forward passes per block in all. ``feed(only=i)`` runs the ``i``-th batch alone."""
    names = {m: n for n, m in model.named_modules()}
    try:
        blocks = find_adapter(model).blocks(model)
    except VitqError:
        blocks = []

    def block_of(module: nn.Module):
        name = names[module]
        return next(((b, m) for b, m in blocks if name.startswith(b + ".")), (None, None))

    follows = sequence_successors(model)
    cached_block, cached, cache = None, None, None
    for group in groups:
        block_name, block = block_of(group[0])
        if block_name is not None and cached_block != block_name:
            cache = next_block_inputs(model, block, cached, cache, follows, images, device)
            cached_block, cached = block_name, block

        def feed(only: Optional[int] = None, group=group, block=block, block_name=block_name, cache=cache) -> None:
            if block_name is None:
                _run_until(lambda x: model(x.to(device)), images if only is None else [images[only]], group[-1])
            else:
                _run_until(lambda a: block(*a[0], **a[1]), cache if only is None else [cache[only]], group[-1])

        yield group, feed


def recalibrate_points(model: nn.Module, batches: Iterable[Batch], points: Dict[str, Quantizer],
                       activations: ObserverConfig, *, device: Union[str, torch.device, None] = None,
                       progress: bool = True) -> nn.Module:
    """Set the activation quant ``points`` (name to quantizer) of a calibrated model again, in place:
    observed with ``activations``' observer point group after point group in forward order on the
    model as it is (every other point quantized as it was, every earlier group already set again).

    Raises:
        VitqError: for a weight point, or when ``batches`` is empty.
    """
    weights = [n for n, q in points.items() if q.role == roles.WEIGHT]
    if weights:
        raise VitqError(f"{weights[0]} is a weight quant point: only activation points are recalibrated")
    images = [(b[0] if isinstance(b, (tuple, list)) else b) for b in batches]
    if points and not images:
        raise VitqError("recalibration got no batches: give at least one calibration image")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device).eval()
    observers = {q: activations.build(q.spec) for q in points.values()}
    with torch.no_grad():
        _calibrate_sequential(model, images, points, observers, device, progress)
    return model


def _calibrate_sequential(model: nn.Module, images, points: Dict[str, Quantizer], observers, device,
                          progress: bool) -> None:
    """Sequential calibration: quant points in groups, in forward order; a group (the points of
    one module, e.g. q, k, v and the probabilities of one attention) is observed on a pass in
    which every group before it is quantized, then enabled (:func:`staged_passes`)."""
    order = forward_order(model, images[0].to(device), points.values())
    names = {q: n for n, q in points.items()}
    groups: list = []
    for q in order:
        owner = names[q].rsplit(".", 1)[0]
        if groups and groups[-1][0] == owner:
            groups[-1][1].append(q)
        else:
            groups.append((owner, [q]))
    for q in points.values():
        q.enabled = False  # not yet calibrated: pass through
    passes = staged_passes(model, images, [g for _, g in groups], device)
    for group, feed in tqdm(passes, total=len(groups), desc="calibrate (sequential)", unit="group",
                            disable=not progress, leave=False):
        # the observers' hooks come before the stop hook, so the last point is observed first
        hooks = [q.register_forward_pre_hook(lambda mod, args: observers[mod].observe(args[0])) for q in group]
        try:
            feed()
        finally:
            for hook in hooks:
                hook.remove()
        for q in group:
            q.set_qparams(*observers[q].qparams())
            q.enabled = q.spec.enabled


def sequence_successors(model: nn.Module) -> Dict[nn.Module, nn.Module]:
    """Each child of an ``nn.Sequential`` mapped to the child after it (whose input is its output)."""
    out = {}
    for module in model.modules():
        if type(module) is nn.Sequential:
            children = list(module.children())
            out.update(zip(children[:-1], children[1:]))
    return out


def next_block_inputs(model: nn.Module, block: nn.Module, prev, prev_inputs, follows, images, device) -> list:
    """The inputs of ``block``: the outputs of ``prev`` on its cached inputs ``prev_inputs`` when
    ``block`` directly follows it in a sequence (``follows``: :func:`sequence_successors`), else
    captured by a forward pass of ``model`` over ``images``."""
    if prev is not None and follows.get(prev) is block and not prev_inputs[0][1]:
        with torch.no_grad():
            return [((prev(*args),), {}) for args, _ in prev_inputs]
    return block_inputs(model, block, images, device)


def block_inputs(model: nn.Module, block: nn.Module, images, device) -> list:
    """The inputs ``(args, kwargs)`` that ``block`` receives for each batch of ``images``, with the
    model's quantizers as they are now."""
    inputs: list = []

    def grab(module, args, kwargs):
        inputs.append((args, kwargs))
        raise _Stop

    hook = block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for x in images:
                try:
                    model(x.to(device))
                except _Stop:
                    pass
    finally:
        hook.remove()
    return inputs


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
