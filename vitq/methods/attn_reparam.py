"""Attention reparameterisation, the ``attn_reparam`` stage: per-channel scales moved between the
operands of attention's products, exactly, so that their per-tensor quantizers fit every channel.

The q, k and v quantizers are per tensor, but a few channels of q and k (and of v) are far wider
than the rest (``benchmarks/diagnose_points.py --holdout``: at W6A6 on DeiT-Tiny the q, k and v
quantizers alone cost more than all the linear layers' inputs together). Two folds change no float
output:

* **q and k** (SmoothAttention, as in QServe): ``q·kᵀ = (q·D)(k·D⁻¹)ᵀ`` for any per-channel
  ``D``. With ``d_c = (max|k_c| / max|q_c|)^α`` (α = ``qk_alpha``, ½ by default) the two operands'
  channel c reach ``max|q_c|^(1−α)·max|k_c|^α`` and ``max|q_c|^α·max|k_c|^(1−α)``: an outlier
  channel of one is shared with the other. Folded into the qkv layer's q rows (× d) and k rows
  (÷ d), weights and bias.
* **v and the projection**: ``softmax(·)·v`` mixes tokens, not channels, so dividing v's channel c
  by ``r_c`` and multiplying the projection's input column c by ``r_c`` is exact. With
  ``r_c = (max|v_c| / mean_c max|v_c|)^β`` (β = ``v_strength``) every channel of v, and of the
  projection's input, spans about the same range. The projection's weight columns of wide channels
  grow by ``r_c``, which its per-output-channel weight grid pays for (as ``reparam``'s fold does).

Statistics come from a float forward pass (the qkv layer's outputs); the stage runs before
``calibrate``. The rewritten weights are recorded as changed parameters, so plans carry them and
``vitq eval --plan`` and ``vitq export`` reproduce the fold. Needs attention without q/k norms
and without a norm after attention (ViT, DeiT, Swin); other blocks are left as they are and counted.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import VitqError
from ..nn import QuantAttention, QuantWindowAttention
from .gptq import mark_changed
from .stages import STAGES, Stage, StageContext, StageSettings

Tensor = torch.Tensor


@dataclass(frozen=True)
class AttnReparamSettings(StageSettings):
    """Settings of the ``attn_reparam`` stage.

    Attributes:
        qk: balance the channels of q and k (where both are quantized).
        v: equalise the channels of v, folding the scales into the projection (where v or the
            projection's input is quantized).
        qk_alpha: how much of k's channel range moves into q, in [0, 1] (½: both get the geometric
            mean; 0: nothing moves).
        v_strength: how much of v's channel spread moves into the projection's weights, in [0, 1]
            (1: every channel spans the mean range; 0: nothing moves).
    """

    qk: bool = True
    v: bool = True
    qk_alpha: float = 0.5
    v_strength: float = 1.0

    def __post_init__(self) -> None:
        for name in ("qk", "v"):
            if not isinstance(getattr(self, name), bool):
                raise VitqError(f"attn_reparam.{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("qk_alpha", "v_strength"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise VitqError(f"attn_reparam.{name} must be a number in [0, 1], got {value!r}")
            object.__setattr__(self, name, float(value))


def qk_factors(q_amax: Tensor, k_amax: Tensor, alpha: float = 0.5) -> Tensor:
    """``d`` with ``q·d`` and ``k / d`` sharing each channel's range: ``(max|k| / max|q|)^α``.

    Example:
        >>> qk_factors(torch.tensor([1.0, 8.0]), torch.tensor([4.0, 2.0])).tolist()
        [2.0, 0.5]
    """
    q_amax, k_amax = q_amax.double().clamp_min(1e-8), k_amax.double().clamp_min(1e-8)
    return ((k_amax / q_amax) ** alpha).float()


def v_factors(v_amax: Tensor, strength: float = 1.0) -> Tensor:
    """``r`` with every channel of ``v / r`` spanning the mean range: ``(max|v_c| / mean max|v|)^β``.

    Example:
        >>> v_factors(torch.tensor([1.0, 3.0])).tolist()
        [0.5, 1.5]
    """
    v_amax = v_amax.double().clamp_min(1e-8)
    return ((v_amax / v_amax.mean()) ** strength).float()


def _attentions(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (QuantAttention, QuantWindowAttention))]


def _foldable(attn: nn.Module) -> bool:
    """q·kᵀ and attn·v see the qkv layer's outputs directly, and the projection attn·v's."""
    for name in ("q_norm", "k_norm", "norm"):
        if not isinstance(getattr(attn, name, nn.Identity()), nn.Identity):
            return False
    return getattr(attn, "gate", None) is None and hasattr(attn, "qkv") and hasattr(attn, "proj")


@STAGES.register("attn_reparam")
class AttnReparamStage(Stage):
    """Move per-channel scales between q and k, and between v and the projection (exact in float);
    runs before ``calibrate``."""

    Settings = AttnReparamSettings
    needs_calibrated = False

    def run(self, ctx: StageContext) -> None:
        s: AttnReparamSettings = self.settings
        model = ctx.model
        calibrated = [n for n, m in _attentions(model) if m.q_quantizer.scale is not None]
        if calibrated:
            raise VitqError(f"attn_reparam changes what calibration measures ({calibrated[0]} is calibrated): put "
                            "'attn_reparam' before 'calibrate' in the recipe")
        todo, skipped = [], []
        for name, attn in _attentions(model):
            qk = s.qk and s.qk_alpha > 0 and attn.q_quantizer.spec.enabled and attn.k_quantizer.spec.enabled
            v = s.v and s.v_strength > 0 and (attn.v_quantizer.spec.enabled
                                              or attn.proj.input_quantizer.spec.enabled)
            if not (qk or v):
                continue
            if not _foldable(attn):
                skipped.append(name)
                continue
            todo.append((name, attn, qk, v))
        record: Dict[str, object] = {**s.to_dict(), "blocks": len(todo), "skipped": skipped}
        if not todo:
            ctx.log("attn_reparam: no attention with quantized q/k/v to reparameterise")
            ctx.record["attn_reparam"] = record
            return
        amax = self._qkv_amax(ctx, [name for name, *_ in todo])
        changed, spread = [], []
        with torch.no_grad():
            for name, attn, qk, v in todo:
                qkv, proj = attn.qkv, attn.proj
                dim = qkv.out_features // 3
                q_amax, k_amax, v_amax = amax[name].split(dim)
                rows = torch.ones(qkv.out_features, dtype=qkv.weight.dtype, device=qkv.weight.device)
                if qk:
                    d = qk_factors(q_amax, k_amax, s.qk_alpha).to(rows)
                    rows[:dim], rows[dim:2 * dim] = d, 1 / d
                if v:
                    r = v_factors(v_amax, s.v_strength).to(rows)
                    rows[2 * dim:] = 1 / r
                    proj.weight.mul_(r[None, :])
                    changed.append(f"{name}.proj.weight")
                    spread.append(float(v_amax.max() / v_amax.mean()))
                qkv.weight.mul_(rows[:, None])
                changed.append(f"{name}.qkv.weight")
                if qkv.bias is not None:
                    qkv.bias.mul_(rows)
                    changed.append(f"{name}.qkv.bias")
        mark_changed(model, changed)
        if skipped:
            ctx.log("attn_reparam: %d attention block(s) with q/k norms or a norm after attention left as they are: %s",
                    len(skipped), ", ".join(skipped))
        record["v_spread_max"] = round(max(spread), 2) if spread else None
        ctx.record["attn_reparam"] = record

    @staticmethod
    def _qkv_amax(ctx: StageContext, names: List[str]) -> Dict[str, Tensor]:
        """Per output channel of each block's qkv layer, the largest magnitude on the calibration
        images (float model: the folds before this stage are exact)."""
        float_model = ctx.float_model.to(ctx.device).eval()
        amax: Dict[str, Tensor] = {}

        def hook(name):
            def record(module, args, out):
                m = out.detach().abs().reshape(-1, out.shape[-1]).amax(0)
                amax[name] = m if name not in amax else torch.maximum(amax[name], m)
            return record

        hooks = [float_model.get_submodule(f"{name}.qkv").register_forward_hook(hook(name)) for name in names]
        try:
            with torch.no_grad():
                for batch in tqdm(ctx.data, desc="attn_reparam", unit="batch", disable=not ctx.progress, leave=False):
                    float_model(batch.to(ctx.device))
        finally:
            for h in hooks:
                h.remove()
        return {name: m.cpu() for name, m in amax.items()}
