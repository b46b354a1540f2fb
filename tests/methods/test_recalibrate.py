"""The ``recalibrate`` stage: chosen activation points set again on the quantized model, in forward
order; every other point left as it was."""
import pytest
import torch

from conftest import IMG, tiny_swin, tiny_vit
from vitq.api import quantize
from vitq.errors import VitqError
from vitq.methods import Plan, apply_plan
from vitq.models import iter_quantizers
from vitq.recipes import load_recipe


def batches():
    torch.manual_seed(1)
    x = torch.randn(6, 3, IMG, IMG)
    return [x[:3], x[3:]]


def recipe(*stages):
    return {"name": "t", "weights": {"observer": "minmax", "symmetric": False},
            "activations": {"observer": "percentile_mse", "symmetric": False},
            "stages": [{"prefix_rows": {"points": ["q"]}}, "calibrate", "gptq", *stages]}


def scales(model):
    return {n: q.scale.clone() for n, q in iter_quantizers(model) if q.scale is not None}


def test_prefix_grids_span_the_quantized_models_rows_and_nothing_else_moves():
    model, data = tiny_vit(), batches()
    before = quantize(model, recipe(), data, w_bits=4, a_bits=6, progress=False)
    after = quantize(model, recipe({"recalibrate": {"observer": "minmax"}}), data, w_bits=4, a_bits=6,
                     progress=False)
    assert after.record["recalibrate"] == {"points": "_prefix_quantizer$", "observer": "minmax",
                                           "recalibrated": len(model.blocks)}
    old, new = scales(before.model), scales(after.model)
    moved = sorted(n for n in old if not torch.equal(old[n], new[n]))
    assert moved == [f"blocks.{i}.attn.q_prefix_quantizer" for i in range(len(model.blocks))]
    # what each class-token grid now receives, with every other point quantized: its min-max span exactly
    seen = {}
    hooks = [after.model.blocks[i].attn.q_prefix_quantizer.register_forward_pre_hook(
        lambda m, a, i=i: seen.setdefault(i, []).append(a[0])) for i in range(len(model.blocks))]
    with torch.no_grad():
        for x in data:
            after.model(x)
    for hook in hooks:
        hook.remove()
    for i, rows in seen.items():
        rows = torch.cat(rows)
        quantizer = after.model.blocks[i].attn.q_prefix_quantizer
        qmin, qmax = quantizer.spec.qrange
        span = float(quantizer.scale) * (qmax - qmin)
        assert span == pytest.approx(float(rows.max().clamp(min=0) - rows.min().clamp(max=0)), rel=1e-5)


def test_the_recipes_observer_by_default_and_the_plan_keeps_the_new_grids(tmp_path):
    model, data = tiny_vit(), batches()
    result = quantize(model, recipe("recalibrate"), data, w_bits=6, a_bits=6, progress=False)
    assert result.record["recalibrate"]["observer"] == "percentile_mse"
    result.plan.save(tmp_path)
    again = apply_plan(model, Plan.load(tmp_path / "plan.json"))
    with torch.no_grad():
        assert torch.equal(again(data[0]), result.model(data[0]))


def test_nothing_matched_or_only_weights_leaves_the_model_as_it_was():
    data = batches()
    plain = quantize(tiny_swin(), recipe(), data, w_bits=6, a_bits=6, progress=False)
    swin = quantize(tiny_swin(), recipe("recalibrate"), data, w_bits=6, a_bits=6, progress=False)
    assert swin.record["recalibrate"]["recalibrated"] == 0  # no class token: no prefix rows to set
    weights = quantize(tiny_vit(), recipe({"recalibrate": {"points": "weight_quantizer$"}}), data, w_bits=6,
                       a_bits=6, progress=False)
    assert weights.record["recalibrate"]["recalibrated"] == 0
    vit = quantize(tiny_vit(), recipe(), data, w_bits=6, a_bits=6, progress=False)
    for a, b in ((plain, swin), (vit, weights)):
        old, new = scales(a.model), scales(b.model)
        assert old.keys() == new.keys() and all(torch.equal(old[n], new[n]) for n in old)


@pytest.mark.parametrize("settings, message", [({"points": "(q"}, "not a regular expression"),
                                               ({"observer": "mimax"}, "unknown observer 'mimax'"),
                                               ({"points": ""}, "regular expression over quant point names")])
def test_bad_settings_say_what_is_wrong(settings, message):
    with pytest.raises(VitqError, match=message):
        load_recipe(recipe({"recalibrate": settings}))
