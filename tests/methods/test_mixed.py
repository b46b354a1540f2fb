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


def test_budget_from_the_library_as_from_the_cli():
    """``vitq.quantize(..., budget=)`` sets the recipe's allocator like ``--budget`` (here tighter than the
    recipe's own), and a recipe that allocates nothing refuses a budget."""
    via_api = quantize(tiny_vit(), MP, batches(), budget="w4a5", progress=False).record["greedy_mp"]
    by_hand = quantize(tiny_vit(), load_recipe(MP).with_overrides({"greedy_mp": {"budget_w": 4, "budget_a": 5}}),
                       batches(), progress=False).record["greedy_mp"]
    assert (via_api["budget_w"], via_api["budget_a"]) == (4.0, 5.0)
    assert via_api["bits"] == by_hand["bits"]
    with pytest.raises(VitqError, match="greedy_mp stage"):
        quantize(tiny_vit(), "minmax", batches(), budget="w4a4", progress=False)


def test_start_plan_keeps_its_bits_and_refuses_others():
    start = quantize(tiny_vit(), "minmax", batches(), w_bits=6, progress=False).plan
    again = quantize(tiny_vit(), "minmax", batches(), start_plan=start, progress=False)
    assert (again.plan.meta["w_bits"], again.plan.meta["a_bits"], again.plan.meta["protocol"]) == (6, 8, "p1")
    with pytest.raises(VitqError, match=r"w_bits 4 \(--w-bits\) differs from the start plan's 6"):
        quantize(tiny_vit(), "minmax", batches(), w_bits=4, start_plan=start, progress=False)


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


# -- greedy mode, bit statistics, CLAMP-ViT mixed-precision search ---------------------------------
def test_greedy_mode_measures_every_step_on_the_current_allocation():
    recipe = load_recipe(MP).with_overrides({"greedy_mp": {"mode": "greedy", "budget_w": 6, "budget_a": 7,
                                                           "checkpoints": 3}})
    record = quantize(tiny_vit(), recipe, batches(), progress=False).record["greedy_mp"]
    assert record["avg_w"] <= 6 + 1e-9 and record["avg_a"] <= 7 + 1e-9
    assert record["sensitivity"] == {}  # nothing precomputed: each step measured
    points = record["checkpoints"]
    assert [p["step"] for p in points][0] == 0 and points[-1]["step"] == len(record["trajectory"]) - 1
    # the measured damage of the whole trajectory is the KL of the final model
    assert points[-1]["kl"] == pytest.approx(record["base_kl"] + record["trajectory"][-1]["damage"], rel=1e-4, abs=1e-7)
    assert points[0]["kl"] == pytest.approx(record["base_kl"], rel=1e-6)


def test_bit_statistics_recompute_the_budget_arithmetic():
    from vitq.eval import bit_stats

    result = quantize(tiny_vit(), MP, batches(), progress=False)
    record = result.record["greedy_mp"]
    stats = bit_stats(result.model, batches()[0])
    blocks = stats["scopes"]["blocks"]
    assert blocks["w_bits"]["weighted"] == pytest.approx(record["avg_w"], abs=1e-6)
    assert blocks["a_bits"]["weighted"] == pytest.approx(record["avg_a"], abs=1e-6)
    # by hand, from the record's sizes: Σ size·bits / Σ size
    w = [n for n in record["bits"] if n.endswith("weight_quantizer")]
    by_hand = sum(record["sizes"][n] * record["bits"][n] for n in w) / sum(record["sizes"][n] for n in w)
    assert by_hand == pytest.approx(record["avg_w"])
    assert blocks["w_bits"]["unweighted"] == pytest.approx(sum(record["bits"][n] for n in w) / len(w), abs=1e-6)
    layers = {lay["name"]: lay for lay in stats["layers"]}
    fc1 = layers["blocks.0.mlp.fc1"]
    module = result.model.blocks[0].mlp.fc1
    assert fc1["macs"] == fc1["elements"] * module.out_features  # tokens · in · out
    assert fc1["bops"] == fc1["macs"] * fc1["w_bits"] * fc1["a_bits"]
    assert fc1["w_bits"] == record["bits"]["blocks.0.mlp.fc1.weight_quantizer"]
    assert stats["gbops"] < stats["fp_gbops"] and stats["size_bytes"] < stats["fp_size_bytes"]


def clamp_mp(**settings):
    search = {"passes": 2, "cycles": 3, "batch_size": 6, "refresh_every": 0, "budget_w": 4.5, "budget_a": 6, **settings}
    return load_recipe("clamp-vit-mp").with_overrides({"search": search})


def test_clamp_mixed_search_keeps_the_budget_and_is_seeded(tmp_path):
    from vitq.eval import bit_stats

    model = tiny_vit()
    result = quantize(model, clamp_mp(), batches(), w_bits=8, a_bits=8, progress=False, seed=3)
    mixed = result.record["search"]["mixed"]
    assert mixed["avg_w"] <= 4.5 + 1e-9 and mixed["avg_a"] <= 6 + 1e-9 and mixed["over_budget"] == 0
    assert set(mixed["bits"].values()) <= {3, 4, 5, 6, 7, 8}
    assert len(set(mixed["bits"].values())) > 1, "no width ever moved: the search is not mixed"
    for name, bits in mixed["bits"].items():
        assert result.model.get_submodule(name).spec.bits == bits
    blocks = bit_stats(result.model, batches()[0])["scopes"]["blocks"]
    assert blocks["w_bits"]["weighted"] == pytest.approx(mixed["avg_w"], abs=1e-6)
    assert blocks["a_bits"]["weighted"] == pytest.approx(mixed["avg_a"], abs=1e-6)
    # points outside the blocks' linear layers keep the run's widths
    assert result.model.blocks[0].attn.q_quantizer.spec.bits == 8
    again = quantize(model, clamp_mp(), batches(), w_bits=8, a_bits=8, progress=False, seed=3)
    assert again.record["search"]["mixed"]["bits"] == mixed["bits"]
    result.plan.save(tmp_path)
    rebuilt = apply_plan(model, Plan.load(tmp_path))
    x = torch.cat(batches())
    with torch.no_grad():
        assert torch.equal(rebuilt(x), result.model(x))


def test_clamp_mixed_search_resumes_to_the_uninterrupted_widths(tmp_path):
    full = quantize(tiny_vit(), clamp_mp(), batches(), w_bits=8, a_bits=8, progress=False, seed=1)
    quantize(tiny_vit(), clamp_mp(max_units=20), batches(), w_bits=8, a_bits=8, progress=False, seed=1,
             workdir=tmp_path)
    resumed = quantize(tiny_vit(), clamp_mp(), batches(), w_bits=8, a_bits=8, progress=False, seed=1,
                       workdir=tmp_path, resume=True)
    assert resumed.record["search"]["mixed"] == full.record["search"]["mixed"]
    x = torch.cat(batches())
    with torch.no_grad():
        assert torch.equal(resumed.model(x), full.model(x))


def test_clamp_mixed_search_with_a_penalty_and_a_weight_budget_only():
    result = quantize(tiny_vit(), clamp_mp(budget_mode="penalty", penalty=10.0, budget_a=None), batches(),
                      w_bits=8, a_bits=8, progress=False)
    mixed = result.record["search"]["mixed"]
    assert mixed["rejected"] == 0 and mixed["avg_a"] is None
    assert all(n.endswith("weight_quantizer") for n in mixed["bits"])
    assert result.model.blocks[0].mlp.fc1.input_quantizer.spec.bits == 8


@pytest.mark.parametrize(
    "settings, match",
    [
        ({"units": "blocks", "fitness": "infonce"}, "units: layers"),
        ({"mutation": "absolute"}, "mutation: relative"),
        ({"bits": [], "budget_w": 4}, "needs search.bits"),
        ({"budget_w": 2}, "outside"),
        ({"targets": ["attn_weights"]}, "activations"),
        ({"budget_mode": "soft"}, "budget_mode"),
        ({"bit_rate": 2}, "bit_rate"),
        ({"bits": [1, 4]}, "integer from 2 to 8"),
    ],
)
def test_bad_mixed_search_settings(settings, match):
    with pytest.raises(VitqError, match=match):
        clamp_mp(**settings)


def test_mixed_search_without_a_budget_says_so():
    recipe = load_recipe("clamp-vit-mp").with_overrides({"search": {"passes": 1, "refresh_every": 0}})
    with pytest.raises(VitqError, match="--budget"):
        quantize(tiny_vit(), recipe, batches(), progress=False)


def test_clamp_mp_and_greedy_write_bits_and_plots_through_the_cli(checkpoint, image_folder, tmp_path, capsys):
    common = ["--calib", str(image_folder), "--num-calib", "8", "--device", "cpu", "--quiet"]
    out = tmp_path / "clamp"
    assert main(["quantize", str(checkpoint), "--recipe", "clamp-vit-mp", "--budget", "w4.5a6", "--out", str(out),
                 "--set", "search.passes=1", "--set", "search.cycles=2", "--set", "search.refresh_every=0",
                 *common]) == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["search"]["mixed"]["avg_w"] <= 4.5 + 1e-9
    assert metrics["bits"]["scopes"]["blocks"]["w_bits"]["weighted"] == pytest.approx(metrics["search"]["mixed"]["avg_w"])
    assert (out / "bits_per_layer.png").stat().st_size > 0 and (out / "bits.json").exists()
    assert "GBOPs" in (out / "report.md").read_text()
    out = tmp_path / "greedy"
    assert main(["quantize", str(checkpoint), "--recipe", "mptq-vit-mp", "--budget", "w6a6", "--out", str(out),
                 *common]) == 0, capsys.readouterr().err
    record = json.loads((out / "greedy_mp.json").read_text())
    assert record["checkpoints"] and record["trajectory"]
    assert (out / "pareto.png").stat().st_size > 0 and (out / "bits_per_layer.png").exists()
