"""Observers: statistics of the tensors a quant point sees, turned into parameters on request.

An observer never quantizes. ``observe`` is called once per calibration batch; ``qparams``
returns ``(scale, zero_point)`` for the observer's :class:`QuantSpec`.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from ..errors import VitqError, check_by_bits, reject_unknown_keys
from ..registry import Registry
from .primitives import channel_view, fake_quantize_logsqrt2
from .spec import QuantSpec

Tensor = torch.Tensor

OBSERVERS: Registry[type] = Registry("observer")


class Observer:
    """Base observer: running min/max along the spec's granularity.

    Subclasses change how batches are accumulated (``_accumulate``) or how the final
    clipping range is chosen (``_clip_range``).
    """

    #: whether the last batch's tensor is kept (OMSE searches on it; PTF always needs it)
    keeps_last_batch = False

    def __init__(self, spec: QuantSpec) -> None:
        if spec.granularity == "per_token":
            raise VitqError("per_token quantizers are dynamic: they need no observer")
        self.spec = spec
        self.min_val: Optional[Tensor] = None
        self.max_val: Optional[Tensor] = None
        self.last: Optional[Tensor] = None
        self.num_batches = 0

    def observe(self, x: Tensor) -> None:
        x = x.detach()
        if not torch.isfinite(x).all():
            raise VitqError("a calibration tensor holds NaN or inf: check the model and the input images")
        lo, hi = self._reduce(x)
        self._accumulate(lo, hi, x)
        if self.keeps_last_batch or self.spec.kind_entry.needs_tensor:
            self.last = x
        self.num_batches += 1

    @property
    def per_channel(self) -> bool:
        """Statistics per channel (PTF quantizers share one base range across channels)."""
        return self.spec.granularity == "per_channel" and self.spec.kind_entry.channel_stats

    def _reduce(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        if self.per_channel:
            flat = channel_view(x, self.spec.axis)
            return flat.amin(dim=1), flat.amax(dim=1)
        return x.amin(), x.amax()

    def _accumulate(self, lo: Tensor, hi: Tensor, x: Tensor) -> None:
        if self.min_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            self.min_val = torch.minimum(self.min_val, lo)
            self.max_val = torch.maximum(self.max_val, hi)

    def _clip_range(self) -> Tuple[Tensor, Tensor]:
        return self.min_val, self.max_val

    def _logsqrt2_delta(self) -> Tensor:
        """Δ of a ``logsqrt2`` quantizer (its largest level): the maximum; searching observers
        override it."""
        return self.max_val

    def qparams(self) -> Tuple[Tensor, Tensor]:
        """``(scale, zero_point)``: per-tensor scalars or ``[C]`` vectors."""
        if self.num_batches == 0:
            raise VitqError("the observer saw no data: calibrate with at least one batch")
        return self.spec.kind_entry.qparams(self)


def _strided(x: Tensor, per_channel: bool, axis: int, max_samples: int) -> Tensor:
    """``x`` as ``[C, n]`` (per channel) or ``[1, n]``, evenly strided down to about ``max_samples``
    elements (the search runs on the subset; min and max always come from the whole tensor)."""
    data = channel_view(x, axis) if per_channel else x.reshape(1, -1)
    stride = max(1, math.ceil(data.numel() / max_samples))
    return data[:, ::stride]


def best_range(spec: QuantSpec, data: Tensor, candidates) -> Tuple[Tensor, Tensor]:
    """Among candidate clipping ranges ``(lo, hi)`` (each ``[C, 1]`` for ``[C, n]`` data), the one
    whose quantization of ``data`` has the least squared error, row by row."""
    kind = spec.kind_entry
    best_err = best_lo = best_hi = None
    for cand_lo, cand_hi in candidates:
        err = kind.range_error(spec, data, cand_lo, cand_hi)
        err = err.sum(dim=1, keepdim=True)
        if best_err is None:
            best_err, best_lo, best_hi = err, cand_lo, cand_hi
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, cand_lo, best_lo)
        best_hi = torch.where(better, cand_hi, best_hi)
    return best_lo, best_hi


def best_logsqrt2_delta(data: Tensor, bits: int, candidates) -> Tensor:
    """Among candidate Δ (scalars), the one whose log√2 quantization of ``data`` has the least
    squared error (RepQ-ViT searches Δ this way for post-softmax values)."""
    best, best_err = None, None
    for delta in candidates:
        delta = torch.clamp(delta, min=1e-8)
        err = float((fake_quantize_logsqrt2(data, delta, bits) - data).pow(2).sum())
        if best_err is None or err < best_err:
            best, best_err = delta, err
    return best


@OBSERVERS.register("minmax")
class MinMaxObserver(Observer):
    """Running minimum and maximum over every calibration batch."""


@OBSERVERS.register("ema")
class EMAObserver(Observer):
    """Min and max as exponential moving averages: ``v ← v + momentum · (batch − v)``."""

    def __init__(self, spec: QuantSpec, momentum: float = 0.01) -> None:
        super().__init__(spec)
        if not 0 < momentum <= 1:
            raise VitqError(f"ema momentum must be in (0, 1], got {momentum}")
        self.momentum = momentum

    def _accumulate(self, lo: Tensor, hi: Tensor, x: Tensor) -> None:
        if self.min_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            self.min_val = self.min_val + self.momentum * (lo - self.min_val)
            self.max_val = self.max_val + self.momentum * (hi - self.max_val)


@OBSERVERS.register("percentile")
class PercentileObserver(EMAObserver):
    """The (1 − α, α) quantiles of each batch, smoothed across batches by an EMA (FQ-ViT)."""

    def __init__(self, spec: QuantSpec, percentile: float = 0.99999, momentum: float = 0.01) -> None:
        super().__init__(spec, momentum)
        if not 0.5 < percentile <= 1:
            raise VitqError(f"percentile must be in (0.5, 1], got {percentile}")
        self.percentile = percentile

    def _reduce(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        flat = channel_view(x, self.spec.axis) if self.per_channel else x.reshape(1, -1)
        n = flat.shape[1]
        k_hi = min(n, max(1, int(math.ceil(self.percentile * n))))
        k_lo = max(1, min(n, n + 1 - k_hi))
        lo = flat.kthvalue(k_lo, dim=1).values
        hi = flat.kthvalue(k_hi, dim=1).values
        if not self.per_channel:
            lo, hi = lo[0], hi[0]
        return lo, hi


@OBSERVERS.register("omse")
class OMSEObserver(Observer):
    """Clipping range with the least squared quantization error (FQ-ViT / Evol-Q OMSE).

    The observed [min, max] is shrunk by factors ``1 − 0.01·i`` (i = 0…89) and the factor
    with the least ``‖x − Q(x)‖²`` on the last calibration batch is kept (per channel for
    per-channel quantizers). Tensors larger than ``max_samples`` are searched on an evenly
    strided subset of their elements; min and max always come from the whole tensor.
    """

    keeps_last_batch = True

    def __init__(self, spec: QuantSpec, steps: int = 90, step: float = 0.01, max_samples: int = 1 << 20) -> None:
        super().__init__(spec)
        if not 1 <= steps or steps * step >= 1:
            raise VitqError("omse needs steps >= 1 and steps * step < 1")
        self.steps, self.step, self.max_samples = steps, step, max_samples

    def _factors(self):
        return [1.0 - self.step * i for i in range(self.steps)]

    def _clip_range(self) -> Tuple[Tensor, Tensor]:
        data = _strided(self.last, self.per_channel, self.spec.axis, self.max_samples)
        lo = self.min_val.reshape(-1, 1).to(data.dtype)
        hi = self.max_val.reshape(-1, 1).to(data.dtype)
        best_lo, best_hi = best_range(self.spec, data, [(lo * f, hi * f) for f in self._factors()])
        if self.per_channel:
            return best_lo.reshape(-1), best_hi.reshape(-1)
        return best_lo.reshape(()), best_hi.reshape(())

    def _logsqrt2_delta(self) -> Tensor:
        data = _strided(self.last, False, -1, self.max_samples)
        return best_logsqrt2_delta(data, self.spec.bits, [self.max_val * f for f in self._factors()])


@OBSERVERS.register("percentile_mse")
class PercentileMSEObserver(Observer):
    """The clipping range among the (1 − p, p) quantiles, p ∈ {0.999, 0.9999, 0.99999}, with the
    least squared quantization error (RepQ-ViT); per channel for per-channel quantizers, and Δ of
    log√2 quantizers chosen the same way.

    The quantiles and the error come from an evenly strided sample of every calibration batch
    (at most ``max_samples`` elements of each).
    """

    def __init__(self, spec: QuantSpec, percentiles: Tuple[float, ...] = (0.999, 0.9999, 0.99999),
                 max_samples: int = 1 << 18) -> None:
        super().__init__(spec)
        percentiles = tuple(percentiles)
        if not percentiles or not all(0.5 < p <= 1 for p in percentiles):
            raise VitqError(f"percentile_mse needs percentiles in (0.5, 1], got {list(percentiles)}")
        if max_samples < 1:
            raise VitqError("percentile_mse needs max_samples >= 1")
        self.percentiles, self.max_samples = percentiles, max_samples
        self.samples = []

    def _accumulate(self, lo: Tensor, hi: Tensor, x: Tensor) -> None:
        super()._accumulate(lo, hi, x)
        self.samples.append(_strided(x, self.per_channel, self.spec.axis, self.max_samples))

    def _quantiles(self) -> Tuple[Tensor, list]:
        data = torch.cat(self.samples, dim=1)
        ordered = data.sort(dim=1).values
        n = ordered.shape[1]
        pairs = []
        for p in self.percentiles:
            hi = ordered[:, min(n - 1, max(0, math.ceil(p * n) - 1))].reshape(-1, 1)
            lo = ordered[:, min(n - 1, max(0, n - math.ceil(p * n)))].reshape(-1, 1)
            pairs.append((lo, hi))
        return data, pairs

    def _clip_range(self) -> Tuple[Tensor, Tensor]:
        data, pairs = self._quantiles()
        best_lo, best_hi = best_range(self.spec, data, pairs)
        if self.per_channel:
            return best_lo.reshape(-1), best_hi.reshape(-1)
        return best_lo.reshape(()), best_hi.reshape(())

    def _logsqrt2_delta(self) -> Tensor:
        data, pairs = self._quantiles()
        return best_logsqrt2_delta(data, self.spec.bits, [hi.reshape(()) for _, hi in pairs])


def create_observer(name: str, spec: QuantSpec, **settings) -> Observer:
    """Build the observer registered as ``name`` for ``spec``."""
    cls = OBSERVERS.get(name)
    try:
        return cls(spec, **settings)
    except TypeError as err:
        raise VitqError(f"bad settings for observer {name!r}: {err}") from None


@dataclass(frozen=True)
class ObserverConfig:
    """Which observer sets a group of quant points, with its settings.

    ``symmetric_min_bits`` makes the grid symmetric from that many bits up whatever ``symmetric``
    says (OpenVINO runs 8-bit weights with zero points as weight-only compression, not in its
    integer kernels; below 8 bits vitq's export folds the zero points into the codes).
    ``symmetric_roles`` (activations) makes the quant points of those roles symmetric at every
    bit-width: ``[attn_qkv]`` gives q, k and v signed grids without zero points, which OpenVINO
    needs to run the two attention products in its int8 kernels. ``by_bits`` changes any of these for
    one bit-width pair, as a stage's does: ``{w6a6: {symmetric_roles: [attn_qkv]}}``.

    Example:
        >>> ObserverConfig("omse", symmetric=False).observer
        'omse'
        >>> ObserverConfig("omse", symmetric=False, symmetric_min_bits=8).symmetric_at(8)
        True
        >>> ObserverConfig("omse", symmetric_roles=["attn_qkv"]).symmetric_roles
        ('attn_qkv',)
    """

    observer: str = "minmax"
    symmetric: bool = False
    settings: Dict[str, Any] = field(default_factory=dict)
    symmetric_min_bits: Optional[int] = None
    symmetric_roles: Tuple[str, ...] = ()
    by_bits: Dict[str, Dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        cls = OBSERVERS.get(self.observer)
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "spec"}
        unknown = sorted(set(self.settings) - accepted)
        if unknown:
            raise VitqError(
                f"observer {self.observer!r} has no setting(s) {unknown}; it accepts {sorted(accepted) or 'none'}"
            )
        if not isinstance(self.symmetric, bool):
            raise VitqError(f"'symmetric' must be true or false, got {self.symmetric!r}")
        smb = self.symmetric_min_bits
        if smb is not None and (isinstance(smb, bool) or not isinstance(smb, int) or not 2 <= smb <= 16):
            raise VitqError(f"'symmetric_min_bits' must be a bit-width from 2 to 16 (or left out), got {smb!r}")
        from .protocol import ATTN_PROBS, ROLES, WEIGHT

        roles = self.symmetric_roles
        choices = [r for r in ROLES if r not in (WEIGHT, ATTN_PROBS)]
        if isinstance(roles, str) or not isinstance(roles, (list, tuple)) or \
                any(r not in choices for r in roles):
            raise VitqError(f"'symmetric_roles' lists activation roles whose grids are symmetric at every "
                            f"bit-width, from {', '.join(choices)} (e.g. [attn_qkv]); got {roles!r} "
                            "(post-softmax probabilities are never negative and keep an unsigned grid)")
        object.__setattr__(self, "symmetric_roles", tuple(roles))
        by_bits = check_by_bits(self.by_bits, "", "w6a6: {symmetric_roles: [attn_qkv]}")
        for key in by_bits:
            try:  # its keys and values, as they will be read at that bit-width
                self.at_bits(int(key[1]), int(key[3]), by_bits)
            except VitqError as err:
                raise VitqError(f"by_bits.{key}: {err}") from None
        object.__setattr__(self, "by_bits", by_bits)

    def at_bits(self, w_bits: int, a_bits: int, by_bits: Optional[Mapping[str, Any]] = None) -> "ObserverConfig":
        """This configuration as a run at ``w_bits``/``a_bits`` reads it (its ``by_bits`` entry applied).

        Example:
            >>> c = ObserverConfig("minmax", by_bits={"w6a6": {"symmetric_roles": ["attn_qkv"]}})
            >>> c.at_bits(6, 6).symmetric_roles, c.at_bits(4, 8).symmetric_roles
            (('attn_qkv',), ())
        """
        changes = (self.by_bits if by_bits is None else by_bits).get(f"w{w_bits}a{a_bits}")
        if not changes:
            return self
        own = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "by_bits"}
        unknown = sorted(set(changes) - set(own))
        if unknown:
            raise VitqError(f"unknown key(s) {unknown}; an observer configuration has {', '.join(own)}")
        return ObserverConfig(**{**own, **changes})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> "ObserverConfig":
        reject_unknown_keys(cls, data, where)
        return cls(**data)

    def symmetric_at(self, bits: int) -> bool:
        """Whether the grid is symmetric at ``bits`` (``symmetric_roles`` aside)."""
        if self.symmetric_min_bits is not None and bits >= self.symmetric_min_bits:
            return True
        return self.symmetric

    def build(self, spec: QuantSpec) -> Observer:
        """A fresh observer for one quant point."""
        return create_observer(self.observer, spec, **self.settings)
