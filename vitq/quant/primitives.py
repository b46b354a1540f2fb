"""Pure functions of quantization: choose parameters, quantize, dequantize, fake-quantize.

No modules and no state. Every function works on any device and keeps the input dtype.
"""
from __future__ import annotations

from typing import Tuple

import torch

Tensor = torch.Tensor

_EPS = 1e-8


def round_ste(x: Tensor) -> Tensor:
    """Round to nearest with a straight-through gradient (d round(x)/dx := 1)."""
    return x + (torch.round(x) - x).detach()


def choose_qparams_affine(
    min_val: Tensor, max_val: Tensor, qmin: int, qmax: int, symmetric: bool
) -> Tuple[Tensor, Tensor]:
    """Scale and zero point that map [min_val, max_val] onto [qmin, qmax].

    The range is first widened to contain 0, so that 0 is exactly representable.
    Symmetric: ``scale = max(|min|, |max|) / ((qmax - qmin) / 2)`` with zero point 0.
    Asymmetric: ``scale = (max - min) / (qmax - qmin)``, ``zp = clamp(qmin - round(min / scale))``.

    Example:
        >>> s, z = choose_qparams_affine(torch.tensor(-1.0), torch.tensor(3.0), 0, 255, False)
        >>> round(s.item(), 6), z.item()
        (0.015686, 64.0)
    """
    min_val = torch.clamp(min_val, max=0.0)
    max_val = torch.clamp(max_val, min=0.0)
    if symmetric:
        amax = torch.maximum(-min_val, max_val)
        scale = amax / ((qmax - qmin) / 2)
        scale = torch.clamp(scale, min=_EPS)
        zero_point = torch.zeros_like(scale)
    else:
        scale = (max_val - min_val) / (qmax - qmin)
        scale = torch.clamp(scale, min=_EPS)
        zero_point = torch.clamp(qmin - torch.round(min_val / scale), qmin, qmax)
    return scale, zero_point


def quantize_affine(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """Integer codes (as a float tensor): ``clamp(round(x / s) + z, qmin, qmax)``."""
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)


def dequantize_affine(q: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    """``s · (q − z)``."""
    return (q - zero_point) * scale


def fake_quantize_affine(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """Quantize then dequantize: ``s · (clamp(round(x / s) + z, qmin, qmax) − z)``.

    ``scale`` and ``zero_point`` broadcast against ``x``. With gradients, rounding is
    straight-through inside the clipping range; without, the same arithmetic runs in place on
    one buffer (about 3× faster on CPU than torch's fused fake-quantize kernel, and bit-identical
    to the gradient path).
    """
    if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad):
        q = torch.clamp(round_ste(x / scale) + zero_point, qmin, qmax)
        return (q - zero_point) * scale
    return torch.div(x, scale).round_().add_(zero_point).clamp_(qmin, qmax).sub_(zero_point).mul_(scale)


def fake_quantize_log2(p: Tensor, bits: int) -> Tensor:
    """FQ-ViT's log2 quantizer for probabilities in [0, 1].

    ``q = round(-log2 p)``; codes above ``2^bits - 1`` (and p = 0) map to 0; ``p_hat = 2^-q``.
    """
    qmax = 2**bits - 1
    q = round_ste(-torch.log2(torch.clamp(p, min=1e-30)))
    q = torch.clamp(q, min=0.0)
    out = torch.exp2(-q)
    return torch.where((q > qmax) | (p <= 0), torch.zeros_like(out), out)


def fake_quantize_logsqrt2(p: Tensor, delta: Tensor, bits: int) -> Tensor:
    """RepQ-ViT's log√2 quantizer: ``q = round(-2 log2(p / Δ))``, ``p_hat = Δ · 2^(-q/2)``.

    ``2^(-q/2)`` equals ``2^(-ceil(q/2)) · √2`` for odd q, the shift-and-multiply form used
    at deployment. Codes above ``2^bits - 1`` map to 0.
    """
    qmax = 2**bits - 1
    q = round_ste(-2.0 * torch.log2(torch.clamp(p / delta, min=1e-30)))
    q = torch.clamp(q, min=0.0)
    out = delta * torch.exp2(-q / 2)
    return torch.where((q > qmax) | (p <= 0), torch.zeros_like(out), out)


def fake_quantize_twin(x: Tensor, scale: Tensor, ratio_log2: int, bits: int) -> Tensor:
    """Two-region ("twin") quantizer for post-GELU values (PTQ4ViT twin uniform; MPTQ-ViT OPT-m, §4.2).

    One bit of the ``bits`` is the sign; it picks the region. Positive values use the scale
    ``s_pos = scale`` and negative values ``s_neg = scale / 2^ratio_log2``, each with the
    ``2^(bits-1)`` magnitudes ``0 … 2^(bits-1) - 1``::

        x_hat = s_pos · clamp(round(x / s_pos), 0, q)  +  s_neg · clamp(round(x / s_neg), -q, 0),  q = 2^(bits-1) - 1

    (for each x one of the two terms is 0, so each x takes its own region's term). Rounding is
    straight-through with gradients.

    Example (3 bits, s_pos = 1, m = 2, so s_neg = 0.25 and three magnitudes per side):
        >>> fake_quantize_twin(torch.tensor([-1.0, -0.3, 0.1, 0.6, 5.0]), torch.tensor(1.0), 2, 3).tolist()
        [-0.75, -0.25, 0.0, 1.0, 3.0]
    """
    qmax = 2 ** (bits - 1) - 1
    s_neg = scale * 2.0 ** (-ratio_log2)
    rnd = round_ste if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad) else torch.round
    pos = torch.clamp(rnd(x / scale), 0, qmax) * scale
    neg = torch.clamp(rnd(x / s_neg), -qmax, 0) * s_neg
    return torch.where(x < 0, neg, pos)


def fake_quantize_twin_range(x: Tensor, scale: Tensor, ratio_log2: int, bits: int) -> Tensor:
    """Two regions of a non-negative range ("twin uniform" of PTQ4ViT, for post-softmax values;
    MPTQ-ViT's OPT-m searches its ratio, §4.2).

    One bit of the ``bits`` picks the region, each with the ``2^(bits-1)`` levels ``0 … q``,
    ``q = 2^(bits-1) - 1``: the fine scale ``s_f = scale / 2^ratio_log2`` for values below
    ``(q + ½)·s_f`` (those it can round to), the coarse ``scale`` for the rest::

        x_hat = s_f · round(x / s_f)                  if x < (q + ½)·s_f
              = scale · clamp(round(x / scale), 0, q)  otherwise

    Negative inputs go to 0. Rounding is straight-through with gradients.

    Example (3 bits: q = 3; coarse scale 1, m = 2, so s_f = 0.25 covers [0, 0.875)):
        >>> fake_quantize_twin_range(torch.tensor([-0.2, 0.1, 0.3, 0.8, 1.4, 5.0]), torch.tensor(1.0), 2, 3).tolist()
        [0.0, 0.0, 0.25, 0.75, 1.0, 3.0]
    """
    qmax = 2 ** (bits - 1) - 1
    s_fine = scale * 2.0 ** (-ratio_log2)
    rnd = round_ste if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad) else torch.round
    fine = torch.clamp(rnd(x / s_fine), 0, qmax) * s_fine
    coarse = torch.clamp(rnd(x / scale), 0, qmax) * scale
    return torch.where(x < (qmax + 0.5) * s_fine, fine, coarse)


def choose_ptf_factors(
    x: Tensor, base_scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, num_factors: int = 4
) -> Tensor:
    """FQ-ViT power-of-two factors: for each channel (last axis) the α in {0..num_factors-1}
    whose scale ``base_scale · 2^α`` gives the least squared quantization error.

    ``base_scale`` is the finest scale, i.e. the per-tensor scale divided by ``2^(num_factors-1)``.
    Returns the per-channel scales ``base_scale · 2^α`` (shape ``[C]``).
    """
    flat = x.reshape(-1, x.shape[-1])
    errors = []
    for alpha in range(num_factors):
        s = base_scale * 2.0**alpha
        err = (fake_quantize_affine(flat, s, zero_point, qmin, qmax) - flat).pow(2).sum(dim=0)
        errors.append(err)
    alpha = torch.stack(errors).argmin(dim=0)
    return base_scale * torch.exp2(alpha.to(flat.dtype))


def broadcast_shape(ndim: int, axis: int) -> Tuple[int, ...]:
    """Shape that makes a ``[C]`` vector broadcast along ``axis`` of an ``ndim`` tensor."""
    axis = axis % ndim
    return tuple(-1 if i == axis else 1 for i in range(ndim))


def channel_view(x: Tensor, axis: int) -> Tensor:
    """``x`` as ``[C, -1]`` with the channel axis first."""
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


