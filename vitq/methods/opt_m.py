"""OPT-m: search of the optimal scaling-factor ratio of two-region post-GELU quantizers
(MPTQ-ViT, METHODS.md §4.2), the ``opt_m`` stage.

GELU outputs have a short negative tail (down to about −0.17) and a long positive one. A
``twin`` quantizer (:func:`vitq.quant.primitives.fake_quantize_twin`) spends a sign bit to give
each region its own scale, tied by a power of two: ``s_pos = 2^m · s_neg``. PTQ4ViT and TSPTQ-ViT
fix the negative scale by hand; OPT-m searches m per layer, jointly with ``s_pos``, for the least
error of the layer output on calibration data:

    min over m ∈ {0..M}, s_pos ∈ grid:  ‖ fc2(Q_twin(x; s_pos, m)) − fc2_float(x) ‖²

with fc2's quantized weight and x the float fc2 inputs of the calibration images ("parallel"
calibration, as PTQ4ViT). The grid of ``s_pos`` is ``f · max(x) / (2^(b−1) − 1)`` for ``grid``
values of f in (0, 1], refined around the best f with ``refine`` more.

With ``points: [gelu, softmax]`` the attention probabilities get the same treatment (METHODS.md
§4.2, the TSPTQ "V-2SF" lineage): a ``twin_range`` quantizer, whose region bit picks a fine scale
``s / 2^m`` for small probabilities and the coarse ``s`` for the rest, with m and s chosen for the
least error of the attention output ``‖(Q(P) − P)·V‖²`` on the float P and V of a few
calibration images.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import VitqError
from ..models.adapters import find_adapter
from ..models.adapters import quantizers_off
from ..nn import QuantAttention, QuantLinear, QuantWindowAttention
from ..quant.primitives import fake_quantize_twin, fake_quantize_twin_range
from ..quant.spec import MAX_RATIO_LOG2, QuantSpec
from .stages import STAGES, Stage, StageContext, StageSettings

Tensor = torch.Tensor


@dataclass(frozen=True)
class OptMSettings(StageSettings):
    """Settings of the ``opt_m`` stage.

    Attributes:
        max_m: the largest ratio exponent M tried (m ∈ {0..M}).
        grid: candidate positive scales per m on the coarse grid.
        refine: candidates of the finer grid around the best coarse one (0: none).
        max_tokens: calibration tokens (rows of fc2's input) the error is measured on, drawn
            evenly from every batch with the run's seed.
        keep_uniform: keep a layer's calibrated (uniform) quantizer where no twin candidate has a
            smaller output error; ``false`` always installs the best twin quantizer.
        points: ``gelu`` (the fc2 inputs, the paper) and optionally ``softmax`` (the attention
            probabilities: ``twin_range`` quantizers).
        softmax_images: calibration images whose attention probabilities and values the
            ``softmax`` search measures its error on.
        softmax_min_bits: probability quantizers with fewer bits keep their kind (the
            recommended recipe searches twin-range probabilities at 8 bits only; see its YAML).
        softmax_min_w_bits: runs whose weights have fewer bits keep every probability quantizer's
            kind (the recommended recipe: 4, W3A8's held-out error rose).
    """

    max_m: int = 8
    grid: int = 12
    refine: int = 6
    max_tokens: int = 2048
    keep_uniform: bool = True
    points: Tuple[str, ...] = ("gelu",)
    softmax_images: int = 4
    softmax_min_bits: int = 2
    softmax_min_w_bits: int = 2

    def __post_init__(self) -> None:
        checks = (("max_m", 0, MAX_RATIO_LOG2), ("grid", 1, 10_000), ("refine", 0, 10_000),
                  ("max_tokens", 1, 1 << 30))
        for key, lo, hi in checks:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise VitqError(f"opt_m.{key} must be an integer from {lo} to {hi}, got {value!r}")
        if not isinstance(self.keep_uniform, bool):
            raise VitqError(f"opt_m.keep_uniform must be true or false, got {self.keep_uniform!r}")
        if isinstance(self.points, str):  # one point: points: gelu
            object.__setattr__(self, "points", (self.points,))
        if not isinstance(self.points, (list, tuple)):
            raise VitqError(f"opt_m.points must be a list of gelu and/or softmax, got {self.points!r}")
        object.__setattr__(self, "points", tuple(self.points))
        bad = [p for p in self.points if p not in ("gelu", "softmax")]
        if bad or not self.points or len(set(self.points)) != len(self.points):
            raise VitqError(f"opt_m.points must be a list of gelu and/or softmax, got {list(self.points)}")
        if isinstance(self.softmax_images, bool) or not isinstance(self.softmax_images, int) or self.softmax_images < 1:
            raise VitqError(f"opt_m.softmax_images must be a positive integer, got {self.softmax_images!r}")
        for key in ("softmax_min_bits", "softmax_min_w_bits"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 8:
                raise VitqError(f"opt_m.{key} must be an integer from 2 to 8, got {value!r}")

    def to_dict(self) -> Dict[str, Any]:
        out = super().to_dict()
        out["points"] = list(self.points)
        return out


def _output_error(x: Tensor, weight: Tensor, bias, reference: Tensor) -> float:
    return float((F.linear(x, weight, bias) - reference).pow(2).mean())


def search_twin(
    x: Tensor, weight: Tensor, bias, reference: Tensor, bits: int, max_m: int, grid: int, refine: int,
    positive_max: float,
) -> Tuple[int, float, float]:
    """The ``(m, s_pos, error)`` of the twin quantizer of ``x`` with the least output error.

    ``weight`` is the layer's (quantized) weight, ``reference`` the float layer's output on ``x``.
    """
    return search_ratio(x, lambda xq: _output_error(xq, weight, bias, reference), fake_quantize_twin, bits, max_m,
                        grid, refine, positive_max)


def search_ratio(
    x: Tensor, error_of: Callable[[Tensor], float], fake: Callable[..., Tensor], bits: int, max_m: int, grid: int,
    refine: int, top_value: float,
) -> Tuple[int, float, float]:
    """The ``(m, scale, error)`` of the two-region quantizer ``fake(x, scale, m, bits)`` with the
    least ``error_of(x_hat)``: m ∈ {0..max_m}, scale on a grid ``f · top_value / (2^(b−1) − 1)``."""
    qmax = 2 ** (bits - 1) - 1
    top = max(top_value, 1e-8) / qmax
    best = (0, top, math.inf)
    step = 1.0 / grid
    for m in range(max_m + 1):
        def error(f: float) -> float:
            scale = torch.tensor(f * top, dtype=x.dtype, device=x.device)
            return error_of(fake(x, scale, m, bits))

        coarse = [(error(f), f) for f in (1.0 - i * step for i in range(grid))]
        err, f_best = min(coarse)
        if refine:
            lo, hi = max(f_best - step, step / 10), min(f_best + step, 1.0)
            fine = [(error(lo + (hi - lo) * (i + 1) / (refine + 1)), lo + (hi - lo) * (i + 1) / (refine + 1))
                    for i in range(refine)]
            err, f_best = min([(err, f_best)] + fine)
        if err < best[2]:
            best = (m, f_best * top, err)
    return best


class _TokenSample:
    """A seeded sample of the rows a module receives, up to ``per_batch`` rows of each batch,
    and the largest value seen over all of them."""

    def __init__(self, per_batch: int, generator: torch.Generator) -> None:
        self.per_batch, self.generator = per_batch, generator
        self.rows: List[Tensor] = []
        self.max = -math.inf

    def __call__(self, module: nn.Module, args: Tuple[Tensor, ...]) -> None:
        x = args[0].detach()
        flat = x.reshape(-1, x.shape[-1])
        self.max = max(self.max, float(flat.max()))
        if flat.shape[0] > self.per_batch:
            idx = torch.randperm(flat.shape[0], generator=self.generator)[: self.per_batch]
            flat = flat[idx.to(flat.device)]
        self.rows.append(flat.clone())


@STAGES.register("opt_m")
class OptMStage(Stage):
    """OPT-m: give each post-GELU quant point (fc2's input) a twin quantizer with the power-of-two
    ratio m and positive scale that minimise the layer output error. Runs after ``calibrate``."""

    Settings = OptMSettings
    needs_calibrated = True

    def run(self, ctx: StageContext) -> None:
        s: OptMSettings = self.settings
        chosen: List[Dict[str, Any]] = []
        if "gelu" in s.points:
            chosen += self._gelu(ctx)
        if "softmax" in s.points and ctx.w_bits < s.softmax_min_w_bits:
            ctx.log("opt_m: the weights have %d bits (softmax_min_w_bits %d): the probabilities keep their kind",
                    ctx.w_bits, s.softmax_min_w_bits)
        elif "softmax" in s.points:
            chosen += self._softmax(ctx)
        ctx.record["opt_m"] = {**s.to_dict(), "layers": [c for c in chosen if c["kind"] == "twin"],
                               "softmax": [c for c in chosen if c["kind"] == "twin_range"]}

    def _gelu(self, ctx: StageContext) -> List[Dict[str, Any]]:
        s: OptMSettings = self.settings
        model, device = ctx.model.to(ctx.device).eval(), ctx.device
        names = [n for n in find_adapter(model).gelu_linears(model)
                 if isinstance(model.get_submodule(n), QuantLinear)
                 and model.get_submodule(n).input_quantizer.spec.enabled
                 and model.get_submodule(n).input_quantizer.spec.granularity == "per_tensor"]
        if not names:
            raise VitqError("opt_m found no quantized post-GELU input (an MLP fc2 with an enabled per-tensor input "
                            "quantizer) in this model")
        per_batch = max(1, math.ceil(s.max_tokens / max(1, len(ctx.data))))
        generator = torch.Generator().manual_seed(ctx.seed)
        samples = {n: _TokenSample(per_batch, generator) for n in names}
        float_model = ctx.float_model.to(device).eval()
        hooks = [float_model.get_submodule(n).register_forward_pre_hook(samples[n]) for n in names]
        try:
            with torch.no_grad():
                for batch in ctx.data:
                    float_model(batch.to(device))
        finally:
            for hook in hooks:
                hook.remove()

        chosen: List[Dict[str, Any]] = []
        for name in tqdm(names, desc="opt_m", unit="layer", disable=not ctx.progress, leave=False):
            layer: QuantLinear = model.get_submodule(name)
            float_layer = float_model.get_submodule(name)
            quantizer = layer.input_quantizer
            x = torch.cat(samples[name].rows)[: s.max_tokens]
            with torch.no_grad():
                reference = F.linear(x, float_layer.weight, float_layer.bias)
                weight = layer.weight_quantizer(layer.weight)
                uniform_error = _output_error(quantizer(x), weight, layer.bias, reference)
                bits = quantizer.spec.bits
                m, scale, error = search_twin(x, weight, layer.bias, reference, bits, s.max_m, s.grid, s.refine,
                                              samples[name].max)
            keep = s.keep_uniform and uniform_error <= error
            if not keep:
                quantizer.set_spec(QuantSpec("twin", bits, "per_tensor", symmetric=True, ratio_log2=m))
                scale_t = torch.tensor(scale, device=device)
                quantizer.set_qparams(scale_t, torch.zeros_like(scale_t))
            chosen.append({"point": f"{name}.input_quantizer", "kind": "twin", "m": m, "scale_pos": scale,
                           "scale_neg": scale / 2**m, "twin_mse": error, "uniform_mse": uniform_error,
                           "chosen": "uniform" if keep else "twin"})
            ctx.log("opt_m: %s m=%d s_pos=%.4g output MSE %.4g (uniform %.4g) -> %s", name, m, scale, error,
                    uniform_error, chosen[-1]["chosen"])
        return chosen

    def _softmax(self, ctx: StageContext) -> List[Dict[str, Any]]:
        """Twin-range quantizers for the attention probabilities, m and the coarse scale chosen for
        the least attention-output error on the float probabilities and values."""
        s: OptMSettings = self.settings
        model, device = ctx.model.to(ctx.device).eval(), ctx.device
        names = {id(m): n for n, m in model.named_modules()}
        attentions = [m for m in model.modules() if isinstance(m, (QuantAttention, QuantWindowAttention))
                      and m.probs_quantizer.spec.enabled and m.probs_quantizer.spec.granularity == "per_tensor"]
        if not attentions:  # e.g. protocols p3 and p4, which leave the probabilities in float
            ctx.log("opt_m: no attention has an enabled per-tensor probability quantizer (the protocol leaves "
                    "them in float): the softmax points are skipped")
            return []
        fewer = [a for a in attentions if a.probs_quantizer.spec.bits < s.softmax_min_bits]
        if fewer:
            ctx.log("opt_m: %d attention probability quantizers have fewer than %d bits and keep their kind",
                    len(fewer), s.softmax_min_bits)
            attentions = [a for a in attentions if a not in fewer]
        captured: Dict[int, Dict[str, Tensor]] = {id(a): {} for a in attentions}
        hooks = []
        for att in attentions:
            def keep(key: str, att_id: int):
                def hook(module: nn.Module, args: Tuple[Tensor, ...]) -> None:
                    captured[att_id].setdefault(key, args[0].detach().clone())
                return hook
            hooks.append(att.probs_quantizer.register_forward_pre_hook(keep("p", id(att))))
            hooks.append(att.v_quantizer.register_forward_pre_hook(keep("v", id(att))))
        images = torch.cat(ctx.data)[: s.softmax_images].to(device)
        try:  # the float computation of the quantized model's own modules
            with quantizers_off(model), torch.no_grad():
                model(images)
        finally:
            for h in hooks:
                h.remove()
        chosen = []
        for att in tqdm(attentions, desc="opt_m softmax", unit="layer", disable=not ctx.progress, leave=False):
            p, v = captured[id(att)]["p"], captured[id(att)]["v"]
            reference = p @ v
            quantizer = att.probs_quantizer

            def error_of(pq: Tensor) -> float:
                return float((pq @ v - reference).pow(2).mean())

            with torch.no_grad():
                uniform_error = error_of(quantizer(p))
                bits = quantizer.spec.bits
                m, scale, error = search_ratio(p, error_of, fake_quantize_twin_range, bits, s.max_m, s.grid,
                                               s.refine, float(p.max()))
            keep = s.keep_uniform and uniform_error <= error
            if not keep:
                quantizer.set_spec(QuantSpec("twin_range", bits, "per_tensor", symmetric=False, ratio_log2=m))
                scale_t = torch.tensor(scale, device=device)
                quantizer.set_qparams(scale_t, torch.zeros_like(scale_t))
            name = f"{names[id(att)]}.probs_quantizer"
            chosen.append({"point": name, "kind": "twin_range", "m": m, "scale_coarse": scale,
                           "scale_fine": scale / 2**m, "twin_mse": error, "uniform_mse": uniform_error,
                           "chosen": "uniform" if keep else "twin_range"})
            ctx.log("opt_m: %s m=%d s=%.4g attention-output MSE %.4g (current %.4g) -> %s", name, m, scale, error,
                    uniform_error, chosen[-1]["chosen"])
        return chosen
