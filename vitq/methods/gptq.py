"""GPTQ weight rounding, the ``gptq`` stage (Frantar et al., 2023, "GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers", Algorithm 1).

Round-to-nearest rounds each weight on its own. GPTQ rounds the columns of a linear layer's
weight (or a convolution's, such as the patch embedding, on its unfolded input patches) one after
another and, after each, moves the rounding error onto the columns not yet rounded, weighted by
the inverse Hessian ``H = 2·XᵀX`` of the layer's reconstruction error ``‖W·X − Ŵ·X‖²`` (X: the
layer's inputs on calibration images). The grid (per output channel scale and zero point) is the
weight quantizer's, set by calibration before; GPTQ only chooses the integer each weight rounds to. The new weights are exactly on the grid, so the quantizer
reproduces them and the plan stores them (:data:`CHANGED_PARAMS_ATTR`).

X is what the layer receives in the quantized model: its input after its own input quantizer,
with every layer before it already quantized and already rounded by GPTQ (layers in forward
order). Costs about two forward passes per transformer block plus one ``d×d`` Cholesky
factorisation per layer.

With ``float_target`` the target is the *float* model's output instead of the layer's own float
weights applied to the quantized input (asymmetric calibration, as in GPTAQ, Li et al., 2025):
``min ‖W·X_f − Ŵ·X̂‖²`` with X_f the layer's input in the float model and X̂ the quantized one.
Its least-squares solution ``W* = W·X_f·X̂ᵀ·(X̂·X̂ᵀ)⁻¹`` (damped towards W) absorbs the error the
quantized upstream brings, and GPTQ then rounds W* against the same Hessian: the residual of the
objective is ``‖(W* − Ŵ)·X̂‖²`` plus a constant. It costs the float passes beside the quantized
ones (about twice the time).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import VitqError
from ..models import iter_quantizers
from ..nn import QuantConv2d, QuantLinear
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


def _rows(layer: nn.Module, x: Tensor) -> Tensor:
    """A layer's input as the rows its weight ``[out, columns]`` multiplies: the last dimension of
    a linear layer's input; a convolution's input unfolded into patches (one row per position)."""
    if isinstance(layer, nn.Conv2d):
        cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1]).double()
    return x.reshape(-1, layer.weight.shape[1]).double()


def gptq_layers(model: nn.Module, convs: bool = True) -> List[nn.Module]:
    """The layers GPTQ rounds: linear layers and, with ``convs``, (ungrouped, zero-padded)
    convolutions with quantized weights, such as the patch embedding."""
    return [m for m in model.modules()
            if (isinstance(m, QuantLinear) or (convs and isinstance(m, QuantConv2d) and m.groups == 1
                                               and m.padding_mode == "zeros" and isinstance(m.padding, tuple)))
            and m.weight_quantizer.spec.enabled]


class _Hessian:
    """Accumulates ``2/n · Σ x̂ᵀx̂`` of a layer's quantized inputs x̂ (as rows: :func:`_rows`) and,
    with ``cross``, the cross term ``2/n · Σ x̂ᵀx_f`` with its float inputs x_f (fed by
    :meth:`pair`, batch by batch after the quantized one)."""

    def __init__(self, layer: nn.Module, cross: bool = False) -> None:
        self.layer = layer
        d = layer.weight[0].numel()  # a convolution's columns: in_channels · kernel height · width
        self.H = torch.zeros(d, d, dtype=torch.float64, device=layer.weight.device)
        self.G = torch.zeros_like(self.H) if cross else None
        self.n = 0
        self._last: Optional[Tensor] = None

    def __call__(self, module: nn.Module, args: Tuple[Tensor, ...]) -> None:
        x = _rows(self.layer, self.layer.quantize_input(args[0].detach()))
        total = self.n + x.shape[0]
        self.H *= self.n / total
        self.H += (2.0 / total) * x.T @ x
        if self.G is not None:
            self.G *= self.n / total
            self._last = x
        self.n = total

    def pair(self, module: nn.Module, args: Tuple[Tensor, ...]) -> None:
        """Hook on the float layer: its input for the batch whose quantized input came last."""
        if self._last is None:
            raise VitqError("gptq.float_target: a float pass came without its quantized one")
        xf = _rows(self.layer, args[0].detach())
        if xf.shape != self._last.shape:
            raise VitqError(f"gptq.float_target: the float input {tuple(xf.shape)} and the quantized one "
                            f"{tuple(self._last.shape)} of a batch differ")
        self.G += (2.0 / self.n) * self._last.T @ xf
        self._last = None

    def float_target(self, weight: Tensor, damp: float) -> Tensor:
        """``W* = (W·Gᵀ + λW)·(H + λI)⁻¹``: the weight that best maps the quantized inputs onto the
        float outputs, damped towards ``weight`` (λ = damp · mean diag H)."""
        W = weight.double()
        lam = damp * torch.mean(torch.diag(self.H))
        eye = torch.eye(self.H.shape[0], dtype=self.H.dtype, device=self.H.device)
        rhs = self.G @ W.T + lam * W.T  # (H + λI)·W*ᵀ = G·Wᵀ + λ·Wᵀ   (H symmetric)
        return torch.linalg.solve(self.H + lam * eye, rhs).T.to(weight.dtype)


@dataclass(frozen=True)
class GPTQSettings(StageSettings):
    """Settings of the ``gptq`` stage.

    Attributes:
        block_size: columns per lazy-batch update.
        damp: diagonal dampening as a fraction of the Hessian's mean diagonal.
        act_order: round the columns with the largest inputs first.
        float_target: fit the float model's layer output from the quantized input (asymmetric
            calibration, GPTAQ) instead of the layer's own output on that input.
        target_damp: with ``float_target``, how strongly the fitted weight is held towards the
            layer's own (λ as a fraction of the Hessian's mean diagonal); more for few images.
        convs: also round the convolutions (the patch embedding; a decode head's with ``head``) on
            their unfolded input patches. Until 2026-12-02 GPTQ rounded linear layers only; false
            reproduces those runs.
    """

    block_size: int = 128
    damp: float = 0.01
    act_order: bool = False
    float_target: bool = False
    target_damp: float = 0.01
    convs: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise VitqError(f"gptq.block_size must be a positive integer, got {self.block_size!r}")
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not 0 < self.damp < 1:
            raise VitqError(f"gptq.damp must be a number in (0, 1), got {self.damp!r}")
        if not isinstance(self.act_order, bool):
            raise VitqError(f"gptq.act_order must be true or false, got {self.act_order!r}")
        if not isinstance(self.float_target, bool):
            raise VitqError(f"gptq.float_target must be true or false, got {self.float_target!r}")
        if not isinstance(self.convs, bool):
            raise VitqError(f"gptq.convs must be true or false, got {self.convs!r}")
        if isinstance(self.target_damp, bool) or not isinstance(self.target_damp, (int, float)) or \
                self.target_damp <= 0:
            raise VitqError(f"gptq.target_damp must be a positive number, got {self.target_damp!r}")


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
        layers = gptq_layers(model, s.convs)
        if not layers:
            ctx.log("gptq: no linear layer or convolution with quantized weights; nothing to do")
            return
        images = [b.to(ctx.device) for b in ctx.data]
        order = forward_order(model, images[0], layers)
        changed = []
        passes = staged_passes(model, images, [[m] for m in order], ctx.device)
        if s.float_target:
            # the model as it is now with every quantizer off: the float model in this model's
            # coordinates (folds included), whose layers give X_f
            reference = copy.deepcopy(model)
            for _, q in iter_quantizers(reference):
                q.enabled = False
            float_passes = staged_passes(reference, images, [[reference.get_submodule(names[m])] for m in order],
                                         ctx.device)
        else:
            float_passes = iter(lambda: (None, None), object())  # endless (None, None): nothing to pair
        for ((layer,), feed), (float_layer, float_feed) in tqdm(
                zip(passes, float_passes), total=len(order), desc="gptq", unit="layer", disable=not ctx.progress,
                leave=False):
            hessian = _Hessian(layer, cross=s.float_target)
            hooks = [layer.register_forward_pre_hook(hessian)]
            try:
                if s.float_target:
                    hooks.append(float_layer[0].register_forward_pre_hook(hessian.pair))
                    for i in range(len(images)):
                        feed(only=i)
                        float_feed(only=i)
                else:
                    feed()
            finally:
                for hook in hooks:
                    hook.remove()
            with torch.no_grad():
                weight = layer.weight.detach()
                flat = weight.reshape(weight.shape[0], -1)
                target = hessian.float_target(flat, s.target_damp) if s.float_target else flat
                new = gptq_round(target, hessian.H, _column_quantizer(layer.weight_quantizer), s.block_size, s.damp,
                                 s.act_order).reshape(weight.shape)
                changed.append(float((new != layer.weight_quantizer(weight)).float().mean()))
                layer.weight.copy_(new)
        mark_changed(model, [f"{names[m]}.weight" for m in order])
        ctx.record["gptq"] = {**s.to_dict(), "layers": len(order),
                              "changed_codes": round(sum(changed) / len(changed), 4)}
