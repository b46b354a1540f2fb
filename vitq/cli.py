"""The ``vitq`` command line: parse, load, call the library, write the run folder."""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import __version__
from .api import (data_free_refresher, evaluate, evaluate_detection, evaluate_segmentation, quantize, resolve_device,
                  start_plan_settings, synthesize)
from .data.detection import (DetectionSet, check_detection_images, detection_calibration_loader, detection_loader,
                             scan_detection)
from .data.segmentation import SegmentationSet, scan_segmentation, segmentation_loader
from .data.folder import (ImageList, balanced_subset, check_images, check_labels, find_bad_images, load_images, make_loader,
                          scan_folder)
from .data.synthetic import GENERATORS, GenerationDiverged, GenerationResult
from .data.synthetic.generators import has_class_head
from .methods.search import FITNESS
from .methods.stages import STAGES, Refresher
from .data.synthetic.io import image_stats, save_grid, save_images
from .errors import VitqError
from .files import atomic_torch_save, load_state
from .eval.bits import bit_stats
from .eval.metrics import count_quant_points, float_layers, model_size
from .export import FORMATS, OnnxModel, bench_speed, evaluate_onnx, evaluate_onnx_segmentation, export_onnx
from .export._deps import require
from .export.onnx_export import DEFAULT_OPSET
from .export.speed import BACKENDS, profile_table, size_table, speed_table
from .methods.lifecycle import check_bits
from .methods.plan import Plan, apply_plan, check_plan_weights
from .models.adapters import ADAPTERS, BackboneAdapter, find_adapter, kept_on_its_device
from .models.loading import CHECKPOINT_SUFFIXES, LoadedModel, load_model
from .quant.observers import OBSERVERS
from .quant.protocol import DEFAULT_INPUT_BITS, PROTOCOLS, get_protocol
from .recipes.recipe import RECIPES, load_recipe, setting_value
from .report import (RunFolder, bits_per_layer, detection_examples, pareto, run_report, search_curve,
                     segmentation_examples)

DEFAULT_NUM_CALIB = 256
DEFAULT_BATCH = 64
DEFAULT_BATCH_DENSE = 8  # 660 tokens an image: a batch of 64 allocates gigabytes of attention maps
#: detection: torchvision resizes the shorter side to 800 by default (a 16-pixel ViT: ~4,000 tokens an image)
DEFAULT_BATCH_DETECTION = 2
OV_PRECISION_HELP = ("OpenVINO model: the precision of what stays float (LayerNorm, softmax, GELU; every product of "
                     "a float model); default OpenVINO's own, which is bf16 on a CPU with native bf16 (AVX512-BF16, "
                     "AMX) and f32 elsewhere")
#: dense tasks: their images are large (CamVid at 352×480: 660 tokens, 3.4× an ImageNet image's 196)
DEFAULT_NUM_CALIB_DENSE = 64


# -- argument types -------------------------------------------------------------------------------
def _bits(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bits must be an integer from 2 to 8, got {text!r}") from None
    try:
        return check_bits(value, "bits")
    except VitqError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _setting(text: str) -> Tuple[str, str, Any]:
    """``stage.key=value`` (value read as YAML: 2, 0.5, true, [a, b], null)."""
    key, sep, value = text.partition("=")
    stage, dot, name = key.strip().partition(".")
    if not sep or not dot or not stage or not name:
        raise argparse.ArgumentTypeError(f"--set takes STAGE.SETTING=VALUE, e.g. search.passes=2; got {text!r}")
    try:
        parsed = setting_value(value)
    except VitqError:
        raise argparse.ArgumentTypeError(f"--set {text!r}: the value is not valid YAML") from None
    return stage, name, parsed


def _json_object(text: str) -> Dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"--model-kwargs is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("--model-kwargs must be a JSON object, e.g. '{\"num_classes\": 10}'")
    return value


# -- parser -------------------------------------------------------------------------------------
def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="timm model name, or checkpoint (.pth/.safetensors/.npz) with a sidecar .json")
    parser.add_argument("--arch", help="timm architecture of a checkpoint without a sidecar card")
    parser.add_argument("--model-kwargs", type=_json_object, default=None, help="JSON of timm.create_model arguments")
    parser.add_argument("--random-weights", action="store_true", help="timm name only: random weights, no download")
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default=None, help="which tensors are quantized")
    parser.add_argument("--seed", type=int, default=None, help="seed of the data subsets (default 0; eval: the plan's)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--batch-size", type=_positive_int, default=None,
                        help=f"images per batch (default {DEFAULT_BATCH}; {DEFAULT_BATCH_DENSE} for --task "
                             f"segmentation, {DEFAULT_BATCH_DETECTION} for --task detection)")
    parser.add_argument("--workers", type=int, default=0, help="data-loading worker processes")
    parser.add_argument("--eval", dest="eval_dir",
                        help="evaluation images (ImageFolder or flat synset folder); --task segmentation: a set with "
                             "images/<split>/ and labels/<split>/ (its test/ split is scored); --task detection: a "
                             "folder with COCO annotations (annotations.json) and the images (in images/ or beside)")
    parser.add_argument("--task", choices=TASKS, default=None,
                        help="what the model predicts (default: the model's: its card's segmentation_head or "
                             "detection_head, or classification)")
    parser.add_argument("--num-eval", type=_positive_int, default=None, help="seeded class-balanced subset")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or log on the console")
    parser.add_argument("--skip-bad-images", action="store_true",
                        help="leave out unreadable images (counted in the report) instead of refusing the run")


def _generation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-images", type=_positive_int, default=None,
                        help="synthetic images to make (default: the recipe's data_free.num_images, 32)")
    parser.add_argument("--iterations", type=_positive_int, default=None, help="optimisation steps per batch")
    parser.add_argument("--gen-settings", type=_json_object, default=None,
                        help="JSON of generator settings (lr, tau, window, positives, batch_size, ...)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitq", description="Post-training quantization of vision transformers.")
    parser.add_argument("--version", action="version", version=f"vitq {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="calibrate a quantized model, evaluate it, write a run folder")
    _common(q)
    q.add_argument("--recipe", default="recommended",
                   help="recipe name (vitq list) or YAML file (default: recommended)")
    q.add_argument("--w-bits", type=_bits, default=None, help="weight bits, 2-8 (default 8; with --start-plan: the plan's)")
    q.add_argument("--a-bits", type=_bits, default=None, help="activation bits, 2-8 (default 8; with --start-plan: the plan's)")
    q.add_argument("--input-bits", type=_bits, default=None,
                   help="bits of the image input (the patch embedding's input): default 8 at every --a-bits, as "
                        "RepQ-ViT (PTQ4ViT leaves it in float)")
    q.add_argument("--start-plan", help="improve this plan (plan.json or run folder) instead of calibrating afresh")
    q.add_argument("--set", dest="overrides", action="append", type=_setting, default=[], metavar="STAGE.KEY=VALUE",
                   help="override a recipe stage setting, e.g. --set search.passes=2 (repeatable)")
    q.add_argument("--resume", action="store_true",
                   help="continue an unfinished run from the checkpoint in <out>.partial (same options)")
    q.add_argument("--budget", default=None,
                   help="mixed precision: average weight/activation bits of the blocks' linear layers, e.g. w4a4 "
                        "(recipes mptq-vit-mp or clamp-vit-mp; other points keep --w-bits/--a-bits)")
    q.add_argument("--quantize-head", action="store_true",
                   help="a model around a backbone (--task segmentation): also quantize the decode head's linear "
                        "layers and convolutions (default: the head stays float; a detector's heads always do)")
    source = q.add_mutually_exclusive_group(required=True)
    source.add_argument("--calib", help="calibration images (ImageFolder or flat synset folder; dense tasks: any "
                                         "folder of images)")
    source.add_argument("--data-free", choices=GENERATORS.names(),
                        help="no real images: calibrate on images synthesised from the model by this generator")
    _generation_options(q)
    q.add_argument("--num-calib", type=_positive_int, default=None,
                   help=f"default {DEFAULT_NUM_CALIB} ({DEFAULT_NUM_CALIB_DENSE} for --task segmentation or detection) "
                        "or all if fewer")
    q.add_argument("--out", required=True, help="run folder to write")
    q.add_argument("--overwrite", action="store_true", help="replace an existing run folder")

    e = sub.add_parser("eval", help="evaluate a plan (re-applied to a fresh float model) against the float model, "
                                     "or an exported model: .onnx in ONNX Runtime, .xml in OpenVINO")
    _common(e)
    e.add_argument("--plan", help="plan.json of a run (or the run folder); with an exported MODEL (.onnx, .xml): "
                                  "also evaluate the simulated PyTorch model of this plan and compare")
    e.add_argument("--out", help="write metrics.json here (a file path)")
    e.add_argument("--threads", type=_positive_int, default=None,
                   help="exported model: ONNX Runtime or OpenVINO threads")
    e.add_argument("--ov-precision", choices=["f32", "bf16", "f16"], default=None, help=OV_PRECISION_HELP)

    x = sub.add_parser("export", help="export a run's quantized model to ONNX (QDQ: integer kernels in ONNX Runtime) "
                                       "or OpenVINO IR")
    x.add_argument("run", help="run folder of `vitq quantize` (or its plan.json)")
    x.add_argument("--format", choices=["onnx", "openvino"], default="onnx",
                   help="onnx (QDQ, for ONNX Runtime; default) or openvino (IR .xml + .bin, converted from the QDQ "
                        "graph)")
    x.add_argument("--out", required=True, help="the file to write (.onnx, or .xml for openvino); the export report "
                                                "goes beside it")
    x.add_argument("--model", help="the float model the plan was made for (default: the one the plan records)")
    x.add_argument("--arch", help="timm architecture of a checkpoint without a sidecar card")
    x.add_argument("--model-kwargs", type=_json_object, default=None, help="JSON of timm.create_model arguments")
    x.add_argument("--random-weights", action="store_true", help="timm name only: random weights, no download")
    x.add_argument("--int-format", choices=["auto", *FORMATS], default="auto",
                   help="integer kernels of ONNX Runtime (default auto: the fastest exact one for this CPU)")
    x.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    x.add_argument("--overwrite", action="store_true", help="replace an existing file")
    x.add_argument("--quiet", action="store_true", help="print only the output paths")

    b = sub.add_parser("bench-speed",
                       help="latency and throughput of PyTorch FP32, ONNX Runtime and OpenVINO FP32 and int8; sizes")
    b.add_argument("model", help="timm model name, or checkpoint (.pth/.safetensors/.npz) with a sidecar .json")
    b.add_argument("--arch", help="timm architecture of a checkpoint without a sidecar card")
    b.add_argument("--model-kwargs", type=_json_object, default=None, help="JSON of timm.create_model arguments")
    b.add_argument("--random-weights", action="store_true", help="timm name only: random weights, no download")
    b.add_argument("--plan", help="plan.json of a run made for this model (default: a minmax plan calibrated here)")
    b.add_argument("--calib", help="without --plan: calibration images (default: seeded random images, speed only)")
    b.add_argument("--num-calib", type=_positive_int, default=32, help="without --plan: calibration images to use")
    b.add_argument("--w-bits", type=_bits, default=8, help="without --plan")
    b.add_argument("--a-bits", type=_bits, default=8, help="without --plan")
    b.add_argument("--protocol", choices=sorted(PROTOCOLS), default="p1", help="without --plan")
    b.add_argument("--batch-sizes", type=_positive_int, nargs="+", default=[1, 32], help="default: 1 32")
    b.add_argument("--repeats", type=_positive_int, default=10, help="timed runs per backend and batch size")
    b.add_argument("--warmup", type=_positive_int, default=2, help="untimed runs first")
    b.add_argument("--threads", type=_positive_int, default=None, help="intra-op threads (default: the libraries')")
    b.add_argument("--int-format", choices=["auto", *FORMATS], default="auto")
    b.add_argument("--ov-precision", choices=["f32", "bf16", "f16"], default=None, help=OV_PRECISION_HELP)
    b.add_argument("--backends", nargs="+", choices=list(BACKENDS), default=None,
                   help="default: every backend whose runtime is installed (OpenVINO: pip install 'vitq[openvino]')")
    b.add_argument("--profile", action="store_true", help="ONNX Runtime's time per op type at the largest batch")
    b.add_argument("--keep", help="keep the exported .onnx files in this folder")
    b.add_argument("--out", default="bench-speed.json", help="JSON file to write (default bench-speed.json)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--quiet", action="store_true", help="no progress on the console")

    g = sub.add_parser("generate", help="synthesise calibration images from the model (data-free)")
    _common(g)
    g.add_argument("--generator", choices=GENERATORS.names(), default="clamp")
    g.add_argument("--recipe", default=None, help="take the generator settings from this recipe's data_free section")
    _generation_options(g)
    g.add_argument("--out", required=True, help="folder to write (images/, grid.png, stats.json)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing folder")

    sub.add_parser("list", help="recipes, observers, protocols, generators and supported model families")
    return parser


# -- helpers ------------------------------------------------------------------------------------
def _load(args: argparse.Namespace, plan: Optional[Plan] = None) -> LoadedModel:
    """The float model; random weights are seeded (by the plan's seed when a plan made them)."""
    seed = ((plan.meta.get("model") or {}).get("random_weights_seed") if plan is not None else None)
    loaded = load_model(args.model, arch=args.arch, model_kwargs=args.model_kwargs, pretrained=not args.random_weights,
                        seed=seed if seed is not None else (args.seed or 0))
    find_adapter(loaded.model)  # refuse unsupported families before any data is read
    return loaded


TASKS = ("classification", "segmentation", "detection")
#: the split of a segmentation set that --eval scores (``train`` fits heads and calibrates, ``val`` chooses)
EVAL_SPLIT = "test"


def _attention_blocks(ov: Dict[str, Any]) -> str:
    """``", attention in integer kernels: 12 of 12"`` where OpenVINO fused attention blocks, else ``""``."""
    att = ov.get("attention") or {}
    total = att.get("integer", 0) + att.get("float", 0)
    return f", attention in integer kernels: {att['integer']} of {total}" if total else ""


def _task(args: argparse.Namespace, loaded: LoadedModel) -> str:
    """The task: ``--task`` when given (it must be the model's), else the model's."""
    task = getattr(args, "task", None) or loaded.task
    if task != loaded.task:
        raise VitqError(f"--task {task} but {loaded.name} is a {loaded.task} model"
                        + (f" (a {task} model has a card with a {task}_head, or a module with task = '{task}')"
                           if task in ("segmentation", "detection") else ""))
    return task


def _default_batch(task: str) -> int:
    return {"classification": DEFAULT_BATCH, "detection": DEFAULT_BATCH_DETECTION}.get(task, DEFAULT_BATCH_DENSE)


def _calib_folder(args: argparse.Namespace, task: str) -> ImageList:
    """The calibration folder; for a dense task any folder of images (labels are not used), and a
    segmentation set's root means its ``images/train`` (a detection set's: its ``images/``)."""
    if task == "classification":
        return scan_folder(args.calib)
    root = Path(args.calib).expanduser()
    if (root / "images" / "train").is_dir():
        root = root / "images" / "train"
    elif task == "detection" and (root / "images").is_dir():
        root = root / "images"
    return scan_folder(root, labelled=False)


def _detection_eval(args: argparse.Namespace, seed: int) -> Tuple[Optional[DetectionSet], int]:
    """The COCO-format evaluation set (``--num-eval``: a seeded subset), its image files checked and
    its annotations read by pycocotools before any work, and how many images were left out
    (``--skip-bad-images``)."""
    if not args.eval_dir:
        return None, 0
    from .eval.detection import load_coco

    data, skipped = check_detection_images(scan_detection(args.eval_dir).sample(args.num_eval, seed),
                                           getattr(args, "skip_bad_images", False))
    load_coco(data.ground_truth())  # pycocotools present, and the annotations indexable
    return data, skipped


def _detection_only_backbone(args: argparse.Namespace) -> None:
    """What ``vitq quantize --task detection`` does not do, refused before any work."""
    if args.quantize_head:
        raise VitqError("--quantize-head is for segmentation models: a detector is quantized by its backbone alone "
                        "(its inputs captured from the detector's own forward), so its heads (RPN, box and mask "
                        "heads) stay float; drop --quantize-head")
    if args.data_free:
        raise VitqError("--data-free is not built for --task detection: the generators make images in the "
                        "backbone's input form, not the detector's; pass --calib with any folder of images")


def _segmentation_eval(args: argparse.Namespace, num_classes: int, ignore_index: Optional[int],
                       seed: int) -> Tuple[Optional[SegmentationSet], int]:
    """The scored split of a segmentation set (``--num-eval``: a seeded subset), its files checked and
    its void label known, and how many unreadable pairs were left out (``--skip-bad-images``)."""
    if not args.eval_dir:
        return None, 0
    drawn = scan_segmentation(args.eval_dir, EVAL_SPLIT).sample(args.num_eval, seed)
    data = _readable_pairs(drawn, getattr(args, "skip_bad_images", False))
    if data.ignore_index is None and ignore_index is not None:
        data = dataclasses.replace(data, ignore_index=ignore_index)
    if data.classes is not None and len(data.classes) != num_classes:
        raise VitqError(f"{data.root} has {len(data.classes)} classes but the model segments {num_classes}: "
                        "is this the set the model was trained on?")
    return data, len(drawn) - len(data)


def _readable_pairs(data: SegmentationSet, skip: bool) -> SegmentationSet:
    """``data`` without the pairs whose image or label map cannot be read, checked before any work
    (refused by name unless ``skip``, as for classification images)."""
    as_list = lambda paths: ImageList(data.root, paths, (-1,) * len(paths), {}, "unlabelled")  # noqa: E731
    bad = {p for p, _ in find_bad_images(as_list(data.images)) + find_bad_images(as_list(data.labels))}
    if not bad:
        return data
    keep = [i for i, (img, lab) in enumerate(zip(data.images, data.labels)) if img not in bad and lab not in bad]
    named = ", ".join(str(p) for p in sorted(bad)[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    if not skip:
        raise VitqError(f"{len(bad)} file(s) of the evaluation set cannot be used (unreadable or too small): {named}. "
                        "Remove or replace them, or pass --skip-bad-images to leave their pairs out")
    if not keep:
        raise VitqError(f"none of the {len(data)} image/label pairs of {data.root} can be read: {named}")
    return data.subset(keep)


def _num_classes(loaded: LoadedModel) -> int:
    return int(getattr(loaded.model, "num_classes", 0) or 0)


def _eval_images(args: argparse.Namespace, calib: Optional[ImageList], seed: int) -> Tuple[Optional[ImageList], int]:
    """Evaluation images (drawn from the calibration folder they exclude the calibration images)
    and how many unreadable ones were left out (``--skip-bad-images``)."""
    if not args.eval_dir:
        return None, 0
    exclude: Sequence[Path] = ()
    if calib is not None and Path(args.eval_dir).expanduser().resolve() == calib.root.resolve():
        exclude = calib.paths
    images = load_images(args.eval_dir, args.num_eval, seed, exclude, what="evaluation images")
    return check_images(images, "evaluation images", getattr(args, "skip_bad_images", False))


def _skipped_images(**counts: int) -> Dict[str, Any]:
    """``{"skipped_images": {...}}`` for metrics.json when unreadable images were left out, else {}."""
    return {"skipped_images": counts} if any(counts.values()) else {}


def _calib_images_of_plan(meta: Dict[str, Any], eval_dir: str) -> Optional[ImageList]:
    """Re-derive a plan's calibration subset (from its ``meta``) when evaluating on the folder it calibrated on."""
    calib = meta.get("calibration") or {}
    folder = calib.get("folder")
    if not folder or Path(eval_dir).expanduser().resolve() != Path(folder).resolve():
        return None
    return load_images(folder, calib["num"], calib["seed"], what="calibration images")


def _gen_settings(args: argparse.Namespace) -> Dict[str, Any]:
    settings = dict(args.gen_settings or {})
    if args.iterations is not None:
        settings["iterations"] = args.iterations
    return settings


def _generate(args: argparse.Namespace, loaded: LoadedModel, generator_name: str, recipe, device, run) -> GenerationResult:
    """Synthesise images (:func:`vitq.api.synthesize`); write images, grid and stats into the run."""
    recipe = recipe if recipe is not None else load_recipe("recommended")
    run.log.info("generating %d images with %s", args.num_images or recipe.data_free.num_images, generator_name)
    try:
        made = synthesize(loaded.model, recipe, generator=generator_name, num_images=args.num_images,
                          settings=_gen_settings(args), data_config=loaded.data_config, seed=args.seed, device=device,
                          progress=not args.quiet)
    except GenerationDiverged as err:
        kept = len(err.images)
        if kept:
            save_images(err.images, torch.zeros(kept, dtype=torch.long), run.path / "images", loaded.data_config)
            save_grid(err.images, run.path / "grid.png", loaded.data_config)
        run.log.error("generation stopped: %s; %d images made before it are kept in %s", err, kept, run.path)
        raise
    result, num = made.result, len(made.result.images)
    save_images(result.images, result.targets, run.path / "images", loaded.data_config)
    save_grid(result.images, run.path / "grid.png", loaded.data_config)
    stats = {"generator": generator_name, "settings": made.settings, "seconds": round(result.seconds, 2),
             "seconds_per_image": round(result.seconds / num, 3), "first_loss": result.losses[0] if result.losses else None,
             "last_loss": result.losses[-1] if result.losses else None,
             "output_loss": result.output_loss, **image_stats(loaded.model, result.images, result.targets)}
    if torch.cuda.is_available() and device.type == "cuda":
        stats["peak_cuda_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    run.write_json("stats.json", stats)
    run.log.info("made %d images in %.1f s (%s)", num, result.seconds,
                 ", ".join(f"{k}={v}" for k, v in sorted(made.settings.items())))
    if stats["mean_confidence"] is not None:
        run.log.info("float model confidence %.3f, %d distinct predicted classes", stats["mean_confidence"],
                     stats["distinct_predicted_classes"])
    if not result.output_loss and not has_class_head(loaded.model):
        run.log.info(HEADLESS_NOTE)
    return result


HEADLESS_NOTE = ("the model has no image-level classifier: the synthetic images were made without the cross-entropy "
                 "to random classes, from the patch losses and the image prior alone (a segmentation model uses "
                 "its per-pixel scores instead unless --gen-settings sets pixel_weight to 0; a model of your own "
                 "that returns per-pixel class scores: --gen-settings '{\"pixel_weight\": 1}')")


SYNTHETIC_FILE = "synthetic.pt"


def _generate_or_reuse(args: argparse.Namespace, loaded: LoadedModel, recipe, device, run) -> GenerationResult:
    """Synthesise the calibration images, or reuse those a resumed run made before."""
    saved = run.path / SYNTHETIC_FILE
    if args.resume and saved.exists():
        data = load_state(saved)
        run.log.info("resume: reusing the %d synthetic images in %s", len(data["images"]), saved)
        return GenerationResult(data["images"], data["targets"], 0.0,
                                output_loss=data.get("output_loss", has_class_head(loaded.model)))
    result = _generate(args, loaded, args.data_free, recipe, device, run)
    atomic_torch_save({"images": result.images.cpu(), "targets": result.targets.cpu(),
                       "output_loss": result.output_loss}, saved)
    return result


def _refresher(args: argparse.Namespace, loaded: LoadedModel, recipe, generated: GenerationResult, device,
               run) -> Optional[Refresher]:
    """CLAMP-ViT's cycle (:func:`vitq.api.data_free_refresher`), or None when the recipe has none."""
    return data_free_refresher(loaded.model, recipe, args.data_free, generated.targets, settings=_gen_settings(args),
                               data_config=loaded.data_config, seed=args.seed, device=device, log=run.log.info)


EXAMPLES = 4  # dense runs: predictions drawn, float beside quantized


def _spread(total: int, n: int) -> List[int]:
    """``n`` indices spread evenly over ``range(total)`` (a set's images are often consecutive frames)."""
    k = min(n, total)
    return sorted({round(i * (total - 1) / max(1, k - 1)) for i in range(k)})


def _metric_keys(metrics: Dict[str, Any]) -> str:
    if metrics.get("task") == "segmentation":
        row = [("fp mIoU", metrics.get("fp_miou")), ("quant mIoU", metrics.get("quant_miou")),
               ("fp pixel acc", metrics.get("fp_pixel_acc")), ("quant pixel acc", metrics.get("quant_pixel_acc")),
               ("pixel agreement", metrics.get("pixel_agreement")), ("KL", metrics.get("kl"))]
    elif metrics.get("task") == "detection":
        row = [(f"{tag} {what} {stat}", metrics.get(f"{tag}_{iou}_{key}"))
               for iou, what in (("bbox", "box"), ("segm", "mask")) if iou == "bbox" or f"quant_{iou}_ap" in metrics
               for key, stat in (("ap", "AP"), ("ap50", "AP50")) for tag in ("fp", "quant")]
    else:
        row = _classification_row(metrics)
    head = " | ".join(k for k, _ in row)
    vals = " | ".join("—" if v is None else (f"{v:.4f}" if k == "KL" else f"{v:.2f}") for k, v in row)
    return f"| {head} |\n| {' | '.join('---' for _ in row)} |\n| {vals} |"


def _classification_row(metrics: Dict[str, Any]) -> list:
    return [
        ("fp top-1", metrics.get("fp_top1")),
        ("quant top-1", metrics.get("quant_top1")),
        ("fp top-5", metrics.get("fp_top5")),
        ("quant top-5", metrics.get("quant_top5")),
        ("agreement", metrics.get("agreement")),
        ("KL", metrics.get("kl")),
    ]


def _refuse_detector(loaded: LoadedModel, command: str) -> None:
    if loaded.task == "detection":
        raise VitqError(f"{command} is not built for detection models ({loaded.name}); `vitq quantize --task "
                        "detection` and `vitq eval --plan` are")


def _backbone_path(loaded: LoadedModel) -> str:
    """The path of the transformer inside a dense model (a detector's ``backbone.body``)."""
    adapter = find_adapter(loaded.model)
    if not isinstance(adapter, BackboneAdapter):
        raise VitqError(f"{loaded.name} is a bare transformer, not a detector around one: --task detection needs a "
                        "model card with a detection_head")
    return adapter.path


def _label_map(loaded: LoadedModel) -> Optional[Dict[int, int]]:
    """A detector's label → COCO category id (its card's ``label_to_category``), or None."""
    return getattr(loaded.model, "label_to_category", None)


def _draw_detections(run: RunFolder, loaded: LoadedModel, qmodel: nn.Module, data: DetectionSet, device,
                     title: str) -> None:
    """``detections.png``: a few evaluation images with their ground-truth boxes, the float model's
    and the quantized model's."""
    from .eval.detection import detect

    chosen = data.subset(_spread(len(data), EXAMPLES))
    loader = list(detection_loader(chosen, DEFAULT_BATCH_DETECTION))
    outputs = []
    for model in (loaded.model, qmodel):
        with kept_on_its_device(model):
            outputs.append(detect(model, loader, device, progress=False)[0])
    images = [img for batch in loader for img in batch[0]]
    truth = chosen.ground_truth()["annotations"]
    examples = [(img, [a for a in truth if a.get("image_id") == image_id], [fp, q])
                for img, image_id, fp, q in zip(images, chosen.image_ids, *outputs)]
    drawn = detection_examples(examples, run.path / "detections.png", categories=chosen.categories(),
                               label_to_category=_label_map(loaded), titles=("ground truth", "float", title))
    if drawn is None:
        run.log.info("detections.png not drawn: no images to draw")
    else:
        run.log.info("detections of %d images, ground truth, float and quantized: %s", len(examples), drawn.name)


def _write_bits(run: RunFolder, result: Any, loaded: LoadedModel, title: str) -> Dict[str, Any]:
    """``bits.json`` and ``bits_per_layer.png``; for Greedy MP, ``greedy_mp.json`` and ``pareto.png``.
    Returns the summary that goes into ``metrics.json``."""
    stats = bit_stats(result.model, torch.zeros(1, *loaded.data_config["input_size"]))
    run.write_json("bits.json", stats)
    drawn = bits_per_layer(stats["layers"], run.path / "bits_per_layer.png", f"bits per layer: {title}")
    if "greedy_mp" in result.record:
        record = result.record["greedy_mp"]
        run.write_json("greedy_mp.json", record)
        points = record.get("checkpoints") or []
        series = {}
        if record.get("budget_w") is not None:
            series["against average weight bits"] = [{"bits": p["avg_w"], **p} for p in points]
        if record.get("budget_a") is not None:
            series["against average input bits"] = [{"bits": p["avg_a"], **p} for p in points]
        pareto(series, run.path / "pareto.png", x="bits", y="kl", xlabel="average bits of the blocks' linear layers",
               ylabel="KL(float ‖ quantized), calibration images", title=f"Greedy MP trajectory: {title}")
    if drawn is None:
        run.log.info("bits_per_layer.png not drawn: matplotlib is not installed (pip install 'vitq[plots]')")
    return {k: v for k, v in stats.items() if k != "layers"}


# -- commands -----------------------------------------------------------------------------------
def cmd_quantize(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    args.seed = 0 if args.seed is None else args.seed
    recipe = load_recipe(args.recipe)
    if args.overrides:
        overrides: Dict[str, Dict[str, Any]] = {}
        for stage, key, value in args.overrides:
            overrides.setdefault(stage, {})[key] = value
        recipe = recipe.with_overrides(overrides)
    start_plan = None
    if args.start_plan:
        start_plan = Plan.load(args.start_plan)
        args.w_bits, args.a_bits, args.protocol = start_plan_settings(start_plan, args.w_bits, args.a_bits,
                                                                      args.protocol)
    if args.budget is not None:
        recipe = recipe.with_budget(args.budget)
    args.w_bits = 8 if args.w_bits is None else args.w_bits
    args.a_bits = 8 if args.a_bits is None else args.a_bits
    protocol = get_protocol(args.protocol or "p1")
    if start_plan is not None and args.input_bits is not None:
        raise VitqError("--input-bits does not apply with --start-plan: the plan's quantizers are kept")
    input_bits = DEFAULT_INPUT_BITS if args.input_bits is None else args.input_bits
    if start_plan is not None:
        input_bits = start_plan.meta.get("input_bits")
    device = resolve_device(args.device)
    loaded = _load(args)
    task = _task(args, loaded)
    args.batch_size = args.batch_size or _default_batch(task)
    if task == "detection":
        _detection_only_backbone(args)
    if start_plan is not None:
        planned = start_plan.meta.get("model", {})
        if planned.get("arch") and planned["arch"] != loaded.arch:
            raise VitqError(f"the start plan was made for {planned['arch']!r} but the model is {loaded.arch!r}")
    calib: Optional[ImageList] = None
    skipped_calib = 0
    if args.data_free and args.num_calib is not None:
        raise VitqError("--num-calib counts real images; with --data-free use --num-images")
    if args.calib and (args.num_images or args.iterations or args.gen_settings):
        raise VitqError("--num-images, --iterations and --gen-settings are for --data-free; with --calib use --num-calib")
    if args.calib:
        folder = _calib_folder(args, task)
        default = DEFAULT_NUM_CALIB if task == "classification" else DEFAULT_NUM_CALIB_DENSE
        num_calib = args.num_calib if args.num_calib is not None else min(default, len(folder))
        calib = balanced_subset(folder, num_calib, args.seed, what="calibration images")
        calib, skipped_calib = check_images(calib, "calibration images", args.skip_bad_images)
        if _num_classes(loaded) and task == "classification":
            check_labels(calib, _num_classes(loaded))
    det_eval: Optional[DetectionSet] = None
    if task == "detection":
        (det_eval, skipped_eval), seg_eval, eval_images = _detection_eval(args, args.seed), None, None
    elif task == "segmentation":
        (seg_eval, skipped_eval), eval_images = _segmentation_eval(args, _num_classes(loaded), loaded.ignore_index, args.seed), None
    elif args.eval_dir and getattr(loaded.model, "num_classes", None) == 0:
        raise VitqError("the model has no classifier (num_classes=0): it outputs features, so top-1 and agreement "
                        "would mean nothing; drop --eval (the plan and report are still written)")
    else:
        seg_eval = None
        eval_images, skipped_eval = _eval_images(args, calib, args.seed)
        if eval_images is not None and _num_classes(loaded):
            check_labels(eval_images, _num_classes(loaded))

    eval_config = None
    if det_eval is not None:
        eval_config = {"folder": str(det_eval.root), "annotations": str(det_eval.annotations), "num": len(det_eval)}
    elif seg_eval is not None:
        eval_config = {"folder": str(seg_eval.root), "split": seg_eval.split, "num": len(seg_eval)}
    elif eval_images is not None:
        eval_config = {"folder": str(eval_images.root), "num": len(eval_images),
                       "excludes_calibration": bool(calib and eval_images.root == calib.root)}

    with RunFolder(args.out, overwrite=args.overwrite, echo=not args.quiet, resume=args.resume) as run:
        torch.manual_seed(args.seed)
        config = {
            "command": "quantize",
            "start_plan": str(args.start_plan) if args.start_plan else None,
            "model": loaded.identity,
            "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in loaded.data_config.items()},
            "recipe": recipe.to_dict(),
            "protocol": protocol.name,
            "w_bits": args.w_bits,
            "a_bits": args.a_bits,
            "input_bits": input_bits,
            "budget": args.budget,
            "seed": args.seed,
            "device": str(device),
            "batch_size": args.batch_size,
            "calib": {"folder": str(calib.root), "num": len(calib), "layout": calib.layout} if calib else
            {"data_free": args.data_free},
            "task": task,
            "quantize_head": bool(args.quantize_head),
            "eval": eval_config,
            "versions": {"vitq": __version__, "torch": torch.__version__, "python": platform.python_version()},
        }
        run.start(config)
        run.log.info("vitq %s: %s, recipe %s, W%dA%d, protocol %s, device %s",
                     __version__, loaded.name, recipe.name, args.w_bits, args.a_bits, protocol.name, device)
        meta = {"model": loaded.identity, "seed": args.seed, "batch_size": args.batch_size}
        refresh: Optional[Refresher] = None
        headless = False  # data-free images made without an output loss (a model without a head for it)
        if calib is not None:
            run.log.info("calibration: %d images from %s", len(calib), calib.root)
            if task == "detection":  # in the detector's own input form: it resizes and normalises inside
                calib_batches = detection_calibration_loader(calib, args.batch_size, args.workers)
            else:
                calib_batches = make_loader(calib, loaded.data_config, args.batch_size, args.workers)
            meta["calibration"] = {"folder": str(calib.root), "num": len(calib), "seed": args.seed}
            num_calib, calib_source = len(calib), str(calib.root)
        else:
            generated = _generate_or_reuse(args, loaded, recipe, device, run)
            headless = not generated.output_loss and not has_class_head(loaded.model)
            calib_batches = list(generated.images.split(args.batch_size))
            meta["calibration"] = {"data_free": args.data_free, "num": len(generated.images), "seed": args.seed}
            num_calib, calib_source = len(generated.images), f"the {args.data_free} generator (data-free)"
            refresh = _refresher(args, loaded, recipe, generated, device, run)
        t0 = time.perf_counter()
        result = quantize(
            loaded.model, recipe, calib_batches, w_bits=args.w_bits, a_bits=args.a_bits, protocol=protocol.name,
            device=device, progress=not args.quiet, meta=meta, seed=args.seed, start_plan=start_plan,
            workdir=run.path, resume=args.resume, refresh=refresh, log=run.log.info, input_bits=input_bits,
            head=args.quantize_head, backbone=_backbone_path(loaded) if task == "detection" else None,
            generated=calib is None,
        )
        run.log.info("stages %s done in %.1f s (%d quant points)", ", ".join(recipe.stage_names),
                     time.perf_counter() - t0, len(result.plan.rules))
        result.plan.save(run.path)
        if "search_curve" in result.record:
            run.write_json("search_curve.json", {"curve": result.record["search_curve"]})
            png = search_curve(result.record["search_curve"], run.path / "search_curve.png",
                               f"{recipe.name} search, {loaded.name} W{args.w_bits}A{args.a_bits}")
            if png is None:
                run.log.info("search_curve.png not drawn: matplotlib is not installed (pip install 'vitq[plots]')")

        bits = _write_bits(run, result, loaded, f"{Path(loaded.name).name} {recipe.name}")

        if det_eval is not None:
            run.log.info("evaluation: %d images of %s (annotations %s)", len(det_eval), det_eval.root,
                         det_eval.annotations.name)
            metrics = evaluate_detection(loaded.model, result.model,
                                         detection_loader(det_eval, args.batch_size, args.workers),
                                         det_eval.ground_truth(), label_to_category=_label_map(loaded),
                                         device=device, progress=not args.quiet)
            _draw_detections(run, loaded, result.model, det_eval, device, f"W{args.w_bits}A{args.a_bits}")
        elif task == "detection":
            size = model_size(result.model)
            metrics = {k: None for k in ("fp_bbox_ap", "quant_bbox_ap", "fp_bbox_ap50", "quant_bbox_ap50")}
            metrics.update(num_eval=0, weight_bytes=size.weight_bytes, fp_weight_bytes=size.fp_bytes)
        elif seg_eval is not None:
            run.log.info("evaluation: %d images of %s (%s split)", len(seg_eval), seg_eval.root, seg_eval.split)
            loader = segmentation_loader(seg_eval, loaded.data_config, args.batch_size, args.workers)
            metrics, examples = evaluate_segmentation(
                loaded.model, result.model, loader, num_classes=_num_classes(loaded),
                ignore_index=seg_eval.ignore_index, classes=seg_eval.classes or loaded.classes, device=device,
                progress=not args.quiet, examples=_spread(len(seg_eval), EXAMPLES))
            drawn = segmentation_examples(examples, run.path / "predictions.png", loaded.data_config,
                                          ignore_index=seg_eval.ignore_index,
                                          titles=("image", "labels", "float", f"W{args.w_bits}A{args.a_bits}"))
            if drawn is not None:
                run.log.info("predictions of %d images, float beside quantized: %s", len(examples), drawn.name)
        elif task == "segmentation":
            size = model_size(result.model)
            metrics = {k: None for k in ("fp_miou", "quant_miou", "pixel_agreement", "kl")}
            metrics.update(num_eval=0, weight_bytes=size.weight_bytes, fp_weight_bytes=size.fp_bytes)
        elif eval_images is not None:
            run.log.info("evaluation: %d images from %s", len(eval_images), eval_images.root)
            loader = make_loader(eval_images, loaded.data_config, args.batch_size, args.workers)
            metrics = evaluate(loaded.model, result.model, loader, device=device, progress=not args.quiet)
        else:
            size = model_size(result.model)
            metrics = {k: None for k in ("fp_top1", "quant_top1", "fp_top5", "quant_top5", "agreement", "kl")}
            metrics.update(num_eval=0, weight_bytes=size.weight_bytes, fp_weight_bytes=size.fp_bytes)
        metrics = {
            "model": loaded.name,
            "task": task,
            "recipe": recipe.name,
            "protocol": protocol.name,
            "w_bits": args.w_bits,
            "a_bits": args.a_bits,
            "input_bits": result.plan.meta.get("input_bits"),
            "budget": args.budget,
            "seed": args.seed,
            "num_calib": num_calib,
            "data_free": args.data_free,
            "start_plan": str(args.start_plan) if args.start_plan else None,
            **metrics,
            **_skipped_images(calib=skipped_calib, eval=skipped_eval),
            "bits": bits,
            **({"search": result.record["search"]} if "search" in result.record else {}),
            **({"greedy_mp": {k: result.record["greedy_mp"][k] for k in ("mode", "avg_w", "avg_a", "budget_w", "budget_a")}}
               if "greedy_mp" in result.record else {}),
            "seconds": round(time.perf_counter() - start, 2),
            "device": str(device),
        }
        notes = {
            "protocol_description": protocol.description,
            "calib": calib_source,
            "eval": f"{det_eval.root} (annotations {det_eval.annotations.name})" if det_eval is not None else
            f"{seg_eval.root}, {seg_eval.split} split" if seg_eval is not None else
            "—" if eval_images is None else str(eval_images.root)
            + (" (calibration images excluded)" if config["eval"]["excludes_calibration"] else ""),
            "device": str(device),
            "quant_points": count_quant_points(result.model),
            "float_layers": float_layers(result.model),
            "remarks": [HEADLESS_NOTE] if headless else [],
        }
        run.write_json("metrics.json", metrics)
        run.write_text("report.md", run_report(metrics, notes))
        run.log.info("\n%s", _metric_keys(metrics))
        folder = run.finish()
    if not args.quiet:
        print(f"run written to {folder}")
    return 0


def _is_exported(model: str) -> bool:
    """An exported model: ``.onnx`` (ONNX Runtime) or ``.xml`` (OpenVINO IR)."""
    return Path(model).suffix.lower() in (".onnx", ".xml")


def _load_plan_model(plan: Plan, model: Optional[str] = None, arch: Optional[str] = None,
                     model_kwargs: Optional[Dict[str, Any]] = None, random_weights: bool = False) -> LoadedModel:
    """The float model a plan was made for: ``model`` if given, else the one the plan records."""
    recorded = plan.meta.get("model") or {}
    if model is None:
        model = recorded.get("name")
        if not model:
            raise VitqError("the plan does not record its model: pass --model MODEL")
        path = Path(model).expanduser()
        if not path.exists() and ("/" in model or path.suffix.lower() in CHECKPOINT_SUFFIXES):
            raise VitqError(f"the plan's model {model} is not found from here: pass --model PATH")
        arch = arch or recorded.get("arch")
        model_kwargs = {**(recorded.get("kwargs") or {}), **(model_kwargs or {})}
    seed = recorded.get("random_weights_seed") or 0  # random weights: the plan's own, rebuilt
    loaded = load_model(model, arch=arch, model_kwargs=model_kwargs, pretrained=not random_weights, seed=seed)
    find_adapter(loaded.model)
    planned = recorded.get("arch")
    if planned and planned != loaded.arch:
        raise VitqError(f"the plan was made for {planned!r} but the model is {loaded.arch!r}: "
                        "pass the model the plan was made for")
    return loaded


def _check_deploy() -> None:
    require("onnx")
    require("onnxruntime")


def cmd_export(args: argparse.Namespace) -> int:
    _check_deploy()
    out = Path(args.out).expanduser()
    suffix = ".xml" if args.format == "openvino" else ".onnx"
    if out.suffix.lower() != suffix:
        raise VitqError(f"--format {args.format} writes {'an' if suffix == '.onnx' else 'a'} {suffix} file: "
                        f"--out must end in {suffix}, got {args.out!r}")
    if args.format == "openvino":
        from .export.openvino import _openvino
        _openvino()  # the missing package named before any work
    if out.exists() and not args.overwrite:
        raise VitqError(f"{out} already exists: choose another --out or pass --overwrite")
    run = Path(args.run).expanduser()
    if not run.exists():
        raise VitqError(f"run folder or plan {run} does not exist: pass the --out folder of `vitq quantize`")
    if run.is_file() and run.suffix.lower() != ".json":
        raise VitqError(f"{run} is not a run folder nor a plan.json: pass the --out folder of `vitq quantize`")
    plan = Plan.load(run)
    if plan.meta.get("backbone"):
        raise VitqError(f"the plan quantizes the backbone at {plan.meta['backbone']!r} of a model that takes other "
                        "inputs than an image tensor (a detector): exporting such a model is not built yet; its "
                        "quantized model runs in PyTorch (`vitq eval MODEL --plan RUN --eval SET`)")
    loaded = _load_plan_model(plan, args.model, args.arch, args.model_kwargs, args.random_weights)
    made_random = (plan.meta.get("model") or {}).get("random_weights_seed") is not None
    if args.random_weights and not made_random and not args.quiet:
        print("note: --random-weights: the exported model has random weights, not the ones the plan was "
              "calibrated on (for speed measurements only)", file=sys.stderr)
    qmodel = apply_plan(loaded.model, plan, check_weights=not (args.random_weights and not made_random))
    meta = {**plan.meta, "model": loaded.identity, "classes": loaded.classes, "ignore_index": loaded.ignore_index}
    if args.format == "openvino":
        from .export.openvino import export_openvino
        report = export_openvino(qmodel, out, int_format=args.int_format, data_config=loaded.data_config, meta=meta)
    else:
        report = export_onnx(qmodel, out, int_format=args.int_format, data_config=loaded.data_config, meta=meta,
                             opset=args.opset)
    files = report.save()
    if not args.quiet:
        d = report.to_dict()
        fmt, s, v = d["int_format"], report.sizes, report.verification
        print(f"integer format: {fmt['name'].upper()} ({fmt['reason']})")
        others = [f"{lay['name']} ({lay['precision']})" for lay in report.layers if lay not in report.integer_layers]
        if args.format == "openvino":
            ov = report.extra["openvino"]
            print(f"integer matrix products in OpenVINO: {ov['integer']} of {ov['integer'] + ov['float']}"
                  + (f", {ov['weight_only']} with integer weights computed in float" if ov.get("weight_only") else "")
                  + f" ({ov['by_layer']})" + _attention_blocks(ov))
        else:
            print(f"integer matrix products: {len(report.integer_layers)} of {len(report.layers)} "
                  f"(float: {', '.join(others) or 'none'})")
        size = s.get("openvino_bytes", s["onnx_bytes"])
        what = ".xml + .bin" if args.format == "openvino" else ".onnx"
        print(f"size: {size / 1e6:.2f} MB as {what} ({size / s['fp32_weight_bytes']:.3f}× float); weights packed at "
              f"{'/'.join(map(str, s['weight_bits']))} bits: {s['packed_weight_bytes'] / 1e6:.2f} MB "
              f"({s['packed_ratio']:.3f}×)")
        runtime = "OpenVINO" if args.format == "openvino" else "ONNX Runtime"
        print(f"{runtime} vs PyTorch ({v['num_images']} {v['inputs']}): max |Δ logit| {v['max_abs_diff']:.3g}, "
              f"top-1 agreement {v['agreement']:.1f} %")
        if "float64_max_abs_diff" in v:
            print(f"PyTorch float64 vs float32 (the model's own float-rounding sensitivity): max |Δ logit| "
                  f"{v['float64_max_abs_diff']:.3g}, top-1 agreement {v['float64_agreement']:.1f} %")
        for warning in report.warnings:
            print(f"warning: {warning}", file=sys.stderr)
    print(f"wrote {out} and {files['json']}, {files['markdown']}")
    return 0


def _eval_onnx(args: argparse.Namespace) -> int:
    _check_deploy()
    if args.random_weights or args.arch or args.model_kwargs or args.protocol:
        raise VitqError("--arch, --model-kwargs, --random-weights and --protocol do not apply to an exported model: "
                        "its model and protocol were fixed at export")
    if not args.eval_dir:
        raise VitqError("vitq eval needs --eval DIR (the images to evaluate on)")
    if Path(args.model).suffix.lower() == ".xml":
        from .export.openvino import OpenVinoModel
        onnx_model = OpenVinoModel(args.model, threads=args.threads, precision=args.ov_precision)
    else:
        if args.ov_precision:
            raise VitqError("--ov-precision applies to an OpenVINO model (.xml); this is an ONNX file run in "
                            "ONNX Runtime")
        onnx_model = OnnxModel(args.model, threads=args.threads)
    runtime = getattr(onnx_model, "runtime", "ONNX Runtime")
    if not onnx_model.meta:
        raise VitqError(f"{args.model} has no vitq metadata (preprocessing, classes): export it with `vitq export`")
    meta = onnx_model.meta.get("meta") or {}
    task = onnx_model.meta.get("task", "classification")
    seed = args.seed if args.seed is not None else meta.get("seed", 0)
    if task == "segmentation":
        return _eval_runtime_segmentation(args, onnx_model, runtime, meta, seed)
    if task != "classification":
        raise VitqError(f"{args.model} is a {task} model: scoring it in {runtime} is not built yet; score its plan "
                        "in PyTorch with `vitq eval CHECKPOINT --plan RUN --eval SET` (the export itself already "
                        "checks the runtime's outputs against the simulated model)")
    calib = _calib_images_of_plan(meta, args.eval_dir)
    images, skipped = _eval_images(args, calib, seed)
    if onnx_model.num_classes:
        check_labels(images, onnx_model.num_classes)
    reference = _simulated_reference(args, meta)
    loader = make_loader(images, onnx_model.data_config, args.batch_size or DEFAULT_BATCH, args.workers)
    metrics = evaluate_onnx(onnx_model, loader, reference=reference, progress=not args.quiet)
    metrics = {"model": str(args.model), "int_format": onnx_model.meta.get("int_format"),
               **{k: meta.get(k) for k in ("recipe", "protocol", "w_bits", "a_bits")}, "seed": seed, **metrics,
               **_runtime_precision(onnx_model), **_skipped_images(eval=skipped)}
    key = "openvino" if runtime == "OpenVINO" else "onnx"
    row = [(f"{runtime} top-1", metrics[f"{key}_top1"]), (f"{runtime} top-5", metrics[f"{key}_top5"])]
    if reference is not None:
        row += [("PyTorch simulated top-1", metrics["reference_top1"]), ("Δ top-1", metrics["top1_diff"]),
                ("agreement", metrics["agreement"])]
    return _report_runtime_eval(args, metrics, row)


def _runtime_precision(model: Any) -> Dict[str, Any]:
    """An OpenVINO model's precision for its float parts (OpenVINO picks bf16 on some CPUs), said on
    the console and recorded in the metrics; nothing for ONNX Runtime (always float32)."""
    precision = getattr(model, "inference_precision", None)
    if precision is None:
        return {}
    if precision != "f32":
        print(f"OpenVINO runs the float parts (LayerNorm, softmax, GELU) in {precision} on this CPU "
              "(its default here); --ov-precision f32 keeps them in float32", file=sys.stderr)
    return {"openvino_precision": precision}


def _report_runtime_eval(args: argparse.Namespace, metrics: Dict[str, Any], row: List[Tuple[str, float]]) -> int:
    """``vitq eval FILE``'s output: the metrics to ``--out``, a one-row table and the JSON on the console."""
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(metrics, indent=1) + "\n")
    print("| " + " | ".join(k for k, _ in row) + " |\n|" + "---|" * len(row) + "\n| "
          + " | ".join(f"{v:.2f}" for _, v in row) + " |")
    print(json.dumps(metrics))
    return 0


def _simulated_reference(args: argparse.Namespace, meta: Dict[str, Any]) -> Optional[nn.Module]:
    """With ``--plan``: the simulated PyTorch model of that plan, on the float model the file was
    exported from (as recorded in it); None without ``--plan``."""
    if not args.plan:
        return None
    plan = Plan.load(args.plan)
    exported = meta.get("model") or {}
    loaded = _load_plan_model(plan, exported.get("name"), exported.get("arch"), exported.get("kwargs")) \
        if exported.get("name") else _load_plan_model(plan)
    return apply_plan(loaded.model, plan)


def _eval_runtime_segmentation(args: argparse.Namespace, runtime_model: Any, runtime: str, meta: Dict[str, Any],
                               seed: int) -> int:
    """``vitq eval FILE.onnx|.xml --eval SET`` of a segmentation model: mIoU in the runtime, and with
    ``--plan`` the simulated PyTorch model on the same images (pixel agreement, KL)."""
    num_classes = int(runtime_model.num_classes or 0)
    data, skipped = _segmentation_eval(args, num_classes, meta.get("ignore_index"), seed)
    reference = _simulated_reference(args, meta)
    batch = args.batch_size or DEFAULT_BATCH_DENSE
    loader = segmentation_loader(data, runtime_model.data_config, batch, args.workers)
    key = "openvino" if runtime == "OpenVINO" else "onnx"
    metrics = {"model": str(args.model), "task": "segmentation",
               **{k: meta.get(k) for k in ("recipe", "protocol", "w_bits", "a_bits")}, "seed": seed,
               **evaluate_onnx_segmentation(runtime_model, loader, reference=reference, ignore_index=data.ignore_index,
                                            classes=data.classes or meta.get("classes"), progress=not args.quiet),
               **_runtime_precision(runtime_model), **_skipped_images(eval=skipped)}
    row = [(f"{runtime} mIoU", metrics[f"{key}_miou"]), (f"{runtime} pixel acc", metrics[f"{key}_pixel_acc"])]
    if reference is not None:
        row += [("PyTorch simulated mIoU", metrics["reference_miou"]), ("Δ mIoU", metrics["miou_diff"]),
                ("pixel agreement", metrics["pixel_agreement"])]
    return _report_runtime_eval(args, metrics, row)


def cmd_bench_speed(args: argparse.Namespace) -> int:
    _check_deploy()
    loaded = _load(args, Plan.load(args.plan) if args.plan else None)
    _refuse_detector(loaded, "vitq bench-speed")
    float_model = loaded.model
    if args.plan:
        if args.calib:
            raise VitqError("--calib calibrates a plan here; with --plan the plan's scales are used: "
                            "pass one of them")
        plan = Plan.load(args.plan)
        planned = plan.meta.get("model", {}).get("arch")
        if planned and planned != loaded.arch:
            raise VitqError(f"the plan was made for {planned!r} but the model is {loaded.arch!r}")
        qmodel, plan_note = apply_plan(float_model, plan), f"plan {args.plan}"
        meta = dict(plan.meta)
    else:
        if args.calib:
            calib = load_images(args.calib, min(args.num_calib, len(scan_folder(args.calib))), args.seed,
                                what="calibration images")
            batches = make_loader(calib, loaded.data_config, 32)
            source = f"{len(calib)} images of {calib.root}"
        else:
            size = tuple(loaded.data_config["input_size"])
            batches = [torch.randn(args.num_calib, *size, generator=torch.Generator().manual_seed(args.seed))]
            source = f"{args.num_calib} seeded random images (speed only: accuracy is not meaningful)"
        result = quantize(float_model, "minmax", batches, w_bits=args.w_bits, a_bits=args.a_bits,
                          protocol=args.protocol, device="cpu", progress=False, meta={"model": loaded.identity})
        qmodel, meta = result.model, result.plan.meta
        plan_note = f"minmax W{args.w_bits}A{args.a_bits} {args.protocol} calibrated on {source}"
    if args.keep:
        Path(args.keep).mkdir(parents=True, exist_ok=True)
    result = bench_speed(
        float_model, qmodel, data_config=loaded.data_config, batch_sizes=args.batch_sizes, repeats=args.repeats,
        warmup=args.warmup, threads=args.threads, int_format=args.int_format, workdir=args.keep,
        backends=args.backends, profile=args.profile, meta=meta, progress=not args.quiet,
        ov_precision=args.ov_precision,
    )
    result = {"model": loaded.name, "arch": loaded.arch, "plan": plan_note, **result}
    out = Path(args.out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    fmt = result["int_format"]
    print(f"{loaded.name}: {plan_note}")
    print(f"int8 format {fmt['name'].upper()}: {fmt['reason']}; threads: {result['threads']}; "
          f"median of {args.repeats} runs after {args.warmup} warm-up")
    print(speed_table(result))
    print(size_table(result))
    if "profile" in result:
        for name in ("ort_int8", "ort_fp32"):
            prof = result["profile"][name]
            print(f"\nONNX Runtime {name[4:]} at batch {prof['batch']}: {prof['total_ms']:.1f} ms in kernels")
            print(profile_table(prof))
    floats = result["export"]["float_gemms"]
    if floats:
        print(f"matrix products left in float32 (ONNX Runtime): {', '.join(floats)}")
    if "openvino" in result:
        ov, v = result["openvino"]["gemms"], result["openvino"]["verification"]
        print(f"OpenVINO int8: {ov['integer']} of {ov['integer'] + ov['float']} matrix products in integer kernels"
              + (f" ({ov['weight_only']} more with integer weights computed in float)" if ov.get("weight_only") else "")
              + _attention_blocks(ov) + "; "
              f"vs PyTorch simulated ({v['num_images']} {v['inputs']}): max |Δ logit| {v['max_abs_diff']:.3g}, "
              f"top-1 agreement {v['agreement']:.1f} %")
    if "runtime_choice" in result:
        print(f"fastest int8 runtime here: {result['runtime_choice']['runtime']} ({result['runtime_choice']['reason']})")
    print(f"wrote {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if _is_exported(args.model):
        return _eval_onnx(args)
    if not args.plan:
        raise VitqError("vitq eval needs --plan PLAN (the plan.json of a run) for a PyTorch model; "
                        "an exported .onnx or .xml file needs none")
    plan = Plan.load(args.plan)
    if args.protocol and args.protocol != plan.meta.get("protocol"):
        raise VitqError(f"the plan uses protocol {plan.meta.get('protocol')!r}; drop --protocol or pass that one")
    if not args.eval_dir:
        raise VitqError("vitq eval needs --eval DIR (the images to evaluate on)")
    device = resolve_device(args.device)
    loaded = _load(args, plan)
    planned = plan.meta.get("model", {})
    if planned.get("arch") and planned["arch"] != loaded.arch:
        raise VitqError(
            f"the plan was made for {planned['arch']!r} but the model is {loaded.arch!r}: pass the model the plan was made for"
        )
    check_plan_weights(loaded.model, plan)  # before any image is read
    seed = args.seed if args.seed is not None else plan.meta.get("seed", 0)
    task = _task(args, loaded)
    args.batch_size = args.batch_size or _default_batch(task)
    skipped = 0
    if task == "detection":
        data, skipped = _detection_eval(args, seed)
        qmodel = apply_plan(loaded.model, plan, check_weights=False)  # checked above, before the images
        metrics = evaluate_detection(loaded.model, qmodel, detection_loader(data, args.batch_size, args.workers),
                                     data.ground_truth(), label_to_category=_label_map(loaded), device=device,
                                     progress=not args.quiet)
    elif task == "segmentation":
        data, skipped = _segmentation_eval(args, _num_classes(loaded), loaded.ignore_index, seed)
        qmodel = apply_plan(loaded.model, plan, check_weights=False)
        loader = segmentation_loader(data, loaded.data_config, args.batch_size, args.workers)
        metrics, _ = evaluate_segmentation(loaded.model, qmodel, loader, num_classes=_num_classes(loaded),
                                           ignore_index=data.ignore_index, classes=data.classes or loaded.classes,
                                           device=device, progress=not args.quiet)
    else:
        calib = _calib_images_of_plan(plan.meta, args.eval_dir)
        images, skipped = _eval_images(args, calib, seed)
        if _num_classes(loaded):
            check_labels(images, _num_classes(loaded))
        qmodel = apply_plan(loaded.model, plan, check_weights=False)  # checked above, before the images
        loader = make_loader(images, loaded.data_config, args.batch_size, args.workers)
        metrics = evaluate(loaded.model, qmodel, loader, device=device, progress=not args.quiet)
    metrics = {
        "model": loaded.name,
        "task": task,
        "plan": str(args.plan),
        "recipe": plan.meta.get("recipe"),
        "protocol": plan.meta.get("protocol"),
        "w_bits": plan.meta.get("w_bits"),
        "a_bits": plan.meta.get("a_bits"),
        "seed": seed,
        **metrics,
        **_skipped_images(eval=skipped),
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(metrics, indent=1) + "\n")
    print(_metric_keys(metrics))
    print(json.dumps(metrics))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    args.seed = 0 if args.seed is None else args.seed
    recipe = load_recipe(args.recipe) if args.recipe else None
    device = resolve_device(args.device)
    loaded = _load(args)
    _refuse_detector(loaded, "vitq generate")
    with RunFolder(args.out, overwrite=args.overwrite, echo=not args.quiet) as run:
        torch.manual_seed(args.seed)
        run.start({"command": "generate", "model": loaded.identity, "generator": args.generator,
                                       "recipe": args.recipe, "num_images": args.num_images, "seed": args.seed,
                                       "device": str(device), "settings": args.gen_settings,
                                       "iterations": args.iterations})
        _generate(args, loaded, args.generator, recipe, device, run)
        folder = run.finish()
    if not args.quiet:
        print(f"images written to {folder / 'images'} (grid: {folder / 'grid.png'}); calibrate with --calib {folder / 'images'}")
    return 0


def _first_sentence(text: Optional[str]) -> str:
    """The first sentence of a docstring or description, on one line."""
    paragraph = " ".join((text or "").strip().split("\n\n")[0].split())
    end = paragraph.find(". ")
    return paragraph if end < 0 else paragraph[:end + 1]


def cmd_list(args: argparse.Namespace) -> int:
    sections = [
        ("recipes", [(n, load_recipe(n).description) for n in RECIPES.names()]),
        ("observers", [(n, cls.__doc__) for n, cls in OBSERVERS.items()]),
        ("protocols", [(n, proto.description) for n, proto in PROTOCOLS.items()]),
        ("generators (data-free)", [(n, cls.__doc__) for n, cls in GENERATORS.items()]),
        ("recipe stages (settings: vitq/recipes/*.yaml; override with --set STAGE.KEY=VALUE)",
         [(n, cls.__doc__) for n, cls in STAGES.items()]),
        ("search fitness functions", [(n, f"({entry.scope} scope) {entry.fn.__doc__}") for n, entry in FITNESS.items()]),
    ]
    for title, entries in sections:
        print(f"{title}:")
        for name, text in entries:
            print(f"  {name:18s} {_first_sentence(text)}")
    print("model families:")
    for name, cls in ADAPTERS.items():
        print(f"  {name:18s} {cls.family}")
    print(f"  {'(backbone)':18s} {BackboneAdapter.family}")
    return 0


COMMANDS = {
    "quantize": cmd_quantize,
    "eval": cmd_eval,
    "export": cmd_export,
    "bench-speed": cmd_bench_speed,
    "generate": cmd_generate,
    "list": cmd_list,
}


def _plain(message: str) -> str:
    """A VitqError raised in a DataLoader worker comes back wrapped with the worker's traceback:
    keep only the message."""
    if "Original Traceback" in message:
        last = message.strip().splitlines()[-1]
        return last.split("VitqError: ", 1)[-1]
    return message


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except VitqError as err:
        print(f"vitq {args.command}: error: {_plain(str(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
