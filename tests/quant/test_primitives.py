import math

import pytest
import torch

from vitq.quant.primitives import (
    choose_ptf_factors,
    choose_qparams_affine,
    dequantize_affine,
    fake_quantize_affine,
    fake_quantize_log2,
    fake_quantize_logsqrt2,
    quantize_affine,
)


def test_asymmetric_qparams_exact():
    scale, zp = choose_qparams_affine(torch.tensor(-1.0), torch.tensor(3.0), 0, 255, symmetric=False)
    assert scale.item() == pytest.approx(4.0 / 255)
    assert zp.item() == 64.0  # round(1 / (4/255)) = round(63.75)


def test_symmetric_qparams_exact():
    scale, zp = choose_qparams_affine(torch.tensor(-2.0), torch.tensor(1.0), -8, 7, symmetric=True)
    assert scale.item() == pytest.approx(2.0 / 7.5)
    assert zp.item() == 0.0


def test_range_is_widened_to_contain_zero():
    scale, zp = choose_qparams_affine(torch.tensor(2.0), torch.tensor(4.0), 0, 15, symmetric=False)
    assert scale.item() == pytest.approx(4.0 / 15)
    assert zp.item() == 0.0


def test_quantize_dequantize_roundtrip_on_grid():
    scale, zp = torch.tensor(0.5), torch.tensor(3.0)
    x = torch.tensor([-1.5, 0.0, 0.5, 2.0, 100.0, -100.0])
    q = quantize_affine(x, scale, zp, 0, 15)
    assert q.tolist() == [0.0, 3.0, 4.0, 7.0, 15.0, 0.0]
    assert dequantize_affine(q, scale, zp).tolist() == [-1.5, 0.0, 0.5, 2.0, 6.0, -1.5]


def test_fake_quantize_straight_through_gradient():
    x = torch.tensor([0.26, 0.74, 5.0], requires_grad=True)
    y = fake_quantize_affine(x, torch.tensor(0.5), torch.tensor(0.0), 0, 3)
    assert y.tolist() == [0.5, 0.5, 1.5]
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0]  # clipped values get no gradient


def test_log2_quantizer_exact():
    p = torch.tensor([1.0, 0.5, 0.3, 0.01, 2.0**-20, 0.0])
    out = fake_quantize_log2(p, bits=4)
    # -log2: 0, 1, 1.74→2, 6.64→7, 20 (> 15 → 0), p=0 → 0
    assert out.tolist() == [1.0, 0.5, 0.25, 2.0**-7, 0.0, 0.0]


def test_logsqrt2_quantizer_exact():
    p = torch.tensor([1.0, 0.7, 0.5, 0.35])
    out = fake_quantize_logsqrt2(p, torch.tensor(1.0), bits=4)
    # q = round(-2 log2 p): 0, 1, 2, 3 → 1, 2^-0.5, 0.5, 2^-1.5
    expected = [1.0, 2**-0.5, 0.5, 2**-1.5]
    assert out.tolist() == pytest.approx(expected)


def test_ptf_factors_pick_per_channel_power_of_two():
    torch.manual_seed(0)
    # channel 0 spans ±0.1, channel 1 spans ±1: channel 1 needs a scale 2^3 times coarser
    x = torch.stack([torch.linspace(-0.1, 0.1, 101), torch.linspace(-1.0, 1.0, 101)], dim=1)
    s8, zp = choose_qparams_affine(x.min(), x.max(), 0, 255, False)
    scales = choose_ptf_factors(x, s8 / 8, zp, 0, 255)
    ratio = scales / (s8 / 8)
    assert ratio.tolist() == [1.0, 8.0]
    assert all(math.log2(r).is_integer() for r in ratio.tolist())


def test_no_grad_path_is_bit_identical_to_the_gradient_path():
    torch.manual_seed(0)
    x = torch.randn(64, 16) * 3
    scale = (torch.rand(16) * 0.2 + 0.01).reshape(1, 16)
    zp = torch.full((1, 16), 7.0)
    before = x.clone()
    with torch.no_grad():
        fast = fake_quantize_affine(x, scale, zp, 0, 15)
    slow = fake_quantize_affine(x.clone().requires_grad_(True), scale, zp, 0, 15)
    assert torch.equal(fast, slow.detach())
    assert torch.equal(x, before)  # the in-place arithmetic never touches the input


def test_twin_quantizer_exact():
    from vitq.quant.primitives import fake_quantize_twin

    # 4 bits: a sign bit and 7 magnitudes per side; s_pos = 0.5, m = 3 → s_neg = 0.0625
    x = torch.tensor([-1.0, -0.17, -0.03, 0.0, 0.2, 0.3, 1.3, 3.4, 100.0])
    out = fake_quantize_twin(x, torch.tensor(0.5), 3, 4)
    # −1 clamps at −7·0.0625; −0.17/0.0625 = −2.72 → −3; −0.03 → −0.48 → −0; 0.2/0.5 = 0.4 → 0;
    # 0.3 → 0.6 → 1; 1.3 → 2.6 → 3; 3.4 → 6.8 → 7; 100 clamps at 7·0.5
    assert out.tolist() == [-0.4375, -0.1875, 0.0, 0.0, 0.0, 0.5, 1.5, 3.5, 3.5]
    # m = 0: one scale on both sides, 7 magnitudes each
    out0 = fake_quantize_twin(torch.tensor([-5.0, -1.2, 1.2]), torch.tensor(0.5), 0, 4)
    assert out0.tolist() == [-3.5, -1.0, 1.0]


def test_twin_quantizer_straight_through_gradient():
    from vitq.quant.primitives import fake_quantize_twin

    x = torch.tensor([-0.6, 0.7, 9.0], requires_grad=True)
    y = fake_quantize_twin(x, torch.tensor(1.0), 2, 3)  # s_neg = 0.25
    assert y.tolist() == [-0.5, 1.0, 3.0]
    y.sum().backward()
    # straight through inside each value's own region, nothing where clipped
    assert x.grad.tolist() == [1.0, 1.0, 0.0]
