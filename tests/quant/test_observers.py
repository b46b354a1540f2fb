import pytest
import torch

from vitq.errors import VitqError
from vitq.quant.observers import ObserverConfig, create_observer
from vitq.quant.spec import QuantSpec

PER_TENSOR = QuantSpec("uniform", 8, "per_tensor")


def test_minmax_running_range_and_exact_qparams():
    obs = create_observer("minmax", PER_TENSOR)
    obs.observe(torch.tensor([0.0, 1.0]))
    obs.observe(torch.tensor([-1.0, 0.5]))
    assert (obs.min_val.item(), obs.max_val.item()) == (-1.0, 1.0)
    scale, zp = obs.qparams()
    assert scale.item() == pytest.approx(2.0 / 255)
    assert zp.item() == 127.0  # 1 / (2/255) is 127.4999... in float32


def test_minmax_per_channel_weights():
    spec = QuantSpec("uniform", 4, "per_channel", axis=0, symmetric=True)
    obs = create_observer("minmax", spec)
    obs.observe(torch.tensor([[1.0, -3.0], [0.5, 0.25]]))
    scale, zp = obs.qparams()
    assert scale.tolist() == pytest.approx([3.0 / 7.5, 0.5 / 7.5])
    assert zp.tolist() == [0.0, 0.0]


def test_ema_moves_by_momentum():
    obs = create_observer("ema", PER_TENSOR, momentum=0.5)
    obs.observe(torch.tensor([0.0, 2.0]))
    obs.observe(torch.tensor([0.0, 4.0]))
    assert obs.max_val.item() == 3.0


def test_percentile_clips_outliers():
    x = torch.cat([torch.linspace(0, 1, 1000), torch.tensor([1000.0])])
    obs = create_observer("percentile", PER_TENSOR, percentile=0.99)
    obs.observe(x)
    assert obs.max_val.item() == pytest.approx(0.99, abs=0.01)
    assert obs.min_val.item() == pytest.approx(0.01, abs=0.01)


def test_omse_shrinks_range_under_an_outlier():
    torch.manual_seed(0)
    x = torch.cat([torch.randn(10000), torch.tensor([40.0])])
    spec = QuantSpec("uniform", 4, "per_tensor")
    mm = create_observer("minmax", spec)
    om = create_observer("omse", spec)
    for obs in (mm, om):
        obs.observe(x)

    def mse(obs):
        s, z = obs.qparams()
        q = torch.clamp(torch.round(x / s) + z, 0, 15)
        return ((q - z) * s - x).pow(2).mean().item()

    assert om.qparams()[0].item() < mm.qparams()[0].item()
    assert mse(om) < mse(mm)


def test_omse_never_worse_than_minmax_per_channel():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    w[0, 0] = 10.0
    spec = QuantSpec("uniform", 4, "per_channel", axis=0, symmetric=True)
    mm, om = create_observer("minmax", spec), create_observer("omse", spec)
    mm.observe(w)
    om.observe(w)
    s_mm, _ = mm.qparams()
    s_om, _ = om.qparams()
    assert (s_om <= s_mm + 1e-12).all()
    assert s_om[0] < s_mm[0]


def test_observer_without_data_raises():
    with pytest.raises(VitqError, match="no data"):
        create_observer("minmax", PER_TENSOR).qparams()


def test_nan_is_refused():
    with pytest.raises(VitqError, match="NaN"):
        create_observer("minmax", PER_TENSOR).observe(torch.tensor([float("nan")]))


def test_observer_config_rejects_unknown_settings_and_names():
    with pytest.raises(VitqError, match="no setting"):
        ObserverConfig("omse", settings={"stepz": 3})
    with pytest.raises(VitqError, match="unknown observer 'maxmin'"):
        ObserverConfig("maxmin")
