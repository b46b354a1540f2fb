"""Model families come from one registry, one file each: vitq finds a family by module type."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from vitq.errors import VitqError
from vitq.models.adapters import _COMMON, ADAPTERS, ModelAdapter, find_adapter
from vitq.nn import QuantLinear

from conftest import tiny_swin, tiny_vit


def test_each_family_is_its_own_file():
    assert set(ADAPTERS.names()) >= {"vit", "swin"}
    for name, cls in ADAPTERS.items():
        assert cls.__module__ == f"vitq.models.families.{name}"
    assert type(find_adapter(tiny_vit())) is ADAPTERS.get("vit")
    assert type(find_adapter(tiny_swin())) is ADAPTERS.get("swin")


class Toy(nn.Module):
    """A model of a family vitq does not know."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x)


@pytest.fixture
def toy_family():
    class ToyAdapter(ModelAdapter):
        family = "toy models (a test)"
        model_types = (Toy,)
        module_map = _COMMON

    ADAPTERS.register("toy")(ToyAdapter)
    yield ToyAdapter
    ADAPTERS._items.pop("toy", None)


def test_a_new_family_joins_by_registering(toy_family):
    with pytest.raises(VitqError, match="toy") as info:  # named among the supported families
        find_adapter(nn.Sequential(nn.Linear(2, 2)))
    assert "toy models (a test)" in str(info.value)
    float_model = Toy()
    adapter = find_adapter(float_model)
    assert type(adapter) is toy_family
    model = adapter.quantize_modules(copy.deepcopy(float_model))
    assert isinstance(model.fc, QuantLinear) and not isinstance(float_model.fc, QuantLinear)
    x = torch.randn(2, 4)
    torch.testing.assert_close(model(x), float_model(x))  # quantizers not enabled yet: the float function
    with pytest.raises(VitqError, match="no feature maps"):
        adapter.feature_channels(model, [0])


def test_unknown_family_refused_with_the_supported_ones():
    with pytest.raises(VitqError, match=r"not a supported model family") as info:
        find_adapter(nn.Sequential(nn.Linear(2, 2)))
    assert "vit: ViT" in str(info.value) and "swin: Swin" in str(info.value)
