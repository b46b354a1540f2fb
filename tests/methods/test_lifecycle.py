import pytest
import torch

from vitq.api import quantize
from vitq.errors import VitqError
from vitq.methods import Plan, apply_plan, calibrate, convert, plan_from_model, prepare
from vitq.models import iter_quantizers
from vitq.quant.observers import ObserverConfig
from vitq.recipes import load_recipe


def roles(qmodel):
    out = {}
    for _, q in iter_quantizers(qmodel):
        if q.spec.enabled:
            out.setdefault(q.role, set()).add(q.spec.kind)
    return out


def test_protocols_choose_the_quant_points(vit):
    p1, p2, p3, p4 = (roles(prepare(vit, protocol=p)) for p in ("p1", "p2", "p3", "p4"))
    assert p1 == {"weight": {"uniform"}, "act": {"uniform"}, "attn_qkv": {"uniform"}, "attn_probs": {"uniform"}}
    assert p2 == {**p1, "attn_scores": {"uniform"}, "attn_probs": {"log2"}, "norm_input": {"ptf"}}
    assert p3 == {k: v for k, v in p1.items() if k != "attn_probs"}
    assert p4 == {"weight": {"uniform"}, "act": {"uniform"}}


@pytest.mark.parametrize("protocol", ["p3", "p4"])
def test_recipe_kinds_apply_where_the_protocol_quantizes(vit, images, protocol):
    # the recommended recipe picks log-sqrt2 probabilities; p3 and p4 leave them in float: the recipe still runs
    recipe = load_recipe("recommended").with_overrides({"reconstruct": {"iterations": 10}})  # every stage, briefly
    result = quantize(vit, recipe, [images], w_bits=4, a_bits=8, protocol=protocol, progress=False)
    probs = [q for _, q in iter_quantizers(result.model) if q.role == "attn_probs"]
    assert probs and not any(q.spec.enabled for q in probs)
    assert result.plan.meta["protocol"] == protocol


def test_bits_reach_the_specs(vit):
    qmodel = prepare(vit, w_bits=3, a_bits=6)
    bits = {(q.role, q.spec.bits) for _, q in iter_quantizers(qmodel) if q.spec.enabled}
    assert ("weight", 3) in bits and ("act", 6) in bits and ("attn_probs", 6) in bits


@pytest.mark.parametrize("bits", [1, 9, 0, -1, 4.5, "8", True])
def test_prepare_refuses_bad_bits(vit, bits):
    with pytest.raises(VitqError, match="integer from 2 to 8"):
        prepare(vit, w_bits=bits)


def test_lifecycle_misuse_raises(vit, images):
    with pytest.raises(VitqError, match="no quantizers"):
        calibrate(vit, [images])
    with pytest.raises(VitqError, match="no quantizers"):
        convert(vit)
    qmodel = prepare(vit)
    with pytest.raises(VitqError, match="already prepared"):
        prepare(qmodel)
    with pytest.raises(VitqError, match="not calibrated"):
        convert(qmodel)
    with pytest.raises(VitqError, match="before calibration"):
        qmodel(images)
    with pytest.raises(VitqError, match="no batches"):
        calibrate(qmodel, [])
    qmodel = prepare(vit)
    calibrate(qmodel, [images], progress=False)
    with pytest.raises(VitqError, match="already calibrated"):
        calibrate(qmodel, [images], progress=False)
    convert(qmodel)


def test_calibrate_sets_every_point_and_accepts_label_pairs(vit, images):
    qmodel = prepare(vit, protocol="p2", w_bits=4, a_bits=8)
    labels = torch.zeros(len(images), dtype=torch.long)
    calibrate(qmodel, [(images[:3], labels[:3]), (images[3:], labels[3:])],
              activations=ObserverConfig("omse"), progress=False)
    convert(qmodel)
    assert all(q.is_calibrated and q.enabled == q.spec.enabled for _, q in iter_quantizers(qmodel))
    out = qmodel(images)
    assert torch.isfinite(out).all()


def test_w8a8_is_close_to_float_and_w2_is_not(vit, images):
    with torch.no_grad():
        ref = vit(images)
        err8 = (quantize(vit, "omse", [images], w_bits=8, a_bits=8, progress=False).model(images) - ref).abs().mean()
        err2 = (quantize(vit, "omse", [images], w_bits=2, a_bits=2, progress=False).model(images) - ref).abs().mean()
    assert err8 < 0.05 * ref.abs().mean()
    assert err2 > 5 * err8


@pytest.mark.parametrize("protocol", ["p1", "p2", "p3"])
def test_plan_roundtrip_is_exact(vit, images, tmp_path, protocol):
    result = quantize(vit, "omse", [images], w_bits=4, a_bits=6, protocol=protocol, progress=False,
                      meta={"note": "test"})
    result.plan.save(tmp_path)
    plan = Plan.load(tmp_path / "plan.json")
    assert plan.meta["protocol"] == protocol and plan.meta["note"] == "test"
    rebuilt = apply_plan(vit, plan)
    with torch.no_grad():
        assert torch.equal(rebuilt(images), result.model(images))


def test_plan_rules_patterns_and_default(vit, images):
    result = quantize(vit, "minmax", [images], progress=False)
    plan = result.plan
    exact = {k: v for k, v in plan.rules.items()}
    weight_spec = exact["blocks.0.attn.qkv.weight_quantizer"]
    plan.rules = {"re:.*weight_quantizer": weight_spec.with_(bits=3), "default": weight_spec.with_(enabled=False)}
    assert plan.spec_for("blocks.1.mlp.fc1.weight_quantizer").bits == 3
    assert not plan.spec_for("blocks.1.mlp.fc1.input_quantizer").enabled


def test_plan_from_another_architecture_is_refused(vit, images):
    from conftest import tiny_deit

    plan = quantize(vit, "minmax", [images], progress=False).plan
    with pytest.raises(VitqError, match="does not fit this model|another architecture"):
        apply_plan(tiny_deit(), plan)


def test_plan_needs_a_calibrated_model(vit):
    with pytest.raises(VitqError, match="not calibrated"):
        plan_from_model(prepare(vit), {})


def test_same_seed_same_plan(vit, images):
    a = quantize(vit, "percentile", [images], w_bits=4, progress=False).plan
    b = quantize(vit, "percentile", [images], w_bits=4, progress=False).plan
    assert a.tensors.keys() == b.tensors.keys()
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
