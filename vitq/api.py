"""The public verbs: ``quantize`` a model with a recipe and data (real, or synthesised when there is
none), ``synthesize`` data-free calibration images, ``evaluate`` against the float model."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .data.synthetic import GenerationResult, create_generator, make_refresher
from .errors import VitqError
from .eval.metrics import compare, model_size, predict
from .eval.segmentation import compare_segmentation, segmentation_metrics
from .methods.backbone import backbone_inputs, backbone_module, splice
from .methods.lifecycle import convert, prefix_rows_of, prepare
from .methods.plan import Plan, apply_plan, backbone_plan, plan_from_model
from .methods.stages import Refresher, StageContext
from .models.adapters import kept_on_its_device
from .models.loading import data_config_of, weights_digest
from .quant.protocol import DEFAULT_INPUT_BITS, get_protocol
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
    #: data-free runs: the synthetic calibration images (as refreshed last) and their targets
    synthetic: Optional[GenerationResult] = None


@dataclass
class Synthesized:
    """What :func:`synthesize` returns: the images and the generator that made them."""

    result: GenerationResult
    generator: str
    settings: Dict[str, Any]


def _generator_settings(recipe: Recipe, generator: str, settings: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """The recipe's generator settings when it names this generator, updated by ``settings``."""
    out = dict(recipe.data_free.settings) if recipe.data_free.generator == generator else {}
    out.update(settings or {})
    return out


def synthesize(
    model: nn.Module,
    recipe: Union[str, Recipe] = "recommended",
    *,
    generator: Optional[str] = None,
    num_images: Optional[int] = None,
    settings: Optional[Mapping[str, Any]] = None,
    data_config: Optional[Mapping[str, Any]] = None,
    seed: int = 0,
    device: Optional[Union[str, torch.device]] = None,
    progress: bool = True,
) -> Synthesized:
    """Data-free calibration images made from ``model`` itself, as the recipe's ``data_free``
    section says (generator, number, settings), each overridable.

    Args:
        generator: ``clamp``, ``psaq``, ``gaussian``, ... (``vitq list``); default: the recipe's.
        num_images: default: the recipe's ``data_free.num_images``.
        settings: generator settings over the recipe's (e.g. ``{"iterations": 100}``).
        data_config: the model's preprocessing (default: timm's for the model).

    Raises:
        GenerationDiverged: when the images stop being finite; it carries those made so far.
    """
    recipe = load_recipe(recipe)
    device = resolve_device(device)
    name = generator or recipe.data_free.generator
    chosen = _generator_settings(recipe, name, settings)
    gen = create_generator(name, chosen)
    num = num_images if num_images is not None else recipe.data_free.num_images
    if isinstance(num, bool) or not isinstance(num, int) or num <= 0:
        raise VitqError(f"num_images must be a positive integer, got {num!r}")
    with kept_on_its_device(model):
        result = gen.generate(model.to(device), num, data_config or data_config_of(model), seed=seed, device=device,
                              progress=progress)
    return Synthesized(result, name, gen.settings.to_dict())


def data_free_refresher(
    model: nn.Module,
    recipe: Union[str, Recipe],
    generator: str,
    targets: torch.Tensor,
    *,
    settings: Optional[Mapping[str, Any]] = None,
    data_config: Optional[Mapping[str, Any]] = None,
    seed: int = 0,
    device: Optional[Union[str, torch.device]] = None,
    log: Optional[Callable[..., None]] = None,
) -> Optional[Refresher]:
    """CLAMP-ViT's cycle for a data-free run: a function that refines the synthetic images against
    the quantized model being built, when the recipe's ``search`` stage asks for it
    (``refresh_every``); None otherwise."""
    recipe = load_recipe(recipe)
    if "search" not in recipe.stage_names or not recipe.stage("search").settings.refresh_every:
        return None
    cfg = recipe.data_free
    return make_refresher(create_generator(generator, _generator_settings(recipe, generator, settings)), model,
                          targets, data_config or data_config_of(model), steps=cfg.refresh_steps,
                          adversary_weight=cfg.refresh_adversary, seed=seed, device=resolve_device(device), log=log)


def _remembering(refresh: Optional[Refresher], made: Synthesized) -> Optional[Refresher]:
    """``refresh`` that also keeps the last refreshed images in ``made.result.images``."""
    if refresh is None:
        return None

    def remembered(qmodel: nn.Module, batches, step: int):
        new = refresh(qmodel, batches, step)
        made.result.images = torch.cat([b.detach().cpu() for b in new])
        return new

    return remembered


def start_plan_settings(plan: Plan, w_bits: Optional[int] = None, a_bits: Optional[int] = None,
                        protocol: Optional[str] = None) -> Tuple[int, int, str]:
    """The bit-widths and protocol of a run that starts from ``plan``: the plan's own. A value given
    that differs from the plan's is refused by name (its quantizers are kept as they are).

    Example:
        >>> start_plan_settings(Plan({"w_bits": 4, "a_bits": 8, "protocol": "p1"}, {}, {}), w_bits=4)
        (4, 8, 'p1')
    """
    flags = {"w_bits": "--w-bits", "a_bits": "--a-bits", "protocol": "--protocol"}
    for key, given in (("w_bits", w_bits), ("a_bits", a_bits), ("protocol", protocol)):
        if given is not None and given != plan.meta.get(key):
            raise VitqError(f"{key} {given} ({flags[key]}) differs from the start plan's {plan.meta.get(key)}: leave "
                            "it out (the plan's bit-widths and protocol are kept)")
    return plan.meta.get("w_bits", 8), plan.meta.get("a_bits", 8), plan.meta.get("protocol", "p1")


def quantize(
    model: nn.Module,
    recipe: Union[str, Recipe] = "recommended",
    data: Optional[Batches] = (),
    *,
    w_bits: Optional[int] = None,
    a_bits: Optional[int] = None,
    protocol: Optional[str] = None,
    device: Optional[Union[str, torch.device]] = None,
    progress: bool = True,
    meta: Optional[Dict[str, Any]] = None,
    seed: int = 0,
    start_plan: Optional[Union[Plan, str, Path]] = None,
    budget: Optional[str] = None,
    workdir: Optional[Union[str, Path]] = None,
    resume: bool = False,
    refresh: Optional[Refresher] = None,
    log: Optional[Callable[..., None]] = None,
    input_bits: Optional[int] = DEFAULT_INPUT_BITS,
    data_free: Optional[str] = None,
    num_images: Optional[int] = None,
    gen_settings: Optional[Mapping[str, Any]] = None,
    batch_size: int = 32,
    backbone: Optional[str] = None,
    head: bool = False,
    generated: bool = False,
) -> QuantizedModel:
    """Quantize a float ViT/DeiT/Swin with a recipe, calibrating on ``data``.

    The recipe's stages run in order (``calibrate``, then refiners such as ``search``). The
    float model is not modified.

    Args:
        model: a timm ``VisionTransformer`` or ``SwinTransformer``.
        recipe: a built-in recipe name (``vitq list``), a YAML path or a :class:`Recipe`.
        data: calibration batches: image tensors or ``(images, labels)`` pairs, already
            preprocessed for the model. ``None``: data-free, the images are synthesised from the
            model (:func:`synthesize` with ``data_free``, ``num_images``, ``gen_settings``) and,
            when the recipe's search asks for it, refreshed during the search (CLAMP-ViT's cycle).
        w_bits, a_bits: bit-widths, 2 to 8 (default 8; with ``start_plan``: the plan's, and a
            different value is refused).
        protocol: ``p1`` (default), ``p2``, ``p3`` or ``p4`` (which tensors are quantized; with
            ``start_plan``: the plan's).
        device: ``cpu``, ``cuda`` or None (CUDA when present).
        progress: show progress bars.
        meta: extra facts recorded in the plan.
        seed: seeds the random choices of the stages (same seed, same plan).
        start_plan: start from this plan (or ``plan.json`` path) instead of calibrating: the
            stages that calibrate are skipped, the refiners improve the plan.
        budget: mixed precision: the average weight/activation bits of the blocks' linear layers,
            e.g. ``"w4a6"``, for the recipe's width-allocating stage (``mptq-vit-mp``'s Greedy MP,
            ``clamp-vit-mp``'s search); other points keep ``w_bits``/``a_bits``.
        workdir: folder for stage checkpoints (e.g. the search state); needed for ``resume``.
        resume: continue a stage from its checkpoint in ``workdir``.
        refresh: data-free runs: ``refresh(qmodel, batches, step)`` returns new images made
            from the current quantized model (CLAMP-ViT's cycle).
        log: where stage messages go (e.g. a logger's ``info``).
        input_bits: bits of the image input (the patch embedding's input): 8 by default at every
            activation width, as in RepQ-ViT; None quantizes it at ``a_bits`` (ignored with
            ``start_plan``: the plan's).
        data_free, num_images, gen_settings: with ``data=None``: the generator (default: the
            recipe's), how many images, and its settings.
        batch_size: with ``data=None``: images per calibration batch.
        backbone: the path of the transformer inside ``model`` to quantize (e.g. ``"backbone.body"``
            of a torchvision detector) when ``model``'s own forward takes other inputs than an
            image tensor: ``data`` is then in the model's own input form (a list of images, or
            ``(inputs, targets)`` tuples), the tensors the model feeds the backbone are captured,
            the stages run on the backbone alone, and the result is the whole model with the
            quantized backbone in place (the plan records the path; :func:`apply_plan` follows
            it). Without it, a model that holds one ViT/Swin (a segmentation model taking image
            tensors) is quantized whole, its backbone found by type.
        head: with a model around a backbone (a segmentation model), also quantize the linear layers
            and convolutions outside the backbone (the decode head); by default they stay float.
            The plan records it (``quantize_head``) and :func:`apply_plan` follows.
        generated: ``data`` are generated (data-free) images made beforehand (``data=None`` implies
            it): stages gated ``images: real`` are skipped (the recommended recipe's ``prefix_rows``,
            whose grid of a few class-token rows fits generated images badly).

    Example:
        >>> import timm, torch
        >>> float_model = timm.create_model("test_vit")
        >>> result = quantize(float_model, "minmax", [torch.randn(2, 3, 160, 160)], w_bits=4, progress=False)
        >>> result.plan.meta["w_bits"]
        4
    """
    recipe = load_recipe(recipe)
    if budget is not None:
        recipe = recipe.with_budget(budget)
    device = resolve_device(device)
    if start_plan is not None and not isinstance(start_plan, Plan):
        start_plan = Plan.load(start_plan)
    if start_plan is not None:
        w_bits, a_bits, protocol = start_plan_settings(start_plan, w_bits, a_bits, protocol)
        if head and not start_plan.meta.get("quantize_head"):
            raise VitqError("head=True: the start plan was made with the head in float; its quant points are kept, "
                            "so quantize afresh (without start_plan) to quantize the head")
    if head and backbone is not None:
        raise VitqError("head=True does not apply with backbone=: only that sub-module is quantized")
    w_bits = 8 if w_bits is None else w_bits
    a_bits = 8 if a_bits is None else a_bits
    protocol = protocol or "p1"
    if backbone is not None:
        sub = backbone_module(model, backbone)
        # the plan records the whole model's checksum (the model apply_plan is given back)
        meta = {**(meta or {})}
        meta["model"] = {"weights_sha256": weights_digest(model), **(meta.get("model") or {})}
        if start_plan is not None:
            start_plan = backbone_plan(model, backbone, start_plan)
        inputs = None if data is None else backbone_inputs(model, backbone, data, device)
        with kept_on_its_device(model):
            inner = quantize(sub, recipe, inputs, w_bits=w_bits, a_bits=a_bits, protocol=protocol, device=device,
                             progress=progress, meta=meta, seed=seed, start_plan=start_plan, workdir=workdir,
                             resume=resume, refresh=refresh, log=log, input_bits=input_bits, data_free=data_free,
                             num_images=num_images, gen_settings=gen_settings, batch_size=batch_size,
                             generated=generated)
        inner.plan.meta["backbone"] = backbone
        return QuantizedModel(splice(model, backbone, inner.model), inner.plan, inner.record, inner.synthetic)
    made: Optional[Synthesized] = None
    if data is None:
        made = synthesize(model, recipe, generator=data_free, num_images=num_images, settings=gen_settings, seed=seed,
                          device=device, progress=progress)
        data = list(made.result.images.split(batch_size))
        generated = True
        if refresh is None:
            refresh = _remembering(data_free_refresher(model, recipe, made.generator, made.result.targets,
                                                       settings=gen_settings, seed=seed, device=device, log=log),
                                   made)
    elif data_free is not None or num_images is not None or gen_settings is not None:
        raise VitqError("data_free, num_images and gen_settings are for data-free runs: pass data=None")
    batches = [b[0] if isinstance(b, (tuple, list)) else b for b in data]
    # the observers of this bit-width pair (a recipe's weights/activations may change by_bits)
    weights, activations = recipe.weights.at_bits(w_bits, a_bits), recipe.activations.at_bits(w_bits, a_bits)
    if start_plan is not None:
        plan = start_plan
        qmodel = apply_plan(model, plan)
    else:
        qmodel = prepare(
            model,
            protocol=protocol,
            w_bits=w_bits,
            a_bits=a_bits,
            weight_symmetric=weights.symmetric_at(w_bits),
            act_symmetric=activations.symmetric_at(a_bits),
            act_symmetric_roles=activations.symmetric_roles,
            input_bits=input_bits,
            # a recipe's kinds are its choice for the roles it quantizes: a role the protocol leaves in
            # float (p3's probabilities) has none to choose
            kinds={role: kind for role, kind in recipe.kinds.items() if role in get_protocol(protocol).quantized},
            head=head,
        )
    ctx = StageContext(
        float_model=model, model=qmodel, data=batches, weights=weights, activations=activations,
        device=device, w_bits=w_bits, a_bits=a_bits, seed=seed, progress=progress,
        workdir=Path(workdir) if workdir is not None else None, resume=resume, refresh=refresh,
        log=log or (lambda *args: None), from_plan=start_plan is not None,
    )
    converted = start_plan is not None
    skipped = []
    with kept_on_its_device(model):  # stages run the float model on `device`; the caller's stays where it is
        for written in recipe.stages:
            config, outside = written.at_bits(w_bits, a_bits, generated)
            if config is not written:  # its by_bits entry for this bit-width
                ctx.record.setdefault("by_bits", {})[config.name] = f"w{w_bits}a{a_bits}"
            stage = config.build()
            if ctx.from_plan and not stage.needs_calibrated:
                skipped.append(config.name)
                continue
            if outside:  # the recipe runs this stage at other bit-widths only
                ctx.log(f"{config.name}: skipped ({outside}: it runs at {config.gate.describe()})")
                ctx.record[config.name] = {**config.settings.to_dict(), "skipped": outside}
                ctx.record.setdefault("skipped_stages", {})[config.name] = outside
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
    if head or (start_plan is not None and plan.meta.get("quantize_head")):
        plan_meta["quantize_head"] = True
    plan_meta["model"] = {**(plan_meta.get("model") or {})}
    if "weights_sha256" not in plan_meta["model"]:  # the CLI's meta has it already
        plan_meta["model"]["weights_sha256"] = weights_digest(model)
    prefix = prefix_rows_of(qmodel)
    if prefix:
        plan_meta["prefix_rows"] = prefix
    if start_plan is None:
        plan_meta["input_bits"] = input_bits if input_bits is not None else a_bits
    elif "input_bits" in plan.meta:
        plan_meta["input_bits"] = plan.meta["input_bits"]
    if start_plan is not None:
        plan_meta["start_plan"] = {"recipe": plan.meta.get("recipe"), "skipped_stages": skipped}
    for key in ("search", "opt_m", "greedy_mp", "reparam", "attn_reparam", "gptq", "bias_correct", "reconstruct", "skipped_stages",
                "by_bits"):
        if key in ctx.record:
            plan_meta[key] = ctx.record[key]
    if "smooth" in ctx.record:  # the smoothed pairs themselves go into meta["smooth"] (plan_from_model)
        plan_meta["smooth_settings"] = ctx.record["smooth"]
    synthetic = None
    if made is not None:
        plan_meta.setdefault("calibration", {"data_free": made.generator, "num": len(made.result.images), "seed": seed})
        ctx.record["data_free"] = {"generator": made.generator, "settings": made.settings,
                                   "seconds": round(made.result.seconds, 2), "output_loss": made.result.output_loss}
        synthetic = made.result
    return QuantizedModel(qmodel, plan_from_model(qmodel, plan_meta), ctx.record, synthetic)


def evaluate(
    float_model: nn.Module,
    quantized_model: nn.Module,
    data: Batches,
    *,
    device: Optional[Union[str, torch.device]] = None,
    progress: bool = True,
    fp_logits: Optional[torch.Tensor] = None,
    ignore_index: Optional[int] = None,
) -> Dict[str, Any]:
    """Top-1/5 of both models on the same images, agreement, KL(float ‖ quantized) and size
    (a segmentation model, ``task = "segmentation"``: :func:`evaluate_segmentation`'s metrics).

    ``data`` yields ``(images, labels)``. ``fp_logits`` reuses float logits computed before on
    the same batches (benchmarks compare many quantized models against one float model).
    ``ignore_index``: segmentation: the void label.
    """
    if getattr(float_model, "task", "classification") == "detection":
        raise VitqError("a detector is scored against COCO annotations: use vitq.evaluate_detection(float_model, "
                        "quantized_model, batches, annotations)")
    if getattr(float_model, "task", "classification") == "segmentation":
        if fp_logits is not None:
            raise VitqError("fp_logits is for classifiers; a segmentation model's float outputs are not kept")
        return evaluate_segmentation(float_model, quantized_model, data, ignore_index=ignore_index, device=device,
                                     progress=progress)[0]
    device = resolve_device(device)
    if getattr(float_model, "num_classes", None) == 0:
        raise VitqError("the model has no classifier (num_classes=0): it outputs features, so top-1, agreement and "
                        "KL mean nothing; evaluate a model with its head, or quantize without evaluation images")
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


def evaluate_segmentation(
    float_model: nn.Module,
    quantized_model: nn.Module,
    data: Batches,
    *,
    num_classes: Optional[int] = None,
    ignore_index: Optional[int] = None,
    classes: Optional[Sequence[str]] = None,
    device: Optional[Union[str, torch.device]] = None,
    progress: bool = True,
    examples: Union[int, Sequence[int]] = 0,
) -> Tuple[Dict[str, Any], List[Any]]:
    """mIoU (dataset-level, void ignored), pixel accuracy and per-class IoU of both models, their
    pixel agreement and per-pixel KL(float ‖ quantized), and size.

    Args:
        data: ``(images, label maps)`` batches (:func:`vitq.data.segmentation_loader`); logits are
            resized to each label map's size.
        num_classes: default: the model's ``num_classes``.
        ignore_index: the void label (not scored).
        classes: class names for the per-class table.
        examples: how many ``(image, label, [float prediction, quantized prediction])`` to return
            (the first images), or their indices in ``data``.

    Returns:
        The metrics (percent) and the examples.
    """
    device = resolve_device(device)
    num_classes = num_classes or int(getattr(float_model, "num_classes", 0) or 0)
    if num_classes <= 0:
        raise VitqError("pass num_classes: the model does not say how many classes it segments")
    with kept_on_its_device(float_model):
        out = compare_segmentation([float_model, quantized_model], data, num_classes, ignore_index, device, progress,
                                   keep=examples)
    metrics = segmentation_metrics(out["confusion"][0], out["confusion"][1], out["agreement"][1], out["kl"][1],
                                   classes)
    size = model_size(quantized_model)
    metrics.update(num_eval=out["num_images"], weight_bytes=size.weight_bytes, fp_weight_bytes=size.fp_bytes)
    return metrics, out["examples"]


def evaluate_detection(
    float_model: nn.Module,
    quantized_model: nn.Module,
    data: Batches,
    annotations: Any,
    *,
    label_to_category: Optional[Mapping[int, int]] = None,
    device: Optional[Union[str, torch.device]] = None,
    progress: bool = True,
) -> Dict[str, Any]:
    """COCO box AP (and mask AP when the model predicts masks) of a torchvision-style detector and
    its quantized copy on the same images, through pycocotools' COCOeval (percent).

    Args:
        data: ``(images, targets)`` batches: a list of ``[3, H, W]`` images and, per image, a dict
            with its COCO ``image_id``.
        annotations: the COCO-format ground truth (a JSON path or dict).
        label_to_category: the model's label → COCO category id, when they differ.
    """
    from .eval.detection import compare_detection, load_coco

    device = resolve_device(device)
    coco = load_coco(annotations)
    with kept_on_its_device(float_model):
        metrics = compare_detection(float_model, quantized_model, data, coco, label_to_category, device, progress)
    size = model_size(quantized_model)
    metrics.update(weight_bytes=size.weight_bytes, fp_weight_bytes=size.fp_bytes)
    return metrics
