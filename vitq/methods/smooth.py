"""SQ-b: SmoothQuant with a per-channel bias shift (MPTQ-ViT, METHODS.md §4.1), the ``smooth`` stage.

Post-LayerNorm activations are asymmetric channel by channel: each channel has its own offset
and its own range. SQ-b shifts every channel by μ_j and divides it by ε_j, so that one symmetric
per-tensor quantizer fits all channels, and folds both into the LayerNorm before and the linear
layer after. With ``Y = X̄·γ + β`` the LayerNorm output and ``W``, ``b`` the next linear layer::

    Y·Wᵀ + b = ((Y − μ)/ε) · (ε ⊙ W)ᵀ + (b + μ·Wᵀ)                        (SQ-b)
    ε_j = max|Y_j − μ_j|^α / max|W_{:,j}|^(1−α)                           (SmoothQuant)
    γ ← γ/ε,   β ← (β − μ)/ε,   W[:, j] ← W[:, j]·ε_j,   b ← b + W·μ (original W)

so the model computes the same function in float: nothing is added at run time. Given several
α, the stage picks one per pair: the α whose smoothed layer, with its input and weight
fake-quantized by the recipe's observers, gives the least output error on calibration tokens
(SmoothQuant's migration strength matters: on DeiT-Tiny the best α differs from layer to layer).
The factors
(ε, μ) of each pair are kept with the model (:func:`smoothing_of`) and written into its plan
(:mod:`vitq.methods.plan`), which re-folds them into a fresh float model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import VitqError
from ..models.adapters import NormLinearPair, find_adapter, iter_quantizers
from ..nn import QuantLinear
from ..quant.observers import ObserverConfig
from ..quant.quantizer import Quantizer
from .stages import STAGES, Stage, StageContext, StageSettings

Tensor = torch.Tensor

#: the model attribute that lists the smoothing folded into it (read by plan_from_model)
SMOOTHING_ATTR = "vitq_smoothing"
POINTS = ("qkv", "fc1", "reduction")
SHIFTS = ("mean", "midrange", "none")


@dataclass
class SmoothFactor:
    """The smoothing of one LayerNorm → linear pair: ``Y ↦ (Y − shift) / scale``.

    Attributes:
        point: ``qkv``, ``fc1`` or ``reduction``.
        norm, linear: fully-qualified module names.
        scale: ε, one positive value per channel.
        shift: μ, one value per channel (zeros where the shift does not fold exactly).
        alpha: the migration strength that made ``scale`` (informative; None when unknown).
    """

    point: str
    norm: str
    linear: str
    scale: Tensor
    shift: Tensor
    alpha: Optional[float] = None

    def meta(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"point": self.point, "norm": self.norm, "linear": self.linear}
        if self.alpha is not None:
            out["alpha"] = self.alpha
        return out


def smoothing_of(model: nn.Module) -> List[SmoothFactor]:
    """The smoothing folded into ``model`` (empty for a model that was not smoothed)."""
    return list(getattr(model, SMOOTHING_ATTR, None) or [])


def fold_smoothing(model: nn.Module, factors: Sequence[SmoothFactor]) -> nn.Module:
    """Fold each factor into its LayerNorm and linear layer, in place, and remember it on ``model``.

    Works on a float model and on a prepared one alike (module names are the same). A linear
    layer without a bias (Swin's patch-merging reduction) gets one: ``W·μ``.

    Raises:
        VitqError: when a module is missing or has the wrong width, or a pair is smoothed twice.
    """
    done = {f.linear for f in smoothing_of(model)}
    for f in factors:
        if f.linear in done:
            raise VitqError(f"{f.linear} is already smoothed: smooth a model once (prepare a fresh one)")
        try:
            norm, linear = model.get_submodule(f.norm), model.get_submodule(f.linear)
        except AttributeError:
            raise VitqError(f"the smoothing of {f.linear} names modules this model lacks ({f.norm}, {f.linear}): "
                            "was it made for another architecture?") from None
        if not isinstance(linear, nn.Linear) or getattr(norm, "weight", None) is None:
            raise VitqError(f"{f.norm} → {f.linear} is not a LayerNorm (with γ, β) followed by a linear layer")
        channels = linear.in_features
        if f.scale.numel() != channels or f.shift.numel() != channels or norm.weight.numel() != channels:
            raise VitqError(f"the smoothing of {f.linear} has {f.scale.numel()} channels, the model has {channels}: "
                            "was it made for another architecture?")
        weight = linear.weight
        scale = f.scale.to(weight.device, weight.dtype)
        shift = f.shift.to(weight.device, weight.dtype)
        if not torch.all(scale > 0):
            raise VitqError(f"the smoothing scale of {f.linear} has values that are not positive")
        with torch.no_grad():
            bias_shift = weight @ shift  # b + W·μ with the original W
            if linear.bias is None:
                linear.bias = nn.Parameter(bias_shift.clone(), requires_grad=weight.requires_grad)
            else:
                linear.bias.add_(bias_shift)
            weight.mul_(scale)  # W[:, j]·ε_j
            norm.weight.div_(scale)
            if norm.bias is None:
                norm.bias = nn.Parameter(-shift / scale, requires_grad=norm.weight.requires_grad)
            else:
                norm.bias.sub_(shift).div_(scale)
        done.add(f.linear)
    stored = [SmoothFactor(f.point, f.norm, f.linear, f.scale.detach().float().cpu().clone(),
                           f.shift.detach().float().cpu().clone(), f.alpha) for f in factors]
    setattr(model, SMOOTHING_ATTR, smoothing_of(model) + stored)
    return model


def check_foldable(model: nn.Module, stage: str) -> None:
    """Raise unless a LayerNorm fold (``smooth`` or ``reparam``) may run: before calibration (it
    changes what calibration measures) and once per model."""
    calibrated = [n for n, q in iter_quantizers(model) if q.needs_calibration and q.scale is not None]
    if calibrated:
        raise VitqError(f"{stage} changes the weights and activations that calibration measured ({calibrated[0]} "
                        f"is calibrated): put '{stage}' before 'calibrate' in the recipe")
    if smoothing_of(model):
        raise VitqError("the model's LayerNorms are already folded (smooth or reparam): a recipe folds once")


def smoothing_to_plan(factors: Sequence[SmoothFactor]) -> Tuple[List[Dict[str, str]], Dict[str, Tensor]]:
    """``meta["smooth"]`` entries and the tensors ``smooth.<linear>.scale`` / ``smooth.<linear>.shift``."""
    meta = [f.meta() for f in factors]
    tensors = {}
    for f in factors:
        tensors[f"smooth.{f.linear}.scale"] = f.scale
        tensors[f"smooth.{f.linear}.shift"] = f.shift
    return meta, tensors


def smoothing_from_plan(meta: Sequence[Dict[str, Any]], tensors: Dict[str, Tensor]) -> List[SmoothFactor]:
    """The factors a plan stores (the inverse of :func:`smoothing_to_plan`)."""
    factors = []
    for entry in meta:
        if not isinstance(entry, dict) or not {"point", "norm", "linear"} <= set(entry):
            raise VitqError(f"a plan's smooth entry needs point, norm and linear; got {entry!r}")
        linear = entry["linear"]
        keys = (f"smooth.{linear}.scale", f"smooth.{linear}.shift")
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise VitqError(f"the plan smooths {linear} but its tensors lack {missing[0]}")
        factors.append(SmoothFactor(entry["point"], entry["norm"], linear, tensors[keys[0]], tensors[keys[1]],
                                    entry.get("alpha")))
    return factors


def smoothing_factors(
    act_min: Tensor, act_max: Tensor, act_mean: Tensor, weight: Tensor, alpha: float, shift: str
) -> Tuple[Tensor, Tensor]:
    """ε and μ of one pair from the activation's per-channel statistics and the linear weight.

    Example (α = 0.5: ε_j = sqrt(max|Y_j − μ_j| / max|W_{:,j}|)):
        >>> eps, mu = smoothing_factors(torch.tensor([0., -4.]), torch.tensor([4., 4.]), torch.tensor([1., 0.]),
        ...                             torch.tensor([[1., 0.25], [-0.5, 0.]]), 0.5, "midrange")
        >>> eps.tolist(), mu.tolist()
        ([1.4142135381698608, 4.0], [2.0, 0.0])
    """
    if shift == "mean":
        mu = act_mean
    elif shift == "midrange":
        mu = (act_max + act_min) / 2
    else:
        mu = torch.zeros_like(act_mean)
    a = torch.maximum((act_max - mu).abs(), (act_min - mu).abs())
    w = weight.detach().abs().amax(dim=0).to(a.dtype)
    eps = a.clamp_min(1e-5).pow(alpha) / w.clamp_min(1e-5).pow(1 - alpha)
    # a dead channel (constant activation or zero weights) keeps its scale
    eps = torch.where((a > 0) & (w > 0), eps, torch.ones_like(eps)).clamp(1e-5, 1e5)
    return eps.float(), mu.float()


class _ChannelStats:
    """Per-channel min, max and mean of the tensors a module receives (last axis = channels), and
    a seeded sample of up to ``per_batch`` rows of each batch (for the choice of α)."""

    def __init__(self, per_batch: int = 0, generator: Optional[torch.Generator] = None) -> None:
        self.min = self.max = self.sum = None
        self.count = 0
        self.per_batch, self.generator = per_batch, generator
        self.rows: List[Tensor] = []

    def __call__(self, module: nn.Module, args: Tuple[Tensor, ...]) -> None:
        x = args[0].detach()
        flat = x.reshape(-1, x.shape[-1])
        lo, hi, total = flat.amin(dim=0), flat.amax(dim=0), flat.double().sum(dim=0)
        if self.min is None:
            self.min, self.max, self.sum = lo, hi, total
        else:
            self.min, self.max, self.sum = torch.minimum(self.min, lo), torch.maximum(self.max, hi), self.sum + total
        self.count += flat.shape[0]
        if self.per_batch:
            if flat.shape[0] > self.per_batch:
                idx = torch.randperm(flat.shape[0], generator=self.generator)[: self.per_batch]
                flat = flat[idx.to(flat.device)]
            self.rows.append(flat.clone())

    @property
    def mean(self) -> Tensor:
        return (self.sum / self.count).to(self.min.dtype)


def _fake_quantize(quantizer: Quantizer, x: Tensor, observers: ObserverConfig) -> Tensor:
    """``x`` through a fresh copy of ``quantizer``'s spec, calibrated on ``x`` by ``observers``."""
    spec = quantizer.spec
    if not spec.enabled:
        return x
    fresh = Quantizer(quantizer.role, spec)
    if fresh.needs_calibration:
        observer = observers.build(spec)
        observer.observe(x)
        fresh.set_qparams(*observer.qparams())
    return fresh(x)


def _quantized_error(linear: nn.Linear, x: Tensor, eps: Tensor, mu: Tensor, weights: ObserverConfig,
                     activations: ObserverConfig) -> float:
    """Mean squared error of the smoothed layer, input and weight fake-quantized, against the float layer."""
    with torch.no_grad():
        weight, bias = linear.weight, linear.bias
        reference = F.linear(x, weight, bias)
        eps, mu = eps.to(x), mu.to(x)
        smoothed_bias = weight @ mu + (bias if bias is not None else 0)
        xs, ws = (x - mu) / eps, weight * eps
        if isinstance(linear, QuantLinear):
            xs = _fake_quantize(linear.input_quantizer, xs, activations)
            ws = _fake_quantize(linear.weight_quantizer, ws, weights)
        return float((F.linear(xs, ws, smoothed_bias) - reference).pow(2).mean())


@dataclass(frozen=True)
class SmoothSettings(StageSettings):
    """Settings of the ``smooth`` stage (SQ-b).

    Attributes:
        alpha: migration strength α in [0, 1]: how much of each channel's range moves into the
            weights (0: none, 1: all). 0.5 is SmoothQuant's default. A list of values: each pair
            takes the one with the least quantized output error on calibration tokens.
        shift: the per-channel shift μ: ``mean`` (MPTQ-ViT), ``midrange`` ((max + min)/2, which
            centres the range and so minimises clamping) or ``none`` (plain SmoothQuant).
        points: which linear inputs to smooth: ``qkv``, ``fc1``, ``reduction`` (Swin patch merging).
        symmetric: give the smoothed linears' input quantizers a symmetric range (zero point 0):
            the shifted activation is centred, so a signed range fits it without a zero point
            (MPTQ-ViT's setting). ``false`` keeps the recipe's activation range (a zero point
            absorbs what the shift leaves uneven; measured better on DeiT-Tiny at 8 bits).
        max_tokens: calibration tokens per pair the choice among several α is measured on.
    """

    alpha: Union[float, Tuple[float, ...]] = 0.5
    shift: str = "mean"
    points: Tuple[str, ...] = POINTS
    symmetric: bool = False
    max_tokens: int = 2048

    def __post_init__(self) -> None:
        if isinstance(self.points, str):
            object.__setattr__(self, "points", (self.points,))
        object.__setattr__(self, "points", tuple(self.points))
        if isinstance(self.alpha, (list, tuple)):
            object.__setattr__(self, "alpha", tuple(self.alpha))
        if not all(not isinstance(a, bool) and isinstance(a, (int, float)) and 0 <= a <= 1 for a in self.alphas) \
                or not self.alphas:
            raise VitqError(f"smooth.alpha must be a number from 0 to 1 or a non-empty list of them, "
                            f"got {self.alpha!r}")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise VitqError(f"smooth.max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.shift not in SHIFTS:
            raise VitqError(f"smooth.shift must be one of {', '.join(SHIFTS)}, got {self.shift!r}")
        bad = [p for p in self.points if p not in POINTS]
        if bad or not self.points:
            raise VitqError(f"smooth.points must be a non-empty list of {', '.join(POINTS)}; got {list(self.points)}")
        if not isinstance(self.symmetric, bool):
            raise VitqError(f"smooth.symmetric must be true or false, got {self.symmetric!r}")

    @property
    def alphas(self) -> Tuple[float, ...]:
        return self.alpha if isinstance(self.alpha, tuple) else (self.alpha,)

    def to_dict(self) -> Dict[str, Any]:
        out = super().to_dict()
        out["points"] = list(self.points)
        if isinstance(self.alpha, tuple):
            out["alpha"] = list(self.alpha)
        return out


@STAGES.register("smooth")
class SmoothStage(Stage):
    """SQ-b: shift and smooth the activations entering qkv, fc1 (and Swin's patch merging),
    folded into the LayerNorm before and the linear after. Runs before ``calibrate``."""

    Settings = SmoothSettings
    needs_calibrated = False

    def run(self, ctx: StageContext) -> None:
        s: SmoothSettings = self.settings
        model = ctx.model
        check_foldable(model, "smooth")
        pairs = [p for p in find_adapter(model).norm_linear_pairs(model) if p.point in s.points]
        if not pairs:
            raise VitqError(f"smooth found no LayerNorm → linear pair for points {list(s.points)} in this model")
        stats = self._statistics(ctx, pairs, s.max_tokens if len(s.alphas) > 1 else 0)
        if s.symmetric:
            for pair in pairs:
                linear = model.get_submodule(pair.linear)
                quantizer = linear.input_quantizer if isinstance(linear, QuantLinear) else None
                if quantizer is not None and quantizer.spec.enabled and quantizer.spec.kind_entry.plain_grid:
                    quantizer.set_spec(quantizer.spec.with_(symmetric=True))
        factors = []
        unshifted = []
        for pair in pairs:
            st = stats[pair.linear]
            linear = model.get_submodule(pair.linear)
            shift = s.shift if pair.shift_exact else "none"
            if shift != s.shift:
                unshifted.append(pair.linear)
            best = None
            dev = linear.weight.device  # the statistics come from the float model on ctx.device
            for alpha in s.alphas:
                eps, mu = smoothing_factors(st.min.to(dev), st.max.to(dev), st.mean.to(dev), linear.weight, alpha,
                                            shift)
                error = _quantized_error(linear, torch.cat(st.rows).to(dev), eps, mu, ctx.weights, ctx.activations) \
                    if len(s.alphas) > 1 else 0.0
                if best is None or error < best[0]:
                    best = (error, alpha, eps, mu)
            _, alpha, eps, mu = best
            factors.append(SmoothFactor(pair.point, pair.norm, pair.linear, eps.cpu(), mu.cpu(), float(alpha)))
        fold_smoothing(model, factors)
        if unshifted:
            ctx.log("smooth: %d pair(s) scaled without a shift (the model pads their tokens with zeros): %s",
                    len(unshifted), ", ".join(unshifted))
        ctx.record["smooth"] = {**s.to_dict(), "pairs": len(factors), "unshifted": unshifted,
                                "chosen_alpha": {f.linear: f.alpha for f in factors}}

    @staticmethod
    def _statistics(ctx: StageContext, pairs: Sequence[NormLinearPair], max_tokens: int) -> Dict[str, _ChannelStats]:
        """Per-channel statistics of each linear's input, from a float forward pass: SQ-b is exact,
        so the float model's activations are the smoothed model's, before the (Y − μ)/ε map."""
        float_model = ctx.float_model.to(ctx.device).eval()
        per_batch = math.ceil(max_tokens / max(1, len(ctx.data))) if max_tokens else 0
        generator = torch.Generator().manual_seed(ctx.seed)
        stats = {p.linear: _ChannelStats(per_batch, generator) for p in pairs}
        hooks = [float_model.get_submodule(name).register_forward_pre_hook(st) for name, st in stats.items()]
        try:
            with torch.no_grad():
                for batch in tqdm(ctx.data, desc="smooth", unit="batch", disable=not ctx.progress, leave=False):
                    float_model(batch.to(ctx.device))
        finally:
            for hook in hooks:
                hook.remove()
        return stats
