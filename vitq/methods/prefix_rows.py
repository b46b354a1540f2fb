"""The ``prefix_rows`` stage: the class token's rows of some operands on a grid of their own.

A per-tensor activation scale is set by the patch tokens, which are nearly every row. The class
token is one row of 197 in DeiT-Tiny, but the only row the classifier reads, and in the later blocks
its query lies outside the range the patch tokens' queries set: the shared grid clips it
(``benchmarks/probe_class_token.py``). This stage gives the prefix tokens' rows (class,
distillation and register tokens) of the chosen operands a quantizer of their own, calibrated,
searched, reconstructed and exported like every other per-tensor point (:class:`vitq.nn.PrefixRows`).
Deployed, a row group's scale factors out of its dot products, so each product stays an integer one
(exported as one integer MatMul per row group).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Tuple

from ..errors import VitqError
from ..quant.protocol import PREFIX_CHOICES, check_prefix_rows
from .lifecycle import prefix_rows_of, split_prefix_rows
from .stages import STAGES, Stage, StageContext, StageSettings


@dataclass(frozen=True)
class PrefixRowsSettings(StageSettings):
    """Settings of the ``prefix_rows`` stage.

    Attributes:
        points: the operands whose prefix rows are split: ``q`` and ``k`` (the attention's query and
            key: q·kᵀ keeps an integer product per row group) and ``act`` (the input of every linear
            layer inside the blocks). Not v or the probabilities, whose token axis attn·v sums over.
            An operand the protocol leaves in float is skipped.
    """

    points: Tuple[str, ...] = ("q",)

    def __post_init__(self) -> None:
        try:
            points = check_prefix_rows(self.points)
        except VitqError as err:
            raise VitqError(str(err).replace("prefix_rows:", "prefix_rows.points:", 1)) from None
        if not points:
            raise VitqError(f"prefix_rows.points needs at least one of {', '.join(PREFIX_CHOICES)}")
        object.__setattr__(self, "points", points)

    def to_dict(self) -> Dict[str, Any]:
        return {"points": list(self.points)}


@STAGES.register("prefix_rows")
class PrefixRowsStage(Stage):
    """Split the prefix-token rows of the chosen operands onto quantizers of their own. Runs before
    ``calibrate`` (and before any stage that calibrates)."""

    Settings = PrefixRowsSettings
    needs_calibrated = False

    def run(self, ctx: StageContext) -> None:
        s: PrefixRowsSettings = self.settings
        tokens = split_prefix_rows(ctx.model, s.points)
        made = prefix_rows_of(ctx.model)
        if not tokens:
            ctx.log("prefix_rows: the model has no prefix tokens (class token); nothing to split")
        elif not made:
            ctx.log("prefix_rows: none of %s is quantized under this protocol; nothing to split", list(s.points))
        ctx.record["prefix_rows"] = {**s.to_dict(), "tokens": tokens, "split": made.get("points", [])}
