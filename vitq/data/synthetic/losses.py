"""Losses of the data-free generators, on ``[B, h, w, C]`` patch-token grids. Pure functions."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

#: the largest ``B·(h·w)²`` for which the window similarities come from a full patch-by-patch
#: similarity matrix (256 MB in float32: a 224-pixel ViT's 14×14 grid up to 1,600 images a batch;
#: Swin's first 56×56 stage at 7 images or more takes the windowed products)
GRAM_LIMIT = 64_000_000


def _neighbour_similarities(grid: Tensor, window: int) -> tuple[Tensor, Tensor]:
    """Cosine similarity of each patch with each neighbour in its ``window × window`` square.

    Returns ``sims [B, h, w, K]`` and ``valid [h, w, K]`` (False where the neighbour falls off the
    grid), K = window² − 1.
    """
    B, h, w, C = grid.shape
    r = window // 2
    ones = F.pad(torch.ones(h, w, device=grid.device, dtype=torch.bool), (r, r, r, r))
    shifts = [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1) if (dy, dx) != (0, 0)]
    valid = torch.stack([ones[r + dy : r + dy + h, r + dx : r + dx + w] for dy, dx in shifts], dim=-1)
    if B * (h * w) ** 2 <= GRAM_LIMIT:
        # every patch against every patch in one matrix product, then the window's entries picked out:
        # about 3× faster than the shifted products below (forward and backward) on ViT-sized grids
        z = F.normalize(grid.reshape(B, h * w, C), dim=-1)
        ys, xs = torch.meshgrid(torch.arange(h, device=grid.device), torch.arange(w, device=grid.device),
                                indexing="ij")
        index = torch.stack([((ys + dy).clamp(0, h - 1) * w + (xs + dx).clamp(0, w - 1)).reshape(-1)
                             for dy, dx in shifts], dim=-1)  # [h·w, K]
        sims = (z @ z.transpose(1, 2)).gather(2, index.expand(B, -1, -1)).reshape(B, h, w, len(shifts))
        return sims * valid, valid
    z = F.normalize(grid, dim=-1)
    padded = F.pad(z, (0, 0, r, r, r, r))  # pad w then h (dims 2 and 1)
    sims = [(z * padded[:, r + dy : r + dy + h, r + dx : r + dx + w]).sum(-1) for dy, dx in shifts]
    return torch.stack(sims, dim=-1), valid


def patch_contrastive_loss(
    grid: Tensor, window: int = 3, positives: int = 4, tau: float = 0.1, negatives: str = "window"
) -> Tensor:
    """CLAMP-ViT's patch-level contrastive loss (METHODS.md §3.2), mean over images and anchors.

    For each anchor patch the ``positives`` most similar neighbours in its ``window × window``
    square are positives (chosen without gradient); the other neighbours (``negatives="window"``)
    or all other patches of the image (``"image"``) are negatives:
    ``ℓ_i = −log Σ_{p∈P(i)} exp(s_ip/τ) / Σ_{j∈P(i)∪N(i)} exp(s_ij/τ)``.
    """
    sims, valid = _neighbour_similarities(grid, window)
    logits = (sims / tau).masked_fill(~valid, float("-inf"))
    k = min(positives, sims.shape[-1])
    with torch.no_grad():
        chosen = logits.topk(k, dim=-1).indices
    pos_mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, chosen, True) & valid
    pos = logits.masked_fill(~pos_mask, float("-inf")).logsumexp(-1)
    if negatives == "window":
        denom = logits.logsumexp(-1)
    elif negatives == "image":
        B, h, w, C = grid.shape
        z = F.normalize(grid.reshape(B, h * w, C), dim=-1)
        all_sims = z @ z.transpose(1, 2) / tau
        eye = torch.eye(h * w, dtype=torch.bool, device=grid.device)
        denom = all_sims.masked_fill(eye, float("-inf")).logsumexp(-1).reshape(B, h, w)
    else:
        raise ValueError(f"negatives must be 'window' or 'image', got {negatives!r}")
    has_pos = pos_mask.any(-1)
    return (denom - pos)[has_pos.expand_as(pos)].mean()


def patch_similarity_entropy(grid: Tensor, bandwidth: float = 0.01, points: int = 10) -> Tensor:
    """PSAQ-ViT's patch-similarity entropy per image, ``[B]``.

    The density of the pairwise patch cosine similarities is a Gaussian kernel density estimate
    evaluated at ``points`` points between their min and max; the differential entropy is
    integrated by the trapezoid rule.
    """
    B, h, w, C = grid.shape
    z = F.normalize(grid.reshape(B, h * w, C), dim=-1)
    sims = z @ z.transpose(1, 2)
    iu = torch.triu_indices(h * w, h * w, offset=1, device=grid.device)
    s = sims[:, iu[0], iu[1]]  # [B, M]
    lo, hi = s.min(dim=1, keepdim=True).values.detach(), s.max(dim=1, keepdim=True).values.detach()
    t = lo + (hi - lo) * torch.linspace(0, 1, points, device=grid.device, dtype=grid.dtype)  # [B, P]
    u = (t[:, :, None] - s[:, None, :]) / bandwidth
    density = torch.exp(-0.5 * u**2).mean(-1) / (bandwidth * math.sqrt(2 * math.pi))  # [B, P]
    integrand = -density * torch.log(density.clamp_min(1e-12))
    return torch.trapezoid(integrand, t, dim=1)


def total_variation(x: Tensor) -> Tensor:
    """Mean squared difference of neighbouring pixels (an image-smoothness prior), per image ``[B]``."""
    dh = (x[:, :, 1:, :] - x[:, :, :-1, :]).pow(2).mean(dim=(1, 2, 3))
    dw = (x[:, :, :, 1:] - x[:, :, :, :-1]).pow(2).mean(dim=(1, 2, 3))
    return dh + dw


#: √(32·3·224·223): the square root of the number of neighbour differences per direction in PSAQ-ViT's
#: batch of 32 images at 224 pixels, the size its total-variation target was set for
PSAQ_TV_SCALE = 2190.0


def roughness(x: Tensor) -> Tensor:
    """The images' roughness, a scalar for the batch: the root-mean-square difference of neighbouring
    pixels, summed over the horizontal, vertical and both diagonal directions. ``PSAQ_TV_SCALE ·
    roughness`` is, within a part in 450, PSAQ-ViT's total variation of a batch of 32 images at 224
    pixels (the sum of the four difference tensors' norms). Real ImageNet images at 224 pixels,
    normalised: about 1.5."""
    diffs = (x[:, :, :, 1:] - x[:, :, :, :-1], x[:, :, 1:, :] - x[:, :, :-1, :],
             x[:, :, 1:, 1:] - x[:, :, :-1, :-1], x[:, :, 1:, :-1] - x[:, :, :-1, 1:])
    return sum(d.pow(2).mean().sqrt() for d in diffs)


def pixel_information_loss(logits: Tensor) -> Tensor:
    """Information maximisation of a dense model's per-pixel class scores ``[B, K, H, W]``: the mean
    entropy of each pixel's class distribution minus the entropy of the classes' share over all the
    batch's pixels (nats). Low when every pixel is confidently one class and every class covers the
    same share of the batch; it lets a data-free generator shape images with a segmentation head, which
    has no image-level class to aim at. At most ``log K`` (uniform pixels), at least ``−log K``."""
    if logits.dim() != 4:
        raise ValueError(f"per-pixel class scores must be [B, K, H, W], got shape {tuple(logits.shape)}")
    logp = F.log_softmax(logits.float(), dim=1)
    p = logp.exp()
    pixel_entropy = -(p * logp).sum(1).mean()
    share = p.mean(dim=(0, 2, 3))
    share_entropy = -(share * share.clamp_min(1e-12).log()).sum()
    return pixel_entropy - share_entropy
