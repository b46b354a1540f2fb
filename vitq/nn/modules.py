"""Quantized modules. Each one *is* its float module (a subclass), with quantizers added.

They are made from float modules by :meth:`from_float`, which keeps the float module's
parameters, buffers and children (no copy), so ``state_dict`` keys and ``isinstance`` still hold.
With every quantizer disabled each module computes exactly what its float module computes.
"""
from __future__ import annotations

from typing import Optional, Tuple, Type, TypeVar

import torch
import torch.nn.functional as F
from timm.layers.attention import Attention, resolve_self_attn_mask
from timm.models.swin_transformer import WindowAttention
from torch import nn

from ..errors import VitqError
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


class PrefixRows:
    """Mixin: the first ``prefix_tokens`` rows (token axis -2) of some operands (a ViT's class,
    distillation and register tokens) can take a quantizer of their own, ``<point>_prefix_quantizer``
    beside ``<point>_quantizer``, which then quantizes the other rows.

    A per-tensor scale fits the patch tokens, which are most of the rows; the class token's query in
    the later blocks of a DeiT lies outside that range and is clipped (benchmarks/probe_class_token.py).
    A scale per row group keeps every product an integer one: a row's scale factors out of its dot
    products (q·kᵀ, x·Wᵀ), so deployed, the prefix rows' product is computed on its own.
    Added by the ``prefix_rows`` stage (or :func:`vitq.prepare`'s ``prefix_rows``) where the model has
    prefix tokens. A width allocator (``greedy_mp``, a mixed-precision search) sets the main point's
    bits; the prefix rows keep the width they were given.
    """

    #: the operands that may be split (``input`` of a linear; ``q``, ``k`` of attention)
    PREFIX_POINTS: Tuple[str, ...] = ()
    prefix_tokens = 0
    prefix_points: Tuple[str, ...] = ()

    def add_prefix_quantizer(self, point: str, tokens: int) -> Quantizer:
        """Give the first ``tokens`` rows of ``point`` a quantizer of their own (the main one's spec, uncalibrated)."""
        if point not in self.PREFIX_POINTS:
            raise VitqError(f"{type(self).__name__} has no operand {point!r} to split ({self.PREFIX_POINTS})")
        if tokens <= 0 or (self.prefix_tokens and tokens != self.prefix_tokens):
            raise VitqError(f"prefix tokens must be one positive count per module, got {tokens}")
        main: Quantizer = getattr(self, f"{point}_quantizer")
        quantizer = Quantizer(main.role, main.spec)
        setattr(self, f"{point}_prefix_quantizer", quantizer)
        self.prefix_tokens = tokens
        if point not in self.prefix_points:
            self.prefix_points = (*self.prefix_points, point)
        return quantizer

    def _row_groups(self, point: str, x: Tensor):
        """``[(quantizer, rows)]``: the prefix rows with their quantizer and the rest with the main one
        (one group when ``point`` is not split)."""
        main = getattr(self, f"{point}_quantizer")
        if point not in self.prefix_points:
            return [(main, x)]
        n = self.prefix_tokens
        return [(getattr(self, f"{point}_prefix_quantizer"), x[..., :n, :]), (main, x[..., n:, :])]

    def _quantize_rows(self, point: str, x: Tensor) -> Tensor:
        groups = self._row_groups(point, x)
        if len(groups) == 1:
            return groups[0][0](x)
        return torch.cat([q(rows) for q, rows in groups], dim=-2)


class QuantLinear(PrefixRows, QuantModule, nn.Linear):
    """``nn.Linear`` with its input and weight quantized."""

    PREFIX_POINTS = ("input",)

    def _add_quantizers(self) -> None:
        self.input_quantizer = Quantizer(roles.ACT)
        self.weight_quantizer = Quantizer(roles.WEIGHT)

    def quantize_input(self, x: Tensor) -> Tensor:
        """The input as the layer quantizes it (its prefix rows by their own quantizer where split)."""
        return self._quantize_rows("input", x)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.quantize_input(x), self.weight_quantizer(self.weight), self.bias)


class QuantConv2d(QuantModule, nn.Conv2d):
    """``nn.Conv2d`` (the patch embedding) with its input and weight quantized."""

    def _add_quantizers(self) -> None:
        self.input_quantizer = Quantizer(roles.ACT)
        self.weight_quantizer = Quantizer(roles.WEIGHT)

    def quantize_input(self, x: Tensor) -> Tensor:
        return self.input_quantizer(x)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.quantize_input(x), self.weight_quantizer(self.weight), self.bias)


class QuantLayerNorm(QuantModule, nn.LayerNorm):
    """``nn.LayerNorm`` computed in float on a quantized input (PTF under protocol p2)."""

    def _add_quantizers(self) -> None:
        self.input_quantizer = Quantizer(roles.NORM_INPUT)

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(self.input_quantizer(x), self.normalized_shape, self.weight, self.bias, self.eps)


class _AttentionQuantizers(PrefixRows):
    """The attention quant points shared by ViT and Swin attention."""

    PREFIX_POINTS = ("q", "k")

    def _add_quantizers(self) -> None:
        self.q_quantizer = Quantizer(roles.ATTN_QKV)
        self.k_quantizer = Quantizer(roles.ATTN_QKV)
        self.v_quantizer = Quantizer(roles.ATTN_QKV)
        self.scores_quantizer = Quantizer(roles.ATTN_SCORES)
        self.probs_quantizer = Quantizer(roles.ATTN_PROBS)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        """``softmax(q·kᵀ·scale + bias)·v`` with every operand passing its quantizer."""
        q, k, v = self._quantize_rows("q", q), self._quantize_rows("k", k), self.v_quantizer(v)
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
    "PrefixRows",
]
