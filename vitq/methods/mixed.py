"""Mixed precision: MPTQ-ViT's greedy bit allocation (Greedy MP, METHODS.md §4.3), the ``greedy_mp`` stage.

The units are the linear layers of the transformer blocks, their weights and their inputs
allocated separately. Every unit starts at the widest candidate width; the stage measures, once,
how much the model's output moves away from the float model's (KL of the logits on calibration
images) when only that unit drops to each narrower width (the "cheaper variant" of §4.3: L·|B|
evaluations), then greedily takes the step with the least damage per bit saved until the average
widths meet the budget:

    score(u, b → b') = (D(u, b') − D(u, b)) / (size_u · (b − b'))          lowest first

``size_u`` is a weight's parameter count, or an input's elements per image (tokens × channels).
Each unit is calibrated at each width by the recipe's observers, on the calibration tensors it
sees (all quantizers passing through, as in :func:`vitq.calibrate`). Quant points outside the
units (q/k/v, post-softmax, patch embedding, head) keep the run's widths.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import VitqError
from ..models.adapters import find_adapter, quantizers_off, scores_last
from ..nn import QuantLinear
from ..quant.observers import Observer
from ..quant.quantizer import Quantizer
from .lifecycle import check_bits
from .stages import STAGES, Stage, StageContext, StageSettings

Tensor = torch.Tensor


def parse_budget(text: str) -> Tuple[float, float]:
    """``w4a4`` or ``w4.5a6`` → (average weight bits, average activation bits).

    Example:
        >>> parse_budget("w4.5a6")
        (4.5, 6.0)
    """
    low = text.strip().lower()
    try:
        if not low.startswith("w") or "a" not in low:
            raise ValueError
        w, a = low[1:].split("a", 1)
        return float(w), float(a)
    except ValueError:
        raise VitqError(f"a bit budget looks like w4a4 or w4.5a6 (average weight and activation bits), got {text!r}")


@dataclass(frozen=True)
class GreedyMPSettings(StageSettings):
    """Settings of the ``greedy_mp`` stage.

    Attributes:
        budget_w, budget_a: the average weight / activation bits to reach (``--budget wXaY``);
            None leaves that kind at the widest candidate.
        bits: candidate widths, widest first (every unit starts at the first).
        max_images: calibration images the sensitivities are measured on.
        mode: ``oneshot`` (each unit's damage at each width measured once, alone: L·|B|
            evaluations) or ``greedy`` (every step re-measures each candidate drop on the current
            allocation: about L evaluations per step, O(L²·|B|) in all; slower, exact).
        checkpoints: points of the trajectory (evenly spaced, first and last included) at which
            the model is measured on the calibration images (KL and agreement with the float
            model) for ``pareto.png``; 0 skips.
    """

    budget_w: Optional[float] = None
    budget_a: Optional[float] = None
    bits: Tuple[int, ...] = (8, 6, 4)
    max_images: int = 32
    mode: str = "oneshot"
    checkpoints: int = 12

    def allocates_widths(self) -> bool:
        return True

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", tuple(self.bits) if isinstance(self.bits, (list, tuple)) else self.bits)
        if not isinstance(self.bits, tuple) or not self.bits:
            raise VitqError(f"greedy_mp.bits must be a non-empty list of widths, got {self.bits!r}")
        for b in self.bits:
            check_bits(b, "greedy_mp.bits")
        if list(self.bits) != sorted(set(self.bits), reverse=True):
            raise VitqError(f"greedy_mp.bits must be distinct and widest first, e.g. [8, 6, 4]; got {list(self.bits)}")
        for key in ("budget_w", "budget_a"):
            value = getattr(self, key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise VitqError(f"greedy_mp.{key} must be a number of bits, got {value!r}")
            if not min(self.bits) <= value <= max(self.bits):
                raise VitqError(f"greedy_mp.{key} = {value} is outside the candidate widths {list(self.bits)}")
        if isinstance(self.max_images, bool) or not isinstance(self.max_images, int) or self.max_images < 1:
            raise VitqError(f"greedy_mp.max_images must be a positive integer, got {self.max_images!r}")
        if self.mode not in ("oneshot", "greedy"):
            raise VitqError(f"greedy_mp.mode must be 'oneshot' or 'greedy', got {self.mode!r}")
        if isinstance(self.checkpoints, bool) or not isinstance(self.checkpoints, int) or self.checkpoints < 0:
            raise VitqError(f"greedy_mp.checkpoints must be an integer ≥ 0, got {self.checkpoints!r}")

    def to_dict(self) -> Dict[str, Any]:
        out = super().to_dict()
        out["bits"] = list(self.bits)
        return out


@dataclass
class BitUnit:
    """One quantizer whose width an allocator chooses: a linear layer's weights or its input.

    ``size`` weighs it in the averages: a weight's parameter count, an input's elements per image.
    ``qparams`` holds its calibrated scale and zero point at each candidate width.
    """

    name: str  # quantizer name
    kind: str  # "weight" or "act"
    quantizer: Quantizer
    size: int = 0
    observers: Optional[Dict[int, Observer]] = None
    qparams: Optional[Dict[int, Tuple[Tensor, Tensor]]] = None

    def set_bits(self, bits: int) -> None:
        self.quantizer.set_spec(self.quantizer.spec.with_(bits=bits))
        self.quantizer.set_qparams(*self.qparams[bits])


def allocatable_units(model: nn.Module) -> List[BitUnit]:
    """The weight and input quantizers of the linear layers inside the transformer blocks that
    take a per-layer width (uniform, not per-token), in forward order."""
    names = {id(m): n for n, m in model.named_modules()}
    units = []
    for _, block in find_adapter(model).blocks(model):
        for module in block.modules():
            if not isinstance(module, QuantLinear):
                continue
            for kind, q in (("weight", module.weight_quantizer), ("act", module.input_quantizer)):
                spec = q.spec
                if spec.enabled and spec.kind_entry.plain_grid and spec.granularity != "per_token":
                    units.append(BitUnit(names[id(q)], kind, q))
    return units


def average_bits(units: Sequence[BitUnit], chosen: Dict[str, int], kind: str) -> Optional[float]:
    """Σ size·bits / Σ size over the units of one kind (``weight`` or ``act``); None without any."""
    sel = [u for u in units if u.kind == kind]
    total = sum(u.size for u in sel)
    return sum(u.size * chosen[u.name] for u in sel) / total if total else None


def calibrate_widths(ctx: StageContext, model: nn.Module, units: Sequence[BitUnit], bits: Sequence[int]) -> None:
    """Calibrate every unit at every width with the run's observers, fed as :func:`vitq.calibrate`
    feeds them (all quantizers passing through), and measure each unit's size."""
    owners = {}
    for module in model.modules():
        if isinstance(module, QuantLinear):
            owners[module.weight_quantizer] = module.weight
    for u in units:
        config = ctx.weights if u.kind == "weight" else ctx.activations
        u.observers = {b: config.build(u.quantizer.spec.with_(bits=b)) for b in bits}
        if u.kind == "weight":
            weight = owners[u.quantizer].detach()
            u.size = weight.numel()
            for obs in u.observers.values():
                obs.observe(weight)
    acts = {u.quantizer: u for u in units if u.kind == "act"}

    def hook(module: nn.Module, args: Tuple[Tensor, ...]) -> None:
        unit = acts[module]
        x = args[0]
        unit.size = x[0].numel()  # elements per image
        for obs in unit.observers.values():
            obs.observe(x)

    hooks = [q.register_forward_pre_hook(hook) for q in acts]
    try:
        with quantizers_off(model), torch.no_grad():
            for batch in ctx.data:
                model(batch.to(ctx.device))
    finally:
        for h in hooks:
            h.remove()
    for u in units:
        u.qparams = {b: obs.qparams() for b, obs in u.observers.items()}
        u.observers = None


def _kl(reference: Tensor, logits: Tensor) -> float:
    reference, logits = scores_last(reference), scores_last(logits)
    return float(F.kl_div(F.log_softmax(logits, -1), F.log_softmax(reference, -1), log_target=True,
                          reduction="batchmean"))


def _agreement(reference: Tensor, logits: Tensor) -> float:
    reference, logits = scores_last(reference), scores_last(logits)
    return 100.0 * float((reference.argmax(-1) == logits.argmax(-1)).double().mean())


@STAGES.register("greedy_mp")
class GreedyMPStage(Stage):
    """Greedy MP: per-layer weight and activation widths under an average-bits budget. Runs after
    ``calibrate`` (and after ``smooth``); put ``opt_m`` after it so OPT-m sees the final widths."""

    Settings = GreedyMPSettings
    needs_calibrated = True

    def run(self, ctx: StageContext) -> None:
        s: GreedyMPSettings = self.settings
        if s.budget_w is None and s.budget_a is None:
            raise VitqError("greedy_mp needs a budget: budget_w and/or budget_a (on the command line: --budget w4a4)")
        model, device = ctx.model.to(ctx.device).eval(), ctx.device
        budgets = {"weight": s.budget_w, "act": s.budget_a}
        units = [u for u in allocatable_units(model) if budgets[u.kind] is not None]  # no budget: widths kept
        for kind, budget in budgets.items():
            if budget is not None and not any(u.kind == kind for u in units):
                raise VitqError(f"greedy_mp has a {kind} budget but found no uniform {kind} quantizer of a block's "
                                "linear layer to allocate")
        calibrate_widths(ctx, model, units, s.bits)
        images = torch.cat(ctx.data)[: s.max_images].to(device)
        chosen = {u.name: s.bits[0] for u in units}
        with torch.no_grad():
            reference = ctx.float_model.to(device).eval()(images)
            for u in units:
                u.set_bits(s.bits[0])
            base = _kl(reference, model(images))
            damage: Dict[Tuple[str, int], float] = {}
            if s.mode == "oneshot":
                for u in tqdm(units, desc="greedy_mp", unit="unit", disable=not ctx.progress, leave=False):
                    damage[(u.name, s.bits[0])] = base
                    for b in s.bits[1:]:
                        u.set_bits(b)
                        damage[(u.name, b)] = _kl(reference, model(images))
                    u.set_bits(s.bits[0])
            trajectory = [{"avg_w": average_bits(units, chosen, "weight"), "avg_a": average_bits(units, chosen, "act"),
                           "damage": 0.0}]
            current = base
            bar = tqdm(desc="greedy_mp steps", unit="step", disable=not ctx.progress, leave=False)
            while True:
                open_kinds = [k for k, budget in budgets.items()
                              if budget is not None and average_bits(units, chosen, k) > budget + 1e-9]
                if not open_kinds:
                    break
                best = None
                for u in units:
                    if u.kind not in open_kinds:
                        continue
                    i = s.bits.index(chosen[u.name])
                    if i + 1 == len(s.bits):
                        continue
                    b, b_next = s.bits[i], s.bits[i + 1]
                    if s.mode == "oneshot":
                        step = damage[(u.name, b_next)] - damage[(u.name, b)]
                    else:  # measured on the current allocation
                        u.set_bits(b_next)
                        step = _kl(reference, model(images)) - current
                        u.set_bits(b)
                    score = step / (u.size * (b - b_next))
                    if best is None or score < best[0]:
                        best = (score, u, b_next, step)
                if best is None:
                    raise VitqError(f"greedy_mp cannot meet the budget with widths {list(s.bits)}")
                _, u, b_next, step = best
                chosen[u.name] = b_next
                if s.mode == "greedy":
                    u.set_bits(b_next)
                current += step
                trajectory.append({"unit": u.name, "bits": b_next, "avg_w": average_bits(units, chosen, "weight"),
                                   "avg_a": average_bits(units, chosen, "act"), "damage": current - base})
                bar.update(1)
            bar.close()
            for u in units:
                u.set_bits(chosen[u.name])
            checkpoints = self._checkpoints(model, units, trajectory, s, reference, images) if s.checkpoints else []
        ctx.record["greedy_mp"] = {
            **s.to_dict(), "base_kl": base, "bits": chosen,
            "avg_w": average_bits(units, chosen, "weight"), "avg_a": average_bits(units, chosen, "act"),
            "sizes": {u.name: u.size for u in units},
            "sensitivity": {f"{n}@{b}": d - base for (n, b), d in damage.items() if b != s.bits[0]},
            "trajectory": trajectory,
            "checkpoints": checkpoints,
        }
        ctx.log("greedy_mp (%s): %d steps, average bits W%s A%s", s.mode, len(trajectory) - 1,
                ctx.record["greedy_mp"]["avg_w"], ctx.record["greedy_mp"]["avg_a"])

    @staticmethod
    def _checkpoints(model: nn.Module, units: List[BitUnit], trajectory: List[Dict[str, Any]],
                     s: GreedyMPSettings, reference: Tensor, images: Tensor) -> List[Dict[str, Any]]:
        """Replay the trajectory and measure the model (KL, agreement with the float model on the
        calibration images) at evenly spaced steps; the final allocation is restored after."""
        last = len(trajectory) - 1
        picks = sorted({round(i * last / max(1, s.checkpoints - 1)) for i in range(s.checkpoints)}) if last else [0]
        by_name = {u.name: u for u in units}
        final = {u.name: u.quantizer.spec.bits for u in units}
        for u in units:
            u.set_bits(s.bits[0])
        points = []
        for step, point in enumerate(trajectory):
            if step:
                by_name[point["unit"]].set_bits(point["bits"])
            if step in picks:
                logits = model(images)
                points.append({"step": step, "avg_w": point["avg_w"], "avg_a": point["avg_a"],
                               "kl": _kl(reference, logits), "agreement": _agreement(reference, logits)})
        for u in units:
            u.set_bits(final[u.name])
        return points
