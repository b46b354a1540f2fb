"""The quantization plan: every quant point's spec and parameters, as one serialisable object.

``plan.json`` holds the metadata and specs, ``plan.safetensors`` the scales and zero points.
A plan of a smoothed model (SQ-b, or RepQ's reparameterisation) also lists the smoothed pairs in
``meta["smooth"]`` and holds their factors as ``smooth.<linear>.scale`` (ε) and
``smooth.<linear>.shift`` (μ); :func:`apply_plan` folds them into the fresh model before it sets
any quantizer. Weights that a stage rewrote (GPTQ) are listed in ``meta["params"]`` and held as
``param.<name>``; :func:`apply_plan` writes them after the fold.
Specs can be given by rules: an exact name, a ``re:`` pattern, or ``default``; exact names win,
then the first matching pattern, then the default.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import VitqError
from ..files import atomic_write, atomic_write_text
from ..models.loading import weights_digest
from ..models.adapters import iter_quantizers
from ..quant.spec import QuantSpec
from .backbone import backbone_module, splice
from .gptq import changed_params, mark_changed
from .lifecycle import convert, prefix_rows_of, prepare
from .smooth import fold_smoothing, smoothing_from_plan, smoothing_of, smoothing_to_plan

PLAN_FORMAT = "vitq-plan/1"


@dataclass
class Plan:
    """Specs and parameters of a quantized model.

    Attributes:
        meta: what made the plan (model identity, protocol, bits, recipe, seed, ...).
        rules: spec per exact quant-point name, ``re:<pattern>`` or ``default``.
        tensors: ``<point>.scale`` and ``<point>.zero_point`` tensors (and ``smooth.*``, see above).
    """

    meta: Dict[str, Any]
    rules: Dict[str, QuantSpec]
    tensors: Dict[str, torch.Tensor] = field(default_factory=dict)

    def spec_for(self, name: str) -> Optional[QuantSpec]:
        if name in self.rules:
            return self.rules[name]
        for key, spec in self.rules.items():
            if key.startswith("re:") and re.fullmatch(key[3:], name):
                return spec
        return self.rules.get("default")

    # -- files -------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write ``plan.json`` and ``plan.safetensors`` into ``folder``; returns the json path."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        body = {
            "format": PLAN_FORMAT,
            "meta": self.meta,
            "tensors": "plan.safetensors",
            "rules": {k: v.to_dict() for k, v in self.rules.items()},
        }
        tensors = {k: v.contiguous().cpu() for k, v in self.tensors.items()}
        atomic_write(folder / "plan.safetensors", lambda tmp: save_file(tensors, str(tmp)))
        atomic_write_text(folder / "plan.json", json.dumps(body, indent=1) + "\n")
        return folder / "plan.json"

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        """Read a plan from ``plan.json`` (or the run folder holding it)."""
        path = Path(path)
        if path.is_dir():
            path = path / "plan.json"
        if not path.is_file():
            raise VitqError(f"plan {path} does not exist: pass the plan.json of a vitq run folder")
        try:
            body = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise VitqError(f"cannot read plan {path}: {err}") from None
        if not isinstance(body, dict) or body.get("format") != PLAN_FORMAT:
            raise VitqError(f"{path} is not a vitq plan (expected format {PLAN_FORMAT!r})")
        rules = {k: QuantSpec.from_dict(v) for k, v in body["rules"].items()}
        tensor_path = path.parent / body.get("tensors", "plan.safetensors")
        if not tensor_path.is_file():
            raise VitqError(f"the plan's tensors {tensor_path} are missing: copy it along with {path.name}")
        try:
            tensors = load_file(str(tensor_path))
        except Exception as err:
            raise VitqError(f"cannot read {tensor_path}: {err}") from None
        return cls(body.get("meta", {}), rules, tensors)


def plan_from_model(model: nn.Module, meta: Dict[str, Any]) -> Plan:
    """The plan of a calibrated model: one exact rule and its tensors per quant point."""
    rules, tensors = {}, {}
    for name, quantizer in iter_quantizers(model):
        if not quantizer.is_calibrated:
            raise VitqError(f"quant point {name} is not calibrated: calibrate before making a plan")
        rules[name] = quantizer.spec
        if quantizer.scale is not None:
            tensors[f"{name}.scale"] = quantizer.scale
            tensors[f"{name}.zero_point"] = quantizer.zero_point
    meta = dict(meta)
    smoothing = smoothing_of(model)
    if smoothing:
        meta["smooth"], smooth_tensors = smoothing_to_plan(smoothing)
        tensors.update(smooth_tensors)
    params = changed_params(model)
    if params:  # weights rewritten by a stage (GPTQ): the plan carries their values
        meta["params"] = params
        for name in params:
            tensors[f"param.{name}"] = model.get_parameter(name).detach().float().cpu().clone()
    return Plan(meta, rules, tensors)


def check_plan_weights(model: nn.Module, plan: Plan) -> None:
    """Refuse a plan made from other float weights than ``model``'s (its ``weights_sha256``)."""
    want = (plan.meta.get("model") or {}).get("weights_sha256")
    if not want:
        return  # plans from before checksums were recorded
    got = weights_digest(model)
    if got != want:
        recorded = plan.meta.get("model") or {}
        seed = recorded.get("random_weights_seed")
        made = (f"random weights (seed {seed})" if seed is not None else
                f"the weights of {recorded['name']}" if recorded.get("name") else "those weights")
        raise VitqError(f"the plan was made from other weights than this model's (checksum {want}, this model "
                        f"{got}): its scales fit {made}. Pass the model the plan was made for; to apply it "
                        "anyway (speed measurements only), apply_plan(..., check_weights=False)")


def _without_backbone(plan: Plan) -> Plan:
    return Plan({k: v for k, v in plan.meta.items() if k != "backbone"}, plan.rules, plan.tensors)


def backbone_plan(model: nn.Module, path: str, plan: Plan) -> Plan:
    """The plan of the backbone at ``path`` inside ``model``, for a plan made with
    ``vitq.quantize(model, ..., backbone=path)``: its weights checked against ``model`` (or, for
    plans that recorded it, against the backbone's own checksum), its path and checksum dropped.

    Raises:
        VitqError: a plan made for another backbone path, or from other weights.
    """
    made_for = plan.meta.get("backbone")
    if made_for not in (None, path):
        raise VitqError(f"the plan was made for the backbone at {made_for!r}, not {path!r}")
    want = (plan.meta.get("model") or {}).get("weights_sha256")
    if want and want != weights_digest(model):
        check_plan_weights(backbone_module(model, path), plan)  # raises unless the backbone's own checksum
    model_meta = {k: v for k, v in (plan.meta.get("model") or {}).items() if k != "weights_sha256"}
    meta = {**{k: v for k, v in plan.meta.items() if k != "backbone"}, "model": model_meta}
    return Plan(meta, plan.rules, plan.tensors)


def apply_plan(model: nn.Module, plan: Plan, check_weights: bool = True) -> nn.Module:
    """A quantized, converted copy of the float ``model`` with the plan's specs and parameters
    (and its SQ-b smoothing folded in first).

    Args:
        check_weights: refuse a plan made from other float weights (see :func:`check_plan_weights`).

    A plan made with ``vitq.quantize(..., backbone=PATH)`` (``meta["backbone"]``) is applied to
    that sub-module of ``model``, and the whole model is returned with it in place.
    """
    path = plan.meta.get("backbone")
    if path:
        inner = backbone_plan(model, path, plan) if check_weights else _without_backbone(plan)
        return splice(model, path, apply_plan(backbone_module(model, path), inner, check_weights=False))
    protocol = plan.meta.get("protocol", "p1")
    prefix = plan.meta.get("prefix_rows") or {}
    qmodel = prepare(model, protocol=protocol, head=bool(plan.meta.get("quantize_head")),
                     prefix_rows=prefix.get("points", ()))
    tokens = prefix_rows_of(qmodel).get("tokens", 0) if prefix else None
    if prefix and tokens != prefix.get("tokens"):
        raise VitqError(f"the plan gives the first {prefix.get('tokens')} token rows a grid of their own, but this "
                        f"model has {tokens} prefix tokens: was the plan made for another architecture?")
    if plan.meta.get("smooth"):
        fold_smoothing(qmodel, smoothing_from_plan(plan.meta["smooth"], plan.tensors))
    if plan.meta.get("params"):
        _load_params(qmodel, plan)
    names = [n for n, _ in iter_quantizers(qmodel)]
    exact = {k for k in plan.rules if not k.startswith("re:") and k != "default"}
    unknown = sorted(exact - set(names))
    if unknown:
        raise VitqError(
            f"the plan does not fit this model: {len(unknown)} of its quant points are not in it "
            f"(e.g. {unknown[0]}); was the plan made for another architecture? plan model: "
            f"{plan.meta.get('model', {}).get('arch', '?')}"
        )
    quantizers = dict(iter_quantizers(qmodel))
    device = next(qmodel.parameters()).device
    for name, quantizer in quantizers.items():
        spec = plan.spec_for(name)
        if spec is None:
            raise VitqError(f"the plan has no rule for quant point {name} and no default")
        quantizer.set_spec(spec)
        if f"{name}.scale" in plan.tensors:
            scale, zp = plan.tensors[f"{name}.scale"], plan.tensors[f"{name}.zero_point"]
            quantizer.set_qparams(scale.to(device), zp.to(device))
    for name, quantizer in quantizers.items():
        if quantizer.needs_calibration and quantizer.scale is not None:
            expected = _expected_numel(qmodel, name, quantizer)
            if expected is not None and quantizer.scale.numel() not in (1, expected):
                raise VitqError(
                    f"the plan's scale for {name} has {quantizer.scale.numel()} values, the model needs "
                    f"{expected}: the plan was made for another architecture"
                )
    if check_weights:  # after the checks of the architecture, whose messages say more
        check_plan_weights(model, plan)
    return convert(qmodel)


def _load_params(qmodel: nn.Module, plan: Plan) -> None:
    """Write the parameters a plan carries (weights rewritten by GPTQ) into the prepared model."""
    for name in plan.meta["params"]:
        key = f"param.{name}"
        if key not in plan.tensors:
            raise VitqError(f"the plan rewrites {name} but its tensors lack {key}: the plan files are incomplete")
        try:
            param = qmodel.get_parameter(name)
        except AttributeError:
            raise VitqError(f"the plan rewrites {name}, which this model lacks: was it made for another "
                            "architecture?") from None
        value = plan.tensors[key]
        if tuple(value.shape) != tuple(param.shape):
            raise VitqError(f"the plan's {name} is {tuple(value.shape)}, the model's {tuple(param.shape)}: the plan "
                            "was made for another architecture")
        with torch.no_grad():
            param.copy_(value.to(param.device, param.dtype))
    mark_changed(qmodel, plan.meta["params"])


def _expected_numel(model: nn.Module, name: str, quantizer) -> Optional[int]:
    if quantizer.spec.granularity != "per_channel":
        return 1
    owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    weight = getattr(owner, "weight", None)
    if quantizer.role == "weight" and weight is not None:
        return weight.shape[quantizer.spec.axis]
    return None
