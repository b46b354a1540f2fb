"""Integer formats of ONNX Runtime's CPU kernels, and the choice of one for a CPU.

ONNX Runtime picks its integer GEMM kernel from the types of the two operands: U8S8 (uint8
activations, int8 weights), U8U8 or S8S8. Which is fastest, and which is exact, depends on the CPU:

* with VNNI (``avx512_vnni``, ``avx_vnni``) ``vpdpbusd`` multiplies uint8 by int8 and accumulates in
  int32: U8S8 is fast and exact;
* with AVX2 alone the U8S8 (and S8S8) kernels use ``vpmaddubsw``, which adds two neighbouring
  uint8·int8 products in a *saturating int16*: with 8-bit weights (|w| up to 128) and 8-bit
  activations (up to 255) the sum can leave [-32768, 32767] and the result is wrong. Weights of
  at most 7 bits (255·64·2 = 32640) or activation codes of at most 7 bits (127·128·2 = 32512)
  cannot saturate, so U8S8 is exact for such plans. U8U8 widens to int16 before multiplying:
  exact at 8 bits, about 15 % slower than U8S8 on an AVX2 machine measured for vitq.

Every format is an exact re-encoding of the same integer grid: an unsigned code ``q`` with zero
point ``z`` is the signed code ``q - 128`` with zero point ``z - 128``, and a signed weight code
``w`` is the unsigned ``w + 128`` with zero point 128.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import FrozenSet, Optional

from ..errors import VitqError

FORMATS = ("u8s8", "u8u8", "s8s8")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "avx_vnni_int8")


@dataclass(frozen=True)
class CpuInfo:
    """What of the CPU matters to the integer kernels."""

    flags: FrozenSet[str]

    @property
    def vnni(self) -> bool:
        return any(f in self.flags for f in VNNI_FLAGS)

    @property
    def amx(self) -> bool:
        """Intel AMX (int8 and bf16 tile instructions): OpenVINO's fastest int8 and bf16 kernels."""
        return "amx_int8" in self.flags or "amx_tile" in self.flags

    @property
    def isa(self) -> str:
        if self.vnni:
            return "VNNI"
        if "avx512bw" in self.flags:
            return "AVX-512 (no VNNI)"
        if "avx2" in self.flags:
            return "AVX2 (no VNNI)"
        return "no AVX2" if self.flags else "unknown"


def cpu_info(cpuinfo: str | Path = "/proc/cpuinfo") -> CpuInfo:
    """The CPU flags from ``/proc/cpuinfo`` (empty where it cannot be read, e.g. not Linux)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return CpuInfo(frozenset())
    for line in text.splitlines():
        if line.startswith("flags"):
            return CpuInfo(frozenset(line.split(":", 1)[1].split()))
    return CpuInfo(frozenset())


@dataclass(frozen=True)
class IntFormat:
    """How the integer operands of ONNX Runtime's GEMMs are stored.

    Attributes:
        name: ``u8s8``, ``u8u8`` or ``s8s8`` (activation type, then weight type).
        reason: why this format was chosen.
    """

    name: str
    reason: str = "chosen by the caller (int_format / --int-format)"

    def __post_init__(self) -> None:
        if self.name not in FORMATS:
            raise VitqError(f"unknown integer format {self.name!r}; choose one of auto, {', '.join(FORMATS)}")

    @property
    def signed_activations(self) -> bool:
        return self.name == "s8s8"

    @property
    def signed_weights(self) -> bool:
        return self.name != "u8u8"

    def may_saturate(self, cpu: CpuInfo, max_weight_bits: int, max_act_bits: int = 8) -> bool:
        """Whether int16 saturation of AVX2's ``vpmaddubsw`` can change results.

        ``max_act_bits``: the widest activation feeding a weight GEMM (S8S8 shifts activations
        into uint8 inside the kernel, so only U8S8 profits from narrow activations).
        """
        if not self.signed_weights or cpu.vnni or max_weight_bits <= 7:
            return False
        return self.name == "s8s8" or max_act_bits >= 8


def choose_format(
    requested: Optional[str], max_weight_bits: int, cpu: Optional[CpuInfo] = None, max_act_bits: int = 8
) -> IntFormat:
    """The format for ``requested`` (``auto``/None: the fastest exact one for ``cpu``).

    ``max_weight_bits`` / ``max_act_bits``: the widest weight and the widest activation that feed
    the weight GEMMs.

    Example:
        >>> avx2 = CpuInfo(frozenset({"avx2"}))
        >>> choose_format("auto", 8, avx2).name, choose_format("auto", 4, avx2).name
        ('u8u8', 'u8s8')
        >>> choose_format("auto", 8, avx2, max_act_bits=7).name
        'u8s8'
        >>> choose_format(None, 8, CpuInfo(frozenset({"avx2", "avx512_vnni"}))).name
        'u8s8'
    """
    if requested not in (None, "auto"):
        return IntFormat(requested)
    cpu = cpu if cpu is not None else cpu_info()
    if cpu.vnni:
        return IntFormat("u8s8", f"{cpu.isa}: uint8×int8 products accumulate in int32, U8S8 is fast and exact")
    if max_weight_bits <= 7 or max_act_bits <= 7:
        narrow = "weights" if max_weight_bits <= 7 else "activations"
        return IntFormat(
            "u8s8", f"{cpu.isa}: {narrow} of ≤ 7 bits cannot saturate the int16 pair sums of U8S8, which is fastest"
        )
    return IntFormat(
        "u8u8",
        f"{cpu.isa}: with 8-bit weights and activations U8S8 can saturate int16 pair sums (vpmaddubsw); U8U8 is "
        "exact. Quantize with --w-bits 7 or --a-bits 7 (or run on a VNNI CPU) for the faster U8S8 kernels",
    )
