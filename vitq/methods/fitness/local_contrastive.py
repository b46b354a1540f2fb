"""CLAMP-ViT's layer-local patch-contrastive loss (a unit-scope fitness)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...errors import VitqError
from . import register_fitness


@register_fitness("local_contrastive", scope="unit", judge=("infonce", 3.0))
def local_contrastive_loss(quant: torch.Tensor, float_out: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """CLAMP-ViT's layer-local loss on ``[B, N, C]`` token outputs: for each token, its own float
    output is the positive and the float outputs of the image's other tokens are negatives.

    Example:
        >>> x = torch.eye(2).unsqueeze(0)   # one image, two orthogonal tokens
        >>> round(float(local_contrastive_loss(x, x, temperature=1.0)), 4)  # −log(e / (e + 1))
        0.3133
    """
    if quant.ndim < 3:
        raise VitqError(f"local_contrastive needs token outputs [B, N, C], got shape {tuple(quant.shape)}")
    q = F.normalize(quant.flatten(1, -2).float(), dim=-1)
    k = F.normalize(float_out.flatten(1, -2).float(), dim=-1)
    logits = q @ k.transpose(1, 2) / temperature  # [B, N, N]
    b, n, _ = logits.shape
    target = torch.arange(n, device=q.device).repeat(b)
    return F.cross_entropy(logits.reshape(b * n, n), target)
