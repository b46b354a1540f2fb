"""The library does what the CLI does: ``vitq.quantize(model, recipe, data=None)`` synthesises its
calibration images and, for CLAMP-ViT, refreshes them during the search."""
import dataclasses

import pytest
import torch

import vitq
from conftest import tiny_vit
from vitq.errors import VitqError
from vitq.recipes import load_recipe


def test_quantize_data_free_from_python_refreshes_the_images():
    model = tiny_vit()
    recipe = load_recipe("clamp-vit").with_overrides({"search": {"passes": 1, "cycles": 2, "refresh_every": 4,
                                                                 "batch_size": 4}})
    recipe = dataclasses.replace(recipe, data_free=dataclasses.replace(recipe.data_free, refresh_steps=2))
    messages = []
    result = vitq.quantize(model, recipe, data=None, w_bits=4, a_bits=8, num_images=4, gen_settings={"iterations": 2},
                           batch_size=4, progress=False, seed=0, log=lambda *a: messages.append(a[0] % a[1:]))
    made = vitq.synthesize(model, recipe, num_images=4, settings={"iterations": 2}, progress=False, seed=0)
    assert result.synthetic is not None and result.synthetic.images.shape == made.result.images.shape
    # the images the run ends with are the refreshed ones, not the first generation
    assert not torch.equal(result.synthetic.images, made.result.images)
    assert any("refreshed the 4 synthetic images" in m for m in messages)
    assert result.record["search"]["refreshes"]
    assert result.plan.meta["calibration"] == {"data_free": "clamp", "num": 4, "seed": 0}
    assert result.record["data_free"]["generator"] == "clamp"


def test_quantize_data_free_with_another_generator_and_no_refresh():
    model = tiny_vit()
    result = vitq.quantize(model, "omse", data=None, data_free="gaussian", num_images=3, progress=False)
    assert result.synthetic.images.shape[0] == 3
    assert result.plan.meta["calibration"]["data_free"] == "gaussian"


def test_data_free_options_need_data_none():
    with pytest.raises(VitqError, match="data=None"):
        vitq.quantize(tiny_vit(), "omse", [torch.randn(2, 3, 32, 32)], data_free="clamp", progress=False)
    with pytest.raises(VitqError, match="num_images"):
        vitq.synthesize(tiny_vit(), "omse", num_images=0, progress=False)
