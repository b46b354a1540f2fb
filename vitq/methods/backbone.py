"""A backbone named by its path inside any model (a torchvision detector, an mmdet/mmseg model, a
user's own): its inputs captured from whole-model forwards, and the quantized backbone put back.

Used by ``vitq.quantize(model, ..., backbone="backbone.body")`` when the model's own forward takes
inputs that vitq's stages cannot feed (lists of images of several sizes, dicts): the stages then run
on the backbone alone, on the tensors the model itself gives it.
"""
from __future__ import annotations

import copy
from typing import Any, Iterable, List, Union

import torch
from torch import nn

from ..errors import VitqError
from ..models.adapters import ADAPTERS


class _Captured(Exception):
    """Ends a forward pass once the backbone's input is seen (nothing after it is needed)."""


def backbone_module(model: nn.Module, path: str) -> nn.Module:
    """The sub-module at ``path``, which must be a supported transformer (a timm ViT/DeiT/Swin).

    Raises:
        VitqError: no such path (the top-level children are listed), or an unsupported module.
    """
    try:
        sub = model.get_submodule(path)
    except AttributeError:
        children = ", ".join(n for n, _ in model.named_children())
        raise VitqError(f"{type(model).__name__} has no sub-module {path!r} (its children: {children})") from None
    if not any(cls.matches(sub) for _, cls in ADAPTERS.items()):
        raise VitqError(f"{path} is a {type(sub).__name__}, not a supported transformer "
                        f"({', '.join(ADAPTERS.names())}): name the timm ViT/DeiT/Swin inside the model")
    return sub


def _model_input(batch: Any) -> Any:
    """A batch as the model takes it: a ``(inputs, targets)`` tuple gives its inputs; a list (a
    torchvision detector's list of images) or a tensor is passed as it is."""
    return batch[0] if isinstance(batch, tuple) else batch


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


@torch.no_grad()
def backbone_inputs(model: nn.Module, path: str, batches: Iterable[Any],
                    device: Union[str, torch.device] = "cpu") -> List[torch.Tensor]:
    """The tensors the whole ``model`` feeds its backbone at ``path`` for each batch (after the
    model's own preprocessing: a detector's resize, normalisation and padding), on CPU.

    Batches of several sizes (a detector pads each batch to its largest image only) are padded
    with zeros at the bottom and right to the largest height and width, as the detector pads
    within a batch: stages such as the search concatenate the calibration batches.

    Raises:
        VitqError: when a batch never reaches the backbone.
    """
    sub = backbone_module(model, path)
    # the patch embedding sees the backbone's input even when the model calls another method of the
    # backbone than forward (e.g. forward_intermediates); ViT and Swin both start with one
    entry = getattr(sub, "patch_embed", None) or sub
    captured: List[torch.Tensor] = []

    def hook(module: nn.Module, args: Any) -> None:
        captured.append(args[0].detach().cpu())
        raise _Captured

    was_training = model.training
    model.eval().to(device)
    handle = entry.register_forward_pre_hook(hook)
    try:
        for i, batch in enumerate(batches):
            before = len(captured)
            try:
                model(_to(_model_input(batch), device))
            except _Captured:
                pass
            if len(captured) == before:
                raise VitqError(f"calibration batch {i} ran through the model without reaching {path}")
    finally:
        handle.remove()
        model.train(was_training)
    if not captured:
        raise VitqError("no calibration batches were given")
    return _padded_to_one_size(captured)


def _padded_to_one_size(batches: List[torch.Tensor]) -> List[torch.Tensor]:
    """``batches`` of ``[B, C, H, W]`` zero-padded (bottom, right) to one ``H`` and ``W``; as they are
    when they already share them (or are not images)."""
    if len({tuple(b.shape[1:]) for b in batches}) <= 1 or any(b.ndim != 4 for b in batches):
        return batches
    h = max(b.shape[-2] for b in batches)
    w = max(b.shape[-1] for b in batches)
    return [torch.nn.functional.pad(b, (0, w - b.shape[-1], 0, h - b.shape[-2])) for b in batches]


def splice(model: nn.Module, path: str, quantized: nn.Module) -> nn.Module:
    """A copy of ``model`` with the sub-module at ``path`` replaced by ``quantized``."""
    parent_path, _, name = path.rpartition(".")
    original = model.get_submodule(path)
    memo = {id(original): quantized}  # not copied: the quantized backbone goes in as it is
    out = copy.deepcopy(model, memo)
    parent = out.get_submodule(parent_path) if parent_path else out
    setattr(parent, name, quantized)
    return out.eval()
