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
