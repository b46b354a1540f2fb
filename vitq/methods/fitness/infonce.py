"""CPT-V's InfoNCE between quantized and float outputs over a batch."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import register_fitness


@register_fitness("infonce")
def infonce_loss(quant: torch.Tensor, float_out: torch.Tensor, temperature: float = 3.0) -> torch.Tensor:
    """CPT-V's global loss: ``2T · CE(norm(q) · norm(k)ᵀ / T, arange(N))`` over a batch.

    Each image's float output is its positive; the other images' float outputs are negatives.

    Example:
        >>> q = torch.eye(3)
        >>> round(float(infonce_loss(q, q, temperature=1.0)), 4)  # 2 · (−log(e / (e + 2)))
        1.1029
    """
    q = F.normalize(quant.flatten(1).float(), dim=1)
    k = F.normalize(float_out.flatten(1).float(), dim=1)
    logits = q @ k.t() / temperature
    return 2 * temperature * F.cross_entropy(logits, torch.arange(len(q), device=q.device))
