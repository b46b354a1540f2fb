"""RepQ-ViT's pieces and GPTQ: the reparameterisation is exact in float and equalises channel
ranges, sequential calibration sees the quantized upstream, GPTQ beats round-to-nearest, and the
plans of these stages reproduce the model."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import IMG, tiny_swin, tiny_vit
from vitq.api import quantize
from vitq.errors import VitqError
from vitq.methods import Plan, apply_plan, calibrate, prepare, smoothing_of
from vitq.methods.gptq import _Hessian, gptq_round
from vitq.methods.reparam import reparam_factors
from vitq.methods.smooth import fold_smoothing
from vitq.models import iter_quantizers
from vitq.nn import QuantLinear
from vitq.quant.observers import ObserverConfig, create_observer
from vitq.quant.primitives import fake_quantize_affine
from vitq.quant import protocol as roles
from vitq.quant.quantizer import Quantizer
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


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_reparam_with_a_constant_layernorm_channel(strength):
    """A LayerNorm channel whose scale is exactly 0 outputs a constant (our DeiT-Tiny has two; RepQ-ViT's
    release crashes on them): the reparameterisation stays exact and every scale finite."""
    model = tiny_vit()
    with torch.no_grad():
        model.blocks[0].norm1.weight[3] = 0.0
        model.blocks[0].norm1.bias[3] = 0.03125
        model.blocks[0].norm2.weight[5] = 0.0
        model.blocks[0].norm2.bias[5] = -0.015625
    data = batches()
    spec = recipe({"reparam": {"strength": strength}}, "calibrate")
    result = quantize(model, spec, data, w_bits=4, a_bits=4, progress=False)
    for _, q in iter_quantizers(result.model):
        assert q.scale is None or bool(torch.isfinite(q.scale).all() and (q.scale > 0).all())
    x = torch.cat(data)
    with torch.no_grad():
        quantized = result.model(x)
        assert torch.isfinite(quantized).all()
        for _, q in iter_quantizers(result.model):
            q.enabled = False
        assert torch.allclose(result.model(x), model(x), atol=1e-5, rtol=0)


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


def test_partial_reparam_centres_each_channel_and_moves_part_of_the_spread():
    """strength α: r = (Δ_c/Δ̄)^α and channel c's mid-point lands on the shared mid-point; α = 1
    is RepQ-ViT's full move (the same factors as the default)."""
    scale, zp = torch.tensor([0.5, 1.0, 4.0]), torch.tensor([0.0, 2.0, 100.0])
    levels = 15
    r, shift = reparam_factors(scale, zp, strength=0.5, levels=levels)
    t_scale, t_zero = scale.mean(), torch.round(zp.mean())
    assert torch.allclose(r, (scale / t_scale) ** 0.5)
    mid_c = (levels / 2 - zp) * scale
    mid = (levels / 2 - t_zero) * t_scale
    assert torch.allclose((mid_c - shift) / r, mid.expand(3), atol=1e-4)
    # the spread left to the activation: channel widths now differ by the square root of before
    width = levels * scale / r
    assert torch.isclose(width.max() / width.min(), torch.tensor(8.0 ** 0.5), rtol=1e-4)
    full, full_shift = reparam_factors(scale, zp, levels=levels)
    near, near_shift = reparam_factors(scale, zp, strength=1 - 1e-9, levels=levels)
    assert torch.allclose(full, near) and torch.allclose(full_shift, near_shift, atol=1e-3)
    with pytest.raises(VitqError, match="strength"):
        reparam_factors(scale, zp, strength=0.0)


def test_partial_reparam_is_exact_in_float_and_recorded():
    model = tiny_vit()
    data = batches()
    result = quantize(model, recipe({"reparam": {"strength": 0.5}}, "calibrate"), data, w_bits=4, a_bits=8,
                      progress=False)
    assert result.plan.meta["reparam"]["strength"] == 0.5
    for _, q in iter_quantizers(result.model):
        q.enabled = False
    x = torch.cat(data)
    with torch.no_grad():
        assert torch.allclose(result.model(x), model(x), atol=1e-5, rtol=0)
    assert result.plan.meta["reparam"]["partial"] == result.plan.meta["reparam"]["pairs"] > 0
    with pytest.raises(VitqError, match="strength"):
        quantize(tiny_vit(), recipe({"reparam": {"strength": 1.5}}, "calibrate"), data, progress=False)
    with pytest.raises(VitqError, match="strength_where"):
        quantize(tiny_vit(), recipe({"reparam": {"strength_where": "some"}}, "calibrate"), data, progress=False)


def test_partial_reparam_only_where_weights_have_fewer_bits():
    model, data = tiny_vit(), batches()
    x = torch.cat(data)
    where = recipe({"reparam": {"strength": 0.5, "strength_where": "fewer_weight_bits"}}, "calibrate")
    at_w4a8 = quantize(model, where, data, w_bits=4, a_bits=8, progress=False)
    assert at_w4a8.plan.meta["reparam"]["partial"] == at_w4a8.plan.meta["reparam"]["pairs"] > 0
    at_w8a8 = quantize(model, where, data, w_bits=8, a_bits=8, progress=False)
    full = quantize(model, recipe("reparam", "calibrate"), data, w_bits=8, a_bits=8, progress=False)
    assert at_w8a8.plan.meta["reparam"]["partial"] == 0
    with torch.no_grad():
        assert torch.equal(at_w8a8.model(x), full.model(x))


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


def test_gptq_rounds_the_patch_embedding_on_its_unfolded_patches():
    from vitq.methods.gptq import _rows, gptq_layers

    conv = torch.nn.Conv2d(3, 5, kernel_size=4, stride=4)
    x = torch.randn(2, 3, 8, 12)
    rows = _rows(conv, x)  # one row per output position, columns in the weight's (C, kh, kw) order
    assert rows.shape == (2 * 2 * 3, 3 * 16)
    out = (rows @ conv.weight.reshape(5, -1).double().T).reshape(2, 6, 5).transpose(1, 2).reshape(2, 5, 2, 3)
    assert torch.allclose(out.float() + conv.bias.reshape(1, 5, 1, 1), conv(x), atol=1e-5)
    model, data = tiny_vit(), batches()
    result = quantize(model, recipe("calibrate", "gptq"), data, w_bits=3, a_bits=8, progress=False)
    q = result.model
    assert q.patch_embed.proj in gptq_layers(q)
    assert result.plan.meta["gptq"]["layers"] == len(gptq_layers(q))
    assert "patch_embed.proj.weight" in result.plan.meta["params"]
    weight = q.patch_embed.proj.weight
    assert torch.equal(q.patch_embed.proj.weight_quantizer(weight), weight)  # on the grid
    rtn = quantize(model, recipe("calibrate"), data, w_bits=3, a_bits=8, progress=False).model
    assert not torch.equal(weight, rtn.patch_embed.proj.weight_quantizer(rtn.patch_embed.proj.weight))
    linear_only = quantize(model, recipe("calibrate", {"gptq": {"convs": False}}), data, w_bits=3, a_bits=8,
                           progress=False)
    assert "patch_embed.proj.weight" not in linear_only.plan.meta["params"]
    assert linear_only.plan.meta["gptq"]["layers"] == len(gptq_layers(q)) - 1


def test_gptq_float_target_solves_the_asymmetric_least_squares():
    """Quantized inputs x̂ = x_f·M (a known distortion of the float inputs): the weight that maps
    them onto the float outputs is W·M⁻ᵀ; with x̂ = x_f it is W itself."""
    torch.manual_seed(0)
    layer = QuantLinear.from_float(torch.nn.Linear(6, 4))  # its input quantizer is off
    w = layer.weight.detach()
    xf = torch.randn(200, 6)
    m = torch.eye(6) + 0.2 * torch.randn(6, 6)
    for xq, expected in ((xf, w), (xf @ m, w @ torch.linalg.inv(m).T)):
        acc = _Hessian(layer, cross=True)
        for part in (slice(0, 120), slice(120, 200)):  # two batches: the running means weigh them by size
            acc(layer, (xq[part],))
            acc.pair(layer, (xf[part],))
        assert torch.allclose(acc.H, 2 * xq.T.double() @ xq.double() / 200)
        assert torch.allclose(acc.float_target(w, damp=1e-9), expected, atol=1e-4)
    with pytest.raises(VitqError, match="without its quantized"):
        _Hessian(layer, cross=True).pair(layer, (xf,))


def test_gptq_float_target_fits_the_float_model_better_and_reloads(tmp_path):
    model = tiny_vit()
    data = batches()
    x = torch.cat(data)
    errors = {}
    for float_target in (False, True):
        r = recipe("calibrate", {"gptq": {"float_target": float_target}})
        result = quantize(model, r, data, w_bits=4, a_bits=8, progress=False, seed=0)
        with torch.no_grad():
            errors[float_target] = float((result.model(x) - model(x)).pow(2).mean())
    assert result.plan.meta["gptq"]["float_target"] is True
    # on the calibration images the fitted target wins clearly (it absorbs the quantized upstream)
    assert errors[True] < 0.5 * errors[False]
    result.plan.save(tmp_path)
    again = apply_plan(model, Plan.load(tmp_path))
    with torch.no_grad():
        assert torch.equal(again(x), result.model(x))
    with pytest.raises(VitqError, match="float_target"):
        load_recipe({"name": "x", "stages": ["calibrate", {"gptq": {"float_target": "yes"}}]})


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
    # from float weights: counted against their nearest grid points, a few move (not every weight)
    assert 0 < max(record["changed_codes"].values()) < 0.5
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


def test_soft_round_starts_from_a_given_rounding_and_may_step_towards_the_float_weight():
    """After GPTQ the weights are on the grid (sometimes two steps from the float weight): each may
    stay or move one step towards its float value; rounding GPTQ's weights as if float only allows
    the step up."""
    from vitq.methods.reconstruct import _SoftRound

    quantizer = Quantizer(roles.WEIGHT, QuantSpec("uniform", 4, "per_tensor", symmetric=True))
    quantizer.set_qparams(torch.tensor(1.0), torch.tensor(0.0))
    w_float = torch.tensor([0.2, 0.7, 1.4, -0.6, 2.2])
    chosen = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0])  # GPTQ's (not round-to-nearest's) integers
    rounder = _SoftRound(w_float, quantizer, start=chosen)
    assert torch.equal(rounder.floor, torch.tensor([0.0, 0.0, 1.0, -1.0, 0.0]))
    assert torch.allclose(rounder(w_float), chosen, atol=1e-3)  # training starts at GPTQ's rounding
    rounder.hard = True
    assert torch.equal(rounder(w_float), chosen)
    with torch.no_grad():
        rounder.V.neg_()  # each weight moved one step towards its float value
    assert torch.equal(rounder(w_float), torch.tensor([0.0, 1.0, 2.0, -1.0, 1.0]))
    stuck = _SoftRound(chosen, quantizer)  # from GPTQ's weights: floor = the weight itself
    assert torch.equal(stuck.floor, chosen)


def test_reconstruction_after_gptq_rounds_the_float_weights(tmp_path):
    """From GPTQ's rounding each weight may move one step towards its float value (``from_float``) or,
    rounding GPTQ's weights as if float, only stay or step up; ``start_margin`` is where its soft
    rounding starts: at GPTQ's choice (the default) nothing moves in a short training, undecided
    (0.45) a good part of the weights do. The record says how many moved."""
    model, data = tiny_vit(), batches()
    x = torch.cat(data)
    gptq = quantize(model, recipe("reparam", "calibrate", "gptq"), data, w_bits=3, a_bits=8, progress=False, seed=0)
    base = gptq.model.blocks[0].mlp.fc1
    runs = {"from_float": {"from_float": True, "lr": 0.01, "start_margin": 0.45},
            "current": {"from_float": False, "lr": 0.01, "start_margin": 0.45},
            "at_gptq": {"from_float": True}}
    results = {}
    for key, settings in runs.items():
        stages = ["reparam", "calibrate", "gptq", {"reconstruct": {"iterations": 30, "batch_size": 4, **settings}}]
        result = results[key] = quantize(model, recipe(*stages), data, w_bits=3, a_bits=8, progress=False, seed=0)
        layer = result.model.blocks[0].mlp.fc1
        assert torch.equal(layer.weight_quantizer(layer.weight), layer.weight)
        steps = torch.round((layer.weight - base.weight) / layer.weight_quantizer.scale.reshape(-1, 1))
        record = result.plan.meta["reconstruct"]
        assert record["from_float"] is settings["from_float"]
        if key == "from_float":
            # one step at most, towards the float weight: down for some weights, up for others
            folded = fold_smoothing(copy.deepcopy(model), smoothing_of(result.model))  # the float weights after reparam
            float_steps = (folded.blocks[0].mlp.fc1.weight.detach() - base.weight) / layer.weight_quantizer.scale.reshape(-1, 1)
            assert steps.abs().max() == 1 and steps.min() == -1
            moved = steps != 0
            assert torch.equal(torch.sign(steps[moved]), torch.sign(float_steps[moved]))
        elif key == "current":
            assert steps.min() >= 0  # rounding GPTQ's weights: stay or one step up, never down
        else:
            assert torch.equal(layer.weight, base.weight)
            assert set(record["changed_codes"].values()) == {0.0}
        if key != "at_gptq":
            assert record["changed_codes"]["blocks.0"] >= 0 and any(record["changed_codes"].values()) == (key == "from_float")
    result = results["from_float"]
    result.plan.save(tmp_path)
    with torch.no_grad():
        assert torch.equal(apply_plan(model, Plan.load(tmp_path))(x), result.model(x))


def test_reconstruction_is_skipped_outside_its_bit_widths():
    """``min_w_bits``/``max_w_bits``/``min_a_bits``: outside them the stage changes nothing and says why."""
    model, data = tiny_vit(), batches()
    x = torch.cat(data)
    gate = {"reconstruct": {"iterations": 5, "batch_size": 4, "min_w_bits": 4, "max_w_bits": 4, "min_a_bits": 8}}
    for w, a, why in ((6, 8, "w_bits 6 > 4"), (4, 4, "a_bits 4 < 8"), (3, 6, "w_bits 3 < 4, a_bits 6 < 8")):
        plain = quantize(model, recipe("calibrate"), data, w_bits=w, a_bits=a, progress=False, seed=0)
        gated = quantize(model, recipe("calibrate", gate), data, w_bits=w, a_bits=a, progress=False, seed=0)
        assert gated.plan.meta["reconstruct"]["skipped"] == why
        with torch.no_grad():
            assert torch.equal(gated.model(x), plain.model(x))
    ran = quantize(model, recipe("calibrate", gate), data, w_bits=4, a_bits=8, progress=False, seed=0)
    assert ran.plan.meta["reconstruct"]["blocks"] == len(model.blocks)
    # by_bits: one bit-width's own settings, the gate included
    gate["reconstruct"]["by_bits"] = {"w4a4": {"min_a_bits": 4, "holdout": 0.25}}
    opened = quantize(model, recipe("calibrate", gate), data, w_bits=4, a_bits=4, progress=False, seed=0)
    record = opened.plan.meta["reconstruct"]
    assert record["blocks"] == len(model.blocks) and record["holdout"] == 0.25 and "held_out_mse" in record
    still = quantize(model, recipe("calibrate", gate), data, w_bits=4, a_bits=5, progress=False, seed=0)
    assert still.plan.meta["reconstruct"]["skipped"] == "a_bits 5 < 8"


def test_reconstruction_keeps_a_blocks_rounding_when_held_out_images_say_training_did_not_help(monkeypatch):
    """``holdout``: a block whose error on the images it did not train on rose keeps its earlier
    weights and scales exactly; one whose error fell keeps what it learned."""
    from vitq.methods.reconstruct import ReconstructStage

    model, data = tiny_vit(), batches()
    x = torch.cat(data)
    base = quantize(model, recipe("calibrate"), data, w_bits=4, a_bits=8, progress=False, seed=0)
    stage = {"reconstruct": {"iterations": 20, "batch_size": 4, "holdout": 0.25}}
    kept = quantize(model, recipe("calibrate", stage), data, w_bits=4, a_bits=8, progress=False, seed=0)
    record = kept.plan.meta["reconstruct"]
    assert set(record["held_out_mse"]) == {f"blocks.{i}" for i in range(len(model.blocks))}
    for name, (before, after) in record["held_out_mse"].items():  # (rounded to 6 decimals in the record)
        if abs(after - before) > 2e-6:
            assert (name in record["reverted"]) == (after > before)
    assert len(record["reverted"]) < len(model.blocks)
    with torch.no_grad():
        assert not torch.equal(kept.model(x), base.model(x))

    train = ReconstructStage._train

    def harmful(block, inputs, target, *args, **kwargs):  # trains, then spoils every weight
        out = train(block, inputs, target, *args, **kwargs)
        with torch.no_grad():
            for m in block.modules():
                if isinstance(m, QuantLinear):
                    m.weight.add_(m.weight.abs().max())
        return out

    monkeypatch.setattr(ReconstructStage, "_train", staticmethod(harmful))
    spoiled = quantize(model, recipe("calibrate", stage), data, w_bits=4, a_bits=8, progress=False, seed=0)
    assert spoiled.plan.meta["reconstruct"]["reverted"] == [f"blocks.{i}" for i in range(len(model.blocks))]
    with torch.no_grad():
        assert torch.equal(spoiled.model(x), base.model(x))


def test_reconstruct_settings_are_validated():
    with pytest.raises(VitqError, match="max_w_bits"):
        load_recipe({"name": "x", "stages": ["calibrate", {"reconstruct": {"max_w_bits": 9}}]})
    with pytest.raises(VitqError, match="min_w_bits"):
        load_recipe({"name": "x", "stages": ["calibrate", {"reconstruct": {"min_w_bits": 6, "max_w_bits": 4}}]})
    with pytest.raises(VitqError, match="iterations"):
        load_recipe({"name": "x", "stages": ["calibrate", {"reconstruct": {"iterations": 0}}]})
    with pytest.raises(VitqError, match="drop_prob"):
        load_recipe({"name": "x", "stages": ["calibrate", {"reconstruct": {"drop_prob": 2}}]})
    with pytest.raises(VitqError, match="holdout"):
        load_recipe({"name": "x", "stages": ["calibrate", {"reconstruct": {"holdout": 1}}]})
    for margin in (0, 0.6, True):
        with pytest.raises(VitqError, match="start_margin"):
            load_recipe({"name": "x", "stages": ["calibrate", {"reconstruct": {"start_margin": margin}}]})
    with pytest.raises(VitqError, match="wXaY"):
        load_recipe({"name": "x", "stages": ["calibrate", {"reconstruct": {"by_bits": {"4/4": {}}}}]})
    with pytest.raises(VitqError, match="by_bits.w4a4.*holdout"):
        load_recipe({"name": "x", "stages": ["calibrate", {"reconstruct": {"by_bits": {"w4a4": {"holdout": 2}}}}]})
    with pytest.raises(VitqError, match="unknown key"):
        load_recipe({"name": "x", "stages": ["calibrate", {"reconstruct": {"by_bits": {"w4a4": {"iters": 2}}}}]})
    with pytest.raises(VitqError, match="damp"):
        load_recipe({"name": "x", "stages": ["calibrate", {"gptq": {"damp": 0}}]})


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_forward_after_continues_the_model_from_any_blocks_output(family):
    """``forward_after``: the logits (or pooled features) from a block's output equal the whole model's."""
    from vitq.models.adapters import find_adapter

    model = MODELS[family]().eval()
    adapter = find_adapter(model)
    x = torch.cat(batches())
    outputs = {}
    hooks = [block.register_forward_hook(lambda m, a, out, n=name: outputs.__setitem__(n, out))
             for name, block in adapter.blocks(model)]
    with torch.no_grad():
        full = model(x)
        for hook in hooks:
            hook.remove()
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        for name, _ in adapter.blocks(model):
            assert torch.equal(adapter.forward_after(model, name, outputs[name]), full), name
            assert torch.equal(adapter.forward_after(model, name, outputs[name], pre_logits=True), pooled), name


def test_reconstruction_fitted_to_the_head_lowers_the_output_divergence_and_reproduces(tmp_path):
    """``head_blocks``: the last blocks' loss adds the KL of the float rest of the model run on their
    output; training lowers it, the record shows it, the float model is left as it was (parameters and
    their ``requires_grad``), and the plan reproduces the model."""
    model, data = tiny_vit(), batches()
    x = torch.cat(data)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    stages = ["calibrate", {"reconstruct": {"iterations": 30, "batch_size": 4, "head_blocks": 2}}]
    result = quantize(model, recipe(*stages), data, w_bits=4, a_bits=4, progress=False, seed=0)
    record = result.plan.meta["reconstruct"]
    assert set(record["head_term"]) == {"blocks.4", "blocks.5"}
    for before, after in record["head_term"].values():
        assert after < before
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    plain = quantize(model, recipe("calibrate", {"reconstruct": {"iterations": 30, "batch_size": 4}}), data,
                     w_bits=4, a_bits=4, progress=False, seed=0)
    assert "head_term" not in plain.plan.meta["reconstruct"]
    with torch.no_grad():
        first = {n: torch.equal(p, dict(result.model.named_parameters())[n])
                 for n, p in plain.model.named_parameters() if n.startswith("blocks.0.")}
        assert all(first.values())  # blocks before the last two train as before
        assert not torch.equal(plain.model(x), result.model(x))
    result.plan.save(tmp_path)
    with torch.no_grad():
        assert torch.equal(apply_plan(model, Plan.load(tmp_path))(x), result.model(x))
    every = quantize(model, recipe("calibrate", {"reconstruct": {"iterations": 2, "batch_size": 4, "head_blocks": 99}}),
                     data, w_bits=4, a_bits=4, progress=False, seed=0)
    assert len(every.plan.meta["reconstruct"]["head_term"]) == len(model.blocks)  # more than there are: all


def test_head_objective_starts_both_terms_at_the_ratio_head_weight():
    from vitq.methods.reconstruct import ReconstructSettings, _Objective

    torch.manual_seed(0)
    block, head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 3)
    inputs, target = torch.randn(10, 5, 4), torch.randn(10, 5, 4)
    s = ReconstructSettings(head_blocks=1, head_weight=0.5)
    train = torch.arange(2, 10)
    objective = _Objective(block, inputs, target, {}, s, train, lambda y: head(y[:, 0]))
    with torch.no_grad():
        out = block(inputs[train])
        mse = F.mse_loss(out, target[train], reduction="none").sum(-1).mean()
        kl = F.kl_div(head(out[:, 0]).log_softmax(-1), head(target[train, 0]).log_softmax(-1), log_target=True,
                      reduction="batchmean")
        assert objective.scale * kl == pytest.approx(0.5 * float(mse), rel=1e-5)
        assert float(objective(out, torch.arange(8))) == pytest.approx(1.5 * float(mse), rel=1e-5)
        assert objective.measure(train) == pytest.approx(1.5 * float(mse), rel=1e-5)
    assert objective.head_term == [pytest.approx(float(kl), rel=1e-5)]
    # head_loss "features": the squared error of what the head returns, summed over its channels
    s = ReconstructSettings(head_blocks=1, head_weight=2.0, head_loss="features")
    objective = _Objective(block, inputs, target, {}, s, train, lambda y: head(y[:, 0]))
    with torch.no_grad():
        err = (head(out[:, 0]) - head(target[train, 0])).pow(2).sum(-1).mean()
        assert objective.head_term == [pytest.approx(float(err), rel=1e-5)]
        assert objective.scale * err == pytest.approx(2.0 * float(mse), rel=1e-5)


def test_head_blocks_is_ignored_for_a_backbone_inside_a_dense_model_and_says_so():
    import timm
    from vitq.models import ViTSegmenter

    torch.manual_seed(0)
    backbone = timm.create_model("test_vit", img_size=(32, 48), patch_size=8, num_classes=0)
    model = ViTSegmenter(backbone, [0, 2], 3, hidden=8).eval()
    data = [torch.randn(2, 3, 32, 48)]
    messages = []
    result = quantize(model, recipe("calibrate", {"reconstruct": {"iterations": 3, "batch_size": 2, "head_blocks": 1}}),
                      data, w_bits=4, a_bits=8, progress=False, seed=0, log=messages.append)
    record = result.plan.meta["reconstruct"]
    assert "dense model" in record["head_blocks_ignored"] and "head_term" not in record
    assert any("head_blocks ignored" in m for m in messages)


@pytest.mark.parametrize("key, value", [("head_blocks", -1), ("head_blocks", True), ("head_blocks", 1.5),
                                        ("head_weight", 0), ("head_weight", -1), ("head_weight", "a"),
                                        ("head_loss", "mse"), ("head_loss", None)])
def test_head_settings_are_validated(key, value):
    with pytest.raises(VitqError, match=f"reconstruct.{key}"):
        load_recipe({"name": "x", "stages": ["calibrate", {"reconstruct": {key: value}}]})
