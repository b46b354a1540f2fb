"""Quantizer kinds: how a quant point maps a tensor to its grid, one file per kind.

A kind is a :class:`QuantKind` registered in :data:`KINDS`. Everything that depends on the
kind asks the entry, never the name: the spec's constraints and integer range
(:class:`~vitq.quant.spec.QuantSpec`), the fake-quantization (:class:`~vitq.quant.Quantizer`),
the parameters from an observer's statistics (:mod:`vitq.quant.observers`), its export form
(:mod:`vitq.export`), and whether a method applies to it (``plain_grid``, ``searchable``).

Adding a kind: a new module here with a registered subclass of :class:`QuantKind` (and a test of
its values).
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, Optional, Tuple

import torch

from ...errors import VitqError
from ...registry import Registry
from ..primitives import broadcast_shape, choose_qparams_affine, fake_quantize_affine

if TYPE_CHECKING:  # pragma: no cover
    from ..observers import Observer
    from ..spec import QuantSpec

Tensor = torch.Tensor
GRANULARITIES = ("per_tensor", "per_channel", "per_token")


class QuantKind:
    """What one kind of quantizer is and does (defaults: an affine grid).

    Class attributes:
        name: the kind's name in specs, plans and recipes.
        granularities: the granularities a spec of this kind may have.
        symmetric: the ``symmetric`` value a spec must have (None: either).
        requirement: those constraints in words, for the error message.
        ratio: the kind uses the spec's ``ratio_log2`` (two scales ``2^m`` apart).
        calibrated: its scale comes from calibration (False: a fixed grid, no parameters).
        plain_grid: one freely chosen scale per tensor or channel and a zero point, so the methods
            that fit or move an affine grid (GPTQ, reconstruction, smoothing, width allocation) apply.
        integer: a per-tensor point of this kind exports as QuantizeLinear/DequantizeLinear, so the
            product it feeds can run in integer kernels; other points are emulated in float.
        searchable: the evolutionary search may move its scale.
        channel_stats: a ``per_channel`` spec's observer keeps min/max per channel.
        needs_tensor: the observer keeps the last calibration batch (the kind fits it).
    """

    name = ""
    granularities: Tuple[str, ...] = GRANULARITIES
    symmetric: Optional[bool] = None
    requirement = ""
    ratio = False
    calibrated = True
    plain_grid = False
    integer = False
    searchable = False
    channel_stats = True
    needs_tensor = False

    def validate(self, spec: "QuantSpec") -> None:
        if spec.granularity not in self.granularities or (
                self.symmetric is not None and spec.symmetric != self.symmetric):
            raise VitqError(f"a {self.name!r} quantizer is {self.requirement}")

    def qrange(self, spec: "QuantSpec") -> Tuple[int, int]:
        """The integer range [q_min, q_max]."""
        if spec.symmetric:
            return -(2 ** (spec.bits - 1)), 2 ** (spec.bits - 1) - 1
        return 0, 2**spec.bits - 1

    def fake_quantize(self, x: Tensor, scale: Optional[Tensor], zero_point: Optional[Tensor],
                      spec: "QuantSpec") -> Tensor:
        """Quantize and dequantize ``x`` with calibrated (static) parameters."""
        scale, zero_point = _along_axis(x, scale, zero_point, spec)
        return fake_quantize_affine(x, scale, zero_point, *self.qrange(spec))

    def export_forward(self, x: Tensor, scale: Optional[Tensor], zero_point: Optional[Tensor],
                       spec: "QuantSpec") -> Tensor:
        """The float emulation written into an exported graph (out-of-place operations every exporter
        knows; the same values as :meth:`fake_quantize`)."""
        qmin, qmax = self.qrange(spec)
        scale, zero_point = _along_axis(x, scale, zero_point, spec)
        return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax).sub(zero_point).mul(scale)

    def range_qparams(self, spec: "QuantSpec", lo: Tensor, hi: Tensor) -> Tuple[Tensor, Tensor]:
        """``(scale, zero_point)`` that cover the clipping range ``[lo, hi]``."""
        return choose_qparams_affine(lo, hi, *self.qrange(spec), spec.symmetric)

    def qparams(self, observer: "Observer") -> Tuple[Tensor, Tensor]:
        """``(scale, zero_point)`` from an observer's statistics (its clipping range by default)."""
        lo, hi = observer._clip_range()
        return self.range_qparams(observer.spec, lo, hi)

    def range_error(self, spec: "QuantSpec", data: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        """Squared error of quantizing ``data`` (``[C, n]``) with the range ``[lo, hi]`` (``[C, 1]``)."""
        scale, zero_point = self.range_qparams(spec, lo, hi)
        return (fake_quantize_affine(data, scale, zero_point, *self.qrange(spec)) - data).pow(2)

    def label(self, spec: "QuantSpec") -> str:
        return self.name


def _along_axis(x: Tensor, scale: Tensor, zero_point: Tensor, spec: "QuantSpec") -> Tuple[Tensor, Tensor]:
    """Per-channel parameters shaped to broadcast along the spec's axis of ``x`` (scalars as they are)."""
    if scale.numel() > 1:
        shape = broadcast_shape(x.ndim, spec.axis % x.ndim)
        return scale.reshape(shape), zero_point.reshape(shape)
    return scale, zero_point


KINDS: Registry[QuantKind] = Registry("quantizer kind")


def register_kind(cls: type) -> type:
    """Register a :class:`QuantKind` subclass (one instance) under its ``name``."""
    KINDS.register(cls.name)(cls())
    return cls


def kind_of(name: str) -> QuantKind:
    """The registered kind ``name`` (a clear error naming the known ones otherwise)."""
    return KINDS.get(name)


for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["GRANULARITIES", "KINDS", "QuantKind", "kind_of", "register_kind"]
