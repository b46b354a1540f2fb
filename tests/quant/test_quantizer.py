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


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kind="twin", symmetric=True, granularity="per_channel", axis=0), "per_tensor and symmetric"),
        (dict(kind="twin", symmetric=False), "per_tensor and symmetric"),
        (dict(kind="twin", symmetric=True, ratio_log2=-1), "ratio_log2"),
        (dict(kind="twin_range", symmetric=True), "per_tensor and unsigned"),
        (dict(kind="uniform", ratio_log2=2), "ratio_log2 is a setting"),
        (dict(kind="twin", symmetric=True, ratio_log2=17), "ratio_log2"),
        (dict(kind="uniform", ratio_log2=2), "setting of 'twin'"),
    ],
)
def test_twin_spec_validation(kwargs, match):
    with pytest.raises(VitqError, match=match):
        QuantSpec(**kwargs)


def test_twin_quantizer_module_and_spec_roundtrip():
    spec = QuantSpec("twin", 4, symmetric=True, ratio_log2=3)
    assert spec.qrange == (-7, 7)
    assert QuantSpec.from_dict(spec.to_dict()) == spec
    assert "ratio_log2" not in QuantSpec().to_dict()  # other kinds' plans read as before
    q = Quantizer("act", spec)
    q.set_qparams(torch.tensor(0.5), torch.tensor(0.0))
    assert q(torch.tensor([-0.17, 1.3, 100.0])).tolist() == [-0.1875, 1.5, 3.5]
    assert "twin(m=3)" in repr(q)


def test_omse_observer_sets_twin_positive_scale():
    from vitq.quant.observers import create_observer

    spec = QuantSpec("twin", 8, symmetric=True, ratio_log2=4)
    for name in ("minmax", "omse"):
        obs = create_observer(name, spec)
        obs.observe(torch.tensor([-0.17, 0.0, 0.5, 12.7]))
        scale, zp = obs.qparams()
        assert zp.item() == 0.0
        assert 0 < scale.item() <= 12.7 / 127 + 1e-7
    assert create_observer("minmax", spec).__class__.__name__ == "MinMaxObserver"
