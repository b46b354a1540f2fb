"""What one quant point does: a frozen, validated value."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Dict, Tuple

from ..errors import VitqError
from .kinds import GRANULARITIES, KINDS, QuantKind, kind_of

MAX_RATIO_LOG2 = 16


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    Attributes:
        kind: ``uniform`` (affine), ``log2`` / ``logsqrt2`` (attention probabilities) or
            ``ptf`` (per-channel power-of-two factors over a shared base scale, for LayerNorm inputs) or
            ``twin`` (two regions, MPTQ-ViT OPT-m: a sign bit picks the negative scale
            ``scale / 2^ratio_log2`` or the positive ``scale``; for post-GELU values) or
            ``twin_range`` (two regions of a non-negative range, PTQ4ViT's twin uniform for
            post-softmax values: a region bit picks the fine scale ``scale / 2^ratio_log2`` for
            values within its range, else the coarse ``scale``).
        bits: integer bit-width, 2 to 16.
        granularity: ``per_tensor``, ``per_channel`` (along ``axis``) or ``per_token``
            (dynamic: one scale per row of the last dimension, computed at run time).
        axis: the channel axis for ``per_channel`` and ``ptf``.
        symmetric: signed range with zero point 0; otherwise unsigned with a zero point.
        enabled: a disabled point passes its tensor through unchanged.
        ratio_log2: ``twin`` / ``twin_range`` only: m in ``s_pos = 2^m · s_neg`` (``twin``) or
            ``s_coarse = 2^m · s_fine`` (``twin_range``), a shift in hardware. It is a
            discrete, per-point choice like ``bits``, so it lives in the spec; the quantizer's
            ``scale`` buffer holds ``s_pos`` and searches that move the scale keep the ratio.

    Example:
        >>> QuantSpec(bits=4, granularity="per_channel", axis=0, symmetric=True).qrange
        (-8, 7)
    """

    kind: str = "uniform"
    bits: int = 8
    granularity: str = "per_tensor"
    axis: int = -1
    symmetric: bool = False
    enabled: bool = True
    ratio_log2: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise VitqError(f"unknown quantizer kind {self.kind!r}; choose one of {', '.join(KINDS.names())}")
        if self.granularity not in GRANULARITIES:
            raise VitqError(
                f"unknown granularity {self.granularity!r}; choose one of {', '.join(GRANULARITIES)}"
            )
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 16:
            raise VitqError(f"bits must be an integer from 2 to 16, got {self.bits!r}")
        self.kind_entry.validate(self)
        m = self.ratio_log2
        if isinstance(m, bool) or not isinstance(m, int) or not 0 <= m <= MAX_RATIO_LOG2:
            raise VitqError(f"ratio_log2 must be an integer from 0 to {MAX_RATIO_LOG2}, got {m!r}")
        if m and not self.kind_entry.ratio:
            with_ratio = ", ".join(repr(n) for n, k in KINDS.items() if k.ratio)
            raise VitqError(f"ratio_log2 is a setting of {with_ratio} quantizers, not of {self.kind!r}")

    @property
    def kind_entry(self) -> QuantKind:
        """The registered :class:`~vitq.quant.kinds.QuantKind` of this spec."""
        return kind_of(self.kind)

    @property
    def qrange(self) -> Tuple[int, int]:
        """The integer range [q_min, q_max] (``twin``: of the signed magnitude, one bit being the sign)."""
        return self.kind_entry.qrange(self)

    def with_(self, **changes: Any) -> "QuantSpec":
        return replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        data = asdict(self)
        if not self.kind_entry.ratio:
            del data["ratio_log2"]  # plans of other kinds read as before
        return data

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "QuantSpec":
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise VitqError(f"unknown quantizer setting(s) {sorted(unknown)}")
        return cls(**data)
