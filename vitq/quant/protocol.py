"""Roles of quant points and the protocols that decide which roles are quantized, and how.

See ``shared/methods/METHODS.md`` §1.4. Accuracy under one protocol is not comparable with
accuracy under another, so every report names its protocol.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

from ..errors import VitqError
from .spec import QuantSpec

# Roles: what a quantized tensor is. Modules declare the role of each of their quantizers.
WEIGHT = "weight"  # linear and conv weights
ACT = "act"  # the input of every linear / conv layer
ATTN_QKV = "attn_qkv"  # q, k and v: operands of q·kᵀ and attn·v
ATTN_SCORES = "attn_scores"  # scaled q·kᵀ, the softmax input
ATTN_PROBS = "attn_probs"  # softmax output, the operand of attn·v
NORM_INPUT = "norm_input"  # LayerNorm input (the residual sum)

ROLES = (WEIGHT, ACT, ATTN_QKV, ATTN_SCORES, ATTN_PROBS, NORM_INPUT)


@dataclass(frozen=True)
class Protocol:
    """Which roles a protocol quantizes and with which quantizer kind."""

    name: str
    description: str
    quantized: Dict[str, str]  # role → quantizer kind

    def spec_for(
        self, role: str, w_bits: int, a_bits: int, weight_symmetric: bool = True, act_symmetric: bool = False
    ) -> QuantSpec:
        """The spec a quant point of ``role`` gets under this protocol."""
        if role not in ROLES:
            raise VitqError(f"unknown quant-point role {role!r}")
        kind = self.quantized.get(role)
        if kind is None:
            return QuantSpec(enabled=False)
        if role == WEIGHT:
            return QuantSpec("uniform", w_bits, "per_channel", axis=0, symmetric=weight_symmetric)
        if kind == "ptf":
            return QuantSpec("ptf", a_bits, "per_channel", axis=-1, symmetric=False)
        if kind in ("log2", "logsqrt2") or role == ATTN_PROBS:
            # probabilities are non-negative: an unsigned range wastes no code on negatives
            return QuantSpec(kind, a_bits, "per_tensor", symmetric=False)
        return QuantSpec(kind, a_bits, "per_tensor", symmetric=act_symmetric)


_P1 = {WEIGHT: "uniform", ACT: "uniform", ATTN_QKV: "uniform", ATTN_PROBS: "uniform"}

PROTOCOLS: Dict[str, Protocol] = {
    "p1": Protocol(
        "p1",
        "PTQ4ViT/RepQ protocol: per-channel weights, inputs of every linear, both operands of both "
        "attention matmuls (post-softmax uniform); LayerNorm and softmax in float",
        _P1,
    ),
    "p2": Protocol(
        "p2",
        "FQ-ViT protocol (fully quantized): p1 plus the softmax input, log2 attention probabilities "
        "and power-of-two-factor LayerNorm inputs (residual sums)",
        {**_P1, ATTN_SCORES: "uniform", ATTN_PROBS: "log2", NORM_INPUT: "ptf"},
    ),
    "p3": Protocol(
        "p3",
        "CLAMP-release protocol: p1 with the post-softmax probabilities left in float",
        {k: v for k, v in _P1.items() if k != ATTN_PROBS},
    ),
}


def get_protocol(name: str) -> Protocol:
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise VitqError(f"unknown protocol {name!r}; choose one of: {', '.join(PROTOCOLS)}") from None
