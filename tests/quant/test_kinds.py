"""Quantizer kinds come from one registry: every behaviour that depends on the kind asks its entry."""
from __future__ import annotations

import math

import pytest
import torch

from vitq.errors import VitqError
from vitq.export._lowering import EMULATED, QDQ, ExportQuantizer
from vitq.export.formats import IntFormat
from vitq.quant.kinds import KINDS, QuantKind
from vitq.quant.observers import OBSERVERS
from vitq.quant.protocol import KIND_CHOICES, PROTOCOLS
from vitq.quant.quantizer import Quantizer
from vitq.quant.spec import QuantSpec


def test_every_kind_a_recipe_can_choose_is_registered():
    choosable = {kind for kinds in KIND_CHOICES.values() for kind in kinds}
    assert choosable <= set(KINDS.names())
    assert {"uniform", "log2", "logsqrt2", "ptf", "twin", "twin_range"} <= set(KINDS.names())


@pytest.mark.parametrize("name", ["log2", "logsqrt2", "ptf", "twin", "twin_range"])
def test_each_kind_states_its_constraints(name):
    kind = KINDS.get(name)
    for granularity in ("per_tensor", "per_channel", "per_token"):
        for symmetric in (False, True):
            ok = granularity in kind.granularities and kind.symmetric in (None, symmetric)
            make = lambda: QuantSpec(name, 6, granularity, symmetric=symmetric)  # noqa: E731
            if ok:
                assert make().kind_entry is kind
            else:
                with pytest.raises(VitqError, match=f"a {name!r} quantizer is"):
                    make()


@pytest.fixture
def pow2_kind():
    """A kind defined outside vitq (as one new file would): an affine grid whose scale is a power of
    two. Registered for one test, then taken out (the registry is global)."""

    class PowerOfTwoScale(QuantKind):
        name = "pow2_scale"
        granularities = ("per_tensor",)
        requirement = "per_tensor"

        def range_qparams(self, spec, lo, hi):
            scale, zero_point = super().range_qparams(spec, lo, hi)
            return torch.exp2(torch.ceil(torch.log2(scale))), zero_point

    KINDS.register("pow2_scale")(PowerOfTwoScale())
    yield
    KINDS._items.pop("pow2_scale", None)


def test_a_new_kind_joins_by_registering(pow2_kind):
    spec = QuantSpec("pow2_scale", bits=4)
    x = torch.linspace(-1.0, 2.0, 301)
    observer = OBSERVERS.get("minmax")(spec)
    observer.observe(x)
    scale, zero_point = observer.qparams()
    assert math.log2(float(scale)).is_integer() and float(scale) >= 3.0 / 15  # the grid covers [-1, 2]
    quantizer = Quantizer("act", spec)
    quantizer.set_qparams(scale, zero_point)
    out = quantizer(x)
    assert torch.all(torch.remainder(out / scale, 1.0) == 0) and len(out.unique()) <= 16
    assert "pow2_scale" in repr(quantizer)
    # no integer form declared: the export emulates it in float, with the same values
    exported = ExportQuantizer(quantizer, IntFormat("u8u8"))
    assert exported.form == EMULATED
    torch.testing.assert_close(exported(x), out)
    assert QuantSpec.from_dict(spec.to_dict()) == spec and "ratio_log2" not in spec.to_dict()
    with pytest.raises(VitqError, match="'pow2_scale' quantizer is per_tensor"):
        QuantSpec("pow2_scale", granularity="per_channel")


def test_the_protocol_builds_specs_from_the_kind_entry():
    p1 = PROTOCOLS["p1"]
    ptf = p1.spec_for("norm_input", 8, 6, kinds={"norm_input": "ptf"}) if "norm_input" in p1.quantized else \
        PROTOCOLS["p2"].spec_for("norm_input", 8, 6)
    assert (ptf.kind, ptf.granularity, ptf.symmetric) == ("ptf", "per_channel", False)
    probs = p1.spec_for("attn_probs", 8, 4, act_symmetric=True, kinds={"attn_probs": "logsqrt2"})
    assert (probs.kind, probs.granularity, probs.symmetric) == ("logsqrt2", "per_tensor", False)
    act = p1.spec_for("act", 8, 4, act_symmetric=True)
    assert (act.kind, act.symmetric) == ("uniform", True)
    assert ExportQuantizer(_calibrated(act), IntFormat("u8u8")).form == QDQ


def _calibrated(spec: QuantSpec) -> Quantizer:
    q = Quantizer("act", spec)
    q.set_qparams(torch.tensor(0.1), torch.tensor(0.0))
    return q
