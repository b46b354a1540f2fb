"""Quantizers off ⇒ the wrapped model computes what the float model computes, for every family."""
import pytest
import timm
import torch
from timm.layers.attention import Attention
from timm.models.swin_transformer import WindowAttention

from conftest import tiny_deit, tiny_swin, tiny_vit
from vitq.methods import prepare
from vitq.models import iter_quantizers
from vitq.nn import QuantAttention, QuantLayerNorm, QuantLinear, QuantWindowAttention

FAMILIES = {
    "vit": tiny_vit,
    "deit": lambda: tiny_deit(False),
    "deit_distilled": lambda: tiny_deit(True),
    "swin": tiny_swin,
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("protocol", ["p1", "p2"])
def test_disabled_quantizers_reproduce_float_logits(family, protocol, images):
    model = FAMILIES[family]()
    qmodel = prepare(model, protocol=protocol, w_bits=4, a_bits=4)
    for _, q in iter_quantizers(qmodel):
        q.enabled = False
    with torch.no_grad():
        torch.testing.assert_close(qmodel(images), model(images), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_attention_linear_and_norm_is_replaced(family):
    model = FAMILIES[family]()
    qmodel = prepare(model)
    linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert sum(isinstance(m, QuantLinear) for m in qmodel.modules()) == linear
    norms = sum(isinstance(m, torch.nn.LayerNorm) for m in model.modules())
    assert sum(isinstance(m, QuantLayerNorm) for m in qmodel.modules()) == norms
    if family == "swin":
        n_attn = sum(isinstance(m, WindowAttention) for m in model.modules())
        assert sum(isinstance(m, QuantWindowAttention) for m in qmodel.modules()) == n_attn > 0
    else:
        n_attn = sum(isinstance(m, Attention) for m in model.modules())
        assert sum(isinstance(m, QuantAttention) for m in qmodel.modules()) == n_attn > 0


def test_float_model_is_untouched_and_state_dict_keys_kept(vit):
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    qmodel = prepare(vit)
    assert not any(True for _ in iter_quantizers(vit))
    for k, v in vit.state_dict().items():
        assert torch.equal(v, before[k])
    float_keys = set(before)
    assert float_keys <= set(qmodel.state_dict())


def test_quantized_module_is_its_float_module(vit):
    qmodel = prepare(vit)
    attn = qmodel.blocks[0].attn
    assert isinstance(attn, Attention) and isinstance(attn.qkv, torch.nn.Linear)


def test_attention_quantizers_change_the_output(vit, images):
    """The explicit attention path is live: 2-bit q/k/v visibly change the logits."""
    qmodel = prepare(vit, w_bits=8, a_bits=2)
    for _, q in iter_quantizers(qmodel):
        q.enabled = q.role == "attn_qkv"
        if q.enabled:
            q.set_qparams(torch.tensor(0.5), torch.tensor(2.0))
    with torch.no_grad():
        assert (qmodel(images) - vit(images)).abs().max() > 1e-3


def test_unsupported_family_is_refused():
    from vitq.errors import VitqError

    with pytest.raises(VitqError, match="not a supported model family"):
        prepare(timm.create_model("resnet18", num_classes=4))
