"""Evaluation: logits over a data set, accuracy, agreement with the float model, KL, size."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import VitqError
from ..models.adapters import iter_quantizers
from ..nn import QuantModule

Batch = Tuple[torch.Tensor, torch.Tensor]


@torch.no_grad()
def predict(
    models: Union[nn.Module, Sequence[nn.Module]],
    batches: Iterable[Batch],
    device: Union[str, torch.device] = "cpu",
    progress: bool = True,
    desc: str = "evaluate",
) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """Logits (float32, on CPU) of each model and the labels, in one pass over ``(images, labels)`` batches."""
    models = [models] if isinstance(models, nn.Module) else list(models)
    for model in models:
        model.eval().to(device)
    logits: List[List[torch.Tensor]] = [[] for _ in models]
    labels = []
    for images, target in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
        images = images.to(device)
        for out, model in zip(logits, models):
            out.append(model(images).float().cpu())
        labels.append(torch.as_tensor(target).cpu())
    if not labels:
        raise VitqError("evaluation got no images")
    return [torch.cat(out) for out in logits], torch.cat(labels)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Percent of rows whose label is among the ``k`` largest logits."""
    k = min(k, logits.shape[1])
    hits = (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
    return 100.0 * hits.double().mean().item()


def compare(fp_logits: torch.Tensor, q_logits: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
    """Accuracy of both models, top-1 agreement (%) and mean KL(float ‖ quantized) of the softmax outputs."""
    fp_logp = F.log_softmax(fp_logits.double(), dim=1)
    q_logp = F.log_softmax(q_logits.double(), dim=1)
    kl = (fp_logp.exp() * (fp_logp - q_logp)).sum(dim=1).mean().item()
    return {
        "fp_top1": round(topk_accuracy(fp_logits, labels, 1), 4),
        "fp_top5": round(topk_accuracy(fp_logits, labels, 5), 4),
        "quant_top1": round(topk_accuracy(q_logits, labels, 1), 4),
        "quant_top5": round(topk_accuracy(q_logits, labels, 5), 4),
        "agreement": round(100.0 * (fp_logits.argmax(1) == q_logits.argmax(1)).double().mean().item(), 4),
        "kl": float(f"{kl:.6g}"),
    }


@dataclass(frozen=True)
class ModelSize:
    """Storage of a model's parameters, in bytes.

    ``weight_bytes``: quantized weights packed at their bit-width, plus their scales and zero
    points as float32, plus every other parameter (biases, LayerNorm, embeddings) as float32.
    ``fp_bytes``: every parameter as float32.
    """

    weight_bytes: int
    fp_bytes: int
    quantized_params: int
    float_params: int


def model_size(model: nn.Module) -> ModelSize:
    quantized: Dict[int, Tuple[int, int]] = {}  # id(weight) -> (packed bytes, qparam bytes)
    for module in model.modules():
        quantizer = getattr(module, "weight_quantizer", None)
        if quantizer is None or not quantizer.spec.enabled:
            continue
        weight = module.weight
        qparams = 0 if quantizer.scale is None else 4 * (quantizer.scale.numel() + quantizer.zero_point.numel())
        quantized[id(weight)] = ((weight.numel() * quantizer.spec.bits + 7) // 8, qparams)
    total = fp = n_q = n_f = 0
    for p in model.parameters():
        fp += 4 * p.numel()
        if id(p) in quantized:
            packed, qparams = quantized[id(p)]
            total += packed + qparams
            n_q += p.numel()
        else:
            total += 4 * p.numel()
            n_f += p.numel()
    return ModelSize(total, fp, n_q, n_f)


def float_layers(model: nn.Module) -> Dict[str, int]:
    """Layers with weights (convolutions, linear layers) that stay float in a prepared model, counted
    under their parent module's name (e.g. a hybrid ViT's ResNet stem: ``patch_embed.backbone``)."""
    out: Dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantModule):  # quantized unless its weight quantizer is off
            quantizer = getattr(module, "weight_quantizer", None)
            if quantizer is not None and not quantizer.spec.enabled:
                out[name] = out.get(name, 0) + 1
        elif isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):  # never wrapped: e.g. a hybrid's stem
            group = ".".join(name.split(".")[:-1][:2]) or name
            out[group] = out.get(group, 0) + 1
    return out


def count_quant_points(model: nn.Module) -> Dict[str, int]:
    """Enabled quant points per role."""
    counts: Dict[str, int] = {}
    for _, q in iter_quantizers(model):
        if q.spec.enabled:
            counts[q.role] = counts.get(q.role, 0) + 1
    return counts
