"""GPTQ weight rounding, the ``gptq`` stage (Frantar et al., 2023, "GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers", Algorithm 1).

Round-to-nearest rounds each weight on its own. GPTQ rounds the columns of a linear layer's
weight one after another and, after each, moves the rounding error onto the columns not yet
rounded, weighted by the inverse Hessian ``H = 2·XᵀX`` of the layer's reconstruction error
``‖W·X − Ŵ·X‖²`` (X: the layer's inputs on calibration images). The grid (per output channel
scale and zero point) is the weight quantizer's, set by calibration before; GPTQ only chooses
the integer each weight rounds to. The new weights are exactly on the grid, so the quantizer
reproduces them and the plan stores them (:data:`CHANGED_PARAMS_ATTR`).

X is what the layer receives in the quantized model: its input after its own input quantizer,
with every layer before it already quantized and already rounded by GPTQ (layers in forward
order). Costs about two forward passes per transformer block plus one ``d×d`` Cholesky
factorisation per layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import VitqError
from ..nn import QuantLinear
from ..quant.primitives import fake_quantize_affine
from ..quant.quantizer import Quantizer
from .lifecycle import forward_order, staged_passes
from .stages import STAGES, Stage, StageContext, StageSettings

Tensor = torch.Tensor

#: the model attribute that lists the parameters a stage rewrote (plans store their values)
CHANGED_PARAMS_ATTR = "vitq_changed_params"


def mark_changed(model: nn.Module, names) -> None:
    """Record that stages rewrote these parameters of ``model`` (the plan keeps their values)."""
    changed = set(getattr(model, CHANGED_PARAMS_ATTR, ()) or ())
    changed.update(names)
    setattr(model, CHANGED_PARAMS_ATTR, sorted(changed))


def changed_params(model: nn.Module) -> List[str]:
    return list(getattr(model, CHANGED_PARAMS_ATTR, ()) or ())


def gptq_round(weight: Tensor, hessian: Tensor, quantize, block_size: int = 128, damp: float = 0.01,
               act_order: bool = False) -> Tensor:
    """GPTQ: ``weight`` ``[rows, cols]`` rounded column by column by ``quantize`` (a function from a
    column ``[rows]`` and its index to its fake-quantized values), the error of each column spread
    over the later ones through the inverse of ``hessian`` ``[cols, cols]``.

    Args:
        block_size: columns updated together ("lazy batch" updates; the result is the same).
        damp: added to the Hessian's diagonal, as a fraction of its mean, for a stable inverse.
        act_order: round the columns with the largest Hessian diagonal first.

    Returns:
        The rounded weight, the same shape and dtype as ``weight``.
    """
    dtype = weight.dtype
    W = weight.detach().clone().double()
    H = hessian.detach().clone().double()
    cols = W.shape[1]
    if H.shape != (cols, cols):
        raise VitqError(f"gptq: the Hessian is {tuple(H.shape)}, the weight has {cols} columns")
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype, device=H.device)
    try:
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except RuntimeError as err:  # torch.linalg.LinAlgError
        raise VitqError(f"gptq: the Hessian is not positive definite even after damping ({err}); "
                        "raise gptq.damp or give more calibration images") from None
    Q = torch.zeros_like(W)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        W1 = W[:, start:end].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[start:end, start:end]
        for i in range(end - start):
            w = W1[:, i]
            q = quantize(w.to(dtype), int(perm[start + i])).double()
            Q[:, start + i] = q
            err = (w - q) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            E1[:, i] = err
        W[:, end:] -= E1 @ U[start:end, end:]
    return Q[:, torch.argsort(perm)].to(dtype)


def _column_quantizer(quantizer: Quantizer):
    """``quantize(column, index)`` on the per-output-channel grid of a weight quantizer."""
    spec = quantizer.spec
    if not spec.kind_entry.plain_grid or spec.granularity not in ("per_channel", "per_tensor") or \
            (spec.granularity == "per_channel" and spec.axis % 2 != 0):
        raise VitqError(f"gptq rounds uniform per-output-channel or per-tensor weight quantizers, not {spec}")
    qmin, qmax = spec.qrange
    scale, zero_point = quantizer.scale.reshape(-1), quantizer.zero_point.reshape(-1)

    def quantize(column: Tensor, index: int) -> Tensor:
        return fake_quantize_affine(column, scale.to(column), zero_point.to(column), qmin, qmax)

    return quantize


class _Hessian:
    """Accumulates ``2/n · Σ x̂ᵀx̂`` of a linear layer's quantized inputs x̂."""

    def __init__(self, layer: QuantLinear) -> None:
        self.layer = layer
        self.H = torch.zeros(layer.in_features, layer.in_features, dtype=torch.float64, device=layer.weight.device)
        self.n = 0

    def __call__(self, module: nn.Module, args: Tuple[Tensor, ...]) -> None:
        x = self.layer.input_quantizer(args[0].detach()).reshape(-1, self.layer.in_features).double()
        total = self.n + x.shape[0]
        self.H *= self.n / total
        self.H += (2.0 / total) * x.T @ x
        self.n = total


@dataclass(frozen=True)
class GPTQSettings(StageSettings):
    """Settings of the ``gptq`` stage.

    Attributes:
        block_size: columns per lazy-batch update.
        damp: diagonal dampening as a fraction of the Hessian's mean diagonal.
        act_order: round the columns with the largest inputs first.
    """

    block_size: int = 128
    damp: float = 0.01
    act_order: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise VitqError(f"gptq.block_size must be a positive integer, got {self.block_size!r}")
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not 0 < self.damp < 1:
            raise VitqError(f"gptq.damp must be a number in (0, 1), got {self.damp!r}")
        if not isinstance(self.act_order, bool):
            raise VitqError(f"gptq.act_order must be true or false, got {self.act_order!r}")


@STAGES.register("gptq")
class GPTQStage(Stage):
    """GPTQ: round every linear layer's weights column by column against its calibration inputs,
    the rounding error of each column moved onto the later ones (Hessian-aware), in forward order
    on the quantized model. Runs after ``calibrate`` (it keeps the calibrated weight grid)."""

    Settings = GPTQSettings

    def run(self, ctx: StageContext) -> None:
        s: GPTQSettings = self.settings
        model = ctx.model.to(ctx.device)
        names = {m: n for n, m in model.named_modules()}
        layers = [m for m in model.modules() if isinstance(m, QuantLinear) and m.weight_quantizer.spec.enabled]
        if not layers:
            ctx.log("gptq: no linear layer with quantized weights; nothing to do")
            return
        images = [b.to(ctx.device) for b in ctx.data]
        order = forward_order(model, images[0], layers)
        changed = []
        passes = staged_passes(model, images, [[m] for m in order], ctx.device)
        for (layer,), feed in tqdm(passes, total=len(order), desc="gptq", unit="layer", disable=not ctx.progress,
                                   leave=False):
            hessian = _Hessian(layer)
            hook = layer.register_forward_pre_hook(hessian)
            try:
                feed()
            finally:
                hook.remove()
            with torch.no_grad():
                weight = layer.weight.detach()
                new = gptq_round(weight, hessian.H, _column_quantizer(layer.weight_quantizer), s.block_size, s.damp,
                                 s.act_order)
                changed.append(float((new != layer.weight_quantizer(weight)).float().mean()))
                layer.weight.copy_(new)
        mark_changed(model, [f"{names[m]}.weight" for m in order])
        ctx.record["gptq"] = {**s.to_dict(), "layers": len(order),
                              "changed_codes": round(sum(changed) / len(changed), 4)}
