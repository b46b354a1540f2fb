"""The export forms compute exactly what the simulated quantized modules compute."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

import vitq
from vitq.export._lowering import EMULATED, INT_WEIGHT, OFF, QDQ, lower
from vitq.export.formats import IntFormat

from conftest import IMG, tiny_deit, tiny_swin, tiny_vit

CASES = [
    (tiny_vit, "p1", 8, 8),
    (tiny_vit, "p2", 4, 6),
    (tiny_vit, "p3", 4, 8),
    (tiny_deit, "p1", 6, 8),
    (tiny_swin, "p1", 8, 8),
    (tiny_swin, "p2", 4, 8),
]


def quantized(make, protocol, w_bits, a_bits):
    model = make()
    torch.manual_seed(0)
    return vitq.quantize(model, "minmax", [torch.randn(4, 3, IMG, IMG)], w_bits=w_bits, a_bits=a_bits,
                         protocol=protocol, progress=False, device="cpu").model


@pytest.mark.parametrize("make, protocol, w_bits, a_bits, fmt",
                         [case + ("u8s8",) for case in CASES] + [CASES[1] + ("u8u8",), CASES[1] + ("s8s8",)])
def test_lowered_equals_simulated(make, protocol, w_bits, a_bits, fmt, images):
    qmodel = quantized(make, protocol, w_bits, a_bits)
    lowered, points = lower(qmodel, IntFormat(fmt))
    with torch.no_grad():
        # the patch embedding becomes patches @ Wᵀ: the same sums in another order, so a code on a
        # rounding boundary downstream may flip; everything else is the simulated arithmetic
        torch.testing.assert_close(lowered.patch_embed(images), qmodel.patch_embed(images), rtol=0, atol=1e-5)
        got, expected = lowered(images), qmodel(images)
    assert (got - expected).abs().max() <= 0.05 * expected.abs().max()
    assert (got.argmax(1) == expected.argmax(1)).double().mean() >= 5 / 6
    forms = Counter(p.form for p in points)
    assert forms[INT_WEIGHT] == sum(1 for p in points if p.role == "weight")
    assert forms[QDQ] > 0
    if protocol == "p2":  # log2 probabilities and PTF LayerNorm inputs have no integer consumer
        assert forms[EMULATED] > 0
    else:
        assert forms[EMULATED] == 0


def test_lowered_blocks_equal_simulated(images):
    """Without the patch embedding's reordering, the export forms are the simulated arithmetic."""
    qmodel = quantized(tiny_vit, "p1", 8, 8)
    lowered, _ = lower(qmodel, IntFormat("u8s8"))
    tokens = torch.randn(6, 17, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(lowered.blocks(tokens), qmodel.blocks(tokens), rtol=0, atol=1e-5)


def test_lowering_leaves_the_model_alone(images):
    qmodel = quantized(tiny_vit, "p1", 8, 8)
    before = qmodel(images)
    lower(qmodel, IntFormat("u8s8"))
    assert type(qmodel.blocks[0].attn.qkv).__name__ == "QuantLinear"
    torch.testing.assert_close(qmodel(images), before, rtol=0, atol=0)


def test_weight_codes_stay_on_their_grid():
    qmodel = quantized(tiny_vit, "p1", 4, 8)
    lowered, _ = lower(qmodel, IntFormat("u8s8"))
    codes = lowered.blocks[0].mlp.fc1.weight_codes
    assert codes.dtype == torch.int8
    assert codes.min() >= -8 and codes.max() <= 7
    lowered, _ = lower(qmodel, IntFormat("u8u8"))  # the same grid shifted into uint8, zero point 128
    fc1 = lowered.blocks[0].mlp.fc1
    assert fc1.weight_codes.dtype == torch.uint8
    assert fc1.weight_codes.min() >= 120 and fc1.weight_codes.max() <= 135
    assert bool((fc1.weight_zero_point == 128).all())


def test_disabled_points_are_reported_off():
    qmodel = quantized(tiny_vit, "p1", 8, 8)
    _, points = lower(qmodel, IntFormat("u8s8"))
    off = [p for p in points if p.form == OFF]
    assert off and all(p.role in ("attn_scores", "norm_input") for p in off)


def test_per_token_and_logsqrt2_points_are_emulated(images):
    """Points with no QDQ form (dynamic per-token scales, log√2 probabilities) compute the same values."""
    from vitq.quant.spec import QuantSpec

    qmodel = quantized(tiny_vit, "p1", 8, 8)
    fc2 = qmodel.blocks[0].mlp.fc2.input_quantizer
    fc2.set_spec(QuantSpec(bits=8, granularity="per_token"))
    probs = qmodel.blocks[1].attn.probs_quantizer
    probs.set_spec(QuantSpec("logsqrt2", bits=4))
    probs.set_qparams(torch.tensor(1.0), torch.tensor(0.0))
    lowered, points = lower(qmodel, IntFormat("u8u8"))
    forms = {p.name: p for p in points}
    assert forms["blocks.0.mlp.fc2.input_quantizer"].form == EMULATED
    assert forms["blocks.1.attn.probs_quantizer"].form == EMULATED
    assert "per_token" in forms["blocks.0.mlp.fc2.input_quantizer"].note
    tokens = torch.randn(6, 17, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(lowered.blocks(tokens), qmodel.blocks(tokens), rtol=0, atol=1e-5)


def test_twin_points_are_emulated_exactly():
    """OPT-m's twin quantizers (two scales 2^m apart) have no 8-bit QDQ form: emulated, same values."""
    from vitq.quant.spec import QuantSpec

    qmodel = quantized(tiny_vit, "p1", 8, 8)
    fc2 = qmodel.blocks[0].mlp.fc2.input_quantizer
    fc2.set_spec(QuantSpec("twin", bits=6, symmetric=True, ratio_log2=3))
    fc2.set_qparams(torch.tensor(0.05), torch.tensor(0.0))
    probs = qmodel.blocks[1].attn.probs_quantizer
    probs.set_spec(QuantSpec("twin_range", bits=8, ratio_log2=4))
    probs.set_qparams(torch.tensor(1 / 127), torch.tensor(0.0))
    lowered, points = lower(qmodel, IntFormat("u8u8"))
    forms = {p.name: p for p in points}
    point = forms["blocks.0.mlp.fc2.input_quantizer"]
    assert point.form == EMULATED and "twin" in point.note
    assert forms["blocks.1.attn.probs_quantizer"].form == EMULATED
    tokens = torch.randn(6, 17, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(lowered.blocks(tokens), qmodel.blocks(tokens), rtol=0, atol=1e-5)
