"""Block-wise reconstruction, the ``reconstruct`` stage: BRECQ (Li et al., 2021) with AdaRound
weight rounding (Nagel et al., 2020), learned activation step sizes (LSQ, Esser et al., 2020)
and QDrop's random dropping of activation quantization (Wei et al., 2022).
With ``head_blocks`` the last blocks are also fitted to the model's output (the float rest of the
model run on their output; ``head_loss``): the classifier reads one token, the MSE weighs all alike.

Block after block in forward order, the block of the quantized model is trained to reproduce
the float block's output on cached calibration inputs:

    min  ‖ f_q(X_q) − f(X_fp) ‖²  +  λ · Σ (1 − |2·h(V) − 1|^β)        (BRECQ eq. 8, AdaRound eq. 25)

- X_q: the block's input in the quantized model (every block before it already reconstructed);
  X_fp: its input in the float model; f: the float block.
- Each weight rounds down or up by a learned ``h(V) = clamp(σ(V)·(ζ − γ) + γ, 0, 1)`` on the
  weight quantizer's grid (ζ = 1.1, γ = −0.1); the regulariser, with β annealed from 20 to 2 after
  a warm-up, drives h to 0 or 1, and at the end each weight takes its hard rounding.
- The per-tensor scales of the block's uniform activation quantizers are learned too (LSQ), and
  with QDrop each activation element keeps its float value with probability ``drop_prob``.

The rounded weights are written into the model (plans store them, as for GPTQ) and the learned
scales into the quantizers. On 2 CPU cores DeiT-Tiny costs about 0.1 s per iteration and block
at batch 8 (``iterations`` = 200: about 4 minutes); the papers use 20,000 iterations per block
on a GPU.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from ..errors import VitqError
from ..models.adapters import find_adapter
from ..nn import QuantLinear
from ..quant import protocol as roles
from ..quant.quantizer import Quantizer
from .gptq import mark_changed
from .lifecycle import next_block_inputs, sequence_successors
from .smooth import fold_smoothing, smoothing_of
from .stages import STAGES, Stage, StageContext, StageSettings

Tensor = torch.Tensor
ZETA, GAMMA = 1.1, -0.1


class _SoftRound(nn.Module):
    """A parametrisation of a weight: ``s · (clamp(floor(W/s) + h(V) + z, qmin, qmax) − z)``.

    ``W`` is the weight to round (the float one); ``start``, when given, is a rounding already
    chosen (GPTQ's, which may lie more than one step from W): each weight then chooses between
    that grid point and its neighbour towards the float weight, and training begins at the
    chosen one, ``margin`` of a step from it towards the neighbour (1e-4: at it; 0.5: undecided).
    """

    def __init__(self, weight: Tensor, quantizer: Quantizer, start: Optional[Tensor] = None,
                 margin: float = 1e-4) -> None:
        super().__init__()
        spec = quantizer.spec
        shape = (-1,) + (1,) * (weight.ndim - 1) if quantizer.scale.numel() > 1 else ()
        self.register_buffer("scale", quantizer.scale.detach().reshape(shape).to(weight))
        self.register_buffer("zero_point", quantizer.zero_point.detach().reshape(shape).to(weight))
        self.qmin, self.qmax = spec.qrange
        base = weight.detach() / self.scale
        if start is None:
            self.register_buffer("floor", torch.floor(base))
        else:  # the window [q − 1, q] or [q, q + 1] on the float weight's side of GPTQ's q
            chosen = torch.round(start.detach().to(weight) / self.scale)
            self.register_buffer("floor", torch.where(base < chosen, chosen - 1, chosen))
            base = chosen
        rest = (base - self.floor).clamp(1e-4, 1 - 1e-4)
        if start is not None:
            rest = rest.clamp(margin, 1 - margin)
        # V such that h(V) equals the fractional part: training starts at the float weight
        self.V = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
        self.hard = False

    def h(self) -> Tensor:
        return torch.clamp(torch.sigmoid(self.V) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def forward(self, weight: Tensor) -> Tensor:
        up = (self.V >= 0).to(weight) if self.hard else self.h()
        q = torch.clamp(self.floor + up + self.zero_point, self.qmin, self.qmax)
        return (q - self.zero_point) * self.scale

    def regulariser(self, beta: float) -> Tensor:
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()


def _split(n: int, holdout: float, generator):
    """Indices of the images a block trains on and of those it is checked on (None: no check)."""
    k = int(round(n * holdout))
    if not holdout or k < 1 or k >= n:
        return torch.arange(n), None
    order = torch.randperm(n, generator=generator)
    return order[k:].sort().values, order[:k].sort().values


def _snapshot(block: nn.Module):
    """What training changes in a block: its quantized layers' weights and its quantizers' scales."""
    weights = {m: m.weight.detach().clone() for m in block.modules() if isinstance(m, QuantLinear)}
    scales = {q: q.scale.detach().clone() for q in block.modules()
              if isinstance(q, Quantizer) and q.scale is not None}
    return weights, scales


def _restore(block: nn.Module, saved) -> None:
    weights, scales = saved
    with torch.no_grad():
        for m, w in weights.items():
            m.weight.copy_(w)
    for q, scale in scales.items():
        q.scale = scale


class _frozen:
    """The float model's parameters kept out of autograd while a block's loss runs through it."""

    def __init__(self, model: nn.Module) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]

    def __enter__(self):
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(True)


class _Objective:
    """A block's training loss: its output's squared error summed over channels (mean over tokens and
    images), plus, with ``head`` (the float rest of the model, from the block's output to logits or,
    with ``head_loss`` ``features``, to the pooled features), ``head_weight`` times the KL divergence
    of the class probabilities from the float model's (or the features' squared error), scaled so
    that both terms start at the ratio ``head_weight`` on the training images. ``head_term`` holds
    that term's value (unscaled) before and after training."""

    CHUNK = 32

    def __init__(self, block, inputs, target, kwargs, s: ReconstructSettings, train, head=None) -> None:
        self.block, self.inputs, self.target, self.kwargs, self.head = block, inputs, target, kwargs, head
        self.train = train.to(inputs.device)  # positions of the training images in ``inputs``
        self.scale = 0.0
        self.head_term: List[float] = []
        if head is None:
            return
        self.features = s.head_loss == "features"
        with torch.no_grad():
            self.reference = torch.cat([head(t) if self.features else F.log_softmax(head(t), -1)
                                     for t in target.split(self.CHUNK)])
            mse = self._mean(self.train, self._mse)
            start = self.head_value(self.train)
        self.head_term.append(start)
        self.scale = s.head_weight * mse / start if start > 0 else 0.0

    def _mse(self, out: Tensor, idx: Tensor) -> Tensor:
        return F.mse_loss(out, self.target[idx], reduction="none").sum(-1).mean()

    def _head(self, out: Tensor, idx: Tensor) -> Tensor:
        if self.features:
            return F.mse_loss(self.head(out), self.reference[idx], reduction="none").sum(-1).mean()
        return F.kl_div(F.log_softmax(self.head(out), -1), self.reference[idx], log_target=True, reduction="batchmean")

    def _mean(self, idx: Tensor, fn) -> float:
        total = 0.0
        for part in idx.split(self.CHUNK):
            total += float(fn(self.block(self.inputs[part], **self.kwargs), part)) * len(part)
        return total / max(1, len(idx))

    def head_value(self, idx: Tensor) -> float:
        """The head term on images ``idx`` (no gradient), unscaled."""
        with torch.no_grad():
            return self._mean(idx, self._head)

    def measure(self, idx: Tensor) -> float:
        """The loss on images ``idx`` (no gradient): the output MSE, plus the scaled head term with a head."""
        with torch.no_grad():
            if self.head is None:
                return float(F.mse_loss(self.block(self.inputs[idx], **self.kwargs), self.target[idx]))
            return self._mean(idx, self._loss)

    def _loss(self, out: Tensor, idx: Tensor) -> Tensor:
        loss = self._mse(out, idx)
        if self.head is not None and self.scale:
            loss = loss + self.scale * self._head(out, idx)
        return loss

    def __call__(self, out: Tensor, idx: Tensor) -> Tensor:
        """The training loss of the block's output ``out`` on the ``idx``-th training images."""
        return self._loss(out, self.train[idx])


@dataclass(frozen=True)
class ReconstructSettings(StageSettings):
    """Settings of the ``reconstruct`` stage.

    Attributes:
        iterations: optimiser steps per block (BRECQ/QDrop: 20,000 on a GPU; 200 is a CPU budget).
        batch_size: calibration images per step.
        lr: Adam's learning rate for the rounding variables V.
        act_lr: learning rate of the activation scales (0: keep the calibrated scales).
        weight: λ, the weight of the rounding regulariser.
        warmup: fraction of the iterations without the regulariser.
        drop_prob: QDrop: probability that an activation element keeps its float value during
            training (0: BRECQ without dropping).
        from_float: when a stage (GPTQ) rounded the weights before, each weight chooses between
            its rounding and the grid point next to it towards the float weight, starting from its
            rounding; false: round the model's current weights as if they were float, which after
            GPTQ already lie on the grid, so that each can only stay or move one step up.
        start_margin: where the soft rounding of a weight a stage already rounded (GPTQ) starts, in
            grid steps from that rounding towards the other choice: 1e-4 starts at the rounding, from
            where Adam at ``lr`` 1e-3 cannot reach the other choice in 200 iterations (its V would
            have to move about 2.4); 0.5 starts undecided.
        holdout: fraction of the calibration images kept out of each block's training (0: none):
            a block whose output error on them is not lower after training than before keeps the
            rounding and activation scales it had (a guard against fitting a few images).
        head_blocks: how many of the last blocks are fitted to the model's output as well as to their
            own (0: none): their loss adds the KL divergence between the float model's class
            probabilities and those of the float rest of the model (later blocks and head) run on the
            block's quantized output. A block's MSE weighs each token alike, while the head reads the
            class token (ViT) or the mean token (Swin): at W6A6 on DeiT-Tiny most of the last block's
            loss is the class token's query (``benchmarks/diagnose_points.py``). Classifiers only: for a
            backbone inside a dense model the setting is ignored (and the plan's record says so).
        head_weight: the weight of that term against the block's MSE, both as measured when the
            block's training starts (1: equal parts; the MSE term keeps its scale, so ``weight``
            means the same).
        head_loss: what that term compares: ``kl``, the class probabilities (as above), or
            ``features``, the squared error of the pooled features the classifier reads (the final
            norm's class token for ViT, its mean token for Swin), summed over channels.

    The bit-widths it runs at, and settings of one bit-width, are the framework's (every stage has
    them: :class:`vitq.methods.stages.StageConfig`): the recommended recipe reconstructs at 4 or more
    weight bits with 6 or more activation bits (``min_w_bits: 4, min_a_bits: 6``), and at W4A4 with
    a holdout (``by_bits: {w4a4: {min_a_bits: 4, holdout: 0.2}}``), where the choice on held-out
    calibration images found it helps (see its YAML).
    """

    iterations: int = 200
    batch_size: int = 8
    lr: float = 1e-3
    act_lr: float = 4e-5
    weight: float = 0.01
    warmup: float = 0.2
    drop_prob: float = 0.5
    from_float: bool = True
    start_margin: float = 1e-4
    holdout: float = 0.0
    head_blocks: int = 0
    head_weight: float = 1.0
    head_loss: str = "kl"

    def __post_init__(self) -> None:
        for key in ("iterations", "batch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise VitqError(f"reconstruct.{key} must be a positive integer, got {value!r}")
        for key, lo, hi in (("lr", 0, 1), ("act_lr", 0, 1), ("weight", 0, math.inf), ("warmup", 0, 1),
                            ("drop_prob", 0, 1)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
                raise VitqError(f"reconstruct.{key} must be a number from {lo} to {hi}, got {value!r}")
        if self.lr <= 0:
            raise VitqError("reconstruct.lr must be positive")
        if isinstance(self.start_margin, bool) or not isinstance(self.start_margin, (int, float)) or \
                not 1e-4 <= self.start_margin <= 0.5:
            raise VitqError(f"reconstruct.start_margin must be a number from 0.0001 to 0.5, got {self.start_margin!r}")
        if not isinstance(self.from_float, bool):
            raise VitqError(f"reconstruct.from_float must be true or false, got {self.from_float!r}")
        if isinstance(self.holdout, bool) or not isinstance(self.holdout, (int, float)) or not 0 <= self.holdout < 1:
            raise VitqError(f"reconstruct.holdout must be a fraction in [0, 1), got {self.holdout!r}")
        if isinstance(self.head_blocks, bool) or not isinstance(self.head_blocks, int) or self.head_blocks < 0:
            raise VitqError(f"reconstruct.head_blocks must be a whole number of blocks (0: none), got {self.head_blocks!r}")
        if isinstance(self.head_weight, bool) or not isinstance(self.head_weight, (int, float)) or \
                not 0 < self.head_weight < math.inf:
            raise VitqError(f"reconstruct.head_weight must be a positive number, got {self.head_weight!r}")
        if self.head_loss not in ("kl", "features"):
            raise VitqError(f"reconstruct.head_loss must be 'kl' or 'features', got {self.head_loss!r}")


@STAGES.register("reconstruct")
class ReconstructStage(Stage):
    """Block reconstruction (BRECQ/QDrop): learn each block's weight rounding (AdaRound) and
    activation step sizes against the float block's output on cached calibration inputs, with
    QDrop's random dropping of activation quantization. Runs after ``calibrate`` (and ``gptq``)."""

    Settings = ReconstructSettings

    def run(self, ctx: StageContext) -> None:
        s: ReconstructSettings = self.settings
        model = ctx.model.to(ctx.device)
        float_model = ctx.float_model.to(ctx.device).eval()
        adapter = find_adapter(model)
        blocks = adapter.blocks(model)
        float_blocks = dict(adapter.blocks(float_model))
        images = [b.to(ctx.device) for b in ctx.data]
        follows_q, follows_f = sequence_successors(model), sequence_successors(float_model)
        names = {m: n for n, m in model.named_modules()}
        generator = torch.Generator().manual_seed(ctx.seed)
        # QDrop's masks are drawn where the activations are: on a GPU, drawing millions of numbers
        # a step on the host and copying them over cost ~20 ms a step (49 of 55 s of DeiT-Tiny's
        # W4A8 recipe on an H200). On the CPU they stay in the one generator, so CPU plans are as before.
        masks = generator if torch.device(ctx.device).type == "cpu" else \
            torch.Generator(device=ctx.device).manual_seed(ctx.seed)
        losses: Dict[str, List[float]] = {}
        held: Dict[str, List[float]] = {}
        codes: Dict[str, float] = {}  # per block: the fraction of its weights rounded otherwise than before
        reverted: List[str] = []
        changed: List[str] = []
        prev_q = prev_f = xq = xf = None
        reference = None
        head_names = [n for n, _ in blocks[max(0, len(blocks) - s.head_blocks):]] if s.head_blocks else []
        ignored = None
        if head_names and not adapter.can_forward_from:
            ignored = ("the model's output cannot be computed from one block (a backbone inside a dense model): "
                       "every block was fitted to its own output")
            ctx.log(f"reconstruct: head_blocks ignored: {ignored}")
            head_names = []
        head_terms: Dict[str, List[float]] = {}
        if s.from_float:  # the float weights in this model's coordinates (its folds applied)
            reference = fold_smoothing(copy.deepcopy(ctx.float_model), smoothing_of(model)).to(ctx.device)
        for name, block in tqdm(blocks, desc="reconstruct", unit="block", disable=not ctx.progress, leave=False):
            fblock = float_blocks[name]
            with torch.no_grad():
                xq = next_block_inputs(model, block, prev_q, xq, follows_q, images, ctx.device)
                xf = next_block_inputs(float_model, fblock, prev_f, xf, follows_f, images, ctx.device)
                target = torch.cat([fblock(*a, **k) for a, k in xf])
            inputs = torch.cat([a[0] for a, _ in xq])
            floats = None
            if reference is not None:
                floats = {m: reference.get_submodule(names[m]).weight.detach() for m in block.modules()
                          if isinstance(m, QuantLinear)}
            train, check = _split(inputs.shape[0], s.holdout, generator)
            saved = _snapshot(block) if check is not None else None
            objective = _Objective(block, inputs, target, xq[0][1], s, train,
                                   (lambda y, n=name: adapter.forward_after(float_model, n, y,
                                                                             pre_logits=s.head_loss == "features"))
                                   if name in head_names else None)
            if check is not None:
                held_before = objective.measure(check)
            with _frozen(float_model):
                before, after, moved, total = self._train(block, inputs[train], target[train], xq[0][1], s,
                                                          generator, floats, masks,
                                                          objective if objective.head is not None else None)
            losses[name] = [round(before, 6), round(after, 6)]
            codes[name] = round(moved / max(1, total), 6)
            if objective.head is not None:
                head_terms[name] = [round(v, 6) for v in objective.head_term]
            if check is not None:
                held_after = objective.measure(check)
                held[name] = [round(held_before, 6), round(held_after, 6)]
                if held_after >= held_before:  # no better on images it never saw: keep what it had
                    _restore(block, saved)
                    reverted.append(name)
                    codes[name] = 0.0
                    prev_q, prev_f = block, fblock
                    continue
            changed += [f"{names[m]}.weight" for m in block.modules()
                        if isinstance(m, QuantLinear) and m.weight_quantizer.spec.enabled]
            prev_q, prev_f = block, fblock
        mark_changed(model, changed)
        ctx.record["reconstruct"] = {**s.to_dict(), "blocks": len(blocks), "block_mse": losses,
                                     "changed_codes": codes}
        if s.head_blocks:  # per block fitted to the output: its head term (KL or features' error) before and after
            ctx.record["reconstruct"].update({"head_blocks_ignored": ignored} if ignored else {"head_term": head_terms})
        if s.holdout:
            ctx.record["reconstruct"].update(held_out_mse=held, reverted=reverted)
            if reverted:
                ctx.log(f"reconstruct: {len(reverted)} of {len(blocks)} blocks kept their rounding (no lower "
                        f"error on the {s.holdout:.0%} of images held out): {', '.join(reverted)}")

    @staticmethod
    def _train(block: nn.Module, inputs: Tensor, target: Tensor, kwargs, s: ReconstructSettings, generator,
               floats: Optional[Dict[nn.Module, Tensor]] = None, masks: Optional[torch.Generator] = None,
               objective: Optional["_Objective"] = None):
        """Train one block; returns its output MSE against the float block before and after, and how
        many of its weights end on another grid point than the rounding they started from (GPTQ's, or
        the nearest one of a float weight), out of how many.
        ``masks``: the generator of QDrop's masks, on the activations' device (default ``generator``).
        ``floats``: each layer's float weight, rounded from the layer's current one (:class:`_SoftRound`).
        ``objective``: what is minimised (default: the block's output MSE); the first and second returned
        values stay that MSE."""
        layers = [m for m in block.modules() if isinstance(m, QuantLinear) and m.weight_quantizer.spec.enabled
                  and m.weight_quantizer.spec.kind_entry.plain_grid]
        acts = [q for q in block.modules() if isinstance(q, Quantizer) and q.role != roles.WEIGHT and q.enabled
                and q.spec.kind_entry.plain_grid and q.spec.granularity == "per_tensor" and q.scale is not None]
        with torch.no_grad():
            before = float(F.mse_loss(block(inputs, **kwargs), target))
        rounders = []
        with torch.no_grad():  # the rounding training starts from: GPTQ's, or the nearest grid point of a float weight
            start = {layer: layer.weight_quantizer(layer.weight).detach().clone() for layer in layers}
        for layer in layers:
            if floats is not None and floats[layer].shape == layer.weight.shape and \
                    not torch.equal(floats[layer], layer.weight):  # a stage (GPTQ) rounded it: start there
                rounder = _SoftRound(floats[layer], layer.weight_quantizer, start=layer.weight,
                                     margin=s.start_margin)
            else:
                rounder = _SoftRound(layer.weight, layer.weight_quantizer)
            parametrize.register_parametrization(layer, "weight", rounder, unsafe=True)
            layer.weight_quantizer.enabled = False  # the parametrisation quantizes
            rounders.append(rounder)
        scales = []
        for q in acts:
            q.scale = q.scale.detach().clone().requires_grad_(s.act_lr > 0)
            scales.append(q.scale)
        mix = {"on": False}
        masks = generator if masks is None else masks

        def qdrop(module, args, output):  # QDrop: keep float values at random during training
            if not mix["on"] or s.drop_prob == 0:
                return output
            keep = torch.rand(output.shape, generator=masks, device=output.device) < s.drop_prob
            return torch.where(keep, args[0], output)

        hooks = [q.register_forward_hook(qdrop) for q in acts]
        groups = [{"params": [r.V for r in rounders], "lr": s.lr}]
        if scales and s.act_lr > 0:
            groups.append({"params": scales, "lr": s.act_lr})
        optimiser = torch.optim.Adam(groups)
        warm = int(s.warmup * s.iterations)
        n = inputs.shape[0]
        try:
            with torch.enable_grad():
                block.train(False)
                for step in range(s.iterations):
                    idx = torch.randint(0, n, (min(s.batch_size, n),), generator=generator).to(inputs.device)
                    mix["on"] = True
                    out = block(inputs[idx], **kwargs)
                    loss = F.mse_loss(out, target[idx], reduction="none").sum(-1).mean() if objective is None \
                        else objective(out, idx)
                    if step >= warm and rounders:
                        progress = (step - warm) / max(1, s.iterations - warm)
                        beta = 2 + (20 - 2) * (1 - progress)  # annealed 20 → 2
                        loss = loss + s.weight * sum(r.regulariser(beta) for r in rounders)
                    optimiser.zero_grad()
                    loss.backward()
                    optimiser.step()
                    for scale in scales:
                        scale.data.clamp_(min=1e-8)
        finally:
            mix["on"] = False
            for hook in hooks:
                hook.remove()
            for layer, rounder in zip(layers, rounders):
                rounder.hard = True
                with torch.no_grad():
                    hard = layer.weight.detach().clone()
                parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
                with torch.no_grad():
                    layer.weight.copy_(hard)
                layer.weight_quantizer.enabled = layer.weight_quantizer.spec.enabled
            for q in acts:
                q.scale = q.scale.detach()
        with torch.no_grad():
            after = float(F.mse_loss(block(inputs, **kwargs), target))
            moved = sum(int((layer.weight != start[layer]).sum()) for layer in layers)
        if objective is not None and objective.head is not None:
            objective.head_term.append(objective.head_value(objective.train))
        return before, after, moved, sum(w.numel() for w in start.values())


