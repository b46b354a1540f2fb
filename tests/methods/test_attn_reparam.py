"""The attention reparameterisation: exact in float, balances q against k and equalises v's
channels, lowers the error of a model with outlier channels, and its plan reproduces the model."""
import pytest
import torch

from conftest import tiny_vit
from test_repq_gptq import MODELS, batches, recipe  # the same tiny models, images and percentile-MSE recipes
from vitq.api import quantize
from vitq.errors import VitqError
from vitq.methods import apply_plan
from vitq.methods.attn_reparam import AttnReparamSettings
from vitq.models import iter_quantizers


def qkv_amax(model, x, name="blocks.0.attn.qkv"):
    out = []
    hook = model.get_submodule(name).register_forward_hook(lambda m, a, o: out.append(o))
    with torch.no_grad():
        model(x)
    hook.remove()
    return out[0].abs().reshape(-1, out[0].shape[-1]).amax(0)


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_attn_reparam_is_exact_in_float_and_balances_the_channels(family):
    model = MODELS[family]()
    data = batches()
    x = torch.cat(data)
    result = quantize(model, recipe("attn_reparam", "calibrate"), data, w_bits=8, a_bits=8, progress=False)
    assert result.plan.meta["attn_reparam"]["blocks"] > 0
    for _, q in iter_quantizers(result.model):
        q.enabled = False
    with torch.no_grad():
        assert torch.allclose(result.model(x), model(x), atol=1e-4, rtol=0)
    name = "blocks.0.attn.qkv" if family == "vit" else "layers.0.blocks.0.attn.qkv"
    before, after = qkv_amax(model, x, name), qkv_amax(result.model, x, name)
    dim = before.numel() // 3
    # q and k share each channel's range: both reach the geometric mean of their maxima
    assert torch.allclose(after[:dim], after[dim:2 * dim], rtol=1e-4)
    assert torch.allclose(after[:dim], (before[:dim] * before[dim:2 * dim]).sqrt(), rtol=1e-4)
    # every channel of v spans the mean range
    assert torch.allclose(after[2 * dim:], before[2 * dim:].mean().expand(dim), rtol=1e-4)


def test_attn_reparam_lowers_the_error_of_outlier_channels_and_its_plan_reproduces(tmp_path):
    """A model whose k and v have a few wide channels (q and the projection compensate, so the float
    function is the same): with per-tensor 4-bit q, k, v the reparameterisation undoes the spread."""
    model = tiny_vit()
    with torch.no_grad():
        for block in model.blocks:
            dim = block.attn.qkv.out_features // 3
            rows = torch.ones(3 * dim)
            rows[dim:dim + 3], rows[:3] = 20.0, 1 / 20.0  # k channels 0-2 wide, q's narrow
            rows[2 * dim + 5:2 * dim + 7] = 15.0  # two wide channels of v ...
            block.attn.qkv.weight.mul_(rows[:, None])
            block.attn.qkv.bias.mul_(rows)
            block.attn.proj.weight[:, 5:7].div_(15.0)  # ... that the projection scales back
    data = batches()
    x = torch.cat(data)
    with torch.no_grad():
        reference = model(x)
    errors = {}
    for stages in (("calibrate",), ("attn_reparam", "calibrate")):
        result = quantize(model, recipe(*stages), data, w_bits=8, a_bits=4, progress=False)
        with torch.no_grad():
            out = result.model(x)
        errors[stages[0]] = (out - reference).pow(2).mean().item()
        if stages[0] == "attn_reparam":
            result.plan.save(tmp_path / "plan")
            again = apply_plan(model, type(result.plan).load(tmp_path / "plan"))
            with torch.no_grad():
                assert torch.equal(again(x), out)
    assert errors["attn_reparam"] < 0.5 * errors["calibrate"]


def test_attn_reparam_settings_and_order():
    for bad in ({"qk_alpha": 1.5}, {"v_strength": -0.1}, {"qk": "yes"}, {"v_strength": True}):
        with pytest.raises(VitqError, match="attn_reparam"):
            AttnReparamSettings.from_dict(bad, "attn_reparam")
    with pytest.raises(VitqError, match="before 'calibrate'"):
        quantize(tiny_vit(), recipe("calibrate", "attn_reparam"), batches(), progress=False)
