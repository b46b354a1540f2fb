import pytest
import torch

from vitq.errors import VitqError
from vitq.quant.quantizer import Quantizer
from vitq.quant.spec import QuantSpec


def test_disabled_quantizer_is_identity():
    q = Quantizer("act")
    x = torch.randn(3, 4)
    assert q(x) is x


def test_uncalibrated_use_raises():
    q = Quantizer("act", QuantSpec(bits=8))
    with pytest.raises(VitqError, match="before calibration"):
        q(torch.randn(2))


def test_per_channel_broadcast_along_axis():
    q = Quantizer("weight", QuantSpec(bits=8, granularity="per_channel", axis=0, symmetric=True))
    q.set_qparams(torch.tensor([1.0, 0.5]), torch.zeros(2))
    x = torch.tensor([[1.2, -2.6], [1.2, -2.6]])
    assert q(x).tolist() == [[1.0, -3.0], [1.0, -2.5]]


def test_per_token_is_dynamic():
    q = Quantizer("act", QuantSpec(bits=2, granularity="per_token"))
    x = torch.tensor([[0.0, 3.0], [0.0, 30.0]])
    assert q(x).tolist() == [[0.0, 3.0], [0.0, 30.0]]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bits=1), "bits"),
        (dict(bits=4.5), "bits"),
        (dict(kind="log3"), "kind"),
        (dict(granularity="per_row"), "granularity"),
        (dict(kind="ptf"), "per_channel"),
        (dict(kind="log2", symmetric=True), "unsigned"),
    ],
)
def test_spec_validation(kwargs, match):
    with pytest.raises(VitqError, match=match):
        QuantSpec(**kwargs)


def test_spec_dict_roundtrip():
    spec = QuantSpec("ptf", 6, "per_channel", axis=-1)
    assert QuantSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(VitqError, match="unknown"):
        QuantSpec.from_dict({**spec.to_dict(), "bitz": 3})
