"""KL divergence between the float and quantized output distributions."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import register_fitness


@register_fitness("kl")
def kl_loss(quant: torch.Tensor, float_out: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(float / T) ‖ softmax(quant / T)) over the last dimension, mean over rows.

    Example:
        >>> x = torch.randn(4, 10)
        >>> float(kl_loss(x, x)) < 1e-6
        True
    """
    log_q = F.log_softmax(quant.float().flatten(0, -2) / temperature, dim=-1)
    log_p = F.log_softmax(float_out.float().flatten(0, -2) / temperature, dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
