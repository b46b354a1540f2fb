"""RepQ-ViT's pieces and GPTQ: the reparameterisation is exact in float and equalises channel
ranges, sequential calibration sees the quantized upstream, GPTQ beats round-to-nearest, and the
plans of these stages reproduce the model."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import IMG, tiny_swin, tiny_vit
from vitq.api import quantize
from vitq.errors import VitqError
from vitq.methods import Plan, apply_plan, calibrate, prepare, smoothing_of
from vitq.methods.gptq import gptq_round
from vitq.methods.reparam import reparam_factors
from vitq.models import iter_quantizers
from vitq.quant.observers import ObserverConfig, create_observer
from vitq.quant.primitives import fake_quantize_affine
from vitq.quant.spec import QuantSpec
from vitq.recipes import load_recipe

PMSE = {"observer": "percentile_mse", "symmetric": False}
MODELS = {"vit": tiny_vit, "swin": tiny_swin}


def batches():
    torch.manual_seed(1)
    x = torch.randn(6, 3, IMG, IMG)
    return [x[:3], x[3:]]


def recipe(*stages, **extra):
    return {"name": "t", "weights": PMSE, "activations": PMSE, "stages": list(stages), **extra}


@pytest.mark.parametrize("family", sorted(MODELS))
def test_reparam_is_exact_in_float(family):
    model = MODELS[family]()
    data = batches()
    result = quantize(model, recipe("reparam", "calibrate"), data, w_bits=4, a_bits=4, progress=False)
    for _, q in iter_quantizers(result.model):
        q.enabled = False
    x = torch.cat(data)
    with torch.no_grad():
        assert torch.allclose(result.model(x), model(x), atol=1e-5, rtol=0)
    assert smoothing_of(result.model) and not smoothing_of(model)
    assert result.plan.meta["reparam"]["pairs"] == len(smoothing_of(result.model))


def test_reparam_puts_every_channel_on_the_shared_range():
    """With min-max statistics, channel c's range [min_c, max_c] maps exactly onto the shared
    per-tensor range [min̄, min̄ + (2^b − 1)·Δ̄] (up to the rounding of the zero points)."""
    model = tiny_vit()
    with torch.no_grad():  # channels of very different ranges, as in trained ViTs
        model.blocks[0].norm1.weight.copy_(torch.linspace(0.1, 5.0, model.blocks[0].norm1.weight.numel()))
        model.blocks[0].norm1.bias.copy_(torch.linspace(-2.0, 2.0, model.blocks[0].norm1.bias.numel()))
    data = batches()
    name = "blocks.0.attn.qkv"
    captured = []
    hook = model.get_submodule(name).register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    with torch.no_grad():
        model(torch.cat(data))
    hook.remove()
    x = captured[0].reshape(-1, captured[0].shape[-1])
    observer = create_observer("minmax", QuantSpec("uniform", 4, "per_channel", axis=-1))
    observer.observe(x)
    scale, zp = observer.qparams()
    r, shift = reparam_factors(scale, zp)
    y = (x - shift) / r
    t_scale, t_zero = scale.mean(), torch.round(zp.mean())
    lo, hi = -t_zero * t_scale, (15 - t_zero) * t_scale
    # each channel's lower end is the zero-point-rounded min_c: it lands on min̄ exactly
    assert torch.allclose(((-zp * scale) - shift) / r, lo.expand_as(r), atol=1e-5)
    # the data itself stays within half a step of the shared range (min_c is rounded onto the grid)
    assert y.min() >= lo - t_scale / 2 - 1e-4 and y.max() <= hi + t_scale / 2 + 1e-4
    # channel ranges that differed 20-fold and more now share that one range
    width = x.amax(0) - x.amin(0)
    assert width.max() > 20 * width.min()
    assert x.amin() < lo - 2 * t_scale or x.amax() > hi + 2 * t_scale


def test_reparam_factors_known_values():
    r, shift = reparam_factors(torch.tensor([0.5, 1.0]), torch.tensor([0.0, 2.0]))
    assert torch.allclose(r, torch.tensor([2 / 3, 4 / 3]))
    assert torch.allclose(shift, torch.tensor([0.5, -1.0]))
    r, _ = reparam_factors(torch.tensor([1.0, 2.0, 9.0]), torch.tensor([0.0, 0.0, 0.0]), target="median")
    assert torch.allclose(r, torch.tensor([0.5, 1.0, 4.5]))


def test_reparam_refuses_to_fold_twice_and_after_calibration():
    with pytest.raises(VitqError, match="folds once"):
        quantize(tiny_vit(), recipe("smooth", "reparam", "calibrate"), batches(), progress=False)
    with pytest.raises(VitqError, match="before 'calibrate'"):
        quantize(tiny_vit(), recipe("calibrate", "reparam"), batches(), progress=False)


def test_sequential_calibration_sees_the_quantized_upstream():
    model = tiny_vit()
    data = batches()
    parallel = prepare(model, w_bits=4, a_bits=4)
    sequential = prepare(model, w_bits=4, a_bits=4)
    calibrate(parallel, data, progress=False)
    calibrate(sequential, data, progress=False, sequential=True)
    par, seq = dict(iter_quantizers(parallel)), dict(iter_quantizers(sequential))
    # the image input comes first: nothing upstream, the same range
    first = "patch_embed.proj.input_quantizer"
    assert torch.equal(par[first].scale, seq[first].scale)
    # a point deep in the model sees quantized tensors: another range
    deep = "blocks.1.mlp.fc2.input_quantizer"
    assert not torch.equal(par[deep].scale, seq[deep].scale)
    # and exactly the one an observer gets on the input it receives in the sequentially calibrated model
    seen = []
    point = seq[deep]
    hook = point.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    point.enabled = False
    with torch.no_grad():
        for x in data:
            sequential(x)
    hook.remove()
    point.enabled = True
    observer = ObserverConfig("minmax").build(point.spec)
    for t in seen:
        observer.observe(t)
    assert torch.allclose(observer.qparams()[0], point.scale)
    assert all(q.enabled == q.spec.enabled for q in seq.values())


def test_gptq_with_an_identity_hessian_is_round_to_nearest():
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    scale, zp = w.abs().amax(dim=1) / 7, torch.zeros(8)
    rtn = fake_quantize_affine(w, scale[:, None], zp[:, None], -8, 7)
    out = gptq_round(w, torch.eye(16), lambda col, i: fake_quantize_affine(col, scale, zp, -8, 7), block_size=5)
    assert torch.equal(out, rtn)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_lowers_the_output_error_of_round_to_nearest(act_order):
    torch.manual_seed(0)
    w = torch.randn(32, 24)
    x = torch.randn(512, 24) @ torch.randn(24, 24)  # correlated inputs: where GPTQ helps
    scale, zp = w.abs().amax(dim=1) / 3, torch.zeros(32)  # 3 bits
    quant = lambda col, i: fake_quantize_affine(col, scale, zp, -4, 3)  # noqa: E731
    rtn = fake_quantize_affine(w, scale[:, None], zp[:, None], -4, 3)
    out = gptq_round(w, 2 * x.T @ x / len(x), quant, block_size=8, act_order=act_order)
    # every weight is on the grid
    assert torch.equal(fake_quantize_affine(out, scale[:, None], zp[:, None], -4, 3), out)
    err_rtn = (F.linear(x, rtn) - F.linear(x, w)).pow(2).mean()
    err_gptq = (F.linear(x, out) - F.linear(x, w)).pow(2).mean()
    assert err_gptq < 0.7 * err_rtn


@pytest.mark.parametrize("family", sorted(MODELS))
def test_recommended_recipe_plan_reproduces_the_model(family, tmp_path):
    model = MODELS[family]()
    data = batches()
    result = quantize(model, "recommended", data, w_bits=3, a_bits=4, progress=False, seed=0)
    rtn = quantize(model, "repq-vit", data, w_bits=3, a_bits=4, progress=False, seed=0)
    x = torch.cat(data)
    with torch.no_grad():
        ref = model(x)
        assert (result.model(x) - ref).pow(2).mean() < (rtn.model(x) - ref).pow(2).mean()
    meta = result.plan.meta
    assert meta["params"] and meta["gptq"]["layers"] == len(meta["params"])
    probs = [q for _, q in iter_quantizers(result.model) if q.role == "attn_probs"]
    assert probs and all(q.spec.kind == "logsqrt2" for q in probs)
    result.plan.save(tmp_path)
    again = apply_plan(model, Plan.load(tmp_path))
    with torch.no_grad():
        assert torch.equal(again(x), result.model(x))
    # the float model is untouched
    assert all(not n.startswith("vitq") for n in vars(model))


def test_image_input_bits_and_kinds():
    model = tiny_vit()
    q = prepare(model, w_bits=4, a_bits=4)
    assert q.patch_embed.proj.input_quantizer.spec.bits == 8
    assert q.blocks[0].attn.qkv.input_quantizer.spec.bits == 4
    assert prepare(model, a_bits=4, input_bits=None).patch_embed.proj.input_quantizer.spec.bits == 4
    q = prepare(model, a_bits=4, kinds={"attn_probs": "logsqrt2"})
    assert q.blocks[0].attn.probs_quantizer.spec.kind == "logsqrt2"
    with pytest.raises(VitqError, match="leaves attn_probs in float"):
        prepare(model, protocol="p3", kinds={"attn_probs": "logsqrt2"})
    with pytest.raises(VitqError, match="cannot be chosen"):
        prepare(model, kinds={"act": "log2"})
    with pytest.raises(VitqError, match="input_bits"):
        prepare(model, input_bits=12)
    with pytest.raises(VitqError, match="not a choice"):
        load_recipe({"name": "x", "kinds": {"attn_probs": "cubic"}})


def test_percentile_mse_observer_known_choice():
    # 100,000 values in [0, 1] plus one outlier at 3: a percentile clips the outlier, and its range
    # ([0, q_p], q_p the p-quantile of the values) has a smaller error than the full one
    x = torch.cat([torch.linspace(0, 1, 100_000), torch.tensor([3.0])])
    spec = QuantSpec("uniform", 4, "per_tensor")
    obs = create_observer("percentile_mse", spec, max_samples=1 << 20)
    obs.observe(x)
    scale, zp = obs.qparams()
    n = x.numel()
    candidates = [x.sort().values[math.ceil(p * n) - 1] / 15 for p in (0.999, 0.9999, 0.99999)]
    assert any(torch.isclose(scale, c) for c in candidates)
    assert scale < 1.001 / 15 and zp.item() == 0
    # log√2: Δ among the quantiles too
    probs = torch.softmax(torch.randn(4, 50) * 3, dim=-1)
    obs = create_observer("percentile_mse", QuantSpec("logsqrt2", 4, "per_tensor"))
    obs.observe(probs)
    delta, _ = obs.qparams()
    ordered = probs.flatten().sort().values
    assert any(torch.isclose(delta, ordered[k]) for k in range(len(ordered) - 5, len(ordered)))


def test_default_recipe_is_recommended():
    import inspect

    from vitq import api, cli
    assert inspect.signature(api.quantize).parameters["recipe"].default == "recommended"
    args = cli.build_parser().parse_args(["quantize", "m", "--out", "x", "--calib", "d"])
    assert args.recipe == "recommended"


def test_reconstruction_lowers_every_block_error_and_its_plan_reproduces(tmp_path):
    model = tiny_vit()
    data = batches()
    stages = ["reparam", "calibrate", {"reconstruct": {"iterations": 30, "batch_size": 4}}]
    result = quantize(model, recipe(*stages, kinds={"attn_probs": "logsqrt2"}), data, w_bits=3, a_bits=4,
                      progress=False, seed=0)
    record = result.plan.meta["reconstruct"]
    assert record["blocks"] == len(model.blocks)
    for before, after in record["block_mse"].values():
        assert after < before
    # hard rounding: every weight sits on its quantizer's grid, so the plan's weights reproduce the model
    layer = result.model.blocks[0].mlp.fc1
    assert torch.equal(layer.weight_quantizer(layer.weight), layer.weight)
    assert not layer.weight.requires_grad and not result.model.blocks[0].mlp.fc2.input_quantizer.scale.requires_grad
    result.plan.save(tmp_path)
    x = torch.cat(data)
    with torch.no_grad():
        assert torch.equal(apply_plan(model, Plan.load(tmp_path))(x), result.model(x))
    again = quantize(model, recipe(*stages, kinds={"attn_probs": "logsqrt2"}), data, w_bits=3, a_bits=4,
                     progress=False, seed=0)
    with torch.no_grad():
        assert torch.equal(again.model(x), result.model(x))  # seeded


def test_reconstruct_settings_are_validated():
    with pytest.raises(VitqError, match="iterations"):
        load_recipe({"name": "x", "stages": ["calibrate", {"reconstruct": {"iterations": 0}}]})
    with pytest.raises(VitqError, match="drop_prob"):
        load_recipe({"name": "x", "stages": ["calibrate", {"reconstruct": {"drop_prob": 2}}]})
    with pytest.raises(VitqError, match="damp"):
        load_recipe({"name": "x", "stages": ["calibrate", {"gptq": {"damp": 0}}]})
