"""Empirical bias correction: after the stage, every corrected layer's mean output per channel on
the calibration images equals the float model's (the layer before it already corrected), the
output error falls, and the plan carries the new biases."""
import pytest
import torch

from conftest import IMG, tiny_swin, tiny_vit
from vitq.api import quantize
from vitq.errors import VitqError
from vitq.methods import Plan, apply_plan
from vitq.methods.bias_correct import float_output_means
from vitq.nn import QuantLinear
from vitq.recipes import load_recipe

MODELS = {"vit": tiny_vit, "swin": tiny_swin}


def batches():
    torch.manual_seed(1)
    x = torch.randn(6, 3, IMG, IMG)
    return [x[:3], x[3:]]


def recipe(*stages):
    return {"name": "t", "weights": {"observer": "minmax", "symmetric": True},
            "activations": {"observer": "minmax", "symmetric": False}, "stages": list(stages)}


def test_corrected_layers_match_the_float_channel_means():
    model = tiny_vit()
    data = batches()
    result = quantize(model, recipe("calibrate", "bias_correct"), data, w_bits=3, a_bits=4, progress=False)
    plain = quantize(model, recipe("calibrate"), data, w_bits=3, a_bits=4, progress=False)
    names = [n for n, m in result.model.named_modules() if isinstance(m, QuantLinear)]
    # the last linear layer is corrected after everything upstream: its channel means match exactly
    last = names[-1]
    want = float_output_means(model, [last], data, torch.device("cpu"))[last]
    got_plain = float_output_means(plain.model, [last], data, torch.device("cpu"))[last]
    got = float_output_means(result.model, [last], data, torch.device("cpu"))[last]
    assert torch.allclose(got, want, atol=1e-5)
    assert (got_plain - want).abs().max() > 1e-2  # there was a shift to correct
    # every layer's bias moved, and the output error fell
    assert result.plan.meta["bias_correct"]["layers"] == len(result.plan.meta["params"])
    assert all(p.endswith(".bias") for p in result.plan.meta["params"])
    x = torch.cat(data)
    with torch.no_grad():
        ref = model(x)
        assert (result.model(x) - ref).pow(2).mean() < (plain.model(x) - ref).pow(2).mean()


@pytest.mark.parametrize("family", sorted(MODELS))
def test_bias_correct_plan_reproduces_the_model(family, tmp_path):
    model = MODELS[family]()
    data = batches()
    spec = {**recipe("reparam", "calibrate", "gptq", "bias_correct"), "kinds": {"attn_probs": "logsqrt2"}}
    result = quantize(model, spec, data, w_bits=4, a_bits=4, progress=False)
    params = result.plan.meta["params"]
    assert any(p.endswith(".bias") for p in params) and any(p.endswith(".weight") for p in params)
    result.plan.save(tmp_path)
    again = apply_plan(model, Plan.load(tmp_path))
    x = torch.cat(data)
    with torch.no_grad():
        assert torch.equal(again(x), result.model(x))
    # the float model keeps its biases
    fresh = MODELS[family]()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


def test_bias_correct_settings_are_checked():
    with pytest.raises(VitqError, match="bias_correct.convs"):
        load_recipe({"name": "x", "stages": ["calibrate", {"bias_correct": {"convs": "yes"}}]})
    with pytest.raises(VitqError, match="unknown"):
        load_recipe({"name": "x", "stages": ["calibrate", {"bias_correct": {"amount": 1}}]})
    with pytest.raises(VitqError, match="min_a_bits"):
        load_recipe({"name": "x", "stages": ["calibrate", {"bias_correct": {"min_a_bits": 9}}]})
    with pytest.raises(VitqError, match="strength"):
        load_recipe({"name": "x", "stages": ["calibrate", {"bias_correct": {"strength": 0}}]})
    with pytest.raises(VitqError, match="not a regular expression"):
        load_recipe({"name": "x", "stages": ["calibrate", {"bias_correct": {"exclude": ["(qkv"]}}]})


def test_excluded_layers_keep_their_bias_and_strength_scales_the_shift():
    model = tiny_vit()
    data = batches()
    full = quantize(model, recipe("calibrate", "bias_correct"), data, w_bits=3, a_bits=4, progress=False)
    part = quantize(model, recipe("calibrate", {"bias_correct": {"exclude": [r"qkv$"], "convs": False}}), data,
                    w_bits=3, a_bits=4, progress=False)
    assert not any("qkv" in p or "patch_embed" in p for p in part.plan.meta["params"])
    assert torch.equal(part.model.blocks[0].attn.qkv.bias, model.blocks[0].attn.qkv.bias)
    skipped = quantize(model, recipe("calibrate", {"bias_correct": {"min_a_bits": 6}}), data, w_bits=3, a_bits=4,
                       progress=False)
    assert "params" not in skipped.plan.meta and skipped.plan.meta["bias_correct"]["skipped"] == "a_bits 4 < 6"
    half = quantize(model, recipe("calibrate", {"bias_correct": {"strength": 0.5}}), data, w_bits=3, a_bits=4,
                    progress=False)
    # the first corrected layer sees the same input either way: half the shift, exactly
    first = "patch_embed.proj.bias"
    b0 = model.get_parameter(first)
    assert torch.allclose(half.model.get_parameter(first) - b0, 0.5 * (full.model.get_parameter(first) - b0),
                          atol=1e-6)
