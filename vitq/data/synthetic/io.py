"""Synthetic images as files a person can open: PNGs, a grid, and statistics."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Mapping

import torch
import torch.nn.functional as F
from torch import nn

SYNTHETIC_MARKER = "vitq-synthetic.json"


def denormalize(images: torch.Tensor, data_config: Mapping[str, Any]) -> torch.Tensor:
    """Normalised model inputs back to pixels in [0, 1] (``x · std + mean``, per channel)."""
    mean = torch.tensor(data_config["mean"], dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(data_config["std"], dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images * std + mean).clamp(0, 1)


def save_images(
    images: torch.Tensor, targets: torch.Tensor, folder: str | Path, data_config: Mapping[str, Any]
) -> Path:
    """Write ``folder/synthetic/NNNN_class-T.png`` and a marker with the data config.

    The marker tells vitq's folder loader that the files are already at the model's input size,
    so calibrating on them (``--calib folder``) feeds the very pixels that were generated.
    """
    from torchvision.utils import save_image

    folder = Path(folder)
    (folder / "synthetic").mkdir(parents=True, exist_ok=True)
    pixels = denormalize(images.detach().cpu().float(), data_config)
    for i, (img, t) in enumerate(zip(pixels, targets.tolist())):
        save_image(img, folder / "synthetic" / f"{i:04d}_class-{t}.png")
    marker = {"format": "vitq-synthetic/1", "data_config": {k: list(v) if isinstance(v, tuple) else v
                                                            for k, v in data_config.items()}}
    (folder / SYNTHETIC_MARKER).write_text(json.dumps(marker, indent=1) + "\n")
    return folder


def save_grid(images: torch.Tensor, path: str | Path, data_config: Mapping[str, Any], max_images: int = 64) -> Path:
    """A grid PNG of (at most ``max_images``) images, de-normalised."""
    from torchvision.utils import save_image

    pixels = denormalize(images[:max_images].detach().cpu().float(), data_config)
    nrow = max(1, int(len(pixels) ** 0.5))
    save_image(pixels, str(path), nrow=nrow, padding=2)
    return Path(path)


@torch.no_grad()
def image_stats(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, batch_size: int = 64) -> Dict[str, Any]:
    """What the float model makes of the images: confidence, entropy, predicted classes, diversity."""
    model.eval()
    device = next(model.parameters()).device
    logits = torch.cat([model(images[i : i + batch_size].to(device)).float().cpu()
                        for i in range(0, len(images), batch_size)])
    flat = F.normalize(images.reshape(len(images), -1).float().cpu(), dim=1)
    sims = flat @ flat.T
    n = len(images)
    mean_sim = ((sims.sum() - n) / max(1, n * (n - 1))).item()
    scores: Dict[str, Any] = {"mean_confidence": None, "mean_entropy": None, "target_hit_rate": None,
                              "distinct_predicted_classes": None, "predicted_class_histogram": None}
    dense = logits.ndim == 4  # a segmentation model: per-pixel class scores, no image-level target
    if dense or int(getattr(model, "num_classes", 0) or 0) > 0:
        probs = logits.softmax(1)
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(1)
        preds = probs.argmax(1)
        hist: Dict[int, int] = {}
        for p in preds.reshape(-1).tolist():
            hist[p] = hist.get(p, 0) + 1
        scores = {
            "mean_confidence": probs.max(1).values.mean().item(),
            "mean_entropy": entropy.mean().item(),
            "target_hit_rate": None if dense else (preds == targets.cpu()).double().mean().item(),
            "distinct_predicted_classes": len(hist),
            "predicted_class_histogram": dict(sorted(hist.items())),  # a dense model: pixels per class
        }
    return {
        "num_images": n,
        **scores,
        "pairwise_diversity": 1.0 - mean_sim,
        "pixel_mean": images.mean().item(),
        "pixel_std": images.std().item(),
    }
