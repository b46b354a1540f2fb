"""Greedy MP (the ``greedy_mp`` stage), ``--budget`` and the ``mptq-vit-mp`` recipe."""
import json

import pytest
import torch

from conftest import IMG, tiny_vit
from vitq.api import quantize
from vitq.cli import main
from vitq.errors import VitqError
from vitq.methods import Plan, apply_plan, parse_budget
from vitq.recipes import load_recipe

MP = {"name": "mp", "weights": {"observer": "minmax", "symmetric": True}, "activations": {"observer": "minmax"},
      "stages": ["calibrate", {"greedy_mp": {"budget_w": 6, "budget_a": 6, "bits": [8, 6, 4], "max_images": 6}}]}


def batches():
    torch.manual_seed(1)
    x = torch.randn(6, 3, IMG, IMG)
    return [x[:3], x[3:]]


def test_parse_budget():
    assert parse_budget("w4a4") == (4.0, 4.0)
    assert parse_budget("W4.5A6") == (4.5, 6.0)
    for bad in ("4a4", "w4", "wxa4", ""):
        with pytest.raises(VitqError, match="w4a4"):
            parse_budget(bad)


def test_greedy_mp_meets_the_budget_and_the_plan_keeps_it(tmp_path):
    model = tiny_vit()
    result = quantize(model, MP, batches(), progress=False)
    record = result.record["greedy_mp"]
    assert record["avg_w"] <= 6 + 1e-9 and record["avg_a"] <= 6 + 1e-9
    assert set(record["bits"].values()) <= {8, 6, 4}
    for name, bits in record["bits"].items():
        assert result.model.get_submodule(name).spec.bits == bits
    # the first greedy step is the least damage per bit saved
    first = record["trajectory"][1]
    sizes = {}
    for name in record["bits"]:
        q = result.model.get_submodule(name)
        owner = result.model.get_submodule(name.rsplit(".", 1)[0])
        sizes[name] = owner.weight.numel() if q.role == "weight" else None
    weight_scores = {n: record["sensitivity"][f"{n}@6"] / (sizes[n] * 2) for n in sizes if sizes[n] is not None}
    if first["unit"] in weight_scores:
        assert weight_scores[first["unit"]] == min(weight_scores.values())
    result.plan.save(tmp_path)
    rebuilt = apply_plan(model, Plan.load(tmp_path))
    x = torch.cat(batches())
    with torch.no_grad():
        assert torch.equal(rebuilt(x), result.model(x))
    assert Plan.load(tmp_path).meta["greedy_mp"]["bits"] == record["bits"]


def test_a_lower_budget_gives_fewer_bits():
    loose = quantize(tiny_vit(), MP, batches(), progress=False).record["greedy_mp"]
    tight_recipe = load_recipe(MP).with_overrides({"greedy_mp": {"budget_w": 4, "budget_a": 5}})
    tight = quantize(tiny_vit(), tight_recipe, batches(), progress=False).record["greedy_mp"]
    assert tight["avg_w"] == 4 and tight["avg_a"] <= 5 < loose["avg_a"]
    assert len(tight["trajectory"]) > len(loose["trajectory"])


@pytest.mark.parametrize(
    "settings, match",
    [
        ({"bits": [4, 8]}, "widest first"),
        ({"bits": [8, 8, 4]}, "widest first"),
        ({"bits": [8, 1]}, "integer from 2 to 8"),
        ({"budget_w": 3, "bits": [8, 4]}, "outside"),
        ({"budget_a": "low"}, "number of bits"),
        ({"max_images": 0}, "max_images"),
    ],
)
def test_bad_greedy_mp_settings(settings, match):
    with pytest.raises(VitqError, match=match):
        load_recipe({"name": "x", "stages": ["calibrate", {"greedy_mp": settings}]})


def test_greedy_mp_without_a_budget_says_so():
    with pytest.raises(VitqError, match="--budget"):
        quantize(tiny_vit(), "mptq-vit-mp", batches(), progress=False)


def test_budget_through_the_cli(checkpoint, image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["quantize", str(checkpoint), "--recipe", "mptq-vit-mp", "--budget", "w6a6", "--calib", str(image_folder),
            "--num-calib", "8", "--eval", str(image_folder), "--out", str(out), "--device", "cpu", "--quiet"]
    assert main(args) == 0, capsys.readouterr().err
    plan = json.loads((out / "plan.json").read_text())
    assert plan["meta"]["greedy_mp"]["avg_w"] <= 6 and plan["meta"]["greedy_mp"]["avg_a"] <= 6
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["budget"] == "w6a6"
    eval_out = tmp_path / "eval.json"
    assert main(["eval", str(checkpoint), "--plan", str(out), "--eval", str(image_folder), "--out", str(eval_out),
                 "--device", "cpu", "--quiet"]) == 0
    assert json.loads(eval_out.read_text())["quant_top1"] == metrics["quant_top1"]
    bad = ["quantize", str(checkpoint), "--recipe", "omse", "--budget", "w4a4", "--calib", str(image_folder),
           "--out", str(tmp_path / "bad"), "--device", "cpu", "--quiet"]
    assert main(bad) == 2
    assert "greedy_mp stage" in capsys.readouterr().err
