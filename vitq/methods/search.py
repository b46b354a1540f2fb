"""Evolutionary search of quantization scales (CPT-V / Evol-Q block-wise, CLAMP-ViT layer-wise).

Three parts, each usable alone:

- :class:`Evolution`, a small seeded ask/tell engine: a population of candidate vectors,
  tournament selection, mutation, optional uniform crossover, replacement of the worst member.
- :data:`FITNESS` (:mod:`vitq.methods.fitness`), registered losses between quantized and float
  outputs: ``infonce`` (CPT-V's global loss on logits), ``local_contrastive`` (CLAMP-ViT's
  layer-local patch loss, a unit-scope fitness), ``mse`` and ``kl``.
- :class:`SearchStage`, the recipe stage ``search`` that walks the units of a model (its blocks
  or its linear layers), searches each unit's scales with the engine, checkpoints after every
  unit (``resume``), and records the fitness curve.

The rules follow the released Evol-Q code (METHODS.md §2.3): the population starts as copies
of the current scales, a child is the best of a tournament of 10 drawn with replacement from 15,
mutated by ``|x + U(-r, r)|``, then the worst member is dropped.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import VitqError
from ..files import atomic_torch_save, load_state
from ..models.adapters import find_adapter, scores_last
from ..nn import QuantLinear
from ..quant import protocol as roles
from ..quant.quantizer import Quantizer
from ..registry import Registry
from .fitness import FITNESS, kl_loss
from .lifecycle import check_bits
from .mixed import BitUnit, allocatable_units, average_bits, calibrate_widths
from .stages import STAGES, Stage, StageContext, StageSettings

Tensor = torch.Tensor
STATE_FILE = "search_state.pt"
MAX_REDRAWS = 20  # children redrawn per cycle before a cycle is given up as over the bit budget

# -- the engine -----------------------------------------------------------------------------------
MUTATIONS: Registry[Callable[[Tensor, float, torch.Generator], Tensor]] = Registry("mutation")


@MUTATIONS.register("absolute")
def mutate_absolute(x: Tensor, radius: float, generator: torch.Generator) -> Tensor:
    """Evol-Q's rule: ``|x + U(-r, r)|`` element-wise (kept above 1e-12 so a scale never hits 0)."""
    noise = (torch.rand(x.shape, generator=generator, dtype=x.dtype) * 2 - 1) * radius
    return (x + noise.to(x.device)).abs().clamp_min(1e-12)


@MUTATIONS.register("relative")
def mutate_relative(x: Tensor, radius: float, generator: torch.Generator) -> Tensor:
    """``x · (1 + U(-r, r))``: the same relative step for small and large scales (an extension)."""
    noise = (torch.rand(x.shape, generator=generator, dtype=x.dtype) * 2 - 1) * radius
    return (x * (1 + noise.to(x.device))).abs().clamp_min(1e-12)


class Evolution:
    """Seeded ask/tell evolution of one parameter vector, lowest fitness best.

    Args:
        x0: the starting vector; the population starts as ``population`` copies of it.
        f0: its fitness (evaluated once: the copies are identical).
        population: members kept.
        tournament: members drawn, with replacement, to pick a parent.
        radius: mutation radius.
        mutation: ``absolute`` or ``relative`` (:data:`MUTATIONS`), or a function
            ``(x, radius, generator) → child``.
        crossover: uniform crossover between two tournament winners before mutation.
        generator: the random stream (seed it for repeatable searches).

    Example (minimise a quadratic):
        >>> g = torch.Generator().manual_seed(0)
        >>> f = lambda x: float(((x - 0.5) ** 2).sum())
        >>> evo = Evolution(torch.ones(4), f(torch.ones(4)), radius=0.1, generator=g)
        >>> for _ in range(200):
        ...     child = evo.ask()
        ...     evo.tell(child, f(child))
        >>> evo.best[1] < 0.05
        True
    """

    def __init__(
        self,
        x0: Tensor,
        f0: float,
        *,
        population: int = 15,
        tournament: int = 10,
        radius: float = 1e-3,
        mutation: Any = "absolute",
        crossover: bool = False,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        if population < 1 or tournament < 1:
            raise VitqError(f"population and tournament must be positive, got {population} and {tournament}")
        if not math.isfinite(f0):
            raise VitqError(f"the starting fitness is {f0}: the quantized model's outputs are not finite")
        self.mutate = mutation if callable(mutation) else MUTATIONS.get(mutation)
        self.radius = float(radius)
        self.tournament = tournament
        self.crossover = crossover
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.members: List[Tuple[Tensor, float]] = [(x0.detach().clone(), float(f0)) for _ in range(population)]
        self.evaluations = 0

    def _select(self) -> Tensor:
        picks = torch.randint(len(self.members), (self.tournament,), generator=self.generator).tolist()
        best = min(picks, key=lambda i: (self.members[i][1], i))
        return self.members[best][0]

    def ask(self) -> Tensor:
        """A child: the tournament winner (crossed with a second winner if asked), mutated."""
        parent = self._select()
        if self.crossover:
            other = self._select()
            mask = torch.rand(parent.shape, generator=self.generator) < 0.5
            parent = torch.where(mask.to(parent.device), parent, other)
        return self.mutate(parent, self.radius, self.generator)

    def tell(self, x: Tensor, fitness: float) -> None:
        """Add an evaluated child and drop the worst member (a non-finite fitness counts as worst)."""
        fitness = float(fitness) if math.isfinite(fitness) else math.inf
        self.members.append((x.detach().clone(), fitness))
        self.members.sort(key=lambda m: m[1])  # stable: among equals the older member stays ahead
        self.members.pop()
        self.evaluations += 1

    @property
    def best(self) -> Tuple[Tensor, float]:
        return self.members[0]


# -- units: what one search step changes ------------------------------------------------------------
@dataclass
class Unit:
    """The quantizers whose scales one search step changes, and the module (``output_name``)
    whose output a layer-local fitness compares."""

    name: str
    quantizers: List[Tuple[str, Quantizer]]
    output_name: str = ""
    block: str = ""  # the block holding every quantizer of the unit: fitness runs from its input

    def genome(self) -> Tensor:
        return torch.cat([q.scale.detach().flatten().float().cpu() for _, q in self.quantizers])

    def set_genome(self, x: Tensor) -> None:
        offset = 0
        for _, q in self.quantizers:
            n = q.scale.numel()
            q.scale.copy_(x[offset:offset + n].view_as(q.scale).to(q.scale))
            offset += n

    @property
    def bits(self) -> int:
        return min(q.spec.bits for _, q in self.quantizers)


def _searchable(q: Quantizer) -> bool:
    return q.enabled and q.scale is not None and q.spec.kind_entry.searchable


TARGETS = ("attn_weights", "mlp_weights", "activations")


def block_units(model: nn.Module, targets: Sequence[str]) -> List[Unit]:
    """One unit per transformer block (CPT-V): the scales named by ``targets``:
    ``attn_weights`` (the attention's linear weights, the paper), ``mlp_weights``,
    ``activations`` (every calibrated activation quantizer in the block)."""
    adapter = find_adapter(model)
    units = []
    for block_name, block in adapter.blocks(model):
        parts = adapter.block_parts(block)
        chosen: List[Tuple[str, Quantizer]] = []
        names = {id(m): n for n, m in block.named_modules()}
        for target in targets:
            if target in ("attn_weights", "mlp_weights"):
                part = parts["attn" if target == "attn_weights" else "mlp"]
                for module in part.modules():
                    if isinstance(module, QuantLinear) and _searchable(module.weight_quantizer):
                        chosen.append((f"{block_name}.{names[id(module)]}.weight_quantizer", module.weight_quantizer))
            else:
                for name, q in block.named_modules():
                    if isinstance(q, Quantizer) and q.role != roles.WEIGHT and _searchable(q):
                        chosen.append((f"{block_name}.{name}", q))
        if chosen:
            units.append(Unit(block_name, chosen, block_name, block_name))
    return units


def layer_units(model: nn.Module, activations: bool = True) -> List[Unit]:
    """One unit per linear layer inside the blocks, in forward order (CLAMP-ViT): its weight
    scales and, with ``activations``, the scale of its input quantizer."""
    adapter = find_adapter(model)
    units = []
    for block_name, block in adapter.blocks(model):
        for name, module in block.named_modules():
            if not isinstance(module, QuantLinear):
                continue
            full = f"{block_name}.{name}"
            chosen = []
            if _searchable(module.weight_quantizer):
                chosen.append((f"{full}.weight_quantizer", module.weight_quantizer))
            if activations and _searchable(module.input_quantizer):
                chosen.append((f"{full}.input_quantizer", module.input_quantizer))
            if chosen:
                units.append(Unit(full, chosen, full, block_name))
    return units


# -- the stage --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SearchSettings(StageSettings):
    """Settings of the ``search`` stage (defaults: the released CPT-V / Evol-Q search).

    Attributes:
        units: ``blocks`` (CPT-V) or ``layers`` (CLAMP-ViT).
        targets: for ``blocks``: which scales (``attn_weights``, ``mlp_weights``, ``activations``);
            for ``layers``: ``activations`` in the list adds each layer's input scale.
        fitness: a name in :data:`FITNESS`: ``infonce``, ``local_contrastive`` (unit scope), ``mse`` or ``kl``.
        temperature: of the fitness (T = 3 for CPT-V's InfoNCE; τ ≈ 0.1 for the local loss).
        output_weight: unit-scope fitness only: weight of a KL on the logits added as tie-breaker.
        population, tournament, cycles, passes: the evolution (cycles = children per unit and pass).
        mutation: ``absolute`` (Evol-Q) or ``relative``.
        radius: mutation radius; ``null`` = 1e-3 below 8 bits and 1e-4 at 8 bits (Evol-Q).
        crossover: uniform crossover of two tournament winners.
        order: ``reverse`` (last unit first, Evol-Q) or ``forward``.
        batch_size: images per fitness batch (InfoNCE uses the other images of a batch as negatives).
        holdout: fraction of the calibration images kept out of the search and used to select the
            best model over the units (0: keep the last model).
        refresh_every: data-free runs: re-synthesise the images from the current quantized model
            every this many cycles (0: never; CLAMP-ViT refreshes every cycles/2).
        max_units: stop after this many unit searches (for tests and trial runs; 0: no limit).
        max_images: search on the first this many calibration images (0: all of them; the
            calibration itself always sees all).
        bits: mixed precision (CLAMP-ViT, ``units: layers``): the candidate widths, e.g.
            ``[3, 4, 5, 6, 7, 8]``; each layer's genome then carries its weight and input widths
            next to its scales (scales are searched as multipliers of the scale calibrated at the
            gene's width, so the mutation radius is relative). Empty: fixed precision.
        budget_w, budget_a: the average weight / input bits the allocation must keep (weighted
            by parameter count / elements per image over the blocks' linear layers: the
            ``blocks`` scope of :mod:`vitq.eval.bits`); a kind without budget keeps its widths.
        budget_mode: ``reject`` (a child over budget is redrawn, up to 20 times, and never
            evaluated) or ``penalty`` (fitness + ``penalty`` · bits over budget).
        penalty: the penalty weight per average bit over budget.
        bit_rate: the probability that a child's width gene moves one candidate up or down.
    """

    units: str = "blocks"
    targets: Tuple[str, ...] = ("attn_weights",)
    fitness: str = "infonce"
    temperature: float = 3.0
    output_weight: float = 0.0
    population: int = 15
    tournament: int = 10
    cycles: int = 3
    passes: int = 10
    mutation: str = "absolute"
    radius: Optional[float] = None
    crossover: bool = False
    order: str = "reverse"
    batch_size: int = 100
    holdout: float = 0.0
    refresh_every: int = 0
    max_units: int = 0
    max_images: int = 0
    bits: Tuple[int, ...] = ()
    budget_w: Optional[float] = None
    budget_a: Optional[float] = None
    budget_mode: str = "reject"
    penalty: float = 1.0
    bit_rate: float = 0.2

    def allocates_widths(self) -> bool:
        return bool(self.bits)  # mixed precision: the genome carries widths

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        if not isinstance(self.bits, (list, tuple)):
            raise VitqError(f"search.bits must be a list of candidate widths (or empty), got {self.bits!r}")
        object.__setattr__(self, "bits", tuple(sorted(set(self.bits))))
        for b in self.bits:
            check_bits(b, "search.bits")
        if self.bits and self.units != "layers":
            raise VitqError("search.bits (mixed precision) needs units: layers (CLAMP-ViT's layer-wise search)")
        if self.bits and self.mutation != "relative":
            raise VitqError("search.bits (mixed precision) searches scales as multipliers: set mutation: relative")
        for key in ("budget_w", "budget_a"):
            value = getattr(self, key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise VitqError(f"search.{key} must be a number of bits, got {value!r}")
            if not self.bits:
                raise VitqError(f"search.{key} needs search.bits, the candidate widths (e.g. [3, 4, 5, 6, 7, 8])")
            if not min(self.bits) <= value <= max(self.bits):
                raise VitqError(f"search.{key} = {value} is outside the candidate widths {list(self.bits)}")
        if self.budget_a is not None and "activations" not in self.targets:
            raise VitqError("search.budget_a allocates input widths: add activations to search.targets")
        if self.budget_mode not in ("reject", "penalty"):
            raise VitqError(f"search.budget_mode must be 'reject' or 'penalty', got {self.budget_mode!r}")
        if not self.penalty >= 0:
            raise VitqError(f"search.penalty must be ≥ 0, got {self.penalty!r}")
        if not 0 <= self.bit_rate <= 1:
            raise VitqError(f"search.bit_rate must be a probability in [0, 1], got {self.bit_rate!r}")
        if self.units not in ("blocks", "layers"):
            raise VitqError(f"search.units must be 'blocks' or 'layers', got {self.units!r}")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise VitqError(f"search.targets must be a non-empty list of {', '.join(TARGETS)}; got {list(self.targets)}")
        FITNESS.get(self.fitness)
        MUTATIONS.get(self.mutation)
        if self.order not in ("reverse", "forward"):
            raise VitqError(f"search.order must be 'reverse' or 'forward', got {self.order!r}")
        for key in ("population", "tournament", "cycles", "passes", "batch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise VitqError(f"search.{key} must be a positive integer, got {value!r}")
        for key in ("refresh_every", "max_units", "max_images"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise VitqError(f"search.{key} must be an integer ≥ 0, got {value!r}")
        if not 0 <= self.holdout < 1:
            raise VitqError(f"search.holdout must be a fraction in [0, 1), got {self.holdout!r}")
        if self.radius is not None and not self.radius > 0:
            raise VitqError(f"search.radius must be positive (or null for Evol-Q's default), got {self.radius!r}")
        if not self.temperature > 0:
            raise VitqError(f"search.temperature must be positive, got {self.temperature!r}")
        if self.output_weight < 0:
            raise VitqError(f"search.output_weight must be ≥ 0, got {self.output_weight!r}")

    def to_dict(self) -> Dict[str, Any]:
        out = super().to_dict()
        out["targets"] = list(self.targets)
        out["bits"] = list(self.bits)
        return out


def _clone(out: Any) -> Any:
    """A copy of a block's output (a tensor or a tuple of them), so nothing downstream can change the cache."""
    if torch.is_tensor(out):
        return out.clone()
    if isinstance(out, (tuple, list)):
        return type(out)(_clone(o) for o in out)
    return out


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the searched layer's output is captured."""


def _rebatch(batches: Sequence[Tensor], size: int, limit: int = 0) -> List[Tensor]:
    images = torch.cat([b[0] if isinstance(b, (tuple, list)) else b for b in batches])
    return list((images[:limit] if limit else images).split(size))


class _Objective:
    """Fitness of the model being searched on fixed batches, with float outputs cached.

    Where the adapter cannot compute the output from a block's input (a backbone inside a dense
    model, whose head reads several blocks), the whole model runs for each fitness, but the blocks
    before the searched unit's replay their outputs cached at :meth:`focus` (their quantizers do not
    change while the unit is searched): the same values as recomputing them, at a fraction of the cost.
    """

    #: replay the unchanged blocks' outputs in whole-model passes (False: recompute them)
    replay_upstream = True

    def __init__(self, settings: SearchSettings, float_model: nn.Module, model: nn.Module,
                 batches: List[Tensor], device: torch.device) -> None:
        self.settings = settings
        self.float_model = float_model
        self.model = model
        self.device = device
        self.loss = FITNESS.get(settings.fitness)
        self.adapter = find_adapter(model)
        self.set_batches(batches)

    def set_batches(self, batches: List[Tensor]) -> None:
        self.batches = [b.to(self.device) for b in batches]
        with torch.no_grad():
            self.float_logits = [scores_last(self.float_model(b)) for b in self.batches]
        self.unit: Optional[Unit] = None
        self.float_outputs: List[Tensor] = []
        self.block_inputs: List[Tensor] = []
        self.upstream: List[Dict[str, Any]] = []  # per batch: the output of each block before the unit's

    def _upstream_outputs(self, block: str, x: Tensor) -> Tuple[Tensor, Dict[str, Any]]:
        """The quantized model's input to ``block`` and output of every block before it, on batch ``x``."""
        names = [name for name, _ in self.adapter.blocks(self.model)]
        before = names[:names.index(block)] if block in names else []
        outputs: Dict[str, Any] = {}
        calls: Dict[str, int] = {}
        captured: List[Tensor] = []

        def keep(mod: nn.Module, args: Any, out: Any, name: str) -> None:
            outputs[name] = out
            calls[name] = calls.get(name, 0) + 1

        handles = [self.model.get_submodule(name).register_forward_hook(
            lambda mod, args, out, name=name: keep(mod, args, out, name)) for name in before]

        def stop(mod: nn.Module, args: Any) -> None:
            captured.append(args[0])
            raise _Stop

        handles.append(self.model.get_submodule(block).register_forward_pre_hook(stop))
        try:
            self.model(x)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        if any(n != 1 for n in calls.values()) or len(calls) != len(before):
            outputs = {}  # a block run twice (or not at all) before the unit's: recompute, do not replay
        return captured[0], outputs

    @contextlib.contextmanager
    def _replaying(self, i: int):
        """Within: the blocks before the unit's return their cached outputs on batch ``i``."""
        replayed = []
        try:
            for name, out in (self.upstream[i].items() if self.upstream else ()):
                module = self.model.get_submodule(name)
                # an instance attribute shadows the class's forward; hooks still run
                module.forward = lambda *args, _out=out, **kwargs: _clone(_out)
                replayed.append(module)
            yield
        finally:
            for module in replayed:
                del module.forward

    def _block_input(self, block: str, x: Tensor) -> Tensor:
        captured: List[Tensor] = []

        def hook(mod: nn.Module, args: Any) -> None:
            captured.append(args[0])
            raise _Stop

        handle = self.model.get_submodule(block).register_forward_pre_hook(hook)
        try:
            self.model(x)
        except _Stop:
            pass
        finally:
            handle.remove()
        return captured[0]

    def _capture(self, model: nn.Module, module_name: str, x: Tensor, stop: bool) -> Tuple[Tensor, Optional[Tensor]]:
        module = model.get_submodule(module_name)
        captured: List[Tensor] = []

        def hook(mod: nn.Module, args: Any, out: Any) -> None:
            captured.append(out[0] if isinstance(out, tuple) else out)
            if stop:
                raise _Stop

        handle = module.register_forward_hook(hook)
        logits = None
        try:
            logits = model(x)
        except _Stop:
            pass
        finally:
            handle.remove()
        return captured[0], logits

    def focus(self, unit: Unit) -> None:
        """Cache the quantized model's input to the unit's block (the blocks before it do not change
        while the unit is searched) and, for the layer-local fitness, the unit's float outputs."""
        self.unit = unit
        local = self.loss.scope == "unit"
        whole = not self.adapter.can_forward_from  # a backbone inside a dense model: the output needs the whole model
        with torch.no_grad():
            if unit.block and whole and self.replay_upstream:
                cached = [self._upstream_outputs(unit.block, b) for b in self.batches]
                self.block_inputs = [c[0] for c in cached]
                self.upstream = [c[1] for c in cached]
            else:
                self.block_inputs = [self._block_input(unit.block, b) for b in self.batches] if unit.block else []
                self.upstream = []
        if whole and not local:
            self.block_inputs = []
        if not local:
            return
        with torch.no_grad():
            self.float_outputs = [self._capture(self.float_model, unit.output_name, b, stop=True)[0]
                                  for b in self.batches]

    def _logits(self, i: int) -> Tensor:
        if self.block_inputs and self.adapter.can_forward_from:
            return scores_last(self.adapter.forward_from(self.model, self.unit.block, self.block_inputs[i]))
        with self._replaying(i):
            return scores_last(self.model(self.batches[i]))

    def _local(self, i: int, with_logits: bool) -> Tuple[Tensor, Optional[Tensor]]:
        """The unit's output on batch ``i`` (and the logits when asked), from its block's input."""
        captured: List[Tensor] = []

        def hook(mod: nn.Module, args: Any, out: Any) -> None:
            captured.append(out)
            if not with_logits:
                raise _Stop

        handle = self.model.get_submodule(self.unit.output_name).register_forward_hook(hook)
        logits = None
        try:
            if with_logits:
                logits = self._logits(i)
            else:
                self.model.get_submodule(self.unit.block)(self.block_inputs[i])
        except _Stop:
            pass
        finally:
            handle.remove()
        return captured[0], logits

    def __call__(self) -> float:
        s = self.settings
        total = 0.0
        with torch.no_grad():
            for i in range(len(self.batches)):
                if self.loss.scope == "unit":
                    if self.unit is None or not self.block_inputs:
                        raise VitqError(f"the unit-scope fitness {s.fitness} needs a unit: call focus(unit) first")
                    out, logits = self._local(i, with_logits=s.output_weight > 0)
                    loss = self.loss(out, self.float_outputs[i], s.temperature)
                    if logits is not None:
                        loss = loss + s.output_weight * kl_loss(logits, self.float_logits[i])
                else:
                    loss = self.loss(self._logits(i), self.float_logits[i], s.temperature)
                total += float(loss)
        return total / len(self.batches)


def _quantizer_state(model: nn.Module) -> Dict[str, Dict[str, Any]]:
    """Each calibrated quantizer's width, scale and zero point (what a search may change)."""
    return {n: {"bits": int(m.spec.bits), "scale": m.scale.detach().clone().cpu(),
                "zero_point": m.zero_point.detach().clone().cpu()}
            for n, m in model.named_modules() if isinstance(m, Quantizer) and m.scale is not None}


def _load_quantizer_state(model: nn.Module, state: Dict[str, Dict[str, Any]]) -> None:
    modules = dict(model.named_modules())
    for name, saved in state.items():
        q = modules[name]
        device = q.scale.device
        if saved["bits"] != q.spec.bits:
            q.set_spec(q.spec.with_(bits=saved["bits"]))
        q.set_qparams(saved["scale"].to(device), saved["zero_point"].to(device))


class _MixedGenome:
    """CLAMP-ViT's mixed-precision genome of a layer unit: ``[scale multipliers…, widths…]``.

    Each quantizer of the unit is calibrated at every candidate width once; a genome sets its
    width gene and its scale = calibrated scale at that width × multiplier. Every gene starts at
    the widest candidate within its budget; quantizers of a kind without budget keep their
    width (and their raw scales are in the genome, as in fixed precision).
    """

    def __init__(self, ctx: StageContext, model: nn.Module, units: List[Unit], settings: SearchSettings) -> None:
        self.settings = s = settings
        budgets = {"weight": s.budget_w, "act": s.budget_a}
        self.budgets = {k: v for k, v in budgets.items() if v is not None}
        if not self.budgets:
            raise VitqError("search.bits (mixed precision) needs a budget: budget_w and/or budget_a "
                            "(on the command line: --budget w4.7a5.9)")
        searched = {id(q) for u in units for _, q in u.quantizers}
        self.units: List[BitUnit] = [b for b in allocatable_units(model)
                                     if b.kind in self.budgets and id(b.quantizer) in searched]
        for kind in self.budgets:
            if not any(b.kind == kind for b in self.units):
                raise VitqError(f"search has a {kind} budget but none of its layers has a uniform {kind} quantizer "
                                "to give a width")
        calibrate_widths(ctx, model, self.units, s.bits)
        for b in self.units:  # start: the widest candidate within the budget (other points keep theirs)
            b.set_bits(max(w for w in s.bits if w <= self.budgets[b.kind] + 1e-9))
        self.by_quantizer = {id(b.quantizer): b for b in self.units}
        self.chosen = {b.name: int(b.quantizer.spec.bits) for b in self.units}
        self.rejected = 0

    def averages(self, chosen: Dict[str, int]) -> Dict[str, Optional[float]]:
        return {kind: average_bits(self.units, chosen, kind) for kind in ("weight", "act")}

    def over_budget(self, chosen: Dict[str, int]) -> float:
        avg = self.averages(chosen)
        return sum(max(0.0, avg[k] - budget) for k, budget in self.budgets.items())

    def describe(self, chosen: Dict[str, int]) -> str:
        avg = self.averages(chosen)
        return " ".join(f"{'W' if k == 'weight' else 'A'}{avg[k]:.3f}" for k in ("weight", "act") if avg[k] is not None)

    def describe_budget(self) -> str:
        return " ".join(f"{'W' if k == 'weight' else 'A'}{v}" for k, v in self.budgets.items())

    def _genes(self, unit: Unit) -> List[BitUnit]:
        return [self.by_quantizer[id(q)] for _, q in unit.quantizers if id(q) in self.by_quantizer]

    def genome(self, unit: Unit) -> Tensor:
        parts = []
        for _, q in unit.quantizers:
            b = self.by_quantizer.get(id(q))
            if b is None:  # no width gene: the scale itself, as in fixed precision
                parts.append(q.scale.detach().flatten().float().cpu())
            else:
                base = b.qparams[q.spec.bits][0].to(q.scale)
                parts.append((q.scale / base).detach().flatten().float().cpu())
        widths = torch.tensor([float(b.quantizer.spec.bits) for b in self._genes(unit)])
        return torch.cat(parts + [widths])

    def allocation(self, unit: Unit, x: Tensor) -> Dict[str, int]:
        """The whole model's widths with this unit's genes from ``x``."""
        genes = self._genes(unit)
        chosen = dict(self.chosen)
        for b, w in zip(genes, x[len(x) - len(genes):].tolist()):
            chosen[b.name] = int(round(w))
        return chosen

    def set_genome(self, unit: Unit, x: Tensor) -> None:
        chosen = self.allocation(unit, x)
        offset = 0
        for _, q in unit.quantizers:
            b = self.by_quantizer.get(id(q))
            n = q.scale.numel()
            multiplier = x[offset:offset + n]
            offset += n
            if b is None:
                q.scale.copy_(multiplier.view_as(q.scale).to(q.scale))
                continue
            width = chosen[b.name]
            scale, zero_point = b.qparams[width]
            if width != q.spec.bits:
                q.set_spec(q.spec.with_(bits=width))
            device = scale.device if q.scale is None else q.scale.device
            q.set_qparams((scale.to(device).flatten() * multiplier.to(device)).view_as(scale), zero_point.to(device))
        self.chosen = chosen

    def mutation(self, unit: Unit) -> Callable[[Tensor, float, torch.Generator], Tensor]:
        """Scale multipliers by the recipe's mutation; each width gene moves one candidate with
        probability ``bit_rate``."""
        n_genes = len(self._genes(unit))
        scale_mutation = MUTATIONS.get(self.settings.mutation)
        widths = list(self.settings.bits)

        def mutate(x: Tensor, radius: float, generator: torch.Generator) -> Tensor:
            head = scale_mutation(x[: len(x) - n_genes], radius, generator)
            genes = x[len(x) - n_genes:].clone()
            moves = torch.rand(n_genes, generator=generator) < self.settings.bit_rate
            ups = torch.rand(n_genes, generator=generator) < 0.5
            for i in range(n_genes):
                if moves[i]:
                    j = widths.index(int(round(float(genes[i])))) + (1 if ups[i] else -1)
                    genes[i] = float(widths[min(max(j, 0), len(widths) - 1)])
            return torch.cat([head, genes])

        return mutate


@STAGES.register("search")
class SearchStage(Stage):
    """Evolutionary search of quantization scales, unit by unit (CPT-V blocks, CLAMP-ViT layers)."""

    Settings = SearchSettings

    def units(self, model: nn.Module) -> List[Unit]:
        s = self.settings
        if s.units == "blocks":
            units = block_units(model, s.targets)
        else:
            units = layer_units(model, activations="activations" in s.targets)
        if not units:
            raise VitqError(
                f"the search found no calibrated {s.units} with scales to search for targets {list(s.targets)}: "
                "is every quantizer in them disabled or dynamic (per-token)?"
            )
        return units

    def run(self, ctx: StageContext) -> None:
        s: SearchSettings = self.settings
        fitness = FITNESS.get(s.fitness)
        if s.units == "layers" and fitness.scope != "unit":
            ctx.log("search: layer units with a model-scope fitness (%s) — the paper's CLAMP uses a layer-local one "
                    "(local_contrastive)", s.fitness)
        if s.units == "blocks" and fitness.scope == "unit":
            raise VitqError(f"search.fitness {s.fitness} compares one layer's output: use units: layers")
        if s.holdout and s.refresh_every and ctx.refresh is not None:
            raise VitqError("search.holdout and search.refresh_every cannot be combined: refreshed images have no "
                            "held-out counterpart; set one of them to 0")
        model, device = ctx.model.to(ctx.device).eval(), ctx.device
        float_model = ctx.float_model.to(device).eval()
        units = self.units(model)
        if s.order == "reverse":
            units = units[::-1]
        mp = _MixedGenome(ctx, model, units, s) if s.bits else None
        get_genome: Callable[[Unit], Tensor] = mp.genome if mp else Unit.genome
        put_genome: Callable[[Unit, Tensor], None] = mp.set_genome if mp else Unit.set_genome

        def penalty(unit: Unit, x: Tensor) -> float:
            if mp is None or s.budget_mode != "penalty":
                return 0.0
            return s.penalty * mp.over_budget(mp.allocation(unit, x))

        def over(unit: Unit, x: Tensor) -> bool:
            return mp is not None and s.budget_mode == "reject" and mp.over_budget(mp.allocation(unit, x)) > 1e-9
        batches = _rebatch(ctx.data, s.batch_size, s.max_images)
        holdout: List[Tensor] = []
        if s.holdout > 0:
            images = torch.cat(batches)
            n_hold = int(round(len(images) * s.holdout))
            if n_hold < 2 or len(images) - n_hold < 2:
                raise VitqError(f"search.holdout {s.holdout} of {len(images)} images leaves too few on one side: "
                                "use more calibration images or holdout: 0")
            perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(ctx.seed))
            holdout = list(images[perm[:n_hold]].split(s.batch_size))
            batches = list(images[perm[n_hold:]].split(s.batch_size))
        objective = _Objective(s, float_model, model, batches, device)
        judge_fitness, judge_temperature = fitness.judge or (s.fitness, s.temperature)
        judge = _Objective(s.replace(fitness=judge_fitness, temperature=judge_temperature),
                           float_model, model, holdout, device) if holdout else None

        state_path = ctx.workdir / STATE_FILE if ctx.workdir is not None else None
        total = s.passes * len(units)
        if s.max_units:
            total = min(total, s.max_units)
        generator = torch.Generator().manual_seed(ctx.seed)
        start, evaluations, cycles_done = 0, 0, 0
        curve: List[Dict[str, Any]] = []
        refreshes: List[int] = []
        best_select, best_state, best_step = math.inf, None, -1
        if ctx.resume and state_path is not None and state_path.exists():
            state = load_state(state_path)
            same = {k: v for k, v in s.to_dict().items() if k != "max_units"}
            if {k: v for k, v in state["settings"].items() if k != "max_units"} != same or state["seed"] != ctx.seed or state["units"] != [u.name for u in units]:
                raise VitqError(f"{state_path} was written by a search with other settings, seed or model: "
                                "start a new run (drop --resume) or resume with the same options")
            _load_quantizer_state(model, state["scales"])
            generator.set_state(state["rng"])
            start, evaluations, cycles_done = state["next"], state["evaluations"], state["cycles_done"]
            curve, refreshes = state["curve"], state["refreshes"]
            best_select, best_state, best_step = state["best_select"], state["best_state"], state["best_step"]
            if state.get("data") is not None:
                objective.set_batches(state["data"])
            if mp is not None:
                mp.chosen = {b.name: int(b.quantizer.spec.bits) for b in mp.units}
                mp.rejected = state.get("rejected", 0)
            ctx.log("search: resumed from %s at unit %d of %d", state_path, start, total)
        elif judge is not None:
            best_select, best_state, best_step = judge(), _quantizer_state(model), 0

        t0 = time.perf_counter()
        bar = tqdm(total=total, initial=start, desc="search", unit="unit", disable=not ctx.progress, leave=False)
        for step in range(start, total):
            unit = units[step % len(units)]
            objective.focus(unit)
            x0 = get_genome(unit)
            f0 = objective() + penalty(unit, x0)
            evaluations += 1
            radius = s.radius if s.radius is not None else (1e-4 if unit.bits >= 8 else 1e-3)
            mutation = mp.mutation(unit) if mp else s.mutation
            evo = Evolution(x0, f0, population=s.population, tournament=s.tournament, radius=radius,
                            mutation=mutation, crossover=s.crossover, generator=generator)
            curve.append({"evaluations": evaluations, "step": step, "unit": unit.name, "fitness": f0, "event": "start"})
            for _ in range(s.cycles):
                child = evo.ask()
                for _ in range(MAX_REDRAWS):  # reject children over the bit budget (never evaluated)
                    if not over(unit, child):
                        break
                    mp.rejected += 1
                    child = evo.ask()
                if over(unit, child):
                    mp.rejected += 1
                else:
                    put_genome(unit, child)
                    evo.tell(child, objective() + penalty(unit, child))
                    evaluations += 1
                cycles_done += 1
                curve.append({"evaluations": evaluations, "step": step, "unit": unit.name, "fitness": evo.best[1]})
                if s.refresh_every and ctx.refresh is not None and cycles_done % s.refresh_every == 0:
                    put_genome(unit, evo.best[0])
                    new = ctx.refresh(model, objective.batches, cycles_done)
                    objective.set_batches([b.to(device) for b in new])
                    objective.focus(unit)
                    best_x = evo.best[0]
                    f_new = objective() + penalty(unit, best_x)
                    evaluations += 1
                    evo = Evolution(best_x, f_new, population=s.population, tournament=s.tournament, radius=radius,
                                    mutation=mutation, crossover=s.crossover, generator=generator)
                    refreshes.append(evaluations)
                    curve.append({"evaluations": evaluations, "step": step, "unit": unit.name, "fitness": f_new,
                                  "event": "refresh"})
            put_genome(unit, evo.best[0])
            record = {"evaluations": evaluations, "step": step, "unit": unit.name, "fitness": evo.best[1], "event": "end"}
            if judge is not None:
                held = judge()
                record["holdout"] = held
                if held < best_select:
                    best_select, best_state, best_step = held, _quantizer_state(model), step + 1
            curve.append(record)
            bar.update(1)
            bar.set_postfix(fitness=f"{evo.best[1]:.4f}", unit=unit.name)
            if state_path is not None:
                atomic_torch_save({
                    "settings": s.to_dict(), "seed": ctx.seed, "units": [u.name for u in units], "next": step + 1,
                    "scales": _quantizer_state(model), "rng": generator.get_state(), "evaluations": evaluations,
                    "cycles_done": cycles_done, "curve": curve, "refreshes": refreshes,
                    "best_select": best_select, "best_state": best_state, "best_step": best_step,
                    "data": [b.cpu() for b in objective.batches] if refreshes else None,
                    "rejected": mp.rejected if mp else 0,
                }, state_path)
        bar.close()
        selected = "last"
        if best_state is not None:
            _load_quantizer_state(model, best_state)
            if mp is not None:
                mp.chosen = {b.name: int(b.quantizer.spec.bits) for b in mp.units}
            selected = f"after {best_step} unit searches (held-out {judge.settings.fitness} {best_select:.4f})"
        seconds = time.perf_counter() - t0
        first = next((c["fitness"] for c in curve if c.get("event") == "start"), None)
        starts = {c["step"]: c["fitness"] for c in curve if c.get("event") in ("start", "refresh")}
        gains = [(starts[c["step"]] - c["fitness"]) / abs(starts[c["step"]]) for c in curve
                 if c.get("event") == "end" and starts.get(c["step"])]
        ctx.record["search"] = {
            "units": len(units), "unit_searches": total, "evaluations": evaluations, "seconds": round(seconds, 2),
            "first_fitness": first, "last_fitness": curve[-1]["fitness"] if curve else None,
            "refreshes": refreshes, "selected": selected, "fitness": s.fitness,
            "mean_unit_gain": sum(gains) / len(gains) if gains else None,
            "improved_units": sum(g > 0 for g in gains),
            "images": sum(len(b) for b in objective.batches), "holdout_images": sum(len(b) for b in holdout),
        }
        if mp is not None:
            avg = mp.averages(mp.chosen)
            ctx.record["search"]["mixed"] = {
                "avg_w": avg["weight"], "avg_a": avg["act"], "budget_w": s.budget_w, "budget_a": s.budget_a,
                "budget_mode": s.budget_mode, "over_budget": mp.over_budget(mp.chosen), "rejected": mp.rejected,
                "bits": dict(mp.chosen),
            }
            ctx.log("search: mixed precision %s (budget %s), %d children rejected over budget",
                    mp.describe(mp.chosen), mp.describe_budget(), mp.rejected)
        ctx.record["search_curve"] = curve
        ctx.log("search: %d unit searches, %d evaluations in %.1f s; fitness %s → %s; model %s",
                total, evaluations, seconds, f"{first:.4f}" if first is not None else "—",
                f"{curve[-1]['fitness']:.4f}" if curve else "—", selected)
