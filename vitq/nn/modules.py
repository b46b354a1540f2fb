"""Quantized modules. Each one *is* its float module (a subclass), with quantizers added.

They are made from float modules by :meth:`from_float`, which keeps the float module's
parameters, buffers and children (no copy), so ``state_dict`` keys and ``isinstance`` still hold.
With every quantizer disabled each module computes exactly what its float module computes.
"""
from __future__ import annotations

from typing import Optional, Type, TypeVar

import torch
import torch.nn.functional as F
from timm.layers.attention import Attention, resolve_self_attn_mask
from timm.models.swin_transformer import WindowAttention
from torch import nn

from ..quant import protocol as roles
from ..quant.quantizer import Quantizer

M = TypeVar("M", bound=nn.Module)
Tensor = torch.Tensor


class QuantModule:
    """Mixin: ``from_float`` swaps a float module's class for the quantized one in a new object."""

    def _add_quantizers(self) -> None:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    @classmethod
    def from_float(cls: Type[M], module: nn.Module) -> M:
        new = cls.__new__(cls)
        new.__dict__.update(module.__dict__)
        # fresh containers: the quantizers added below must not appear in the float module
        for attr in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
            new.__dict__[attr] = type(module.__dict__[attr])(module.__dict__[attr])
        new._add_quantizers()
        return new


class QuantLinear(QuantModule, nn.Linear):
    """``nn.Linear`` with its input and weight quantized."""

    def _add_quantizers(self) -> None:
        self.input_quantizer = Quantizer(roles.ACT)
        self.weight_quantizer = Quantizer(roles.WEIGHT)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


class QuantConv2d(QuantModule, nn.Conv2d):
    """``nn.Conv2d`` (the patch embedding) with its input and weight quantized."""

    def _add_quantizers(self) -> None:
        self.input_quantizer = Quantizer(roles.ACT)
        self.weight_quantizer = Quantizer(roles.WEIGHT)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


class QuantLayerNorm(QuantModule, nn.LayerNorm):
    """``nn.LayerNorm`` computed in float on a quantized input (PTF under protocol p2)."""

    def _add_quantizers(self) -> None:
        self.input_quantizer = Quantizer(roles.NORM_INPUT)

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(self.input_quantizer(x), self.normalized_shape, self.weight, self.bias, self.eps)


class _AttentionQuantizers:
    """The four attention quant points shared by ViT and Swin attention."""

    def _add_quantizers(self) -> None:
        self.q_quantizer = Quantizer(roles.ATTN_QKV)
        self.k_quantizer = Quantizer(roles.ATTN_QKV)
        self.v_quantizer = Quantizer(roles.ATTN_QKV)
        self.scores_quantizer = Quantizer(roles.ATTN_SCORES)
        self.probs_quantizer = Quantizer(roles.ATTN_PROBS)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        """``softmax(q·kᵀ·scale + bias)·v`` with every operand passing its quantizer."""
        q, k, v = self.q_quantizer(q), self.k_quantizer(k), self.v_quantizer(v)
        scores = (q * self.scale) @ k.transpose(-2, -1)
        if bias is not None:
            scores = scores + bias
        probs = self.probs_quantizer(self.scores_quantizer(scores).softmax(dim=-1))
        return self.attn_drop(probs) @ v


class QuantAttention(_AttentionQuantizers, QuantModule, Attention):
    """timm's ViT ``Attention`` with explicit q·kᵀ, softmax and attn·v, each quantizable."""

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        bias = resolve_self_attn_mask(N, q, attn_mask, is_causal)
        x = self._attend(q, k, v, bias)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class QuantWindowAttention(_AttentionQuantizers, QuantModule, WindowAttention):
    """timm's Swin ``WindowAttention`` (relative position bias, shift mask), each operand quantizable."""

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        B_, N, _ = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        bias = self._get_rel_pos_bias()
        if mask is not None:
            num_win = mask.shape[0]
            bias = (bias.unsqueeze(1) + mask.unsqueeze(1).unsqueeze(0)).expand(B_ // num_win, -1, -1, -1, -1)
            bias = bias.reshape(-1, self.num_heads, N, N)
        x = self._attend(q, k, v, bias)
        x = x.transpose(1, 2).reshape(B_, N, -1)
        return self.proj_drop(self.proj(x))


__all__ = [
    "QuantAttention",
    "QuantConv2d",
    "QuantLayerNorm",
    "QuantLinear",
    "QuantModule",
    "QuantWindowAttention",
]
