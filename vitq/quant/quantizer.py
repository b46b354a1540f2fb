"""The ``Quantizer`` module: one quant point's state (spec, scale, zero point)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..errors import VitqError
from .primitives import (
    broadcast_shape,
    choose_qparams_affine,
    fake_quantize_affine,
    fake_quantize_log2,
    fake_quantize_logsqrt2,
    fake_quantize_twin,
    fake_quantize_twin_range,
)
from .spec import QuantSpec

Tensor = torch.Tensor


class Quantizer(nn.Module):
    """Fake-quantizes one tensor as its :class:`QuantSpec` says.

    A quantizer is created disabled; :func:`vitq.prepare` gives it a spec, calibration gives it
    ``scale`` and ``zero_point``. ``enabled`` can be switched off at run time (calibration does so
    while it observes float tensors); the spec says what the plan wants.

    Args:
        role: what the tensor is (see :mod:`vitq.quant.protocol`); protocols choose specs by role.
    """

    def __init__(self, role: str, spec: Optional[QuantSpec] = None) -> None:
        super().__init__()
        self.role = role
        self.spec = spec or QuantSpec(enabled=False)
        self.enabled = self.spec.enabled
        self.register_buffer("scale", None)
        self.register_buffer("zero_point", None)

    # -- state -------------------------------------------------------------------------------
    def set_spec(self, spec: QuantSpec) -> None:
        """Give the quantizer a new spec; parameters from an earlier spec are dropped."""
        self.spec = spec
        self.enabled = spec.enabled
        self.scale = None
        self.zero_point = None

    def set_qparams(self, scale: Tensor, zero_point: Tensor) -> None:
        self.scale = scale.detach().clone().float()
        self.zero_point = zero_point.detach().clone().float()

    @property
    def needs_calibration(self) -> bool:
        """Whether the point needs ``scale``/``zero_point`` from calibration before use."""
        return self.spec.enabled and self.spec.kind != "log2" and self.spec.granularity != "per_token"

    @property
    def is_calibrated(self) -> bool:
        return not self.needs_calibration or self.scale is not None

    # -- forward -----------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        spec = self.spec
        if spec.kind == "log2":
            return fake_quantize_log2(x, spec.bits)
        qmin, qmax = spec.qrange
        if spec.granularity == "per_token":
            lo = x.amin(dim=-1, keepdim=True)
            hi = x.amax(dim=-1, keepdim=True)
            scale, zp = choose_qparams_affine(lo, hi, qmin, qmax, spec.symmetric)
            return fake_quantize_affine(x, scale, zp, qmin, qmax)
        if self.scale is None:
            raise VitqError(
                f"{self.role} quantizer used before calibration: run vitq.calibrate(model, data) "
                "(or apply a plan) before evaluating the quantized model"
            )
        scale, zp = self.scale.to(x.dtype), self.zero_point.to(x.dtype)
        if spec.kind == "logsqrt2":
            return fake_quantize_logsqrt2(x, scale, spec.bits)
        if spec.kind == "twin":
            return fake_quantize_twin(x, scale, spec.ratio_log2, spec.bits)
        if spec.kind == "twin_range":
            return fake_quantize_twin_range(x, scale, spec.ratio_log2, spec.bits)
        if scale.numel() > 1:
            shape = broadcast_shape(x.ndim, spec.axis)
            scale, zp = scale.reshape(shape), zp.reshape(shape)
        return fake_quantize_affine(x, scale, zp, qmin, qmax)

    def extra_repr(self) -> str:
        s = self.spec
        if not s.enabled:
            return f"role={self.role}, disabled"
        sym = "sym" if s.symmetric else "asym"
        state = "calibrated" if self.is_calibrated else "uncalibrated"
        kind = f"{s.kind}(m={s.ratio_log2})" if s.kind in ("twin", "twin_range") else s.kind
        return f"role={self.role}, {kind}, {s.bits}b, {s.granularity}, {sym}, {state}"
