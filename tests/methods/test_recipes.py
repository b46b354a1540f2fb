import pytest

from vitq.errors import VitqError
from vitq.recipes import RECIPES, Recipe, load_recipe


@pytest.mark.parametrize("name", ["minmax", "percentile", "omse"])
def test_builtin_recipes_load_and_roundtrip(name):
    recipe = load_recipe(name)
    assert recipe.name == name
    assert Recipe.from_dict(recipe.to_dict()) == recipe


def test_registry_lists_builtins():
    assert {"minmax", "percentile", "omse"} <= set(RECIPES.names())


@pytest.mark.parametrize(
    "text, match",
    [
        ("name: x\nweigths: {observer: minmax}\n", "unknown key"),
        ("name: x\nweights: {observer: minmax, bits: 4}\n", "unknown key"),
        ("name: x\nactivations: {observer: nope}\n", "unknown observer"),
        ("name: x\nactivations: {observer: omse, settings: {steps: 5, foo: 1}}\n", "no setting"),
        ("name: x\nstages: [calibrate, fly]\n", "unknown stage"),
        ("name: x\nweights: [1, 2]\n", "mapping"),
        ("weights: {observer: [unclosed\n", "not valid YAML"),
        ("weights: {observer: minmax}\nstages: [calibrate]\n", "needs a name"),
        ("- calibrate\n", "a recipe is a mapping"),
        ("name: x\nweights: {observer: minmax, symmetric_min_bits: 1}\n", "symmetric_min_bits"),
        ("name: x\nweights: {observer: minmax, symmetric_min_bits: true}\n", "symmetric_min_bits"),
    ],
)
def test_bad_recipe_files(tmp_path, text, match):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(VitqError, match=match):
        load_recipe(str(path))


def test_unknown_recipe_name():
    with pytest.raises(VitqError, match="unknown recipe 'omsee'"):
        load_recipe("omsee")


def test_every_stage_has_a_bit_width_gate_and_settings_by_bit_width():
    """The framework's gate (``min_w_bits`` ... ``max_a_bits``) and ``by_bits`` apply to any stage:
    outside the gate the stage is skipped and the plan says why; at a ``by_bits`` bit-width its
    settings are the replaced ones; both survive the recipe's round trip and ``--set``."""
    import timm
    import torch

    from vitq.api import quantize

    torch.manual_seed(0)
    model = timm.create_model("test_vit", img_size=32, patch_size=8, num_classes=10).eval()
    data = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))]
    spec = {"name": "t", "stages": ["calibrate", {"gptq": {"damp": 0.01, "max_w_bits": 6,
                                                           "by_bits": {"w4a8": {"damp": 0.1}, "w8a8": {"max_w_bits": 8}}}}]}
    recipe = load_recipe(spec)
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    written = recipe.to_dict()["stages"][1]["gptq"]
    assert written["max_w_bits"] == 6 and written["by_bits"] == spec["stages"][1]["gptq"]["by_bits"]
    assert "min_w_bits" not in written  # the gate's defaults are not written out

    plain = quantize(model, load_recipe({"name": "p", "stages": ["calibrate"]}), data, w_bits=7, a_bits=8,
                     progress=False)
    gated = quantize(model, recipe, data, w_bits=7, a_bits=8, progress=False)
    assert gated.plan.meta["gptq"]["skipped"] == "w_bits 7 > 6"
    assert gated.plan.meta["skipped_stages"] == {"gptq": "w_bits 7 > 6"}
    x = data[0]
    with torch.no_grad():
        assert torch.equal(gated.model(x), plain.model(x))
    at4 = quantize(model, recipe, data, w_bits=4, a_bits=8, progress=False)
    assert at4.plan.meta["gptq"]["damp"] == 0.1 and at4.plan.meta["by_bits"] == {"gptq": "w4a8"}
    assert "skipped" not in at4.plan.meta["gptq"]
    opened = quantize(model, recipe, data, w_bits=8, a_bits=8, progress=False)  # by_bits opens the gate there
    assert "skipped" not in opened.plan.meta["gptq"] and opened.plan.meta["gptq"]["damp"] == 0.01
    at6 = quantize(model, recipe, data, w_bits=6, a_bits=6, progress=False)
    assert at6.plan.meta["gptq"]["damp"] == 0.01 and "by_bits" not in at6.plan.meta

    widened = recipe.with_overrides({"gptq": {"max_w_bits": 8}})
    assert widened.stage("gptq").gate.max_w_bits == 8 and widened.stage("gptq").by_bits == recipe.stage("gptq").by_bits


def test_a_stage_gated_to_real_images_is_skipped_on_generated_ones():
    """``images: real`` skips a stage when the calibration images are generated (``generated=True``, or
    ``data=None``: the data-free path), and says so in the plan; ``images: generated`` the other way."""
    import timm
    import torch

    from vitq.api import quantize

    torch.manual_seed(0)
    model = timm.create_model("test_vit", img_size=32, patch_size=8, num_classes=10).eval()
    data = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))]
    real_only = load_recipe({"name": "t", "stages": ["calibrate", {"gptq": {"images": "real"}}]})
    assert real_only.to_dict()["stages"][1]["gptq"] == {**real_only.stage("gptq").settings.to_dict(), "images": "real"}
    on_real = quantize(model, real_only, data, w_bits=4, a_bits=8, progress=False)
    assert "skipped" not in on_real.plan.meta["gptq"] and "skipped_stages" not in on_real.plan.meta
    on_generated = quantize(model, real_only, data, w_bits=4, a_bits=8, progress=False, generated=True)
    assert on_generated.plan.meta["skipped_stages"] == {"gptq": "generated (data-free) images"}
    plain = quantize(model, load_recipe({"name": "p", "stages": ["calibrate"]}), data, w_bits=4, a_bits=8,
                     progress=False)
    with torch.no_grad():
        assert torch.equal(on_generated.model(data[0]), plain.model(data[0]))
        assert not torch.equal(on_real.model(data[0]), plain.model(data[0]))
    data_free = quantize(model, real_only, None, data_free="gaussian", num_images=2, w_bits=4, a_bits=8,
                         progress=False)
    assert data_free.plan.meta["skipped_stages"] == {"gptq": "generated (data-free) images"}
    generated_only = load_recipe({"name": "t", "stages": ["calibrate", {"gptq": {"images": "generated"}}]})
    assert quantize(model, generated_only, data, w_bits=4, a_bits=8, progress=False).plan.meta["skipped_stages"] \
        == {"gptq": "real images"}


@pytest.mark.parametrize("settings, match", [
    ({"max_a_bits": 9}, "gptq.max_a_bits must be an integer from 2 to 8"),
    ({"min_a_bits": 6, "max_a_bits": 4}, "min_a_bits .6. is above max_a_bits .4."),
    ({"by_bits": {"w4": {}}}, "wXaY"),
    ({"by_bits": {"w4a4": {"damp": 0}}}, "by_bits.w4a4.*damp"),
    ({"by_bits": {"w4a4": {"min_w_bits": 1}}}, "by_bits.w4a4.*min_w_bits"),
    ({"by_bits": {"w4a4": {"by_bits": {}}}}, "cannot nest"),
    ({"dampp": 0.1}, "unknown key.*and for every stage: min_w_bits, max_w_bits, min_a_bits, max_a_bits, images, by_bits"),
    ({"images": "synthetic"}, "gptq.images must be one of any, real, generated"),
])
def test_bad_gates_and_by_bits_are_refused_by_name(settings, match):
    with pytest.raises(VitqError, match=match):
        load_recipe({"name": "x", "stages": ["calibrate", {"gptq": settings}]})


def test_symmetric_min_bits_makes_the_weight_grid_symmetric_from_that_width_up():
    import timm
    import torch

    import vitq
    from vitq.models import iter_quantizers

    torch.manual_seed(0)
    model = timm.create_model("test_vit", img_size=32, patch_size=8)
    recipe = {"name": "t", "weights": {"observer": "minmax", "symmetric": False, "symmetric_min_bits": 8},
              "activations": {"observer": "minmax"}, "stages": ["calibrate"]}
    for bits, symmetric in ((8, True), (6, False)):
        q = vitq.quantize(model, recipe, [torch.randn(4, 3, 32, 32)], w_bits=bits, a_bits=8, progress=False).model
        weights = [qz for name, qz in iter_quantizers(q) if qz.role == "weight"]
        assert len(weights) == 26
        assert all(qz.spec.symmetric is symmetric for qz in weights)
        assert all(bool((qz.zero_point == 0).all()) is symmetric for qz in weights)
    assert load_recipe("recommended-int").weights.symmetric_at(8)
    assert not load_recipe("recommended-int").weights.symmetric_at(4)


def test_symmetric_roles_puts_q_k_and_v_on_signed_grids_and_the_plan_keeps_them(tmp_path):
    import timm
    import torch

    import vitq
    from vitq.models import iter_quantizers

    torch.manual_seed(0)
    model = timm.create_model("test_vit", img_size=32, patch_size=8)
    recipe = {"name": "t", "activations": {"observer": "minmax", "symmetric_roles": ["attn_qkv"]},
              "stages": ["calibrate"]}
    result = vitq.quantize(model, recipe, [torch.randn(4, 3, 32, 32) * 3 + 1], w_bits=8, a_bits=6, progress=False)
    points = {name: qz for name, qz in iter_quantizers(result.model) if qz.role != "weight" and qz.spec.enabled}
    qkv = {n: qz for n, qz in points.items() if qz.role == "attn_qkv"}
    assert len(qkv) == 18  # q, k and v of 6 blocks
    for qz in qkv.values():
        assert qz.spec.symmetric and qz.spec.qrange == (-32, 31) and bool((qz.zero_point == 0).all())
    others = [qz for n, qz in points.items() if n not in qkv and qz.zero_point is not None]
    assert others and not any(qz.spec.symmetric for qz in others)
    assert any(bool((qz.zero_point != 0).any()) for qz in others)
    path = result.plan.save(tmp_path / "run")
    reloaded = dict(iter_quantizers(vitq.apply_plan(model, vitq.Plan.load(path))))
    assert all(reloaded[n].spec == qz.spec and torch.equal(reloaded[n].scale, qz.scale) for n, qz in qkv.items())


@pytest.mark.parametrize("roles, match", [
    (["attn_probs"], "never negative"),
    (["weight"], "activation roles"),
    (["qkv"], "from act, attn_qkv, attn_scores, norm_input"),
    ("attn_qkv", "e.g. \\[attn_qkv\\]"),
])
def test_bad_symmetric_roles_are_refused_by_name(roles, match):
    with pytest.raises(VitqError, match=match):
        load_recipe({"name": "x", "activations": {"observer": "minmax", "symmetric_roles": roles}})


def test_symmetric_roles_is_an_activation_setting():
    with pytest.raises(VitqError, match="'symmetric_roles' is an activation setting"):
        load_recipe({"name": "x", "weights": {"observer": "minmax", "symmetric_roles": ["act"]}})


def test_activation_by_bits_changes_the_grids_at_that_bit_width_only():
    import timm
    import torch

    import vitq
    from vitq.models import iter_quantizers

    torch.manual_seed(0)
    model = timm.create_model("test_vit", img_size=32, patch_size=8)
    recipe = load_recipe({"name": "t", "stages": ["calibrate"], "activations": {
        "observer": "minmax", "by_bits": {"w6a6": {"symmetric_roles": ["attn_qkv"]}}}})
    assert recipe.activations.at_bits(6, 6).symmetric_roles == ("attn_qkv",)
    for (w, a), symmetric in (((6, 6), True), ((4, 8), False)):
        q = vitq.quantize(model, recipe, [torch.randn(4, 3, 32, 32)], w_bits=w, a_bits=a, progress=False).model
        qkv = [qz for _, qz in iter_quantizers(q) if qz.role == "attn_qkv"]
        assert len(qkv) == 18 and all(qz.spec.symmetric is symmetric for qz in qkv)


@pytest.mark.parametrize("by_bits, match", [
    ({"w9a9": {"symmetric": True}}, "'w9a9' must be wXaY"),
    ({"w6a6": {"symetric": True}}, r"by_bits.w6a6: unknown key\(s\) \['symetric'\]"),
    ({"w6a6": {"symmetric_roles": ["attn_probs"]}}, "by_bits.w6a6: 'symmetric_roles'"),
    ({"w6a6": {"by_bits": {}}}, "cannot nest"),
    ([1], "'by_bits' maps wXaY"),
])
def test_bad_activation_by_bits_is_refused_by_name(by_bits, match):
    with pytest.raises(VitqError, match=match):
        load_recipe({"name": "x", "activations": {"observer": "minmax", "by_bits": by_bits}})
