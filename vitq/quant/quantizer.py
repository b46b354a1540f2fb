"""The ``Quantizer`` module: one quant point's state (spec, scale, zero point)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..errors import VitqError
from .primitives import choose_qparams_affine, fake_quantize_affine
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
        return self.spec.enabled and self.spec.kind_entry.calibrated and self.spec.granularity != "per_token"

    @property
    def is_calibrated(self) -> bool:
        return not self.needs_calibration or self.scale is not None

    # -- forward -----------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        spec = self.spec
        kind = spec.kind_entry
        if not kind.calibrated:
            return kind.fake_quantize(x, None, None, spec)
        if spec.granularity == "per_token":
            qmin, qmax = spec.qrange
            lo = x.amin(dim=-1, keepdim=True)
            hi = x.amax(dim=-1, keepdim=True)
            scale, zp = choose_qparams_affine(lo, hi, qmin, qmax, spec.symmetric)
            return fake_quantize_affine(x, scale, zp, qmin, qmax)
        if self.scale is None:
            raise VitqError(
                f"{self.role} quantizer used before calibration: run vitq.calibrate(model, data) "
                "(or apply a plan) before evaluating the quantized model"
            )
        return kind.fake_quantize(x, self.scale.to(x.dtype), self.zero_point.to(x.dtype), spec)

    def extra_repr(self) -> str:
        s = self.spec
        if not s.enabled:
            return f"role={self.role}, disabled"
        sym = "sym" if s.symmetric else "asym"
        state = "calibrated" if self.is_calibrated else "uncalibrated"
        kind = s.kind_entry.label(s)
        return f"role={self.role}, {kind}, {s.bits}b, {s.granularity}, {sym}, {state}"
