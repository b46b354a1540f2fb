"""Roles of quant points and the protocols that decide which roles are quantized, and how.

See ``shared/methods/METHODS.md`` §1.4. Accuracy under one protocol is not comparable with
accuracy under another, so every report names its protocol.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple

from ..errors import VitqError
from .kinds import kind_of
from .spec import QuantSpec

# Roles: what a quantized tensor is. Modules declare the role of each of their quantizers.
WEIGHT = "weight"  # linear and conv weights
ACT = "act"  # the input of every linear / conv layer
ATTN_QKV = "attn_qkv"  # q, k and v: operands of q·kᵀ and attn·v
ATTN_SCORES = "attn_scores"  # scaled q·kᵀ, the softmax input
ATTN_PROBS = "attn_probs"  # softmax output, the operand of attn·v
NORM_INPUT = "norm_input"  # LayerNorm input (the residual sum)

ROLES = (WEIGHT, ACT, ATTN_QKV, ATTN_SCORES, ATTN_PROBS, NORM_INPUT)

#: the quantizer kinds a recipe may choose for a role (``kinds:``); every other role is ``uniform``
KIND_CHOICES: Dict[str, Tuple[str, ...]] = {
    ATTN_PROBS: ("uniform", "log2", "logsqrt2"),
    NORM_INPUT: ("uniform", "ptf"),
}

#: the operands whose prefix-token rows (a ViT's class token ...) a recipe may give a grid of their own
#: (``prefix_rows``), each with its role and the operand's name in its module: the attention's query and
#: key, and the input of every linear layer inside the blocks. Not v, nor the probabilities' columns: a
#: scale per token along the axis attn·v sums over would not factor out of the integer product.
PREFIX_CHOICES: Dict[str, Tuple[str, str]] = {"q": (ATTN_QKV, "q"), "k": (ATTN_QKV, "k"), "act": (ACT, "input")}

#: the bits of the image input (the patch embedding's input) unless a run says otherwise: RepQ-ViT
#: keeps it at 8 bits at every activation width (PTQ4ViT leaves it in float)
DEFAULT_INPUT_BITS = 8


@dataclass(frozen=True)
class Protocol:
    """Which roles a protocol quantizes and with which quantizer kind."""

    name: str
    description: str
    quantized: Dict[str, str]  # role → quantizer kind

    def spec_for(
        self, role: str, w_bits: int, a_bits: int, weight_symmetric: bool = True, act_symmetric: bool = False,
        kinds: Optional[Mapping[str, str]] = None,
    ) -> QuantSpec:
        """The spec a quant point of ``role`` gets under this protocol (``kinds``: a recipe's choice
        of quantizer kind per role, see :func:`check_kinds`)."""
        if role not in ROLES:
            raise VitqError(f"unknown quant-point role {role!r}")
        kind = self.quantized.get(role)
        if kind is None:
            return QuantSpec(enabled=False)
        if kinds and role in kinds:
            kind = kinds[role]
        if role == WEIGHT:
            return QuantSpec("uniform", w_bits, "per_channel", axis=0, symmetric=weight_symmetric)
        entry = kind_of(kind)  # the kind's own constraints decide where it has any
        granularity = "per_tensor" if "per_tensor" in entry.granularities else entry.granularities[0]
        # probabilities are non-negative: an unsigned range wastes no code on negatives
        symmetric = False if role == ATTN_PROBS else act_symmetric
        if entry.symmetric is not None:
            symmetric = entry.symmetric
        return QuantSpec(kind, a_bits, granularity, axis=-1, symmetric=symmetric)


    def check_kinds(self, kinds: Optional[Mapping[str, str]]) -> Dict[str, str]:
        """Validate a recipe's ``kinds`` (role → quantizer kind) against this protocol.

        The protocol says which tensors are quantized; a recipe chooses how, for the roles that
        have a choice (:data:`KIND_CHOICES`).

        Example:
            >>> PROTOCOLS["p1"].check_kinds({"attn_probs": "logsqrt2"})
            {'attn_probs': 'logsqrt2'}
        """
        out = {}
        for role, kind in dict(kinds or {}).items():
            if role not in KIND_CHOICES:
                choosable = ", ".join(KIND_CHOICES)
                raise VitqError(f"kinds: the quantizer kind of role {role!r} cannot be chosen (roles with a "
                                f"choice: {choosable})")
            if kind not in KIND_CHOICES[role]:
                raise VitqError(f"kinds: {role} can be {', '.join(KIND_CHOICES[role])}; got {kind!r}")
            if role not in self.quantized:
                raise VitqError(f"kinds: protocol {self.name} leaves {role} in float, so it has no quantizer kind "
                                f"to choose; drop it or use a protocol that quantizes it")
            out[role] = kind
        return out


_P1 = {WEIGHT: "uniform", ACT: "uniform", ATTN_QKV: "uniform", ATTN_PROBS: "uniform"}

PROTOCOLS: Dict[str, Protocol] = {
    "p1": Protocol(
        "p1",
        "RepQ-ViT's quant points: per-channel weights; the inputs of every linear layer and of the "
        "patch embedding (the image, at --input-bits: 8 by default as in RepQ-ViT, where PTQ4ViT leaves "
        "it in float); q, k, v and the post-softmax probabilities (uniform unless the recipe picks "
        "log2/logsqrt2); LayerNorm, softmax and the residual sums in float",
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
    "p4": Protocol(
        "p4",
        "linear layers only: per-channel weights and the inputs of every linear layer and of the "
        "patch embedding; both attention products (q, k, v, probabilities) in float. The scope of "
        "ONNX Runtime's quantize_dynamic, torchao's int8 configs and Brevitas's layerwise PTQ",
        {WEIGHT: "uniform", ACT: "uniform"},
    ),
}


def check_prefix_rows(choices) -> Tuple[str, ...]:
    """Validate a ``prefix_rows`` choice (a list of :data:`PREFIX_CHOICES` names); returns it as a tuple.

    Example:
        >>> check_prefix_rows(["q"])
        ('q',)
    """
    if isinstance(choices, str):
        choices = [choices]
    if choices is None:
        return ()
    if not isinstance(choices, (list, tuple)):
        raise VitqError(f"prefix_rows is a list of {', '.join(PREFIX_CHOICES)}, got {choices!r}")
    bad = [c for c in choices if c not in PREFIX_CHOICES]
    if bad:
        raise VitqError(f"prefix_rows: {bad[0]!r} is not an operand whose prefix rows can be split; choose among "
                        f"{', '.join(PREFIX_CHOICES)} (q and k: the attention's query and key; act: the inputs of "
                        "the blocks' linear layers)")
    if len(set(choices)) != len(choices):
        raise VitqError(f"prefix_rows names an operand twice: {list(choices)}")
    return tuple(choices)


def get_protocol(name: str) -> Protocol:
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise VitqError(f"unknown protocol {name!r}; choose one of: {', '.join(PROTOCOLS)}") from None
