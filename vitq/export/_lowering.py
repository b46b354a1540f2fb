"""Export forms of the quantized modules.

The same arithmetic as :mod:`vitq.nn`, written so that torch's TorchScript ONNX exporter emits
``QuantizeLinear``/``DequantizeLinear`` pairs for activations and integer initializers with a
``DequantizeLinear`` for weights: the pattern ONNX Runtime fuses into integer kernels. In PyTorch
each export form computes exactly what the simulated module computes, so a lowered model can be
compared with the simulated one before anything is written.

Quant points that QDQ cannot express (log2 and log√2 attention probabilities, per-token dynamic
scales) are lowered to the float operations that emulate them: the exported model computes the
same numbers, in float.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..errors import VitqError
from ..nn import QuantAttention, QuantConv2d, QuantLayerNorm, QuantLinear, QuantWindowAttention
from ..quant import protocol as roles
from ..quant.primitives import broadcast_shape, choose_qparams_affine, fake_quantize_affine, quantize_affine
from ..quant.quantizer import Quantizer
from ..quant.spec import QuantSpec
from .formats import IntFormat

Tensor = torch.Tensor

# how a quant point is exported
QDQ = "qdq"  # QuantizeLinear → DequantizeLinear on an activation
INT_WEIGHT = "int_weight"  # integer initializer → DequantizeLinear
EMULATED = "float_emulated"  # float operations computing the quantizer's output
OFF = "off"  # disabled: passes its tensor through


@dataclass(frozen=True)
class PointExport:
    """How one quant point of the plan appears in the ONNX graph."""

    name: str
    role: str
    spec: QuantSpec
    form: str
    container: Optional[str] = None  # ONNX type of the codes: uint8 / int8
    note: str = ""

    def to_dict(self) -> Dict[str, object]:
        s = self.spec
        return {
            "name": self.name, "role": self.role, "kind": s.kind, "bits": s.bits, "granularity": s.granularity,
            "symmetric": s.symmetric, "form": self.form, "container": self.container, "note": self.note,
        }


def _container(signed: bool) -> Tuple[torch.dtype, int, int, str]:
    return (torch.int8, -128, 127, "int8") if signed else (torch.uint8, 0, 255, "uint8")


def _shift_for(spec: QuantSpec, signed: bool) -> int:
    """Offset from vitq codes to container codes: exact re-encodings of one grid (see formats.py)."""
    qmin, qmax = spec.qrange
    if signed and qmin == 0:
        # unsigned codes [0, 2^b - 1] in a signed container are centred on [-2^(b-1), 2^(b-1) - 1]: the
        # same grid, and below 8 bits products small enough that AVX2's int16 pair sums cannot
        # saturate (asymmetric 7-bit weights left at [0, 127] did, with 8-bit activations)
        return -((qmax + 1) // 2)
    lo, hi = (-128, 127) if signed else (0, 255)
    if lo <= qmin and qmax <= hi:
        return 0
    shift = -128 if signed else 128
    if not (lo <= qmin + shift and qmax + shift <= hi):  # pragma: no cover - bits ≤ 8 always fit
        raise VitqError(f"a {spec.bits}-bit quantizer does not fit an 8-bit container")
    return shift


class _QuantDequant(torch.autograd.Function):
    """Per-tensor fake quantization whose ONNX form is [Clip →] QuantizeLinear → DequantizeLinear.

    Tensors reach ``symbolic`` as graph values: the module's buffers, exported as initializers.
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, c_zero_point, lo, hi, qmin, qmax):
        return fake_quantize_affine(x, scale.to(x.dtype), zero_point.to(x.dtype), qmin, qmax)

    @staticmethod
    def symbolic(g, x, scale, zero_point, c_zero_point, lo, hi, qmin, qmax):
        if lo is not None:  # the quantizer's range is narrower than its 8-bit container
            x = g.op("Clip", x, lo, hi)
        return g.op("DequantizeLinear", g.op("QuantizeLinear", x, scale, c_zero_point), scale, c_zero_point)


class _Dequant(torch.autograd.Function):
    """``scale · (q − z)`` of integer weight codes; ONNX form: DequantizeLinear."""

    @staticmethod
    def forward(ctx, q, scale, zero_point, axis, per_channel):
        if per_channel:
            shape = broadcast_shape(q.ndim, axis)
            scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
        return (q.float() - zero_point.float()) * scale

    @staticmethod
    def symbolic(g, q, scale, zero_point, axis, per_channel):
        kw = {"axis_i": axis} if per_channel else {}
        return g.op("DequantizeLinear", q, scale, zero_point, **kw)


class ExportQuantizer(nn.Module):
    """A calibrated :class:`Quantizer` in its export form (QDQ, float emulation or pass-through)."""

    def __init__(self, quantizer: Quantizer, fmt: IntFormat) -> None:
        super().__init__()
        spec = quantizer.spec
        self.role = quantizer.role
        self.spec = spec
        self.container: Optional[str] = None
        scale = None if quantizer.scale is None else quantizer.scale.detach().float().cpu()
        zero_point = None if quantizer.zero_point is None else quantizer.zero_point.detach().float().cpu()
        self.per_channel = scale is not None and scale.numel() > 1
        if not (quantizer.enabled and spec.enabled):
            self.form = OFF
        elif not spec.kind_entry.integer or spec.granularity == "per_token" or self.per_channel:
            # a kind without an integer form (log grids; twins, whose two scales 2^m apart have no common
            # 8-bit code) is emulated and its consumer runs in float; per-channel activation scales (PTF
            # LayerNorm inputs) feed float LayerNorms: QDQ would gain nothing, and ONNX Runtime wrongly
            # fuses a per-channel Q into QLinearConv
            self.form = EMULATED
        else:
            self.form = QDQ
        if scale is not None:  # 0-d per tensor (what QuantizeLinear expects), 1-d per channel
            scale = scale.reshape(-1) if self.per_channel else scale.reshape(())
            zero_point = zero_point.reshape(-1) if self.per_channel else zero_point.reshape(())
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)
        self.register_buffer("c_zero_point", None)
        self.register_buffer("clip_lo", None)
        self.register_buffer("clip_hi", None)
        if self.form == QDQ:
            signed = fmt.signed_activations
            dtype, lo, hi, self.container = _container(signed)
            shift = _shift_for(spec, signed)
            qmin, qmax = spec.qrange
            self.c_zero_point = (zero_point.round() + shift).to(dtype)
            if (qmin + shift, qmax + shift) != (lo, hi):  # e.g. 6-bit codes in an 8-bit container
                self.clip_lo = scale * (qmin - zero_point)
                self.clip_hi = scale * (qmax - zero_point)

    @property
    def narrow(self) -> bool:
        return self.clip_lo is not None

    @property
    def per_tensor(self) -> bool:
        """Whether the quantizer commutes with a transpose (it acts on each element alone)."""
        return self.form == OFF or self.spec.granularity == "per_tensor"

    def forward(self, x: Tensor) -> Tensor:
        if self.form == OFF:
            return x
        spec = self.spec
        qmin, qmax = spec.qrange
        if self.form == QDQ:
            return _QuantDequant.apply(x, self.scale, self.zero_point, self.c_zero_point, self.clip_lo,
                                       self.clip_hi, qmin, qmax)
        if spec.granularity != "per_token":
            scale = None if self.scale is None else self.scale.to(x.dtype)
            zero_point = None if self.zero_point is None else self.zero_point.to(x.dtype)
            return spec.kind_entry.export_forward(x, scale, zero_point, spec)
        lo_v, hi_v = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)  # per-token, at run time
        scale, zp = choose_qparams_affine(lo_v, hi_v, qmin, qmax, spec.symmetric)
        return torch.clamp(torch.round(x / scale) + zp, qmin, qmax).sub(zp).mul(scale)


class _IntWeight:
    """Mixin of the export forms of QuantLinear/QuantConv2d: the weight as integer codes."""

    def _lower_weight(self, fmt: IntFormat, transpose: bool, fold: Optional[int] = None) -> Optional[PointExport]:
        """``fold``: when set, weights with zero points are re-encoded as ``codes - zero point`` with
        zero point 0 where every such code lies within ±``fold`` (an exact re-encoding of the same
        grid: OpenVINO runs only zero-point-free weights in integer kernels)."""
        quantizer: Quantizer = self.weight_quantizer
        spec = quantizer.spec
        self.int_weight = quantizer.enabled and spec.enabled
        if not self.int_weight:
            return None
        if not spec.kind_entry.integer or spec.granularity == "per_token":
            raise VitqError(f"weights quantized as {spec.kind}/{spec.granularity} cannot be exported")
        signed = fmt.signed_weights
        dtype, _, _, container = _container(signed)
        shift = _shift_for(spec, signed)
        weight = self.weight.detach()
        scale, zp = quantizer.scale.detach().float().cpu(), quantizer.zero_point.detach().float().cpu()
        axis = spec.axis % weight.ndim
        if scale.numel() > 1:
            shape = broadcast_shape(weight.ndim, axis)
            codes = quantize_affine(weight, scale.reshape(shape), zp.reshape(shape), *spec.qrange)
            scale, zp = scale.reshape(-1), zp.reshape(-1)
        else:
            codes = quantize_affine(weight, scale, zp, *spec.qrange)
            scale, zp = scale.reshape(()), zp.reshape(())
        codes = codes + shift
        self.folded = False
        if fold is not None and signed:
            centred = codes - (zp.round() + shift).reshape(shape if scale.numel() > 1 else ())
            if zp.abs().max() > 0 and centred.abs().max() <= fold:
                codes, zp, shift, self.folded = centred, torch.zeros_like(zp), 0, True
        if transpose:  # MatMul(x, Wᵀ) keeps the output channels on the last axis
            codes = codes.reshape(codes.shape[0], -1).t()
            axis = 1 - axis
        self.w_axis = axis
        self.register_buffer("weight_codes", codes.round().to(dtype).contiguous())
        self.register_buffer("weight_scale", scale.contiguous())
        self.register_buffer("weight_zero_point", (zp.round() + shift).to(dtype).contiguous())
        return PointExport("", quantizer.role, spec, INT_WEIGHT, container)

    def _export_weight(self) -> Tensor:
        return _Dequant.apply(self.weight_codes, self.weight_scale, self.weight_zero_point, self.w_axis,
                              self.weight_scale.numel() > 1)


class ExportLinear(_IntWeight, QuantLinear):
    """``MatMul(DQ(Q(x)), DQ(Wᵀ codes)) + b``: ONNX Runtime's MatMulIntegerToFloat pattern. Where the
    input's prefix rows have a quantizer of their own (:class:`~vitq.nn.PrefixRows`), each row group
    has its own product (two integer MatMuls, their outputs concatenated)."""

    def forward(self, x: Tensor) -> Tensor:
        parts = [self._product(q(rows)) for q, rows in self._row_groups("input", x)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)

    def _product(self, x: Tensor) -> Tensor:
        if not self.int_weight:
            return nn.functional.linear(x, self.weight, self.bias)
        if x.ndim == 2:
            # [B, C] (the head): ONNX Runtime would fuse MatMul + Add into a float Gemm first
            y = (x.unsqueeze(1) @ self._export_weight()).squeeze(1)
        else:
            y = x @ self._export_weight()
        return y if self.bias is None else y + self.bias


class ExportConv2d(_IntWeight, QuantConv2d):
    """The patch embedding. A patchifying convolution (kernel = stride, no padding) is written as
    patches @ Wᵀ, which ONNX Runtime runs as an integer MatMul (it fuses a QDQ Conv only when its
    output is quantized too); any other convolution keeps a Conv on dequantized weights."""

    def can_patchify(self) -> bool:
        """Kernel = stride, no padding, and an input quantizer that commutes with the rearrangement."""
        q = self.input_quantizer
        elementwise = not (q.enabled and q.spec.enabled) or q.spec.granularity == "per_tensor"
        return (tuple(self.kernel_size) == tuple(self.stride) and tuple(self.padding) == (0, 0)
                and tuple(self.dilation) == (1, 1) and self.groups == 1 and self.padding_mode == "zeros"
                and elementwise)

    def forward(self, x: Tensor) -> Tensor:
        if not (self.int_weight and self.w_patchify):
            weight = self._export_weight() if self.int_weight else self.weight
            return self._conv_forward(self.input_quantizer(x), weight, self.bias)
        B, C, H, W = x.shape
        kh, kw = self.kernel_size
        h, w = H // kh, W // kw
        x = x[:, :, : h * kh, : w * kw]  # what a stride-k convolution leaves out
        patches = x.reshape(B, C, h, kh, w, kw).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, C * kh * kw)
        y = self.input_quantizer(patches) @ self._export_weight()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(B, h, w, -1).permute(0, 3, 1, 2)


class _ExportAttend:
    """Attention written for integer MatMuls: the softmax scale applied after q·kᵀ (not to q, which
    would put a float Mul between DequantizeLinear and MatMul) and k quantized after its transpose."""

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        v = self.v_quantizer(v)
        keys = []  # kᵀ by row group of k (the prefix tokens' keys apart where they have a quantizer of their own)
        for quantizer, rows in self._row_groups("k", k):
            keys.append(quantizer(rows.transpose(-2, -1)) if quantizer.per_tensor
                        else quantizer(rows).transpose(-2, -1))
        # one integer product per (query rows, key rows) group pair: a group's scale factors out of it
        scores = [torch.cat([quantizer(rows) @ k_t for k_t in keys], dim=-1) if len(keys) > 1
                  else quantizer(rows) @ keys[0] for quantizer, rows in self._row_groups("q", q)]
        scores = (scores[0] if len(scores) == 1 else torch.cat(scores, dim=-2)) * self.scale
        if bias is not None:
            scores = scores + bias
        probs = self.probs_quantizer(self.scores_quantizer(scores).softmax(dim=-1))
        return probs @ v


class ExportAttention(_ExportAttend, QuantAttention):
    pass


class ExportWindowAttention(_ExportAttend, QuantWindowAttention):
    pass


_EXPORT_FORMS = {
    QuantLinear: ExportLinear,
    QuantConv2d: ExportConv2d,
    QuantAttention: ExportAttention,
    QuantWindowAttention: ExportWindowAttention,
    QuantLayerNorm: QuantLayerNorm,
}


def lower(model: nn.Module, fmt: IntFormat, fold_weight_zero_points: Optional[int] = None
          ) -> Tuple[nn.Module, List[PointExport]]:
    """A copy of a converted quantized ``model`` in export form, and how each quant point is exported.

    ``model`` itself is not changed. ``fold_weight_zero_points``: see :meth:`_IntWeight._lower_weight`.
    """
    model = copy.deepcopy(model).eval().cpu()
    points: List[PointExport] = []
    for name, module in list(model.named_modules()):
        cls = _EXPORT_FORMS.get(type(module))
        if cls is None:
            continue
        # our own private copy: swapping the class keeps parameters, buffers and children
        module.__class__ = cls
        if isinstance(module, _IntWeight):
            if isinstance(module, ExportConv2d):
                module.w_patchify = module.can_patchify()
            point = module._lower_weight(fmt, transpose=isinstance(module, ExportLinear) or module.w_patchify,
                                         fold=fold_weight_zero_points)
            if point is not None:
                note = "zero points folded into the codes (an exact symmetric re-encoding)" if module.folded else ""
                points.append(PointExport(f"{name}.weight_quantizer", point.role, point.spec, point.form,
                                          point.container, note))
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, Quantizer):
                continue
            full = f"{name}.{child_name}" if name else child_name
            if child.role == roles.WEIGHT and isinstance(module, _IntWeight):
                if not module.int_weight:
                    points.append(PointExport(full, child.role, child.spec, OFF))
                continue
            if child.needs_calibration and child.scale is None:
                raise VitqError(f"quant point {full} is not calibrated: calibrate or apply a plan before export")
            export = ExportQuantizer(child, fmt)
            setattr(module, child_name, export)
            note = ""
            if export.form == EMULATED:
                what = "per-channel (PTF) activation scales" if export.per_channel else \
                    f"{child.spec.kind} {child.spec.granularity}"
                note = f"{what}: no integer consumer in ONNX Runtime; emulated with float operations (same values)"
            elif export.form == QDQ and export.narrow:
                note = f"{child.spec.bits}-bit codes in an 8-bit container (clipped to the {child.spec.bits}-bit range)"
            points.append(PointExport(full, child.role, child.spec, export.form, export.container, note))
    return model, points
