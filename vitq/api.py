"""The public verbs: ``quantize`` a model with a recipe and data, ``evaluate`` it against the float model."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional, Union

import torch
from torch import nn

from .errors import VitqError
from .eval.metrics import compare, model_size, predict
from .methods.lifecycle import convert, prepare
from .methods.plan import Plan, apply_plan, plan_from_model
from .methods.stages import Refresher, StageContext
from .models.adapters import kept_on_its_device
from .quant.protocol import DEFAULT_INPUT_BITS
from .recipes.recipe import Recipe, load_recipe

Batches = Iterable[Any]


def resolve_device(device: Optional[Union[str, torch.device]] = None) -> torch.device:
    """``None`` → CUDA when present, else CPU; ``cuda`` without CUDA is an error."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise VitqError(f"unknown device {device!r}; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise VitqError("--device cuda was asked for but CUDA is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise VitqError(f"unsupported device {device.type!r}; use cpu or cuda")
    return device


@dataclass
class QuantizedModel:
    """What :func:`quantize` returns: the quantized model, its plan and what the stages recorded
    (e.g. ``record["search_curve"]``; ``record["stage_seconds"]``: each stage's wall time)."""

    model: nn.Module
    plan: Plan
    record: Dict[str, Any] = field(default_factory=dict)


def quantize(
    model: nn.Module,
    recipe: Union[str, Recipe] = "recommended",
    data: Batches = (),
    *,
    w_bits: int = 8,
    a_bits: int = 8,
    protocol: str = "p1",
    device: Optional[Union[str, torch.device]] = None,
    progress: bool = True,
    meta: Optional[Dict[str, Any]] = None,
    seed: int = 0,
    start_plan: Optional[Union[Plan, str, Path]] = None,
    workdir: Optional[Union[str, Path]] = None,
    resume: bool = False,
    refresh: Optional[Refresher] = None,
    log: Optional[Callable[..., None]] = None,
    input_bits: Optional[int] = DEFAULT_INPUT_BITS,
) -> QuantizedModel:
    """Quantize a float ViT/DeiT/Swin with a recipe, calibrating on ``data``.

    The recipe's stages run in order (``calibrate``, then refiners such as ``search``). The
    float model is not modified.

    Args:
        model: a timm ``VisionTransformer`` or ``SwinTransformer``.
        recipe: a built-in recipe name (``vitq list``), a YAML path or a :class:`Recipe`.
        data: calibration batches: image tensors or ``(images, labels)`` pairs, already
            preprocessed for the model.
        w_bits, a_bits: bit-widths, 2 to 8 (ignored with ``start_plan``: the plan's).
        protocol: ``p1``, ``p2`` or ``p3`` (which tensors are quantized).
        device: ``cpu``, ``cuda`` or None (CUDA when present).
        progress: show progress bars.
        meta: extra facts recorded in the plan.
        seed: seeds the random choices of the stages (same seed, same plan).
        start_plan: start from this plan (or ``plan.json`` path) instead of calibrating: the
            stages that calibrate are skipped, the refiners improve the plan.
        workdir: folder for stage checkpoints (e.g. the search state); needed for ``resume``.
        resume: continue a stage from its checkpoint in ``workdir``.
        refresh: data-free runs: ``refresh(qmodel, batches, step)`` returns new images made
            from the current quantized model (CLAMP-ViT's cycle).
        log: where stage messages go (e.g. a logger's ``info``).
        input_bits: bits of the image input (the patch embedding's input): 8 by default at every
            activation width, as in RepQ-ViT; None quantizes it at ``a_bits`` (ignored with
            ``start_plan``: the plan's).

    Example:
        >>> import timm, torch
        >>> float_model = timm.create_model("test_vit")
        >>> result = quantize(float_model, "minmax", [torch.randn(2, 3, 160, 160)], w_bits=4, progress=False)
        >>> result.plan.meta["w_bits"]
        4
    """
    recipe = load_recipe(recipe)
    device = resolve_device(device)
    batches = [b[0] if isinstance(b, (tuple, list)) else b for b in data]
    if start_plan is not None:
        plan = start_plan if isinstance(start_plan, Plan) else Plan.load(start_plan)
        qmodel = apply_plan(model, plan)
        protocol = plan.meta.get("protocol", protocol)
        w_bits, a_bits = plan.meta.get("w_bits", w_bits), plan.meta.get("a_bits", a_bits)
    else:
        qmodel = prepare(
            model,
            protocol=protocol,
            w_bits=w_bits,
            a_bits=a_bits,
            weight_symmetric=recipe.weights.symmetric,
            act_symmetric=recipe.activations.symmetric,
            input_bits=input_bits,
            kinds=recipe.kinds,
        )
    ctx = StageContext(
        float_model=model, model=qmodel, data=batches, weights=recipe.weights, activations=recipe.activations,
        device=device, w_bits=w_bits, a_bits=a_bits, seed=seed, progress=progress,
        workdir=Path(workdir) if workdir is not None else None, resume=resume, refresh=refresh,
        log=log or (lambda *args: None), from_plan=start_plan is not None,
    )
    converted = start_plan is not None
    skipped = []
    with kept_on_its_device(model):  # stages run the float model on `device`; the caller's stays where it is
        for config in recipe.stages:
            stage = config.build()
            if ctx.from_plan and not stage.needs_calibrated:
                skipped.append(config.name)
                continue
            if stage.needs_calibrated and not converted:
                convert(qmodel)  # raises, naming the point, when a calibrating stage is missing before
                converted = True
            if not batches:
                raise VitqError(f"stage {config.name!r} of recipe {recipe.name!r} needs calibration images; "
                                "none were given")
            torch.manual_seed(seed)
            started = time.perf_counter()
            stage.run(ctx)
            ctx.record.setdefault("stage_seconds", {})[config.name] = round(time.perf_counter() - started, 2)
    convert(qmodel)
    plan_meta = {"recipe": recipe.name, "protocol": protocol, "w_bits": w_bits, "a_bits": a_bits, "seed": seed,
                 **(meta or {})}
    if start_plan is None:
        plan_meta["input_bits"] = input_bits if input_bits is not None else a_bits
    elif "input_bits" in plan.meta:
        plan_meta["input_bits"] = plan.meta["input_bits"]
    if start_plan is not None:
        plan_meta["start_plan"] = {"recipe": plan.meta.get("recipe"), "skipped_stages": skipped}
    for key in ("search", "opt_m", "greedy_mp", "reparam", "gptq", "reconstruct"):
        if key in ctx.record:
            plan_meta[key] = ctx.record[key]
    if "smooth" in ctx.record:  # the smoothed pairs themselves go into meta["smooth"] (plan_from_model)
        plan_meta["smooth_settings"] = ctx.record["smooth"]
    return QuantizedModel(qmodel, plan_from_model(qmodel, plan_meta), ctx.record)


def evaluate(
    float_model: nn.Module,
    quantized_model: nn.Module,
    data: Batches,
    *,
    device: Optional[Union[str, torch.device]] = None,
    progress: bool = True,
    fp_logits: Optional[torch.Tensor] = None,
) -> Dict[str, Any]:
    """Top-1/5 of both models on the same images, agreement, KL(float ‖ quantized) and size.

    ``data`` yields ``(images, labels)``. ``fp_logits`` reuses float logits computed before on
    the same batches (benchmarks compare many quantized models against one float model).
    """
    device = resolve_device(device)
    if fp_logits is None:
        with kept_on_its_device(float_model):
            (fp_logits, q_logits), labels = predict([float_model, quantized_model], data, device, progress)
    else:
        (q_logits,), labels = predict(quantized_model, data, device, progress)
        if len(fp_logits) != len(q_logits):
            raise VitqError(f"fp_logits has {len(fp_logits)} rows but the data has {len(q_logits)} images")
    metrics: Dict[str, Any] = compare(fp_logits, q_logits, labels)
    size = model_size(quantized_model)
    metrics.update(
        num_eval=int(labels.numel()),
        weight_bytes=size.weight_bytes,
        fp_weight_bytes=size.fp_bytes,
    )
    return metrics
