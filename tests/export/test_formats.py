"""Integer formats and the CPU they are chosen for."""
from __future__ import annotations

import pytest

from vitq import VitqError
from vitq.export.formats import CpuInfo, IntFormat, choose_format, cpu_info

AVX2 = CpuInfo(frozenset({"sse4_2", "avx2", "fma"}))
VNNI = CpuInfo(frozenset({"avx2", "avx512f", "avx512bw", "avx512_vnni"}))
AVX_VNNI = CpuInfo(frozenset({"avx2", "avx_vnni"}))


def test_cpu_info_reads_flags(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse avx2 avx512_vnni\n\n")
    info = cpu_info(path)
    assert info.vnni and "avx2" in info.flags
    assert info.isa == "VNNI"


def test_cpu_info_without_file(tmp_path):
    info = cpu_info(tmp_path / "missing")
    assert not info.vnni and info.isa == "unknown"


@pytest.mark.parametrize(
    "cpu, bits, act_bits, expected",
    [(AVX2, 8, 8, "u8u8"), (AVX2, 7, 8, "u8s8"), (AVX2, 4, 8, "u8s8"), (AVX2, 8, 7, "u8s8"), (AVX2, 8, 6, "u8s8"),
     (VNNI, 8, 8, "u8s8"), (AVX_VNNI, 8, 8, "u8s8")],
)
def test_auto_format(cpu, bits, act_bits, expected):
    fmt = choose_format("auto", bits, cpu, max_act_bits=act_bits)
    assert fmt.name == expected
    assert not fmt.may_saturate(cpu, bits, act_bits)  # auto never picks a format that can saturate
    assert fmt.reason


def test_requested_format_and_saturation_risk():
    fmt = choose_format("u8s8", 8, AVX2)
    assert fmt.reason.startswith("chosen by the caller")
    assert fmt.may_saturate(AVX2, 8)
    assert not fmt.may_saturate(AVX2, 8, 7)  # 127·128·2 fits int16
    assert IntFormat("s8s8").may_saturate(AVX2, 8, 7)  # S8S8 shifts activations back to uint8
    assert not fmt.may_saturate(VNNI, 8)
    assert not IntFormat("u8u8").may_saturate(AVX2, 8)
    assert IntFormat("s8s8").signed_activations and IntFormat("s8s8").signed_weights


def test_unknown_format():
    with pytest.raises(VitqError, match="unknown integer format 'i4'"):
        choose_format("i4", 8, AVX2)
