"""Prefix rows: the class token's rows of q, k or the blocks' linear inputs on a grid of their own."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import vitq
from vitq.errors import VitqError
from vitq.export._lowering import QDQ, lower
from vitq.export.formats import IntFormat
from vitq.methods import Plan, apply_plan, calibrate, prepare
from vitq.methods.gptq import _Hessian
from vitq.methods.lifecycle import prefix_rows_of
from vitq.methods.stages import StageConfig
from vitq.models import iter_quantizers
from vitq.models.adapters import quantizers_off
from vitq.nn import QuantAttention, QuantLinear
from vitq.quant.observers import ObserverConfig
from vitq.quant.primitives import fake_quantize_affine
from vitq.recipes import load_recipe

from conftest import IMG, tiny_deit, tiny_swin, tiny_vit

MINMAX = ObserverConfig("minmax")


def prefix_points(qmodel):
    return sorted(n for n, _ in iter_quantizers(qmodel) if "_prefix_" in n)


def test_prepare_splits_the_named_operands_in_every_block(vit):
    qmodel = prepare(vit, w_bits=6, a_bits=6, prefix_rows=["q", "act"])
    attn = qmodel.blocks[0].attn
    assert attn.prefix_points == ("q",) and attn.prefix_tokens == 1
    assert attn.q_prefix_quantizer.spec == attn.q_quantizer.spec
    for linear in (attn.qkv, attn.proj, qmodel.blocks[0].mlp.fc1, qmodel.blocks[0].mlp.fc2):
        assert linear.prefix_points == ("input",)
    assert qmodel.head.prefix_points == ()  # the head reads the pooled class token: no token rows
    assert qmodel.patch_embed.proj.input_quantizer.spec.enabled
    depth = len(qmodel.blocks)
    assert len(prefix_points(qmodel)) == depth * 5  # q and four linear inputs per block
    assert prefix_rows_of(qmodel) == {"points": ["q", "act"], "tokens": 1}
    assert prefix_points(prepare(vit, w_bits=6, a_bits=6)) == []


def test_distilled_deit_splits_both_prefix_tokens():
    qmodel = prepare(tiny_deit(distilled=True), prefix_rows=["k"])
    assert prefix_rows_of(qmodel) == {"points": ["k"], "tokens": 2}


def test_swin_has_no_prefix_rows():
    qmodel = prepare(tiny_swin(), prefix_rows=["q", "k", "act"])
    assert prefix_points(qmodel) == [] and prefix_rows_of(qmodel) == {}


def test_bad_choices_say_what_is_wrong(vit):
    with pytest.raises(VitqError, match="'v' is not an operand"):
        prepare(vit, prefix_rows=["v"])
    with pytest.raises(VitqError, match="leaves attn_qkv in float"):
        prepare(vit, protocol="p4", prefix_rows=["q"])
    with pytest.raises(VitqError, match="twice"):
        prepare(vit, prefix_rows=["q", "q"])
    with pytest.raises(VitqError, match="prefix_rows.points: 'cls' is not an operand"):
        load_recipe({"name": "x", "stages": [{"prefix_rows": {"points": ["cls"]}}, "calibrate"]})
    with pytest.raises(VitqError, match="before calibrate"):
        vitq.quantize(vit, {"name": "x", "stages": ["calibrate", {"prefix_rows": {"points": ["q"]}}]},
                      [torch.randn(2, 3, IMG, IMG)], progress=False)


def test_split_rows_are_quantized_by_their_own_grid(vit):
    """Exact values: a linear layer's first row by its prefix quantizer, the others by the main one."""
    qmodel = prepare(vit, w_bits=8, a_bits=4, prefix_rows=["act"])
    fc1: QuantLinear = qmodel.blocks[0].mlp.fc1
    fc1.weight_quantizer.enabled = False
    fc1.input_quantizer.set_qparams(torch.tensor(0.5), torch.tensor(3.0))
    fc1.input_prefix_quantizer.set_qparams(torch.tensor(0.125), torch.tensor(8.0))
    x = torch.randn(2, 5, fc1.in_features, generator=torch.Generator().manual_seed(0))
    expected_rows = torch.cat([fake_quantize_affine(x[:, :1], torch.tensor(0.125), torch.tensor(8.0), 0, 15),
                               fake_quantize_affine(x[:, 1:], torch.tensor(0.5), torch.tensor(3.0), 0, 15)], dim=1)
    assert torch.equal(fc1.quantize_input(x), expected_rows)
    assert torch.equal(fc1(x), F.linear(expected_rows, fc1.weight, fc1.bias))


def test_attention_splits_query_and_key_rows(vit):
    qmodel = prepare(vit, w_bits=8, a_bits=4, prefix_rows=["q", "k"])
    attn: QuantAttention = qmodel.blocks[0].attn
    for name in ("q", "k", "q_prefix", "k_prefix"):
        getattr(attn, f"{name}_quantizer").set_qparams(torch.tensor(0.25 if "prefix" in name else 0.5),
                                                       torch.tensor(7.0))
    for name in ("v", "probs"):
        getattr(attn, f"{name}_quantizer").enabled = False
    q, k, v = (torch.randn(1, 2, 5, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    fq = lambda t, s: fake_quantize_affine(t, torch.tensor(s), torch.tensor(7.0), 0, 15)  # noqa: E731
    q_hat = torch.cat([fq(q[..., :1, :], 0.25), fq(q[..., 1:, :], 0.5)], dim=-2)
    k_hat = torch.cat([fq(k[..., :1, :], 0.25), fq(k[..., 1:, :], 0.5)], dim=-2)
    expected = ((q_hat * attn.scale) @ k_hat.transpose(-2, -1)).softmax(-1) @ v
    torch.testing.assert_close(attn._attend(q, k, v), expected, rtol=0, atol=1e-6)


def test_calibration_gives_each_grid_its_own_rows(vit, images):
    qmodel = prepare(vit, w_bits=8, a_bits=8, prefix_rows=["q"])
    attn = qmodel.blocks[-1].attn
    seen = []
    hook = attn.q_quantizer.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    hook_p = attn.q_prefix_quantizer.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    calibrate(qmodel, [images], activations=MINMAX, progress=False)
    hook.remove(), hook_p.remove()
    cls, rest = seen[0], seen[1]
    assert cls.shape[-2] == 1 and rest.shape[-2] == (IMG // 8) ** 2
    qmin, qmax = attn.q_quantizer.spec.qrange
    for quantizer, rows in ((attn.q_prefix_quantizer, cls), (attn.q_quantizer, rest)):
        span = float(quantizer.scale) * (qmax - qmin)
        assert span == pytest.approx(float(rows.max().clamp(min=0) - rows.min().clamp(max=0)), rel=1e-5)
    plain = prepare(vit, w_bits=8, a_bits=8)
    with quantizers_off(qmodel), quantizers_off(plain), torch.no_grad():
        assert torch.equal(qmodel(images), plain(images))  # the split is exact in float


def test_gptq_sees_the_split_input(vit, images):
    qmodel = prepare(vit, w_bits=4, a_bits=4, prefix_rows=["act"])
    calibrate(qmodel, [images], progress=False)
    fc1 = qmodel.blocks[0].mlp.fc1
    x = torch.randn(3, 17, fc1.in_features)
    hessian = _Hessian(fc1)
    hessian(fc1, (x,))
    rows = fc1.quantize_input(x).reshape(-1, fc1.in_features).double()
    assert not torch.equal(rows, fc1.input_quantizer(x).reshape(-1, fc1.in_features).double())
    torch.testing.assert_close(hessian.H, 2.0 / rows.shape[0] * rows.T @ rows)


def _quantized(rows, recipe="minmax", w_bits=6, a_bits=6):
    model = tiny_vit()
    torch.manual_seed(0)
    recipe = load_recipe(recipe)
    if rows:
        stages = (StageConfig.parse({"prefix_rows": {"points": list(rows)}}, "test"), *recipe.stages)
        recipe = replace(recipe, stages=stages)
    return model, vitq.quantize(model, recipe, [torch.randn(4, 3, IMG, IMG)], w_bits=w_bits, a_bits=a_bits,
                                progress=False, device="cpu")


def test_plan_records_and_reproduces_the_split(tmp_path, images):
    model, result = _quantized(["q", "k", "act"])
    assert result.plan.meta["prefix_rows"] == {"points": ["q", "k", "act"], "tokens": 1}
    assert result.record["prefix_rows"] == {"points": ["q", "k", "act"], "tokens": 1, "split": ["q", "k", "act"]}
    result.plan.save(tmp_path)
    again = apply_plan(model, Plan.load(tmp_path / "plan.json"))
    assert prefix_points(again) == prefix_points(result.model)
    with torch.no_grad():
        assert torch.equal(again(images), result.model(images))
    broken = Plan({**result.plan.meta, "prefix_rows": {"points": ["q"], "tokens": 2}}, result.plan.rules,
                  result.plan.tensors)
    with pytest.raises(VitqError, match="first 2 token rows"):
        apply_plan(model, broken)


def test_without_the_stage_a_plan_has_no_prefix_points(images):
    _, plain = _quantized([])
    assert "prefix_rows" not in plain.plan.meta and not any("_prefix_" in n for n in plain.plan.rules)


def test_export_keeps_every_product_integer(images):
    _, result = _quantized(["q", "k", "act"], w_bits=8, a_bits=8)
    lowered, points = lower(result.model, IntFormat("u8s8"))
    prefix = [p for p in points if "_prefix_" in p.name]
    assert prefix and all(p.form == QDQ for p in prefix)
    tokens = torch.randn(6, 17, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(lowered.blocks(tokens), result.model.blocks(tokens), rtol=0, atol=1e-5)


def test_onnx_file_runs_the_split_in_integer_matmuls(tmp_path):
    pytest.importorskip("onnxruntime")
    from vitq.export import export_onnx

    _, result = _quantized(["q", "act"], w_bits=8, a_bits=8)
    report = export_onnx(result.model, tmp_path / "m.onnx", int_format="u8s8")
    summary = report.summary()
    assert summary["float_gemms"] == 0
    depth = len(result.model.blocks)
    # per block: q·kᵀ twice (class row, the rest), attn·v, and each of 4 linear layers twice; patch embed, head
    assert summary["integer_gemms"] == depth * (2 + 1 + 8) + 2
    assert report.verification["agreement"] == 100.0


def test_the_stage_skips_what_the_protocol_leaves_in_float_and_models_without_prefix_tokens(images):
    recipe = {"name": "x", "stages": [{"prefix_rows": {"points": ["q", "act"]}}, "calibrate"]}
    p4 = vitq.quantize(tiny_vit(), recipe, [images], protocol="p4", progress=False)
    assert p4.record["prefix_rows"]["split"] == ["act"] and p4.plan.meta["prefix_rows"]["points"] == ["act"]
    swin = vitq.quantize(tiny_swin(), recipe, [images], progress=False)
    assert swin.record["prefix_rows"]["tokens"] == 0 and "prefix_rows" not in swin.plan.meta


def test_a_start_plan_keeps_its_prefix_rows(images):
    model, first = _quantized(["q"], w_bits=8, a_bits=8)
    again = vitq.quantize(model, "minmax", [images], start_plan=first.plan, progress=False)
    assert again.plan.meta["prefix_rows"] == first.plan.meta["prefix_rows"]
