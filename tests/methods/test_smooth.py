"""SQ-b (the ``smooth`` stage): exact in float, reproduced by plans, validated settings."""
import pytest
import torch

from conftest import IMG, tiny_deit, tiny_swin, tiny_vit
from vitq.api import quantize
from vitq.errors import VitqError
from vitq.methods import Plan, apply_plan, fold_smoothing, prepare, smoothing_of
from vitq.methods.smooth import SmoothFactor, smoothing_factors
from vitq.models import find_adapter, iter_quantizers
from vitq.recipes import load_recipe

SMOOTH_ONLY = {"name": "sqb", "weights": {"observer": "minmax", "symmetric": True},
               "stages": ["smooth", "calibrate"]}
MODELS = {"vit": tiny_vit, "deit": tiny_deit, "swin": tiny_swin}


def batches():
    torch.manual_seed(1)
    x = torch.randn(6, 3, IMG, IMG)
    return [x[:3], x[3:]]


def disabled(qmodel):
    for _, q in iter_quantizers(qmodel):
        q.enabled = False
    return qmodel


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("shift", ["mean", "midrange", "none"])
def test_smoothing_is_exact_in_float(family, shift):
    model = MODELS[family]()
    data = batches()
    recipe = {**SMOOTH_ONLY, "stages": [{"smooth": {"shift": shift, "alpha": 0.7}}, "calibrate"]}
    result = quantize(model, recipe, data, w_bits=4, a_bits=4, progress=False)
    smoothed = disabled(result.model)
    with torch.no_grad():
        x = torch.cat(data)
        assert torch.allclose(smoothed(x), model(x), atol=1e-5, rtol=0)
    pairs = find_adapter(model).norm_linear_pairs(model)
    assert len(smoothing_of(result.model)) == len(pairs) > 0
    if family == "swin":
        assert "reduction" in {f.point for f in smoothing_of(result.model)}
    # the weights really moved, and the float model is untouched
    first = pairs[0]
    assert not torch.equal(result.model.get_submodule(first.linear).weight, model.get_submodule(first.linear).weight)
    assert not smoothing_of(model)


def test_smoothing_centres_the_activation_and_makes_its_quantizer_symmetric():
    model = tiny_deit()
    recipe = {**SMOOTH_ONLY, "stages": [{"smooth": {"symmetric": True}}, "calibrate"]}
    result = quantize(model, recipe, batches(), progress=False)
    qkv = result.model.blocks[0].attn.qkv
    assert qkv.input_quantizer.spec.symmetric and qkv.input_quantizer.zero_point.item() == 0
    seen = []
    hook = qkv.input_quantizer.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    disabled(result.model)
    with torch.no_grad():
        result.model(torch.cat(batches()))
    hook.remove()
    mean = seen[0].reshape(-1, seen[0].shape[-1]).mean(dim=0)
    assert mean.abs().max() < 1e-4  # μ = the channel means of these very batches
    # the default (symmetric: false) keeps the recipe's (asymmetric) activation range
    kept = quantize(model, SMOOTH_ONLY, batches(), progress=False).model.blocks[0].attn.qkv.input_quantizer
    assert not kept.spec.symmetric


def test_alpha_is_chosen_per_pair_by_quantized_output_error(tmp_path):
    from vitq.methods.smooth import _quantized_error

    model = tiny_vit()
    recipe = {**SMOOTH_ONLY, "stages": [{"smooth": {"alpha": [0.0, 0.5, 1.0], "max_tokens": 64}}, "calibrate"]}
    result = quantize(model, recipe, batches(), w_bits=4, a_bits=4, progress=False)
    chosen = result.record["smooth"]["chosen_alpha"]
    assert set(chosen) == {f.linear for f in smoothing_of(result.model)}
    assert set(chosen.values()) <= {0.0, 0.5, 1.0}
    assert [e["alpha"] for e in result.plan.meta["smooth"]] == list(chosen.values())
    # the chosen α of the first pair has the least error among the candidates on the same tokens
    first = find_adapter(model).norm_linear_pairs(model)[0]
    qmodel = prepare(model, w_bits=4, a_bits=4)
    linear = qmodel.get_submodule(first.linear)
    x = torch.randn(64, linear.in_features) * 2 + 1
    errors = {}
    for alpha in (0.0, 0.5, 1.0):
        eps, mu = smoothing_factors(x.amin(0), x.amax(0), x.mean(0), linear.weight, alpha, "mean")
        omse = load_recipe("omse")
        errors[alpha] = _quantized_error(linear, x, eps, mu, omse.weights, omse.activations)
    assert len(set(errors.values())) == 3  # α changes the quantized error (so choosing it matters)
    result.plan.save(tmp_path)
    assert [e.get("alpha") for e in Plan.load(tmp_path).meta["smooth"]] == list(chosen.values())


def test_smoothing_factors_exact():
    eps, mu = smoothing_factors(torch.tensor([-1.0, 2.0]), torch.tensor([3.0, 2.0]), torch.tensor([0.5, 2.0]),
                                torch.tensor([[4.0, 1.0], [-1.0, 0.0]]), 0.5, "mean")
    # channel 0: max|Y − 0.5| = 2.5, max|W| = 4 → sqrt(2.5 / 4); channel 1 is constant → ε = 1
    assert mu.tolist() == [0.5, 2.0]
    assert eps[0].item() == pytest.approx((2.5 / 4) ** 0.5)
    assert eps[1].item() == 1.0


@pytest.mark.parametrize("family", sorted(MODELS))
def test_plan_roundtrip_with_smoothing_is_identical(family, tmp_path):
    model = MODELS[family]()
    data = batches()
    result = quantize(model, "mptq-vit", data, w_bits=4, a_bits=4, progress=False)
    result.plan.save(tmp_path)
    plan = Plan.load(tmp_path)
    assert {e["point"] for e in plan.meta["smooth"]} <= {"qkv", "fc1", "reduction"}
    first = plan.meta["smooth"][0]["linear"]
    assert plan.tensors[f"smooth.{first}.scale"].shape == plan.tensors[f"smooth.{first}.shift"].shape
    rebuilt = apply_plan(model, plan)
    with torch.no_grad():
        x = torch.cat(data)
        assert torch.equal(rebuilt(x), result.model(x))
    # a plan made again from the rebuilt model carries the smoothing on (e.g. --start-plan runs)
    again = quantize(model, "omse", data, start_plan=plan, progress=False)
    assert again.plan.meta["smooth"] == plan.meta["smooth"]
    with torch.no_grad():
        assert torch.equal(again.model(x), result.model(x))


def test_smooth_must_come_before_calibrate():
    model = tiny_vit()
    recipe = {**SMOOTH_ONLY, "stages": ["calibrate", "smooth"]}
    with pytest.raises(VitqError, match="before 'calibrate'"):
        quantize(model, recipe, batches(), progress=False)


def test_fold_refuses_twice_and_foreign_factors():
    model = tiny_vit()
    qmodel = prepare(model)
    width = qmodel.blocks[0].attn.qkv.in_features
    factor = SmoothFactor("qkv", "blocks.0.norm1", "blocks.0.attn.qkv", torch.ones(width), torch.zeros(width))
    fold_smoothing(qmodel, [factor])
    with pytest.raises(VitqError, match="already smoothed"):
        fold_smoothing(qmodel, [factor])
    with pytest.raises(VitqError, match="channels"):
        fold_smoothing(prepare(model), [SmoothFactor("qkv", "blocks.0.norm1", "blocks.0.attn.qkv", torch.ones(3),
                                                     torch.zeros(3))])
    with pytest.raises(VitqError, match="lacks"):
        fold_smoothing(prepare(model), [SmoothFactor("qkv", "blocks.0.norm9", "blocks.0.attn.qkv", torch.ones(width),
                                                     torch.zeros(width))])


@pytest.mark.parametrize(
    "settings, match",
    [
        ({"alpha": 1.5}, "alpha"),
        ({"alpha": "half"}, "alpha"),
        ({"alpha": []}, "alpha"),
        ({"alpha": [0.5, 2]}, "alpha"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"shift": "median"}, "shift"),
        ({"points": ["qkv", "proj"]}, "points"),
        ({"points": []}, "points"),
        ({"symmetric": "yes"}, "symmetric"),
        ({"strength": 0.5}, "unknown key"),
    ],
)
def test_bad_smooth_settings(settings, match):
    with pytest.raises(VitqError, match=match):
        quantize(tiny_vit(), {**SMOOTH_ONLY, "stages": [{"smooth": settings}, "calibrate"]}, batches(),
                 progress=False)


def test_swin_with_padded_windows_is_exact_without_the_shift_there():
    import timm

    torch.manual_seed(0)
    # 16×16 then 8×8 tokens in windows of 3: the blocks pad their normalised tokens with zeros
    model = timm.create_model("swin_tiny_patch4_window7_224", img_size=IMG, patch_size=2, window_size=3,
                              embed_dim=16, depths=(2, 2), num_heads=(1, 2), num_classes=4).eval()
    pairs = find_adapter(model).norm_linear_pairs(model)
    padded = {p.linear for p in pairs if not p.shift_exact}
    assert padded and all(p.point == "qkv" for p in pairs if p.linear in padded)
    result = quantize(model, SMOOTH_ONLY, batches(), progress=False)
    assert set(result.record["smooth"]["unshifted"]) == padded
    for f in smoothing_of(result.model):
        assert (f.linear in padded) == (not f.shift.any())
    with torch.no_grad():
        x = torch.cat(batches())
        assert torch.allclose(disabled(result.model)(x), model(x), atol=1e-5, rtol=0)
