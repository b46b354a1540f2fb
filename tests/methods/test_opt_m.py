"""OPT-m (the ``opt_m`` stage) and the ``mptq-vit`` recipe, through the API and the CLI."""
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import IMG, tiny_swin, tiny_vit
from vitq.api import quantize
from vitq.cli import main
from vitq.errors import VitqError
from vitq.methods import Plan, apply_plan
from vitq.methods.opt_m import search_twin
from vitq.quant.observers import create_observer
from vitq.quant.primitives import fake_quantize_affine, fake_quantize_twin
from vitq.quant.spec import QuantSpec
from vitq.recipes import Recipe, load_recipe

CALIBRATE_THEN_OPT_M = {"name": "opt-m", "weights": {"observer": "omse", "symmetric": True},
                        "activations": {"observer": "omse"}, "stages": ["calibrate", "opt_m"]}


def batches():
    torch.manual_seed(1)
    x = torch.randn(6, 3, IMG, IMG)
    return [x[:3], x[3:]]


def layer_error(x, weight, reference, quantize_fn):
    return float((F.linear(quantize_fn(x), weight) - reference).pow(2).mean())


def test_search_recovers_a_twin_grid_exactly():
    # values on the 4-bit twin grid with s_pos = 0.5 and m = 3 (s_neg = 0.0625), max 3.5 = 7 · s_pos
    torch.manual_seed(0)
    codes_pos = torch.randint(0, 8, (500,)).float() * 0.5
    codes_neg = -torch.randint(0, 8, (500,)).float() * 0.0625
    x = torch.cat([codes_pos, codes_neg, torch.tensor([3.5])]).reshape(-1, 1).repeat(1, 4)
    weight = torch.eye(4)
    m, scale, error = search_twin(x, weight, None, x, bits=4, max_m=8, grid=20, refine=10, positive_max=3.5)
    assert (m, scale, error) == (3, 0.5, 0.0)


def test_twin_beats_uniform_on_heavy_tailed_gelu_outputs():
    g = torch.Generator().manual_seed(0)
    x = F.gelu(torch.distributions.Laplace(-0.5, 0.7).sample((2048, 64)))
    weight = torch.randn(16, 64, generator=g) / 8
    reference = F.linear(x, weight)
    observer = create_observer("omse", QuantSpec(bits=4))
    observer.observe(x)
    scale, zp = observer.qparams()
    uniform = layer_error(x, weight, reference, lambda t: fake_quantize_affine(t, scale, zp, 0, 15))
    m, s_pos, twin = search_twin(x, weight, None, reference, 4, 8, 20, 10, float(x.max()))
    assert 1 <= m <= 8
    assert twin == pytest.approx(layer_error(x, weight, reference,
                                             lambda t: fake_quantize_twin(t, torch.tensor(s_pos), m, 4)), rel=1e-5)
    assert twin < 0.5 * uniform


@pytest.mark.parametrize("keep_uniform", [True, False])
def test_opt_m_stage_records_and_installs_its_choice(keep_uniform):
    recipe = {**CALIBRATE_THEN_OPT_M, "stages": ["calibrate", {"opt_m": {"keep_uniform": keep_uniform, "grid": 8,
                                                                         "refine": 2}}]}
    result = quantize(tiny_vit(), recipe, batches(), w_bits=4, a_bits=4, progress=False)
    layers = result.record["opt_m"]["layers"]
    assert len(layers) == len(result.model.blocks)
    for entry in layers:
        quantizer = result.model.get_submodule(entry["point"])
        assert entry["chosen"] == quantizer.spec.kind
        if keep_uniform:
            assert entry["chosen"] == ("uniform" if entry["uniform_mse"] <= entry["twin_mse"] else "twin")
        else:
            assert quantizer.spec.kind == "twin" and quantizer.spec.ratio_log2 == entry["m"]
            assert quantizer.scale.item() == pytest.approx(entry["scale_pos"])
    assert result.plan.meta["opt_m"]["layers"] == layers


def test_twin_points_survive_the_plan(tmp_path):
    recipe = {**CALIBRATE_THEN_OPT_M, "stages": ["calibrate", {"opt_m": {"keep_uniform": False, "grid": 4,
                                                                         "refine": 0}}]}
    result = quantize(tiny_swin(), recipe, batches(), w_bits=4, a_bits=4, progress=False)
    result.plan.save(tmp_path)
    plan = Plan.load(tmp_path)
    twins = {k: v for k, v in plan.rules.items() if v.kind == "twin"}
    assert len(twins) == 4  # one fc2 per Swin block
    body = json.loads((tmp_path / "plan.json").read_text())
    assert all("ratio_log2" in body["rules"][k] for k in twins)
    x = torch.cat(batches())
    with torch.no_grad():
        assert torch.equal(apply_plan(tiny_swin(), plan)(x), result.model(x))


def test_opt_m_needs_a_calibrated_model_and_post_gelu_points():
    with pytest.raises(VitqError, match="not calibrated"):
        quantize(tiny_vit(), {"name": "x", "stages": ["opt_m"]}, batches(), progress=False)
    with pytest.raises(VitqError, match="no quantized post-GELU input"):
        quantize(tiny_vit(), {"name": "x", "stages": ["calibrate", "opt_m"]}, batches(), protocol="p1",
                 progress=False, start_plan=_plan_without_fc2_inputs())


def _plan_without_fc2_inputs():
    plan = quantize(tiny_vit(), "minmax", batches(), progress=False).plan
    for name, spec in list(plan.rules.items()):
        if name.endswith("fc2.input_quantizer"):
            plan.rules[name] = spec.with_(enabled=False)
            plan.tensors.pop(f"{name}.scale", None)
            plan.tensors.pop(f"{name}.zero_point", None)
    return plan


@pytest.mark.parametrize(
    "settings, match",
    [
        ({"max_m": 17}, "max_m"),
        ({"max_m": -1}, "max_m"),
        ({"grid": 0}, "grid"),
        ({"refine": 1.5}, "refine"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"keep_uniform": "no"}, "keep_uniform"),
        ({"m": 3}, "unknown key"),
        ({"points": ["gelu", "relu"]}, "gelu and/or softmax"),
        ({"points": []}, "gelu and/or softmax"),
        ({"softmax_images": 0}, "softmax_images"),
        ({"softmax_min_bits": 9}, "softmax_min_bits"),
        ({"softmax_min_w_bits": 1}, "softmax_min_w_bits"),
    ],
)
def test_bad_opt_m_settings(settings, match):
    with pytest.raises(VitqError, match=match):
        load_recipe({"name": "x", "stages": ["calibrate", {"opt_m": settings}]})


def test_mptq_recipe_loads_and_roundtrips():
    recipe = load_recipe("mptq-vit")
    assert recipe.stage_names == ("smooth", "calibrate", "opt_m")
    assert recipe.activations.observer == "omse" and recipe.weights.observer == "omse"
    assert Recipe.from_dict(recipe.to_dict()) == recipe


def test_mptq_end_to_end_through_the_cli(checkpoint, image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["quantize", str(checkpoint), "--recipe", "mptq-vit", "--w-bits", "4", "--a-bits", "4",
               "--calib", str(image_folder), "--num-calib", "8", "--eval", str(image_folder), "--out", str(out),
               "--device", "cpu", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["recipe"] == "mptq-vit"
    plan = json.loads((out / "plan.json").read_text())
    assert plan["meta"]["smooth"] and plan["meta"]["opt_m"]["layers"]
    assert plan["meta"]["smooth_settings"]["alpha"] == [0.5, 0.75, 0.9, 1.0]
    eval_out = tmp_path / "eval.json"
    rc = main(["eval", str(checkpoint), "--plan", str(out / "plan.json"), "--eval", str(image_folder),
               "--out", str(eval_out), "--device", "cpu", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    again = json.loads(eval_out.read_text())
    for key in ("num_eval", "quant_top1", "agreement", "kl"):
        assert again[key] == metrics[key], key


def test_softmax_twin_range_search_installs_and_survives_the_plan(tmp_path):
    recipe = {**CALIBRATE_THEN_OPT_M, "stages": ["calibrate", {"opt_m": {"points": ["gelu", "softmax"], "grid": 6,
                                                                         "refine": 2, "keep_uniform": False}}]}
    model = tiny_vit()
    result = quantize(model, recipe, batches(), w_bits=4, a_bits=4, progress=False)
    record = result.record["opt_m"]
    assert len(record["layers"]) == len(record["softmax"]) == len(result.model.blocks)
    for entry in record["softmax"]:
        q = result.model.get_submodule(entry["point"])
        assert q.spec.kind == "twin_range" and q.spec.ratio_log2 == entry["m"] and not q.spec.symmetric
        assert q.scale.item() == pytest.approx(entry["scale_coarse"])
        assert 0 < entry["twin_mse"] < float("inf")
        assert entry["scale_fine"] == pytest.approx(q.scale.item() / 2**q.spec.ratio_log2)
    result.plan.save(tmp_path)
    x = torch.cat(batches())
    with torch.no_grad():
        assert torch.equal(apply_plan(tiny_vit(), Plan.load(tmp_path))(x), result.model(x))


def test_softmax_search_leaves_probabilities_below_its_bits_alone():
    """``softmax_min_bits``: probability quantizers with fewer bits keep their kind and scale."""
    stage = {"opt_m": {"points": ["gelu", "softmax"], "grid": 6, "refine": 2, "keep_uniform": False,
                       "softmax_min_bits": 8}}
    recipe = {**CALIBRATE_THEN_OPT_M, "stages": ["calibrate", stage]}
    gelu_only = {**CALIBRATE_THEN_OPT_M, "stages": ["calibrate", {"opt_m": {"grid": 6, "refine": 2,
                                                                            "keep_uniform": False}}]}
    x = torch.cat(batches())
    low = quantize(tiny_vit(), recipe, batches(), w_bits=4, a_bits=4, progress=False, seed=0)
    assert low.record["opt_m"]["softmax"] == []
    plain = quantize(tiny_vit(), gelu_only, batches(), w_bits=4, a_bits=4, progress=False, seed=0)
    with torch.no_grad():
        assert torch.equal(low.model(x), plain.model(x))
    high = quantize(tiny_vit(), recipe, batches(), w_bits=4, a_bits=8, progress=False, seed=0)
    assert len(high.record["opt_m"]["softmax"]) == len(high.model.blocks)
    stage["opt_m"]["softmax_min_w_bits"] = 5  # and runs with fewer weight bits keep every kind
    assert quantize(tiny_vit(), recipe, batches(), w_bits=4, a_bits=8, progress=False, seed=0).record["opt_m"][
        "softmax"] == []


def test_twin_range_grid_is_recovered_by_the_search():
    from vitq.methods.opt_m import search_ratio
    from vitq.quant.primitives import fake_quantize_twin_range

    # probabilities on the 4-bit twin-range grid: coarse 1/7, m = 4 (fine 1/112)
    torch.manual_seed(0)
    fine = torch.randint(0, 8, (400,)).float() / 112
    coarse = torch.randint(1, 8, (100,)).float() / 7
    p = torch.cat([fine, coarse, torch.tensor([1.0])])
    m, scale, error = search_ratio(p, lambda q: float((q - p).pow(2).mean()), fake_quantize_twin_range, 4, 8, 14, 0,
                                   float(p.max()))
    assert m == 4 and error == pytest.approx(0.0, abs=1e-12) and scale == pytest.approx(1 / 7)
    # on a peaked distribution (many tiny probabilities, a few large) the two regions beat one
    g = torch.Generator().manual_seed(1)
    peaked = torch.softmax(torch.randn(64, 64, generator=g) * 4, dim=-1)
    m, _, twin = search_ratio(peaked, lambda q: float((q - peaked).pow(2).mean()), fake_quantize_twin_range, 4, 8,
                              14, 4, float(peaked.max()))
    _, _, single = search_ratio(peaked, lambda q: float((q - peaked).pow(2).mean()), fake_quantize_twin_range, 4, 0,
                                14, 4, float(peaked.max()))
    assert m > 0 and twin < single
