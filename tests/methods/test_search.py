"""The evolutionary search: engine, fitness functions, the search stage, resume and recipes."""
from __future__ import annotations

import math

import pytest
import torch

import vitq
from vitq.errors import VitqError
from vitq.methods.plan import Plan
from vitq.methods.fitness import FITNESS, infonce_loss, kl_loss, local_contrastive_loss, mse_loss, register_fitness
from vitq.methods.search import (
    Evolution,
    SearchSettings,
    block_units,
    layer_units,
    mutate_absolute,
    mutate_relative,
)
from vitq.recipes import load_recipe

from conftest import IMG, tiny_swin, tiny_vit


# -- engine -----------------------------------------------------------------------------------------
def sphere(x: torch.Tensor) -> float:
    return float(((x - 0.3) ** 2).sum())


def run_engine(seed: int, steps: int = 150, **kwargs) -> Evolution:
    x0 = torch.ones(8)
    evo = Evolution(x0, sphere(x0), radius=0.05, generator=torch.Generator().manual_seed(seed), **kwargs)
    for _ in range(steps):
        child = evo.ask()
        evo.tell(child, sphere(child))
    return evo


@pytest.mark.parametrize("kwargs", [{}, {"crossover": True}, {"mutation": "relative"}])
def test_engine_improves_a_toy_objective(kwargs):
    evo = run_engine(0, **kwargs)
    assert evo.best[1] < 0.25 * sphere(torch.ones(8))
    assert evo.evaluations == 150
    assert len(evo.members) == 15
    fitness = [f for _, f in evo.members]
    assert fitness == sorted(fitness)


def test_engine_is_seeded():
    a, b, c = run_engine(3), run_engine(3), run_engine(4)
    assert torch.equal(a.best[0], b.best[0]) and a.best[1] == b.best[1]
    assert not torch.equal(a.best[0], c.best[0])


def test_replace_the_worst_keeps_the_best_and_drops_non_finite():
    evo = Evolution(torch.zeros(2), 5.0, population=3, tournament=2)
    evo.tell(torch.ones(2), 1.0)
    assert [f for _, f in evo.members] == [1.0, 5.0, 5.0]
    evo.tell(torch.ones(2) * 2, float("nan"))  # counts as worst: dropped at once
    assert [f for _, f in evo.members] == [1.0, 5.0, 5.0]
    evo.tell(torch.ones(2) * 3, 0.5)
    assert [f for _, f in evo.members] == [0.5, 1.0, 5.0]


def test_tournament_of_the_whole_population_always_picks_the_best():
    evo = Evolution(torch.zeros(1), 9.0, population=4, tournament=200, radius=1e-9)
    evo.tell(torch.full((1,), 7.0), 1.0)
    for _ in range(5):
        assert abs(float(evo.ask()) - 7.0) < 1e-6


def test_mutations_stay_positive_and_within_the_radius():
    g = torch.Generator().manual_seed(0)
    x = torch.full((1000,), 1e-4)
    y = mutate_absolute(x, 1e-3, g)
    assert (y > 0).all() and (y <= 1e-4 + 1e-3 + 1e-9).all()
    z = mutate_relative(torch.full((1000,), 2.0), 0.1, g)
    assert ((z >= 1.8 - 1e-6) & (z <= 2.2 + 1e-6)).all()


def test_engine_rejects_bad_input():
    with pytest.raises(VitqError, match="not finite"):
        Evolution(torch.zeros(1), float("inf"))
    with pytest.raises(VitqError, match="unknown mutation"):
        Evolution(torch.zeros(1), 0.0, mutation="gaussian")


# -- fitness functions ------------------------------------------------------------------------------
def test_infonce_exact_values():
    q = torch.eye(3)
    assert float(infonce_loss(q, q, temperature=1.0)) == pytest.approx(2 * math.log((math.e + 2) / math.e), abs=1e-6)
    # scale invariance (cosine) and 2T factor
    assert float(infonce_loss(5 * q, q, temperature=2.0)) == pytest.approx(
        4 * math.log((math.exp(0.5) + 2) / math.exp(0.5)), abs=1e-6)
    # a quantized output that matches the wrong image is worse
    assert float(infonce_loss(q[[1, 0, 2]], q, 1.0)) > float(infonce_loss(q, q, 1.0))


def test_local_contrastive_exact_values():
    x = torch.eye(3).unsqueeze(0)  # one image, three orthogonal tokens
    expected = -math.log(math.exp(1 / 0.5) / (math.exp(1 / 0.5) + 2))
    assert float(local_contrastive_loss(x, x, 0.5)) == pytest.approx(expected, abs=1e-6)
    # token grids [B, h, w, C] are flattened to tokens; batch images do not mix
    grid = torch.eye(4).reshape(1, 2, 2, 4).repeat(2, 1, 1, 1)
    assert float(local_contrastive_loss(grid, grid, 1.0)) == pytest.approx(
        -math.log(math.e / (math.e + 3)), abs=1e-6)
    with pytest.raises(VitqError, match="token outputs"):
        local_contrastive_loss(torch.ones(2, 3), torch.ones(2, 3))


def test_mse_and_kl_exact_values():
    a, b = torch.tensor([[1.0, 2.0]]), torch.tensor([[2.0, 4.0]])
    assert float(mse_loss(a, b)) == pytest.approx(2.5)
    p = torch.softmax(b, -1)
    expected = float((p * (p.log() - torch.log_softmax(a, -1))).sum())
    assert float(kl_loss(a, b)) == pytest.approx(expected, abs=1e-6)
    assert float(kl_loss(a, a)) == pytest.approx(0.0, abs=1e-7)
    assert set(FITNESS.names()) == {"infonce", "kl", "local_contrastive", "mse"}


# -- the search stage -------------------------------------------------------------------------------
def calib_images(n: int = 12, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(n, 3, IMG, IMG)


def cptv(**search) -> vitq.Recipe:
    base = {"passes": 2, "batch_size": 6, "radius": 0.01}
    base.update(search)
    return load_recipe("cpt-v").with_overrides({"search": base})


def quantize(recipe, seed=0, model=None, **kwargs):
    model = model if model is not None else tiny_vit()
    return vitq.quantize(model, recipe, [calib_images()], w_bits=3, a_bits=8, seed=seed, progress=False, **kwargs)


def scales(plan: Plan):
    return {k: v for k, v in plan.tensors.items() if k.endswith(".scale")}


def test_cptv_search_lowers_its_fitness_and_changes_only_attention_weight_scales():
    searched = quantize(cptv())
    base = load_recipe("cpt-v")
    plain = quantize(vitq.Recipe(name="plain", weights=base.weights, activations=base.activations))
    record = searched.record["search"]
    assert record["last_fitness"] < record["first_fitness"]  # strictly: a search that changes nothing fails
    blocks = len(block_units(searched.model, ["attn_weights"]))
    assert record["evaluations"] == 2 * blocks * (3 + 1)  # passes × blocks × (start + cycles)
    changed = {k for k, v in scales(searched.plan).items() if not torch.equal(v, scales(plain.plan)[k])}
    assert changed, "the search changed no scale"
    assert all(".attn." in k and k.endswith("weight_quantizer.scale") for k in changed), changed
    assert searched.plan.meta["search"]["fitness"] == "infonce"


def test_search_is_seeded():
    a, b, c = quantize(cptv(), seed=5), quantize(cptv(), seed=5), quantize(cptv(), seed=6)
    assert all(torch.equal(v, scales(b.plan)[k]) for k, v in scales(a.plan).items())
    assert any(not torch.equal(v, scales(c.plan)[k]) for k, v in scales(a.plan).items())


def test_resume_gives_the_uninterrupted_result(tmp_path):
    full = quantize(cptv())
    quantize(cptv(max_units=3), workdir=tmp_path)
    assert (tmp_path / "search_state.pt").exists()
    resumed = quantize(cptv(), workdir=tmp_path, resume=True)
    assert resumed.record["search"]["evaluations"] == full.record["search"]["evaluations"]
    assert all(torch.equal(v, scales(resumed.plan)[k]) for k, v in scales(full.plan).items())


def test_resume_refuses_other_settings(tmp_path):
    quantize(cptv(max_units=1), workdir=tmp_path)
    with pytest.raises(VitqError, match="other settings"):
        quantize(cptv(cycles=5), workdir=tmp_path, resume=True)


def test_holdout_selects_on_held_out_images():
    result = quantize(cptv(holdout=0.5, batch_size=3))
    record = result.record["search"]
    assert record["holdout_images"] == 6 and record["images"] == 6
    ends = [p for p in result.record["search_curve"] if p.get("event") == "end"]
    assert ends and all("holdout" in p for p in ends)
    best = min(range(len(ends)), key=lambda i: ends[i]["holdout"])  # the first of the lowest
    assert record["selected"] == f"after {best + 1} unit searches (held-out infonce {ends[best]['holdout']:.4f})"


def test_search_uses_only_the_first_max_images():
    record = quantize(cptv(max_images=6, passes=1)).record["search"]
    assert record["images"] == 6


def test_search_extends_to_mlp_and_activation_scales():
    result = quantize(cptv(targets=["attn_weights", "mlp_weights", "activations"], passes=1))
    units = block_units(result.model, ["attn_weights", "mlp_weights", "activations"])
    names = {n for u in units for n, _ in u.quantizers}
    assert any(".mlp." in n for n in names) and any("input_quantizer" in n for n in names)


def test_start_plan_skips_calibration_and_keeps_other_scales():
    start = quantize("omse")
    improved = vitq.quantize(tiny_vit(), cptv(), [calib_images()], start_plan=start.plan, progress=False)
    assert improved.plan.meta["w_bits"] == 3 and improved.plan.meta["start_plan"]["skipped_stages"] == ["calibrate"]
    for key, value in scales(start.plan).items():
        if (".attn.qkv." in key or ".attn.proj." in key) and "weight_quantizer" in key:
            continue
        assert torch.equal(value, scales(improved.plan)[key]), key


def test_layerwise_local_search_with_refresh_on_swin():
    calls = []

    def refresh(qmodel, batches, step):
        calls.append(step)
        return [b + 0.01 for b in batches]

    recipe = load_recipe("clamp-vit").with_overrides(
        {"search": {"passes": 1, "cycles": 2, "refresh_every": 3, "batch_size": 6}})
    result = vitq.quantize(tiny_swin(), recipe, [calib_images()], w_bits=4, a_bits=8, refresh=refresh,
                           progress=False)
    n_layers = len(layer_units(result.model))
    assert result.record["search"]["units"] == n_layers
    assert calls == list(range(3, 2 * n_layers + 1, 3))
    assert len(result.record["search"]["refreshes"]) == len(calls)
    assert sum(p.get("event") == "refresh" for p in result.record["search_curve"]) == len(calls)


@pytest.mark.parametrize("fitness", ["mse", "kl"])
def test_other_fitness_functions_run(fitness):
    result = quantize(cptv(fitness=fitness, passes=1, temperature=1.0))
    assert result.record["search"]["last_fitness"] < result.record["search"]["first_fitness"]


def test_the_search_repairs_a_planted_bad_scale():
    """A weight scale made 4× too small (most weights clipped) is moved back toward its calibrated
    value: a search that does not search (or keeps its start) fails this."""
    model = tiny_vit()
    plain = quantize(load_recipe("cpt-v").with_overrides({"search": {"passes": 1}}), model=model)
    plan = Plan(dict(plain.plan.meta), dict(plain.plan.rules), dict(plain.plan.tensors))
    plan.meta.pop("search", None)
    key = "blocks.0.attn.qkv.weight_quantizer.scale"
    good = plan.tensors[key].clone()
    plan.tensors[key] = good * 0.25
    searched = quantize(cptv(passes=3, radius=0.1), model=model, start_plan=plan)
    ratio = float((searched.plan.tensors[key] / good).mean())
    assert ratio > 0.3, f"the planted 0.25x scale stayed at {ratio:.2f}x"


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"speed": 2}, "unknown key"),
        ({"units": "heads"}, "units"),
        ({"targets": ["norms"]}, "targets"),
        ({"targets": []}, "targets"),
        ({"fitness": "hinge"}, "unknown fitness"),
        ({"population": 0}, "population"),
        ({"holdout": 1.0}, "holdout"),
        ({"radius": -1}, "radius"),
        ({"order": "random"}, "order"),
    ],
)
def test_bad_search_settings(settings, message):
    with pytest.raises(VitqError, match=message):
        load_recipe("cpt-v").with_overrides({"search": settings})


@pytest.fixture
def registered_fitness():
    """Register a fitness for one test (the registry is global) and take it out afterwards."""
    added = []

    def register(name, **kwargs):
        added.append(name)
        return register_fitness(name, **kwargs)

    yield register
    for name in added:
        FITNESS._items.pop(name, None)


def test_a_new_fitness_joins_by_registering(registered_fitness):
    """A unit-scope fitness defined outside vitq runs layer-wise and is judged on held-out images by the
    model-scope fitness it names: the search reads both from the registry entry, not from the name."""
    calls = []

    @registered_fitness("local_l1", scope="unit", judge=("kl", 1.0))
    def local_l1(quant, float_out, temperature=1.0):
        calls.append(tuple(quant.shape))
        return (quant.float() - float_out.float()).abs().mean()

    recipe = load_recipe("cpt-v").with_overrides({"search": {
        "units": "layers", "fitness": "local_l1", "passes": 1, "cycles": 2, "max_units": 2, "holdout": 0.5,
        "batch_size": 3}})
    record = quantize(recipe).record["search"]
    assert calls and all(len(shape) == 3 for shape in calls)  # token outputs of one layer, not logits
    assert "held-out kl" in record["selected"]
    with pytest.raises(VitqError, match="local_l1 compares one layer's output: use units: layers"):
        quantize(cptv(fitness="local_l1"))
    with pytest.raises(ValueError, match="judges held-out images"):
        registered_fitness("no_judge", scope="unit")(local_l1)


def test_local_fitness_needs_layer_units():
    with pytest.raises(VitqError, match="units: layers"):
        quantize(cptv(fitness="local_contrastive", temperature=0.1))


def test_search_stage_unknown_to_a_recipe():
    with pytest.raises(VitqError, match="has no stage 'search'"):
        load_recipe("omse").with_overrides({"search": {"passes": 1}})


def test_settings_round_trip():
    s = SearchSettings(targets=["attn_weights", "mlp_weights"])
    assert SearchSettings.from_dict(s.to_dict(), "x") == s
    assert load_recipe(load_recipe("clamp-vit").to_dict()) == load_recipe("clamp-vit")


@pytest.mark.parametrize("make", [tiny_vit, tiny_swin], ids=["vit", "swin"])
@pytest.mark.parametrize("fitness, units", [("infonce", "blocks"), ("local_contrastive", "layers")])
def test_fitness_from_the_cached_block_input_equals_a_full_forward(make, fitness, units):
    from vitq.methods.search import _Objective

    model = make()
    qmodel = quantize("omse", model=model).model
    settings = SearchSettings(units=units, fitness=fitness, output_weight=0.5, temperature=0.2)
    objective = _Objective(settings, model, qmodel, list(calib_images().split(6)), torch.device("cpu"))
    all_units = block_units(qmodel, ["attn_weights"]) if units == "blocks" else layer_units(qmodel)
    for unit in (all_units[0], all_units[-1]):
        objective.focus(unit)
        cached = objective()
        full_logits = [qmodel(b) for b in objective.batches]
        if fitness == "infonce":
            full = sum(float(infonce_loss(q, f, 0.2)) for q, f in zip(full_logits, objective.float_logits)) / 2
        else:
            full = 0.0
            for i, b in enumerate(objective.batches):
                out = []
                h = qmodel.get_submodule(unit.output_name).register_forward_hook(lambda m, a, o: out.append(o))
                logits = qmodel(b)
                h.remove()
                full += float(local_contrastive_loss(out[0], objective.float_outputs[i], 0.2)
                              + 0.5 * kl_loss(logits, objective.float_logits[i]))
            full /= 2
        assert cached == pytest.approx(full, rel=1e-5, abs=1e-6)
