"""Mean squared error between quantized and float outputs."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import register_fitness


@register_fitness("mse")
def mse_loss(quant: torch.Tensor, float_out: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean squared error (``temperature`` is ignored)."""
    return F.mse_loss(quant.float(), float_out.float())
